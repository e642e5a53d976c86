"""Configuration: every problem reported with its key path, secrets, search path, example."""

from __future__ import annotations

import os
import tomllib
import typing
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest

from snapcoord import schema
from snapcoord.config import find_config_file, load_config, parse_config, parse_table
from snapcoord.errors import ConfigError, UsageError
from snapcoord.example import example_config
from snapcoord.secrets import Secret
from snapcoord.settings import (
    SCHEMA_OF,
    GuestConfig,
    LibvirtSettings,
    ProxmoxSettings,
    VsphereSettings,
)
from tests.cli_helpers import snapcoord, write_config

KIND_TYPES: dict[str, Any] = {
    "str": str,
    "choice": str,
    "int": int,
    "float": float,
    "bool": bool,
    "secret": Secret,
    "strlist": tuple[str, ...],
    "argv": tuple[str, ...],
    "count": int | str,  # an integer or "auto"
}

BAD = """
[defaults]
store = "relative/path"
lable = "typo"

[hypervisors.lab]
type = "libvirt"
uri = 42

[hypervisors.vc]
type = "vsphere"
host = "vc"
user = "u"
password = "literal-password"

[vms.db1]
hypervisor = "nope"
memory = "yes"

[vms.db1.guest]
port = 70000
services = ["apache2; rm -rf /"]
transport = "telnet"
"""


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    problems = info.value.problems
    expected = [
        "defaults.store: must be an absolute path",
        "defaults.lable: unknown key",
        "hypervisors.lab.uri: must be a non-empty string",
        "hypervisors.vc.password: must not be a literal",
        "vms.db1.hypervisor: no hypervisor 'nope' (defined: lab, vc)",
        "vms.db1.memory: must be true or false",
        "vms.db1.guest.port: must be an integer 1-65535",
        "vms.db1.guest.services: service name 'apache2; rm -rf /': use letters",
        "vms.db1.guest.transport: must be one of 'ssh', 'exec'",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    assert "literal-password" not in str(info.value)


def test_config_check_exits_2_and_prints_every_problem_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    proc = snapcoord("-c", str(path), "config", "check")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) >= 9
    assert all(line.startswith(f"snapcoord: error: {path}: ") for line in lines)
    assert "Traceback" not in proc.stderr


def test_invalid_toml_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[vms.db1\n")
    proc = snapcoord("-c", str(path), "config", "check")
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_secrets_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", "from-env")
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-file\n")
    secret_file.chmod(0o600)
    raw = {
        "hypervisors": {
            "a": {"type": "vsphere", "host": "h", "user": "u", "password": {"env": "PW"}},
            "b": {
                "type": "vsphere",
                "host": "h",
                "user": "u",
                "password": {"file": str(secret_file)},
            },
        }
    }
    config = parse_config(raw)
    first, second = config.hypervisors["a"], config.hypervisors["b"]
    assert isinstance(first, VsphereSettings) and isinstance(second, VsphereSettings)
    first, second = first.password, second.password
    assert isinstance(first, Secret) and first.reveal() == "from-env"
    assert second.reveal() == "from-file"
    assert "from-env" not in repr(config.hypervisors) and "from-file" not in str(second)
    assert config.warnings == ()
    secret_file.chmod(0o644)  # others could read it: refused, as ssh refuses such a private key
    with pytest.raises(ConfigError, match="readable by group and others"):
        parse_config(raw)


def test_missing_secret_env_is_a_problem() -> None:
    raw = {
        "hypervisors": {
            "a": {
                "type": "vsphere",
                "host": "h",
                "user": "u",
                "password": {"env": "SNAPCOORD_UNSET_VAR"},
            }
        }
    }
    os.environ.pop("SNAPCOORD_UNSET_VAR", None)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.problems == [
        "hypervisors.a.password: environment variable 'SNAPCOORD_UNSET_VAR' is not set"
    ]


def test_proxmox_auth_cross_checks() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"hypervisors": {"p": {"type": "proxmox", "host": "h"}}})
    assert info.value.problems == [
        "hypervisors.p: set token_id + token_secret (or user + password)"
    ]


def test_exec_transport_needs_a_prefix_and_ssh_a_host() -> None:
    raw = {
        "hypervisors": {"lab": {"type": "libvirt"}},
        "vms": {
            "a": {"hypervisor": "lab", "guest": {"transport": "exec"}},
            "b": {"hypervisor": "lab", "guest": {}},
        },
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.problems == [
        "vms.a.guest.exec_prefix: required when transport = 'exec' ([] runs locally)",
        "vms.b.guest.host: required when transport = 'ssh'",
    ]


def test_defaults_fill_in_and_vm_inherits_label() -> None:
    config = parse_config(
        {
            "defaults": {"label": "nightly"},
            "hypervisors": {"lab": {"type": "libvirt"}},
            "vms": {"db1": {"hypervisor": "lab", "guest": {"host": "db1"}}},
        }
    )
    vm = config.vm("db1")
    assert vm.label == "nightly" and vm.ref == "db1"
    assert vm.guest is not None and vm.guest.services == ("apache2", "cron")
    assert vm.guest.database == "auto" and vm.guest.sudo is False
    assert config.hypervisors["lab"] == LibvirtSettings("libvirt", "qemu:///system")


def test_the_former_mysqldump_keys_still_work_with_one_warning_each() -> None:
    old = {
        "hypervisor": "lab",
        "guest": {"host": "db1", "mysqldump": True},
        "mysqldump": {"databases": ["app"], "compression": "zstd"},
    }
    new = {
        "hypervisor": "lab",
        "guest": {"host": "db1", "dump": True},
        "dump": {"databases": ["app"], "compression": "zstd"},
    }
    configs = [
        parse_config({"hypervisors": {"lab": {"type": "libvirt"}}, "vms": {"db1": vm}})
        for vm in (old, new)
    ]
    assert configs[0].vms == configs[1].vms  # the same typed VM either way
    assert configs[0].vm("db1").dump.databases == ("app",)
    assert configs[0].warnings == (
        "vms.db1.mysqldump: deprecated name, use dump",
        "vms.db1.guest.mysqldump: deprecated name, use dump",
    )
    assert configs[1].warnings == ()


def test_a_key_under_its_old_and_new_name_is_a_problem() -> None:
    vm = {"hypervisor": "lab", "guest": {"host": "h", "dump": True, "mysqldump": False}}
    with pytest.raises(ConfigError) as info:
        parse_config({"hypervisors": {"lab": {"type": "libvirt"}}, "vms": {"db1": vm}})
    assert info.value.problems == [
        "vms.db1.guest.mysqldump: set dump only (mysqldump is its former name)"
    ]


def test_config_check_prints_the_deprecation_warning(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[hypervisors.lab]\ntype = "libvirt"\n[vms.db1]\nhypervisor = "lab"\n'
        '[vms.db1.guest]\nhost = "db1"\nmysqldump = true\n'
    )
    proc = snapcoord("-c", str(path), "config", "check")
    assert proc.returncode == 0
    assert "vms.db1.guest.mysqldump: deprecated name, use dump" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_typed_tables_are_frozen_and_validated_one_by_one() -> None:
    guest = parse_table(GuestConfig, {"host": "db1", "services": ["cron"]})
    assert guest.services == ("cron",) and guest.command_timeout == 60.0  # schema default
    with pytest.raises(FrozenInstanceError):
        guest.sudo = True  # type: ignore[misc]
    with pytest.raises(ConfigError) as info:
        parse_table(GuestConfig, {"port": 0, "nosuch": 1}, path="vms.x.guest")
    assert info.value.problems == [
        "vms.x.guest.nosuch: unknown key (known: " + ", ".join(sorted(schema.GUEST)) + ")",
        "vms.x.guest.port: must be an integer 1-65535",
    ]
    with pytest.raises(ConfigError, match="must be a ProxmoxSettings type"):
        parse_table(ProxmoxSettings, {"type": "libvirt"})


def test_every_typed_class_has_exactly_the_keys_of_its_schema_table() -> None:
    for cls, keys in SCHEMA_OF.items():
        hints = typing.get_type_hints(cls)
        assert set(hints) == set(keys), cls
        for name, key in keys.items():
            typed = KIND_TYPES[key.kind]
            expected = typed | None if key.default is None else typed  # optional: None if unset
            assert hints[name] == expected, f"{cls.__name__}.{name}: {hints[name]}"


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSPHERE_PASSWORD", "x")
    monkeypatch.setenv("PVE_TOKEN_SECRET", "y")
    config = parse_config(tomllib.loads(example_config()))
    assert set(config.hypervisors) == {"lab", "vcenter", "pve"}
    assert config.vm("db1").guest is not None
    proc = snapcoord("config", "example")
    assert proc.returncode == 0 and proc.stdout.startswith("# snapcoord configuration")


def test_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SNAPCOORD_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if not Path("/etc/snapcoord/config.toml").exists():
        with pytest.raises(UsageError):
            find_config_file(None)
    write_config(tmp_path / "snapcoord.toml", {"defaults": {}})
    if not Path("/etc/snapcoord/config.toml").exists():
        with pytest.raises(UsageError, match="current directory is not searched"):
            find_config_file(None)  # never the current directory (issue 23, finding 3)
    user = tmp_path / "home" / ".config" / "snapcoord" / "config.toml"
    user.parent.mkdir(parents=True)
    write_config(user, {"defaults": {}})
    assert find_config_file(None) == user
    monkeypatch.setenv("SNAPCOORD_CONFIG", "/elsewhere.toml")
    assert find_config_file(None) == Path("/elsewhere.toml")
    assert find_config_file("/explicit.toml") == Path("/explicit.toml")


def test_an_unknown_key_near_a_known_one_gets_a_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(
        '[defaults]\nlable = "x"\n[hypervisors.lab]\ntype = "libvirt"\n'
        '[vms.db1]\nhypervisor = "lab"\n[vms.db1.guest]\nhost = "db1"\nstop_timout = 30\n'
        "nosuch = 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    problems = info.value.problems
    assert "defaults.lable: unknown key (did you mean 'label'?)" in problems
    assert "vms.db1.guest.stop_timout: unknown key (did you mean 'stop_timeout'?)" in problems
    [far] = [p for p in problems if p.startswith("vms.db1.guest.nosuch")]
    assert (
        far == "vms.db1.guest.nosuch: unknown key (known: " + ", ".join(sorted(schema.GUEST)) + ")"
    )


def test_a_missing_ca_file_or_key_is_one_line_at_config_check(tmp_path: Path) -> None:
    """They once passed ``config check``; every command then died with a traceback (exit 1)
    at the first connection."""
    path = tmp_path / "files.toml"
    path.write_text(
        '[hypervisors.pve]\ntype = "proxmox"\nhost = "127.0.0.1"\ntoken_id = "snap@pve!bk"\n'
        f'token_secret = {{ file = "{tmp_path}/nosecret" }}\nca_file = "/nonexistent/ca.pem"\n'
        '[vms.db]\nhypervisor = "pve"\nvmid = 100\n[vms.db.guest]\nhost = "db"\n'
        f'identity_file = "{tmp_path}"\n'
    )
    for command in (["config", "check"], ["list", "db"]):
        done = snapcoord("-c", str(path), *command)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert "hypervisors.pve.ca_file: '/nonexistent/ca.pem': no such file" in done.stderr
        assert f"vms.db.guest.identity_file: '{tmp_path}': not a file" in done.stderr


def test_config_check_counts_in_the_singular_and_the_plural(tmp_path: Path) -> None:
    one = write_config(
        tmp_path / "one.toml",
        {"hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
         "vms.db": {"hypervisor": "lab"}},
    )  # fmt: skip
    assert snapcoord("-c", str(one), "config", "check").stdout.endswith("(1 hypervisor, 1 VM)\n")
    two = write_config(
        tmp_path / "two.toml",
        {"hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
         "vms.db": {"hypervisor": "lab"}, "vms.web": {"hypervisor": "lab"}},
    )  # fmt: skip
    assert snapcoord("-c", str(two), "config", "check").stdout.endswith("(1 hypervisor, 2 VMs)\n")


def test_global_options_work_after_the_command_too(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        {"hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
         "vms.db": {"hypervisor": "lab"}},
    )  # fmt: skip
    after = snapcoord("config", "check", "-c", str(config))
    assert after.returncode == 0 and after.stdout.startswith(str(config)), after.stderr
    absent = str(tmp_path / "absent.toml")
    wins = snapcoord("-c", absent, "config", "check", "--config", str(config))
    assert wins.returncode == 0, "given after the command, it is the one used: " + wins.stderr
    verbose = snapcoord("config", "check", "-c", str(config), "-v", "--debug")
    assert verbose.returncode == 0, verbose.stderr
    helped = snapcoord("status", "--help")
    assert "--json" in helped.stdout and "one JSON object per VM" in helped.stdout


def _guest_problems(**guest: Any) -> list[str]:
    raw = {
        "hypervisors": {"lab": {"type": "libvirt"}},
        "vms": {"db1": {"hypervisor": "lab", "guest": {"host": "db1", **guest}}},
    }
    try:
        parse_config(raw)
    except ConfigError as exc:
        return exc.problems
    return []


def test_a_watchdog_that_fires_before_the_stops_can_end_is_refused() -> None:
    """The demo's own config had 60 s against two stops of 120 s each (services together, then
    the database): the watchdog could start the services in the middle of a legitimate run."""
    assert _guest_problems(watchdog_seconds=60) == [
        "vms.db1.guest.watchdog_seconds: 60 s fires before the stops can end (stop_timeout "
        "120 s for apache2, cron (together) then the database: 240 s); set watchdog_seconds to "
        "at least 241 or lower stop_timeout"
    ]
    assert _guest_problems(watchdog_seconds=240)  # fires the moment the stops may end: refused
    assert _guest_problems(watchdog_seconds=241) == []
    assert _guest_problems(watchdog_seconds=60, stop_timeout=29.5) == []
    assert _guest_problems() == []  # the defaults: 600 s against 240 s


def test_the_watchdog_rule_counts_the_stops_a_run_makes() -> None:
    # one after another without parallel_services: three services, then the database
    serial = {"services": ["apache2", "cron", "php-fpm"], "parallel_services": False}
    assert _guest_problems(**serial, watchdog_seconds=400, stop_timeout=100) == [
        "vms.db1.guest.watchdog_seconds: 400 s fires before the stops can end (stop_timeout "
        "100 s for apache2, cron, php-fpm (in turn) then the database: 400 s); set "
        "watchdog_seconds to at least 401 or lower stop_timeout"
    ]
    assert _guest_problems(**serial, watchdog_seconds=401, stop_timeout=100) == []
    # no database stopped: database = "none", or consistency = "pause" (restore-dump stops
    # the services only)
    assert _guest_problems(database="none", watchdog_seconds=121) == []
    assert _guest_problems(consistency="pause", watchdog_seconds=121) == []
    assert _guest_problems(consistency="pause", watchdog_seconds=120) == [
        "vms.db1.guest.watchdog_seconds: 120 s fires before the stops can end (stop_timeout "
        "120 s for apache2, cron (together): 120 s); set watchdog_seconds to at least 121 or "
        "lower stop_timeout"
    ]
    assert _guest_problems(services=[], watchdog_seconds=121) == []  # the database alone


def test_config_check_refuses_a_short_watchdog_with_exit_2(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "wd.toml",
        {"hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
         "vms.db1": {"hypervisor": "lab"},
         "vms.db1.guest": {"transport": "exec", "exec_prefix": [], "watchdog_seconds": 60}},
    )  # fmt: skip
    done = snapcoord("-c", str(path), "config", "check")
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"snapcoord: error: {path}: vms.db1.guest.watchdog_seconds: 60 s ")
    assert line.endswith("set watchdog_seconds to at least 241 or lower stop_timeout")


def agent_vm(hypervisor_type: str, **guest: Any) -> dict[str, Any]:
    hv: dict[str, Any] = {"type": hypervisor_type}
    if hypervisor_type == "proxmox":
        hv.update(host="pve", token_id="u@pve!t", token_secret={"env": "SNAPCOORD_TEST_TOKEN"})
    if hypervisor_type == "vsphere":
        hv.update(host="vc", user="u", password={"env": "SNAPCOORD_TEST_TOKEN"})
    return {
        "hypervisors": {"hv": hv},
        "vms": {"db": {"hypervisor": "hv", "guest": {"transport": "agent", **guest}}},
    }


def test_the_agent_transport_needs_no_host_and_a_qemu_hypervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SNAPCOORD_TEST_TOKEN", "s")
    for kind in ("libvirt", "proxmox"):
        config = parse_config(agent_vm(kind))
        guest = config.vm("db").guest
        assert guest is not None and (guest.transport, guest.dump_transport) == ("agent", "agent")
        assert config.warnings == ()
    with pytest.raises(ConfigError) as info:
        parse_config(agent_vm("vsphere"))
    assert info.value.problems == [
        "vms.db.guest.transport: 'agent' needs a libvirt or proxmox hypervisor (QEMU's guest "
        "agent), not vsphere; use 'ssh'"
    ]


def test_the_agent_transport_warns_about_what_it_ignores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPCOORD_TEST_TOKEN", "s")
    config = parse_config(agent_vm("libvirt", host="db1", known_hosts="/etc/kh", sudo=True))
    assert config.warnings == (
        "vms.db.guest: host, known_hosts ignored with transport = 'agent' (no SSH is used "
        "unless dump_transport = 'ssh')",
        "vms.db.guest.sudo: ignored with transport = 'agent' (the agent runs commands as root)",
    )
    kept = parse_config(agent_vm("libvirt", host="db1", dump_transport="ssh"))
    assert kept.warnings == ()
    with pytest.raises(ConfigError) as info:
        parse_config(agent_vm("libvirt", dump_transport="ssh"))
    assert info.value.problems == ["vms.db.guest.host: required when dump_transport = 'ssh'"]
    raw = agent_vm("libvirt", host="db1", dump_transport="ssh")
    raw["vms"]["db"]["guest"]["transport"] = "ssh"
    assert parse_config(raw).warnings == (
        "vms.db.guest.dump_transport: ignored unless transport = 'agent'",
    )


def test_config_check_says_what_the_agent_transport_needs(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[hypervisors.pve]\ntype = "proxmox"\nhost = "pve"\ntoken_id = "u@pve!t"\n'
        'token_secret = { env = "SNAPCOORD_TEST_TOKEN" }\n[hypervisors.virt]\ntype = "libvirt"\n'
        '[vms.db1]\nhypervisor = "pve"\n[vms.db1.guest]\ntransport = "agent"\n'
        '[vms.db2]\nhypervisor = "virt"\n[vms.db2.guest]\ntransport = "agent"\n'
    )
    path.chmod(0o600)
    proc = snapcoord("-c", str(path), "config", "check", env={"SNAPCOORD_TEST_TOKEN": "s"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert (
        "db1: guest commands through the QEMU guest agent (proxmox); a container (lxc) has "
        "none: it keeps transport = 'exec' (pct exec) or 'ssh'"
    ) in lines
    assert (
        "db2: guest commands through the QEMU guest agent (libvirt); the domain needs the "
        "org.qemu.guest_agent.0 channel"
    ) in lines


def test_a_guest_that_is_not_a_table_is_one_problem_whatever_the_transport_checks() -> None:
    raw = {"hypervisors": {"lab": {"type": "libvirt"}}, "vms": {"a": {"hypervisor": "lab",
                                                                   "guest": 0}}}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.problems == ["vms.a.guest: must be a table"]

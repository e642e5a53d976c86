"""Issue 23, finding 12: no configuration value reaches a command line as an option.

The schema refuses hosts, user names, service and database names that start with '-' (or '.'),
and check_url that is not http(s); and every command line that carries such a value ends its
options first (``ssh ... -- HOST``, ``curl ... -- URL``), so one that slipped through would still
be an argument. All local: no guest, no ssh connection.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from snapcoord import guest as guest_module
from snapcoord import naming, store
from snapcoord.config import parse_config, parse_table
from snapcoord.errors import ConfigError, PreflightError
from snapcoord.guest import SshTransport
from snapcoord.hooks.databases import mysql, postgresql
from snapcoord.hooks.guest import services
from snapcoord.settings import DumpConfig, GuestConfig
from snapcoord.shell import Completed

INJECTED_HOST = "-oProxyCommand=touch /tmp/snapcoord-injected"


def problems(guest: dict[str, Any] | None = None, dump: dict[str, Any] | None = None) -> list[str]:
    vm: dict[str, Any] = {"hypervisor": "lab", "guest": {"host": "db1", **(guest or {})}}
    if dump is not None:
        vm["dump"] = dump
        vm["guest"]["dump"] = True
    raw = {"hypervisors": {"lab": {"type": "libvirt"}}, "vms": {"db1": vm}}
    try:
        parse_config(raw)
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize(
    "host",
    [
        INJECTED_HOST,
        "-p2222",
        ".hidden",
        "db1 -oProxyCommand=x",
        "db1\n",
        "db1\t",
        "root@db1",  # ssh would take the user from it: guest.user is the one place for that
        "ssh://db1:22",
        "db1;reboot",
        "fe80::1%eth0 x",
        "::g",
    ],
)
def test_a_host_that_is_not_a_host_name_is_a_problem(host: str) -> None:
    found = problems({"host": host})
    assert len(found) == 1, found
    assert found[0].startswith("vms.db1.guest.host: must be a host name, an IP address or a Host")


@pytest.mark.parametrize(
    "host",
    ["db1", "db1.example.org", "10.0.0.5", "2001:db8::1", "fe80::1%eth0", "::1", "my_alias-2"],
)
def test_host_names_addresses_and_aliases_are_accepted(host: str) -> None:
    assert problems({"host": host}) == []


@pytest.mark.parametrize("user", ["-oProxyCommand=x", "-lroot", ".x", "root\n", "a b", "x;id"])
def test_a_guest_user_that_is_not_a_user_name_is_a_problem(user: str) -> None:
    found = problems({"user": user})
    assert len(found) == 1, found
    assert found[0].startswith("vms.db1.guest.user: must be a user name")


@pytest.mark.parametrize("user", ["backup", "svc.backup", "backup@example.org", "_snap", "a-b"])
def test_user_names_are_accepted(user: str) -> None:
    assert problems({"user": user}) == []


@pytest.mark.parametrize(
    "name", ["-x", "--status-all", ".", "..", ".hidden", "cron\n", "cron ", "a/b", "@x", ""]
)
def test_a_service_name_that_could_be_an_option_or_a_path_is_a_problem(name: str) -> None:
    found = problems({"services": ["cron", name]})
    assert len(found) == 1, found
    if name:
        assert found[0].startswith(f"vms.db1.guest.services: service name {name!r}: use letters")
    found = problems({"database": name})
    assert len(found) == 1, found
    if name:
        assert found[0].startswith("vms.db1.guest.database: must be a service name: use letters")


@pytest.mark.parametrize("name", ["apache2", "mysql@main", "php8.2-fpm", "_x", "a..b"])
def test_service_names_are_accepted(name: str) -> None:
    assert problems({"services": [name], "database": name}) == []


@pytest.mark.parametrize(
    "url",
    [
        "-K/etc/shadow",
        "--config=/etc/shadow",
        "file:///etc/shadow",
        "ftp://db1/",
        "-ohttp://db1/",
        "http://db1/\n",
        "http://db1/ x",
        "http://db1/\x7f",
        "http://",
        "db1/",
    ],
)
def test_a_check_url_that_is_not_http_is_a_problem(url: str) -> None:
    found = problems({"check_url": url})
    assert len(found) == 1, found
    assert found[0].startswith("vms.db1.guest.check_url: must be an http:// or https:// URL")


@pytest.mark.parametrize(
    "url", ["http://localhost/", "https://127.0.0.1:8443/health?x=1", "http://[::1]:8080"]
)
def test_http_check_urls_are_accepted(url: str) -> None:
    assert problems({"check_url": url}) == []


@pytest.mark.parametrize("name", ["-x", "--all-databases", ".x", "@x", "shop\n", "a b", "a/b"])
def test_a_database_name_that_could_be_an_option_is_a_problem(name: str) -> None:
    found = problems(dump={"databases": ["shop", name]})
    assert found == [
        f"vms.db1.dump.databases: database name {name!r}: use letters, digits, '_', '$', '.', "
        "'@' or '-', starting with a letter, digit, '_' or '$' (at most 64)"
    ]


@pytest.mark.parametrize("name", ["-dé", "😀", "dé😀", "a\u200bb", "d\u0301", "ü" * 65])
def test_a_non_ascii_database_name_outside_letters_and_digits_is_a_problem(name: str) -> None:
    found = problems(dump={"databases": [name]})
    assert len(found) == 1 and found[0].startswith(
        f"vms.db1.dump.databases: database name {name!r}: use letters, digits"
    ), found


@pytest.mark.parametrize("name", ["dé", "ümlaut_db", "日本語", "Ελληνικά-1", "ü" * 64])
def test_database_names_in_any_script_are_accepted(name: str) -> None:
    assert problems(dump={"databases": ["shop", name]}) == []
    dump = dataclasses.replace(parse_table(DumpConfig, {}), databases=(name,))
    assert mysql.check_options(dump, vm="db1")[-2:] == ["--databases", name]
    with pytest.raises(PreflightError, match="not supported"):  # built in code, not parsed
        mysql.check_options(dataclasses.replace(dump, databases=(name + "😀",)), vm="db1")


@pytest.mark.parametrize("user", ["-x", "--user=root", "a\nb", "a\x00"[:1] + "\x07"])
def test_a_dump_user_that_could_be_an_option_is_a_problem(user: str) -> None:
    found = problems(dump={"user": user})
    assert len(found) == 1, found
    assert found[0].startswith("vms.db1.dump.user: must not")


def test_the_dump_preflight_name_checks_refuse_a_trailing_newline() -> None:
    """Finding 16: a "$" anchor accepts "name\n"; these checks run on tables built in code too."""
    dump = parse_table(DumpConfig, {})
    with pytest.raises(PreflightError, match="not supported"):
        mysql.check_options(dataclasses.replace(dump, databases=("shop\n",)), vm="db1")
    with pytest.raises(PreflightError, match="no OS user name"):
        postgresql.check_options(dataclasses.replace(dump, user="postgres\n"), vm="db1")


def test_every_bad_value_is_one_problem_at_its_key_path() -> None:
    found = problems(
        {"host": INJECTED_HOST, "user": "-lroot", "services": ["-x"], "check_url": "-K/x"},
        {"databases": ["-x"], "user": "-u"},
    )
    paths = [p.split(":", 1)[0] for p in found]
    assert paths == [
        "vms.db1.guest.host",
        "vms.db1.guest.user",
        "vms.db1.guest.services",
        "vms.db1.guest.check_url",
        "vms.db1.dump.databases",
        "vms.db1.dump.user",
    ]


# -- command lines ---------------------------------------------------------------------------


def guest_with_host(host: str, **extra: Any) -> GuestConfig:
    """A GuestConfig holding ``host`` as is: the schema would refuse a bad one, so it is put in
    after validation (as a caller building one in code could)."""
    return dataclasses.replace(parse_table(GuestConfig, {"host": "db1", **extra}), host=host)


def assert_host_after_end_of_options(argv: list[str], host: str) -> None:
    assert argv[0] in ("ssh", "ssh-keyscan"), argv
    position = argv.index(host)
    assert argv[position - 1] == "--", argv
    assert argv.index("--") == position - 1, argv  # the first "--": nothing before it is the host


def test_every_ssh_command_line_ends_the_options_before_the_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = INJECTED_HOST
    calls: list[list[str]] = []

    def execute(argv: list[str], **_: Any) -> Completed:
        calls.append(list(argv))
        out = b""
        if "-G" in argv:
            out = b"hostname db1.example.org\nport 22\n"
        return Completed(tuple(argv), 0, out, b"", 0.0)

    class Shell:
        def __init__(self, argv: list[str], *, sudo: bool) -> None:
            calls.append(list(argv))

        def send_handshake(self) -> None:
            pass

        def await_handshake(self, timeout: float) -> bool:
            return False

        def close(self, *, kill: bool = False) -> None:
            pass

    monkeypatch.setattr(guest_module, "execute", execute)
    monkeypatch.setattr(guest_module, "WarmShell", Shell)
    transport = SshTransport(guest_with_host(host), vm="db1")
    transport.open()  # the connect
    transport.warm(1, sudo=False)
    line = transport.command_line(["echo", "-n", "x"], sudo=True)
    transport.close()  # ssh -O exit
    assert [c[0] for c in calls] == ["ssh", "ssh", "ssh"]
    for argv in [*calls, line]:
        assert_host_after_end_of_options(argv, host)
    assert line[-1] == "sudo -n -- echo -n x"  # the remote command follows the host

    calls.clear()
    pinned = guest_with_host(host, host_key_fingerprint="SHA256:x")
    transport = SshTransport(pinned, vm="db1")
    transport._dir = str(tmp_path)
    with pytest.raises(Exception, match="no host key"):
        transport._known_hosts_from_pin()
    ssh_g, keyscan = calls
    assert "-G" in ssh_g
    assert_host_after_end_of_options(ssh_g, host)
    assert_host_after_end_of_options(keyscan, "db1.example.org")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_ssh_itself_never_reads_the_host_as_an_option() -> None:
    """``ssh -G`` prints the configuration a command line would use, without connecting: the
    injected ProxyCommand must not be in it."""
    line = SshTransport(guest_with_host(INJECTED_HOST), vm="db1").command_line(["true"])
    result = subprocess.run(
        [line[0], "-G", *line[1:]], capture_output=True, text=True, timeout=30, check=False
    )
    config = result.stdout.lower().splitlines()
    assert not [c for c in config if c.startswith("proxycommand ")], result.stdout
    # OpenSSH refuses such a host name outright, or (older versions) takes it as the name
    assert result.returncode != 0 or f"hostname {INJECTED_HOST.lower()}" in config


@pytest.mark.parametrize("tool", ["curl", "wget"])
def test_check_url_reaches_curl_and_wget_after_the_end_of_options(
    tmp_path: Path, tool: str
) -> None:
    """Runs the guest script's check_url part here with a fake curl/wget that records its
    arguments: the URL comes after ``--``."""
    record = tmp_path / "args"
    fake = tmp_path / "bin" / tool
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nfor a; do printf "%s\\n" "$a"; done > {record}\n')
    fake.chmod(0o755)
    url = "-K/etc/shadow"
    env = {"PATH": str(fake.parent), "LC_ALL": "C"}
    subprocess.run(
        ["/bin/sh", "-c", services._CHECK_URL, "sh", "nginx", "5", url],
        env=env,
        check=True,
        timeout=30,
    )
    args = record.read_text().splitlines()
    assert args[-2:] == ["--", url], args
    assert os.path.exists(record)


# -- finding 16: name checks that accepted a trailing newline -------------------------------


def test_a_trailing_newline_is_no_snapcoord_snapshot_name_nor_store_folder(tmp_path: Path) -> None:
    name = "snapcoord-nightly-20240101T000000Z"
    assert naming.parse_name(name) is not None
    assert naming.parse_name(name + "\n") is None  # prune must never take it for one of ours
    assert store.vm_dir(tmp_path, "db1") == tmp_path / "db1"
    with pytest.raises(store.StoreError):
        store.vm_dir(tmp_path, "db1\n")

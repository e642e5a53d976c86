"""The guest-side freeze hook: the generated script (syntax under dash, its version), the records
the coordinator reads back (status lines, the log, the armed file), the verdict at backup-end,
the Proxmox ``agent`` option, and the VMware Tools calling convention run for real on the
loopback guest (real sshd, MariaDB, Apache and cron under their init scripts: no systemd, so the
script's setsid fallbacks run).

The QEMU guest agent's convention, through libvirt on the real Debian 12 guest, is
tests/test_realvm_fsfreeze.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from snapcoord.adapters.proxmox import _backup_freezes
from snapcoord.freeze_hook import Armed, HookStatus, LogEvent, judge, parse_log, parse_status, since
from snapcoord.hooks.databases import mysql
from snapcoord.hooks.guest import fsfreeze
from tests import lab
from tests.cli_helpers import snapcoord, write_config
from tests.guest_fixtures import (
    lab_services,  # noqa: F401 - fixture
    wait_for,
)

SPEC = fsfreeze.HookSpec(
    vm="db1",
    consistency="stop",
    services=("apache2", "cron"),
    database="mariadb",
    database_shell=mysql.SHELL,
    pidfile="/run/mysqld/mysqld.pid",
    deadline=300,
    step_seconds=60,
)


# -- the script ---------------------------------------------------------------------------------


@pytest.mark.parametrize("consistency", ["stop", "pause"])
def test_the_script_parses_under_dash_and_carries_its_version(
    tmp_path: Path, consistency: str
) -> None:
    spec = SPEC.__class__(
        **{**SPEC.__dict__, "consistency": consistency, "hold_sql": mysql.PAUSE_METHODS["ftwrl"]}
    )
    script = fsfreeze.render(spec)
    path = tmp_path / "hook"
    path.write_text(script)
    checked = subprocess.run(["dash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    version = fsfreeze.version_of(script)
    assert version is not None and len(version) == 16
    assert fsfreeze.render(spec) == script, "the same configuration makes the same script"
    other = fsfreeze.render(SPEC.__class__(**{**spec.__dict__, "deadline": 301}))
    assert fsfreeze.version_of(other) != version
    usage = subprocess.run(["dash", str(path), "--bogus"], capture_output=True, text=True)
    assert usage.returncode == 64 and "usage:" in usage.stderr


def test_a_value_from_the_configuration_cannot_become_code(tmp_path: Path) -> None:
    spec = SPEC.__class__(**{**SPEC.__dict__, "vm": "db1'; touch /tmp/pwned; '"})
    path = tmp_path / "hook"
    path.write_text(fsfreeze.render(spec))
    out = subprocess.run(["dash", str(path), "version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == fsfreeze.version_of(path.read_text())


def test_arm_takes_only_a_token(tmp_path: Path) -> None:
    path = tmp_path / "hook"
    path.write_text(fsfreeze.render(SPEC))
    for bad in ("", "a b", "-x", "$(id)", "a;b"):
        out = subprocess.run(["dash", str(path), "arm", bad], capture_output=True)
        assert out.returncode == 64, bad


def test_the_freeze_limit_fits_in_the_deadline() -> None:
    assert SPEC.freeze_limit == 60 * 3 + 5
    short = SPEC.__class__(**{**SPEC.__dict__, "deadline": 20})
    assert short.freeze_limit == 20


# -- records read back --------------------------------------------------------------------------


def test_status_lines_parse_into_a_record_and_say_what_is_wrong() -> None:
    good = parse_status(
        "installed 1\nversion 0123456789abcdef\nenabled 1\nagent 1\nquiesced 0\n",
        "0123456789abcdef",
    )
    assert good.current and good.problem() is None and not good.quiesced
    assert parse_status("installed 0\nenabled 1\nagent 1\n", "x").problem() == (
        "the freeze hook is not installed"
    )
    old = parse_status("installed 1\nversion 1111111111111111\nenabled 1\nagent 1\n", "2" * 16)
    assert "out of date (installed 1111111111111111" in (old.problem() or "")
    off = parse_status("installed 1\nversion 2222222222222222\nenabled 0\nagent 1\n", "2" * 16)
    assert "qemu-ga.conf" in (off.problem() or "")
    down = parse_status("installed 1\nversion 2222222222222222\nenabled 1\nagent 0\n", "2" * 16)
    assert "does not run" in (down.problem() or "")
    garbage = parse_status("installed 1\nversion $(rm -rf /)\n\x00\nnonsense\n", "2" * 16)
    assert garbage == HookStatus(True, None, "2" * 16, False, False, False)


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"vm": "db", "vmid": 100, "token": "short", "armed_at": 1},
        {"vm": "db", "vmid": "100", "token": "vzdump-100-0123456789ab", "armed_at": 1},
        {"vm": "db", "vmid": True, "token": "vzdump-100-0123456789ab", "armed_at": 1},
        {"vm": "db", "vmid": 100, "token": "vzdump-100-0123456789ab", "armed_at": "now"},
        {"vm": 1, "vmid": 100, "token": "vzdump-100-0123456789ab", "armed_at": 1},
    ],
)
def test_a_corrupt_armed_record_is_refused(data: Any) -> None:
    with pytest.raises(ValueError):
        Armed.parse(data)


def test_an_armed_record_round_trips() -> None:
    record = Armed("db", 100, "vzdump-100-0123456789ab", 1.5)
    assert Armed.parse(json.loads(json.dumps(record.as_dict()))) == record


def test_the_log_parses_and_only_events_after_this_backups_mark_count() -> None:
    text = (
        "1.0 arm vzdump-100-aaaaaaaaaaaa\n2.0 freeze-begin vm=db\n"
        "garbage line\n3.5 arm vzdump-100-bbbbbbbbbbbb\n4.0 freeze-begin vm=db\n"
        "5.0 stopped apache2\n"
    )
    events = parse_log(text)
    assert len(events) == 5
    assert since(events, "vzdump-100-bbbbbbbbbbbb") == [
        LogEvent(4.0, "freeze-begin", "vm=db"),
        LogEvent(5.0, "stopped", "apache2"),
    ]
    assert since(events, "vzdump-100-cccccccccccc") is None


def _events(*lines: str) -> list[LogEvent]:
    return parse_log("".join(f"{n}.0 {line}\n" for n, line in enumerate(lines, 1)))


GOOD = (
    "freeze-begin vm=db",
    "stopped mariadb",
    "freeze-ok after 1 s",
    "thaw-begin thaw",
    "started mariadb",
    "thaw-ok thaw",
)


@pytest.mark.parametrize(
    ("lines", "consistency", "consistent", "says"),
    [
        (GOOD, "stop", True, "quiesced across"),
        ((), "stop", False, "freeze never came"),
        (
            (
                "freeze-begin vm=db",
                "stop-failed mariadb still answers",
                "freeze-failed could not quiesce (exit 1)",
                "restored",
            ),
            "stop",
            False,
            "the freeze hook failed (could not quiesce (exit 1))",
        ),
        (
            (
                "freeze-begin vm=db",
                "stopped mariadb",
                "freeze-ok after 1 s",
                "deadline no thaw within 10 s: restoring",
                "restored",
                "thaw-nothing thaw",
            ),
            "stop",
            False,
            "deadline",
        ),
        (
            (
                "freeze-begin vm=db",
                "stopped mariadb",
                "freeze-ok after 1 s",
                "thaw-begin thaw",
                "came-back  mariadb",
                "started mariadb",
                "thaw-ok thaw",
            ),
            "stop",
            False,
            "mariadb ran again behind the freeze",
        ),
        (
            ("freeze-begin vm=db", "stopped mariadb", "freeze-ok after 1 s"),
            "stop",
            False,
            "thaw has not come",
        ),
        (
            (
                "freeze-begin vm=db",
                "stopped mariadb",
                "freeze-ok after 1 s",
                "thaw-begin thaw",
                "start-failed mariadb",
                "thaw-failed not everything runs again",
            ),
            "stop",
            False,
            "did not bring everything back",
        ),
        (
            (
                "freeze-begin vm=db",
                "held commits",
                "freeze-ok after 1 s",
                "thaw-begin thaw",
                "released held=yes",
                "thaw-ok thaw",
            ),
            "pause",
            True,
            "quiesced across",
        ),
        (
            (
                "freeze-begin vm=db",
                "held commits",
                "freeze-ok after 1 s",
                "thaw-begin thaw",
                "released held=no",
                "thaw-failed not everything runs again",
            ),
            "pause",
            False,
            "commit lock ended before the thaw",
        ),
    ],
)
def test_the_verdict_at_backup_end(
    lines: tuple[str, ...], consistency: str, consistent: bool, says: str
) -> None:
    verdict = judge(_events(*lines), consistency)
    assert verdict.consistent is consistent and says in verdict.reason, verdict.reason
    if consistent:
        assert verdict.quiesced_seconds == 1.0  # freeze-ok (3.0) to thaw-begin (4.0)


def test_no_mark_in_the_log_is_not_consistent() -> None:
    assert not judge(None, "stop").consistent


@pytest.mark.parametrize(
    ("agent", "freezes"),
    [
        (None, False),
        ("0", False),
        ("1", True),
        ("enabled=1", True),
        ("1,freeze-fs-on-backup=0", False),
        ("enabled=1,fstrim_cloned_disks=1,freeze-fs-on-backup=1", True),
        ("enabled=1,freeze-fs=0", False),
        ("enabled=1,guest-fsfreeze=0", False),
        ("enabled=0,freeze-fs-on-backup=1", False),
    ],
)
def test_the_proxmox_agent_option_decides_whether_vzdump_freezes(
    agent: str | None, freezes: bool
) -> None:
    """qemu-server src/PVE/QemuServer/Agent.pm (e6352be): freeze-fs (default 1), with
    freeze-fs-on-backup (PVE 8) and guest-fsfreeze as its aliases."""
    assert _backup_freezes(agent) is freezes


# -- the VMware Tools convention, for real on the loopback guest --------------------------------

VMWARE_HOOK = Path(fsfreeze.VMWARE_DIR) / fsfreeze.SCRIPT_NAME


@pytest.fixture
def vmware_config(tmp_path: Path, ssh_guest: lab.SshGuest) -> Any:
    def make(**guest: Any) -> Path:
        return write_config(
            tmp_path / "vmware.toml",
            {
                "defaults": {"store": str(tmp_path / "store")},
                "hypervisors.vc": {
                    "type": "vsphere",
                    "host": "127.0.0.1",
                    "user": "u",
                    "password": {"env": "SNAPCOORD_TEST_UNUSED"},
                },
                "vms.db": {"hypervisor": "vc", "name": "db"},
                "vms.db.guest": ssh_guest.guest_table(**guest),
            },
        )

    yield make
    VMWARE_HOOK.unlink(missing_ok=True)
    for folder in (Path(fsfreeze.VMWARE_DIR), Path(fsfreeze.VMWARE_DIR).parent):
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
    subprocess.run(["sh", "-c", f"rm -rf {fsfreeze.RUN_DIR}"], check=False)


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return snapcoord("-c", str(config), *args, env={"SNAPCOORD_TEST_UNUSED": "x"}, timeout=120)


def _hook(arg: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VMWARE_HOOK), arg], capture_output=True, text=True, timeout=300)


def _log() -> list[str]:
    return [e.event for e in parse_log(Path(fsfreeze.LOG).read_text())]


def test_vmware_tools_convention_freeze_thaw_and_freeze_fail(
    vmware_config: Any, lab_services: lab.GuestServices
) -> None:
    config = vmware_config()
    installed = _cli(config, "freeze-hook", "install", "db")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert VMWARE_HOOK.stat().st_mode & 0o777 == 0o700
    status = _cli(config, "freeze-hook", "status", "db")
    assert status.returncode == 0 and "current and enabled" in status.stdout, status.stdout
    mysqld = min(lab.mysqld_pids())

    assert _hook("freeze").returncode == 0
    assert not any(lab_services.states().values()), lab_services.states()
    assert _hook("thaw").returncode == 0
    assert lab_services.all_running(), lab_services.states()
    assert min(lab.mysqld_pids()) != mysqld, "stop mode restarted MariaDB"
    # the freeze failed after the scripts ran: VMware Tools calls freezeFail instead of thaw
    assert _hook("freeze").returncode == 0
    assert _hook("freezeFail").returncode == 0
    assert lab_services.all_running()
    assert _hook("thaw").returncode == 0, "a thaw with nothing frozen is fine"
    assert _log()[-1] == "thaw-nothing"
    removed = _cli(config, "freeze-hook", "uninstall", "db")
    assert removed.returncode == 0 and not VMWARE_HOOK.exists()


def test_the_hooks_watchdog_restores_when_no_thaw_comes(
    vmware_config: Any, lab_services: lab.GuestServices
) -> None:
    config = vmware_config(freeze_hook_max_seconds=10)
    installed = _cli(config, "freeze-hook", "install", "db")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert _hook("freeze").returncode == 0
    assert not any(lab_services.states().values())
    wait_for(lab_services.all_running, 60, "the hook's watchdog to restore everything")
    assert "deadline" in _log()
    assert _hook("thaw").returncode == 0 and _log()[-1] == "thaw-nothing"


def test_a_freeze_that_cannot_finish_restores_and_fails(
    vmware_config: Any, lab_services: lab.GuestServices
) -> None:
    """MariaDB cannot be verified down (its stop is refused): the hook gives up, starts what it
    stopped and exits 1, so VMware Tools aborts the quiesce. The hook's step (the longer of the
    stop and start timeouts) is 5 s here: what it does after a step runs out does not depend on
    its length (with the default 60 s start timeout this test took two minutes)."""
    config = vmware_config(stop_timeout=5, start_timeout=5)
    installed = _cli(config, "freeze-hook", "install", "db")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # a stand-in `service` that refuses to stop mariadb, first on the hook's PATH
    script = VMWARE_HOOK.read_text()
    VMWARE_HOOK.write_text(
        script.replace("export PATH\n", "PATH=/tmp/snapcoord-fake:$PATH\nexport PATH\n", 1)
    )
    fake = Path("/tmp/snapcoord-fake")
    fake.mkdir(exist_ok=True)
    (fake / "service").write_text(
        '#!/bin/sh\n[ "$1" = mariadb ] && [ "$2" = stop ] && exit 1\nexec /usr/sbin/service "$@"\n'
    )
    (fake / "service").chmod(0o755)
    try:
        failed = _hook("freeze")
    finally:
        (fake / "service").unlink()
        fake.rmdir()
    assert failed.returncode == 1
    events = _log()
    assert "stop-failed" in events and "freeze-failed" in events and "restored" in events
    assert lab_services.all_running(), lab_services.states()
    assert not Path(fsfreeze.RUN_DIR, "state").exists()

"""The guest-side freeze hook on the real Debian 12 guest (systemd, stock socket-activated
MariaDB, Apache, cron, qemu-guest-agent on its virtio channel), driven as Proxmox's vzdump drives
a QEMU VM in snapshot mode.

vzdump's order (pve-manager ``PVE/VZDump.pm`` 14a22df; qemu-server
``src/PVE/VZDump/QemuServer.pm`` e6352be): ``backup-start``, ``pre-stop``, ``pre-restart``,
``post-restart``, then the archive step — the agent's ``guest-fsfreeze-freeze``, the QMP
``backup`` (the point in time), ``guest-fsfreeze-thaw`` — then ``backup-end``. Here every hook
phase is a separate ``snapcoord vzdump-hook`` process with vzdump's arguments and ``VMTYPE``, and
the freeze and thaw go through libvirt (``virDomainFSFreeze``/``FSThaw``: the same agent
commands) where the archive step would issue them; the backup's point in time is an internal
libvirt snapshot taken while frozen.

What proves it: a writer in the guest commits a row every 0.1 s and logs each commit's end time
to /run (tmpfs, never frozen); the hook's own log says when it stopped (or held) and restored.
No commit ends between the hook's quiesce and its thaw. The tests build on each other's state
and leave the guest running with everything up and the hook uninstalled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.cli_helpers import snapcoord, write_config
from tests.guest_fixtures import wait_for
from tests.realvm_guest import RealGuest, real_guest  # noqa: F401 - fixture

pytestmark = [pytest.mark.real, pytest.mark.realvm]

VMID = 100
UNITS = ("mariadb.service", "mariadb.socket", "apache2", "cron")
STATE: dict[str, Any] = {}

_WRITER = r"""
mysql -e "CREATE DATABASE IF NOT EXISTS fsw;
  CREATE TABLE IF NOT EXISTS fsw.t (id INT AUTO_INCREMENT PRIMARY KEY, at DOUBLE) ENGINE=InnoDB"
rm -f /run/fsw.stop /run/fsw.log
nohup setsid sh -c 'while [ ! -e /run/fsw.stop ]; do
  t=$(date +%s.%N)
  if timeout 3 mysql --connect-timeout=2 -e "INSERT INTO fsw.t (at) VALUES ($t)" 2>/dev/null
  then echo "ok $t $(date +%s.%N)"; else echo "err $t"; fi
  sleep 0.1
done' > /run/fsw.log 2>&1 < /dev/null &
"""


def _config(guest: RealGuest, tmp: Path, name: str, **table: Any) -> Path:
    return write_config(
        tmp / f"{name}.toml",
        {
            "defaults": {"store": str(tmp / "store"), "label": "fsfreeze"},
            "hypervisors.qemu": {"type": "libvirt", "uri": guest.uri},
            "vms.guest": {"hypervisor": "qemu", "name": guest.domain, "vzdump_vmid": VMID},
            "vms.guest.guest": guest.guest_table(**table),
        },
    )


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsfreeze")


def hook(config: Path, phase: str, mode: str = "snapshot") -> tuple[int, str]:
    """One vzdump hook call, as vzdump makes it: no options, config from the environment."""
    env = {"SNAPCOORD_CONFIG": str(config), "VMTYPE": "qemu", "HOSTNAME": "pve1"}
    argv = ["vzdump-hook", phase] + (
        [mode, str(VMID)] if phase.startswith(("backup", "pre", "post")) else []
    )
    proc = snapcoord(*argv, env=env, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


def cli(config: Path, *args: str) -> tuple[int, str]:
    proc = snapcoord("-c", str(config), *args, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


def domain(guest: RealGuest) -> tuple[libvirt.virConnect, libvirt.virDomain]:
    conn = libvirt.open(guest.uri)
    return conn, conn.lookupByName(guest.domain)


def agent_freeze(guest: RealGuest) -> None:
    conn, dom = domain(guest)
    try:
        dom.fsFreeze(None, 0)
    finally:
        conn.close()


def agent_thaw(guest: RealGuest) -> None:
    conn, dom = domain(guest)
    try:
        dom.fsThaw(None, 0)
    finally:
        conn.close()


def frozen(guest: RealGuest) -> str:
    return str(guest.agent_command({"execute": "guest-fsfreeze-status"})["return"])


def units(guest: RealGuest) -> dict[str, str]:
    proc = guest.ssh("systemctl is-active " + " ".join(UNITS))
    return dict(zip(UNITS, proc.stdout.split(), strict=True))


def all_up(guest: RealGuest) -> bool:
    return set(units(guest).values()) == {"active"}


def hook_log(guest: RealGuest) -> list[tuple[float, str, str]]:
    proc = guest.ssh("cat /run/snapcoord-fsfreeze/log", check=True)
    events = []
    for line in proc.stdout.splitlines():
        at, event, *detail = line.split(" ", 2)
        events.append((float(at), event, detail[0] if detail else ""))
    return events


def last(events: list[tuple[float, str, str]], event: str, detail: str | None = None) -> float:
    return max(at for at, name, d in events if name == event and (detail is None or d == detail))


def start_writer(guest: RealGuest) -> None:
    """Start the writer and return once it has committed a few rows (its log says so)."""
    guest.ssh(_WRITER, check=True)
    wait_for(
        lambda: guest.ssh("test $(grep -c '^ok ' /run/fsw.log) -ge 5").returncode == 0,
        60,
        "the writer's first commits",
        interval=0.3,
    )


def stop_writer(guest: RealGuest) -> list[tuple[str, float, float | None]]:
    guest.ssh("touch /run/fsw.stop; sleep 1", check=True)
    rows: list[tuple[str, float, float | None]] = []
    for line in guest.ssh("cat /run/fsw.log", check=True).stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "ok" and len(parts) == 3:
            rows.append(("ok", float(parts[1]), float(parts[2])))
        elif parts and parts[0] == "err" and len(parts) == 2:
            rows.append(("err", float(parts[1]), None))
    return rows


def mariadb_pid(guest: RealGuest) -> str:
    return guest.ssh("systemctl show -p MainPID --value mariadb.service").stdout.strip()


def vzdump_snapshot_mode(
    guest: RealGuest, config: Path, *, freeze: bool, snapshot: str = ""
) -> int:
    """vzdump's QEMU snapshot-mode sequence; returns backup-end's exit code."""
    for phase in ("backup-start", "pre-stop", "pre-restart", "post-restart"):
        code, out = hook(config, phase)
        assert code == 0, (phase, out)
    if freeze:  # archive(): qga_fs_freeze, the QMP backup, qga_fs_thaw
        agent_freeze(guest)
        assert frozen(guest) == "frozen"
        STATE["while_frozen"] = units(guest)
        if snapshot:
            conn, dom = domain(guest)
            try:
                dom.snapshotCreateXML(
                    f"<domainsnapshot><name>{snapshot}</name></domainsnapshot>", 0
                )
            finally:
                conn.close()
        agent_thaw(guest)
        assert frozen(guest) == "thawed"
    code, out = hook(config, "backup-end")
    STATE["backup_end"] = out
    return code


# -- the tests --------------------------------------------------------------------------------


def test_1_install_status_and_an_outdated_hook(real_guest: RealGuest, tmp: Path) -> None:
    config = _config(real_guest, tmp, "stop", freeze_hook_max_seconds=120, dump=True)
    code, out = hook(config, "pre-stop")
    assert code == 4 and "the freeze hook is not installed" in out, out
    assert "snapcoord freeze-hook install guest" in out
    assert all_up(real_guest)

    code, out = cli(config, "freeze-hook", "install", "guest")
    assert code == 0, out
    conf = real_guest.ssh("cat /etc/qemu/qemu-ga.conf", check=True).stdout
    assert "fsfreeze-hook=/etc/qemu/fsfreeze-hook" in conf
    mode = real_guest.ssh("stat -c '%a %U' /etc/qemu/fsfreeze-hook.d/snapcoord").stdout.split()
    assert mode == ["700", "root"]
    assert real_guest.ssh("systemctl is-active qemu-guest-agent").stdout.strip() == "active"
    code, out = cli(config, "freeze-hook", "status", "guest")
    assert code == 0 and "installed, current and enabled" in out, out

    # another configuration makes another script: status and pre-stop say it is out of date
    other = _config(real_guest, tmp, "other", freeze_hook_max_seconds=121)
    code, out = cli(other, "freeze-hook", "status", "guest")
    assert code == 4 and "out of date" in out, out
    STATE["stop"] = config


def test_2_stop_mode_mariadb_is_down_across_the_agent_freeze(real_guest: RealGuest) -> None:
    config = STATE["stop"]
    start_writer(real_guest)
    code = vzdump_snapshot_mode(real_guest, config, freeze=True, snapshot="fsfreeze-backup")
    rows = stop_writer(real_guest)
    assert code == 0, STATE["backup_end"]
    assert "application-consistent" in STATE["backup_end"]
    # dump = true: pre-stop stored a verified dump off the guest, while everything ran
    [folder] = (config.parent / "store" / "guest").glob("snapcoord-vzdump-*")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["snapshot_by"] == "vzdump"
    # while frozen: everything down, the socket too
    assert set(STATE["while_frozen"].values()) == {"inactive"}, STATE["while_frozen"]
    events = hook_log(real_guest)
    stopped, thawed = last(events, "stopped", "mariadb"), last(events, "thaw-begin")
    committed = [end for kind, _, end in rows if kind == "ok" and end is not None]
    assert any(end < stopped for end in committed), "the writer committed before the freeze"
    assert any(end > thawed for end in committed), "the writer committed after the thaw"
    inside = [end for end in committed if stopped < end < thawed]
    assert not inside, f"commits while the hook held MariaDB stopped: {inside}"
    assert all_up(real_guest)
    assert real_guest.ssh("systemctl list-units --no-legend 'snapcoord-fsfreeze-*'").stdout == ""


def test_2b_backup_abort_restores_what_the_hook_holds(real_guest: RealGuest) -> None:
    """The hook quiesced the guest but its thaw never ran (the agent was restarted inside the
    window, say): vzdump's error path calls backup-abort, which puts everything back."""
    config = STATE["stop"]
    assert hook(config, "backup-start")[0] == 0
    assert hook(config, "pre-stop")[0] == 0
    real_guest.ssh("/etc/qemu/fsfreeze-hook.d/snapcoord freeze", check=True)
    assert set(units(real_guest).values()) == {"inactive"}
    code, out = hook(config, "backup-abort")
    assert code == 0, out
    assert all_up(real_guest)
    assert not (config.parent / "store" / "vzdump" / "guest.json").exists()
    assert [name for _, name, _ in hook_log(real_guest)][-1] == "thaw-ok"


def test_3_pause_mode_commits_are_held_across_the_freeze(real_guest: RealGuest, tmp: Path) -> None:
    config = _config(real_guest, tmp, "pause", consistency="pause", freeze_hook_max_seconds=120)
    code, out = cli(config, "freeze-hook", "install", "guest")
    assert code == 0, out
    pid = mariadb_pid(real_guest)
    start_writer(real_guest)
    code = vzdump_snapshot_mode(real_guest, config, freeze=True)
    rows = stop_writer(real_guest)
    assert code == 0, STATE["backup_end"]
    assert set(STATE["while_frozen"].values()) == {"active"}, "pause stops nothing"
    events = hook_log(real_guest)
    held, released = last(events, "held"), last(events, "released", "held=yes")
    committed = [end for kind, _, end in rows if kind == "ok" and end is not None]
    inside = [end for end in committed if held < end < released]
    assert not inside, f"commits while the hook held the lock: {inside}"
    assert any(end > released for end in committed)
    assert mariadb_pid(real_guest) == pid, "pause never restarts MariaDB"
    STATE["pause"] = config


def test_4_no_agent_freeze_fails_backup_end(real_guest: RealGuest) -> None:
    config = STATE["pause"]
    code = vzdump_snapshot_mode(real_guest, config, freeze=False)
    assert code == 5, STATE["backup_end"]
    assert "not application-consistent" in STATE["backup_end"]
    assert "freeze never came" in STATE["backup_end"]
    assert all_up(real_guest)


def test_5_a_failing_hook_fails_backup_end_and_restores(real_guest: RealGuest) -> None:
    """Another session holds BACKUP STAGE: the hook cannot take its lock, says so, and gives up;
    the agent's freeze goes on without it (the stock dispatcher ignores its scripts' status)."""
    config = STATE["pause"]
    real_guest.ssh(
        "nohup setsid mysql -e 'BACKUP STAGE START; SELECT SLEEP(60)' >/dev/null 2>&1 </dev/null &",
        check=True,
    )
    wait_for(
        lambda: real_guest.ssh("pgrep -f 'SELECT SLEEP\\(60\\)' >/dev/null").returncode == 0,
        30,
        "the other session to hold BACKUP STAGE",
    )
    try:
        code = vzdump_snapshot_mode(real_guest, config, freeze=True)
    finally:
        real_guest.ssh("pkill -f 'SELECT SLEEP\\(60\\)' || true")
    assert code == 5, STATE["backup_end"]
    assert "the freeze hook failed" in STATE["backup_end"], STATE["backup_end"]
    names = [name for _, name, _ in hook_log(real_guest)]
    assert "hold-failed" in names and "freeze-failed" in names
    assert all_up(real_guest)


def test_6_a_thaw_that_never_comes_ends_at_the_deadline(real_guest: RealGuest, tmp: Path) -> None:
    config = _config(real_guest, tmp, "deadline", freeze_hook_max_seconds=10)
    code, out = cli(config, "freeze-hook", "install", "guest")
    assert code == 0, out
    for phase in ("backup-start", "pre-stop", "pre-restart", "post-restart"):
        assert hook(config, phase)[0] == 0
    agent_freeze(real_guest)
    # The behaviour under test: the deadline passes while frozen. Nothing can be asked in the
    # guest meanwhile (the agent refuses guest-exec while frozen; an SSH login writes to /var).
    time.sleep(16)
    agent_thaw(real_guest)
    wait_for(lambda: all_up(real_guest), 120, "the hook's watchdog to restore", interval=2)
    code, out = hook(config, "backup-end")
    assert code == 5 and "deadline" in out, out
    names = [name for _, name, _ in hook_log(real_guest)]
    assert "deadline" in names and "restored" in names
    assert all_up(real_guest)


def test_7_revert_to_a_snapshot_taken_while_frozen(real_guest: RealGuest) -> None:
    """test_2's backup point: the guest comes back frozen with everything stopped; the revert
    thaws it through the agent, the hook's thaw restarts what it stopped."""
    config = STATE["stop"]
    code, out = cli(config, "freeze-hook", "install", "guest")
    assert code == 0, out
    code, out = cli(
        config, "revert", "guest", "--to", "fsfreeze-backup", "--yes", "--no-safety-snapshot"
    )
    real_guest.ssh("touch /run/fsw.stop")  # test_2's writer ran when the snapshot was taken
    assert code == 0, out
    assert "file systems were frozen: thawed" in out, out
    assert frozen(real_guest) == "thawed"
    assert all_up(real_guest)
    assert real_guest.ssh("test -e /run/snapcoord-fsfreeze/state").returncode == 1


def test_8_uninstall(real_guest: RealGuest) -> None:
    config = STATE["stop"]
    code, out = cli(config, "freeze-hook", "uninstall", "guest")
    assert code == 0, out
    assert real_guest.ssh("test -e /etc/qemu/fsfreeze-hook.d/snapcoord").returncode == 1
    assert real_guest.ssh("test -e /etc/qemu/qemu-ga.conf").returncode == 1
    code, out = cli(config, "freeze-hook", "status", "guest")
    assert code == 4 and "not installed" in out, out
    conn, dom = domain(real_guest)
    try:
        dom.snapshotLookupByName("fsfreeze-backup").delete(0)
    finally:
        conn.close()
    real_guest.ssh("mysql -e 'DROP DATABASE IF EXISTS fsw'", check=True)
    assert all_up(real_guest)

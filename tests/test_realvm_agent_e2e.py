"""``transport = "agent"`` on the real Debian 12 guest under libvirt: every guest command of a
snapshot with a dump, a revert, a restore-dump, a pause-mode snapshot and a freeze/thaw goes
through qemu-guest-agent (libvirt's ``qemuAgentCommand``, adapters/libvirt_agent.py), and sshd
accepts no login from the coordinator while they run (``RealGuest.ssh_logins()``, the guest's
journal read through the agent). The configuration has no SSH host, key or known_hosts at all.

This module itself never logs in over SSH: it looks into the guest through the agent
(``RealGuest.agent_run``), so any login in the journal would be snapcoord's. The tests run in
order on one guest and build on each other's state (the snapshot of the first is the one the
revert and the restore-dump go back to).

The last test kills snapcoord inside the window and restarts qemu-guest-agent: the watchdog,
started in a systemd scope of its own, is not in the agent's cgroup, survives, and brings every
service back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.cli_helpers import REPO, json_lines, snapcoord, write_config
from tests.guest_fixtures import wait_for
from tests.realvm_guest import RealGuest, real_guest, stored_dump  # noqa: F401 - fixture

pytestmark = [pytest.mark.real, pytest.mark.realvm]

UNITS = ("mariadb.service", "mariadb.socket", "apache2.service", "cron.service")
DB = "agent_e2e"
ROWS = 2000
STATE: dict[str, Any] = {}  # what the ordered tests hand on


# -- the guest, through the agent only -----------------------------------------------------------


def agent_sh(guest: RealGuest, script: str, timeout: float = 120) -> str:
    code, out, err = guest.agent_run(["/bin/sh", "-c", script], timeout=timeout)
    assert code == 0, (script, code, err)
    return out


def sql(guest: RealGuest, statements: str) -> list[list[str]]:
    code, out, err = guest.agent_run(
        ["mysql", "--batch", "--skip-column-names", "-e", statements], timeout=120
    )
    assert code == 0, (statements, err)
    return [line.split("\t") for line in out.splitlines() if line]


def unit_states(guest: RealGuest) -> dict[str, str]:
    _code, out, _err = guest.agent_run(["systemctl", "is-active", *UNITS])
    return dict(zip(UNITS, out.split(), strict=True))


def all_active(guest: RealGuest) -> bool:
    return set(unit_states(guest).values()) == {"active"}


def mariadbd(guest: RealGuest) -> list[str]:
    return agent_sh(guest, "pgrep -x mariadbd || true").split()


def leftovers(guest: RealGuest) -> list[str]:
    """snapcoord's processes and files left in the guest: watchdogs, lock sessions, holders,
    transfers in flight, channels."""
    out = agent_sh(
        guest,
        "pgrep -af 'snapcoord-(watchdog|pause|holder)' | grep -v pgrep; "
        "find /var/lib/snapcoord/transfer /run/snapcoord/channel -mindepth 1 2>/dev/null; true",
    )
    return [line for line in out.splitlines() if line.strip()]


def checksum(guest: RealGuest) -> list[list[str]]:
    return sql(guest, f"CHECKSUM TABLE {DB}.items EXTENDED")


def snapshot_names(guest: RealGuest) -> list[str]:
    conn = libvirt.open(guest.uri)
    try:
        return list(conn.lookupByName(guest.domain).snapshotListNames())
    finally:
        conn.close()


def logins(guest: RealGuest) -> int:
    return guest.ssh_logins()


# -- snapcoord ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def agent_answers(real_guest: RealGuest) -> None:
    """Every test starts with an agent libvirt can talk to (RealGuest.ensure_agent)."""
    real_guest.ensure_agent()


@pytest.fixture(scope="module")
def config(real_guest: RealGuest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("realvm-agent")
    return write_config(tmp / "snapcoord.toml", tables(real_guest, tmp))


def tables(guest: RealGuest, tmp: Path, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "transport": "agent",
        "services": ["apache2", "cron"],
        "database": "auto",
        "watchdog_seconds": 90,
        "stop_timeout": 25.0,
        "dump": True,
        **overrides,
    }
    assert not {"host", "port", "user", "identity_file", "known_hosts"} & set(table)
    return {
        "defaults": {"store": str(tmp / "store"), "label": "agent"},
        "hypervisors.qemu": {"type": "libvirt", "uri": guest.uri},
        "vms.guest": {"hypervisor": "qemu", "name": guest.domain},
        "vms.guest.guest": table,
    }


def config_with(base: Path, guest: RealGuest, name: str, hooks: Any = None, **over: Any) -> Path:
    flat = tables(guest, base.parent, **over)
    if hooks:
        flat["vms.guest.hooks"] = hooks
    return write_config(base.with_name(f"{name}.toml"), flat)


def run(config: Path, *args: str, timeout: float = 900) -> tuple[int, dict[str, Any], str]:
    proc = snapcoord("-c", str(config), *args, "--json", timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    summaries = json_lines(proc.stdout)
    assert len(summaries) == 1, (proc.stdout, proc.stderr)
    return proc.returncode, summaries[0], proc.stderr


def journal(config: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(
            (config.parent / "store" / "journal" / "guest.json").read_text()
        )
    except (FileNotFoundError, ValueError):
        return None
    return data


# -- the plans -----------------------------------------------------------------------------------


def test_1_snapshot_with_a_dump_through_the_agent(real_guest: RealGuest, config: Path) -> None:
    guest = real_guest
    assert all_active(guest)
    sql(
        guest,
        f"DROP DATABASE IF EXISTS {DB}; CREATE DATABASE {DB}; "
        f"CREATE TABLE {DB}.items (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=InnoDB; "
        f"USE {DB}; INSERT INTO items SELECT seq, CONCAT('item-', seq) FROM seq_1_to_{ROWS};",
    )
    STATE["checksum"] = checksum(guest)
    before = logins(guest)

    code, summary, stderr = run(config, "snapshot", "guest")

    assert code == 0, stderr
    assert summary["ok"] is True and summary["services_down"] == []
    names = [s["name"] for s in summary["steps"]]
    assert {"stop services", "stop database", "hypervisor snapshot"} <= set(names)
    assert all_active(guest)
    assert summary["snapshot"] in snapshot_names(guest)
    _, manifest = stored_dump(summary)
    assert manifest["status"] == "complete"
    assert leftovers(guest) == []
    assert logins(guest) == before, "sshd accepted a login during the run"
    # The snapshot was taken with no login since ``before``: its journal holds that count.
    STATE.update(snapshot=summary["snapshot"], logins_at_snapshot=before)


def test_2_revert_through_the_agent(real_guest: RealGuest, config: Path) -> None:
    guest = real_guest
    sql(guest, f"DELETE FROM {DB}.items WHERE id > 10; CREATE TABLE {DB}.later (id INT);")
    assert checksum(guest) != STATE["checksum"]

    code, summary, stderr = run(config, "revert", "guest", "--to", STATE["snapshot"], "--yes")

    assert code == 0, stderr
    assert summary["ok"] is True
    assert all_active(guest)
    assert checksum(guest) == STATE["checksum"]
    assert sql(guest, f"SHOW TABLES FROM {DB} LIKE 'later'") == []
    assert leftovers(guest) == []  # the resumed run's watchdog was ended
    host = time.time()
    guest_clock = float(agent_sh(guest, "date +%s.%N"))
    assert abs(guest_clock - host) < 5, "the guest clock was set after the revert"
    # The revert rewound the guest's journal to the snapshot: no login since then.
    assert logins(guest) == STATE["logins_at_snapshot"], "sshd accepted a login"


def test_3_restore_dump_through_the_agent(real_guest: RealGuest, config: Path) -> None:
    guest = real_guest
    sql(guest, f"UPDATE {DB}.items SET v = 'changed'; DROP TABLE IF EXISTS {DB}.extra; "
               f"CREATE TABLE {DB}.extra (id INT);")  # fmt: skip
    assert checksum(guest) != STATE["checksum"]
    before = logins(guest)

    code, summary, stderr = run(config, "restore-dump", "guest", "--from", STATE["snapshot"],
                                "--yes")  # fmt: skip

    assert code == 0, stderr
    assert summary["ok"] is True
    assert checksum(guest) == STATE["checksum"]
    assert sql(guest, f"SHOW TABLES FROM {DB} LIKE 'extra'") == []  # the database was dropped
    assert all_active(guest)
    assert leftovers(guest) == []
    assert logins(guest) == before, "sshd accepted a login during the run"


def test_4_pause_mode_snapshot_through_the_agent(real_guest: RealGuest, config: Path) -> None:
    guest = real_guest
    cfg = config_with(config, guest, "pause", consistency="pause")
    server = mariadbd(guest)
    assert server
    before = logins(guest)

    code, summary, stderr = run(cfg, "snapshot", "guest")

    assert code == 0, stderr
    assert summary["consistency"] == "pause" and summary["window_seconds"] is None
    assert summary["write_pause_seconds"] > 0
    names = [s["name"] for s in summary["steps"]]
    snap_at = names.index("hypervisor snapshot")
    assert "pause writes" in names[:snap_at] and "resume writes" in names[snap_at + 1 :]
    assert not {"stop services", "stop database"} & set(names)
    assert mariadbd(guest) == server  # never restarted
    assert summary["snapshot"] in snapshot_names(guest)
    assert all_active(guest)
    assert leftovers(guest) == []
    assert logins(guest) == before, "sshd accepted a login during the run"


def test_5_freeze_and_thaw_through_the_agent(real_guest: RealGuest, config: Path) -> None:
    guest = real_guest
    before = logins(guest)
    frozen = snapcoord("-c", str(config), "freeze", "guest", "--max-seconds", "300",
                       timeout=600)  # fmt: skip
    assert frozen.returncode == 0, frozen.stderr
    assert set(unit_states(guest).values()) == {"inactive"}
    thawed = snapcoord("-c", str(config), "thaw", "guest", timeout=600)
    assert thawed.returncode == 0, thawed.stderr
    assert all_active(guest)
    assert leftovers(guest) == []
    assert logins(guest) == before, "sshd accepted a login during freeze and thaw"


def test_6_the_watchdog_survives_a_restart_of_the_agent_inside_the_window(
    real_guest: RealGuest, config: Path
) -> None:
    """snapcoord is SIGKILLed inside the window, then qemu-guest-agent restarts (its unit's
    KillMode=control-group ends every process qemu-ga started): the watchdog, in a systemd
    scope of its own, is not one of them and brings every service back at its limit."""
    guest = real_guest
    seconds = 45
    cfg = config_with(config, guest, "sigkill", hooks={"frozen": ["sleep 600"]}, dump=False,
                      watchdog_seconds=seconds, stop_timeout=14.0)  # fmt: skip
    before = logins(guest)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapcoord", "-c", str(cfg), "snapshot", "guest"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                "mariadb" in ((journal(cfg) or {}).get("stopped") or [])
                and unit_states(guest)["mariadb.service"] == "inactive"
            ),
            300,
            "the window to open",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    data = journal(cfg)
    assert data is not None and data["watchdog"] is not None
    watchdog = int(data["watchdog"]["pid"])
    cgroup = agent_sh(guest, f"cat /proc/{watchdog}/cgroup")
    assert ".scope" in cgroup and "qemu-guest-agent.service" not in cgroup, cgroup
    agent_before = agent_sh(guest, "systemctl show -p MainPID --value qemu-guest-agent").strip()

    # Restart the agent through itself (--no-block: the stop ends this command's cgroup too).
    guest.agent_command(
        {
            "execute": "guest-exec",
            "arguments": {"path": "systemctl", "arg": ["restart", "--no-block",
                                                       "qemu-guest-agent"]},
        }
    )  # fmt: skip

    def new_agent() -> bool:
        try:
            pid = agent_sh(guest, "systemctl show -p MainPID --value qemu-guest-agent").strip()
        except libvirt.libvirtError:  # restarting: libvirt reports it not connected
            return False
        return pid not in ("0", agent_before)

    wait_for(new_agent, 120, "qemu-guest-agent to run again under a new PID")
    wait_for(lambda: _answers(guest), 60, "libvirt to see the new agent connected")
    assert agent_sh(guest, f"test -d /proc/{watchdog} && echo alive || echo gone") == "alive\n"
    armed_in_guest = started_since_boot(guest, watchdog)

    wait_for(lambda: _answers(guest) and all_active(guest), seconds + 240,
             "the watchdog to restore everything")  # fmt: skip
    wait_for(lambda: leftovers(guest) == [], 60, "the watchdog to exit")
    # On the guest's own clock: MariaDB came back when the watchdog fired, not before.
    assert unit_started_since_boot(guest, "mariadb.service") - armed_in_guest >= seconds
    assert logins(guest) == before, "sshd accepted a login"
    # The kept journal heals: the next run finds everything running and goes on.
    code, summary, stderr = run(config_with(config, guest, "after-kill", dump=False),
                                "snapshot", "guest")  # fmt: skip
    assert code == 0, stderr
    assert any(data["run"] in note for note in summary["notes"]), summary["notes"]
    assert all_active(guest)


def started_since_boot(guest: RealGuest, pid: int) -> float:
    """When process ``pid`` started, in seconds since the guest booted (its monotonic clock)."""
    out = agent_sh(guest, f"echo $(cut -d' ' -f22 /proc/{pid}/stat) $(getconf CLK_TCK)").split()
    return int(out[0]) / int(out[1])


def unit_started_since_boot(guest: RealGuest, unit: str) -> float:
    """When systemd last began to start ``unit``, in seconds since the guest booted."""
    show = f"systemctl show -p InactiveExitTimestampMonotonic --value {unit}"
    return int(agent_sh(guest, show).strip()) / 1e6


def _answers(guest: RealGuest) -> bool:
    try:
        return guest.agent_command({"execute": "guest-ping"}) == {"return": {}}
    except libvirt.libvirtError:
        return False

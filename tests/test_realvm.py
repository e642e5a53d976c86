"""snapcoord against a real Debian 12 guest under libvirt/QEMU: systemd, Debian's stock
MariaDB (socket-activated), Apache and cron, internal snapshots with RAM, reverts that resume
the guest. The project's strongest evidence: everything the other tests join pairwise here
runs together. The guest: tests/realvm/build-image.sh, booted by tests/realvm_guest.py.

One guest for the module; the tests run in order and build on each other's state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import REPO, json_lines, snapcoord, write_config
from tests.idoit_fixture import _DATA_SQL, _SYSTEM_SQL, BASE_OBJECTS, DATABASES
from tests.realvm_guest import RealGuest, real_guest, stored_dump  # noqa: F401 - fixture

pytestmark = [pytest.mark.real, pytest.mark.realvm]

SCALE = 0.25  # tens of thousands of rows: enough for a real dump, quick under TCG
WATCHDOG_SECONDS = 60
FIGURES: dict[str, Any] = {}


# -- the guest's database, over SSH -----------------------------------------------------------


def guest_sql(guest: RealGuest, sql: str, timeout: float = 600) -> list[list[str]]:
    proc = guest.ssh("mysql --batch --skip-column-names", input=sql, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines() if line]


def checksums(guest: RealGuest) -> dict[str, str]:
    tables = guest_sql(
        guest,
        "SELECT CONCAT(TABLE_SCHEMA, '.', TABLE_NAME) FROM information_schema.TABLES "
        f"WHERE TABLE_SCHEMA IN ({', '.join(repr(d) for d in DATABASES)}) "
        "AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1",
    )
    names = ", ".join(t[0] for t in tables)
    return {name: value for name, value in guest_sql(guest, f"CHECKSUM TABLE {names} EXTENDED")}


def mariadb_uptime(guest: RealGuest) -> int:
    return int(guest_sql(guest, "SHOW GLOBAL STATUS LIKE 'Uptime'")[0][1])


def unit_states(guest: RealGuest, *units: str) -> dict[str, str]:
    proc = guest.ssh("systemctl is-active " + " ".join(units))
    return dict(zip(units, proc.stdout.split(), strict=True))


def watchdogs_in_guest(guest: RealGuest) -> list[str]:
    proc = guest.ssh("pgrep -af snapcoord-watchdog- | grep -v pgrep || true")
    return [line for line in proc.stdout.splitlines() if line.strip()]


def guest_clock_offset(guest: RealGuest) -> float:
    before = time.time()
    proc = guest.ssh("date +%s.%N")
    after = time.time()
    return float(proc.stdout) - (before + after) / 2


# -- snapcoord --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(real_guest: RealGuest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("realvm")
    return write_config(
        tmp / "snapcoord.toml",
        {
            "defaults": {"store": str(tmp / "store"), "label": "realvm"},
            "hypervisors.qemu": {"type": "libvirt", "uri": real_guest.uri},
            "vms.guest": {"hypervisor": "qemu", "name": real_guest.domain},
            "vms.guest.guest": {
                "transport": "ssh",
                "host": real_guest.host,
                "port": real_guest.port,
                "user": "root",
                "identity_file": str(real_guest.client_key),
                "known_hosts": str(real_guest.known_hosts),
                "sudo": False,
                "services": ["apache2", "cron"],
                "database": "auto",
                "watchdog_seconds": WATCHDOG_SECONDS,
                "stop_timeout": 25.0,  # both stops end before the watchdog (config check)
                "dump": True,
            },
        },
    )


def run(config: Path, *args: str, timeout: float = 600) -> tuple[int, dict[str, Any], str]:
    proc = snapcoord("-c", str(config), *args, "--json", timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    summaries = json_lines(proc.stdout)
    assert len(summaries) == 1, (proc.stdout, proc.stderr)
    return proc.returncode, summaries[0], proc.stderr


def config_with(base: Path, name: str, hooks: dict[str, Any] | None = None, **guest: Any) -> Path:
    """``base`` with other guest settings and hooks, written next to it."""
    import tomllib

    tables = tomllib.loads(base.read_text())
    flat: dict[str, dict[str, Any]] = {
        "defaults": tables["defaults"],
        "hypervisors.qemu": tables["hypervisors"]["qemu"],
        "vms.guest": {k: v for k, v in tables["vms"]["guest"].items() if k != "guest"},
        "vms.guest.guest": {**tables["vms"]["guest"]["guest"], **guest},
    }
    if hooks:
        flat["vms.guest.hooks"] = hooks
    return write_config(base.with_name(f"{name}.toml"), flat)


def step_seconds(summary: dict[str, Any], name: str) -> float:
    (step,) = [s for s in summary["steps"] if s["name"] == name]
    return round(step["ended"] - step["started"], 3)


def wait_for(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - started


ALL_UNITS = ("mariadb.service", "mariadb.socket", "apache2.service", "cron.service")


def all_active(guest: RealGuest) -> bool:
    return set(unit_states(guest, *ALL_UNITS).values()) == {"active"}


STATE: dict[str, Any] = {}  # what the ordered tests hand on


def test_1_snapshot_of_stock_debian_with_socket_activated_mariadb(
    real_guest: RealGuest,
    config: Path,
) -> None:
    """Debian's mariadb-server enables mariadb.socket: stopping only mariadb.service would be
    undone by the next connection. The socket is stopped and started with it."""
    guest = real_guest
    assert guest.ssh("systemctl is-enabled mariadb.socket").stdout.strip() == "enabled"
    assert all_active(guest)
    objects = max(1, int(BASE_OBJECTS * SCALE))
    data_sql = (
        _DATA_SQL.replace("{objects}", str(objects))
        .replace("{ips}", str(2 * objects))
        .replace("{payload}", "0")
    )
    guest_sql(guest, _SYSTEM_SQL + data_sql)
    before = checksums(guest)
    rows = int(guest_sql(guest, "SELECT COUNT(*) FROM idoit_data.isys_obj")[0][0])
    assert rows == objects
    # What the guest looks like right before the hypervisor call (the last frozen hook).
    probe = (
        "{ systemctl is-active mariadb.service mariadb.socket; "
        "pgrep -x mariadbd >/dev/null && echo mariadbd-runs || echo mariadbd-gone; "
        "mysqladmin ping >/dev/null 2>&1 && echo answers || echo silent; "
        "systemctl is-active mariadb.service; } > /root/frozen.txt 2>&1; true"
    )
    cfg = config_with(config, "socket", hooks={"frozen": [probe]})
    started = time.monotonic()
    code, summary, stderr = run(cfg, "snapshot", "guest")
    elapsed = time.monotonic() - started
    assert code == 0, stderr
    assert summary["ok"] is True and summary["services_down"] == []
    assert (
        "mariadb is started on demand by mariadb.socket: stopped and started with it"
        in (summary["notes"])
    )
    # Inside the window: the service and its socket were down, and the ping did not wake it.
    frozen = guest.ssh("cat /root/frozen.txt").stdout.split()
    assert frozen == ["inactive", "inactive", "mariadbd-gone", "silent", "inactive"], frozen
    # Afterwards everything runs again, the socket too, and MariaDB was really restarted.
    assert all_active(guest)
    assert mariadb_uptime(guest) < elapsed  # not restarted: at least its uptime before + elapsed
    assert watchdogs_in_guest(guest) == []
    assert checksums(guest) == before
    # The dump went off the guest into the store and matches its manifest.
    dump, manifest = stored_dump(summary)
    assert manifest["files"][dump.name]["sha256"] == summary["dump"]["sha256"]
    STATE.update(snapshot=summary["snapshot"], checksums=before, config=cfg)
    FIGURES.update(
        window_seconds=summary["window_seconds"],
        snapshot_call_seconds=step_seconds(summary, "hypervisor snapshot"),
        dump_seconds=step_seconds(summary, "dump to store"),
        snapshot_run_seconds=round(elapsed, 1),
        isys_obj_rows=objects,
    )


def test_2_revert_brings_back_the_data_the_services_and_no_watchdog(
    real_guest: RealGuest,
    config: Path,
) -> None:
    """The RAM snapshot resumes the guest at the moment MariaDB was stopped, with that run's
    watchdog armed and the clock of that moment: snapcoord stops the watchdog, sets the clock
    and starts the services (and the socket)."""
    guest = real_guest
    assert "snapshot" in STATE, "test_1 did not run"
    guest_sql(
        guest,
        "DELETE FROM idoit_data.isys_obj WHERE isys_obj__id % 7 = 0;"
        "CREATE TABLE idoit_data.after_snapshot (id INT PRIMARY KEY) ENGINE=InnoDB;",
    )
    assert checksums(guest) != STATE["checksums"]
    time.sleep(10)  # the guest clock in the snapshot falls behind by at least this much
    started = time.monotonic()
    code, summary, stderr = run(config, "revert", "guest", "--to", STATE["snapshot"], "--yes")
    elapsed = time.monotonic() - started
    assert code == 0, stderr
    notes = " ".join(summary["notes"])
    assert "stopped 1 snapcoord watchdog(s) that the revert brought back" in notes, notes
    assert "the guest clock was" in notes and "off after the revert: set" in notes, notes
    assert all_active(guest)
    assert watchdogs_in_guest(guest) == []
    assert abs(guest_clock_offset(guest)) < 3
    assert checksums(guest) == STATE["checksums"]
    tables = guest_sql(guest, "SHOW TABLES FROM idoit_data LIKE 'after_snapshot'")
    assert tables == []
    FIGURES.update(
        revert_run_seconds=round(elapsed, 1),
        revert_call_seconds=step_seconds(summary, "revert"),
        services_up_after_revert_seconds=step_seconds(summary, "bring guest services up"),
    )


def test_3_restore_dump_on_the_real_guest(
    real_guest: RealGuest,
    config: Path,
) -> None:
    guest = real_guest
    assert "snapshot" in STATE, "test_1 did not run"
    guest_sql(guest, "UPDATE idoit_data.isys_obj SET isys_obj__title = 'changed' "
                     "WHERE isys_obj__id % 3 = 0;")  # fmt: skip
    assert checksums(guest) != STATE["checksums"]
    code, _summary, stderr = run(config, "restore-dump", "guest", "--yes")
    assert code == 0, stderr
    assert checksums(guest) == STATE["checksums"]
    assert all_active(guest)
    assert watchdogs_in_guest(guest) == []


def _journal(cfg: Path) -> dict[str, Any] | None:
    path = cfg.parent / "store" / "journal" / "guest.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data


def _started_since_boot(guest: RealGuest, pid: int) -> float:
    """When process ``pid`` started, in seconds since the guest booted (its monotonic clock)."""
    out = guest.ssh(f"echo $(cut -d' ' -f22 /proc/{pid}/stat) $(getconf CLK_TCK)").stdout.split()
    ticks, per_second = int(out[0]), int(out[1])
    return ticks / per_second


def _started_since_boot_of_unit(guest: RealGuest, unit: str) -> float:
    """When systemd last began to start ``unit``, in seconds since the guest booted."""
    show = f"systemctl show -p InactiveExitTimestampMonotonic --value {unit}"
    return int(guest.ssh(show).stdout.strip()) / 1e6


def test_4_sigkill_inside_the_window_the_guest_watchdog_restores_everything(
    real_guest: RealGuest,
    config: Path,
) -> None:
    guest = real_guest
    seconds = 30
    cfg = config_with(config, "sigkill", hooks={"frozen": ["sleep 300"]}, dump=False,
                      watchdog_seconds=seconds, stop_timeout=14.0)  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapcoord", "-c", str(cfg), "snapshot", "guest"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                "mariadb" in ((_journal(cfg) or {}).get("stopped") or [])
                and unit_states(guest, "mariadb.service")["mariadb.service"] == "inactive"
            ),
            120,
            "the window to open",
        )
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    data = _journal(cfg)
    assert data is not None and data["watchdog"] is not None
    armed_at = float(data["watchdog"]["armed_at"])
    armed_in_guest = _started_since_boot(guest, int(data["watchdog"]["pid"]))
    assert not all_active(guest)
    # how soon the host sees everything running depends on how fast the emulated guest starts
    # MariaDB under the suite's load; when the watchdog fired is read on the guest's own clock
    wait_for(lambda: all_active(guest), seconds + 120, "the watchdog to restore everything")
    restored_after = time.time() - armed_at
    fired_after = _started_since_boot_of_unit(guest, "mariadb.service") - armed_in_guest
    assert seconds <= fired_after <= seconds + 10, f"fired {fired_after:.1f} s after arming"
    wait_for(lambda: watchdogs_in_guest(guest) == [], 15, "the watchdog to exit")
    FIGURES["sigkill_all_running_after_arm_seconds"] = round(restored_after, 1)
    # The kept journal heals: the next run finds everything running and goes on.
    code, summary, stderr = run(config_with(config, "after-kill", dump=False), "snapshot",
                                "guest")  # fmt: skip
    assert code == 0, stderr
    assert any(data["run"] in note for note in summary["notes"]), summary["notes"]
    assert all_active(guest)


def test_5_connection_cut_inside_the_window_is_reconnected(
    real_guest: RealGuest,
    config: Path,
    tmp_path: Path,
) -> None:
    from tests.faultproxy import FaultProxy

    guest = real_guest
    with FaultProxy((guest.host, guest.port)) as proxy:
        known = tmp_path / "known_hosts"
        key = guest.known_hosts.read_text().split(None, 1)[1]
        known.write_text(f"[127.0.0.1]:{proxy.port} {key}")
        cfg = config_with(config, "cut", hooks={"frozen": ["sleep 20"]}, dump=False,
                          port=proxy.port, known_hosts=str(known))  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapcoord", "-c", str(cfg), "snapshot", "guest", "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(
                lambda: unit_states(guest, "mariadb.service")["mariadb.service"] == "inactive",
                120,
                "the window to open",
            )
            time.sleep(2)  # inside the frozen hook
            assert proxy.cut() > 0
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (summary,) = json_lines(out)
    assert proc.returncode == 4, err  # the frozen hook lost its connection: no snapshot
    assert "lost the SSH connection" in " ".join(summary["errors"])
    assert summary["services_down"] == []
    assert all_active(guest)
    assert watchdogs_in_guest(guest) == []
    assert _journal(cfg) is None


def test_6_pause_keeps_everything_running_and_a_revert_ends_the_resumed_lock(
    real_guest: RealGuest,
    config: Path,
) -> None:
    """consistency = "pause" on stock Debian: nothing restarts, commits are held for the RAM
    snapshot. Reverting to that snapshot resumes the guest with the lock session still holding
    BLOCK_COMMIT: snapcoord ends it and proves a write commits."""
    guest = real_guest
    server = guest.ssh("pgrep -x mariadbd").stdout.split()
    uptime = mariadb_uptime(guest)
    cfg = config_with(config, "pause", consistency="pause", pause_timeout=300.0, dump=True)
    started = time.monotonic()
    code, summary, stderr = run(cfg, "snapshot", "guest")
    elapsed = time.monotonic() - started
    assert code == 0, stderr
    assert summary["consistency"] == "pause" and summary["window_seconds"] is None
    assert summary["pause"]["method"] == "backup_stage"
    assert guest.ssh("pgrep -x mariadbd").stdout.split() == server
    assert mariadb_uptime(guest) >= uptime + int(elapsed) - 1  # never restarted
    assert all_active(guest)
    assert guest.ssh("pgrep -f snapcoord-[p]ause: || true").stdout.strip() == ""
    # Revert to it: the guest resumes with the lock session that held the commits.
    code, reverted, stderr = run(cfg, "revert", "guest", "--to", summary["snapshot"], "--yes")
    assert code == 0, stderr
    notes = " ".join(reverted["notes"])
    assert "lock session process(es) that the revert brought back" in notes, notes
    assert "a test write committed" in notes, notes
    guest_sql(
        guest,
        "SET SESSION lock_wait_timeout = 5; CREATE DATABASE pause_probe;"
        "CREATE TABLE pause_probe.t (i INT) ENGINE=InnoDB; INSERT INTO pause_probe.t VALUES (1);"
        "DROP DATABASE pause_probe;",
        timeout=60,
    )
    assert all_active(guest)
    FIGURES.update(
        write_pause_seconds=summary["write_pause_seconds"],
        pause_snapshot_call_seconds=step_seconds(summary, "hypervisor snapshot"),
    )


def test_6b_freeze_and_thaw_in_separate_processes_stop_the_socket_too(
    real_guest: RealGuest,
    config: Path,
) -> None:
    """freeze/thaw (issue 14) on stock Debian: between the two commands MariaDB, its socket,
    Apache and cron are all inactive, and a client connecting does not wake MariaDB."""
    guest = real_guest
    assert all_active(guest)
    cfg = config_with(config, "freeze", dump=False)
    frozen = snapcoord("-c", str(cfg), "freeze", "guest", "--max-seconds", "600", timeout=600)
    assert frozen.returncode == 0, frozen.stdout + frozen.stderr
    states = unit_states(guest, *ALL_UNITS)
    assert set(states.values()) == {"inactive"}, states
    assert guest.ssh("mysqladmin ping").returncode != 0
    assert unit_states(guest, "mariadb.service")["mariadb.service"] == "inactive"
    assert len(watchdogs_in_guest(guest)) == 1
    thawed = snapcoord("-c", str(cfg), "thaw", "guest", timeout=600)
    assert thawed.returncode == 0, thawed.stdout + thawed.stderr
    assert "guest: thaw ok" in thawed.stdout
    assert all_active(guest)
    assert watchdogs_in_guest(guest) == []


def test_7_figures(real_guest: RealGuest) -> None:
    """Print the figures for docs/testing.md (run with -s to see them)."""
    FIGURES["boot_to_ssh_seconds"] = round(real_guest.boot_seconds, 1)
    print("\nrealvm figures: " + json.dumps(FIGURES, sort_keys=True))
    assert {"window_seconds", "snapshot_call_seconds", "revert_call_seconds"} <= set(FIGURES)
    out = os.environ.get("SNAPCOORD_REALVM_FIGURES")
    if out:
        Path(out).write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")

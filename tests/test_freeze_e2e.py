"""``freeze`` / ``thaw`` end to end: each command a separate process, as a backup product's
pre-freeze and post-thaw scripts call them, against the loopback guest (real sshd, MariaDB,
Apache, cron). Checked by the guest's state: what runs, which processes hold what."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from snapcoord.holder import _REQUEST_TIMEOUT as REQUEST_TIMEOUT
from tests import lab, pause_load
from tests.cli_helpers import json_lines, snapcoord
from tests.faultproxy import FaultProxy, known_hosts_for
from tests.guest_fixtures import (
    guest_config,
    lab_services,  # noqa: F401 - fixture
    wait_for,
    watchdog_pids,
)

URI = "test:///default"  # freeze and thaw never call the hypervisor
LOCK_MARKER = "snapcoord-pause:"


def holder_pids(vm: str = "web1") -> list[int]:
    return [
        pid
        for pid, _comm, args in lab.process_table()
        if "snapcoord.holder" in args and args.split()[-1] == vm
    ]


def lock_sessions() -> list[int]:
    return [pid for pid, _comm, args in lab.process_table() if LOCK_MARKER in args]


def journal(tmp_path: Path) -> dict[str, Any] | None:
    path = tmp_path / "store" / "journal" / "web1.json"
    return json.loads(path.read_text()) if path.exists() else None


def all_down(services: lab.GuestServices) -> bool:
    return not any(services.states().values())


@pytest.fixture
def stop_config(ssh_guest: lab.SshGuest, tmp_path: Path) -> Path:
    return guest_config(tmp_path, URI, ssh_guest.guest_table())


def test_freeze_stops_everything_until_thaw_in_another_process(
    stop_config: Path, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    assert lab_services.all_running()
    frozen = snapcoord("-c", str(stop_config), "freeze", "web1", "--max-seconds", "300")
    assert frozen.returncode == 0, frozen.stderr
    assert "web1: frozen (services stopped) until" in frozen.stdout
    assert "-> stop services" in frozen.stdout
    # the freeze command has exited; the guest stays quiet, held by the holder
    assert all_down(lab_services), lab_services.states()
    [holder] = holder_pids()
    data = journal(tmp_path)
    assert data is not None and data["freeze"]["pid"] == holder
    assert set(data["stopped"]) == {"apache2", "cron", "mariadb"}
    assert watchdog_pids(data["run"]), "the guest watchdog guards the freeze"
    status = snapcoord("-c", str(stop_config), "status", "web1", "--offline")
    assert f"frozen by freeze (run {data['run']}, holder pid {holder})" in status.stdout
    assert "`snapcoord thaw web1`" in status.stdout
    # the thaw comes well after the last request, as after a backup of minutes: a request's
    # deadline once counted from before the holder's idle wait, and this thaw was dropped
    time.sleep(REQUEST_TIMEOUT + 1)
    assert all_down(lab_services), "nothing came back by itself before thaw"

    thawed = snapcoord("-c", str(stop_config), "thaw", "web1")
    assert thawed.returncode == 0, thawed.stderr
    assert lab_services.all_running(), lab_services.states()
    assert "<- start services" in thawed.stdout and "<- start database" in thawed.stdout
    assert "web1: thaw ok" in thawed.stdout
    assert journal(tmp_path) is None
    assert watchdog_pids(data["run"]) == []
    wait_for(lambda: holder_pids() == [], 10, "the holder to exit")
    last = json.loads((tmp_path / "store" / "journal" / "web1.last-run.json").read_text())
    assert last["ok"] and last["ended_by"] == "thaw" and last["window_seconds"] > 1


def test_a_service_started_behind_the_freeze_makes_thaw_fail_and_everything_runs(
    stop_config: Path, lab_services: lab.GuestServices
) -> None:
    assert snapcoord("-c", str(stop_config), "freeze", "web1").returncode == 0
    lab_services.start("cron")  # a timer, a socket, an admin: the freeze no longer holds
    thawed = snapcoord("-c", str(stop_config), "thaw", "web1")
    assert thawed.returncode == 5, thawed.stdout + thawed.stderr
    assert "cron runs again although this run stopped it" in thawed.stderr
    assert "a snapshot taken while frozen is not consistent" in thawed.stderr
    assert lab_services.all_running(), lab_services.states()


def test_freeze_with_dump_stores_it_and_thaw_commits_it(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    config = guest_config(tmp_path, URI, ssh_guest.guest_table(dump=True))
    frozen = snapcoord("-c", str(config), "freeze", "web1")
    assert frozen.returncode == 0, frozen.stderr
    assert "-> dump to store" in frozen.stdout
    assert all_down(lab_services)
    thawed = snapcoord("-c", str(config), "thaw", "web1")
    assert thawed.returncode == 0, thawed.stderr
    assert "<- commit dump to store" in thawed.stdout
    [folder] = (tmp_path / "store" / "web1").glob("snapcoord-freeze-*")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["snapshot_by"] == "freeze"
    assert manifest["snapshot_taken"] is False
    assert (folder / "mysql.sql.zst").stat().st_size > 1000  # compression = "auto", zstd found
    assert lab_services.all_running()


def test_freeze_twice_is_refused_and_thaw_without_freeze_is_a_note(
    stop_config: Path, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    nothing = snapcoord("-c", str(stop_config), "thaw", "web1")
    assert nothing.returncode == 0, nothing.stderr
    assert "nothing was frozen" in nothing.stdout
    assert lab_services.all_running()

    assert snapcoord("-c", str(stop_config), "freeze", "web1").returncode == 0
    again = snapcoord("-c", str(stop_config), "freeze", "web1", "--json")
    assert again.returncode == 75, again.stderr
    [error] = [line for line in again.stderr.splitlines() if "error" in line]
    assert "web1: already frozen since" in error and "snapcoord thaw web1" in error
    assert json_lines(again.stdout)[0]["exit_code"] == 75
    assert all_down(lab_services), "the refused freeze changed nothing"
    assert len(holder_pids()) == 1

    assert snapcoord("-c", str(stop_config), "thaw", "web1").returncode == 0
    assert lab_services.all_running()


def test_no_thaw_the_holder_restores_at_the_limit_and_thaw_reports_it(
    stop_config: Path, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    started = time.monotonic()
    assert snapcoord("-c", str(stop_config), "freeze", "web1", "--max-seconds=10").returncode == 0
    assert all_down(lab_services)
    wait_for(lab_services.all_running, 30, "the holder to restore at the limit")
    assert time.monotonic() - started >= 7, "restored only near the limit"
    wait_for(lambda: holder_pids() == [], 15, "the holder to exit")
    assert journal(tmp_path) is None

    late = snapcoord("-c", str(stop_config), "thaw", "web1")
    assert late.returncode == 5, late.stderr
    assert "reached its limit before thaw" in late.stderr
    again = snapcoord("-c", str(stop_config), "thaw", "web1")
    assert again.returncode == 0 and "nothing was frozen" in again.stdout


def test_holder_killed_thaw_restores_from_the_journal(
    stop_config: Path, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    assert snapcoord("-c", str(stop_config), "freeze", "web1").returncode == 0
    [holder] = holder_pids()
    run = journal(tmp_path)["run"]  # type: ignore[index]
    os.kill(holder, signal.SIGKILL)
    wait_for(lambda: holder_pids() == [], 10, "the holder to die")
    assert all_down(lab_services)
    thawed = snapcoord("-c", str(stop_config), "thaw", "web1")
    assert thawed.returncode == 0, thawed.stderr
    assert lab_services.all_running(), lab_services.states()
    assert "disarmed the watchdog" in thawed.stdout
    assert watchdog_pids(run) == []
    assert journal(tmp_path) is None


def test_holder_killed_and_no_thaw_the_guest_watchdog_restores(
    stop_config: Path, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    started = time.monotonic()
    assert snapcoord("-c", str(stop_config), "freeze", "web1", "--max-seconds=10").returncode == 0
    [holder] = holder_pids()
    os.kill(holder, signal.SIGKILL)
    assert all_down(lab_services)
    # the watchdog fires 20 s after the limit (plans/freeze.py WATCHDOG_GRACE)
    wait_for(lab_services.all_running, 60, "the guest watchdog to restore")
    assert time.monotonic() - started >= 25
    thawed = snapcoord("-c", str(stop_config), "thaw", "web1")
    assert thawed.returncode == 0, thawed.stderr
    assert "the watchdog had already run" in thawed.stdout


def test_sigterm_to_the_holder_restores_at_once(
    stop_config: Path, lab_services: lab.GuestServices
) -> None:
    assert snapcoord("-c", str(stop_config), "freeze", "web1").returncode == 0
    [holder] = holder_pids()
    os.kill(holder, signal.SIGTERM)
    wait_for(lab_services.all_running, 30, "the holder to unwind on SIGTERM")
    wait_for(lambda: holder_pids() == [], 10, "the holder to exit")


def test_freeze_of_an_unreachable_guest_fails_with_one_line_and_touches_nothing(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    config = guest_config(tmp_path, URI, ssh_guest.guest_table(port=lab.free_port()))
    frozen = snapcoord("-c", str(config), "freeze", "web1")
    assert frozen.returncode == 4, frozen.stderr
    errors = [line for line in frozen.stderr.splitlines() if line.startswith("snapcoord: error:")]
    assert len(errors) == 1 and "web1:" in errors[0], frozen.stderr
    assert "Traceback" not in frozen.stderr
    assert lab_services.all_running()
    assert holder_pids() == []


def test_freeze_of_a_vm_without_guest_is_a_usage_error(tmp_path: Path) -> None:
    config = guest_config(tmp_path, URI, {})
    text = config.read_text().split("[vms.web1.guest]")[0]
    config.write_text(text)
    frozen = snapcoord("-c", str(config), "freeze", "web1")
    assert frozen.returncode == 2
    assert "web1: freeze needs a [vms.web1.guest] table" in frozen.stderr


# -- pause: a helper process holds the lock session ------------------------------------------


@pytest.fixture
def paused_lab(lab_services: lab.GuestServices) -> Any:
    pause_load.ensure_binlog()
    pause_load.reset_schema()
    yield lab_services
    wait_for(lambda: lock_sessions() == [], 15, "every lock session to end")
    pause_load.drop_schema()


def _insert(timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mysql", "-e", "INSERT INTO snapcoord_pausetest.w (v) VALUES (1)"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _commit_blocked() -> bool:
    try:
        _insert(2)
    except subprocess.TimeoutExpired:
        return True
    return False


def test_pause_freeze_holds_commits_across_processes_until_thaw(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path
) -> None:
    config = guest_config(tmp_path, URI, ssh_guest.guest_table(consistency="pause"))
    mysqld = min(lab.mysqld_pids())
    frozen = snapcoord("-c", str(config), "freeze", "web1", "--max-seconds", "120")
    assert frozen.returncode == 0, frozen.stderr
    assert "frozen (commits held)" in frozen.stdout
    assert len(lock_sessions()) >= 1
    assert paused_lab.all_running(), "nothing stopped in pause mode"
    assert _commit_blocked(), "a commit went through while frozen"
    thawed = snapcoord("-c", str(config), "thaw", "web1")
    assert thawed.returncode == 0, thawed.stderr
    assert "<- resume writes" in thawed.stdout
    assert _insert(10).returncode == 0
    assert min(lab.mysqld_pids()) == mysqld, "the server was never restarted"


def test_pause_holder_stalled_the_guest_ends_the_lock_at_the_limit(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path
) -> None:
    """A holder that cannot act (SIGSTOP: a hung host) keeps its session's stdin open; the
    guest's own time limit (timeout -s KILL) still ends the lock at --max-seconds."""
    config = guest_config(tmp_path, URI, ssh_guest.guest_table(consistency="pause"))
    started = time.monotonic()
    assert snapcoord("-c", str(config), "freeze", "web1", "--max-seconds", "15").returncode == 0
    [holder] = holder_pids()
    os.kill(holder, signal.SIGSTOP)
    try:
        assert _commit_blocked(), "a commit went through while frozen"
        wait_for(lambda: lock_sessions() == [], 30, "the guest's time limit to end the session")
        assert time.monotonic() - started >= 12, "the lock ended only at its limit"
        assert _insert(10).returncode == 0
    finally:
        os.kill(holder, signal.SIGCONT)
    wait_for(lambda: holder_pids() == [], 30, "the holder to notice and exit")
    late = snapcoord("-c", str(config), "thaw", "web1")
    assert late.returncode == 5, late.stdout + late.stderr
    assert "reached its limit before thaw" in late.stderr


def test_pause_holder_killed_releases_at_once_and_thaw_says_so(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path
) -> None:
    config = guest_config(tmp_path, URI, ssh_guest.guest_table(consistency="pause"))
    assert snapcoord("-c", str(config), "freeze", "web1", "--max-seconds", "120").returncode == 0
    [holder] = holder_pids()
    assert _commit_blocked()
    os.kill(holder, signal.SIGKILL)
    # the session's stdin came from the holder: EOF ends the client, the server drops the lock
    wait_for(lambda: lock_sessions() == [], 10, "the lock session to end with its holder")
    assert _insert(10).returncode == 0
    thawed = snapcoord("-c", str(config), "thaw", "web1")
    assert thawed.returncode == 5, thawed.stdout + thawed.stderr
    assert "ended before thaw" in thawed.stderr
    assert journal(tmp_path) is None
    assert snapcoord("-c", str(config), "thaw", "web1").returncode == 0


# -- faults on the wire while frozen -----------------------------------------------------------


@pytest.fixture
def proxied(ssh_guest: lab.SshGuest, tmp_path: Path) -> Any:
    """The guest reached through tests/faultproxy.py: ``(proxy, guest table)``."""
    proxy = FaultProxy((ssh_guest.host, ssh_guest.port)).start()
    known = known_hosts_for(
        ssh_guest.workdir / "host_ed25519.pub", proxy.port, tmp_path / "known_hosts.proxy"
    )
    yield proxy, ssh_guest.guest_table(port=proxy.port, known_hosts=str(known))
    proxy.stop()


def test_connection_cut_while_frozen_thaw_reconnects_and_restores(
    proxied: Any, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    proxy, guest = proxied
    config = guest_config(tmp_path, URI, guest)
    assert snapcoord("-c", str(config), "freeze", "web1").returncode == 0
    assert proxy.cut() >= 1, "the holder's connection went through the proxy"
    assert all_down(lab_services)
    thawed = snapcoord("-c", str(config), "thaw", "web1")
    assert thawed.returncode == 0, thawed.stdout + thawed.stderr
    assert lab_services.all_running(), lab_services.states()
    assert proxy.stats()["accepted"] >= 2, "the holder reconnected"


def test_guest_unreachable_at_thaw_the_watchdog_restores_and_a_later_thaw_clears(
    proxied: Any, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    proxy, guest = proxied
    config = guest_config(tmp_path, URI, {**guest, "start_timeout": 5.0})
    assert snapcoord("-c", str(config), "freeze", "web1", "--max-seconds=10").returncode == 0
    proxy.refuse(300)
    thawed = snapcoord("-c", str(config), "thaw", "web1")
    assert thawed.returncode == 6, thawed.stdout + thawed.stderr
    assert "the guest watchdog will start" in thawed.stderr
    # the watchdog in the guest does not need the connection
    wait_for(lab_services.all_running, 60, "the guest watchdog to start everything")
    proxy.resume()
    again = snapcoord("-c", str(config), "thaw", "web1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert journal(tmp_path) is None


def test_pause_connection_cut_while_frozen_releases_and_thaw_says_so(
    proxied: Any, paused_lab: lab.GuestServices, tmp_path: Path
) -> None:
    proxy, guest = proxied
    config = guest_config(tmp_path, URI, {**guest, "consistency": "pause"})
    assert snapcoord("-c", str(config), "freeze", "web1", "--max-seconds=120").returncode == 0
    assert _commit_blocked()
    proxy.cut()
    wait_for(lambda: lock_sessions() == [], 15, "the lock session to end with its connection")
    assert _insert(10).returncode == 0
    thawed = snapcoord("-c", str(config), "thaw", "web1")
    assert thawed.returncode == 5, thawed.stdout + thawed.stderr
    assert "database session" in thawed.stderr
    assert _insert(10).returncode == 0

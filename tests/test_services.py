"""hooks/guest/services.py against the loopback guest's real init scripts, MariaDB, Apache, cron."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from snapcoord.config import load_config
from snapcoord.errors import ExitCode, GuestError, PreflightError, ServiceNotRestored
from snapcoord.guest import ExecTransport, SshTransport
from snapcoord.hooks.guest.services import Services
from snapcoord.run import Engine, ServiceWindow, SilentReporter, Step
from tests import lab
from tests.cli_helpers import snapcoord, write_config
from tests.guest_fixtures import (
    lab_services,  # noqa: F401 - fixture
    wait_for,
)
from tests.test_guest_transport import table


@pytest.fixture
def transport(ssh_guest: lab.SshGuest) -> Iterator[SshTransport]:
    transport = SshTransport(table(ssh_guest), vm="lab")
    transport.open()
    try:
        yield transport
    finally:
        transport.close()


def services(transport: SshTransport, guest: lab.SshGuest, **overrides: object) -> Services:
    return Services(transport, table(guest, **overrides), vm="lab")


def lock_held(path: str) -> bool:
    """Another process holds the flock on ``path`` (a non-blocking try fails)."""
    return lab.run(["flock", "-n", path, "true"], check=False).returncode != 0


def test_probe_detects_init_services_and_their_state(
    transport: SshTransport, ssh_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    lab_services.stop("cron")
    state = services(transport, ssh_guest, database="auto").probe()
    assert state.init == "sysv"  # no systemd here: service + init scripts
    assert state.database == "mariadb"  # auto: mariadb exists, mysql does not
    assert state.running == {"apache2": True, "cron": False, "mariadb": True}
    assert state.to_stop() == ["apache2"]  # cron was stopped by the admin: left alone


def test_probe_names_a_missing_service(
    transport: SshTransport, ssh_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    svc = services(transport, ssh_guest, services=["apache2", "nginx-not-installed"])
    with pytest.raises(PreflightError, match="nginx-not-installed"):
        svc.probe()


def test_probe_without_database(
    transport: SshTransport, ssh_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    state = services(transport, ssh_guest, database="none", services=["cron"]).probe()
    assert state.database is None and not state.database_running
    assert state.running == {"cron": True}


def test_stop_and_start_are_verified_and_timed(
    transport: SshTransport, ssh_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    svc = services(transport, ssh_guest)
    svc.probe()
    window = ServiceWindow()
    svc.stop(["apache2", "cron"], window)
    assert not lab_services.running("apache2") and not lab_services.running("cron")
    assert window.still_down == ["apache2", "cron"]
    svc.stop_database(window)
    assert lab.mysqld_running() is False  # the server process is gone, not just quiet
    svc.start_database(window)
    assert lab.mysqladmin_ping()
    svc.start(["apache2", "cron"], window)
    assert lab_services.all_running()
    assert window.still_down == [] and window.seconds is not None
    assert set(svc.timings) == {
        "apache2 stop", "cron stop", "mariadb stop", "mariadb start", "apache2 start",
        "cron start",
    }  # fmt: skip
    assert all(seconds > 0 for seconds in svc.timings.values())


def test_start_of_a_running_service_changes_nothing(
    transport: SshTransport, ssh_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    uptime = lab_services.mariadb_uptime()
    svc = services(transport, ssh_guest)
    state = svc.probe()
    state.stopped = ["mariadb", "cron"]
    svc.start_database(ServiceWindow())
    svc.start(["cron"], ServiceWindow())
    assert lab_services.mariadb_uptime() >= uptime


def test_a_start_waits_for_a_stop_still_running_in_the_guest(
    transport: SshTransport, ssh_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    """After a lost connection the unwind's start may reach the guest while the run's stop is
    still at work there: the service's lock makes the start wait, so it ends up running."""
    svc = services(transport, ssh_guest, services=["cron"])
    state = svc.probe()
    state.stopped = ["cron"]
    lab.run(["mkdir", "-p", "-m", "0700", "/run/snapcoord"])
    # A stop still in flight: holds cron's lock, stops cron 2 s later.
    stopper = subprocess.Popen(
        ["flock", "/run/snapcoord/cron.lock", "sh", "-c", "sleep 2; service cron stop"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
    )  # fmt: skip
    try:
        wait_for(lambda: lock_held("/run/snapcoord/cron.lock"), 10, "the stopper to hold the lock")
        window = ServiceWindow()
        svc.start(["cron"], window)  # cron still runs: without the lock a no-op
        assert stopper.wait(timeout=30) == 0
        assert lab_services.running("cron")
        assert window.still_down == []
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait()


class _Unwind(SilentReporter):
    """The engine's reporter for the race below: ``released`` is set once the engine took the
    signal (it notes it), or by the test once the unwind started apache2 again."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.released.set()


def test_sigterm_while_the_stops_are_in_flight_leaves_no_service_down(
    transport: SshTransport, ssh_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    """SIGTERM lands while apache2's and cron's stops (issued together) are in flight: the
    engine must wait for every stop issued before its undo starts them again. Made
    deterministic: apache2's stop command leaves for the guest only once the signal was taken
    (or, if the engine did not wait, once the unwind's start of apache2 came back), so an undo
    that does not wait starts apache2 before it is stopped and leaves it down."""
    svc = services(transport, ssh_guest)
    svc.probe()
    reporter = _Unwind()
    real_run = transport.run

    ended = threading.Semaphore(0)  # released once per guest command that ended
    issued, lock = [0], threading.Lock()

    def run(argv: Sequence[str], **kwargs: Any) -> Any:
        script, name = (argv[2], argv[4]) if len(argv) > 4 and argv[0] == "sh" else ("", "")
        with lock:
            issued[0] += 1
        try:
            if name == "apache2" and "ACTION=stop" in script:
                os.kill(os.getpid(), signal.SIGTERM)  # the stop is on its way: a signal arrives
                reporter.released.wait(60)  # not a timing assertion: a bound on a test that fails
            result = real_run(argv, **kwargs)
            if name == "apache2" and "ACTION=start" in script:
                reporter.released.set()
            return result
        finally:
            ended.release()

    transport.run = run  # type: ignore[method-assign]
    window = ServiceWindow()
    steps = [
        Step(
            "stop services",
            lambda: svc.stop(["apache2", "cron"], window, parallel=True),
            lambda: svc.start(["apache2", "cron"], window, parallel=True),
            undo_first=True,
        )
    ]
    result = Engine(reporter, window=window).execute(steps)
    # judge the state once every guest command the run issued has ended (one the engine did not
    # wait for may still be at work in the guest)
    assert all(ended.acquire(timeout=60) for _ in range(issued[0]))
    assert result.exit_code == ExitCode.INTERRUPTED
    assert lab_services.states() == {"apache2": True, "cron": True, "mariadb": True}
    assert window.still_down == [] and window.seconds is not None
    assert svc.state is not None and svc.state.stopped == []
    assert any("SIGTERM" in note for note in reporter.notes)


@pytest.mark.parametrize(
    "services_value", [["apache2; reboot"], ["$(reboot)"], ["cron", "a b"], ["`id`"]]
)
def test_config_refuses_service_names_that_could_inject_shell(
    tmp_path: Path, services_value: list[str]
) -> None:
    config = write_config(
        tmp_path / "snapcoord.toml",
        {
            "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
            "vms.db": {"hypervisor": "lab"},
            "vms.db.guest": {"host": "db.example.org", "services": services_value},
        },
    )
    proc = snapcoord("-c", str(config), "config", "check")
    assert proc.returncode == 2
    assert "vms.db.guest.services" in proc.stderr and "use letters" in proc.stderr


# -- verified, not assumed (stand-in init scripts) ---------------------------------------------
# Stops and starts are verified, not assumed: ``Services`` returns only once the guest really
# reached the state, and an init command that exits 0 without the effect is a failure.
#
# Real init scripts on this machine finish their work before they exit, so they cannot show the
# difference. The guest here is the exec transport with stand-in ``service`` / ``mysqladmin`` /
# ``my_print_defaults`` commands (real processes, state as files) that can lag behind or never
# take effect, like a slow or broken init script on a real guest.


LAG = 1.0  # seconds a lagging stand-in needs after its init command returned

# $STATE/<name>.mode: normal | lagging (takes effect LAG s after exiting 0) | stuck (exits 0,
# never takes effect). The database "server" is a real process whose PID is in $STATE/db.pid.
SERVICE = r"""#!/bin/sh
set -u
name=$1 action=$2
case "$name" in web|db) ;; *) echo "$name: unrecognized service" >&2; exit 1;; esac
flag="$STATE/$name.running"
mode=$(cat "$STATE/$name.mode" 2>/dev/null || echo normal)
down() {
  rm -f "$flag"
  if [ "$name" = db ] && [ -r "$STATE/db.pid" ]; then kill "$(cat "$STATE/db.pid")"; fi
}
up() {
  if [ "$name" = db ]; then
    sleep 300 </dev/null >/dev/null 2>&1 &
    echo $! > "$STATE/db.pid"
  fi
  touch "$flag"
}
case "$action" in
  status) [ -e "$flag" ] && exit 0; exit 3;;
  stop)
    case $mode in
      normal) down;;
      lagging) ( sleep "$LAG"; down ) </dev/null >/dev/null 2>&1 &;;
    esac;;
  start)
    case $mode in
      normal) up;;
      lagging) ( sleep "$LAG"; up ) </dev/null >/dev/null 2>&1 &;;
    esac;;
  *) exit 2;;
esac
exit 0
"""

MYSQLADMIN = r"""#!/bin/sh
[ "${1:-}" = ping ] || exit 2
[ -e "$STATE/db.running" ] && { echo "mysqld is alive"; exit 0; }
echo "error: can't connect (stand-in)" >&2; exit 1
"""

MY_PRINT_DEFAULTS = r"""#!/bin/sh
echo "--pid-file=$STATE/db.pid"
"""


class Guest:
    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.state = root / "state"
        self.bin.mkdir(parents=True)
        self.state.mkdir()
        for name, text in (
            ("service", SERVICE),
            ("mysqladmin", MYSQLADMIN),
            ("my_print_defaults", MY_PRINT_DEFAULTS),
        ):
            path = self.bin / name
            path.write_text(textwrap.dedent(text))
            path.chmod(0o755)

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "STATE": str(self.state), "LAG": str(LAG)}

    def mode(self, name: str, mode: str) -> None:
        (self.state / f"{name}.mode").write_text(mode)

    def running(self, name: str) -> bool:
        return (self.state / f"{name}.running").exists()

    def db_pid(self) -> int | None:
        try:
            return int((self.state / "db.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def db_process_alive(self) -> bool:
        pid = self.db_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a killed child of an exited shell is reaped by init; a zombie is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"

    def kill_db(self) -> None:
        pid = self.db_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    g = Guest(tmp_path / "guest")
    yield g
    g.kill_db()


def make_services(tmp_path: Path, guest: Guest) -> Services:
    prefix = ["env", *(f"{k}={v}" for k, v in guest.env().items())]
    config = write_config(
        tmp_path / "c.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
            "vms.db1": {"hypervisor": "lab"},
            "vms.db1.guest": {
                "transport": "exec",
                "exec_prefix": prefix,
                "services": ["web"],
                "database": "db",
                "stop_timeout": 6.0,  # verification waits up to 4 s: well above LAG
                "start_timeout": 6.0,
            },
        },
    )
    guest_table = load_config(str(config)).vm("db1").guest
    assert guest_table is not None
    transport = ExecTransport(prefix, vm="db1")
    transport.open()
    return Services(transport, guest_table, vm="db1")


def _spawn_db(guest: Guest) -> None:
    subprocess.run([str(guest.bin / "service"), "db", "start"], env=guest.env(), check=True)


@pytest.fixture
def standin_services(tmp_path: Path, guest: Guest) -> Services:
    (guest.state / "web.running").touch()
    _spawn_db(guest)
    svc = make_services(tmp_path, guest)
    state = svc.probe()
    assert state.running == {"web": True, "db": True}
    return svc


def test_stop_returns_only_once_the_service_is_really_down(
    standin_services: Services, guest: Guest
) -> None:
    guest.mode("web", "lagging")
    window = ServiceWindow()
    standin_services.stop(["web"], window)
    assert not guest.running("web"), "stop returned while the service was still running"
    assert window.still_down == ["web"]


def test_a_stop_that_never_takes_effect_fails(standin_services: Services, guest: Guest) -> None:
    guest.mode("web", "stuck")
    with pytest.raises(GuestError, match="web still up"):
        standin_services.stop(["web"], ServiceWindow())


def test_database_stop_returns_only_once_the_server_process_is_gone(
    standin_services: Services, guest: Guest
) -> None:
    guest.mode("db", "lagging")
    assert guest.db_process_alive()
    standin_services.stop_database(ServiceWindow())
    assert not guest.db_process_alive(), "stop_database returned while the server still ran"
    assert not guest.running("db")


def test_start_returns_only_once_the_service_runs(standin_services: Services, guest: Guest) -> None:
    window = ServiceWindow()
    standin_services.stop(["web"], window)
    guest.mode("web", "lagging")
    standin_services.start(["web"], window)
    assert guest.running("web"), "start returned before the service was running"
    assert window.still_down == []


def test_a_start_that_exits_0_without_effect_is_a_service_not_restored(
    standin_services: Services, guest: Guest
) -> None:
    window = ServiceWindow()
    standin_services.stop(["web"], window)
    guest.mode("web", "stuck")
    with pytest.raises(ServiceNotRestored, match="web"):
        standin_services.start(["web"], window)
    assert window.still_down == ["web"]


def test_database_start_returns_only_once_it_answers(
    standin_services: Services, guest: Guest
) -> None:
    window = ServiceWindow()
    standin_services.stop_database(window)
    guest.mode("db", "lagging")
    standin_services.start_database(window)
    assert guest.running("db"), "start_database returned before mysqladmin ping answered"
    assert window.still_down == []


def test_a_database_start_without_effect_is_a_service_not_restored(
    standin_services: Services, guest: Guest
) -> None:
    window = ServiceWindow()
    standin_services.stop_database(window)
    guest.mode("db", "stuck")
    with pytest.raises(ServiceNotRestored, match="db"):
        standin_services.start_database(window)

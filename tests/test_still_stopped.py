"""The still-stopped check folded into the last stop's script (issue 28): with nothing between the
last stop and the snapshot, the database's stop script checks everything the run stopped at its
end, so the window pays no round trip for it. A service found running again fails the run on
the same step, with the same message, as the check on its own did; the service's lock still
makes a stop wait for another stop/start.

Three levels: the stand-in init scripts of tests/test_services.py (exec transport, real
processes), the loopback guest's real init scripts over SSH, and the CLI with the demo's
stand-in services (exec transport, libvirt's test driver)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from snapcoord.errors import GuestError
from snapcoord.guest import SshTransport
from snapcoord.hooks.guest.services import Services
from snapcoord.run import ServiceWindow
from tests import lab
from tests.cli_helpers import (
    DEMO_BIN,
    STAND_IN_SERVICES,
    json_lines,
    running_stand_ins,
    snapcoord,
    stand_in_guest,
)
from tests.guest_fixtures import (
    lab_services,  # noqa: F401 - fixture
    wait_for,
)
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture
from tests.test_guest_transport import table
from tests.test_services import (  # noqa: F401 - fixtures
    Guest,
    guest,
    lock_held,
    standin_services,
    transport,
)

CAME_BACK = "runs again although this run stopped it; the snapshot would not be consistent"


def count_runs(svc: Services) -> list[Sequence[str]]:
    """Record every command the services send to the guest."""
    sent: list[Sequence[str]] = []
    real_run = svc.transport.run

    def run(argv: Sequence[str], **kwargs: Any) -> Any:
        sent.append(argv)
        return real_run(argv, **kwargs)

    svc.transport.run = run  # type: ignore[method-assign]
    return sent


def starts_web_when_db_stops(guest: Guest) -> None:
    """``service db stop`` starts web again too (a cron job, a socket, another run's watchdog):
    a wrapper in front of the stand-in ``service``."""
    wrapper = guest.bin / "service"
    real = guest.bin / "service.real"
    wrapper.rename(real)
    wrapper.write_text(
        f'#!/bin/sh\n[ "$1 $2" = "db stop" ] && touch "$STATE/web.running"\nexec {real} "$@"\n'
    )
    wrapper.chmod(0o755)


# -- stand-in init scripts ----------------------------------------------------------------------


def test_the_last_stop_checks_and_the_check_step_needs_no_round_trip(
    standin_services: Services, guest: Guest
) -> None:
    svc = standin_services
    window = ServiceWindow()
    svc.stop(["web"], window)
    svc.stop_database(window, check=True)
    sent = count_runs(svc)
    svc.confirm_still_stopped()  # web and db are down: nothing to report, nothing sent
    assert sent == []
    assert not guest.running("web") and not guest.db_process_alive()
    svc.still_stopped()  # the check on its own (a freeze's thaw) always asks the guest
    assert len(sent) == 1


def test_a_service_back_before_the_folded_check_fails_the_check_step(
    standin_services: Services, guest: Guest
) -> None:
    svc = standin_services
    starts_web_when_db_stops(guest)
    window = ServiceWindow()
    svc.stop(["web"], window)
    svc.stop_database(window, check=True)  # the stop itself succeeded
    assert guest.running("web")
    sent = count_runs(svc)
    with pytest.raises(GuestError, match=f"db1: web {CAME_BACK}, so none was taken") as folded:
        svc.confirm_still_stopped()
    assert sent == []  # decided by the stop's own script
    with pytest.raises(GuestError) as alone:  # the check on its own says the same
        svc.still_stopped()
    assert len(sent) == 1
    assert folded.value.message == alone.value.message
    assert folded.value.hint == alone.value.hint


def test_a_folded_check_counts_only_for_what_it_checked(
    standin_services: Services, guest: Guest
) -> None:
    """Something stopped after the check (here: a stop without it) is not covered by its
    answer: the check step asks the guest again."""
    svc = standin_services
    window = ServiceWindow()
    svc.stop_database(window, check=True)
    svc.stop(["web"], window)
    sent = count_runs(svc)
    svc.confirm_still_stopped()
    assert len(sent) == 1


def test_a_start_drops_the_folded_answer(standin_services: Services, guest: Guest) -> None:
    """A start between the stop and the check (an unwind) means the answer is old: asked again,
    and web, started again and then "stopped" by the bookkeeping below, is found running."""
    svc = standin_services
    window = ServiceWindow()
    svc.stop(["web"], window)
    svc.stop_database(window, check=True)
    svc.start(["web"], window)
    assert svc.state is not None
    svc.state.stopped.insert(0, "web")
    sent = count_runs(svc)
    with pytest.raises(GuestError, match=f"db1: web {CAME_BACK}"):
        svc.confirm_still_stopped()
    assert len(sent) == 1


def test_a_held_lock_still_blocks_the_stop_that_checks(
    standin_services: Services, guest: Guest
) -> None:
    """Another stop/start of the database holds its lock: the last stop (with the check folded
    in) waits for it and fails after its wait, the database untouched; the check step then asks
    the guest on its own."""
    svc = standin_services
    lab.run(["mkdir", "-p", "-m", "0700", "/run/snapcoord"])
    # flock's child (the sleep) holds the lock too: the whole group is killed at the end
    holder = subprocess.Popen(
        ["flock", "/run/snapcoord/db.lock", "sleep", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: lock_held("/run/snapcoord/db.lock"), 10, "the holder to take the lock")
        with pytest.raises(GuestError, match="another stop/start of db still runs after 4 s"):
            svc.stop_database(ServiceWindow(), check=True)
        assert guest.db_process_alive() and guest.running("db")
        sent = count_runs(svc)
        with pytest.raises(GuestError, match=f"db1: db {CAME_BACK}"):
            svc.confirm_still_stopped()  # no folded answer: asked, and db does run
        assert len(sent) == 1
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        wait_for(lambda: not lock_held("/run/snapcoord/db.lock"), 10, "the lock to be free")


# -- the loopback guest's real init scripts ---------------------------------------------------


@pytest.fixture
def lab_svc(transport: SshTransport, ssh_guest: lab.SshGuest) -> Iterator[Services]:
    svc = Services(transport, table(ssh_guest), vm="lab")
    svc.probe()
    yield svc


def test_real_services_checked_at_the_end_of_the_database_stop(
    lab_svc: Services, lab_services: lab.GuestServices
) -> None:
    window = ServiceWindow()
    lab_svc.stop(["apache2", "cron"], window)
    lab_svc.stop_database(window, check=True)
    sent = count_runs(lab_svc)
    lab_svc.confirm_still_stopped()
    assert sent == []
    assert lab_services.states() == {"apache2": False, "cron": False, "mariadb": False}
    lab_svc.start_database(window)
    lab_svc.start(["apache2", "cron"], window)
    assert lab_services.all_running()


def test_a_real_service_running_again_is_reported_by_the_database_stop(
    lab_svc: Services, lab_services: lab.GuestServices
) -> None:
    """cron, which this run stopped, runs when the database's stop checks (here: it was never
    really stopped, as if something had started it again): the check step fails, no round
    trip."""
    assert lab_svc.state is not None
    lab_svc.state.stopped.append("cron")
    window = ServiceWindow()
    lab_svc.stop(["apache2"], window)
    lab_svc.stop_database(window, check=True)
    sent = count_runs(lab_svc)
    with pytest.raises(GuestError, match=f"lab: cron {CAME_BACK}"):
        lab_svc.confirm_still_stopped()
    assert sent == []
    lab_svc.start_database(window)
    lab_svc.start(["apache2"], window)
    assert lab_services.all_running()


# -- the whole run: CLI, stand-in services ----------------------------------------------------


def cron_back_when_mariadb_stops(tmp_path: Path) -> Path:
    """A ``service`` in front of the demo's: stopping mariadb starts cron again."""
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "service").write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "mariadb stop" ] && touch "$DEMO_STATE/cron.running"\n'
        f'exec {DEMO_BIN}/service "$@"\n'
    )
    (wrapper / "service").chmod(0o755)
    return wrapper


@pytest.mark.parametrize("frozen_hook", [False, True], ids=["folded", "on-its-own"])
def test_a_service_back_in_the_window_fails_the_run_alike_folded_or_not(
    tmp_path: Path, libvirt_node: str, frozen_hook: bool
) -> None:
    """Without a frozen hook the check is folded into the database's stop, with one it runs on
    its own after the hook: either way the run fails on "check services still stopped" with the
    same message and exit code, takes no snapshot, and starts everything again."""
    tables = {"vms.db1.hooks": {"frozen": ["true"]}} if frozen_hook else None
    config, state = stand_in_guest(
        tmp_path, libvirt_node, tables=tables, path_prefix=cron_back_when_mariadb_stops(tmp_path)
    )
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json")
    assert proc.returncode == 4, proc.stderr
    assert f"cron {CAME_BACK}, so none was taken" in proc.stderr
    (summary,) = json_lines(proc.stdout)
    failed = [s["name"] for s in summary["steps"] if s["ok"] is False and not s["undo"]]
    assert failed == ["check services still stopped"]
    assert "hypervisor snapshot" not in [s["name"] for s in summary["steps"]]
    assert summary["ok"] is False
    assert running_stand_ins(state) == STAND_IN_SERVICES


def test_the_dry_run_says_where_the_check_runs(tmp_path: Path, libvirt_node: str) -> None:
    config, _ = stand_in_guest(tmp_path, libvirt_node)
    folded = snapcoord("-c", str(config), "snapshot", "db1", "--dry-run")
    assert folded.returncode == 0, folded.stderr
    assert "checked at the end of the last stop's script" in folded.stdout + folded.stderr
    (tmp_path / "hooked").mkdir()
    hooked, _ = stand_in_guest(
        tmp_path / "hooked", libvirt_node, tables={"vms.db1.hooks": {"frozen": ["true"]}}
    )
    alone = snapcoord("-c", str(hooked), "snapshot", "db1", "--dry-run")
    assert alone.returncode == 0, alone.stderr
    assert "(one round trip)" in alone.stdout + alone.stderr

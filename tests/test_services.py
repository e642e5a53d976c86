"""hooks/services.py against the loopback guest's real init scripts, MariaDB, Apache and cron."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcoord.errors import PreflightError
from snapcoord.guest import SshTransport
from snapcoord.hooks.services import Services
from snapcoord.run import ServiceWindow
from tests import lab
from tests.cli_helpers import snapcoord, write_config
from tests.guest_fixtures import lab_services  # noqa: F401 - fixture
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
        time.sleep(0.3)  # the stopper holds the lock
        window = ServiceWindow()
        svc.start(["cron"], window)  # cron still runs: without the lock a no-op
        assert stopper.wait(timeout=30) == 0
        assert lab_services.running("cron")
        assert window.still_down == []
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait()


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
    assert "vms.db.guest.services" in proc.stderr and "must match" in proc.stderr

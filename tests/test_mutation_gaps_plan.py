"""The snapshot plan's unwind order on the real loopback guest: the database is started (and
answering) before the services that use it, so a web application never starts against a dead
database. Seen from outside: the processes' start times in /proc."""

from __future__ import annotations

from pathlib import Path

from tests import lab
from tests.cli_helpers import json_lines
from tests.guest_fixtures import (
    guest_config,
    lab_services,  # noqa: F401 - fixture
    run_observed,
)
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

PID_FILES = {"apache2": Path("/run/apache2/apache2.pid"), "cron": Path("/run/crond.pid")}


def start_ticks(pid: int) -> int:
    """When the process started (clock ticks since boot: /proc/PID/stat field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[19])


def service_started(name: str) -> int:
    return start_ticks(int(PID_FILES[name].read_text().split()[0]))


def test_database_is_started_before_the_services(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    before = {name: service_started(name) for name in PID_FILES}
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table())
    proc = run_observed("-c", str(config), "snapshot", "web1", "--json", observe=tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    (summary,) = json_lines(proc.stdout)
    assert summary["services_down"] == []
    assert lab_services.all_running()

    database = min(start_ticks(pid) for pid in lab.mysqld_pids())
    for name in PID_FILES:
        started = service_started(name)
        assert started != before[name], f"{name} was not restarted by the run"
        assert started > database, f"{name} was started before the database"

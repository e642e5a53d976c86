"""`snapcoord snapshot` end to end: the CLI in a child process, libvirt's test driver as the
hypervisor, and the loopback guest's real MariaDB, Apache and cron behind a real sshd.

The hypervisor adapter is the real libvirt adapter plus an observer (tests/guest_fixtures.py)
that looks at the guest from outside at the moment ``create_snapshot`` is called.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests import lab
from tests.cli_helpers import json_lines, snapcoord
from tests.guest_fixtures import (
    guest_config,
    lab_services,  # noqa: F401 - fixture
    observed,
    run_observed,
    watchdog_pids,
)
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

BROKEN_APACHE_CONF = Path("/etc/apache2/conf-enabled/zz-snapcoord-test-broken.conf")


def snapshot(config: Path, observe: Path, **kw: Any) -> tuple[int, dict[str, Any], str, float]:
    """Run ``snapshot web1 --json``; return (exit code, summary, stderr, seconds it took)."""
    started = time.monotonic()
    proc = run_observed("-c", str(config), "snapshot", "web1", "--json", observe=observe, **kw)
    seconds = time.monotonic() - started
    (summary,) = json_lines(proc.stdout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, summary, proc.stderr, seconds


def snapshot_events(observe: Path) -> list[dict[str, Any]]:
    return [e for e in observed(observe) if e["event"] == "create_snapshot"]


@pytest.mark.parametrize("login", ["root", "sudo"])
def test_database_is_down_when_the_hypervisor_snapshot_is_taken(
    login: str,
    ssh_guest: lab.SshGuest,
    sudo_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    libvirt_node: str,
) -> None:
    guest = ssh_guest if login == "root" else sudo_guest
    config = guest_config(tmp_path, libvirt_node, guest.guest_table())
    observe = tmp_path / "observe.jsonl"

    code, summary, stderr, seconds = snapshot(config, observe)

    assert code == 0, stderr
    assert summary["ok"] and summary["snapshot"].startswith("snapcoord-test-")
    (event,) = snapshot_events(observe)
    # At the moment of the hypervisor call, seen from outside the guest's own tooling:
    assert event["mysqld"] is False, "a mariadbd process was alive during the snapshot"
    assert event["apache2"] is False and event["cron"] is False
    assert event["name"] == summary["snapshot"]
    # ... and afterwards everything runs again, and MariaDB really was restarted.
    assert lab_services.states() == {"mariadb": True, "apache2": True, "cron": True}
    assert lab_services.mariadb_uptime() < seconds
    assert 0 < summary["window_seconds"] < seconds
    assert summary["services_down"] == []
    assert watchdog_pids(summary["run"]) == []  # disarmed
    assert not (tmp_path / "store" / "journal" / "web1.json").exists()


def test_exec_transport_brackets_the_snapshot_too(
    lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    # The guest is this machine: transport exec with a harmless argv prefix.
    guest = {
        "transport": "exec",
        "exec_prefix": ["env", "LC_ALL=C"],
        "services": ["apache2", "cron"],
        "database": "auto",
    }
    config = guest_config(tmp_path, libvirt_node, guest)
    observe = tmp_path / "observe.jsonl"
    code, _summary, stderr, seconds = snapshot(config, observe)
    assert code == 0, stderr
    (event,) = snapshot_events(observe)
    assert (event["mysqld"], event["apache2"], event["cron"]) == (False, False, False)
    assert lab_services.all_running()
    assert lab_services.mariadb_uptime() < seconds


def test_snapshot_failure_restores_services_and_exits_5(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table())
    observe = tmp_path / "observe.jsonl"
    code, summary, stderr, seconds = snapshot(config, observe, fail_snapshot=True)
    assert code == 5, stderr
    assert "datastore full" in stderr
    (event,) = snapshot_events(observe)
    assert event["mysqld"] is False  # it was attempted inside the window
    assert lab_services.all_running()
    assert lab_services.mariadb_uptime() < seconds
    assert summary["services_down"] == []
    assert watchdog_pids(summary["run"]) == []


def test_failing_frozen_hook_aborts_the_snapshot_and_restores_services(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    hooks = {"frozen": ["echo checking", "echo 'replica lag too high' >&2; exit 3"]}
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), hooks=hooks)
    observe = tmp_path / "observe.jsonl"
    code, _summary, stderr, seconds = snapshot(config, observe)
    assert code == 4, stderr
    assert "frozen hook #2 failed (exit 3): replica lag too high" in stderr
    assert snapshot_events(observe) == []  # no snapshot was taken
    assert lab_services.all_running()
    assert lab_services.mariadb_uptime() < seconds


def test_frozen_hook_runs_while_the_database_is_down(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    seen = tmp_path / "frozen.txt"
    hooks = {
        "before": [f"mysqladmin ping >/dev/null 2>&1 && echo before:up > {seen}"],
        "frozen": [
            f"mysqladmin ping >/dev/null 2>&1 && echo frozen:up >> {seen} || "
            f"echo frozen:down >> {seen}"
        ],
        "after": [f"mysqladmin ping >/dev/null 2>&1 && echo after:up >> {seen}"],
    }
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), hooks=hooks)
    code, _summary, stderr, _ = snapshot(config, tmp_path / "observe.jsonl")
    assert code == 0, stderr
    assert seen.read_text().split() == ["before:up", "frozen:down", "after:up"]


def test_failing_before_hook_changes_nothing(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    uptime = lab_services.mariadb_uptime()
    hooks = {"before": ["exit 9"]}
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), hooks=hooks)
    observe = tmp_path / "observe.jsonl"
    code, summary, stderr, _ = snapshot(config, observe)
    assert code == 4, stderr
    assert "before hook #1 failed (exit 9)" in stderr
    assert summary["window_seconds"] is None  # nothing was stopped
    assert snapshot_events(observe) == []
    assert lab_services.all_running()
    assert lab_services.mariadb_uptime() >= uptime
    assert watchdog_pids(summary["run"]) == []


def test_failing_after_hook_is_reported_but_the_snapshot_stands(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    hooks = {"after": ["echo 'cache warm-up failed' >&2; exit 1"]}
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), hooks=hooks)
    observe = tmp_path / "observe.jsonl"
    code, _summary, stderr, _ = snapshot(config, observe)
    assert code != 0
    assert "after hook #1 failed (exit 1): cache warm-up failed" in stderr
    assert len(snapshot_events(observe)) == 1
    assert lab_services.all_running()


def test_service_that_cannot_start_exits_6_naming_it(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    # Inside the window (Apache already stopped), its configuration breaks: it cannot start.
    hooks = {"frozen": [f"echo ThisIsNotAnApacheDirective > {BROKEN_APACHE_CONF}"]}
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), hooks=hooks)
    observe = tmp_path / "observe.jsonl"
    try:
        code, summary, stderr, seconds = snapshot(config, observe)
        apache_after = lab_services.running("apache2")
        # read before `recover` runs: its time must not count as the server's
        mariadb_uptime_after = lab_services.mariadb_uptime()
        armed_after = watchdog_pids(summary["run"])
    finally:
        BROKEN_APACHE_CONF.unlink(missing_ok=True)
    # `recover` starts apache2 and only then disarms the watchdog the run had to leave armed.
    recovered = snapcoord("-c", str(config), "recover", "web1")
    assert code == 6, stderr
    assert "apache2 could not be started" in stderr
    assert summary["services_down"] == ["apache2"] and summary["window_seconds"] is None
    assert "apache2 still down; the guest watchdog will start it at" in stderr
    assert apache_after is False
    # Everything else came back; the watchdog stayed armed: apache2 was down.
    assert lab_services.running("mariadb") and lab_services.running("cron")
    assert mariadb_uptime_after < seconds  # restarted during the run
    assert len(snapshot_events(observe)) == 1
    assert armed_after
    assert recovered.returncode == 0, recovered.stderr
    assert "apache2" in recovered.stdout and "disarmed the watchdog" in recovered.stdout
    assert watchdog_pids(summary["run"]) == []
    assert lab_services.all_running()


def test_changed_host_key_exits_4_and_stops_nothing(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    uptime = lab_services.mariadb_uptime()
    guest = ssh_guest.guest_table(known_hosts=str(ssh_guest.wrong_known_hosts))
    config = guest_config(tmp_path, libvirt_node, guest)
    observe = tmp_path / "observe.jsonl"
    code, summary, stderr, _ = snapshot(config, observe)
    assert code == 4, stderr
    assert "host key" in stderr.lower()
    assert summary["window_seconds"] is None
    assert snapshot_events(observe) == []
    assert lab_services.all_running()
    assert lab_services.mariadb_uptime() >= uptime


def test_service_stopped_before_the_run_stays_stopped(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    lab_services.stop("cron")
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table())
    observe = tmp_path / "observe.jsonl"
    code, _summary, stderr, seconds = snapshot(config, observe)
    assert code == 0, stderr
    (event,) = snapshot_events(observe)
    assert (event["mysqld"], event["apache2"]) == (False, False)
    assert lab_services.states() == {"mariadb": True, "apache2": True, "cron": False}
    assert lab_services.mariadb_uptime() < seconds


def test_database_stopped_before_the_run_stays_stopped(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    lab_services.stop("mariadb")
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table())
    code, _summary, stderr, _ = snapshot(config, tmp_path / "observe.jsonl")
    assert code == 0, stderr
    assert lab.mysqld_running() is False
    assert lab_services.running("apache2") and lab_services.running("cron")


@pytest.mark.parametrize("comes_back", ["cron", "mariadb"])
def test_a_service_that_comes_back_inside_the_window_fails_the_run(
    comes_back: str,
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    libvirt_node: str,
) -> None:
    """Something starts a stopped service again before the hypervisor call (a socket unit, a
    timer, a watchdog a revert brought back: here a frozen hook): no snapshot, exit 4, and
    everything runs afterwards."""
    start = f"service {comes_back} start >/dev/null 2>&1 || sudo -n service {comes_back} start"
    hooks = {"frozen": [start]}
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), hooks=hooks)
    observe = tmp_path / "observe.jsonl"
    code, summary, stderr, _seconds = snapshot(config, observe)
    assert code == 4, stderr
    assert f"{comes_back} runs again although this run stopped it" in stderr
    assert snapshot_events(observe) == []
    assert summary["ok"] is False
    assert lab_services.all_running()
    assert watchdog_pids(summary["run"]) == []

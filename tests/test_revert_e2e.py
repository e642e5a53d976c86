"""`snapcoord revert` end to end: safety snapshot first (unless --no-safety-snapshot), revert on
libvirt's test driver, then the loopback guest's configured services are made to run (a snapshot
with memory state resumes with them stopped: simulated by stopping them before the revert)."""

from __future__ import annotations

from pathlib import Path

from snapcoord.guest import SshTransport
from snapcoord.hooks.guest import watchdog
from tests import lab
from tests.cli_helpers import json_lines
from tests.guest_fixtures import (
    guest_config,
    lab_services,  # noqa: F401 - fixture
    observed,
    run_observed,
    wait_for,
    watchdog_pids,
)
from tests.libvirt_nodes import (
    NodeFactory,
    libvirt_node,  # noqa: F401 - fixture
    libvirt_node_factory,  # noqa: F401 - fixture
    naming_run,
)
from tests.test_guest_transport import table

TARGET = "snapcoord-manual-20260101T020000Z"  # a running-state snapshot of db1 in the node


def revert(config: Path, observe: Path, *extra: str) -> tuple[int, dict[str, object], str]:
    proc = run_observed(
        "-c", str(config), "revert", "db1", "--to", TARGET, "--yes", "--json", *extra,
        observe=observe,
    )  # fmt: skip
    (summary,) = json_lines(proc.stdout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, summary, proc.stderr


def test_revert_takes_a_safety_snapshot_and_starts_stopped_services(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    lab_services.stop("apache2")
    lab_services.stop("mariadb")
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), vm="db1")
    observe = tmp_path / "observe.jsonl"

    code, summary, stderr = revert(config, observe)

    assert code == 0, stderr
    events = observed(observe)
    assert [e["event"] for e in events] == ["create_snapshot", "revert_snapshot"]
    assert events[0]["name"].startswith("snapcoord-safety-")
    assert events[1]["name"] == TARGET
    assert any("safety snapshot" in note for note in summary["notes"])  # type: ignore[attr-defined]
    assert lab_services.states() == {"mariadb": True, "apache2": True, "cron": True}


def test_revert_without_safety_snapshot(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    lab_services.stop("cron")
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), vm="db1")
    observe = tmp_path / "observe.jsonl"

    code, _summary, stderr = revert(config, observe, "--no-safety-snapshot")

    assert code == 0, stderr
    assert [e["event"] for e in observed(observe)] == ["revert_snapshot"]
    assert lab_services.all_running()


def test_revert_with_a_service_that_cannot_start_exits_6(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    broken = Path("/etc/apache2/conf-enabled/zz-snapcoord-test-broken.conf")
    lab_services.stop("apache2")
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table(), vm="db1")
    try:
        broken.write_text("ThisIsNotAnApacheDirective\n")
        code, _summary, stderr = revert(config, tmp_path / "observe.jsonl", "--no-safety-snapshot")
    finally:
        broken.unlink(missing_ok=True)
    assert code == 6, stderr
    assert "apache2 could not be started" in stderr


SNAPSHOT_RUN = "20260101T020000Z-aaaaaa"  # the run that took TARGET (its description says so)
OTHER_RUN = "20260101T020000Z-bbbbbb"  # another coordinator's run, live in the guest


def test_revert_stops_watchdogs_the_snapshot_memory_brought_back(
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    libvirt_node_factory: NodeFactory,
) -> None:
    """A RAM snapshot holds the watchdog of the run that took it: after a revert it is alive
    again and would start services in the middle of the next run. The revert stops that run's
    watchdog (simulated: one armed before the revert) and says so; another run's watchdog (a
    live coordinator's) is left alone."""
    transport = SshTransport(table(ssh_guest), vm="lab")
    transport.open()
    try:
        dog, other = (
            watchdog.arm(
                transport,
                vm="lab",
                run_id=run,
                init="sysv",
                seconds=600,
                services=["cron"],
                database=None,
                sudo=False,
                timeout=30,
            )
            for run in (SNAPSHOT_RUN, OTHER_RUN)
        )
    finally:
        transport.close()
    try:
        assert lab.process_group(dog.pid), "the watchdog is not running"
        lab_services.stop("cron")  # the snapshot was taken with it stopped
        node = libvirt_node_factory(naming_run(TARGET, SNAPSHOT_RUN))
        config = guest_config(tmp_path, node, ssh_guest.guest_table(), vm="db1")
        code, summary, stderr = revert(config, tmp_path / "observe.jsonl", "--no-safety-snapshot")
        assert code == 0, stderr
        assert watchdog_pids(SNAPSHOT_RUN) == []
        wait_for(lambda: lab.process_group(dog.pid) == [], 5, "the watchdog's sleep to end")
        assert watchdog_pids(OTHER_RUN) == [other.pid], "another run's watchdog survives"
        notes = " ".join(summary["notes"])  # type: ignore[arg-type]
        assert f"stopped 1 snapcoord watchdog(s) that the revert brought back (pid {dog.pid})" in (
            notes
        )
        assert lab_services.all_running()
    finally:
        for pid in watchdog_pids(SNAPSHOT_RUN) + watchdog_pids(OTHER_RUN):
            lab.run(["kill", "-s", "TERM", "--", f"-{pid}"], check=False)

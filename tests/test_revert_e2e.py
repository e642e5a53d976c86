"""`snapcoord revert` end to end: safety snapshot first (unless --no-safety-snapshot), revert on
libvirt's test driver, then the loopback guest's configured services are made to run (a snapshot
with memory state resumes with them stopped: simulated by stopping them before the revert)."""

from __future__ import annotations

from pathlib import Path

from tests import lab
from tests.cli_helpers import json_lines
from tests.guest_fixtures import (
    guest_config,
    lab_services,  # noqa: F401 - fixture
    observed,
    run_observed,
)
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

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

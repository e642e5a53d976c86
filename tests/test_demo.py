"""`make demo` end to end (scripts/demo with this venv): its output shows the prune, the
parallel snapshot run, the status, and final listings that hold the snapshots it just took; and
the standalone double's extras the demo and bench/fleet.py use (--guests, --snapshot, stats)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from snapcoord.listing import LIST_LEGEND
from tests.cli_helpers import unstamped
from tests.pve_api.__main__ import STATS_PATH, StandaloneDouble, add_guests, max_overlap

REPO = Path(__file__).resolve().parent.parent
VMS = ("shop-db", "wiki-db", "web1")


def sections(output: str) -> list[tuple[str, list[str]]]:
    """[(command after '$ snapcoord ', its output lines)] in order. snapcoord's own lines
    (into a pipe here) each start with the time: checked and taken off."""
    found: list[tuple[str, list[str]]] = []
    for line in output.splitlines():
        if line.startswith("$ snapcoord "):
            found.append((line.removeprefix("$ snapcoord "), []))
        elif found and line.strip() and not line.startswith("# "):  # the script's own notes
            found[-1][1].append(unstamped(line))
    return found


def listing(lines: list[str]) -> dict[str, bool]:
    """`snapcoord list` lines -> {snapshot name: is current}."""
    assert lines[-1] == LIST_LEGEND, "the marks are explained below the listing"
    result = {}
    for line in lines[:-1]:
        match = re.fullmatch(r"(\*| )(s| ) \S+\s+(\S+)", line)
        assert match, line
        result[match[3]] = match[1] == "*"
    return result


def run_demo(folder: Path) -> str:
    """``scripts/demo`` with this venv into ``folder``: it must succeed; returns its stdout."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "demo"), str(Path(sys.executable).parent), str(folder)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    folder = tmp_path_factory.mktemp("demo") / "demo"
    found = sections(run_demo(folder))
    commands = [command for command, _ in found]
    assert commands == [
        "config check",
        "check --all",
        "list shop-db",
        "prune --all --dry-run",
        "prune --all",
        "snapshot shop-db --dry-run",
        "snapshot --all --parallel 3",
        "status",
        "list shop-db",
        "list wiki-db",
        "list web1",
    ]
    by_command = {command: lines for command, lines in found[:-3]}
    for command, lines in found[-3:]:
        by_command["final " + command] = lines
    return folder, by_command


def test_demo_checks_every_vm_before_the_first_run(
    demo: tuple[Path, dict[str, list[str]]],
) -> None:
    _, out = demo
    lines = out["check --all"]
    assert lines == [
        "shop-db: ready: watchdog, hypervisor, vm, privileges, snapshot, guest, services, clock",
        "wiki-db: ready: watchdog, hypervisor, vm, privileges, snapshot, guest, services, clock",
        "web1: ready: hypervisor, vm, privileges, snapshot",
        "check: 3 VMs: 3 ok (exit 0)",
    ]


def test_demo_prunes_what_the_policy_says(demo: tuple[Path, dict[str, list[str]]]) -> None:
    _, out = demo
    before = listing(out["list shop-db"])
    assert "before-upgrade" in before
    would = re.findall(
        r"^shop-db: would delete (\S+)$", "\n".join(out["prune --all --dry-run"]), re.M
    )
    deleted = re.findall(r"^shop-db: delete (\S+)$", "\n".join(out["prune --all"]), re.M)
    assert would and sorted(would) == sorted(deleted)
    assert all(name.startswith("snapcoord-nightly-") and name in before for name in deleted)
    assert set(before) - set(deleted) - {"before-upgrade"}, "the policy keeps some"
    final = listing(out["final list shop-db"])
    assert not set(deleted) & set(final)
    assert "before-upgrade" in final, "a foreign snapshot is never pruned"


def test_demo_ends_with_the_snapshots_it_took(demo: tuple[Path, dict[str, list[str]]]) -> None:
    _, out = demo
    lines = out["snapshot --all --parallel 3"]
    taken = {}
    for line in lines:
        match = re.match(r"([\w-]+): snapshot ok, snapshot (snapcoord-nightly-\w+)", line)
        if match:
            taken[match[1]] = match[2]
    assert set(taken) == set(VMS)
    assert lines[-1] == "snapshot: 3 VMs: 3 ok (exit 0)"
    assert any(
        line.startswith("shop-db: snapshot ok") and "service window" in line for line in lines
    )
    for vm in VMS:
        final = listing(out[f"final list {vm}"])
        assert final[taken[vm]] is True, f"{vm}: the new snapshot is listed and current"
    # the snapshot run pruned too (after services were back): one more day fell out on shop-db
    assert "pruned" in next(line for line in lines if line.startswith("shop-db: snapshot ok"))


def test_demo_status_matches_the_listings(demo: tuple[Path, dict[str, list[str]]]) -> None:
    _, out = demo
    status = {line.split(":")[0]: line for line in out["status"] if not line.startswith("status:")}
    assert set(status) == set(VMS)
    for vm in VMS:
        own = [name for name in listing(out[f"final list {vm}"]) if name.startswith("snapcoord-")]
        word = "snapshot" if len(own) == 1 else "snapshots"
        assert "last snapshot ok" in status[vm] and f"; {len(own)} {word}" in status[vm], status[vm]
    assert out["status"][-1] == "status: 3 VMs: 3 ok (exit 0)"


def test_demo_stops_the_double_and_keeps_secrets_off_the_command_line(
    demo: tuple[Path, dict[str, list[str]]],
) -> None:
    folder, _ = demo
    port = int((folder / "port").read_text())
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    secret = (folder / "token-secret").read_text().strip()
    assert (folder / "token-secret").stat().st_mode & 0o077 == 0
    assert secret not in (REPO / "scripts" / "demo").read_text()
    assert secret not in (folder / "snapcoord.toml").read_text()
    assert "verify_tls" not in (folder / "snapcoord.toml").read_text()


# -- the standalone double's extras -------------------------------------------------------------


def test_max_overlap() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # half-open: touching is not overlapping
    assert max_overlap([(0, 3), (1, 2), (1.5, 4), (3, 5)]) == 3


def test_stats_report_concurrent_snapshot_tasks() -> None:
    token_id, secret = "bench@pve!fleet", "s3cret-0000"
    double = StandaloneDouble(task_seconds=0.5, tokens={token_id: secret})
    add_guests(double.cluster, 5, "fleet")
    double.start()
    try:
        base = f"http://127.0.0.1:{double.port}"
        headers = {"Authorization": f"PVEAPIToken={token_id}={secret}"}

        def snapshot(vmid: int, node: str) -> None:
            url = f"{base}/api2/json/nodes/{node}/qemu/{vmid}/snapshot"
            reply = requests.post(url, data={"snapname": "s1"}, headers=headers, timeout=5)
            assert reply.status_code == 200, reply.text

        guests = [(g.vmid, g.node) for g in double.cluster.guests.values() if g.vmid >= 1000]
        extra = [g for g in double.cluster.guests.values() if g.vmid >= 1000]
        assert [(g.vmid, g.name, g.node) for g in extra[:4]] == [
            (1000, "fleet0001", "pve1"),
            (1001, "fleet0002", "pve2"),
            (1002, "fleet0003", "pve3"),
            (1003, "fleet0004", "pve1"),
        ]
        threads = [threading.Thread(target=snapshot, args=guest) for guest in guests[:3]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = requests.get(base + STATS_PATH, timeout=5).json()
        assert stats == {"tasks": {"qmsnapshot": {"count": 3, "max_running": 3}}}
        assert requests.get(base + "/api2/json/_double/stats", timeout=5).status_code == 401
    finally:
        double.stop()


# -- on a systemd host -------------------------------------------------------------------------

RECORDER = """#!/bin/sh
echo "$0 $*" >> {log}
exit 1
"""


@pytest.fixture
def systemd_host(tmp_path: Path) -> Iterator[Path]:
    """This worker's lab sandbox made to look like a systemd host (``/run/systemd/system`` in
    its private /run), with the real ``systemctl`` and ``service`` replaced, in its own mount
    namespace only, by a recorder that logs every call and fails. Yields the recorder's log."""
    from tests import lab

    lab.require_root()
    log = tmp_path / "real-init-calls.log"
    recorder = tmp_path / "recorder"
    recorder.write_text(RECORDER.format(log=log))
    recorder.chmod(0o755)
    marker = Path("/run/systemd/system")
    made = [d for d in (marker.parent, marker) if not d.exists()]  # removed after, innermost first
    marker.mkdir(parents=True, exist_ok=True)
    mounted: list[str] = []
    try:
        for real in ("/usr/bin/systemctl", "/usr/sbin/service"):
            if Path(real).exists():
                subprocess.run(["mount", "--bind", str(recorder), real], check=True)
                mounted.append(real)
        yield log
    finally:
        for real in mounted:
            subprocess.run(["umount", real], check=True)
        for folder in reversed(made):
            folder.rmdir()


def test_the_demo_on_a_systemd_host_touches_no_real_service(
    systemd_host: Path, tmp_path: Path
) -> None:
    """On a systemd machine the guest scripts choose systemd; the demo's stand-in guest brings
    its own ``systemctl``, so the host's init system is never called, and the demo runs through
    to the listings (it once stopped and started the host's real Apache and cron)."""
    folder = tmp_path / "demo"
    assert [command for command, _ in sections(run_demo(folder))][-3:] == [
        "list shop-db",
        "list wiki-db",
        "list web1",
    ]
    assert not systemd_host.exists(), "the host's systemctl or service was called: " + (
        systemd_host.read_text() if systemd_host.exists() else ""
    )
    for vm in ("shop-db", "wiki-db"):
        state = folder / "state" / vm
        calls = (state / "systemctl.log").read_text().splitlines()
        assert "stop -- apache2" in calls and "start -- apache2" in calls, calls
        assert {p.name for p in state.glob("*.running")} == {
            "apache2.running",
            "cron.running",
            "mariadb.running",
        }

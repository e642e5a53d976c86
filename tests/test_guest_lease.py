"""One guest, one coordinator at a time (hooks/guest/lease.py, docs/lease.md).

Two coordinators — two configurations with stores of their own, so neither sees the other's VM
lock — bracket the same loopback guest (real sshd, MariaDB, Apache, cron). Checked in the guest:
its lease file, its processes, its services."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord.hooks.guest import lease
from tests import lab
from tests.cli_helpers import json_lines, snapcoord
from tests.guest_fixtures import (
    guest_config,
    lab_services,  # noqa: F401 - fixture
    observed,
    popen_observed,
    run_observed,
    wait_for,
    watchdog_pids,
)
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

pytestmark = pytest.mark.real

VM = "db1"
TARGET = "snapcoord-manual-20260101T020000Z"  # a running-state snapshot of db1 in the node
LEASE = Path(lease.LEASE_FILE)
LEASE_DIR = Path(lease.LEASE_DIR)
OTHER_RUN = "20260101T020000Z-bbbbbb"  # another coordinator's run, live in the guest


def coordinator(tmp_path: Path, name: str, node: str, guest: dict[str, Any]) -> Path:
    """A coordinator of its own: its configuration and its store in ``tmp_path/name``."""
    folder = tmp_path / name
    folder.mkdir()
    return guest_config(folder, node, guest, vm=VM)


def lease_now() -> lease.LeaseRecord | None:
    """The guest's lease as the lease module reads it, or None."""
    if not LEASE.exists():
        return None
    return lease.LeaseRecord.parse(LEASE.read_text().splitlines(), vm=VM)


def journal_run(config: Path) -> str:
    import json

    return str(json.loads((config.parent / "store" / "journal" / f"{VM}.json").read_text())["run"])


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def started_epoch(pid: int) -> float:
    """When process ``pid`` started, in epoch seconds (boot time + its start in clock ticks)."""
    btime = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    return btime + ticks / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def two(ssh_guest: lab.SshGuest, tmp_path: Path, libvirt_node: str) -> tuple[Path, Path]:
    table = ssh_guest.guest_table()
    return coordinator(tmp_path, "a", libvirt_node, table), coordinator(
        tmp_path, "b", libvirt_node, table
    )


def test_a_second_coordinator_is_refused_while_the_first_holds_the_guest(
    two: tuple[Path, Path], lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    first, second = two
    frozen = snapcoord("-c", str(first), "freeze", VM, "--max-seconds", "300")
    assert frozen.returncode == 0, frozen.stderr
    try:
        run = journal_run(first)
        held = lease_now()
        assert held is not None and held.run == run and held.command == "freeze"
        down = lab_services.states()
        assert not any(down.values()), down

        # the second coordinator: refused (75) before it changes anything, naming the holder
        refused = snapcoord("-c", str(second), "snapshot", VM, "--json")
        assert refused.returncode == 75, refused.stdout + refused.stderr
        line = one_error_line(refused)
        assert f"{VM}: the guest is held by another coordinator: " in line
        assert f"pid {held.pid}, run {run} (freeze) since {lease.utc(held.since)}" in line
        (summary,) = json_lines(refused.stdout)
        steps = {s["name"]: s["ok"] for s in summary["steps"] if not s["undo"]}
        assert steps["take guest lease"] is False
        assert "arm guest watchdog" not in steps and "stop services" not in steps
        assert lab_services.states() == down, "the second coordinator touched the services"

        # a revert is refused before the hypervisor is asked to revert
        observe = tmp_path / "revert.jsonl"
        reverted = run_observed(
            "-c", str(second), "revert", VM, "--to", TARGET, "--yes", "--no-safety-snapshot",
            observe=observe,
        )  # fmt: skip
        assert reverted.returncode == 75, reverted.stdout + reverted.stderr
        assert run in one_error_line(reverted)
        assert observed(observe) == []

        # the first coordinator's own second run meets its own VM lock, as before
        own = snapcoord("-c", str(first), "snapshot", VM)
        assert own.returncode == 75
        assert "locked by run" in one_error_line(own)
        assert lease_now() == held, "nobody changed the lease"
    finally:
        thawed = snapcoord("-c", str(first), "thaw", VM)
    assert thawed.returncode == 0, thawed.stderr
    assert lease_now() is None, "thaw released the lease"
    assert lab_services.all_running()

    after = snapcoord("-c", str(second), "snapshot", VM, "--json")
    assert after.returncode == 0, after.stderr
    assert lease_now() is None
    assert lab_services.all_running()


def test_a_killed_coordinators_lease_ends_no_later_than_its_watchdog(
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    libvirt_node: str,
) -> None:
    table = ssh_guest.guest_table(watchdog_seconds=40, stop_timeout=8.0)
    first = coordinator(tmp_path, "a", libvirt_node, table)
    second = coordinator(tmp_path, "b", libvirt_node, ssh_guest.guest_table())
    observe = tmp_path / "a.jsonl"
    proc = popen_observed(
        "-c", str(first), "snapshot", VM, observe=observe, snapshot_seconds=600
    )  # fmt: skip
    try:
        wait_for(lambda: observed(observe), 90, "the first coordinator's snapshot call")
        held = lease_now()
        assert held is not None and held.command == "snapshot" and held.pid == proc.pid
        [dog] = watchdog_pids(held.run)
        fires = started_epoch(dog) + 40
        proc.send_signal(signal.SIGKILL)  # mid-window: everything stopped, no undo runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the lease was renewed right before the watchdog was armed, on the guest's clock; the
    # clock's whole seconds and the start time's boot-second base each round by under 1 s
    assert held.expires <= fires + 1, (held.expires, fires)
    assert not any(lab_services.states().values())

    refused = snapcoord("-c", str(second), "snapshot", VM)
    assert refused.returncode == 75, refused.stdout + refused.stderr
    assert f"run {held.run} (snapshot)" in one_error_line(refused)
    assert lease_now() == held, "the dead holder's lease stands until it ends"

    # the watchdog of the dead run starts everything and ends; by then its lease has ended too
    wait_for(lambda: watchdog_pids(held.run) == [], 90, "the dead run's watchdog to fire and end")
    wait_for(lab_services.all_running, 60, "the watchdog to start every service")
    assert time.time() >= held.expires
    after = snapcoord("-c", str(second), "snapshot", VM, "--json")
    assert after.returncode == 0, after.stderr
    (summary,) = json_lines(after.stdout)
    assert any(f"took over the guest lease of {held.host} pid {held.pid}" in n and "expired" in n
               for n in summary["notes"]), summary["notes"]  # fmt: skip
    assert lease_now() is None
    assert lab_services.all_running()


VALID = "host h1\npid 4242\nrun 20260101T020000Z-cccccc\ncommand snapshot\nsince 1\nexpires 2\n"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("garbage\n", "line 1 is not one of host, pid, run, command, since, expires"),
        (VALID.replace("pid 4242", "pid 42x"), "its pid is not what snapcoord writes"),
        (VALID.replace("cccccc", "$(reboot)"), "its run is not what snapcoord writes"),
        (VALID + "pid 1\n", "pid appears twice"),
        (VALID.replace("expires 2\n", ""), "no expires"),
        ("x" * 5000, "it is longer than 1024 bytes"),
        (None, "it is not a plain file"),  # a link to /etc/passwd
    ],
)
def test_a_corrupt_lease_file_is_one_line_and_nothing_is_stopped(
    two: tuple[Path, Path],
    lab_services: lab.GuestServices,
    content: str | None,
    problem: str,
) -> None:
    first, _ = two
    LEASE_DIR.mkdir(mode=0o700, exist_ok=True)
    if content is None:
        LEASE.symlink_to("/etc/passwd")
    else:
        LEASE.write_text(content)
    mysqld = lab.mysqld_pids()
    try:
        proc = snapcoord("-c", str(first), "snapshot", VM)
        assert proc.returncode == 4, proc.stdout + proc.stderr
        line = one_error_line(proc)
        assert f"the guest's lease file {LEASE} is not one snapcoord wrote ({problem})" in line
        assert f"rm {LEASE}" in line
        assert lab_services.all_running() and lab.mysqld_pids() == mysqld
        if content is None:
            assert LEASE.is_symlink()
        else:
            assert LEASE.read_text() == content, "the corrupt file was left as it was"
    finally:
        LEASE.unlink(missing_ok=True)


@pytest.fixture
def planted() -> Iterator[None]:
    """The test plants something at the lease directory; removed afterwards."""
    lab.clear_guest_lease()
    if LEASE_DIR.is_dir() and not LEASE_DIR.is_symlink():
        shutil.rmtree(LEASE_DIR)  # also the agent transport's channel folder, if a test made it
    try:
        yield
    finally:
        if LEASE_DIR.is_symlink():
            LEASE_DIR.unlink()
        elif LEASE_DIR.is_dir():
            shutil.rmtree(LEASE_DIR)


@pytest.mark.parametrize(
    ("plant", "problem"),
    [
        ("nobody", f"{LEASE_DIR} belongs to uid 65534, not uid 0"),
        ("world", f"{LEASE_DIR} is writable by others (mode 777)"),
        ("link", f"{LEASE_DIR} is a symbolic link"),
    ],
)
def test_a_lease_directory_planted_by_another_user_is_refused(
    two: tuple[Path, Path],
    lab_services: lab.GuestServices,
    planted: None,
    tmp_path: Path,
    plant: str,
    problem: str,
) -> None:
    first, _ = two
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    if plant == "link":
        LEASE_DIR.symlink_to(target)
    else:
        LEASE_DIR.mkdir()
        if plant == "nobody":
            os.chown(LEASE_DIR, 65534, 65534)
            LEASE_DIR.chmod(0o700)
        else:
            LEASE_DIR.chmod(0o777)
    mysqld = lab.mysqld_pids()
    proc = snapcoord("-c", str(first), "snapshot", VM)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert f"the guest lease cannot be taken safely: {problem}" in line
    assert lab_services.all_running() and lab.mysqld_pids() == mysqld
    # nothing was written through it
    assert list(target.iterdir()) == []
    if plant != "link":
        assert list(LEASE_DIR.iterdir()) == []


def marked_session(run: str) -> subprocess.Popen[bytes]:
    """A stand-in for a pause's lock session of run ``run``: its argv carries the marker as
    the MySQL client's does (``--init-command=SET @snapcoord_session = 'snapcoord-pause:RUN'``)."""
    marker = f"--init-command=SET @snapcoord_session = 'snapcoord-pause:{run}'"
    return subprocess.Popen(["sh", "-c", "sleep 600; :", "mariadb", marker], start_new_session=True)


def test_recover_and_revert_end_only_their_own_runs_processes(
    two: tuple[Path, Path],
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    """Another coordinator's watchdog and lock session (run OTHER_RUN, live in the guest)
    survive our recover and our revert; our own killed run's watchdog is disarmed by recover."""
    from snapcoord.guest import SshTransport
    from snapcoord.hooks.guest import watchdog
    from tests.test_guest_transport import table

    first, _ = two
    transport = SshTransport(table(ssh_guest), vm="lab")
    transport.open()
    try:
        other = watchdog.arm(
            transport, vm="lab", run_id=OTHER_RUN, init="sysv", seconds=600,
            services=["cron"], database=None, sudo=False, timeout=30,
        )  # fmt: skip
    finally:
        transport.close()
    session = marked_session(OTHER_RUN)
    try:
        # our run, killed inside its window: its journal, its watchdog and its lease stay
        observe = tmp_path / "a.jsonl"
        proc = popen_observed("-c", str(first), "snapshot", VM, observe=observe,
                              snapshot_seconds=600)  # fmt: skip
        wait_for(lambda: observed(observe), 90, "our snapshot call")
        ours = journal_run(first)
        assert watchdog_pids(ours)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

        recovered = snapcoord("-c", str(first), "recover", VM)
        assert recovered.returncode == 0, recovered.stderr
        assert "disarmed the watchdog" in recovered.stdout
        assert watchdog_pids(ours) == []
        assert lease_now() is None, "recover took over its run's lease and released it"
        assert lab_services.all_running()
        assert watchdog_pids(OTHER_RUN) == [other.pid], "recover left the other run's watchdog"

        reverted = run_observed(
            "-c", str(first), "revert", VM, "--to", TARGET, "--yes", "--no-safety-snapshot",
            "--json", observe=tmp_path / "revert.jsonl",
        )  # fmt: skip
        assert reverted.returncode == 0, reverted.stderr
        (summary,) = json_lines(reverted.stdout)
        assert not any("lock session" in n or "watchdog" in n for n in summary["notes"])
        assert watchdog_pids(OTHER_RUN) == [other.pid], "revert left the other run's watchdog"
        assert session.poll() is None, "revert left the other run's lock session"
        assert lease_now() is None
    finally:
        os.killpg(session.pid, signal.SIGKILL)
        session.wait()
        for pid in watchdog_pids(OTHER_RUN):
            os.killpg(pid, signal.SIGKILL)


def test_revert_ends_the_lock_session_of_the_run_that_took_the_snapshot(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path
) -> None:
    """The snapshot's own run (its description: run=...) is the one whose processes a RAM
    snapshot brings back: its lock session ends, another run's does not."""
    from tests.libvirt_nodes import naming_run, write_node

    own = "20260101T020000Z-aaaaaa"
    node = write_node(tmp_path / "node", naming_run(TARGET, own))
    config = coordinator(tmp_path, "a", node, ssh_guest.guest_table())
    resurrected, other = marked_session(own), marked_session(OTHER_RUN)
    try:
        proc = run_observed(
            "-c", str(config), "revert", VM, "--to", TARGET, "--yes", "--no-safety-snapshot",
            "--json", observe=tmp_path / "revert.jsonl",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        (summary,) = json_lines(proc.stdout)
        assert any(
            f"pid {resurrected.pid}" in n and "lock session" in n for n in summary["notes"]
        ), summary["notes"]
        resurrected.wait(timeout=10)
        assert other.poll() is None, "another run's lock session survives"
    finally:
        for child in (resurrected, other):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def test_the_reliability_page_has_the_two_coordinator_rows() -> None:
    """docs/reliability.md's section names this module's tests, each of which exists."""
    from tests.cli_helpers import REPO
    from tests.test_fault_matrix import TWO_COORDINATORS, two_coordinators_section

    text = (REPO / "docs" / "reliability.md").read_text()
    assert "\n".join(two_coordinators_section()) in text
    for *_, name in TWO_COORDINATORS:
        assert callable(globals().get(name)), name

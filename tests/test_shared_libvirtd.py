"""tests/libvirtd.py's SharedLibvirtd: one daemon for every pytest session on a machine, started
by the first, stopped by the last, and never one the lab did not start. Real processes stand in
for the daemons (a ``sleep`` that marks itself ready), so this runs without libvirt."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvirtd import SharedLibvirtd, _start_time


def shared(directory: Path, ready: Path) -> SharedLibvirtd:
    daemon = ["sh", "-c", f"touch {ready}; exec sleep 300"]
    return SharedLibvirtd(
        "test:///default",
        str(directory),
        daemons=[(daemon, lambda: False)],
        answers=ready.exists,
    )


def recorded(directory: Path) -> list[int]:
    record = directory / "daemons"
    return (
        [int(line.split()[0]) for line in record.read_text().splitlines()]
        if record.exists()
        else []
    )


def alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is ours and gone
    return _start_time(pid) is not None


def test_the_first_session_starts_it_and_the_last_one_stops_it(tmp_path: Path) -> None:
    directory, ready = tmp_path / "shared", tmp_path / "ready"
    first, second = shared(directory, ready), shared(directory, ready)
    first.acquire(timeout=10)
    [pid] = recorded(directory)
    assert ready.exists() and alive(pid)
    second.acquire(timeout=10)
    assert recorded(directory) == [pid], "the second session reuses it"
    first.release()  # the one that started it ends first: the other still uses it
    assert alive(pid)
    second.release()  # the last one stops it, by the PID and start time the lab recorded
    assert not alive(pid)
    assert not (directory / "daemons").exists()


def test_a_daemon_the_lab_did_not_start_is_never_stopped(tmp_path: Path) -> None:
    directory, ready = tmp_path / "shared", tmp_path / "ready"
    theirs = subprocess.Popen(["sleep", "300"])
    try:
        ready.touch()  # it answers already: someone else's libvirtd
        session = shared(directory, ready)
        session.acquire(timeout=10)
        assert recorded(directory) == []
        session.release()
        assert theirs.poll() is None
    finally:
        theirs.kill()
        theirs.wait()


def test_a_recorded_pid_that_now_belongs_to_another_process_is_left_alone(
    tmp_path: Path,
) -> None:
    directory, ready = tmp_path / "shared", tmp_path / "ready"
    other = subprocess.Popen(["sleep", "300"])
    try:
        directory.mkdir(mode=0o700)
        (directory / "daemons").write_text(f"{other.pid} 1\n")  # the daemon's start time was 1
        session = shared(directory, ready)
        ready.touch()
        session.acquire(timeout=10)
        session.release()
        assert other.poll() is None, "a reused PID is not the daemon the lab started"
    finally:
        other.kill()
        other.wait()


@pytest.fixture(autouse=True)
def _no_daemon_left(tmp_path: Path) -> Iterator[None]:
    yield
    for pid in recorded(tmp_path / "shared"):
        if alive(pid):
            os.kill(pid, 9)

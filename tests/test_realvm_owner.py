"""Whose real guest is it? A session holds a lock beside its overlay for as long as its domain
lives; another session (in its own lab sandbox, so its own PID namespace, where the owner's PID
means nothing) reaps only domains whose lock it can take."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.realvm_guest import _owner_alive, _owner_lock


def test_a_held_lock_is_a_live_owner_and_a_released_one_is_not(tmp_path: Path) -> None:
    overlay = tmp_path / "snapcoord-realvm-0000.qcow2"
    fd = _owner_lock(overlay)
    try:
        assert _owner_alive(overlay, "1", "0")
    finally:
        os.close(fd)
    assert not _owner_alive(overlay, str(os.getpid()), "whatever")
    assert not overlay.with_name(overlay.name + ".owner").exists()  # the reaper cleans it up


def test_an_owner_in_another_pid_namespace_is_alive(tmp_path: Path) -> None:
    """The case that reaped live guests before: the owner's PID is not visible here."""
    overlay = tmp_path / "snapcoord-realvm-0001.qcow2"
    lock = overlay.with_name(overlay.name + ".owner")
    script = f"exec 9>{lock}; flock -n 9 || exit 3; echo held; read _"
    owner = subprocess.Popen(
        ["unshare", "--pid", "--fork", "sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "held"
        assert _owner_alive(overlay, "999999", None)  # no such PID here, yet alive
    finally:
        assert owner.stdin is not None
        owner.stdin.close()
        owner.wait(10)
    assert not _owner_alive(overlay, "999999", None)


def test_a_domain_from_before_the_lock_falls_back_to_its_pid(tmp_path: Path) -> None:
    overlay = tmp_path / "snapcoord-realvm-0002.qcow2"
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    assert _owner_alive(overlay, str(os.getpid()), start)
    assert not _owner_alive(overlay, str(os.getpid()), "0")

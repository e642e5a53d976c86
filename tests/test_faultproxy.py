"""The tests' fault proxy (tests/faultproxy.py) against the real lab sshd and a real ``ssh``:
a cut kills a ControlMaster and a new ssh connects at once, refuse keeps new ssh out for its
time, stall makes a command hang and then complete; all switchable from another process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests import lab
from tests.cli_helpers import REPO
from tests.faultproxy import FaultProxy, control, known_hosts_for
from tests.guest_fixtures import wait_for

pytestmark = pytest.mark.real


@pytest.fixture
def proxy(ssh_guest: lab.SshGuest) -> Iterator[FaultProxy]:
    with FaultProxy((ssh_guest.host, ssh_guest.port)) as running:
        yield running


@pytest.fixture
def via(ssh_guest: lab.SshGuest, proxy: FaultProxy, tmp_path: Path) -> lab.SshGuest:
    """The lab guest reached through the proxy, its host key verified for the proxy's port."""
    known = known_hosts_for(
        ssh_guest.workdir / "host_ed25519.pub", proxy.port, tmp_path / "known_hosts"
    )
    return replace(ssh_guest, port=proxy.port, known_hosts=known)


def ssh_argv(guest: lab.SshGuest, *options: str, command: tuple[str, ...] = ()) -> list[str]:
    """``guest.ssh_argv`` with extra ``ssh`` options (``-o ...``, ``-N``) before the host."""
    argv = guest.ssh_argv()
    argv[-1:-1] = list(options)
    return [*argv, "--", *command] if command else argv


def master_options(path: Path) -> tuple[str, ...]:
    return ("-o", f"ControlPath={path}", "-o", "ControlMaster=no")


def start_master(guest: lab.SshGuest, path: Path) -> subprocess.Popen[bytes]:
    """A ControlMaster connection in the foreground (-N), so the test owns its PID."""
    proc = subprocess.Popen(
        ssh_argv(guest, "-o", "ControlMaster=yes", "-o", f"ControlPath={path}", "-N"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"ssh master exited {proc.returncode}: {proc.communicate()[1]!r}")
        check = ssh_argv(guest, *master_options(path), "-O", "check")
        return lab.run(check, check=False, timeout=10).returncode == 0

    wait_for(up, 20, "the ssh ControlMaster")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        lab.stop_pid(proc.pid, proc)
    else:
        proc.wait()


def test_forwards_to_sshd_and_the_host_key_is_verified_for_the_proxy_address(
    via: lab.SshGuest, ssh_guest: lab.SshGuest, proxy: FaultProxy
) -> None:
    assert proxy.address == ("127.0.0.1", proxy.port)  # loopback only
    assert proxy.port != ssh_guest.port
    out = lab.run(via.ssh_argv("echo", "through the proxy"), timeout=30)
    assert out.stdout.strip() == "through the proxy"
    # The lab's own known_hosts names the sshd's port, not the proxy's: strict checking refuses.
    wrong = lab.run(via.ssh_argv("true", known_hosts=ssh_guest.known_hosts), check=False)
    assert wrong.returncode == 255
    assert "host key verification failed" in wrong.stderr.lower()
    wait_for(lambda: proxy.stats()["active"] == 0, 10, "both connections to end")
    stats = proxy.stats()
    assert stats["accepted"] == 2 and stats["closed"] == 2 and stats["cut"] == 0


def test_cut_kills_a_control_master_and_a_new_ssh_connects_at_once(
    via: lab.SshGuest, proxy: FaultProxy, tmp_path: Path
) -> None:
    path = tmp_path / "cm"
    master = start_master(via, path)
    try:
        muxed = lab.run(ssh_argv(via, *master_options(path), command=("echo", "muxed")))
        assert muxed.stdout.strip() == "muxed"
        assert proxy.stats()["accepted"] == 1  # the command rode on the master's connection

        assert proxy.cut() == 1

        master.wait(timeout=10)  # the master noticed at once and ended
        assert master.returncode == 255
        started = time.monotonic()
        again = lab.run(via.ssh_argv("echo", "again"), timeout=30)
        assert again.stdout.strip() == "again"
        assert time.monotonic() - started < 5
        stats = proxy.stats()
        assert stats["cut"] == 1 and stats["accepted"] == 2  # a reconnect happened
        assert [f["fault"] for f in stats["faults"]] == ["cut"]
    finally:
        stop(master)


def test_refuse_keeps_new_ssh_out_until_the_time_is_over(
    via: lab.SshGuest, proxy: FaultProxy, tmp_path: Path
) -> None:
    path = tmp_path / "cm"
    master = start_master(via, path)
    try:
        started = time.monotonic()
        assert proxy.refuse(3) == 1
        master.wait(timeout=10)
        failures = 0
        while True:
            attempt = lab.run(via.ssh_argv("echo", "in"), check=False, timeout=30)
            if attempt.returncode == 0:
                break
            assert attempt.returncode == 255, attempt.stderr
            failures += 1
            assert time.monotonic() - started < 15, "still refused long after 3 s"
            time.sleep(0.2)
        assert time.monotonic() - started >= 2.9
        assert failures >= 3  # each refused attempt failed fast, not after a timeout
        stats = proxy.stats()
        assert stats["refused"] == failures and stats["cut"] == 1
        assert not stats["refusing"]
    finally:
        stop(master)


def test_stall_makes_commands_hang_then_they_complete(
    via: lab.SshGuest, proxy: FaultProxy, tmp_path: Path
) -> None:
    path = tmp_path / "cm"
    master = start_master(via, path)
    try:
        proxy.stall(3)
        started = time.monotonic()
        on_master = subprocess.Popen(
            ssh_argv(via, *master_options(path), command=("echo", "on-master")),
            stdout=subprocess.PIPE,
        )
        fresh = subprocess.Popen(via.ssh_argv("echo", "fresh"), stdout=subprocess.PIPE)
        time.sleep(1.5)
        assert on_master.poll() is None and fresh.poll() is None  # hanging, not failed
        assert proxy.stats()["stalled"]
        out_master, _ = on_master.communicate(timeout=30)
        out_fresh, _ = fresh.communicate(timeout=30)
        seconds = time.monotonic() - started
        assert (on_master.returncode, out_master.strip()) == (0, b"on-master")
        assert (fresh.returncode, out_fresh.strip()) == (0, b"fresh")
        assert 2.8 <= seconds < 10
        assert master.poll() is None  # a stall is not a cut: the master survived it
        assert proxy.stats()["cut"] == 0
    finally:
        stop(master)


def test_stall_can_be_resumed_early(via: lab.SshGuest, proxy: FaultProxy) -> None:
    proxy.stall(60)
    done: dict[str, float] = {}

    def run() -> None:
        lab.run(via.ssh_argv("true"), timeout=60)
        done["at"] = time.monotonic()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    time.sleep(1)
    assert "at" not in done
    resumed = time.monotonic()
    proxy.resume()
    worker.join(30)
    assert done["at"] - resumed < 5


def test_another_process_switches_faults_through_the_control_socket(
    via: lab.SshGuest, proxy: FaultProxy, tmp_path: Path
) -> None:
    def send(*words: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tests.faultproxy", "send", str(proxy.control_path), *words]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)

    path = tmp_path / "cm"
    master = start_master(via, path)
    try:
        assert send("cut").stdout.strip() == "ok"
        master.wait(timeout=10)  # the cut was in effect when "ok" came back
        assert send("refuse", "30").stdout.strip() == "ok"
        assert lab.run(via.ssh_argv("true"), check=False).returncode == 255
        stats = json.loads(send("stats").stdout.strip().removeprefix("ok "))
        assert stats["refusing"] and stats["refused"] == 1 and stats["cut"] == 1
        assert send("resume").stdout.strip() == "ok"
        assert lab.run(via.ssh_argv("true"), check=False).returncode == 0
        assert send("stall", "2").stdout.strip() == "ok"
        assert proxy.stalled
        bad = send("explode")
        assert bad.returncode != 0 and "unknown command" in bad.stderr
        # The same channel from this process, through the client function.
        assert control(proxy.control_path, "resume") == "ok"
        assert not proxy.stalled
        assert [f["fault"] for f in proxy.stats()["faults"]] == [
            "cut",
            "refuse",
            "resume",
            "stall",
            "resume",
        ]
    finally:
        stop(master)


def test_stop_cuts_everything_and_removes_the_control_socket(
    ssh_guest: lab.SshGuest, tmp_path: Path
) -> None:
    proxy = FaultProxy((ssh_guest.host, ssh_guest.port)).start()
    known = known_hosts_for(ssh_guest.workdir / "host_ed25519.pub", proxy.port, tmp_path / "kh")
    via = replace(ssh_guest, port=proxy.port, known_hosts=known)
    master = start_master(via, tmp_path / "cm")
    try:
        control_path = proxy.control_path
        assert control_path.exists()
        proxy.stop()
        master.wait(timeout=10)
        assert not control_path.exists() and not proxy.workdir.exists()
        assert lab.run(via.ssh_argv("true"), check=False).returncode == 255  # nobody listens
    finally:
        stop(master)
        proxy.stop()

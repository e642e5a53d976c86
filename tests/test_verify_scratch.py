"""snapcoord/verify/scratch.py in the lab sandbox (root, its own mount namespace): confined
processes are nobody without network or capabilities; the work folder goes whatever ends the
verify, leftovers of dead processes go, and no planted link is followed."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcoord.errors import VerifyUnavailable
from snapcoord.verify import scratch
from tests import lab

pytestmark = pytest.mark.real


@pytest.fixture
def verify_dir() -> Iterator[Path]:
    """A root-owned 0755 folder that nobody can traverse (pytest's tmp_path is 0700); no
    process of nobody outlives the test."""
    lab.require_root()
    path = Path(tempfile.mkdtemp(prefix="verify-dir-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
        assert not nobody_processes()
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def nobody_processes() -> list[int]:
    """Live processes of uid 65534 in this sandbox's PID namespace (only the tests' own)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        if status_field(status, "Uid").split()[0] == "65534" and not status_field(
            status, "State"
        ).startswith("Z"):
            found.append(int(entry))
    return found


def _confined_output(*argv: str) -> str:
    result = subprocess.run(scratch.confined(argv), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def status_field(status: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in status.splitlines()
                if line.startswith(name + ":"))  # fmt: skip


def test_a_confined_process_is_nobody_without_capabilities_network_or_environment() -> None:
    lab.require_root()
    assert _confined_output("id", "-u").strip() == "65534"
    assert _confined_output("id", "-G").strip() == "65534"
    status = _confined_output("cat", "/proc/self/status")
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status_field(status, caps), 16) == 0, caps
    assert status_field(status, "NoNewPrivs") == "1"
    devices = _confined_output("cat", "/proc/net/dev").splitlines()[2:]  # this netns's own
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]
    environment = _confined_output("env").splitlines()
    assert sorted(v.split("=", 1)[0] for v in environment) == ["HOME", "LC_ALL", "PATH"]
    assert _confined_output("pwd").strip() == "/"


def test_a_confined_process_cannot_reach_a_server_on_this_hosts_loopback() -> None:
    lab.require_root()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        probe = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
        result = subprocess.run(scratch.confined(["bash", "-c", probe]),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode != 0
        assert "connected" not in result.stdout
        # the same probe outside the confinement does connect: the test can tell
        outside = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
        assert outside.stdout.strip() == "connected"
    finally:
        listener.close()


@pytest.mark.parametrize("parent", ["/var/tmp", "/tmp"])
def test_a_confined_process_writes_only_in_its_folder_and_its_private_tmp(parent: str) -> None:
    """A hostile dump's shell escapes, ``INTO OUTFILE`` or ``COPY ... TO`` run as a confined
    process: nothing it writes outside its work folder outlives it. Every world-writable place
    is read-only or an empty tmpfs of its own (/tmp, /dev/shm); its work folder, in sight also
    under that fresh /tmp, is the one place that keeps what it writes. ``parent``: where
    verify_dir is (the default /var/tmp, and /tmp)."""
    lab.require_root()
    verify_dir = Path(tempfile.mkdtemp(prefix="verify-dir-", dir=parent))
    verify_dir.chmod(0o755)
    shared = Path(tempfile.mkdtemp(dir="/var/tmp"))  # another folder nobody may write in
    shared.chmod(0o1777)
    try:
        with scratch.workspace(verify_dir) as work:
            data = scratch.nobody_folder(work, "data")
            name = f"planted-{secrets.token_hex(4)}"  # nothing left by another run matches
            tries = {
                "tmp": f"/tmp/{name}",
                "dev-shm": f"/dev/shm/{name}",
                "var-tmp": f"/var/tmp/{name}",
                "shared": f"{shared}/{name}",
                "verify-dir": f"{verify_dir}/{name}",
                "own": f"{data}/kept",
            }
            script = "; ".join(
                f"if echo x > {path}; then echo {name} wrote; else echo {name} refused; fi"
                for name, path in tries.items()
            )
            script += f"; cat /tmp/{name}"  # its own /tmp works while it runs
            argv = scratch.confined(["sh", "-c", script], work=work, writable=True)
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            lines = result.stdout.splitlines()
            said = dict(line.split(" ", 1) for line in lines[: len(tries)])
            assert said == {"tmp": "wrote", "dev-shm": "wrote",
                            "var-tmp": "refused", "shared": "refused", "verify-dir": "refused",
                            "own": "wrote"}, result.stderr  # fmt: skip
            assert lines[len(tries) :] == ["x"]
            # what it wrote in /tmp and /dev/shm went with it; its own folder kept its file
            for path in [p for name, p in tries.items() if name != "own"]:
                assert not Path(path).exists(), path
            assert (data / "kept").read_text() == "x\n"
            assert (data / "kept").stat().st_uid == 65534
            # not writable: not even its own folder
            argv = scratch.confined(["sh", "-c", f"echo x > {data}/more"], work=work)
            bare = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert bare.returncode != 0 and "Read-only file system" in bare.stderr
            assert not (data / "more").exists()
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(shared), str(verify_dir)],
                       check=True)  # fmt: skip


def test_the_local_transport_runs_its_commands_confined(verify_dir: Path) -> None:
    with scratch.workspace(verify_dir) as work:
        result = scratch.transport(work, vm="lab").run(["id", "-u"], timeout=60)
    assert result.ok and result.stdout.strip() == b"65534"


def test_the_work_folder_is_private_and_goes_after_an_exception(verify_dir: Path) -> None:
    held: list[Path] = []
    with pytest.raises(RuntimeError, match="boom"), scratch.workspace(verify_dir) as work:
        held.append(work)
        info = os.lstat(work)
        assert (info.st_uid, info.st_mode & 0o7777) == (0, 0o711)
        assert work.name.startswith(f"snapcoord-verify.{os.getpid()}.")
        data = scratch.nobody_folder(work, "data")
        assert (os.lstat(data).st_uid, os.lstat(data).st_mode & 0o777) == (65534, 0o700)
        (data / "file").write_text("x")
        raise RuntimeError("boom")
    assert not held[0].exists()
    assert os.listdir(verify_dir) == []


def test_links_planted_by_the_server_user_are_removed_not_followed(verify_dir: Path) -> None:
    outside = verify_dir / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    with scratch.workspace(verify_dir) as work:
        data = scratch.nobody_folder(work, "data")
        planted = f"ln -s {outside} {data}/dir-link && ln -s {outside}/keep {data}/file-link"
        argv = scratch.confined(["sh", "-c", planted], work=work, writable=True)
        subprocess.run(argv, check=True, timeout=60)
        assert (data / "dir-link").is_symlink()
    assert not work.exists()
    assert (outside / "keep").read_text() == "precious"


def test_a_link_planted_at_the_work_folders_name_is_refused(
    verify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = verify_dir / "target"
    target.mkdir()
    (target / "keep").write_text("precious")
    monkeypatch.setattr(scratch, "_suffix", lambda: "abc123")
    link = verify_dir / f"snapcoord-verify.{os.getpid()}.abc123"
    link.symlink_to(target)
    taken = pytest.raises(VerifyUnavailable, match="every name tried was taken")
    with taken, scratch.workspace(verify_dir):
        pytest.fail("a work folder was made at a taken name")
    assert link.is_symlink() and (target / "keep").read_text() == "precious"
    assert target.stat().st_uid == 0 and oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_an_unsafe_verify_dir_is_refused(verify_dir: Path) -> None:
    link = verify_dir / "link"
    link.symlink_to(verify_dir)
    open_dir = verify_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    private = verify_dir / "private"
    private.mkdir(mode=0o700)
    for path, why in ((link, "is a link"), (open_dir, "not writable by others"),
                      (private, "cannot be reached by the user nobody"),
                      (Path("relative"), "not an absolute path")):  # fmt: skip
        with pytest.raises(VerifyUnavailable, match=why), scratch.workspace(path):
            pytest.fail(f"{path} was accepted")


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftovers_of_a_dead_process_go_and_those_of_a_live_one_stay(verify_dir: Path) -> None:
    dead = verify_dir / f"snapcoord-verify.{_dead_pid()}.0a1b2c"
    (dead / "data").mkdir(parents=True)
    (dead / "data" / "ibdata1").write_bytes(b"x" * 100)
    live = verify_dir / "snapcoord-verify.1.0a1b2c"  # PID 1: the sandbox's init, alive
    live.mkdir()
    target = verify_dir / "target"
    target.mkdir()
    (target / "keep").write_text("precious")
    dead_link = verify_dir / f"snapcoord-verify.{_dead_pid()}.ffffff"
    dead_link.symlink_to(target)
    other = verify_dir / "something-else.1234"
    other.mkdir()

    with scratch.workspace(verify_dir) as work:
        assert not dead.exists() and not os.path.lexists(dead_link)
        assert live.is_dir() and other.is_dir() and work.is_dir()
    assert (target / "keep").read_text() == "precious"
    assert scratch.remove_leftovers(verify_dir) == []
    assert sorted(os.listdir(verify_dir)) == sorted([live.name, "target", other.name])


HOLDER = """
import signal, sys, time
from pathlib import Path
from snapcoord.errors import Interrupted
from snapcoord.verify import scratch

def interrupted(signum, frame):
    raise Interrupted("interrupted by SIGTERM")

signal.signal(signal.SIGTERM, interrupted)
with scratch.workspace(Path(sys.argv[1])) as work:
    data = scratch.nobody_folder(work, "data")
    server = scratch.start(["sleep", "600"], work=work, log_file=work / "server.log")
    try:
        print(work, server.pid, flush=True)
        time.sleep(600)
    finally:
        scratch.stop(server, grace=5)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status_field(status, "Uid").split()[0])


def _hold(verify_dir: Path, script: str) -> tuple[subprocess.Popen[str], Path, int]:
    argv = [sys.executable, "-I", "-c", textwrap.dedent(script), str(verify_dir)]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    line = holder.stdout.readline().split()
    assert len(line) == 2, "the holder did not start"
    work, pid = Path(line[0]), int(line[1])
    assert work.is_dir() and _alive(pid)
    deadline = time.monotonic() + 30
    while _comm(pid) != "sleep" and time.monotonic() < deadline:  # through unshare, setpriv
        time.sleep(0.05)
    assert _uid(pid) == 65534
    return holder, work, pid


def test_sigterm_of_the_verify_removes_the_work_folder_and_stops_the_server(
    verify_dir: Path,
) -> None:
    holder, work, pid = _hold(verify_dir, HOLDER)
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=60) != 0
    assert not _alive(pid)
    assert not work.exists()
    assert os.listdir(verify_dir) == []


def test_sigkill_of_the_verify_kills_the_server_and_the_next_verify_removes_the_folder(
    verify_dir: Path,
) -> None:
    holder, work, pid = _hold(verify_dir, HOLDER)
    holder.kill()
    holder.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:  # pdeathsig: the kernel kills it
        time.sleep(0.05)
    assert not _alive(pid)
    assert work.is_dir()  # nothing ran to remove it...
    assert scratch.remove_leftovers(verify_dir) == [work]  # ...the next verify does
    assert not work.exists()


def test_stop_kills_a_process_that_ignores_sigterm(verify_dir: Path) -> None:
    with scratch.workspace(verify_dir) as work:
        process = scratch.start(["sh", "-c", "trap '' TERM; sleep 600 & echo ready; wait"],
                                work=work, log_file=work / "log")  # fmt: skip
        log_file = work / "log"
        deadline = time.monotonic() + 30
        while b"ready" not in log_file.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = lab.process_group(process.pid)
        assert len(children) >= 2
        scratch.stop(process, grace=0.5)
        assert process.returncode == -signal.SIGKILL
        assert not any(_alive(p) for p in children)


def test_a_folder_locked_by_a_verify_in_another_pid_namespace_is_kept(verify_dir: Path) -> None:
    """Its name's PID means nothing here (dead in this namespace); its flock says it is used."""
    foreign = verify_dir / f"snapcoord-verify.{_dead_pid()}.0c0ffee"
    foreign.mkdir()
    holder = subprocess.Popen(["flock", "--close", str(foreign), "sleep", "600"])
    try:
        deadline = time.monotonic() + 30
        while not lab.children_of(holder.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # flock(1) starts sleep once it holds the lock
        assert lab.children_of(holder.pid)
        assert scratch.remove_leftovers(verify_dir) == []
        assert foreign.is_dir()
    finally:
        children = lab.children_of(holder.pid)
        holder.kill()
        holder.wait()
        for child in children:
            os.kill(child, signal.SIGKILL)
    assert scratch.remove_leftovers(verify_dir) == [foreign]


def test_leftovers_go_with_what_still_runs_in_them(verify_dir: Path) -> None:
    """A SIGKILLed verify can leave a confined process running in its folder (a PostgreSQL
    backend busy in one statement): the next verify ends it before removing the folder."""
    leftover = verify_dir / f"snapcoord-verify.{_dead_pid()}.5eed"
    leftover.mkdir(mode=0o711)
    data = scratch.nobody_folder(leftover, "data")
    busy = subprocess.Popen(
        scratch.confined(["sh", "-c", f"cd {data} && exec sleep 600"], work=leftover)
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{busy.pid}/cwd") == str(data):
                    break
            time.sleep(0.05)
        assert os.readlink(f"/proc/{busy.pid}/cwd") == str(data)
        assert scratch.remove_leftovers(verify_dir) == [leftover]
        assert busy.wait(timeout=30) == -signal.SIGKILL
        assert not leftover.exists()
    finally:
        if busy.poll() is None:
            busy.kill()
            busy.wait()

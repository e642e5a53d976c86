"""The lab's small helpers: running commands, finding (or requiring) tools, ports, PIDs and the
process table, and the machine-wide lab lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: command -> Debian package that provides it (for skip/fail messages and the CI setup).
APT_PACKAGES: dict[str, str] = {
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sudo": "sudo",
    "visudo": "sudo",
    "service": "init-system-helpers",
    "mysql": "mariadb-client",
    "mysqldump": "mariadb-client",
    "mysqladmin": "mariadb-client",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server-core",
    "apache2ctl": "apache2",
    "cron": "cron",
    "psql": "postgresql-client",
    "pg_dumpall": "postgresql-client",
    "pg_isready": "postgresql-client",
    "pg_lsclusters": "postgresql-common",
    "runuser": "util-linux",
    "qemu-ga": "qemu-guest-agent",
}


class LabError(RuntimeError):
    """The lab itself could not be set up (not a product failure)."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    input: str | bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on failure raise LabError with its stderr."""
    text_input = input.decode() if isinstance(input, bytes) else input
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=text_input, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(
            f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
        )
    return proc


def which(cmd: str) -> str | None:
    """shutil.which that also looks in the sbin directories (non-root PATHs lack them)."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(cmd, path=path)


def require(cmd: str, package: str | None = None) -> str:
    """Return the path of ``cmd``; if it is missing, fail under CI=true, else skip the test.

    The message names the apt package to install. Only for use inside tests and fixtures.
    """
    found = which(cmd)
    if found:
        return found
    import pytest  # lazy: the lab is also used outside pytest

    pkg = package or APT_PACKAGES.get(cmd, cmd)
    msg = f"{cmd} is not installed: apt-get install -y {pkg}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{msg} (CI=true: CI must install it)", pytrace=False)
    pytest.skip(msg)
    raise AssertionError("unreachable")  # pragma: no cover


def require_root() -> None:
    """Fail under CI=true, else skip, unless this is root inside a lab sandbox.

    The lab needs root (sshd, service, useradd), and it only ever runs in its sandbox
    (tests/lab/sandbox.py): the host's own services are never the lab's.
    """
    from tests.lab import sandbox

    if os.geteuid() == 0 and sandbox.active():
        return
    import pytest

    if os.geteuid() != 0:
        msg = "the guest lab needs root (sshd, service, useradd)"
    else:
        msg = (
            "the guest lab runs only inside its sandbox: run the tests with pytest-xdist "
            "installed (make test), or under tests/lab/sandboxed-python"
        )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_banner(port: int, prefix: bytes, timeout: float, alive: Any = None) -> bytes:
    """Connect to 127.0.0.1:port until the server greets with ``prefix``; return the greeting."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise LabError(f"server on port {port} exited while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                data = s.recv(256)
                if data.startswith(prefix):
                    return data
                last = LabError(f"unexpected greeting {data[:40]!r}")
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise LabError(f"nothing answered on 127.0.0.1:{port} within {timeout:.0f}s: {last}")


def stop_pid(pid: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 10.0) -> None:
    """SIGTERM a process we started, wait for it, SIGKILL if it does not go."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=5)


#: Serialises lab users within one sandbox (on its private /run: every sandbox has its own).
LOCK_PATH = Path("/run/snapcoord-lab.lock")


_lock_state: dict[str, int] = {"depth": 0, "fd": -1}


@contextlib.contextmanager
def lab_lock(timeout: float = 900.0) -> Iterator[None]:
    """Hold the sandbox's lab lock (flock, re-entrant within this process).

    The sandbox's services and database are shared by everything running in it (a worker and
    a ``python3 -m tests.lab`` started by hand in the same sandbox); tests that stop services
    or rewrite databases hold this lock. A process that dies releases it.
    """
    if _lock_state["depth"]:
        _lock_state["depth"] += 1
        try:
            yield
        finally:
            _lock_state["depth"] -= 1
        return
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"{LOCK_PATH} still locked after {timeout:.0f}s") from None
                time.sleep(0.1)
        _lock_state.update(depth=1, fd=fd)
        try:
            yield
        finally:
            _lock_state.update(depth=0, fd=-1)
    finally:
        os.close(fd)


def process_table() -> Iterator[tuple[int, str, str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), comm, args


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); [] if gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def children_of(parent: int) -> list[int]:
    return [pid for pid, _c, _a in process_table() if stat_fields(pid)[1:2] == [str(parent)]]


def process_group(pgid: int) -> list[int]:
    return [pid for pid, _c, _a in process_table() if stat_fields(pid)[2:3] == [str(pgid)]]

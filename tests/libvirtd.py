"""A reachable libvirtd for ``qemu:///system``: reuse the running one, or start our own.

If nothing answers at the URI, :func:`running_libvirtd` starts ``virtlogd`` (unless its socket
already listens) and ``libvirtd`` in the foreground as children of the test process, and stops
exactly those (by PID, in reverse order) when the ``with`` block ends. A libvirtd that was
already running is left alone. Used by tests/test_libvirt_qemu.py and tests/realvm_guest.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

import libvirt

URI = "qemu:///system"
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"


def virtlogd_listens() -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(VIRTLOGD_SOCKET)
        except OSError:
            return False
    return True


def can_open(uri: str = URI) -> bool:
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return False
    return True


@contextlib.contextmanager
def running_libvirtd(uri: str = URI, timeout: float = 60.0) -> Iterator[str]:
    """Yield ``uri`` once libvirtd answers there; stop only the daemons started here."""
    libvirt.registerErrorHandler(lambda *_a: None, None)
    started: list[subprocess.Popen[bytes]] = []
    if not can_open(uri):
        if not virtlogd_listens():
            started.append(subprocess.Popen(["virtlogd"]))
        started.append(subprocess.Popen(["libvirtd"]))
        deadline = time.monotonic() + timeout
        while not can_open(uri):
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                break
            time.sleep(0.2)
    try:
        assert can_open(uri), f"libvirtd did not come up at {uri}"
        yield uri
    finally:
        for proc in reversed(started):
            proc.terminate()
            proc.wait(30)


# -- one libvirtd for every worker and every pytest session on this machine ----------------------

#: On the host's /run (the pytest controller runs there, outside the lab sandboxes).
SHARED_DIR = "/run/snapcoord-lab"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class SharedLibvirtd:
    """libvirtd (and virtlogd) shared by every test worker and every pytest session.

    Each session holds a shared flock on ``users`` while it runs; the first one starts the
    daemons if nothing answers (recording their PID and start time in ``daemons``), and the
    session that ends last (it gets the lock exclusively) stops the daemons the lab started, by
    PID, only if that PID still has the recorded start time. A libvirtd the lab did not start is
    never stopped. The workers reach it through the host's /run/libvirt, bound into their
    sandboxes (tests/lab/sandbox.py).
    """

    def __init__(
        self,
        uri: str = URI,
        directory: str = SHARED_DIR,
        *,
        daemons: Sequence[tuple[list[str], Callable[[], bool]]] | None = None,
        answers: Callable[[], bool] | None = None,
    ) -> None:
        self.uri = uri
        self.directory = directory
        #: (argv, already there?) of each daemon, in start order; and: does the service answer?
        self.daemons = daemons or ((["virtlogd"], virtlogd_listens), (["libvirtd"], lambda: False))
        self.answers = answers or (lambda: can_open(self.uri))
        self._users_fd = -1

    def _path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        fd = os.open(self._path("start.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def acquire(self, timeout: float = 60.0) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._users_fd = os.open(self._path("users"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self._users_fd, fcntl.LOCK_SH)
        libvirt.registerErrorHandler(lambda *_a: None, None)
        with self._exclusive():
            if self.answers():
                return
            log = open(self._path("daemons.log"), "ab")  # noqa: SIM115 - the daemons keep it
            started = []
            for argv, already_there in self.daemons:
                if already_there():
                    continue
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=log, start_new_session=True)  # fmt: skip
                started.append(f"{proc.pid} {_start_time(proc.pid)}\n")
            log.close()
            with open(self._path("daemons"), "a") as record:
                record.writelines(started)
            deadline = time.monotonic() + timeout
            while not self.answers() and time.monotonic() < deadline:
                time.sleep(0.2)

    def release(self) -> None:
        if self._users_fd < 0:
            return
        with self._exclusive():
            fcntl.flock(self._users_fd, fcntl.LOCK_UN)
            os.close(self._users_fd)
            self._users_fd = -1
            probe = os.open(self._path("users"), os.O_RDWR | os.O_NOFOLLOW)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another session still uses the daemons
            finally:
                os.close(probe)
            self._stop_recorded()

    def _stop_recorded(self) -> None:
        try:
            with open(self._path("daemons")) as record:
                entries = [line.split() for line in record if line.strip()]
        except FileNotFoundError:
            return
        for pid_text, started in reversed(entries):
            pid = int(pid_text)
            if _start_time(pid) != started:
                continue  # gone, or another process has the PID now
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _start_time(pid) == started and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.1)
        os.unlink(self._path("daemons"))

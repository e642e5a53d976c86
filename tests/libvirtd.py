"""A reachable libvirtd for ``qemu:///system``: reuse the running one, or start our own.

If nothing answers at the URI, :func:`running_libvirtd` starts ``virtlogd`` (unless its socket
already listens) and ``libvirtd`` in the foreground as children of the test process, and stops
exactly those (by PID, in reverse order) when the ``with`` block ends. A libvirtd that was
already running is left alone. Used by tests/test_libvirt_qemu.py and tests/realvm_guest.py.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator

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

"""A real QEMU guest agent in the lab guest: Debian's ``qemu-ga`` listening on a Unix socket.

The lab guest is the test worker's sandbox (tests/lab/sandbox.py); qemu-ga runs in it as root,
exactly the binary a Debian 12 VM runs, only on ``-m unix-listen`` instead of the virtio port.
:class:`SocketAgentLink` speaks the agent's protocol over that socket: the stand-in for what
libvirt's ``qemuAgentCommand`` and Proxmox's ``mon_cmd(... "guest-...")`` do over the VM's
channel (one client at a time, one JSON request and reply per line, ``guest-sync-delimited``
after a broken exchange so a late reply is never taken for the next one's).

``start_agent(workdir)`` -> :class:`LabAgent` (``socket``, ``pid``, ``restart()``, ``stop()``,
``link(vm)``). The Proxmox double's agent endpoints (tests/pve_api) forward to such an agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapcoord.agent_link import AgentCommandError, AgentUnavailable, QgaLink
from tests.lab.common import stop_pid, which

QGA = "/usr/sbin/qemu-ga"
#: What a qemu-ga in the lab must never do: it runs on this machine (in the test's sandbox, whose
#: mounts and clock are the host's), so freezing file systems, setting the clock or shutting down
#: would hit the host. Blocked with ``-b``; the real guest's agent does them (tests/realvm_guest).
HOST_WIDE = ("guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw",
             "guest-fstrim", "guest-set-time", "guest-shutdown", "guest-suspend-disk",
             "guest-suspend-ram", "guest-suspend-hybrid", "guest-set-user-password",
             "guest-set-vcpus", "guest-set-memory-blocks")  # fmt: skip
_DELIMITER = b"\xff"


@dataclass
class LabAgent:
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    blocked: tuple[str, ...] = ()
    links: list[SocketAgentLink] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.workdir / "qga.sock"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def transfer_dir(self) -> Path:
        return self.state_dir / "transfer"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        state = str(self.workdir)
        argv = [QGA, "-m", "unix-listen", "-p", str(self.socket), "-t", state,
                "-f", f"{state}/qga.pid", "-l", f"{state}/qga.log"]  # fmt: skip
        argv += ["-b", ",".join((*HOST_WIDE, *self.blocked))]
        # The guest's state folder (dumps in transit) in the test's own directory, not the
        # machine's /var/lib: commands the agent runs inherit its environment.
        env = {**os.environ, "SNAPCOORD_GUEST_STATE": str(self.state_dir)}
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
        deadline = time.monotonic() + 10
        while not self._accepts():  # the socket file exists once bound, before listen()
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-ga did not start: {self.log()}")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        for link in self.links:
            link.close()
        if self.process is not None:
            stop_pid(self.process.pid, self.process)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "qga.log").read_text(errors="replace")[-2000:]
        return ""

    def link(self, vm: str = "lab") -> SocketAgentLink:
        link = SocketAgentLink(self.socket, vm=vm)
        self.links.append(link)
        return link


def start_agent(workdir: Path, *, blocked: tuple[str, ...] = ()) -> LabAgent:
    if which(QGA) is None:
        raise RuntimeError("qemu-ga not installed (Debian package qemu-guest-agent)")
    workdir.mkdir(parents=True, exist_ok=True)
    agent = LabAgent(workdir, blocked=blocked)
    agent.start()
    return agent


class SocketAgentLink(QgaLink):
    """The agent protocol over qemu-ga's Unix socket, one exchange at a time."""

    def __init__(self, path: Path, *, vm: str) -> None:
        super().__init__(vm=vm)
        self.path = path
        self.description = f"guest agent on {path}"
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    def command(self, execute: str, arguments: dict[str, Any] | None, *, timeout: float) -> Any:
        request: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            request["arguments"] = arguments
        with self._lock:
            try:
                if self._sock is None:
                    self._connect(timeout)
                reply = self._exchange(request, timeout)
            except (OSError, ValueError) as exc:
                self._drop()
                raise AgentUnavailable(
                    f"QEMU guest agent is not running ({execute}: {exc})", vm=self.vm
                ) from None
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc") if isinstance(error, dict) else error
            raise AgentCommandError(f"Agent error: {desc}", vm=self.vm)
        return reply.get("return")

    def _connect(self, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.path))
        self._sock, self._buffer = sock, b""
        # Resynchronise: anything a previous client left in the agent's pipe is skipped.
        token = secrets.randbelow(1 << 31)
        sock.sendall(json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}})
                     .encode() + b"\n")  # fmt: skip
        while True:
            line = self._line(timeout)
            start = line.rfind(_DELIMITER)
            if start >= 0:
                line = line[start + 1 :]
            with contextlib.suppress(ValueError):
                if json.loads(line).get("return") == token:
                    return

    def _exchange(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(self._line(timeout))
        if not isinstance(reply, dict):
            raise ValueError("a reply that is not an object")
        return reply

    def _line(self, timeout: float) -> bytes:
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer")
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()

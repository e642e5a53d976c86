"""The hypervisor's path to a VM's QEMU guest agent: the small set of agent calls the agent
transport (snapcoord/agent.py) is built on, the same on every hypervisor.

Two kinds of link implement :class:`AgentLink`:

* :class:`QgaLink` speaks the agent's own protocol (``{"execute": "guest-exec", ...}``) through
  one method, :meth:`QgaLink.command`: libvirt (``libvirt_qemu.qemuAgentCommand``,
  adapters/libvirt_adapter.py) and, in the tests, a qemu-ga on a Unix socket;
* the Proxmox VE API's ``nodes/{node}/qemu/{vmid}/agent/*`` endpoints (adapters/proxmox.py),
  which wrap the same agent calls with limits of their own.

Each link states its limits (``max_input``, ``max_read``, ``max_write``) so the transport never
sends a request the path refuses. Checked in the sources:

* qemu ``qga/commands.c`` @ Debian 7.2: a command's captured output is kept up to 16 MiB
  (``GUEST_EXEC_MAX_OUTPUT``) and returned base64-encoded only once it exited;
  ``guest-file-read`` returns at most 48 MiB (``QGA_READ_COUNT_MAX``);
* libvirt ``src/remote/remote_protocol.x``: a reply string is at most 4 MiB
  (``REMOTE_STRING_MAX``), so the base64 of a chunk stays under it;
* qemu-server ``src/PVE/API2/Qemu/Agent.pm`` @ e6352be6: ``exec``'s ``input-data`` is at most
  64 KiB, ``file-write``'s ``content`` at most 60 KiB (mode ``wb``: it replaces the file),
  ``file-read`` at most 16 MiB from ``offset`` (``decode=0`` keeps it base64; ``offset`` only
  since qemu-server 9.1.5), ``exec-status`` decodes the output into a JSON string whose
  characters are the bytes (U+0000-U+00FF: binary-safe read back as Latin-1), and empty form
  values are dropped (no empty argument, stdin or file): adapters/proxmox_agent.py;
* qemu ``qga/commands-posix.c``: ``guest-file-open`` creates a new file with mode 0666
  (``DEFAULT_NEW_FILE_MODE``) whatever the umask: private files live in root-only folders.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from snapcoord.errors import GuestError
from snapcoord.guest import GuestUnreachable

#: What to tell an admin whose VM has no working agent, per hypervisor type.
AGENT_FIX = {
    "proxmox": "enable it with `qm set VMID --agent 1` (then power-cycle the VM), and install "
    "and start qemu-guest-agent in the guest",
    "libvirt": "add a <channel type='unix'> with target name 'org.qemu.guest_agent.0' to the "
    "domain, and install and start qemu-guest-agent in the guest",
}


class AgentUnavailable(GuestUnreachable):
    """No agent answers: none configured for the VM, the VM is not running, or qemu-ga is not
    running in the guest. Retryable inside a window (the agent may be restarting)."""


class AgentCommandError(GuestError):
    """The agent answered with an error (a file that does not exist, a refused command)."""


@dataclass(frozen=True)
class ExecStatus:
    """``guest-exec-status`` of one process qemu-ga started."""

    exited: bool
    exitcode: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False

    @property
    def returncode(self) -> int:
        """The shell's convention: 128 + signal for a process a signal ended."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exitcode if self.exitcode is not None else -1


class AgentLink(Protocol):
    description: str
    #: raw bytes of stdin one exec may carry
    max_input: int
    #: raw bytes one read_file call asks for at most
    max_read: int
    #: raw bytes one write_file call writes at most
    max_write: int
    #: bytes of stdout (and of stderr) a command may return through exec-status; ``None``:
    #: qemu-ga's own 16 MiB, past which it says truncated. libvirt needs less (its replies)
    max_output: int | None

    def ping(self, *, timeout: float) -> None:
        """Raise :class:`AgentUnavailable` unless the agent answers within ``timeout``."""
        ...

    def exec(self, argv: Sequence[str], *, stdin: bytes | None, timeout: float) -> int:
        """Start ``argv`` (never through a shell) with its output captured; return its PID."""
        ...

    def exec_status(self, pid: int, *, timeout: float) -> ExecStatus: ...

    def read_file(
        self, path: str, *, offset: int, count: int, timeout: float
    ) -> tuple[bytes, bool]:
        """Up to ``count`` bytes of ``path`` from ``offset``; and whether the end was reached."""
        ...

    def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        """Create or replace ``path`` with ``data`` (a new file is 0666: keep it in a root-only
        folder)."""
        ...

    def close(self) -> None: ...


class QgaLink:
    """The agent's own protocol, for links that pass a command through unchanged. A subclass
    supplies :meth:`command`, which returns the reply's ``return`` value or raises
    :class:`AgentUnavailable` / :class:`AgentCommandError`."""

    description = "guest agent"
    max_input = 1 << 20
    #: 2 MiB: its base64 and the JSON around it stay well under libvirt's 4 MiB reply limit
    #: (a 3 MiB read already fails there: adapters/libvirt_agent.py)
    max_read = 2 << 20
    max_write = 1 << 20
    max_output: int | None = None

    def __init__(self, *, vm: str) -> None:
        self.vm = vm

    def command(self, execute: str, arguments: dict[str, Any] | None, *, timeout: float) -> Any:
        raise NotImplementedError

    def ping(self, *, timeout: float) -> None:
        self.command("guest-ping", None, timeout=timeout)

    def exec(self, argv: Sequence[str], *, stdin: bytes | None, timeout: float) -> int:
        arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        reply = self.command("guest-exec", arguments, timeout=timeout)
        return int(_field(reply, "pid", int, self.vm))

    def exec_status(self, pid: int, *, timeout: float) -> ExecStatus:
        reply = self.command("guest-exec-status", {"pid": pid}, timeout=timeout)
        exited = _field(reply, "exited", bool, self.vm)
        return ExecStatus(
            exited=bool(exited),
            exitcode=_optional(reply, "exitcode", int, self.vm),
            signal=_optional(reply, "signal", int, self.vm),
            stdout=_b64(_optional(reply, "out-data", str, self.vm), self.vm),
            stderr=_b64(_optional(reply, "err-data", str, self.vm), self.vm),
            truncated=bool(_optional(reply, "out-truncated", bool, self.vm))
            or bool(_optional(reply, "err-truncated", bool, self.vm)),
        )

    def read_file(
        self, path: str, *, offset: int, count: int, timeout: float
    ) -> tuple[bytes, bool]:
        handle = self._open(path, "rb", timeout)
        try:
            if offset:
                self.command(
                    "guest-file-seek",
                    {"handle": handle, "offset": offset, "whence": "set"},
                    timeout=timeout,
                )
            reply = self.command(
                "guest-file-read", {"handle": handle, "count": count}, timeout=timeout
            )
        finally:
            self._close(handle, timeout)
        data = _b64(_field(reply, "buf-b64", str, self.vm), self.vm)
        return data, bool(_optional(reply, "eof", bool, self.vm))

    def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        handle = self._open(path, "wb", timeout)
        try:
            self.command(
                "guest-file-write",
                {"handle": handle, "buf-b64": base64.b64encode(data).decode()},
                timeout=timeout,
            )
        finally:
            self._close(handle, timeout)

    def _open(self, path: str, mode: str, timeout: float) -> int:
        reply = self.command("guest-file-open", {"path": path, "mode": mode}, timeout=timeout)
        if isinstance(reply, bool) or not isinstance(reply, int):
            raise AgentCommandError(f"guest-file-open answered {type(reply).__name__}", vm=self.vm)
        return reply

    def _close(self, handle: int, timeout: float) -> None:
        with contextlib.suppress(AgentCommandError):  # gone already: nothing is left open
            self.command("guest-file-close", {"handle": handle}, timeout=timeout)

    def close(self) -> None:
        pass


def _field(reply: Any, name: str, kind: type, vm: str) -> Any:
    value = reply.get(name) if isinstance(reply, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AgentCommandError(
            f"the guest agent's answer has no valid {name!r} ({type(value).__name__})", vm=vm
        )
    return value


def _optional(reply: Any, name: str, kind: type, vm: str) -> Any:
    if not isinstance(reply, dict) or reply.get(name) is None:
        return None
    return _field(reply, name, kind, vm)


def _b64(text: str | None, vm: str) -> bytes:
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise AgentCommandError("the guest agent's answer is not valid base64", vm=vm) from None

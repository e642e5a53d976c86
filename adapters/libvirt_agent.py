"""The QEMU guest agent of a libvirt domain: :class:`LibvirtAgentLink`, the agent's own protocol
through ``libvirt_qemu.qemuAgentCommand`` (what ``virsh qemu-agent-command`` does).

Made by :meth:`LibvirtAdapter.guest_agent` (adapters/libvirt_adapter.py); the agent transport
(snapcoord/agent.py) drives it through :class:`snapcoord.agent_link.AgentLink`.

**One boundary.** :meth:`LibvirtAgentLink.command` is the only place a libvirt reply is read:
it must be a JSON object with a ``return`` member, which is handed on (:class:`QgaLink` checks
each field). Every libvirt error becomes one of two errors:

* :class:`AgentUnavailable` (retryable; the hint is ``AGENT_FIX["libvirt"]``): the domain has
  no agent channel, is not running, qemu-ga is not connected or does not answer in time, the
  agent is busy with another caller, or the connection to libvirtd is lost (the link has a
  connection of its own, apart from the adapter's snapshot calls, and opens a new one on its
  next call);
* :class:`AgentCommandError`: the agent answered with an error (libvirt 9.0 reports it as
  ``VIR_ERR_INTERNAL_ERROR`` "unable to execute QEMU agent command 'X': <the agent's text>"),
  or the reply could not be carried (too large, not JSON).

**Timeouts.** ``qemuAgentCommand``'s timeout is whole seconds: ``-2`` blocks forever, ``-1``
is libvirt's default, ``0`` does not wait for the reply at all (libvirt then reports the agent
as unresponsive), a positive value waits that long (``src/libvirt-qemu.c``,
``virDomainQemuAgentCommand``). A timeout is rounded up to whole seconds, at least 1, never one
of the special values. Before each command libvirt sends ``guest-sync`` with up to 5 s of its
own (the command's timeout when shorter), so a call may take the timeout plus that; libvirtd
itself hanging is caught by :func:`run_with_timeout` a few seconds later. Either way the call
returns: :class:`AgentUnavailable`.

**Limits** (libvirt 9.0 and QEMU 7.2 of Debian 12, measured against the real guest,
tests/test_realvm_agent.py):

* A reply travels from libvirtd to the client as one XDR string of at most
  ``REMOTE_STRING_MAX`` = 4194304 bytes (libvirt ``src/remote/remote_protocol.x`` at commit
  0c234889c4b0bd21ab2103c8bbac0290db1ff600: ``const REMOTE_STRING_MAX = 4194304;``,
  ``typedef string remote_nonnull_string<REMOTE_STRING_MAX>;``). Longer: ``VIR_ERR_RPC``
  "Unable to encode message payload", and a ``guest-exec-status`` that qemu-ga answered is
  gone (it forgets an exited process once it reported it). ``guest-file-read`` of 3 MiB is
  just over (4194304 base64 characters before the JSON around them); :attr:`max_read` is 2 MiB
  (2796204 characters), which leaves room for a JSON writer that escapes ``/``.
* libvirtd reads at most 10 MiB of one agent reply (``QEMU_AGENT_MAX_RESPONSE`` in
  ``src/qemu/qemu_agent.c``); a longer one (a command that printed more than about 7.5 MiB,
  whose ``guest-exec-status`` carries it all base64-encoded) makes libvirt drop the agent:
  every later call fails with "QEMU guest agent is not available due to an error" until
  qemu-ga reconnects (a restart of qemu-guest-agent in the guest). Keep captured output small.
* Requests: a ``guest-file-write`` of 144 KiB (196608 base64 characters) went through every
  time; from about 176 KiB on, requests hung until the timeout or failed with "JSON parse
  error" in the agent, and the next call's ``guest-sync`` failed too. :attr:`max_write` and
  :attr:`max_input` are 64 KiB, the figures of Proxmox VE's agent API (60 KiB ``file-write``,
  64 KiB ``input-data``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from typing import Any

import libvirt

from snapcoord.adapters.libvirt_adapter import run_with_timeout
from snapcoord.agent_link import AGENT_FIX, AgentCommandError, AgentUnavailable, QgaLink
from snapcoord.errors import TaskTimeout

#: libvirt ``src/remote/remote_protocol.x``: the longest string one RPC message carries.
REMOTE_STRING_MAX = 4194304
#: Seconds libvirt may spend on its own ``guest-sync`` before each command.
SYNC_SECONDS = 5
#: Seconds beyond libvirt's own timeouts before a call counts as hanging in libvirtd.
RPC_MARGIN = 10.0

_HINT = AGENT_FIX["libvirt"]

#: libvirt error codes that mean: no agent to talk to right now (retry later, or fix the VM).
_UNAVAILABLE = frozenset(
    {
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,  # not connected, not answering, broken
        libvirt.VIR_ERR_AGENT_UNSYNCED,
        libvirt.VIR_ERR_OPERATION_INVALID,  # the domain is not running
        libvirt.VIR_ERR_OPERATION_TIMEOUT,  # another caller holds the domain's agent job
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,  # "QEMU guest agent is not configured"
        libvirt.VIR_ERR_NO_DOMAIN,
    }
)
#: The connection to libvirtd is gone: reconnect on the next call.
_CONNECTION = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
    }
)
#: ``VIR_ERR_RPC`` that is not a lost connection: the reply was too long to send.
_TOO_LONG = re.compile(r"unable to encode message payload", re.IGNORECASE)
#: libvirt's agent-reported connection loss of a reply over its 10 MiB read limit.
_REPLY_OVERFLOW = re.compile(r"no complete agent response found", re.IGNORECASE)
_AGENT_ERROR = re.compile(r"unable to execute QEMU agent command '[^']*': ", re.IGNORECASE)


def libvirt_seconds(timeout: float) -> int:
    """``timeout`` as ``qemuAgentCommand`` takes it: whole seconds, rounded up, at least 1
    (0, -1 and -2 mean "do not wait", "libvirt's default" and "forever")."""
    if not math.isfinite(timeout) or timeout <= 0:
        return 1
    return max(1, math.ceil(timeout))


def _message(err: libvirt.libvirtError) -> str:
    return (err.get_error_message() or str(err)).strip()


class LibvirtAgentLink(QgaLink):
    """The guest agent of one libvirt domain, through ``qemuAgentCommand``."""

    max_input = 64 << 10
    max_read = 2 << 20
    max_write = 64 << 10
    #: per stream: stdout and stderr base64-encoded in one exec-status reply stay under 3 MiB
    #: (about 3 MiB of output already fails, and then qemu-ga has forgotten the command)
    max_output: int | None = 1 << 20

    def __init__(self, uri: str, *, uuid: str, vm: str) -> None:
        super().__init__(vm=vm)
        self.uri = uri
        self.uuid = uuid
        self.description = f"QEMU guest agent of {vm} through libvirt at {uri}"
        self._conn: libvirt.virConnect | None = None
        self._domain: libvirt.virDomain | None = None
        self._lock = threading.Lock()

    def command(self, execute: str, arguments: dict[str, Any] | None, *, timeout: float) -> Any:
        request: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            request["arguments"] = arguments
        text = json.dumps(request, separators=(",", ":"))
        if len(text) > REMOTE_STRING_MAX:
            raise AgentCommandError(
                f"{execute}: a request of {len(text)} bytes is over libvirt's limit "
                f"({REMOTE_STRING_MAX})",
                vm=self.vm,
            )
        seconds = libvirt_seconds(timeout)
        try:
            reply = self._call(execute, text, seconds)
        except libvirt.libvirtError as err:
            raise self._translate(err, execute) from None
        return self._parse(reply, execute)

    def _call(self, execute: str, text: str, seconds: int) -> Any:
        import libvirt_qemu

        domain = self._dom()
        try:
            return run_with_timeout(
                lambda: libvirt_qemu.qemuAgentCommand(domain, text, seconds, 0),
                timeout=seconds + min(seconds, SYNC_SECONDS) + RPC_MARGIN,
                what=f"the guest agent's {execute}",
                vm=self.vm,
            )
        except TaskTimeout:
            self._reset()  # libvirtd hangs: the next call starts on a new connection
            raise AgentUnavailable(
                f"libvirt did not return {execute} within {seconds} s (+ {SYNC_SECONDS} s "
                f"guest-sync, + {RPC_MARGIN:g} s)",
                vm=self.vm,
                hint=f"check libvirtd at {self.uri}; {_HINT}",
            ) from None

    def _dom(self) -> libvirt.virDomain:
        with self._lock:
            if self._conn is None:
                self._conn = libvirt.open(self.uri)
            if self._domain is None:
                self._domain = self._conn.lookupByUUIDString(self.uuid)
            return self._domain

    def _reset(self) -> None:
        """Forget the connection (a call may still hang in it): the next call opens one."""
        with self._lock:
            conn, self._conn, self._domain = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _translate(
        self, err: libvirt.libvirtError, execute: str
    ) -> AgentUnavailable | AgentCommandError:
        code = err.get_error_code()
        text = _message(err)
        if code == libvirt.VIR_ERR_RPC and _TOO_LONG.search(text):
            return AgentCommandError(
                f"{execute}: the agent's reply is longer than libvirt carries "
                f"({REMOTE_STRING_MAX} bytes): {text}",
                vm=self.vm,
            )
        if code == libvirt.VIR_ERR_SYSTEM_ERROR and _REPLY_OVERFLOW.search(text):
            return AgentUnavailable(
                f"{execute}: the agent's reply was over libvirtd's 10 MiB limit and libvirt "
                f"dropped the agent: {text}",
                vm=self.vm,
                hint="restart qemu-guest-agent in the guest to reconnect it",
            )
        if code in _CONNECTION:
            self._reset()
            return AgentUnavailable(
                f"{execute}: the connection to libvirt at {self.uri} failed: {text}",
                vm=self.vm,
                hint=f"check that libvirtd runs; {_HINT}",
            )
        if code in _UNAVAILABLE:
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                with self._lock:
                    self._domain = None
            hint = "the VM must be running" if code == libvirt.VIR_ERR_OPERATION_INVALID else _HINT
            return AgentUnavailable(f"{execute}: {text}", vm=self.vm, hint=hint)
        if code == libvirt.VIR_ERR_NO_SUPPORT:
            return AgentCommandError(
                f"{execute}: libvirt's driver at {self.uri} has no guest agent commands: {text}",
                vm=self.vm,
            )
        match = _AGENT_ERROR.search(text)
        if match:
            return AgentCommandError(f"{execute}: {text[match.end() :]}", vm=self.vm)
        return AgentCommandError(f"{execute}: {text}", vm=self.vm)

    def _parse(self, reply: Any, execute: str) -> Any:
        if not isinstance(reply, str):
            raise AgentCommandError(f"{execute}: libvirt returned no reply", vm=self.vm)
        try:
            parsed = json.loads(reply)
        except ValueError:
            raise AgentCommandError(
                f"{execute}: the agent's reply is not JSON ({reply[:80]!r})", vm=self.vm
            ) from None
        if not isinstance(parsed, dict):
            raise AgentCommandError(
                f"{execute}: the agent's reply is not an object ({type(parsed).__name__})",
                vm=self.vm,
            )
        if "error" in parsed:
            error = parsed["error"]
            desc = error.get("desc") if isinstance(error, dict) else error
            raise AgentCommandError(f"{execute}: {desc}", vm=self.vm)
        if "return" not in parsed:
            raise AgentCommandError(f"{execute}: the agent's reply has no 'return'", vm=self.vm)
        return parsed["return"]

    def close(self) -> None:
        self._reset()

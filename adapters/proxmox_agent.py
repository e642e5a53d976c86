"""A Proxmox VE VM's QEMU guest agent through the API (``nodes/{node}/qemu/{vmid}/agent/*``):
the :class:`~snapcoord.agent_link.AgentLink` the agent transport runs guest commands over.

Every call goes through the adapter's ``_send`` (the session, TLS pinning, ticket renewal and
network errors of every other call); this module tells the API's answers apart. What the API
does with each call (qemu-server ``src/PVE/API2/Qemu/Agent.pm`` and ``src/PVE/QemuServer/
Agent.pm`` @ e6352be6, pve-http-server; tests/pve_api/data/pve-agent-api.json ``_behaviour``):

* parameters arrive form-encoded and are decoded as UTF-8 into characters; ``exec``'s
  ``input-data`` is base64-encoded from those characters, one byte each (a character above
  U+00FF makes Perl die). So stdin is sent as its Latin-1 text: every byte arrives exactly,
  non-UTF-8 bytes included. ``input-data`` is at most 64 Ki characters;
* ``exec-status`` decodes the output and the JSON formatter writes each byte as one code point
  (U+0000-U+00FF): encoded back as Latin-1 it is exactly the bytes the command wrote, UTF-8 or
  not (a client that takes the string for text sees mojibake, not lost bytes). It is kept up to
  16 MiB by qemu-ga and returned only once the command exited;
* ``file-read`` with ``decode=0`` keeps each 1 MiB chunk's own base64 (padding included) and
  concatenates them; before qemu-server 9.1.5 (every Proxmox VE 8) it takes no ``offset``,
  ``count`` or ``decode`` and returns up to 16 MiB from the start, decoded;
* ``file-write`` replaces the file (mode ``wb``) with ``content``, at most 60 KiB of base64 with
  ``encode=0``. qemu-ga makes a *new* file mode 0666 whatever its umask (qga/commands-posix.c
  ``safe_open_or_create``, Debian 12's qemu 7.2); an existing file keeps its mode: create a
  private file 0600 first;
* a request body is at most 512 KiB (64 KiB before pve-http-server 5.2.1, assumed on PVE 8);
* a value that is the empty string is dropped by the form decoding (undefined in Perl): an empty
  argument, empty stdin or an empty file cannot be sent.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

from proxmoxer.core import ResourceException

from snapcoord.adapters.base import VM
from snapcoord.adapters.permissions import proxmox_agent_transport_privileges
from snapcoord.agent_link import AGENT_FIX, AgentCommandError, AgentUnavailable, ExecStatus
from snapcoord.errors import GuestError, HypervisorError, UnsupportedOperation
from snapcoord.text import clip

if TYPE_CHECKING:
    from snapcoord.adapters.proxmox import ProxmoxAdapter

T = TypeVar("T")

#: file-read's limit per call (Agent.pm $MAX_READ_SIZE) and its chunk of one guest-file-read
MAX_READ_SIZE = 16 * 1024 * 1024
#: request body limits of pve-http-server (limit_max_post): 5.2.1 and later, and before
MAX_POST = 512 * 1024
MAX_POST_PVE8 = 64 * 1024
#: what the schema allows: input-data characters, file-write content characters
INPUT_DATA_MAX = 64 * 1024
CONTENT_MAX = 60 * 1024

QGA_FAILED_RE = re.compile(r"^VM \d+ qga command '(?P<cmd>[^']*)' failed - (?P<why>.*)$")
NOT_RUNNING_RE = re.compile(r"^VM \d+ is not running$")
OLD_FILE_READ = frozenset({"offset", "count", "decode"})
#: 1 MiB chunks, each base64-encoded with its own padding
_B64_PIECE_RE = re.compile(r"[A-Za-z0-9+/]*=*")


class _OldFileRead(Exception):
    """file-read refused offset/count/decode: qemu-server before 9.1.5."""


def _answers(method: Callable[..., T]) -> Callable[..., T]:
    """The link's boundary: an answer of the wrong shape (a missing key, text that is not
    base64, a code point no byte has) is one HypervisorError line, never a traceback."""

    @functools.wraps(method)
    def checked(self: ProxmoxAgentLink, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
            detail = clip(str(exc).splitlines()[0], 160) if str(exc) else ""
            raise HypervisorError(
                f"{self.adapter.where} gave an answer snapcoord does not understand in agent "
                f"{method.__name__} ({type(exc).__name__}: {detail})",
                vm=self.vm.name,
                hint="is it the Proxmox VE API, version 8 or later?",
            ) from None

    return checked


class ProxmoxAgentLink:
    """The guest agent of one qemu VM, through the Proxmox VE API. The ``timeout`` arguments
    are not sent: each call is bounded by the adapter's HTTP timeout (30 s) and by the API's own
    wait for the agent (a 3 s guest-ping, then 5 s for the command)."""

    def __init__(self, adapter: ProxmoxAdapter, vm: VM) -> None:
        self.adapter = adapter
        self.vm = vm
        self.vmid = str(vm.extra["vmid"])
        self.base = f"{adapter._base(vm)}/agent"
        self.description = f"QEMU guest agent of VM {self.vmid} through {adapter.where}"
        self.pve_major = adapter.major_version()
        modern = self.pve_major >= 9
        self._legacy_read = not modern
        self.max_post = MAX_POST if modern else MAX_POST_PVE8
        # stdin: up to 6 body bytes per byte (%C3%BF); the rest of the body is for the argv
        self.max_input = 60 * 1024 if modern else 8 * 1024
        # file-read with decode=0: 4 MiB is about 5.6 MB of JSON
        self.max_read = 4 * 1024 * 1024
        # base64 of max_write bytes fits 60 KiB and, at 3 body bytes per character (%2F), the
        # body limit
        self.max_write = 45 * 1024 if modern else 12 * 1024
        # exec-status: qemu-ga's own 16 MiB (it says truncated past it)
        self.max_output: int | None = None
        self.fix = AGENT_FIX["proxmox"].replace("VMID", self.vmid)

    # -- calls and their errors ---------------------------------------------------------------

    def _call(self, method: str, endpoint: str, /, **params: Any) -> Any:
        path = f"{self.base}/{endpoint}"
        try:
            return self.adapter._send(method, path, self.vm.name, params)
        except ResourceException as exc:
            raise self._error(exc, method, path) from None

    def _error(self, exc: ResourceException, method: str, path: str) -> Exception:
        status, reason = exc.status_code, _reason(exc)
        vm = self.vm.name
        if status == 403:
            needed = " or ".join(proxmox_agent_transport_privileges(self.pve_major))
            return HypervisorError(
                f"permission denied on {self.adapter.where}: {reason}",
                vm=vm,
                hint=f"the agent transport needs {needed} on /vms/{self.vmid} "
                f"(Proxmox VE {self.pve_major}; docs/first-setup.md)",
            )
        if status == 400 and exc.errors and set(exc.errors) <= OLD_FILE_READ:
            return _OldFileRead()
        if status == 500:
            if reason == "No QEMU guest agent configured":
                return GuestError(
                    f"VM {self.vmid} has no QEMU guest agent configured",
                    vm=vm,
                    hint=f"qm set {self.vmid} --agent 1, power-cycle the VM, and install and "
                    "start qemu-guest-agent in the guest",
                )
            if reason == "QEMU guest agent is not running" or NOT_RUNNING_RE.match(reason):
                return AgentUnavailable(reason, vm=vm, hint=self.fix)
            failed = QGA_FAILED_RE.match(reason)
            if failed:
                return AgentUnavailable(
                    f"the QEMU guest agent did not answer {failed['cmd']}: {failed['why']}",
                    vm=vm,
                    hint=self.fix,
                )
            if reason.startswith("Agent error: "):
                return AgentCommandError(reason, vm=vm)
        return self.adapter._api_error(exc, method, path, vm)

    def _post_fits(self, fields: list[tuple[str, str]], what: str) -> None:
        size = len(urlencode(fields))
        if size > self.max_post:
            raise GuestError(
                f"{what} is too long for one Proxmox VE API request ({size} bytes form-encoded; "
                f"the API takes {self.max_post})",
                vm=self.vm.name,
            )

    # -- AgentLink ----------------------------------------------------------------------------

    @_answers
    def ping(self, *, timeout: float) -> None:
        answer = self._call("post", "ping")
        if not isinstance(answer, dict):
            raise TypeError(f"the ping answer is a {type(answer).__name__}")

    @_answers
    def exec(self, argv: Sequence[str], *, stdin: bytes | None, timeout: float) -> int:
        command = list(argv)
        if not command or any(not isinstance(a, str) or a == "" for a in command):
            raise GuestError(
                "the Proxmox VE API cannot pass an empty command or an empty argument "
                "(its form decoding drops empty values)",
                vm=self.vm.name,
            )
        fields = [("command", arg) for arg in command]
        if stdin:  # empty stdin is the same as none: the API drops an empty value
            if len(stdin) > self.max_input:
                raise ValueError(f"stdin of {len(stdin)} bytes is over max_input")
            fields.append(("input-data", stdin.decode("latin-1")))
        self._post_fits(fields, f"the command {command[0]!r} with its input")
        params: dict[str, Any] = {"command": command}
        if stdin:
            params["input-data"] = stdin.decode("latin-1")
        answer = self._call("post", "exec", **params)
        pid = answer["pid"]
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"pid is {pid!r}")
        return pid

    @_answers
    def exec_status(self, pid: int, *, timeout: float) -> ExecStatus:
        answer = self._call("get", "exec-status", pid=pid)
        if not isinstance(answer, dict):
            raise TypeError(f"the exec-status answer is a {type(answer).__name__}")
        return ExecStatus(
            exited=_flag(answer, "exited", required=True),
            exitcode=_number(answer, "exitcode"),
            signal=_number(answer, "signal"),
            stdout=_output(answer, "out-data"),
            stderr=_output(answer, "err-data"),
            truncated=_flag(answer, "out-truncated") or _flag(answer, "err-truncated"),
        )

    @_answers
    def read_file(
        self, path: str, *, offset: int, count: int, timeout: float
    ) -> tuple[bytes, bool]:
        if offset < 0 or count < 1:
            raise GuestError(f"cannot read {count} bytes at offset {offset}", vm=self.vm.name)
        count = min(count, self.max_read)
        if not self._legacy_read:
            try:
                answer = self._call(
                    "get", "file-read", file=path, offset=offset, count=count, decode=0
                )
            except _OldFileRead:
                self._legacy_read = True  # qemu-server before 9.1.5
            else:
                data = _pieces(_text(answer, "content"))
                if len(data) != _count(answer, "bytes-read") or len(data) > count:
                    raise ValueError(f"{len(data)} bytes, bytes-read {answer['bytes-read']!r}")
                return data, not _flag(answer, "truncated")
        return self._read_legacy(path, offset, count)

    def _read_legacy(self, path: str, offset: int, count: int) -> tuple[bytes, bool]:
        """file-read without offset: the whole file (up to 16 MiB), a slice of it kept."""
        answer = self._call("get", "file-read", file=path)
        whole = _text(answer, "content").encode("latin-1")
        truncated = _flag(answer, "truncated")
        if truncated and offset + count > len(whole):
            raise GuestError(
                f"{path} is larger than the {len(whole)} bytes this Proxmox VE's agent "
                "file-read returns (no offset before qemu-server 9.1.5)",
                vm=self.vm.name,
                hint='update Proxmox VE, or set dump_transport = "ssh"',
            )
        data = whole[offset : offset + count]
        return data, offset + len(data) >= len(whole) and not truncated

    @_answers
    def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        if len(data) > self.max_write:
            raise ValueError(f"{len(data)} bytes is over max_write")
        if not data:
            raise GuestError(
                f"cannot write an empty {path} through the Proxmox VE API (its form decoding "
                "drops an empty value)",
                vm=self.vm.name,
            )
        content = base64.b64encode(data).decode()
        self._post_fits([("file", path), ("content", content), ("encode", "0")], f"writing {path}")
        self._call("post", "file-write", file=path, content=content, encode=0)

    def close(self) -> None:
        pass  # the adapter's session is the adapter's


def _reason(exc: ResourceException) -> str:
    """The reason phrase: the API writes the message's UTF-8 bytes, which HTTP clients read as
    Latin-1 (an agent error quoting a path or the agent's own curly quotes)."""
    reason = str(exc.content or "").strip()
    try:
        return reason.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return reason


def _flag(answer: Mapping[str, Any], key: str, *, required: bool = False) -> bool:
    """A boolean as PVE writes them (1/0 after exec-status' conversion; JSON true/false)."""
    value = answer.get(key)
    if value is None and not required:
        return False
    if value in (0, 1, True, False, "0", "1") and not isinstance(value, float):
        return str(int(value)) == "1"
    raise ValueError(f"{key} is {value!r}")


def _number(answer: Mapping[str, Any], key: str) -> int | None:
    value = answer.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value < 2**31:
        raise ValueError(f"{key} is {value!r}")
    return value


def _count(answer: Mapping[str, Any], key: str) -> int:
    value = _number(answer, key)
    if value is None or value < 0:
        raise ValueError(f"{key} is {value!r}")
    return value


def _text(answer: Any, key: str) -> str:
    value = answer[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} is a {type(value).__name__}")
    return value


def _output(answer: Mapping[str, Any], key: str) -> bytes:
    """out-data/err-data: one code point per byte (a code point over U+00FF is no byte: the
    answer is not PVE's)."""
    value = answer.get(key)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise TypeError(f"{key} is a {type(value).__name__}")
    return value.encode("latin-1")


def _pieces(content: str) -> bytes:
    """file-read's decode=0 content: base64 chunks, each padded, concatenated."""
    out = bytearray()
    position = 0
    for match in _B64_PIECE_RE.finditer(content):
        if match.start() != position:
            break
        position = match.end()
        if match.group():
            out += base64.b64decode(match.group(), validate=True)
    if position != len(content):
        raise ValueError("content is not base64")
    return bytes(out)


def guest_agent_link(adapter: ProxmoxAdapter, vm: VM) -> ProxmoxAgentLink:
    """The link for ``vm``; containers have no guest agent."""
    if vm.extra.get("type") != "qemu":
        vmid = vm.extra.get("vmid")
        raise UnsupportedOperation(
            f"CT {vmid} is a container: containers have no QEMU guest agent",
            vm=vm.name,
            hint='use transport = "ssh", or transport = "exec" with exec_prefix = '
            f'["pct", "exec", "{vmid}", "--"] on the node',
        )
    return ProxmoxAgentLink(adapter, vm)

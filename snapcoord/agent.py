"""The guest agent transport (``[vms.X.guest] transport = "agent"``): every guest command runs
through the hypervisor's QEMU guest agent (:mod:`snapcoord.agent_link`), so no SSH key, host or
known_hosts is needed; the hypervisor connection is the only one.

The agent is a control channel, not a data pipe (its limits are in agent_link.py), so:

* :meth:`AgentTransport.run` starts the command with ``guest-exec`` under the guest's own
  ``timeout -s KILL`` (a command past its timeout is killed in the guest, with its process group,
  not only abandoned) and polls ``guest-exec-status`` until it exited; qemu-ga runs it as root,
  so ``sudo`` is not used. Output comes all at once when the command ended.
* :meth:`AgentTransport.run_streaming` (dumps, archives, restores) goes through a root-only
  directory in the guest (``/var/lib/snapcoord/transfer/<token>``, 0700): a dump is written to a
  file there and read back in chunks under the link's limit while it grows, its sha256 computed
  in the guest is compared with what arrived, and the directory is removed whatever happened;
  a restore's input is written there in chunks that a guest-side reader feeds to the command.
* :meth:`AgentTransport.open_channel` (the pause's lock session) starts a **detached holder**
  (:data:`HOLDER`) in a systemd scope of its own: the client reads a FIFO that a keeper process
  holds open, writes go to the FIFO through ``guest-exec``'s input, and its output is read from
  a file by offset. It keeps the guest-side limit of the command it runs (the lock session's
  ``timeout -s KILL``); closing ends the keeper, so the client sees end of input.
* :meth:`AgentTransport.detached` wraps what must outlive qemu-ga's own processes (the watchdog)
  in ``systemd-run --scope``: a restart of qemu-guest-agent kills its cgroup, a scope is not in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

from snapcoord.agent_link import AgentCommandError, AgentLink, AgentUnavailable, ExecStatus
from snapcoord.errors import GuestError
from snapcoord.guest import (
    Channel,
    ConnectionLost,
    Consumer,
    LineCallback,
    NoAnswer,
    Transport,
    _shielded,
)
from snapcoord.settings import GuestConfig
from snapcoord.shell import Completed, display

log = logging.getLogger("snapcoord.agent")

#: This coordinator's name in the guest-side folders' names (no dots: they separate fields).
_HOST = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"

#: Where transfers live in the guest (on disk: a dump may be large), under the guest's state
#: folder: ``/var/lib/snapcoord``, or what ``SNAPCOORD_GUEST_STATE`` says in the agent's
#: environment (an admin's choice in qemu-guest-agent's unit; the lab's stand-in guests use it).
#: Channels live in RAM. Both root-only, made by the commands below.
STATE_DIR = "/var/lib/snapcoord"
CHANNEL_DIR = "/run/snapcoord/channel"

# Prints the guest's state folder, and "systemd" where systemd runs; exit 3 without timeout(1).
_PROBE = r"""
command -v timeout >/dev/null || exit 3
printf '%s\n' "${SNAPCOORD_GUEST_STATE:-/var/lib/snapcoord}"
[ -d /run/systemd/system ] && echo systemd
exit 0
"""
#: How long one agent call may take (the link's own timeout): a stalled agent is not waited on.
CALL_SECONDS = 10.0
#: The first poll of a command's status, and the longest pause between polls.
FIRST_POLL, LONGEST_POLL = 0.001, 0.02
#: How long after its timeout a command's status is still awaited (the guest kills it at the
#: timeout; its end then has to reach us).
GRACE_SECONDS = 5.0

# $1 = the most bytes of stdout and of stderr to return, $2.. = the command: what it writes
# beyond is dropped (a libvirt reply over 4 MiB fails, and makes qemu-ga forget the command);
# the command's own exit status is kept.
_CAP_OUTPUT = r"""
n=$1; shift
{ rc=$( { { { "$@" 3>&- 4>&- 5>&-; echo $? >&3; } | head -c "$n" >&4; } 2>&1 \
  | head -c "$n" >&5; } 3>&1 ); } 4>&1 5>&2
exit "$rc"
"""

# Every argument carries one leading character: strip it, run the command.
_UNPREFIX = 'for a; do shift; set -- "$@" "${a#x}"; done; exec "$@"'

# $1 = a directory to make, root-only; refuses a link or a directory another user owns.
_PRIVATE_DIR = r"""
umask 077
d=$1
for p in "${d%/*}" "$d"; do
  [ -L "$p" ] && { echo "snapcoord: $p is a symbolic link" >&2; exit 97; }
done
mkdir -p "${d%/*}" && mkdir "$d" || exit 97
[ "$(stat -c %u "${d%/*}")" = 0 ] || { echo "snapcoord: ${d%/*} is not root's" >&2; exit 97; }
"""

# $1 = the transfer directory, $2 = the timeout, $3.. = the command: its stdout to $1/out.
_PRODUCE = (
    _PRIVATE_DIR
    + r"""
shift; t=$1; shift
exec timeout -s KILL "$t" "$@" > "$d/out"
"""
)

# $1 = the transfer directory (made already), $2 = the timeout, $3.. = the command. Chunk i is
# $d/in.i, complete once in.(i+1) or end exists; they are fed to the command's stdin in order.
_CONSUME = r"""
d=$1; t=$2; shift 2
feed() {
  i=0
  while :; do
    if [ -e "$d/in.$((i+1))" ] || [ -e "$d/end" ]; then
      [ -e "$d/in.$i" ] || return 0
      cat "$d/in.$i" || return 1
      rm -f "$d/in.$i"
      i=$((i+1))
    else
      sleep 0.02
    fi
  done
}
feed | timeout -s KILL "$t" "$@"
"""

# $1 = the channel directory, $2 = the seconds the keeper holds the FIFO open at most,
# $3.. = the command. Prints the client's PID. The client writes to a FIFO that a drainer copies
# to $d/out; the drainer (whose argv names no run, so a kill of a run's processes spares it)
# writes $d/ended once every writer is gone, however the client ended; its exit status goes to
# $d/status when its wrapper lives to write it.
HOLDER = (
    _PRIVATE_DIR
    + r"""
shift; keep=$1; shift
mkfifo "$d/in" "$d/pipe" || exit 97
sh -c 'cat "$1/pipe" > "$1/out"; : > "$1/ended"; kill "$(cat "$1/keeper")"' sh "$d" \
  < /dev/null > /dev/null 2>&1 &
setsid sh -c 'd=$1; shift; "$@" < "$d/in" > "$d/pipe" 2> "$d/err"; echo $? > "$d/status"' \
  sh "$d" "$@" < /dev/null > /dev/null 2>&1 &
echo $! > "$d/client"
sleep "$keep" > "$d/in" 2> /dev/null < /dev/null &
echo $! > "$d/keeper"
cat "$d/client"
"""
)

# $1 = the channel directory: ends the keeper (end of input for the client).
_END_INPUT = r"""
d=$1
[ -r "$d/keeper" ] && kill "$(cat "$d/keeper")" 2>/dev/null
exit 0
"""

# $1 = the channel directory: kills the client's group and the keeper, removes the directory.
_DISCARD = r"""
d=$1
for f in client keeper; do
  [ -r "$d/$f" ] || continue
  p=$(cat "$d/$f")
  kill -s KILL -- "-$p" 2>/dev/null || kill -s KILL "$p" 2>/dev/null
done
rm -rf -- "$d"
exit 0
"""


class AgentTransport:
    """Guest commands through the QEMU guest agent. ``connect`` gives the link once the
    hypervisor session is open and the VM found (the transport factory builds it)."""

    def __init__(
        self,
        guest: GuestConfig,
        connect: Callable[[], AgentLink],
        *,
        vm: str,
        disconnect: Callable[[], None] | None = None,
        streams: Transport | None = None,
    ) -> None:
        self.guest = guest
        #: where run_streaming goes instead (dump_transport = "ssh"); opened and closed with this
        self.streams = streams
        self.vm = vm
        self._connect = connect
        self._disconnect = disconnect
        self._link: AgentLink | None = None
        self._systemd = False
        self.transfer_dir = f"{STATE_DIR}/transfer"
        self._unremoved: list[str] = []  # transfer folders to remove again at close
        self._generation = 0
        self._lock = threading.Lock()
        self.description = "guest agent"

    # -- connection ------------------------------------------------------------------------
    def open(self) -> None:
        self._link = self._connect()
        self.description = self._link.description
        self._link.ping(timeout=min(CALL_SECONDS, self.guest.connect_timeout))
        probe = self.run(["sh", "-c", _PROBE], timeout=self.guest.connect_timeout)
        if probe.returncode == 3:
            raise GuestError("the guest has no `timeout` (coreutils)", vm=self.vm)
        words = probe.stdout.decode(errors="replace").split("\n")
        state = words[0] if probe.ok else ""
        if not state.startswith("/") or "/../" in f"{state}/" or not state.isprintable():
            raise GuestError(
                f"the guest's state folder is not an absolute path ({state!r}): "
                f"{probe.error_text()}",
                vm=self.vm,
            )
        self.transfer_dir = f"{state.rstrip('/')}/transfer"
        self._systemd = "systemd" in words[1:]
        self._remove_leftovers()
        if self.streams is not None:
            self.streams.open()
            self.description += f" (streams: {self.streams.description})"

    def _remove_leftovers(self) -> None:
        """Remove the transfer and channel folders an earlier run of this coordinator left when
        it was killed (a partial dump, a channel's FIFOs): named by its host and PID."""
        listing = self.run(
            ["sh", "-c", 'for d in "$@"; do [ -d "$d" ] && ls -1 -- "$d"; done; exit 0', "sh",
             self.transfer_dir, CHANNEL_DIR],
            timeout=self.guest.connect_timeout,
        )  # fmt: skip
        names = listing.stdout.decode(errors="replace").split()
        dead = _left_by_dead_runs(names)
        if dead:
            paths = [f"{base}/{name}" for name in dead for base in (self.transfer_dir, CHANNEL_DIR)]
            log.info("%s: removing what killed runs left in the guest: %s", self.vm, dead)
            self._run(["rm", "-rf", "--", *paths], timeout=60, stdin=None)

    @property
    def link(self) -> AgentLink:
        if self._link is None:
            raise GuestError("the guest agent transport is not open", vm=self.vm)
        return self._link

    def close(self) -> None:
        if self.streams is not None:
            self.streams.close()
        unremoved, self._unremoved = self._unremoved, []
        if self._link is not None:
            for folder in unremoved:
                self._remove(folder, last=True)
            self._link.close()
            self._link = None
        if self._disconnect is not None:
            self._disconnect()
            self._disconnect = None

    @property
    def generation(self) -> int:
        return self._generation

    def reconnect(self, generation: int) -> None:
        """Ask the agent again: a restarted qemu-ga answers, a stalled one raises
        :class:`AgentUnavailable` (a :class:`GuestUnreachable`: the caller's budget decides)."""
        with self._lock:
            if generation != self._generation:
                return
            log.warning("%s: asking the guest agent again", self.vm)
            self.link.ping(timeout=min(CALL_SECONDS, self.guest.connect_timeout))
            self._generation += 1

    def warm(self, count: int, *, sudo: bool) -> None:
        """Nothing to warm: every command is one agent call."""

    def detached(self, argv: Sequence[str]) -> list[str]:
        if not self._systemd:
            return list(argv)
        unit = f"snapcoord-{secrets.token_hex(6)}"
        return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}", "--", *argv]

    # -- commands --------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        timeout: float,
        stdin: bytes | None = None,
        shield: bool = False,
        on_line: LineCallback | None = None,
    ) -> Completed:
        """``sudo`` and ``on_line`` are not used: qemu-ga runs commands as root, and their
        output arrives when they ended."""
        log.debug("guest %s (agent): %s", self.vm, display(argv))

        def call() -> Completed:
            return self._run(argv, timeout=timeout, stdin=stdin)

        return _shielded(call) if shield else call()

    def _run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None) -> Completed:
        started = time.monotonic()
        cap = self.link.max_output
        capped = ["sh", "-c", _CAP_OUTPUT, "sh", str(cap), *argv] if cap else list(argv)
        limited = ["timeout", "-s", "KILL", _seconds(timeout), *capped]
        if stdin is not None and len(stdin) > self.link.max_input:
            return self._run_with_file(argv, timeout=timeout, stdin=stdin)
        pid = self._exec(limited, stdin=stdin)
        status = self._wait(pid, started + timeout + GRACE_SECONDS, argv)
        if cap and (len(status.stdout) >= cap or len(status.stderr) >= cap):
            raise GuestError(
                f"the output of {argv[0]} is larger than {self.link.description} carries "
                f"({cap >> 10} KiB)",
                vm=self.vm,
            )
        if status.truncated:
            raise GuestError(
                f"the output of {argv[0]} is larger than the guest agent keeps (16 MiB)",
                vm=self.vm,
            )
        return _completed(argv, status, started, timeout)

    def _wait(self, pid: int, deadline: float, argv: Sequence[str]) -> ExecStatus:
        pause = FIRST_POLL
        while True:
            status = self._status(pid, argv)
            if status.exited:
                return status
            if time.monotonic() > deadline:
                raise NoAnswer(
                    f"{argv[0]} in the guest did not end within its timeout (guest agent)",
                    vm=self.vm,
                )
            time.sleep(pause)
            pause = min(LONGEST_POLL, pause * 2)

    def _exec(self, argv: Sequence[str], *, stdin: bytes | None) -> int:
        """``guest-exec``; a refusal says why in one line (frozen file systems, blocked RPCs).
        Proxmox's API drops empty form values, so a command with an empty argument is sent with
        every argument prefixed by one character that a wrapper strips again."""
        if "" in argv:
            argv = ["sh", "-c", _UNPREFIX, "sh", *(f"x{arg}" for arg in argv)]
        try:
            return self.link.exec(argv, stdin=stdin, timeout=CALL_SECONDS)
        except AgentCommandError as exc:
            if "frozen" in exc.message:
                raise GuestError(
                    "the guest's file systems are frozen: its agent refuses to run commands",
                    vm=self.vm,
                    hint="thaw them (virsh domfsthaw DOMAIN, or qm guest cmd VMID "
                    "fsfreeze-thaw) once no backup is running",
                ) from None
            if "disabled" in exc.message:
                raise GuestError(
                    f"the guest agent refuses to run commands ({exc.message})",
                    vm=self.vm,
                    hint="allow guest-exec, guest-exec-status and guest-file-* in the guest's "
                    "/etc/qemu/qemu-ga.conf (block-rpcs / allow-rpcs)",
                ) from None
            raise

    def _status(self, pid: int, argv: Sequence[str]) -> ExecStatus:
        """The status of a command that started: an agent that stopped answering, or forgot the
        command (it restarted), lost it; it may or may not have run to its end."""
        try:
            return self.link.exec_status(pid, timeout=CALL_SECONDS)
        except (AgentUnavailable, AgentCommandError) as exc:
            raise ConnectionLost(
                f"the guest agent lost {argv[0]} (pid {pid}) while it ran: {exc.message}",
                vm=self.vm,
            ) from None

    def _checked(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None) -> None:
        result = self._run(argv, timeout=timeout, stdin=stdin)
        if not result.ok:
            raise GuestError(f"guest agent: {argv[0]} failed: {result.error_text()}", vm=self.vm)

    def _run_with_file(self, argv: Sequence[str], *, timeout: float, stdin: bytes) -> Completed:
        """stdin larger than one exec carries: written to a transfer file first."""
        folder = self._transfer_dir()
        try:
            self._upload(f"{folder}/stdin", stdin)
            script = 'f=$1; shift; t=$1; shift; exec timeout -s KILL "$t" "$@" < "$f"'
            return self._run(
                ["sh", "-c", script, "sh", f"{folder}/stdin", _seconds(timeout), *argv],
                timeout=timeout + 1,
                stdin=None,
            )
        finally:
            self._remove(folder)

    def run_streaming(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        timeout: float,
        stdin: bytes = b"",
        source: BinaryIO | None = None,
        consume: Consumer | None = None,
        shield: bool = False,
    ) -> Completed:
        if self.streams is not None:
            return self.streams.run_streaming(
                argv, sudo=sudo, timeout=timeout, stdin=stdin, source=source, consume=consume,
                shield=shield,
            )  # fmt: skip
        log.debug("guest %s (agent, streamed): %s", self.vm, display(argv))

        def call() -> Completed:
            if source is not None:
                return self._stream_in(argv, timeout=timeout, stdin=stdin, source=source)
            return self._stream_out(argv, timeout=timeout, stdin=stdin, consume=consume)

        return _shielded(call) if shield else call()

    def _transfer_dir(self) -> str:
        folder = f"{self.transfer_dir}/{_folder_name()}"
        self._checked(["sh", "-c", _PRIVATE_DIR, "sh", folder], timeout=CALL_SECONDS)
        return folder

    def _remove(self, folder: str, *, last: bool = False) -> None:
        """Remove a transfer folder; one the agent could not reach for (the API or the agent
        did not answer just then) is tried again when the transport closes, after the unwind
        reached the guest again; past that, a later run removes it (:meth:`_remove_leftovers`)."""
        try:
            self._run(["rm", "-rf", "--", folder], timeout=CALL_SECONDS, stdin=None)
        except GuestError as exc:
            if not last:
                self._unremoved.append(folder)
            log.warning(
                "%s: could not remove %s in the guest%s: %s",
                self.vm,
                folder,
                " (a later run removes it)" if last else " (tried again at the end)",
                exc,
            )

    def _stream_out(
        self, argv: Sequence[str], *, timeout: float, stdin: bytes, consume: Consumer | None
    ) -> Completed:
        """The command writes its stdout to a root-only file; it is read back while it grows,
        and its sha256 in the guest is compared with what arrived."""
        started = time.monotonic()
        link = self.link
        folder = f"{self.transfer_dir}/{_folder_name()}"
        out = f"{folder}/out"
        produce = ["sh", "-c", _PRODUCE, "sh", folder, _seconds(timeout), *argv]
        digest = hashlib.sha256()
        received = 0
        try:
            if len(stdin) > link.max_input:
                raise GuestError("a streamed command's input is too large", vm=self.vm)
            pid = self._exec(produce, stdin=stdin)
            deadline = started + timeout + GRACE_SECONDS
            pause = FIRST_POLL
            status: ExecStatus | None = None
            while True:
                ended = status is not None
                try:
                    data, _ = link.read_file(
                        out, offset=received, count=link.max_read, timeout=CALL_SECONDS
                    )
                except AgentCommandError:
                    data = b""  # not made yet (or the command failed before it)
                if data:
                    received += len(data)
                    digest.update(data)
                    if consume is not None:
                        try:
                            consume(data)
                        except BaseException:
                            self._kill(pid)
                            raise
                    pause = FIRST_POLL
                    continue
                if ended:
                    break
                status = self._status(pid, argv)
                if status.exited:
                    continue  # one more read: what it wrote last
                status = None
                if time.monotonic() > deadline:
                    raise NoAnswer(
                        f"{argv[0]} in the guest did not end within its timeout (guest agent)",
                        vm=self.vm,
                    )
                time.sleep(pause)
                pause = min(LONGEST_POLL * 5, pause * 2)
            assert status is not None
            if status.returncode == 0:
                self._compare_digest(out, digest.hexdigest(), received)
            return _completed(argv, status, started, timeout, output=False)
        finally:
            self._remove(folder)

    def _compare_digest(self, path: str, expected: str, size: int) -> None:
        result = self._run(["sha256sum", "--", path], timeout=max(CALL_SECONDS, 60.0), stdin=None)
        words = result.stdout.decode(errors="replace").split()
        if not result.ok or not words:
            raise GuestError(f"sha256sum in the guest failed: {result.error_text()}", vm=self.vm)
        if words[0] != expected:
            raise GuestError(
                f"the stream read through the guest agent ({size} bytes) does not match the "
                "guest's file (sha256 differs)",
                vm=self.vm,
            )

    def _kill(self, pid: int) -> None:
        """Kill a command this transport started (its process group: ``timeout`` leads it)."""
        with contextlib.suppress(GuestError):
            self._run(
                ["sh", "-c", 'kill -s KILL -- "-$1" 2>/dev/null || kill -s KILL "$1"', "sh",
                 str(pid)],
                timeout=CALL_SECONDS,
                stdin=None,
            )  # fmt: skip

    def _upload(self, path: str, data: bytes) -> None:
        """Write ``data`` into one guest file; several writes where one would be too large
        (a link that replaces files writes numbered pieces joined by ``cat``)."""
        size = self.link.max_write
        if len(data) <= size:
            self.link.write_file(path, data, timeout=CALL_SECONDS)
            return
        pieces = [data[i : i + size] for i in range(0, len(data), size)]
        for number, piece in enumerate(pieces):
            self.link.write_file(f"{path}.{number}", piece, timeout=CALL_SECONDS)
        script = 'f=$1; n=$2; i=0; : > "$f"; while [ "$i" -lt "$n" ]; do ' \
            'cat "$f.$i" >> "$f" && rm -f "$f.$i" || exit 1; i=$((i+1)); done'  # fmt: skip
        self._checked(["sh", "-c", script, "sh", path, str(len(pieces))], timeout=60)

    def _stream_in(
        self, argv: Sequence[str], *, timeout: float, stdin: bytes, source: BinaryIO
    ) -> Completed:
        """The command reads chunks written into a root-only folder, in order."""
        started = time.monotonic()
        link = self.link
        folder = self._transfer_dir()
        try:
            consume = ["sh", "-c", _CONSUME, "sh", folder, _seconds(timeout), *argv]
            pid = self._exec(consume, stdin=None)
            number = 0
            pending = stdin
            deadline = started + timeout + GRACE_SECONDS
            status: ExecStatus | None = None  # qemu-ga forgets a command once it said it exited
            while True:
                chunk = pending or source.read(link.max_write)
                pending = b""
                if not chunk:
                    break
                if len(chunk) > link.max_write:
                    pending, chunk = chunk[link.max_write :], chunk[: link.max_write]
                link.write_file(f"{folder}/in.{number}", chunk, timeout=CALL_SECONDS)
                number += 1
                status = self._status(pid, argv)
                if status.exited:
                    break  # it ended early (an error): its status says why
                status = None
                if time.monotonic() > deadline:
                    break
            if status is None:  # (not empty: Proxmox's API cannot write an empty file)
                link.write_file(f"{folder}/end", b"end\n", timeout=CALL_SECONDS)
                status = self._wait(pid, deadline, argv)
            return _completed(argv, status, started, timeout)
        finally:
            self._remove(folder)

    # -- channels --------------------------------------------------------------------------
    def open_channel(self, argv: Sequence[str], *, sudo: bool = False) -> Channel:
        return AgentChannel(self, argv)


class AgentChannel:
    """:class:`~snapcoord.guest.Channel` through a detached holder in the guest (see
    :data:`HOLDER`): writes go to its FIFO, lines are read from its output file by offset."""

    #: The keeper holds the FIFO open at most this long: the command it feeds carries its own
    #: limit (the lock session's ``timeout -s KILL``); this only bounds a forgotten keeper.
    KEEP_SECONDS = 24 * 3600

    def __init__(self, transport: AgentTransport, argv: Sequence[str]) -> None:
        self.transport = transport
        self.argv = list(argv)
        self.folder = f"{CHANNEL_DIR}/{_folder_name()}"
        self._offset = 0
        self._pending = b""
        self._ended = False
        self._final = False  # the client ended: one more read takes what it wrote last
        self._code: int | None = None
        self._end_seen = False
        self._started = False

    def start(self) -> None:
        argv = ["sh", "-c", HOLDER, "sh", self.folder, str(self.KEEP_SECONDS), *self.argv]
        result = self.transport.run(self.transport.detached(argv), timeout=CALL_SECONDS)
        if not result.ok:
            raise GuestError(
                f"cannot start the guest-side holder: {result.error_text()}",
                vm=self.transport.vm,
            )
        self._started = True

    def write(self, data: bytes) -> None:
        if not data or self._ended:
            return
        try:
            self.transport.run(
                ["sh", "-c", 'cat 1<> "$1"', "sh", f"{self.folder}/in"],
                timeout=CALL_SECONDS,
                stdin=data,
            )
        except GuestError as exc:
            log.debug("%s: a write to the channel failed: %s", self.transport.vm, exc)

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        pause = FIRST_POLL
        while True:
            line = self._take_line()
            if line is not None:
                return line
            if self._ended:
                return None
            link = self.transport.link
            try:
                data, _ = link.read_file(
                    f"{self.folder}/out", offset=self._offset, count=1 << 16,
                    timeout=CALL_SECONDS,
                )  # fmt: skip
            except (AgentCommandError, AgentUnavailable):
                data = b""
            if data:
                self._offset += len(data)
                self._pending += data
                pause = FIRST_POLL
                continue
            if self._final:
                self._ended = True
                continue
            if self._finished():
                self._final = True
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(LONGEST_POLL, pause * 2)

    def _take_line(self) -> str | None:
        end = self._pending.find(b"\n")
        if end < 0:
            if self._ended and self._pending:
                rest, self._pending = self._pending, b""
                return rest.decode("utf-8", errors="replace")
            return None
        line, self._pending = self._pending[:end], self._pending[end + 1 :]
        return line.decode("utf-8", errors="replace")

    def _finished(self) -> bool:
        """Whether the client ended (the drainer saw every writer go); its status is read too."""
        if self._end_seen:
            return True
        if not self._read_small("ended")[0]:
            return False
        self._end_seen = True
        for _ in range(25):  # the wrapper writes the status right after; a killed one never
            present, text = self._read_small("status")
            if present and text.strip().isdigit():
                self._code = int(text.strip())
                break
            time.sleep(0.02)
        return True

    def _read_small(self, name: str) -> tuple[bool, str]:
        """(exists, content) of a small file of the channel."""
        try:
            data, _ = self.transport.link.read_file(
                f"{self.folder}/{name}", offset=0, count=64, timeout=CALL_SECONDS
            )
        except (AgentCommandError, AgentUnavailable):
            return False, ""
        return True, data.decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self._started and not self._ended and not self._finished()

    def exit_code(self) -> int | None:
        if self._started:
            self._finished()
        return self._code

    def error_text(self) -> str:
        try:
            data, _ = self.transport.link.read_file(
                f"{self.folder}/err", offset=0, count=1 << 16, timeout=CALL_SECONDS
            )
        except GuestError:
            return ""
        lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def close(self, *, wait: float = 5.0) -> None:
        if not self._started:
            return
        transport = self.transport
        try:
            transport.run(["sh", "-c", _END_INPUT, "sh", self.folder], timeout=CALL_SECONDS)
            deadline = time.monotonic() + wait
            while not self._finished() and time.monotonic() < deadline:
                time.sleep(0.02)
        except GuestError as exc:
            log.debug("%s: ending the channel: %s", transport.vm, exc)
        finally:
            try:
                transport.run(["sh", "-c", _DISCARD, "sh", self.folder], timeout=CALL_SECONDS)
            except GuestError as exc:
                log.warning("%s: the channel in %s is left: %s", transport.vm, self.folder, exc)
            self._started = False
            self._ended = True


def _folder_name() -> str:
    """``<coordinator>.<pid>.<random>``: a later run of this coordinator removes the folders of
    its runs that died (SIGKILL) before they could (:meth:`AgentTransport._remove_leftovers`)."""
    return f"{_HOST}.{os.getpid()}.{secrets.token_hex(6)}"


def _left_by_dead_runs(names: Sequence[str]) -> list[str]:
    """The folder names of this coordinator's runs whose process is gone."""
    dead = []
    for name in names:
        host, _, rest = name.partition(".")
        pid = rest.partition(".")[0]
        if host != _HOST or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            dead.append(name)
        except PermissionError:
            pass  # alive, another user's
    return dead


def _completed(
    argv: Sequence[str], status: ExecStatus, started: float, timeout: float, *, output: bool = True
) -> Completed:
    """The :class:`Completed` of a command the agent ran (``output``: its stdout, which a
    stream sent to a file instead)."""
    elapsed = time.monotonic() - started
    stdout = status.stdout if output else b""
    return Completed(tuple(argv), status.returncode, stdout, status.stderr, elapsed,
                     timed_out=_timed_out(status, elapsed, timeout))  # fmt: skip


def _timed_out(status: ExecStatus, elapsed: float, timeout: float) -> bool:
    """Whether the guest's ``timeout -s KILL`` ended the command (it, or its group, was killed)."""
    return status.returncode in (124, 137) and elapsed >= timeout


def _seconds(timeout: float) -> str:
    return str(max(1, math.ceil(timeout)))

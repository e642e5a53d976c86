"""Pausing writes: a database client in the guest that holds a lock while the coordinator feeds
it SQL one statement at a time (``consistency = "pause"``, docs/consistency.md).

The session runs over the guest connection like any command, but stays open: the client reads
SQL from stdin in batch, unbuffered, no-reconnect mode, and after each statement the coordinator
sends a marker query whose output line says the statement finished. The lock can never outlive
``pause_timeout``: the guest runs the client under ``timeout -s KILL``, so it ends even when
snapcoord is killed or the network stalls; closing stdin (snapcoord exiting, the connection
cut) ends it sooner, and the server releases a session's locks when the session ends.

Every client is started with a marker in its argv (``snapcoord-pause:<run id>``), so the guest's
process table shows which lock sessions are snapcoord's: after a revert to a snapshot that holds
RAM, the session that was running when it was taken comes back, and :func:`kill_sessions` ends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from snapcoord.errors import GuestError, PreflightError, SnapshotFailed
from snapcoord.guest import Transport
from snapcoord.text import clip

log = logging.getLogger("snapcoord.pause")

MARKER_PREFIX = "snapcoord-pause:"
_MARK = "snapcoord-mark:"

# $0 = the marker; $1 = option file length (read first from stdin), $2 = the time limit in
# seconds, $3.. = the client and its arguments. The rest of stdin is the SQL.
SESSION_SCRIPT = r"""
umask 077
n=$1; limit=$2; shift 2
for t in timeout "$1"; do
  command -v "$t" >/dev/null 2>&1 || { echo "snapcoord: $t not found in the guest" >&2; exit 127; }
done
trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
if [ "$n" -gt 0 ]; then
  cnf=$(dd bs=1 count="$n" 2>/dev/null) || exit 96
  exec 9<<EOF || exit 96
$cnf
EOF
  prog=$1; shift; set -- "$prog" "--defaults-extra-file=/dev/fd/9" "$@"
fi
timeout -s KILL "$limit" "$@"
"""

# $@ = run ids. Kill those runs' snapcoord lock sessions in the guest (their argv carries the
# marker with the run id), never another run's; prints the PIDs. The pattern is split so that
# this script's own command line does not match it.
KILL_SCRIPT = r"""
p="snapcoord-""pause:"
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = $$ ] && continue
  cmd="$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null) " || continue
  for run in "$@"; do
    case $cmd in
      *"$p$run"[!A-Za-z0-9._:-]*) kill -s KILL "$pid" 2>/dev/null && echo "$pid"; break;;
    esac
  done
done
exit 0
"""


class LockLost(SnapshotFailed):
    """The lock session ended or stopped answering while commits were meant to be held."""


@dataclass
class PausePlan:
    """What preflight decided for ``consistency = "pause"``."""

    method: str  # "backup_stage" or "ftwrl"
    server_version: str
    binlog: bool  # the binary log is on: a commit position is recorded and checked
    sync: list[str] = field(default_factory=list)  # why the datadir is synced (empty: not)
    datadir: str | None = None
    statements: list[str] = field(default_factory=list)  # the SQL that holds, in order
    release: list[str] = field(default_factory=list)  # the SQL that releases
    extra: dict[str, Any] = field(default_factory=dict)  # what the kind adds (libcloud-style)


@dataclass
class PauseResult:
    """What a pause did, for --json and the run journal."""

    method: str
    connection_id: int | None = None
    position: dict[str, str] | None = None  # binlog file/pos and GTID at the pause
    held_from: float | None = None  # epoch: the holding statement returned
    released_at: float | None = None  # epoch: the release returned (or the session ended)
    release_sent: float | None = None  # epoch: the release was sent
    synced: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        if self.held_from is None or self.released_at is None:
            return None
        return self.released_at - self.held_from

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "connection_id": self.connection_id,
            "position": self.position,
            "held_from": self.held_from,
            "release_sent": self.release_sent,
            "released_at": self.released_at,
            "synced": self.synced,
        }


class WritePause(Protocol):
    """A database kind's pause: hold commits, check nothing moved, release (idempotent)."""

    result: PauseResult

    def hold(self) -> None: ...

    def remaining(self) -> float:
        """Seconds left before the guest's time limit ends the session."""
        ...

    def check_alive(self) -> None:
        """Right before the hypervisor call: still holding, with time left."""
        ...

    def verify(self) -> None: ...

    def release(self) -> None: ...


class LockSession:
    """One long-lived client in the guest, fed SQL on stdin, read line by line, through the
    transport's channel (a process over SSH or exec; a detached holder over the guest agent)."""

    def __init__(
        self,
        transport: Transport,
        client_argv: Sequence[str],
        *,
        vm: str,
        sudo: bool,
        limit: float,
        option_file: bytes = b"",
    ) -> None:
        self.transport = transport
        self.vm = vm
        self.limit = int(limit)
        argv = ["sh", "-c", SESSION_SCRIPT, "snapcoord-session", str(len(option_file)),
                str(self.limit), *client_argv]  # fmt: skip
        self._channel = transport.open_channel(argv, sudo=sudo)
        self._option_file = option_file
        self._marks = 0
        self.started: float | None = None  # monotonic: the guest's time limit counts from here

    def start(self) -> None:
        self.started = time.monotonic()
        self._channel.start()
        self._channel.write(self._option_file)

    def remaining(self) -> float:
        if self.started is None:
            return float(self.limit)
        return self.limit - (time.monotonic() - self.started)

    def execute(self, sql: str, *, timeout: float) -> list[list[str]]:
        """Send one statement and a marker query; return the statement's rows once the marker
        line arrives. LockLost when the session ends or does not answer within ``timeout``."""
        self._marks += 1
        mark = f"{_MARK}{self._marks}"
        statement = sql.strip().rstrip(";")
        self._channel.write(f"{statement};\nSELECT '{mark}';\n".encode())
        deadline = time.monotonic() + timeout
        rows: list[list[str]] = []
        while True:
            try:
                line = self._channel.readline(deadline - time.monotonic())
            except TimeoutError:
                raise LockLost(
                    f"the database session in the guest did not answer {_first_word(sql)} "
                    f"within {timeout:.0f} s",
                    vm=self.vm,
                ) from None
            if line is None:
                raise LockLost(
                    f"the database session in the guest ended during {_first_word(sql)}: "
                    f"{self.error_text()}",
                    vm=self.vm,
                )
            if line == mark:
                return rows
            rows.append(line.split("\t"))

    def error_text(self) -> str:
        text = self._channel.error_text()
        if text:
            return clip(text, 300)
        code = self._channel.exit_code()
        if code == 255:
            return "the connection to the guest was lost"
        if code == 137:
            return "killed (pause_timeout reached)"
        return f"exit status {code}" if code is not None else "no answer"

    @property
    def alive(self) -> bool:
        return self._channel.alive

    def close(self, *, wait: float = 5.0) -> None:
        """End the session: end of input ends the client; killed if it hangs."""
        self._channel.close(wait=wait)


def _first_word(sql: str) -> str:
    words = sql.strip().split()
    return " ".join(words[:3]) if words else "(nothing)"


def kill_sessions(
    transport: Transport, *, runs: Sequence[str], vm: str, sudo: bool, timeout: float
) -> list[int]:
    """End the snapcoord lock sessions of runs ``runs`` in the guest, never another run's
    (after a revert to a snapshot with RAM: the session that held the lock when it was taken
    resumes with it). Returns their PIDs."""
    if not runs:
        return []
    result = transport.run(["sh", "-c", KILL_SCRIPT, "sh", *runs], sudo=sudo, timeout=timeout)
    if not result.ok:
        raise GuestError(f"looking for lock sessions failed: {result.error_text()}", vm=vm)
    return [int(w) for w in result.stdout.decode().split() if w.isdigit()]


def refuse(kind: str, *, vm: str) -> PreflightError:
    """The error for a database kind that cannot hold commits without stopping."""
    return PreflightError(
        f"consistency = 'pause' is not possible with {kind}: it has no way to hold commits "
        "while the server keeps running",
        vm=vm,
        hint="set [vms.X.guest] consistency = 'stop' for this VM",
    )

"""``freeze`` / ``thaw``: quiesce a guest for somebody else's snapshot (a backup product, vzdump)
and put it back when told.

``freeze`` cannot simply exit with the guest quiesced: holding commits needs a live database
session, and the guest must come back even if ``thaw`` never comes. So ``freeze`` starts a
*holder* (snapcoord/holder.py): a detached snapcoord process that runs the freeze plan under the
VM's lock and run journal, says "frozen" (``freeze`` then exits 0) and waits on a Unix socket
for ``thaw``. A thaw makes the plan unwind (services started, commits released, the watchdog
disarmed); the holder streams the step lines and the outcome back to ``thaw``.

If no thaw comes, the holder restores at ``max_seconds``. If the holder is gone (SIGKILL, the
host rebooted), the guest restores itself: the lock session ends at ``max_seconds`` (``timeout -s
KILL`` in the guest), the watchdog fires shortly after; ``thaw`` then works from the journal,
like ``recover``. docs/scheduling.md tells the story for users.

The holder talks JSON lines: to ``freeze`` on its stdout until it is frozen, to ``thaw`` on the
socket connection. Events: ``step_started``/``step_ended`` (a step record), ``note``, ``frozen``
(the freeze's state) and ``outcome`` (the last one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from snapcoord.config import Config
from snapcoord.errors import (
    ExitCode,
    Locked,
    PreflightError,
    SnapcoordError,
    SnapshotFailed,
)
from snapcoord.freeze_state import FreezeState
from snapcoord.journal import Journal
from snapcoord.outcome import Outcome
from snapcoord.run import Reporter, StepRecord
from snapcoord.secrets import child_environment
from snapcoord.settings import VMConfig
from snapcoord.shell import python_module, spawn
from snapcoord.store import create_file, ensure_private

#: AF_UNIX paths longer than this do not fit sockaddr_un (108 bytes with the NUL)
_MAX_SOCKET_PATH = 100
#: the runtime directory for root's sockets (see runtime_dir)
_ROOT_RUNTIME = Path("/run/snapcoord-freeze")  # not the guest scripts' /run/snapcoord
#: the holder answers a thaw within this (it hears every client within 5 s)
_THAW_ANSWER = 15.0
#: what thaw_deadline adds to the unwind's own bounds
_THAW_SPARE = 60.0
#: the longest event line thaw reads
_MAX_EVENT = 1 << 20
#: how long thaw waits for a holder that is restoring by itself (the limit was reached)
_LOCK_WAIT = 300.0


class ThawTimeout(SnapshotFailed):
    """No thaw came within the limit: the holder put the guest back by itself."""


# -- the wire --------------------------------------------------------------------------------


def socket_path(config: Config, key: str) -> Path:
    """Where VM ``key``'s holder listens: in the store, or (a long store path) in the private
    runtime directory (:func:`runtime_dir`), named by a hash of the store path."""
    path = config.store / "freeze" / f"{key}.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:24]
    return runtime_dir() / f"{digest}.sock"


def runtime_dir() -> Path:
    """The directory for sockets whose store path is too long: ``/run/snapcoord-freeze`` for
    root, else ``$XDG_RUNTIME_DIR/snapcoord`` (a per-user directory only that user can use) or
    ``/tmp/snapcoord-<uid>``. Whichever it is, :func:`private_dir` checks it before any use:
    one that someone else created is refused, never reused."""
    uid = os.geteuid()
    if uid == 0:
        return _ROOT_RUNTIME
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/") and len(xdg) < _MAX_SOCKET_PATH - 40:
        return Path(xdg) / "snapcoord"
    return Path(tempfile.gettempdir()) / f"snapcoord-{uid}"


def private_dir(path: Path, *, create: bool = True) -> bool:
    """Make sure ``path`` is a directory only this user can use: a real directory (not a
    symlink), owned by this user, mode 0700. Created (0700) when missing and ``create``; False
    when missing and not ``create``. Anything else is refused in one line, and nothing is
    created in it."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # ours, just made: whatever the umask took away
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise
        return False
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    elif stat.S_IMODE(info.st_mode) != 0o700:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}, not 0700"
    else:
        return True
    raise PreflightError(
        f"{path} {problem}: it must be a directory only this user can use (mode 0700); "
        "not using it",
        hint="remove it if nobody should have made it",
    )


def open_log(store: Path, key: str) -> tuple[Path, IO[bytes]]:
    """A new log for this VM's freeze holder, ``<store>/freeze/<vm>.log`` (the last freeze's):
    the store is checked first; the old log (or a link at its name) is replaced, never
    written through."""
    logs = ensure_private(store, "freeze", vm=key)
    private_dir(logs)
    log_path = logs / f"{key}.log"
    return log_path, os.fdopen(create_file(log_path), "wb")


def outcome_dict(outcome: Outcome) -> dict[str, Any]:
    return {
        "vm": outcome.vm,
        "exit_code": outcome.exit_code,
        "summary": outcome.summary,
        "lines": outcome.lines,
        "errors": outcome.errors,
    }


def outcome_from(data: dict[str, Any]) -> Outcome:
    return Outcome(
        str(data["vm"]),
        int(data["exit_code"]),
        dict(data["summary"]),
        [str(x) for x in data.get("lines", [])],
        [str(x) for x in data.get("errors", [])],
    )


def events(stream: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    for raw in stream:
        with contextlib.suppress(ValueError):
            event = json.loads(raw)
            if isinstance(event, dict):
                yield event


class Relay:
    """Replays a holder's step events on a local reporter (the records keep their identity,
    which the step-line view relies on)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.records: dict[int, StepRecord] = {}

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("step_started", "step_ended"):
            data = event["record"]
            record = self.records.setdefault(
                int(event["id"]), StepRecord(str(data["name"]), float(data["started"]))
            )
            record.undo = bool(data.get("undo"))
            record.ended, record.ok, record.error = data.get("ended"), data["ok"], data["error"]
            if kind == "step_started":
                self.reporter.step_started(record)
            else:
                self.reporter.step_ended(record)
        elif kind == "note":
            self.reporter.note(str(event["text"]))


# -- freeze -----------------------------------------------------------------------------------


def holder_state(config: Config, key: str) -> FreezeState | None:
    """The live holder's freeze state, or None when no holder answers (or its answer is not
    a freeze state)."""
    path = socket_path(config, key)
    if not private_dir(path.parent, create=False):
        return None  # refused in one line when it is not ours and private
    try:
        with _connect(path) as conn:
            conn.sendall(b"status\n")
            for event in events(conn.makefile("rb")):
                if event.get("event") == "frozen":
                    return FreezeState.parse(event)
    except OSError:
        return None
    return None


def freeze_vm(
    config: Config,
    key: str,
    *,
    max_seconds: int,
    reporter: Reporter,
    source: str = "freeze",
    vmid: int | None = None,
) -> Outcome:
    """Start the holder for ``key`` and wait until it is frozen or has given up."""
    from snapcoord.plans.freeze import frozen_config

    frozen_config(config, key, max_seconds)  # a VM without a guest is refused here
    state = holder_state(config, key)
    if state is not None:
        raise Locked(
            f"already frozen since {_clock(state.since)} (until {_clock(state.until)} at "
            f"the latest, by {state.source})",
            vm=key,
            hint=f"run snapcoord thaw {key} first",
        )
    source_path = str(Path(config.source).resolve())
    # isolated (-I) and in "/": a snapcoord/holder.py in the caller's directory must not run
    # as root. The config file's path is resolved above; the schema takes absolute paths only.
    argv = [*python_module("snapcoord.holder"), "--config", source_path]
    argv += ["--max-seconds", str(max_seconds), "--source", source]
    argv += ["--vmid", str(vmid)] if vmid is not None else []
    log_path, log = open_log(config.store, key)  # the last freeze's log
    with log:
        # the holder loads the same configuration: it alone keeps the secret variables
        holder = spawn([*argv, "--", key], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=log, cwd="/", env=child_environment(with_secrets=True))  # fmt: skip
    assert holder.stdout is not None
    relay = Relay(reporter)
    for event in events(holder.stdout):
        frozen = FreezeState.parse(event) if event.get("event") == "frozen" else None
        if frozen is not None:
            holder.stdout.close()  # the holder goes on alone
            return _frozen_outcome(key, frozen)
        if event.get("event") == "outcome":
            holder.wait()
            return outcome_from(event)
        relay.handle(event)
    code = holder.wait()
    return Outcome(
        key,
        ExitCode.BUG,
        {"vm": key, "ok": False, "exit_code": int(ExitCode.BUG), "command": "freeze"},
        errors=[f"{key}: the freeze holder ended without a result (exit {code}); see {log_path}"],
    )


def _frozen_outcome(key: str, state: FreezeState) -> Outcome:
    what = "commits held" if state.consistency == "pause" else "services stopped"
    summary = {"vm": key, "ok": True, "exit_code": 0, "command": "freeze", **state.as_dict()}
    line = (
        f"{key}: frozen ({what}) until {_clock(state.until)} at the latest; "
        f"run: snapcoord thaw {key}"
    )
    return Outcome(key, ExitCode.OK, summary, [line])


def _clock(epoch: Any) -> str:
    try:
        return datetime.fromtimestamp(float(epoch)).strftime("%H:%M:%S")
    except (TypeError, ValueError):
        return "?"


# -- thaw -------------------------------------------------------------------------------------


def thaw_vm(config: Config, key: str, *, reporter: Reporter) -> Outcome:
    """Tell the holder to put the guest back and relay what it did; without a holder, put back
    what the journal says (the holder died) or say there was nothing frozen.

    thaw has its own deadlines: the holder must answer within ``_THAW_ANSWER`` and finish within
    :func:`thaw_deadline`; past either, one line and exit 6 (the holder may still be restoring).
    A connection the holder resets or closes without a result (it reached its limit, it died)
    is the journal's story, like no holder at all: exit 5 when the freeze had ended at its
    limit. Lines that are not the holder's events are skipped."""
    vm = config.vm(key)
    path = socket_path(config, key)
    if not private_dir(path.parent, create=False):
        return _thaw_without_holder(config, key)
    started = time.monotonic()
    deadline = started + thaw_deadline(vm)
    try:
        conn = _connect(path, timeout=_THAW_ANSWER)
    except (FileNotFoundError, ConnectionRefusedError):
        return _thaw_without_holder(config, key)
    except TimeoutError:
        raise _unanswered(config, key, "did not accept the thaw", _THAW_ANSWER) from None
    except OSError as exc:
        raise PreflightError(
            f"cannot reach the freeze holder at {path}: {exc.strerror}",
            vm=key,
            hint="run thaw as the user who ran freeze",
        ) from None
    relay = Relay(reporter)
    with conn:
        try:
            outcome = _relay_thaw(conn, relay, min(started + _THAW_ANSWER, deadline), deadline)
        except _NoAnswer:
            raise _unanswered(config, key, "did not answer the thaw", _THAW_ANSWER) from None
        except TimeoutError:
            what = "did not finish putting the guest back"
            raise _unanswered(config, key, what, deadline - started) from None
        except OSError:
            outcome = None  # reset or broken: the holder went away (at its limit, or died)
    if outcome is not None:
        return outcome
    return _thaw_without_holder(config, key)  # the holder ended without telling thaw


def thaw_deadline(vm: VMConfig) -> float:
    """How long ``thaw`` waits for the holder to put the guest back: the unwind's own bounds
    (connecting, starting each service, the database and a few commands, the after hooks)
    and a minute to spare."""
    guest = vm.guest
    if guest is None:
        return _THAW_SPARE
    starts = guest.start_timeout * (len(guest.services) + 1)
    hooks = vm.hooks.timeout * len(vm.hooks.after)
    return _THAW_SPARE + guest.connect_timeout + starts + 4 * guest.command_timeout + hooks


class _NoAnswer(TimeoutError):
    """The holder said nothing at all within ``_THAW_ANSWER``."""


def _relay_thaw(
    conn: socket.socket, relay: Relay, answer_by: float, deadline: float
) -> Outcome | None:
    """Ask ``conn`` to thaw and relay its events until the outcome (returned); None when the
    connection ends first. Raises TimeoutError (``_NoAnswer`` before any event) past the
    deadlines, OSError when the connection breaks."""
    conn.settimeout(max(answer_by - time.monotonic(), 0.001))
    try:
        conn.sendall(b"thaw\n")
    except TimeoutError:
        raise _NoAnswer from None
    answered = False
    buffer = b""
    while True:
        left = (deadline if answered else answer_by) - time.monotonic()
        if left <= 0:
            raise TimeoutError if answered else _NoAnswer
        conn.settimeout(left)
        try:
            data = conn.recv(65536)
        except TimeoutError:
            raise TimeoutError if answered else _NoAnswer from None
        if not data:
            return None
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        if len(buffer) > _MAX_EVENT:
            buffer = b""  # not an event of ours: skipped like any other line
        for event in events(lines):
            answered = True
            if event.get("event") == "outcome":
                with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                    return outcome_from(event)
                continue
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                relay.handle(event)


def _unanswered(config: Config, key: str, what: str, seconds: float) -> SnapcoordError:
    data = Journal(config.store, key).read() or {}
    freeze = FreezeState.parse(data.get("freeze"))
    pid = "?" if freeze is None else freeze.pid
    return HolderUnanswered(
        f"the freeze holder (pid {pid}) {what} within {seconds:g} s: the guest may still be "
        "quiesced",
        vm=key,
        hint=f"see {config.store / 'freeze' / f'{key}.log'}; the guest is put back at the "
        f"freeze's limit at the latest; run snapcoord thaw {key} again",
    )


class HolderUnanswered(SnapcoordError):
    """thaw could not confirm that the guest runs again: a service may be down."""

    exit_code = ExitCode.SERVICE_NOT_RESTORED


def _connect(path: Path, *, timeout: float | None = None) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def _thaw_without_holder(config: Config, key: str) -> Outcome:
    from snapcoord.recover import recover

    journal = Journal(config.store, key)
    data = journal.read()
    if data is None:
        return _after_the_fact(config, key, journal)
    freeze = FreezeState.parse(data.get("freeze"))
    deadline = time.monotonic() + _LOCK_WAIT
    while True:  # a holder that reached its limit holds the lock while it restores
        try:
            lines = recover(config, key)
            break
        except Locked:
            if freeze is None or time.monotonic() > deadline:
                raise  # another command's run, not a holder restoring at its limit
            time.sleep(0.2)
            if journal.read() is None:
                return _after_the_fact(config, key, journal)
    lines += _end_lock_sessions(config, key, freeze)
    summary = {"vm": key, "ok": True, "exit_code": 0, "command": "thaw", "recovered": lines}
    shown = [f"{key}: thaw: {line}" for line in lines]
    if freeze is not None and freeze.consistency == "pause":
        # the lock session ends with its holder (EOF on its stdin) or at the guest's limit
        error = (
            f"{key}: the freeze holder (pid {freeze.pid}) ended before thaw, and the "
            "commits it held were released with it: a snapshot taken after that is not "
            "consistent"
        )
        summary.update(ok=False, exit_code=int(ExitCode.SNAPSHOT_FAILED), errors=[error])
        return Outcome(key, ExitCode.SNAPSHOT_FAILED, summary, shown, [error])
    return Outcome(key, ExitCode.OK, summary, shown)


def _end_lock_sessions(config: Config, key: str, freeze: FreezeState | None) -> list[str]:
    """A pause's lock session outlives a killed holder until the guest's time limit: end it."""
    guest = config.vm(key).guest
    if guest is None or guest.consistency != "pause" or freeze is None:
        return []
    from snapcoord.hooks.databases.pause import kill_sessions
    from snapcoord.transports import open_transport

    transport = open_transport(config, key)
    transport.open()
    try:
        pids = kill_sessions(  # the holder's run's only: never another coordinator's
            transport, runs=[freeze.run], vm=key, sudo=guest.sudo, timeout=guest.command_timeout
        )
    finally:
        transport.close()
    return [f"ended the lock session (pid {', '.join(map(str, pids))})"] if pids else []


def _after_the_fact(config: Config, key: str, journal: Journal) -> Outcome:
    """No holder and no journal: nothing is frozen. If the last freeze ended at its limit, the
    backup that thaw closes may not be consistent: say so, once."""
    last = journal.read_last()
    summary: dict[str, Any] = {"vm": key, "ok": True, "exit_code": 0, "command": "thaw"}
    if (
        last.get("command") == "freeze"
        and last.get("ended_by") == "limit"
        and not last.get("thaw_reported")
    ):
        journal.finish({**last, "thaw_reported": True})
        ended = _clock(last.get("ended_at"))
        error = (
            f"{key}: the freeze reached its limit before thaw and the guest was put back at "
            f"{ended}: a snapshot taken after that is not consistent"
        )
        summary.update(ok=False, exit_code=int(ExitCode.SNAPSHOT_FAILED), errors=[error])
        return Outcome(key, ExitCode.SNAPSHOT_FAILED, summary, errors=[error])
    summary["note"] = "nothing was frozen"
    return Outcome(key, ExitCode.OK, summary, [f"{key}: note: nothing was frozen: nothing to thaw"])


def write_line(stream: IO[bytes], event: dict[str, Any]) -> None:
    stream.write(json.dumps(event, default=str).encode() + b"\n")
    stream.flush()

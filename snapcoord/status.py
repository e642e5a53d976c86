"""``snapcoord status``: what is known of a VM without changing anything — its last run (from the
journal's ``last-run.json``), a run that has not finished (the journal file), and snapcoord's own
snapshots on the hypervisor (or, ``--offline``, as last seen: the inventory).

A failed last run is information, not a failure of ``status``: the exit code is 0 whenever the
status could be read, and the hypervisor's error code when its snapshots could not be listed.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from snapcoord import inventory
from snapcoord.adapters import open_adapter
from snapcoord.config import Config
from snapcoord.errors import ExitCode, SnapcoordError
from snapcoord.freeze_state import FreezeState
from snapcoord.inventory import Inventory
from snapcoord.journal import CorruptJournal, Journal
from snapcoord.outcome import Outcome
from snapcoord.store import read_file
from snapcoord.values import MAX_EPOCH, integer, number
from snapcoord.verify import record as verify_record
from snapcoord.verify.record import VerifyRecord


@dataclass(frozen=True)
class LastRun:
    """The fields of a last-run summary that status and the metrics show."""

    run: str | None
    command: str
    ok: bool
    exit_code: int
    started: float | None  # epoch seconds: the first step's start
    ended: float  # epoch seconds: the last step's end (the file's mtime without steps)
    window_seconds: float | None
    dump_bytes: int | None
    snapshot: str | None
    errors: tuple[str, ...]
    #: vzdump backup-end of a QEMU VM: whether the freeze hook bracketed the agent's freeze
    application_consistent: bool | None = None

    @property
    def duration_seconds(self) -> float | None:
        return None if self.started is None else max(0.0, self.ended - self.started)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "command": self.command,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "duration_seconds": _round(self.duration_seconds),
            "window_seconds": self.window_seconds,
            "dump_bytes": self.dump_bytes,
            "snapshot": self.snapshot,
            "errors": list(self.errors),
            **(
                {"application_consistent": self.application_consistent}
                if self.application_consistent is not None
                else {}
            ),
        }


def read_last_run(store: Path, key: str) -> LastRun | None:
    """The VM's last finished run, or None when there is none (or the file is unreadable)."""
    path = Journal(store, key).last
    try:
        data = json.loads(read_file(path))
        mtime = path.lstat().st_mtime
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return _last_run(data, mtime)


def _last_run(data: dict[str, Any], mtime: float) -> LastRun:
    """The one place a last-run file becomes a record: every field is checked for its type and
    range (a hand-edited or corrupt file gives None fields, never an exception)."""
    started, ended = _times(data)
    dump = data.get("dump")
    dump_bytes = number(dump.get("bytes"), 0, MAX_BYTES) if isinstance(dump, dict) else None
    errors = data.get("errors")
    return LastRun(
        run=_str_or_none(data.get("run")),
        command=_command(data.get("command")),
        ok=data.get("ok") is True,
        exit_code=_int(data.get("exit_code"), 0 if data.get("ok") is True else int(ExitCode.BUG)),
        started=started,
        ended=ended if ended is not None else mtime,
        window_seconds=number(data.get("window_seconds"), 0, MAX_SECONDS),
        dump_bytes=int(dump_bytes) if dump_bytes is not None else None,
        snapshot=_str_or_none(data.get("snapshot")),
        errors=tuple(str(e) for e in errors) if isinstance(errors, list) else (),
        application_consistent=(
            data["application_consistent"]
            if isinstance(data.get("application_consistent"), bool)
            else None
        ),
    )


#: bounds of what a last-run file may say (larger is corrupt): a run of a year, a dump of an
#: exabyte (times: values.MAX_EPOCH)
MAX_SECONDS = 366 * 86400.0
MAX_BYTES = 1e18


_COMMAND = re.compile(r"[a-z][a-z -]{0,39}")


def _command(value: Any) -> str:
    """A command's name as snapcoord writes it ("snapshot", "vzdump backup-end"); anything
    else (control characters, a label that would break the metrics file) is "unknown"."""
    return value if isinstance(value, str) and _COMMAND.fullmatch(value) else "unknown"


def _times(data: dict[str, Any]) -> tuple[float | None, float | None]:
    """(start, end) in epoch seconds: ``started``/``ended`` if the summary has them, else from
    the steps."""
    raw_steps = data.get("steps")
    steps = [s for s in raw_steps if isinstance(s, dict)] if isinstance(raw_steps, list) else []
    starts = [t for s in steps if (t := number(s.get("started"), 0, MAX_EPOCH)) is not None]
    ends = [t for s in steps if (t := number(s.get("ended"), 0, MAX_EPOCH)) is not None]
    started = number(data.get("started"), 0, MAX_EPOCH) if "started" in data else None
    ended = number(data.get("ended"), 0, MAX_EPOCH) if "ended" in data else None
    return (
        started if started is not None else min(starts, default=None),
        ended if ended is not None else max(ends + starts, default=None),
    )


def read_unfinished(store: Path, key: str) -> dict[str, Any] | None:
    """The run journal still on disk: a run in progress (its pid alive) or one that ended
    without finishing (a crash, or services left down: ``snapcoord recover``)."""
    try:
        data = Journal(store, key).read()
    except (CorruptJournal, OSError, ValueError):  # half-written, unreadable: still say it is there
        data = {}
    if data is None:
        return None
    pid = data.get("pid")
    pid = pid if isinstance(pid, int) and pid > 0 else None
    return {
        "run": _str_or_none(data.get("run")),
        "pid": pid,
        "pid_alive": pid is not None and pid_alive(pid),
        "snapshot": _str_or_none(data.get("snapshot")),
        "stopped": [str(s) for s in data.get("stopped") or []],
        "freeze": _freeze_dict(data.get("freeze")),
    }


def _freeze_dict(data: Any) -> dict[str, Any] | None:
    state = FreezeState.parse(data)
    return None if state is None else state.as_dict()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


# -- snapshots ---------------------------------------------------------------------------------


def list_from_hypervisor(config: Config, key: str) -> Inventory:
    """Ask the hypervisor, and record what it said in the inventory."""
    vm_cfg = config.vm(key)
    adapter = open_adapter(vm_cfg.hypervisor, config.hypervisors[vm_cfg.hypervisor])
    with adapter:
        snapshots = adapter.list_snapshots(adapter.find_vm(vm_cfg.ref))
    try:
        return inventory.record(config.store, key, snapshots)
    except OSError:  # a read-only store: still show what the hypervisor said
        return inventory.summarize(snapshots)


def _snapshots_view(seen: Inventory, *, source: str, now: float) -> dict[str, Any]:
    oldest = None if seen.oldest is None else seen.oldest.timestamp()
    newest = None if seen.newest is None else seen.newest.timestamp()
    return {
        "source": source,
        **seen.as_dict(),
        "oldest_age_seconds": None if oldest is None else _round(now - oldest),
        "newest_age_seconds": None if newest is None else _round(now - newest),
    }


# -- the command --------------------------------------------------------------------------------


def status_vm(config: Config, key: str, *, offline: bool, now: float | None = None) -> Outcome:
    """The status of VM ``key`` as an :class:`Outcome` (``command: "status"``)."""
    now = time.time() if now is None else now
    config.vm(key)
    last = read_last_run(config.store, key)
    unfinished = read_unfinished(config.store, key)
    verified = verify_record.read_last(config.store, key)
    errors: list[str] = []
    exit_code = int(ExitCode.OK)
    snapshots: dict[str, Any] | None
    if offline:
        seen = inventory.read(config.store, key)
        snapshots = None if seen is None else _snapshots_view(seen, source="store", now=now)
    else:
        try:
            listed = list_from_hypervisor(config, key)
        except SnapcoordError as exc:
            exit_code = int(exc.exit_code)
            where = config.vm(key).hypervisor
            errors.append(
                f"{key}: cannot list snapshots on hypervisor {where}: {exc.text()}"
                " (--offline shows what was last seen)"
            )
            snapshots = None
        else:
            snapshots = _snapshots_view(listed, source="hypervisor", now=now)
    summary = {
        "vm": key,
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "command": "status",
        "last_run": None if last is None else last.as_dict(),
        "unfinished_run": unfinished,
        "snapshots": snapshots,
        "last_verify": None if verified is None else verified.as_dict(),
        "errors": errors,
    }
    lines = human_lines(key, last, unfinished, snapshots, now=now)
    if verified is not None:
        lines.append(f"{key}: {_verify_text(verified, now)}")
    return Outcome(key, exit_code, summary, lines, errors)


# -- human lines --------------------------------------------------------------------------------


def human_lines(
    key: str,
    last: LastRun | None,
    unfinished: dict[str, Any] | None,
    snapshots: dict[str, Any] | None,
    *,
    now: float,
) -> list[str]:
    """One line, two with an unfinished run, e.g. ``db1: last snapshot ok 2026-12-01 03:00:12
    (2 h ago), window 4.4 s, dump 12.3 MiB; 7 snapshots, newest 2 h, oldest 6 d``."""
    parts = [_last_run_text(last, now)]
    if snapshots is not None:
        parts.append(_snapshots_text(snapshots, now))
    lines = [f"{key}: " + "; ".join(parts)]
    if last is not None and not last.ok and last.errors:
        lines.append(f"{key}:   error: {last.errors[0].removeprefix(f'{key}: ')}")
    if unfinished is not None:
        lines.append(f"{key}: {_unfinished_text(key, unfinished)}")
    return lines


def _last_run_text(last: LastRun | None, now: float) -> str:
    if last is None:
        return "no run recorded"
    status = "ok" if last.ok else f"FAILED (exit {last.exit_code})"
    text = f"last {last.command} {status} {_local(last.ended)} ({_ago(now - last.ended)} ago)"
    if last.window_seconds is not None:
        text += f", window {last.window_seconds:.1f} s"
    if last.dump_bytes is not None:
        text += f", dump {human_bytes(last.dump_bytes)}"
    return text


def _verify_text(found: VerifyRecord, now: float) -> str:
    status = {True: "ok", False: "FAILED", None: "could not run"}[found.verified]
    text = (
        f"last verify ({found.what}) {status} {_local(found.finished)} "
        f"({_ago(now - found.finished)} ago): {found.snapshot}"
    )
    return text + (f": {found.problem}" if found.problem else "")


def _snapshots_text(snapshots: dict[str, Any], now: float) -> str:
    count = snapshots.get("count") or 0
    text = f"{count} snapshot" + ("" if count == 1 else "s")
    if snapshots["source"] == "store":
        seen = iso_epoch(snapshots.get("seen_at"))
        text += f" as seen at {_local(seen)}" if seen is not None else " as last seen"
    newest, oldest = snapshots.get("newest_age_seconds"), snapshots.get("oldest_age_seconds")
    if newest is not None:
        text += f", newest {_ago(newest)}"
    if oldest is not None and count > 1:
        text += f", oldest {_ago(oldest)}"
    return text


def _unfinished_text(key: str, unfinished: dict[str, Any]) -> str:
    run = unfinished["run"] or "?"
    freeze = unfinished.get("freeze")
    if unfinished["pid_alive"] and freeze:
        until = freeze["until"]
        when = time.strftime("%H:%M:%S", time.localtime(until)) if until else "?"
        return (
            f"frozen by {freeze['source']} (run {run}, holder pid "
            f"{unfinished['pid']}) until {when} at the latest: `snapcoord thaw {key}`"
        )
    if unfinished["pid_alive"]:
        return f"run {run} in progress (pid {unfinished['pid']})"
    if freeze:
        return f"frozen by run {run}, but its holder is gone: `snapcoord thaw {key}`"
    pid = unfinished["pid"]
    gone = f"pid {pid} gone" if pid is not None else "no process"
    down = unfinished["stopped"]
    what = f"; may be down: {', '.join(down)}" if down else ""
    return f"unfinished run {run} ({gone}{what}): see `snapcoord recover {key}`"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _local(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch).astimezone().isoformat()


def iso_epoch(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _int(value: Any, default: int) -> int:
    """An exit code: an integer 0..255, else ``default``."""
    code = integer(value, 0, 255)
    return default if code is None else code


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)

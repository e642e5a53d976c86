"""The run journal: what a run has changed in the guest, on disk while the run is in flight, so
``snapcoord recover`` can put things back after a crash. Written atomically after every step;
removed when the run ends (the last run's summary stays in ``last-run.json``).

Written in ``<store>/journal`` after :func:`snapcoord.store.ensure_private` checked it, through
an unpredictable temporary file (``store.write_atomic``); read without following links."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcoord.errors import PreflightError
from snapcoord.freeze_state import PID_MAX, FreezeState
from snapcoord.hooks.guest.watchdog import Watchdog
from snapcoord.naming import RUN_ID
from snapcoord.store import ensure_private, read_file, write_json_atomic
from snapcoord.values import integer, number


class Journal:
    def __init__(self, store: Path, vm: str) -> None:
        self.store = store
        self.vm = vm
        self.dir = store / "journal"
        self.path = self.dir / f"{vm}.json"
        self.last = self.dir / f"{vm}.last-run.json"

    def write(self, data: dict[str, Any]) -> None:
        ensure_private(self.store, "journal", vm=self.vm)
        _atomic_write(self.path, data)

    def read(self) -> dict[str, Any] | None:
        """The run journal; None without one. ``ValueError`` for bad JSON, and
        :class:`CorruptJournal` for a file that cannot be read (a link: not followed)."""
        text = self.read_bytes()
        if text is None:
            return None
        data = json.loads(text)
        return data if isinstance(data, dict) else None

    def read_bytes(self) -> bytes | None:
        try:
            return read_file(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptJournal(
                f"the run journal {self.path} cannot be read ({exc.strerror or exc}): nothing "
                "in it was acted on",
                vm=self.vm,
                hint="check the guest's services by hand, then remove the file",
            ) from None

    def read_last(self) -> dict[str, Any]:
        """The last finished run's summary; empty when there is none or it cannot be read."""
        try:
            data = json.loads(read_file(self.last))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def finish(self, summary: dict[str, Any], *, keep_journal: bool = False) -> None:
        ensure_private(self.store, "journal", vm=self.vm)
        _atomic_write(self.last, summary)
        if not keep_journal:
            self.path.unlink(missing_ok=True)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, indent=1)


# -- the run journal as a record ------------------------------------------------------------


class CorruptJournal(PreflightError):
    """A run journal that is not what snapcoord wrote: nothing in it is acted on."""


@dataclass(frozen=True)
class RunRecord:
    """What ``recover``, ``thaw`` and the next run act on, checked field by field: only
    services this VM's configuration names, a watchdog whose PID and marker are its own."""

    run: str
    stopped: tuple[str, ...]
    database: str | None
    watchdog: Watchdog | None
    pending: tuple[str, ...]
    freeze: FreezeState | None

    @classmethod
    def parse(cls, data: Any, *, services: frozenset[str], vm: str, path: Path) -> RunRecord:
        def bad(what: str) -> CorruptJournal:
            return CorruptJournal(
                f"the run journal {path} is corrupt ({what}): nothing in it was acted on",
                vm=vm,
                hint="check the guest's services by hand, then remove the file",
            )

        if not isinstance(data, dict):
            raise bad("not an object")
        run = data.get("run")
        if not isinstance(run, str) or not RUN_ID.fullmatch(run):
            raise bad("run id")
        stopped = _names(data.get("stopped", []), services)
        if stopped is None:
            raise bad("stopped names a service that is not configured")
        database = data.get("database")
        if database is not None and (not isinstance(database, str) or database not in services):
            raise bad("database")
        pending = data.get("pending", [])
        if not isinstance(pending, list) or not all(isinstance(p, str) for p in pending):
            raise bad("pending")
        freeze = None if data.get("freeze") is None else FreezeState.parse(data["freeze"])
        if data.get("freeze") is not None and freeze is None:
            raise bad("freeze")
        dog = data.get("watchdog")
        return cls(
            run,
            stopped,
            database,
            None if dog is None else _watchdog(dog, services, bad),
            tuple(pending),
            freeze,
        )


def _names(value: Any, allowed: frozenset[str]) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v in allowed for v in value):
        return None
    return tuple(value)


def _watchdog(data: Any, services: frozenset[str], bad: Any) -> Watchdog:
    if not isinstance(data, dict):
        raise bad("watchdog")
    pid, marker = integer(data.get("pid"), 2, PID_MAX), data.get("marker")
    seconds = integer(data.get("seconds"), 0, 10**6)
    if pid is None:
        raise bad("watchdog pid")
    prefix = "snapcoord-watchdog-"
    if not isinstance(marker, str) or not marker.startswith(prefix):
        raise bad("watchdog marker")
    if not RUN_ID.fullmatch(marker.removeprefix(prefix)):
        raise bad("watchdog marker")
    if seconds is None:
        raise bad("watchdog seconds")
    guarded = _names(data.get("services", []), services)
    if guarded is None:
        raise bad("watchdog services")
    database = data.get("database")
    if database is not None and (not isinstance(database, str) or database not in services):
        raise bad("watchdog database")
    armed_at = number(data.get("armed_at") or 0.0, 0.0, math.inf)
    if armed_at is None:
        raise bad("watchdog armed_at")
    return Watchdog(pid, marker, seconds, guarded, database, armed_at)

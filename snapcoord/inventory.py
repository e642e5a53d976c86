"""What snapcoord last saw of a VM's own snapshots on the hypervisor (count, oldest, newest),
kept in the store so ``status --offline`` and the metrics file can show it without asking the
hypervisor again. Written after every command that listed the snapshots (snapshot, prune,
status).

The file is read back at one place, :func:`read`, into an :class:`Inventory` whose every field
is checked for its type and range: a hand-edited or corrupt file gives None fields (or no
record at all), never an exception and never a wrong number in the metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from snapcoord.adapters.base import Snapshot
from snapcoord.journal import Journal
from snapcoord.store import ensure_private, read_file, write_json_atomic
from snapcoord.values import integer

#: more snapshots than any hypervisor keeps per VM: a count above it is not believed
MAX_COUNT = 100_000


@dataclass(frozen=True)
class Inventory:
    """snapcoord's own snapshots of one VM as last seen: when, how many, oldest and newest
    (timezone-aware; None when unknown)."""

    seen_at: datetime | None
    count: int | None
    oldest: datetime | None
    newest: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen_at": _iso(self.seen_at),
            "count": self.count,
            "oldest": _iso(self.oldest),
            "newest": _iso(self.newest),
        }

    @classmethod
    def parse(cls, data: Any) -> Inventory | None:
        """The one place an inventory file becomes a record (None when it is not an object)."""
        if not isinstance(data, dict):
            return None
        return cls(
            seen_at=_time(data.get("seen_at")),
            count=integer(data.get("count"), 0, MAX_COUNT),
            oldest=_time(data.get("oldest")),
            newest=_time(data.get("newest")),
        )


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: Any) -> datetime | None:
    """An ISO 8601 time with its offset, within datetime's range; None otherwise."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None or not math.isfinite(parsed.timestamp()):
        return None
    return parsed


def _path(store: Path, vm: str) -> Path:
    return Journal(store, vm).dir / f"{vm}.inventory.json"


def summarize(snapshots: list[Snapshot], *, now: datetime | None = None) -> Inventory:
    """Count and times of snapcoord's own snapshots (foreign ones are not counted)."""
    own = [s for s in snapshots if s.is_snapcoord]
    times = sorted(s.created for s in own if s.created is not None)
    return Inventory(
        seen_at=now or datetime.now(UTC),
        count=len(own),
        oldest=times[0] if times else None,
        newest=times[-1] if times else None,
    )


def record(
    store: Path, vm: str, snapshots: list[Snapshot], *, now: datetime | None = None
) -> Inventory:
    seen = summarize(snapshots, now=now)
    path = _path(store, vm)
    ensure_private(store, path.parent.name, vm=vm)
    write_json_atomic(path, seen.as_dict())
    return seen


def read(store: Path, vm: str) -> Inventory | None:
    try:
        data = json.loads(read_file(_path(store, vm)))
    except (OSError, ValueError):
        return None
    return Inventory.parse(data)

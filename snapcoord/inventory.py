"""What snapcoord last saw of a VM's own snapshots on the hypervisor (count, oldest, newest),
kept in the store so ``status --offline`` and the metrics file can show it without asking the
hypervisor again. Written after every command that listed the snapshots (snapshot, prune,
status)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from snapcoord.adapters.base import Snapshot
from snapcoord.journal import Journal
from snapcoord.store import ensure_private, read_file, write_json_atomic


def _path(store: Path, vm: str) -> Path:
    return Journal(store, vm).dir / f"{vm}.inventory.json"


def summarize(snapshots: list[Snapshot], *, now: datetime | None = None) -> dict[str, Any]:
    """Count and times of snapcoord's own snapshots (foreign ones are not counted)."""
    own = [s for s in snapshots if s.is_snapcoord]
    times = sorted(s.created for s in own if s.created is not None)
    return {
        "seen_at": (now or datetime.now(UTC)).isoformat(),
        "count": len(own),
        "oldest": times[0].isoformat() if times else None,
        "newest": times[-1].isoformat() if times else None,
    }


def record(
    store: Path, vm: str, snapshots: list[Snapshot], *, now: datetime | None = None
) -> dict[str, Any]:
    data = summarize(snapshots, now=now)
    path = _path(store, vm)
    ensure_private(store, path.parent.name, vm=vm)
    write_json_atomic(path, data)
    return data


def read(store: Path, vm: str) -> dict[str, Any] | None:
    try:
        data = json.loads(read_file(_path(store, vm)))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

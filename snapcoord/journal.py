"""The run journal: what a run has changed in the guest, on disk while the run is in flight, so
``snapcoord recover`` can put things back after a crash. Written atomically after every step;
removed when the run ends (the last run's summary stays in ``last-run.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, store: Path, vm: str) -> None:
        self.dir = store / "journal"
        self.path = self.dir / f"{vm}.json"
        self.last = self.dir / f"{vm}.last-run.json"

    def write(self, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _atomic_write(self.path, data)

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        return data if isinstance(data, dict) else None

    def read_last(self) -> dict[str, Any]:
        """The last finished run's summary; empty when there is none or it cannot be read."""
        try:
            data = json.loads(self.last.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def finish(self, summary: dict[str, Any], *, keep_journal: bool = False) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _atomic_write(self.last, summary)
        if not keep_journal:
            self.path.unlink(missing_ok=True)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)

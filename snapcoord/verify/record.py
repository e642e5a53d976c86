"""What a verify found, and where it is kept: ``verify.json`` in the dump's run folder (the
dump's own mark: verified or not, never deleted for it) and
``<store>/journal/<vm>.last-verify.json`` (what ``status`` and the metrics show). Both are
written atomically and never through a link; both are read back through
:meth:`VerifyRecord.parse`, the one place such a file becomes a record (a hand-edited or corrupt
file gives None, never an exception)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapcoord.store import ensure_private, read_file, write_json_atomic
from snapcoord.values import MAX_EPOCH, integer, number

#: the file in a run folder (not listed in its manifest: the manifest's checksums stay the
#: dump's own)
RUN_FILE = "verify.json"
MAX_SECONDS = 366 * 86400.0
MAX_COUNT = 10**15
#: what a verify compared: recorded checksums and row counts, row counts only (a dump from
#: before checksums were recorded), or nothing (figures recorded while the application wrote,
#: consistency = "pause"; or no figures at all)
COMPARED = ("checksums", "rows", "none")


@dataclass(frozen=True)
class VerifyRecord:
    """One verify of one VM: of a dump (``what`` = "dump") or a boot of a snapshot ("boot").

    ``verified`` is True (it loads/boots and matches), False (it does not: ``problem`` says
    the first reason) or None (the verify could not run here: ``problem`` says why; the dump
    was not judged)."""

    vm: str
    what: str  # "dump" | "boot"
    snapshot: str
    verified: bool | None
    finished: float  # epoch seconds
    seconds: float
    kind: str | None = None  # the database kind
    tables: int = 0
    rows: int = 0
    compared: str = "none"
    problem: str | None = None
    mismatches: int = 0
    split: dict[str, float] = field(default_factory=dict)  # seconds per phase
    extra: dict[str, Any] = field(default_factory=dict)  # boot: services, database check

    @property
    def exit_code(self) -> int:
        from snapcoord.errors import ExitCode

        if self.verified is True:
            return int(ExitCode.OK)
        return int(ExitCode.SNAPSHOT_FAILED if self.verified is False else ExitCode.PREFLIGHT)

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "what": self.what,
            "snapshot": self.snapshot,
            "verified": self.verified,
            "finished": round(self.finished, 3),
            "seconds": round(self.seconds, 3),
            "kind": self.kind,
            "tables": self.tables,
            "rows": self.rows,
            "compared": self.compared,
            "first_mismatch": self.problem if self.verified is False else None,
            "problem": self.problem,
            "mismatches": self.mismatches,
            "split_seconds": {k: round(v, 3) for k, v in self.split.items()},
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def parse(cls, data: Any) -> VerifyRecord | None:
        """The record in ``data`` (a parsed JSON file), or None when it is not a valid one."""
        if not isinstance(data, dict):
            return None
        verified = data.get("verified")
        what = data.get("what")
        finished = number(data.get("finished"), 0, MAX_EPOCH)
        seconds = number(data.get("seconds"), 0, MAX_SECONDS)
        texts = [data.get(k) for k in ("vm", "snapshot")]
        if (
            verified not in (True, False, None)
            or what not in ("dump", "boot")
            or finished is None
            or seconds is None
            or not all(isinstance(t, str) and t.isprintable() and len(t) <= 200 for t in texts)
        ):
            return None
        problem = data.get("problem")
        kind = data.get("kind")
        compared = data.get("compared")
        split = data.get("split_seconds")
        return cls(
            vm=str(texts[0]),
            what=str(what),
            snapshot=str(texts[1]),
            verified=verified,
            finished=finished,
            seconds=seconds,
            kind=kind if isinstance(kind, str) and kind.isidentifier() else None,
            tables=integer(data.get("tables"), 0, MAX_COUNT) or 0,
            rows=integer(data.get("rows"), 0, MAX_COUNT) or 0,
            compared=compared if compared in COMPARED else "none",
            problem=problem[:2000] if isinstance(problem, str) else None,
            mismatches=integer(data.get("mismatches"), 0, MAX_COUNT) or 0,
            split={
                str(k): v
                for k, raw in (split.items() if isinstance(split, dict) else ())
                if isinstance(k, str) and (v := number(raw, 0, MAX_SECONDS)) is not None
            },
        )


def last_path(store: Path, vm: str) -> Path:
    return store / "journal" / f"{vm}.last-verify.json"


def save(store: Path, record: VerifyRecord, run_dir: Path | None) -> None:
    """Keep ``record`` as the VM's last verify, and (a dump's) in its run folder."""
    data = record.as_dict()
    if run_dir is not None and run_dir.is_dir() and not run_dir.is_symlink():
        write_json_atomic(run_dir / RUN_FILE, data)
    ensure_private(store, "journal", vm=record.vm)
    write_json_atomic(last_path(store, record.vm), data)


def read_last(store: Path, vm: str) -> VerifyRecord | None:
    return _read(last_path(store, vm))


def read_run(run_dir: Path) -> VerifyRecord | None:
    """The verify recorded in a run folder, None when it was never verified."""
    return _read(run_dir / RUN_FILE)


def _read(path: Path) -> VerifyRecord | None:
    try:
        return VerifyRecord.parse(json.loads(read_file(path)))
    except (OSError, ValueError):
        return None


def now() -> float:
    return time.time()

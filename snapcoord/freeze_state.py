"""The state of a freeze as its holder tells it (``status`` on its socket, the ``frozen`` event)
and as the run journal and the last run keep it: parsed into a :class:`FreezeState` at one
place, every field checked. ``thaw``, ``status``, ``freeze`` and the vzdump hook act on the
record only; anything else in the file or the answer is not a freeze's state (None)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from snapcoord.naming import RUN_ID

#: the largest PID Linux hands out (pid_max's ceiling)
PID_MAX = 4194304
#: who froze: ``snapcoord freeze`` or the vzdump hook
SOURCES = ("freeze", "vzdump")
#: Proxmox VE's largest VMID
VMID_MAX = 999_999_999
#: the schema's bound for freeze_max_seconds and --max-seconds
MAX_SECONDS = 86400


@dataclass(frozen=True)
class FreezeState:
    """One freeze: its holder's PID and run, who froze (and vzdump's VMID), since and until
    when (epoch seconds; ``until`` is known once frozen), its limit and consistency."""

    pid: int
    run: str
    source: str
    vmid: int | None
    since: float
    until: float | None
    max_seconds: int
    consistency: str

    @classmethod
    def parse(cls, data: Any) -> FreezeState | None:
        """The record, or None when ``data`` is not a freeze state snapcoord wrote."""
        if not isinstance(data, dict):
            return None
        pid, run, source = data.get("pid"), data.get("run"), data.get("source", "freeze")
        vmid, limit = data.get("vmid"), data.get("max_seconds")
        since, until = _epoch(data.get("since")), _epoch(data.get("until"))
        if not (_int(pid, 2, PID_MAX) and isinstance(run, str) and RUN_ID.fullmatch(run)):
            return None
        if source not in SOURCES or not (vmid is None or _int(vmid, 1, VMID_MAX)):
            return None
        if since is None or (data.get("until") is not None and until is None):
            return None
        if not _int(limit, 1, MAX_SECONDS) or data.get("consistency") not in ("stop", "pause"):
            return None
        return cls(
            data["pid"], run, source, vmid, since, until, data["max_seconds"], data["consistency"]
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "run": self.run,
            "source": self.source,
            "vmid": self.vmid,
            "since": self.since,
            "until": self.until,
            "max_seconds": self.max_seconds,
            "consistency": self.consistency,
        }


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _epoch(value: Any) -> float | None:
    """Epoch seconds within the years 2000 to 9999; None otherwise."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    number = float(value)
    if not math.isfinite(number) or not 946_684_800 <= number <= 253_402_300_799:
        return None
    return number

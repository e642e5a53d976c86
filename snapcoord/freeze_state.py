"""The state of a freeze as its holder tells it (``status`` on its socket, the ``frozen`` event)
and as the run journal and the last run keep it: parsed into a :class:`FreezeState` at one
place, every field checked. ``thaw``, ``status``, ``freeze`` and the vzdump hook act on the
record only; anything else in the file or the answer is not a freeze's state (None)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snapcoord.naming import RUN_ID
from snapcoord.values import MAX_EPOCH, integer, number

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
        pid, run, source = (
            integer(data.get("pid"), 2, PID_MAX),
            data.get("run"),
            data.get("source", "freeze"),
        )
        vmid, limit = data.get("vmid"), integer(data.get("max_seconds"), 1, MAX_SECONDS)
        since, until = _epoch(data.get("since")), _epoch(data.get("until"))
        if pid is None or not isinstance(run, str) or not RUN_ID.fullmatch(run):
            return None
        if source not in SOURCES or (vmid is not None and integer(vmid, 1, VMID_MAX) is None):
            return None
        if since is None or (data.get("until") is not None and until is None):
            return None
        if limit is None or data.get("consistency") not in ("stop", "pause"):
            return None
        return cls(pid, run, source, vmid, since, until, limit, data["consistency"])

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


def _epoch(value: Any) -> float | None:
    """Epoch seconds from the year 2000 on (a freeze is never older); None otherwise."""
    return number(value, 946_684_800, MAX_EPOCH)

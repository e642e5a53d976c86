"""The host's own services, seen before and after a test session: the lab must never stop,
start or restart them (tests/lab/isolation.py fails the session if it did).

A service is the top process of its tree (a process whose parent has another name: the
postmaster, not its backends; Apache's parent, not its workers) among :data:`NAMES`, in this
process's PID namespace, so the lab sandboxes' own servers are never counted. Each is known by
its name, PID and start time (``/proc/PID/stat`` field 22), so a restart under the same PID
would show too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Process names of the services the lab runs in its sandboxes, and the host may run too.
NAMES = frozenset({"mariadbd", "mysqld", "mysqld_safe", "apache2", "httpd", "cron", "postgres"})


@dataclass(frozen=True, order=True)
class HostService:
    name: str
    pid: int
    started: int  # clock ticks after boot

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})"


def _stat(proc: Path) -> tuple[str, int, int] | None:
    """(name, parent pid, start time) from /proc/PID/stat; None if it is gone."""
    try:
        text = (proc / "stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, int(fields[1]), int(fields[19])


def services(proc_root: Path = Path("/proc")) -> frozenset[HostService]:
    """The services running in this PID namespace (see the module's docstring)."""
    try:
        own = os.readlink(proc_root / "self" / "ns" / "pid")
    except OSError:
        own = None
    table: dict[int, tuple[str, int, int]] = {}
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if own is not None and os.readlink(entry / "ns" / "pid") != own:
                continue
        except OSError:
            continue
        found = _stat(entry)
        if found is not None:
            table[int(entry.name)] = found
    return frozenset(
        HostService(name, pid, started)
        for pid, (name, ppid, started) in table.items()
        if name in NAMES and table.get(ppid, ("",))[0] != name
    )


def changes(before: Iterable[HostService], after: Iterable[HostService]) -> list[str]:
    """One line per service that stopped, restarted or appeared between the two readings."""
    old, new = set(before), set(after)
    lines = [f"{s} stopped or restarted during the tests" for s in sorted(old - new)]
    lines += [f"{s} was started during the tests" for s in sorted(new - old)]
    return lines

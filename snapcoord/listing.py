"""``snapcoord list``: the snapshots of each selected VM, as rows for people and as JSON."""

from __future__ import annotations

from typing import Any

from snapcoord.config import Config
from snapcoord.errors import ExitCode, SnapcoordError
from snapcoord.naming import new_run_id
from snapcoord.outcome import Outcome
from snapcoord.plans import RunContext

#: the last line of a plain listing: what its marks mean
LIST_LEGEND = "(* the VM runs on top of this snapshot; s taken by snapcoord; times in UTC)"


def list_vm(config: Config, key: str, *, prefixed: bool) -> Outcome:
    """The snapshots of VM ``key``. ``prefixed``: each row starts with ``key:`` (a listing of
    several VMs); otherwise the rows are bare (``list db1``, as it always was)."""
    try:
        rows = _rows(config, key)
    except SnapcoordError as exc:
        return Outcome.failed(key, "list", exc, snapshots=None)
    summary = {"vm": key, "ok": True, "exit_code": int(ExitCode.OK), "command": "list"}
    return Outcome(
        key, ExitCode.OK, {**summary, "snapshots": rows, "errors": []}, _lines(key, rows, prefixed)
    )


def _rows(config: Config, key: str) -> list[dict[str, Any]]:
    ctx = RunContext.create(config, key, new_run_id())
    with ctx.adapter:
        vm = ctx.adapter.find_vm(ctx.vm_cfg.ref)
        snapshots = ctx.adapter.list_snapshots(vm)
    return [
        {
            "name": s.name,
            "id": s.id,
            "created": s.created.isoformat() if s.created else None,
            "description": s.description,
            "parent": s.parent,
            "memory": s.memory,
            "current": s.current,
            "snapcoord": s.is_snapcoord,
        }
        for s in snapshots
    ]


def _lines(key: str, rows: list[dict[str, Any]], prefixed: bool) -> list[str]:
    if not rows:
        return [f"{key}: no snapshots"]
    lead = f"{key}: " if prefixed else ""
    lines = []
    for row in rows:
        flags = ("*" if row["current"] else " ") + ("s" if row["snapcoord"] else " ")
        created = (row["created"] or "?")[:19]
        lines.append(f"{lead}{flags} {created}  {row['name']}")
    return lines


def legend(outcomes: list[Outcome]) -> list[str]:
    """The legend, once, after the rows of every VM (none when no VM had a snapshot)."""
    listed = any(o.summary.get("snapshots") for o in outcomes)
    return [LIST_LEGEND] if listed else []

"""Delete one snapshot."""

from __future__ import annotations

from snapcoord.plans.context import RunContext, connect_steps
from snapcoord.run import Step


def delete_steps(ctx: RunContext, *, name: str) -> list[Step]:
    def delete() -> None:
        vm = ctx.require_vm()
        snapshot = ctx.adapter.find_snapshot(vm, name)
        ctx.adapter.delete_snapshot(vm, snapshot, timeout=ctx.vm_cfg.snapshot_timeout)
        ctx.snapshot_name = name

    return [*connect_steps(ctx), Step(f"delete snapshot {name}", delete)]

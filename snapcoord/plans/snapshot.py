"""The snapshot run: preflight, the quiesced guest (plans/quiesce.py), the hypervisor snapshot."""

from __future__ import annotations

from snapcoord.errors import (
    Interrupted,
    SnapcoordError,
    SnapshotExists,
    SnapshotFailed,
)
from snapcoord.naming import description, snapshot_name
from snapcoord.plans.context import RunContext, connect_steps, guest_connect_steps
from snapcoord.plans.quiesce import quiesce_steps
from snapcoord.run import Step


def snapshot_steps(ctx: RunContext, *, label: str) -> list[Step]:
    cfg = ctx.vm_cfg
    ctx.snapshot_name = snapshot_name(label)
    steps = [*connect_steps(ctx)]
    after_snapshot: list[Step] = []
    steps.append(
        Step(
            "check VM and snapshot name",
            lambda: _check_snapshot_possible(ctx),
            describe=f"list_snapshots; {ctx.snapshot_name} must be free",
        )
    )
    steps += guest_connect_steps(ctx, lease=True)
    if ctx.services is not None:
        before, after_snapshot = quiesce_steps(ctx)
        steps += before
    else:
        ctx.notes.append("no [guest] table: the snapshot is crash-consistent only")
    steps.append(
        Step(
            "hypervisor snapshot",
            lambda: _create_snapshot(ctx, label),
            describe=f"create_snapshot({ctx.snapshot_name!r}, memory={cfg.memory}, "
            f"quiesce={cfg.quiesce})",
        )
    )
    return steps + after_snapshot


def _check_snapshot_possible(ctx: RunContext) -> None:
    vm = ctx.require_vm()
    cfg = ctx.vm_cfg
    ctx.adapter.check_snapshot_ready(vm, memory=cfg.memory, quiesce=cfg.quiesce)
    if any(s.name == ctx.snapshot_name for s in ctx.adapter.list_snapshots(vm)):
        raise SnapshotExists(f"a snapshot named {ctx.snapshot_name!r} exists already", vm=ctx.key)


def _create_snapshot(ctx: RunContext, label: str) -> None:
    cfg = ctx.vm_cfg
    timeout, extra = cfg.snapshot_timeout, ""
    if ctx.pause is not None:  # the call gets at most what is left of pause_timeout
        ctx.pause.check_alive()
        timeout = min(timeout, ctx.pause.remaining() - 1)
        extra = "consistency=pause"
    try:
        ctx.snapshot = ctx.adapter.create_snapshot(
            ctx.require_vm(),
            ctx.snapshot_name,
            description(label, ctx.run_id, extra=extra),
            memory=cfg.memory,
            quiesce=cfg.quiesce,
            timeout=timeout,
        )
    except Interrupted:  # a signal during the call is not a failed snapshot
        raise
    except SnapcoordError as exc:
        hint = exc.hint
        if ctx.pause is not None and ctx.pause.remaining() < 2:
            hint = (
                f"writes were held for pause_timeout ({ctx.guest.pause_timeout:g} s) and are "
                "released now; the snapshot may still complete on the hypervisor, as a "
                "crash-consistent one only"
            )
        if isinstance(exc, SnapshotFailed) and hint == exc.hint:
            raise
        raise SnapshotFailed(
            f"snapshot {ctx.snapshot_name} failed: {exc.message}", vm=ctx.key, hint=hint
        ) from exc

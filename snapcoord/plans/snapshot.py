"""The snapshot run: preflight, the bracket with the dump inside, the hypervisor snapshot."""

from __future__ import annotations

from snapcoord.errors import (
    Interrupted,
    SnapcoordError,
    SnapshotExists,
    SnapshotFailed,
)
from snapcoord.naming import description, snapshot_name
from snapcoord.plans.bracket import Bracket
from snapcoord.plans.context import RunContext, connect_steps, guest_connect_steps, hook_step
from snapcoord.plans.fallback import Fallback
from snapcoord.plans.pausing import Pause
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
    steps += guest_connect_steps(ctx)
    if ctx.services is not None:
        ctx.outputs["consistency"] = ctx.guest.consistency
    if ctx.services is not None and ctx.guest.consistency == "pause":
        before, after_snapshot = _pause_steps(ctx)
        steps += before
    elif ctx.services is not None:
        fallback = Fallback(ctx)
        steps += fallback.preflight_steps()
        arm, stop_services, stop_database = Bracket(ctx).steps(database=True)
        hooks = {phase: hook_step(ctx, phase) for phase in ("after", "before", "frozen")}
        steps += [
            *_present(hooks["after"], hooks["before"]),
            arm,
            stop_services,
            *fallback.window_steps(),  # services are quiet, the database still answers
            stop_database,
            *_present(hooks["frozen"]),
            Step(
                "check services still stopped",
                ctx.services.still_stopped,
                describe="nothing this run stopped runs again (one round trip)",
            ),
        ]
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


def _pause_steps(ctx: RunContext) -> tuple[list[Step], list[Step]]:
    """Nothing stops: the dump runs first (while the application writes), then commits are held
    for the frozen hooks and the snapshot call; checked after it, released always."""
    fallback = Fallback(ctx)
    pause = Pause(ctx)
    hooks = {phase: hook_step(ctx, phase) for phase in ("after", "before", "frozen")}
    before = [
        *fallback.preflight_steps(),
        pause.preflight_step(),
        *_present(hooks["after"], hooks["before"]),
        *fallback.window_steps(),
        pause.hold_step(),
        *_present(hooks["frozen"]),
    ]
    return before, [pause.verify_step()]


def _check_snapshot_possible(ctx: RunContext) -> None:
    vm = ctx.require_vm()
    cfg = ctx.vm_cfg
    ctx.adapter.check_snapshot_ready(vm, memory=cfg.memory, quiesce=cfg.quiesce)
    if any(s.name == ctx.snapshot_name for s in ctx.adapter.list_snapshots(vm)):
        raise SnapshotExists(f"a snapshot named {ctx.snapshot_name!r} exists already", vm=ctx.key)


def _present(*steps: Step | None) -> list[Step]:
    return [s for s in steps if s is not None]


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

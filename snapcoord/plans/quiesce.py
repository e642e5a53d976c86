"""Quiescing the guest, shared by ``snapshot`` (its own snapshot) and ``freeze`` (somebody
else's): the dump, the hooks, and either the stopped services (``consistency = "stop"``) or the
held commits (``"pause"``). The steps that come before the snapshot, and those after it."""

from __future__ import annotations

from snapcoord.plans.bracket import Bracket
from snapcoord.plans.context import RunContext, hook_step
from snapcoord.plans.fallback import Fallback
from snapcoord.plans.pausing import Pause
from snapcoord.run import Step


def quiesce_steps(ctx: RunContext) -> tuple[list[Step], list[Step]]:
    """``(before, after)``: ``before`` ends with the guest quiet (its undos put it back), ``after``
    checks, once the snapshot is taken, that it stayed quiet. Needs ``ctx.services``."""
    assert ctx.services is not None
    services = ctx.services
    ctx.outputs["consistency"] = ctx.guest.consistency
    fallback = Fallback(ctx)
    hooks = {phase: hook_step(ctx, phase) for phase in ("after", "before", "frozen")}
    if ctx.guest.consistency == "pause":
        # Nothing stops: the dump runs first (while the application writes), then commits are
        # held for the frozen hooks and the snapshot; checked after it, released always.
        pause = Pause(ctx)
        before = [
            *fallback.preflight_steps(),
            pause.preflight_step(),
            *_present(hooks["after"], hooks["before"]),
            *fallback.window_steps(),
            pause.hold_step(),
            *_present(hooks["frozen"]),
        ]
        return before, [pause.verify_step()]
    # With no frozen hook the check follows the last stop directly: that stop's script runs it
    # (after its own verification), so the window pays no round trip and no shell for it.
    window_steps = fallback.window_steps()  # services are quiet, the database still answers
    folded = hooks["frozen"] is None
    arm, stop_services, stop_database = Bracket(ctx).steps(
        database=True, check_in_last_stop=folded, services_last=not window_steps
    )
    before = [
        *fallback.preflight_steps(),
        *_present(hooks["after"], hooks["before"]),
        arm,
        stop_services,
        *window_steps,
        stop_database,
        *_present(hooks["frozen"]),
        Step(
            "check services still stopped",
            services.confirm_still_stopped,
            describe="nothing this run stopped runs again ("
            + ("checked at the end of the last stop's script" if folded else "one round trip")
            + ")",
        ),
    ]
    return before, []


def _present(*steps: Step | None) -> list[Step]:
    return [s for s in steps if s is not None]

"""Revert to a snapshot (with a safety snapshot of the current state first), then bring the
guest's services up."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from snapcoord import guest_clock
from snapcoord.adapters.base import VM, Adapter, PowerState, Snapshot
from snapcoord.errors import (
    Interrupted,
    PreflightError,
    SnapcoordError,
    SnapshotFailed,
    SnapshotNotFound,
    UsageError,
)
from snapcoord.guest import GuestUnreachable
from snapcoord.hooks import databases
from snapcoord.hooks.databases import pause
from snapcoord.hooks.guest import lease, watchdog
from snapcoord.naming import description, snapshot_name
from snapcoord.plans.context import RunContext, connect_steps
from snapcoord.run import Step


def pick_snapshot(adapter: Adapter, vm: VM, name: str | None, *, vm_key: str) -> Snapshot:
    """``name`` or, without one, the newest snapshot snapcoord made."""
    if name:
        return adapter.find_snapshot(vm, name)
    own = [s for s in adapter.list_snapshots(vm) if s.is_snapcoord]
    if not own:
        raise SnapshotNotFound(
            "no snapcoord snapshot to revert to", vm=vm_key, hint="name one with --to"
        )
    epoch = datetime.min.replace(tzinfo=UTC)
    return max(own, key=lambda s: (s.created or epoch, s.name))


@dataclass
class RevertTarget:
    """What the revert found before it changed anything."""

    snapshot: Snapshot | None = None
    power: PowerState | None = None  # before the revert
    connected: bool = False  # the guest connection is open (closed by the lease's undo)

    def require_snapshot(self) -> Snapshot:
        assert self.snapshot is not None, "choose snapshot must run first"
        return self.snapshot


def revert_steps(ctx: RunContext, *, target: str | None, safety: bool) -> list[Step]:
    found = RevertTarget()

    def choose() -> None:
        found.snapshot = pick_snapshot(ctx.adapter, ctx.require_vm(), target, vm_key=ctx.key)
        found.power = ctx.adapter.power_state(ctx.require_vm())
        ctx.snapshot_name = found.snapshot.name

    def safety_snapshot() -> None:
        name = snapshot_name("safety")
        if name == found.require_snapshot().name:
            raise UsageError("safety snapshot name collides with the target; retry in a second")
        ctx.adapter.create_snapshot(
            ctx.require_vm(),
            name,
            description("safety", ctx.run_id, extra="before revert"),
            memory=False,
            quiesce=False,
            timeout=ctx.vm_cfg.snapshot_timeout,
        )
        ctx.notes.append(f"safety snapshot {name} keeps the state before the revert")

    def revert() -> None:
        try:
            ctx.adapter.revert_snapshot(
                ctx.require_vm(),
                found.require_snapshot(),
                start=None,
                timeout=ctx.vm_cfg.snapshot_timeout,
            )
        except Interrupted:
            raise
        except SnapcoordError as exc:
            raise SnapshotFailed(
                f"revert to {found.require_snapshot().name} failed: {exc.message}", vm=ctx.key
            ) from exc

    steps = [
        *connect_steps(ctx),
        Step("choose snapshot", choose, describe=f"--to {target}" if target else "newest"),
    ]
    if ctx.services is not None:
        steps.append(
            Step(
                "take guest lease",
                lambda: _lease_before_revert(ctx, found),
                lambda: _release_lease(ctx, found),
                undo_name="release guest lease",
                undo_first=True,
                describe="refuse (exit 75) if another coordinator holds the guest; "
                "taken again once the guest is back",
            )
        )
    if safety:
        steps.append(
            Step("safety snapshot", safety_snapshot, describe="snapshot of the current state first")
        )
    steps.append(Step("revert", revert, describe="revert_snapshot(start=keep power state)"))
    if ctx.services is not None:
        steps.append(
            Step(
                "bring guest services up",
                lambda: _services_up_after_revert(ctx, found),
                describe="wait for the guest, start configured services",
            )
        )
    return steps


def _services_up_after_revert(ctx: RunContext, found: RevertTarget) -> None:
    if found.power != PowerState.RUNNING:
        ctx.notes.append("the VM was not running before the revert: services not checked")
        return
    assert ctx.transport is not None and ctx.services is not None
    if ctx.adapter.thaw_filesystems(ctx.require_vm(), wait=ctx.guest.connect_timeout):
        # a snapshot taken inside a guest agent freeze (a backup's): the guest came back
        # frozen; the thaw also runs its freeze hook, which restarts what the hook stopped
        ctx.notes.append(
            "the snapshot was taken while the guest's file systems were frozen: thawed them "
            "through the guest agent"
        )
    _wait_for_guest(ctx)
    found.connected = True  # closed by the lease's undo, after it released the lease
    runs = _resurrected_runs(ctx, found)
    killed = watchdog.kill_runs(
        ctx.transport,
        runs,
        vm=ctx.key,
        sudo=ctx.guest.sudo,
        timeout=ctx.guest.command_timeout,
    )
    if killed:
        ctx.notes.append(
            f"stopped {len(killed)} snapcoord watchdog(s) that the revert brought back "
            f"(pid {', '.join(map(str, killed))}): the snapshot's memory held them"
        )
    stale = pause.kill_sessions(
        ctx.transport,
        runs=runs,
        vm=ctx.key,
        sudo=ctx.guest.sudo,
        timeout=ctx.guest.command_timeout,
    )
    if stale:
        ctx.notes.append(
            f"ended {len(stale)} snapcoord lock session process(es) that the revert brought "
            f"back (pid {', '.join(map(str, stale))}): the snapshot's memory held them"
        )
    clock = guest_clock.sync_after_revert(
        ctx.adapter,
        ctx.require_vm(),
        ctx.transport,
        vm_key=ctx.key,
        sudo=ctx.guest.sudo,
        timeout=ctx.guest.command_timeout,
    )
    if clock:
        ctx.notes.append(clock)
    if ctx.lease is not None:  # its expiry again, on the guest's corrected clock
        ctx.lease.renew(ctx.guest.watchdog_seconds)
    state = ctx.services.probe()
    window = ctx.window
    if state.database is not None and not state.running.get(state.database):
        state.stopped.append(state.database)
        ctx.services.start_database(window)
    down = [s for s in state.services if not state.running.get(s)]
    state.stopped.extend(down)
    ctx.services.start(down, window)
    snapshot = found.require_snapshot()
    kind = databases.get(state.kind) if state.kind else None
    if kind and kind.PAUSE_METHODS and (stale or snapshot.memory or _paused(snapshot)):
        kind.prove_writes(
            ctx.transport,
            vm=ctx.key,
            guest=ctx.guest,
            options=ctx.vm_cfg.dump,
            run_id=ctx.run_id,
        )
        ctx.notes.append("a test write committed: no lock from the snapshot is held")


def _lease_before_revert(ctx: RunContext, found: RevertTarget) -> None:
    """Before the revert changes the guest: refuse if another coordinator holds it. A guest
    that does not answer (reverting may be what mends it) is noted, not a failure."""
    if found.power != PowerState.RUNNING or ctx.lease is None:
        return
    assert ctx.transport is not None
    try:
        ctx.transport.open()
    except GuestUnreachable as exc:
        ctx.transport.close()
        ctx.notes.append(
            f"the guest did not answer before the revert ({exc.message}): its lease was not checked"
        )
        return
    try:
        ctx.lease.take()
    finally:
        ctx.transport.close()  # the revert ends this connection's guest side anyway


def _release_lease(ctx: RunContext, found: RevertTarget) -> None:
    """The last undo: release the lease (taken before or after the revert), close the guest
    connection."""
    assert ctx.transport is not None
    try:
        if ctx.lease is not None and ctx.lease.held:
            if not found.connected:
                try:
                    ctx.transport.open()
                    found.connected = True
                except GuestUnreachable as exc:
                    ctx.notes.append(
                        f"the guest lease could not be released ({exc.message}): it ends at "
                        "its expiry"
                    )
                    return
            ctx.lease.release()
    finally:
        if found.connected:
            ctx.transport.close()
            found.connected = False


def _resurrected_runs(ctx: RunContext, found: RevertTarget) -> list[str]:
    """Take the guest lease after the revert, over the one the snapshot's memory brought back,
    and return the runs whose processes (watchdog, lock session) the revert may have brought
    back: the run that took the snapshot (its description says which) and the holder of the
    lease the snapshot held. Only theirs are ended: never another coordinator's."""
    snapshot = found.require_snapshot()
    own = _run_of(snapshot)
    runs = [own] if own else []
    if ctx.lease is None:
        return runs
    taken_before = 0
    if snapshot.memory and snapshot.created is not None:  # a lease older than the snapshot
        taken_before = int(snapshot.created.timestamp())
    taken = ctx.lease.take(take_over=tuple(runs), taken_before=taken_before)
    if taken.replaced is not None and taken.replaced.run not in runs:
        runs.append(taken.replaced.run)
    return runs


def _run_of(snapshot: Snapshot) -> str | None:
    """The run that took ``snapshot``, from its description (``run=<id>``), if snapcoord's."""
    for word in snapshot.description.split():
        if word.startswith("run=") and lease.TOKEN.fullmatch(word[4:]):
            return word[4:]
    return None


def _paused(snapshot: Snapshot) -> bool:
    """Was ``snapshot`` taken with writes paused (its description says so)?"""
    return "consistency=pause" in snapshot.description.split()


def _wait_for_guest(ctx: RunContext) -> None:
    """Retry while the guest boots; a host key or login failure fails at once."""
    assert ctx.transport is not None
    deadline = time.monotonic() + ctx.guest.start_timeout
    while True:
        try:
            ctx.transport.open()
            return
        except GuestUnreachable as exc:
            ctx.transport.close()
            if time.monotonic() > deadline:
                raise PreflightError(
                    f"the guest did not answer after the revert: {exc.message}", vm=ctx.key
                ) from exc
            time.sleep(2)

"""Which steps make a snapshot run, a revert, a delete: the order from DESIGN.md.

Everything that can fail before a service is stopped is checked first (hypervisor, VM, snapshot
name, guest connection, sudo, services); nothing that can wait runs inside the service window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from snapcoord import guest_clock
from snapcoord.adapters import open_adapter
from snapcoord.adapters.base import VM, Adapter, PowerState, Snapshot
from snapcoord.errors import (
    GuestError,
    Interrupted,
    PreflightError,
    ServiceNotRestored,
    SnapcoordError,
    SnapshotExists,
    SnapshotFailed,
    SnapshotNotFound,
    UsageError,
)
from snapcoord.fallback import Fallback
from snapcoord.guest import GuestUnreachable, Transport, open_transport
from snapcoord.hooks import commands, watchdog
from snapcoord.hooks.services import GuestServices, Services
from snapcoord.naming import description, snapshot_name
from snapcoord.reconnect import reconnecting
from snapcoord.run import ServiceWindow, Step
from snapcoord.settings import Config, GuestConfig, VMConfig


@dataclass
class RunContext:
    """The state one run builds up; steps read and fill it."""

    config: Config
    vm_cfg: VMConfig
    run_id: str
    adapter: Adapter
    transport: Transport | None = None
    services: Services | None = None
    vm: VM | None = None
    watchdog: watchdog.Watchdog | None = None
    snapshot: Snapshot | None = None
    snapshot_name: str = ""
    notes: list[str] = field(default_factory=list)  # warnings shown at the end
    window: ServiceWindow = field(default_factory=ServiceWindow)
    outputs: dict[str, Any] = field(default_factory=dict)  # dump/archive results for --json
    soft_failures: list[SnapcoordError] = field(default_factory=list)  # reported, not fatal

    @classmethod
    def create(cls, config: Config, vm_key: str, run_id: str) -> RunContext:
        vm_cfg = config.vm(vm_key)
        adapter = open_adapter(vm_cfg.hypervisor, config.hypervisors[vm_cfg.hypervisor])
        ctx = cls(config, vm_cfg, run_id, adapter)
        if vm_cfg.guest is not None:
            ctx.transport = open_transport(vm_cfg.guest, vm=vm_key)
            ctx.services = Services(ctx.transport, vm_cfg.guest, vm=vm_key)
        return ctx

    @property
    def key(self) -> str:
        return self.vm_cfg.key

    @property
    def guest(self) -> GuestConfig:
        assert self.vm_cfg.guest is not None
        return self.vm_cfg.guest

    def require_vm(self) -> VM:
        assert self.vm is not None, "find VM must run first"
        return self.vm

    def journal_data(self) -> dict[str, Any]:
        state = self.services.state if self.services else None
        # Once the watchdog is armed, everything it guards counts as stopped: a crash in the
        # middle of a stop must still be recovered. All of them were running before the run.
        stopped = list(self.watchdog.services) if self.watchdog else []
        stopped += [s for s in (state.stopped if state else []) if s not in stopped]
        return {
            "run": self.run_id,
            "vm": self.key,
            "snapshot": self.snapshot_name,
            "stopped": stopped,
            "database": state.database if state else None,
            "init": state.init if state else None,
            "watchdog": self.watchdog.as_dict() if self.watchdog else None,
        }


# -- shared steps ----------------------------------------------------------------------------


def _connect_steps(ctx: RunContext) -> list[Step]:
    hv = ctx.vm_cfg.hypervisor
    return [
        Step(
            f"connect to hypervisor {hv}",
            ctx.adapter.connect,
            ctx.adapter.close,
            undo_name=f"disconnect from hypervisor {hv}",
            describe=f"{ctx.config.hypervisors[hv].type} session to {hv}",
        ),
        Step("find VM", lambda: _find_vm(ctx), describe=f"find_vm({ctx.vm_cfg.ref!r})"),
    ]


def _find_vm(ctx: RunContext) -> None:
    ctx.vm = ctx.adapter.find_vm(ctx.vm_cfg.ref)


def guest_connect_steps(ctx: RunContext) -> list[Step]:
    """Open the guest connection (closed on unwind) and probe its services and sudo."""
    if ctx.transport is None or ctx.services is None:
        return []
    transport, services = ctx.transport, ctx.services
    return [
        Step(
            "connect to guest",
            transport.open,
            transport.close,
            undo_name="disconnect from guest",
            undo_first=True,
            describe=transport.description,
        ),
        Step(
            "check guest services and sudo",
            lambda: _probe(ctx, services),
            describe="detect init system; which services exist and run",
        ),
    ]


def _probe(ctx: RunContext, services: Services) -> None:
    state = services.probe()
    for name, units in state.triggers.items():
        if state.running.get(name):
            ctx.notes.append(
                f"{name} is started on demand by {', '.join(units)}: stopped and started with it"
            )


def _hook_step(ctx: RunContext, phase: str) -> Step | None:
    hooks: tuple[str, ...] = getattr(ctx.vm_cfg.hooks, phase)
    if not hooks or ctx.transport is None:
        return None
    transport, timeout = ctx.transport, ctx.vm_cfg.hooks.timeout

    def run() -> None:
        commands.run_hooks(
            transport,
            hooks,
            phase=phase,
            vm=ctx.key,
            sudo=ctx.guest.sudo,
            timeout=timeout,
        )

    if phase == "after":  # scheduled early, runs while unwinding: after services are back
        return Step(f"schedule {phase} hooks", None, run, undo_name=f"{phase} hooks")
    return Step(f"{phase} hooks", run, describe="; ".join(hooks))


# -- snapshot ---------------------------------------------------------------------------------


def snapshot_steps(ctx: RunContext, *, label: str) -> list[Step]:
    cfg = ctx.vm_cfg
    ctx.snapshot_name = snapshot_name(label)
    steps = [*_connect_steps(ctx)]
    steps.append(
        Step(
            "check VM and snapshot name",
            lambda: _check_snapshot_possible(ctx),
            describe=f"list_snapshots; {ctx.snapshot_name} must be free",
        )
    )
    steps += guest_connect_steps(ctx)
    if ctx.services is not None:
        fallback = Fallback(ctx)
        steps += fallback.preflight_steps()
        arm, stop_services, stop_database = Bracket(ctx).steps(database=True)
        hooks = {phase: _hook_step(ctx, phase) for phase in ("after", "before", "frozen")}
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
    return steps


def _check_snapshot_possible(ctx: RunContext) -> None:
    vm = ctx.require_vm()
    cfg = ctx.vm_cfg
    ctx.adapter.check_snapshot_ready(vm, memory=cfg.memory, quiesce=cfg.quiesce)
    if any(s.name == ctx.snapshot_name for s in ctx.adapter.list_snapshots(vm)):
        raise SnapshotExists(f"a snapshot named {ctx.snapshot_name!r} exists already", vm=ctx.key)


def _present(*steps: Step | None) -> list[Step]:
    return [s for s in steps if s is not None]


class Bracket:
    """The guarded part of a run: arm the watchdog, stop the services that run (and, for a
    snapshot, the database); the undos start exactly those again and disarm the watchdog.
    Shared by the snapshot and the restore-dump plans."""

    def __init__(self, ctx: RunContext) -> None:
        assert ctx.services is not None and ctx.transport is not None
        self.ctx = ctx
        self.services = ctx.services
        self.transport = ctx.transport
        guest = ctx.guest
        self.guest = guest
        self.parallel = guest.parallel_services
        self.sudo = guest.sudo
        self.timeout = guest.command_timeout
        self.database = False
        self._arming = False  # arm() started: the guest may run a watchdog not yet recorded

    def steps(self, *, database: bool) -> list[Step]:
        self.database = database
        names = ", ".join(self.guest.services)
        steps = [
            Step(
                "arm guest watchdog",
                self.arm,
                self.disarm,
                undo_name="disarm guest watchdog",
                undo_first=True,  # journalled before arming: a kill mid-arm is still looked for
                describe=f"restarts stopped services after {self.guest.watchdog_seconds} s",
            ),
            Step(
                "stop services",
                self.stop_services,
                self.start_services,
                undo_first=True,
                undo_name="start services",
                describe=f"{names} (those running)" + (", in parallel" if self.parallel else ""),
            ),
        ]
        if database:
            steps.append(
                Step(
                    "stop database",
                    self.stop_database,
                    self.start_database,
                    undo_first=True,
                    undo_name="start database",
                    describe=f"database={self.guest.database}",
                )
            )
        return steps

    @property
    def state(self) -> GuestServices:
        assert self.services.state is not None, "probe the services first"
        return self.services.state

    def arm(self) -> None:
        st = self.state
        database = st.database if self.database and st.database_running else None
        order = ([database] if database else []) + list(reversed(st.to_stop()))
        if not order:
            return
        self.services.budget.guard_watchdog(time.monotonic(), self.guest.watchdog_seconds)
        self._arming = True
        self.ctx.watchdog = watchdog.arm(
            self.transport,
            vm=self.ctx.key,
            run_id=self.ctx.run_id,
            init=st.init,
            seconds=self.guest.watchdog_seconds,
            services=order,
            database=database,
            sudo=self.sudo,
            timeout=self.timeout,
            triggers=self.services.triggers_text(),
            db_shell=self.services.db_shell(),
        )

    def disarm(self) -> None:
        """Disarm only once everything the watchdog guards runs again; otherwise leave it armed
        (it will start what is down) and say when it fires."""
        dog = self.ctx.watchdog
        if dog is None:
            self._disarm_unrecorded()
            return
        down = self.ctx.window.still_down
        if down:
            raise WatchdogKeptArmed(dog, down, vm=self.ctx.key)
        retried = False

        def attempt() -> watchdog.Disarmed:
            nonlocal retried
            retried = retried or self.transport.generation != generation
            return watchdog.disarm(
                self.transport,
                dog,
                env=self.services.script_env(),
                vm=self.ctx.key,
                sudo=self.sudo,
                timeout=self.timeout,
            )

        generation = self.transport.generation
        outcome = reconnecting(
            self.transport,
            attempt,
            what=f"{self.ctx.key}: disarming the guest watchdog",
            budget=self.services.budget,
        )
        if outcome.down:
            raise WatchdogKeptArmed(dog, list(outcome.down), vm=self.ctx.key)
        self.ctx.watchdog = None
        if outcome.was_armed:
            return
        if retried:  # an attempt cut short may have disarmed it already
            self.ctx.notes.append("the guest watchdog was gone when disarming it again")
            return
        raise GuestError(
            f"the guest watchdog had already fired after {dog.seconds} s: services were "
            "restarted while the run was still working",
            vm=self.ctx.key,
            hint="raise watchdog_seconds above the service window and run again",
        )

    def _disarm_unrecorded(self) -> None:
        """Arming was cut short (a signal, a lost connection) after the guest may have started
        the watchdog: find it by this run's marker. Nothing was stopped yet, so it goes."""
        if not self._arming:
            return
        pids = watchdog.running(
            self.transport, self.ctx.run_id, vm=self.ctx.key, sudo=self.sudo, timeout=self.timeout
        )
        for pid in pids:
            marker = watchdog.MARKER_PREFIX + self.ctx.run_id
            watchdog.disarm(
                self.transport,
                watchdog.Watchdog(pid, marker, 0, ()),
                env=self.services.script_env(),
                vm=self.ctx.key,
                sudo=self.sudo,
                timeout=self.timeout,
            )

    def stop_services(self) -> None:
        self.services.stop(self.state.to_stop(), self.ctx.window, parallel=self.parallel)

    def start_services(self) -> None:
        st = self.state
        names = [s for s in st.services if s in st.stopped]
        self.services.start(names, self.ctx.window, parallel=self.parallel)

    def stop_database(self) -> None:
        if self.state.database_running:
            self.services.stop_database(self.ctx.window)

    def start_database(self) -> None:
        st = self.state
        if st.database is not None and st.database in st.stopped:
            self.services.start_database(self.ctx.window)


class WatchdogKeptArmed(ServiceNotRestored):
    """Something the watchdog guards is down: it stays armed and will start it."""

    def __init__(self, dog: watchdog.Watchdog, down: list[str], *, vm: str) -> None:
        self.down = down
        self.fires_at = dog.fires_at
        left = dog.fires_at - time.time()
        when = datetime.fromtimestamp(dog.fires_at).strftime("%H:%M:%S")
        due = f"in {left:.0f} s" if left >= 1 else "due now"
        them = "it" if len(down) == 1 else "them"
        super().__init__(
            f"{', '.join(down)} still down; the guest watchdog will start {them} at {when} ({due})",
            vm=vm,
            hint=f"if not, run: snapcoord recover {vm}",
        )


def _create_snapshot(ctx: RunContext, label: str) -> None:
    cfg = ctx.vm_cfg
    try:
        ctx.snapshot = ctx.adapter.create_snapshot(
            ctx.require_vm(),
            ctx.snapshot_name,
            description(label, ctx.run_id),
            memory=cfg.memory,
            quiesce=cfg.quiesce,
            timeout=cfg.snapshot_timeout,
        )
    except (SnapshotFailed, Interrupted):  # a signal during the call is not a failed snapshot
        raise
    except SnapcoordError as exc:
        raise SnapshotFailed(
            f"snapshot {ctx.snapshot_name} failed: {exc.message}", vm=ctx.key, hint=exc.hint
        ) from exc


# -- revert, delete ---------------------------------------------------------------------------


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


def revert_steps(ctx: RunContext, *, target: str | None, safety: bool) -> list[Step]:
    found: dict[str, Any] = {}

    def choose() -> None:
        found["snapshot"] = pick_snapshot(ctx.adapter, ctx.require_vm(), target, vm_key=ctx.key)
        found["power"] = ctx.adapter.power_state(ctx.require_vm())
        ctx.snapshot_name = found["snapshot"].name

    def safety_snapshot() -> None:
        name = snapshot_name("safety")
        if name == found["snapshot"].name:
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
                ctx.require_vm(), found["snapshot"], start=None, timeout=ctx.vm_cfg.snapshot_timeout
            )
        except Interrupted:
            raise
        except SnapcoordError as exc:
            raise SnapshotFailed(
                f"revert to {found['snapshot'].name} failed: {exc.message}", vm=ctx.key
            ) from exc

    steps = [
        *_connect_steps(ctx),
        Step("choose snapshot", choose, describe=f"--to {target}" if target else "newest"),
    ]
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


def _services_up_after_revert(ctx: RunContext, found: dict[str, Any]) -> None:
    if found.get("power") != PowerState.RUNNING:
        ctx.notes.append("the VM was not running before the revert: services not checked")
        return
    assert ctx.transport is not None and ctx.services is not None
    _wait_for_guest(ctx)
    try:
        killed = watchdog.kill_all(
            ctx.transport,
            vm=ctx.key,
            sudo=ctx.guest.sudo,
            timeout=ctx.guest.command_timeout,
        )
        if killed:
            ctx.notes.append(
                f"stopped {len(killed)} snapcoord watchdog(s) that the revert brought back "
                f"(pid {', '.join(map(str, killed))}): the snapshot's memory held them"
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
        state = ctx.services.probe()
        window = ctx.window
        if state.database is not None and not state.running.get(state.database):
            state.stopped.append(state.database)
            ctx.services.start_database(window)
        down = [s for s in state.services if not state.running.get(s)]
        state.stopped.extend(down)
        ctx.services.start(down, window)
    finally:
        ctx.transport.close()


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


def delete_steps(ctx: RunContext, *, name: str) -> list[Step]:
    def delete() -> None:
        vm = ctx.require_vm()
        snapshot = ctx.adapter.find_snapshot(vm, name)
        ctx.adapter.delete_snapshot(vm, snapshot, timeout=ctx.vm_cfg.snapshot_timeout)
        ctx.snapshot_name = name

    return [*_connect_steps(ctx), Step(f"delete snapshot {name}", delete)]

"""The state one run builds up, and the steps every plan starts with: connect to the hypervisor,
find the VM, open the guest connection and probe its services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snapcoord.adapters import open_adapter
from snapcoord.adapters.base import VM, Adapter, Snapshot
from snapcoord.errors import (
    SnapcoordError,
)
from snapcoord.guest import Transport
from snapcoord.hooks import commands
from snapcoord.hooks.databases.pause import WritePause
from snapcoord.hooks.guest import watchdog
from snapcoord.hooks.guest.services import Services
from snapcoord.plans.leasing import GuestLease
from snapcoord.run import ServiceWindow, Step
from snapcoord.settings import Config, GuestConfig, VMConfig
from snapcoord.transports import open_transport


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
    pause: WritePause | None = None  # consistency = "pause": holding commits
    snapshot_name: str = ""
    run_folder: str = ""  # the store folder of a dump when there is no snapshot name (freeze)
    snapshot_by: str | None = None  # who takes the snapshot when snapcoord does not (vzdump)
    notes: list[str] = field(default_factory=list)  # warnings shown at the end
    window: ServiceWindow = field(default_factory=ServiceWindow)
    outputs: dict[str, Any] = field(default_factory=dict)  # dump/archive results for --json
    soft_failures: list[SnapcoordError] = field(default_factory=list)  # reported, not fatal
    #: the plan's end leaves the hypervisor session open for work after the run (retention,
    #: inventory); whoever sets it closes the adapter
    keep_connection: bool = False
    #: ``freeze``: when it froze, until when at most, who asked (snapcoord/freeze.py)
    freeze: dict[str, Any] | None = None
    #: the command the run is for (``snapshot``, ``revert``...): named in the guest lease
    command: str = ""
    #: this run's hold on its guest (plans/leasing.py); the plans that bracket a guest take it
    lease: GuestLease | None = None

    @classmethod
    def create(cls, config: Config, vm_key: str, run_id: str) -> RunContext:
        vm_cfg = config.vm(vm_key)
        adapter = open_adapter(vm_cfg.hypervisor, config.hypervisors[vm_cfg.hypervisor])
        ctx = cls(config, vm_cfg, run_id, adapter)
        if vm_cfg.guest is not None:
            ctx.transport = open_transport(config, vm_key, adapter=adapter)
            ctx.services = Services(ctx.transport, vm_cfg.guest, vm=vm_key)
            ctx.lease = GuestLease(ctx)
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
            **({"freeze": self.freeze} if self.freeze else {}),
        }


# -- shared steps ----------------------------------------------------------------------------


def connect_steps(ctx: RunContext) -> list[Step]:
    hv = ctx.vm_cfg.hypervisor
    return [
        Step(
            f"connect to hypervisor {hv}",
            ctx.adapter.connect,
            # a session kept for the work after the run is closed by whoever kept it
            None if ctx.keep_connection else ctx.adapter.close,
            undo_name=f"disconnect from hypervisor {hv}",
            describe=f"{ctx.config.hypervisors[hv].type} session to {hv}",
        ),
        Step("find VM", lambda: _find_vm(ctx), describe=f"find_vm({ctx.vm_cfg.ref!r})"),
    ]


def _find_vm(ctx: RunContext) -> None:
    ctx.vm = ctx.adapter.find_vm(ctx.vm_cfg.ref)


def guest_connect_steps(ctx: RunContext, *, lease: bool = False) -> list[Step]:
    """Open the guest connection (closed on unwind) and probe its services and sudo; with
    ``lease`` (a run that brackets the guest) then take the guest lease (released last)."""
    if ctx.transport is None or ctx.services is None:
        return []
    transport, services = ctx.transport, ctx.services
    held = [ctx.lease.step()] if lease and ctx.lease is not None else []
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
        *held,
    ]


def _probe(ctx: RunContext, services: Services) -> None:
    state = services.probe()
    for name, units in state.triggers.items():
        if state.running.get(name):
            ctx.notes.append(
                f"{name} is started on demand by {', '.join(units)}: stopped and started with it"
            )


def hook_step(ctx: RunContext, phase: str) -> Step | None:
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

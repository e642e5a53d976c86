"""The freeze run: the guest quiesced as for a snapshot (plans/quiesce.py), held until a thaw
arrives or the limit is reached, then put back by the usual undos. No hypervisor call: the
snapshot is somebody else's (a backup product, vzdump)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from snapcoord.errors import SnapshotFailed, UsageError
from snapcoord.naming import snapshot_name
from snapcoord.plans.context import RunContext, guest_connect_steps
from snapcoord.plans.quiesce import quiesce_steps
from snapcoord.run import Step
from snapcoord.settings import Config

#: the guest watchdog fires this long after the limit: the holder restores first, at the limit
WATCHDOG_GRACE = 20


def frozen_config(config: Config, key: str, max_seconds: int) -> Config:
    """``config`` with VM ``key``'s guest limits fitted to a freeze of ``max_seconds``: the
    lock session of a pause is ended by the guest at the limit, the watchdog shortly after."""
    vm_cfg = config.vm(key)
    if vm_cfg.guest is None:
        raise UsageError(
            f"{key}: freeze needs a [vms.{key}.guest] table: there is nothing to quiesce",
        )
    guest = dataclasses.replace(
        vm_cfg.guest,
        pause_timeout=float(max_seconds),
        watchdog_seconds=max_seconds + WATCHDOG_GRACE,
    )
    vms = {**config.vms, key: dataclasses.replace(vm_cfg, guest=guest)}
    return dataclasses.replace(config, vms=vms)


def freeze_steps(ctx: RunContext, *, wait: Callable[[], None], label: str = "freeze") -> list[Step]:
    """``wait`` returns when the thaw arrives (or raises at the limit)."""
    ctx.run_folder = snapshot_name(label)  # the store folder of a dump
    ctx.snapshot_by = label
    before, after = quiesce_steps(ctx)
    held = "commits held" if ctx.guest.consistency == "pause" else "services stopped"
    services = ctx.services
    if ctx.guest.consistency == "stop" and services is not None:
        # something may have started a service meanwhile (a timer, socket activation): the
        # other product's snapshot would then not be consistent, and thaw must say so
        after = [
            Step(
                "check services stayed stopped",
                lambda: _stayed_stopped(ctx),
                describe="nothing this run stopped ran again while frozen (one round trip)",
            ),
            *after,
        ]
    return [
        *guest_connect_steps(ctx, lease=True),
        *before,
        Step(
            "frozen: wait for thaw",
            wait,
            describe=f"{held} until snapcoord thaw, at most {ctx.guest.pause_timeout:g} s "
            "from the start of freeze",
        ),
        *after,
    ]


def dump_steps(ctx: RunContext, *, label: str) -> list[Step]:
    """The dump (and archives) alone, while everything runs: before vzdump stops or suspends
    the guest itself. Only for a VM that has one (``Fallback.wanted``)."""
    from snapcoord.plans.fallback import Fallback

    fallback = Fallback(ctx)
    ctx.run_folder = snapshot_name(label)
    ctx.snapshot_by = label
    return [*guest_connect_steps(ctx), *fallback.preflight_steps(), *fallback.window_steps()]


def _stayed_stopped(ctx: RunContext) -> None:
    """After a long freeze the connection may have dropped: reconnect (within the budget)."""
    from snapcoord.reconnect import reconnecting

    services, transport = ctx.services, ctx.transport
    assert services is not None and transport is not None
    reconnecting(
        transport,
        lambda: services.still_stopped(
            "a snapshot taken while frozen is not consistent", SnapshotFailed
        ),
        what=f"{ctx.key}: checking that the services stayed stopped",
        budget=services.budget,
    )

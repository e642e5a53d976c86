"""Plans around the guest-side freeze hook (snapcoord/freeze_hook.py): install, status and
uninstall, and the three calls vzdump-hook makes for a QEMU VM in snapshot mode — prepare
(``pre-stop``), verify (``backup-end``), restore (``backup-abort``, ``job-abort``)."""

from __future__ import annotations

from snapcoord import freeze_hook
from snapcoord.errors import UsageError
from snapcoord.plans.context import RunContext, connect_steps, guest_connect_steps
from snapcoord.run import Step


def _require_guest(ctx: RunContext) -> None:
    if ctx.vm_cfg.guest is None:
        raise UsageError(f"{ctx.key}: the freeze hook needs a [vms.{ctx.key}.guest] table")


def install_steps(ctx: RunContext) -> list[Step]:
    _require_guest(ctx)
    where = freeze_hook.hook_path(freeze_hook.caller(ctx))
    return [
        *guest_connect_steps(ctx),
        Step(
            "install freeze hook",
            lambda: freeze_hook.install(ctx),
            describe=f"write {where} (0700), enable it for the guest's agent, restart the agent",
        ),
    ]


def status_steps(ctx: RunContext) -> list[Step]:
    _require_guest(ctx)
    return [
        *guest_connect_steps(ctx),
        Step("check freeze hook", lambda: freeze_hook.report_status(ctx)),
    ]


def uninstall_steps(ctx: RunContext) -> list[Step]:
    _require_guest(ctx)
    return [
        *guest_connect_steps(ctx),
        Step("uninstall freeze hook", lambda: freeze_hook.uninstall(ctx)),
    ]


def prepare_steps(ctx: RunContext, vmid: int) -> list[Step]:
    """``pre-stop``: everything that must hold for the hook to bracket the agent's freeze, the
    dump if the VM has one (while everything runs), then this backup's mark in the hook's log."""
    from snapcoord.naming import snapshot_name
    from snapcoord.plans.fallback import Fallback

    _require_guest(ctx)
    dump: list[Step] = []
    if Fallback.wanted(ctx.vm_cfg):
        fallback = Fallback(ctx)
        ctx.run_folder = snapshot_name("vzdump")
        ctx.snapshot_by = "vzdump"
        dump = [*fallback.preflight_steps(), *fallback.window_steps()]
    return [
        *connect_steps(ctx),
        Step(
            "check the backup's guest agent freeze",
            lambda: ctx.adapter.check_backup_freeze(ctx.require_vm()),
            describe="the VM's agent is enabled with fs-freeze on backup, and answers",
        ),
        *guest_connect_steps(ctx),
        Step("check freeze hook", lambda: freeze_hook.report_status(ctx)),
        Step("check database answers", lambda: freeze_hook.database_answers(ctx)),
        *dump,
        Step("mark this backup in the hook's log", lambda: _arm(ctx, vmid)),
    ]


def _arm(ctx: RunContext, vmid: int) -> None:
    freeze_hook.arm(ctx, vmid)


def verify_steps(ctx: RunContext) -> list[Step]:
    """``backup-end``: the hook's log says whether the freeze was bracketed."""
    _require_guest(ctx)
    return [
        *guest_connect_steps(ctx),
        Step("check the freeze hook's log", lambda: _verify(ctx)),
    ]


def _verify(ctx: RunContext) -> None:
    freeze_hook.verify(ctx)


def restore_steps(ctx: RunContext) -> list[Step]:
    """``backup-abort``, ``job-abort``: put back whatever the hook still holds."""
    _require_guest(ctx)
    return [
        *guest_connect_steps(ctx),
        Step("restore what the freeze hook holds", lambda: freeze_hook.recover(ctx)),
    ]

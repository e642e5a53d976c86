"""The commands behind the command line: each takes the parsed arguments, runs, prints its
result and returns its exit code. Imported only once the arguments were parsed, so ``--help``
and usage errors never load the engine, the plans or an adapter."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from snapcoord.config import Config, load_config
from snapcoord.errors import ExitCode, SnapcoordError, UsageError
from snapcoord.example import example_config
from snapcoord.fleet import FleetRun, Job, View
from snapcoord.fleet import summary as fleet_summary
from snapcoord.outcome import Outcome
from snapcoord.output import plural, print_json
from snapcoord.plans import (
    RunContext,
    delete_steps,
    revert_steps,
    snapshot_steps,
)
from snapcoord.run import Reporter, RunResult, Step
from snapcoord.runner import run_plan
from snapcoord.selection import Selection, select
from snapcoord.views import DocumentView, InOrder, JsonView, StepLinesView, pick_view


def _load(args: argparse.Namespace, *, watchdog_rule: bool = True) -> Config:
    config = load_config(args.config, watchdog_rule=watchdog_rule)
    for warning in config.warnings:
        print(f"snapcoord: warning: {warning}", file=sys.stderr)
    args.loaded_config = config
    return config


def write_metrics_file(args: argparse.Namespace) -> None:
    """After every command that read the configuration (``[defaults] metrics_file``)."""
    config: Config | None = getattr(args, "loaded_config", None)
    if config is None or config.defaults.metrics_file is None or args.command == "config":
        return
    from snapcoord.metrics import write_metrics

    try:
        write_metrics(config)
    except OSError as exc:
        print(
            f"snapcoord: warning: cannot write {config.defaults.metrics_file}: {exc.strerror}",
            file=sys.stderr,
        )


def _selected(args: argparse.Namespace, config: Config) -> tuple[list[str], Selection]:
    selection = Selection(
        names=tuple(args.vms),
        all=args.all
        or (args.default_all and not (args.vms or args.tag or args.hypervisor or args.select)),
        tags=tuple(args.tag),
        hypervisors=tuple(args.hypervisor),
        exclude=tuple(args.exclude),
        either=tuple(args.select),
    )
    return select(config, selection), selection


def _fleet(
    args: argparse.Namespace,
    config: Config,
    job: Job,
    *,
    command: str,
    notify: bool = False,
    in_order: bool = False,
    document: bool = False,
    footer: Callable[[list[Outcome]], list[str]] | None = None,
) -> int:
    """Run ``job`` for every selected VM (in parallel up to the limits) and report. With
    ``in_order`` the VMs' results are shown in the selection's order, whichever finished first
    (status, prune: the same lines in the same order every run). With ``document``, ``--json``
    prints one document at the end instead of a line per VM (list, recover: one VM's object,
    or ``{"vms": {KEY: object}, "summary": {...}}``). ``footer`` gives the lines printed after
    every VM's (plain output only)."""
    keys, selection = _selected(args, config)
    parallel = 1 if getattr(args, "dry_run", False) else args.parallel
    if document and args.json:
        view: View = DocumentView()
    else:
        view = pick_view(json=args.json, concurrent=parallel > 1 and len(keys) > 1)
    if in_order:
        view = InOrder(view, keys)
    notifier = None
    wanted = any(config.vm(k).notify.ping_url or config.vm(k).notify.webhook_url for k in keys)
    if notify and wanted and not getattr(args, "dry_run", False):
        from snapcoord.notify import Notifier

        notifier = Notifier(config, keys)
        _warn(notifier.start())
    started = time.monotonic()
    run = FleetRun(
        keys,
        {key: config.vm(key).hypervisor for key in keys},
        {name: hv.max_parallel for name, hv in config.hypervisors.items()},
        parallel,
        view,
    )
    try:
        outcomes = run.run(job)
    finally:
        view.close()
    totals = fleet_summary(outcomes, command=command, seconds=time.monotonic() - started)
    totals["peak_parallel"] = run.peak
    if document and args.json:
        by_vm = {o.vm: o.summary for o in outcomes}
        print_json({"vms": by_vm, "summary": totals} if selection.is_fleet else outcomes[0].summary)
    elif footer is not None and not args.json:
        for line in footer(outcomes):
            print(line)
    if selection.is_fleet and not (document and args.json):
        if args.json:
            print_json({"summary": totals})
        else:
            counts = ", ".join(f"{n} {name}" for name, n in totals["outcomes"].items())
            print(
                f"{command}: {plural(len(outcomes), 'VM')}: {counts} (exit {totals['exit_code']})"
            )
    if notifier is not None:
        _warn(notifier.finish(outcomes, command))
    return int(totals["exit_code"])


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"snapcoord: warning: {warning}", file=sys.stderr)


# -- commands ---------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "example":
        print(example_config())
        return ExitCode.OK
    config = _load(args)
    counted = f"{plural(len(config.hypervisors), 'hypervisor')}, {plural(len(config.vms), 'VM')}"
    print(f"{config.source}: ok ({counted})")
    for key, vm in config.vms.items():
        if vm.guest is not None and vm.guest.transport == "agent":
            kind = config.hypervisors[vm.hypervisor].type
            need = (
                "a container (lxc) has none: it keeps transport = 'exec' (pct exec) or 'ssh'"
                if kind == "proxmox"
                else "the domain needs the org.qemu.guest_agent.0 channel"
            )
            print(f"{key}: guest commands through the QEMU guest agent ({kind}); {need}")
    return ExitCode.OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    config = _load(args)

    def job(key: str, reporter: Reporter) -> Outcome:
        label = args.label or config.vm(key).label

        def build(ctx: RunContext) -> list[Step]:
            return snapshot_steps(ctx, label=label)

        return run_plan(
            config,
            key,
            build,
            title="snapshot",
            reporter=reporter,
            dry_run=args.dry_run,
            after=_after_snapshot,
        )

    return _fleet(args, config, job, command="snapshot", notify=True)


def _after_snapshot(ctx: RunContext, result: RunResult) -> None:
    """Once the services are back and the snapshot is taken: retention, the inventory. A
    problem here is a warning, never a failed snapshot."""
    if not result.ok or not ctx.snapshot_name:
        return
    from snapcoord.prune import after_snapshot
    from snapcoord.verify import jobs

    verified = jobs.after_snapshot(ctx)
    if verified is not None:
        error = jobs.error_for(verified)
        if error is not None:
            result.failures.append(error)
    report = after_snapshot(ctx)
    ctx.outputs["prune"] = report
    if report.get("error"):
        ctx.notes.append(f"prune after the snapshot failed: {report['error']}")


def cmd_prune(args: argparse.Namespace) -> int:
    from snapcoord.prune import prune_vm

    config = _load(args)
    return _fleet(
        args,
        config,
        lambda key, reporter: prune_vm(config, key, dry_run=args.dry_run),
        command="prune",
        in_order=True,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from snapcoord.status import status_vm

    config = _load(args)
    return _fleet(
        args,
        config,
        lambda key, reporter: status_vm(config, key, offline=args.offline),
        command="status",
        in_order=True,
    )


def cmd_check(args: argparse.Namespace) -> int:
    from snapcoord.check import check_vm

    # a watchdog too short for the stops is one VM's problem here, reported with the others
    config = _load(args, watchdog_rule=False)
    return _fleet(
        args, config, lambda key, reporter: check_vm(config, key), command="check", in_order=True
    )


def cmd_revert(args: argparse.Namespace) -> int:
    config = _load(args)
    vm_cfg = config.vm(args.vm)
    if not args.dry_run:
        _confirm(
            args,
            f"revert {args.vm} to {args.to or 'its newest snapcoord snapshot'}? "
            "Everything written since is lost.",
        )
    safety = vm_cfg.safety_snapshot and not args.no_safety_snapshot
    return _run(
        args,
        config,
        args.vm,
        lambda ctx: revert_steps(ctx, target=args.to, safety=safety),
        title="revert",
    )


def cmd_delete(args: argparse.Namespace) -> int:
    config = _load(args)
    config.vm(args.vm)
    _confirm(args, f"delete snapshot {args.name} of {args.vm}?")
    args.dry_run = False
    return _run(
        args, config, args.vm, lambda ctx: delete_steps(ctx, name=args.name), title="delete"
    )


def cmd_list(args: argparse.Namespace) -> int:
    from snapcoord.listing import legend, list_vm

    config = _load(args)
    prefixed = _selected(args, config)[1].is_fleet  # `list db1` keeps its bare rows
    return _fleet(
        args,
        config,
        lambda key, reporter: list_vm(config, key, prefixed=prefixed),
        command="list",
        in_order=True,
        document=True,
        footer=legend,
    )


def cmd_restore_dump(args: argparse.Namespace) -> int:
    from snapcoord.plans.restore import DumpSource, restore_dump_steps

    config = _load(args)
    config.vm(args.vm)
    source = DumpSource(snapshot=args.from_snapshot, file=args.file)
    if not args.dry_run:
        what = args.from_snapshot or args.file or "the newest dump"
        _confirm(args, f"drop the databases of {args.vm} and restore {what}?")
    return _run(
        args,
        config,
        args.vm,
        lambda ctx: restore_dump_steps(ctx, source=source),
        title="restore-dump",
    )


def cmd_recover(args: argparse.Namespace) -> int:
    from snapcoord.recover import recover_vm

    config = _load(args)
    return _fleet(
        args,
        config,
        lambda key, reporter: recover_vm(config, key),
        command="recover",
        in_order=True,
        document=True,
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from snapcoord.verify.jobs import verify_vm

    config = _load(args)
    return _fleet(
        args,
        config,
        lambda key, reporter: verify_vm(
            config, key, snapshot=args.from_snapshot, boot=args.boot, reporter=reporter
        ),
        command="verify",
        notify=True,
    )


def _guarded(key: str, command: str, job: Callable[[], Outcome]) -> Outcome:
    """``job``'s outcome; a refusal before it started (locked, bad input) as one too."""
    try:
        return job()
    except SnapcoordError as exc:
        return Outcome.refused(key, command, exc)


def _freeze_limit(config: Config, key: str, requested: int | None) -> int:
    guest = config.vm(key).guest
    return requested or (guest.freeze_max_seconds if guest else 0)


def cmd_freeze(args: argparse.Namespace) -> int:
    from snapcoord.freeze import freeze_vm

    config = _load(args)

    def job(key: str, reporter: Reporter) -> Outcome:
        limit = _freeze_limit(config, key, args.max_seconds)
        return _guarded(
            key, "freeze", lambda: freeze_vm(config, key, max_seconds=limit, reporter=reporter)
        )

    return _fleet(args, config, job, command="freeze")


def cmd_thaw(args: argparse.Namespace) -> int:
    from snapcoord.freeze import thaw_vm

    config = _load(args)

    def job(key: str, reporter: Reporter) -> Outcome:
        return _guarded(key, "thaw", lambda: thaw_vm(config, key, reporter=reporter))

    return _fleet(args, config, job, command="thaw")


def cmd_vzdump_hook(args: argparse.Namespace) -> int:
    import os

    from snapcoord.freeze import freeze_vm, thaw_vm
    from snapcoord.plans import hook
    from snapcoord.plans.fallback import Fallback
    from snapcoord.plans.freeze import dump_steps
    from snapcoord.vzdump import Actions, HookCall, run_hook

    call = HookCall.parse([args.phase, *args.rest], os.environ)
    config = _load(args)
    view = StepLinesView()
    where = " ".join(str(x) for x in (call.phase, call.mode, call.vmid) if x is not None)

    def freeze(key: str, vmid: int) -> Outcome:
        limit = _freeze_limit(config, key, None)
        return _guarded(
            key,
            "freeze",
            lambda: freeze_vm(
                config,
                key,
                max_seconds=limit,
                reporter=view.reporter(key),
                source="vzdump",
                vmid=vmid,
            ),
        )

    def thaw(key: str) -> Outcome:
        return _guarded(key, "thaw", lambda: thaw_vm(config, key, reporter=view.reporter(key)))

    def dump(key: str) -> Outcome:
        if not Fallback.wanted(config.vm(key)):
            line = f"{key}: mode stop: vzdump shuts the guest down itself; no dump configured"
            return Outcome(key, ExitCode.OK, {"vm": key, "ok": True, "exit_code": 0}, [line])
        return run_plan(
            config,
            key,
            lambda ctx: dump_steps(ctx, label="vzdump"),
            title="dump",
            reporter=view.reporter(key),
            dry_run=args.dry_run,
        )

    def hook_plan(key: str, build: Callable[[RunContext], list[Step]], title: str) -> Outcome:
        return _guarded(
            key,
            title,
            lambda: run_plan(
                config, key, build, title=title, reporter=view.reporter(key), dry_run=args.dry_run
            ),
        )

    def prepare(key: str, vmid: int) -> Outcome:
        return hook_plan(key, lambda ctx: hook.prepare_steps(ctx, vmid), "vzdump pre-stop")

    def verify(key: str) -> Outcome:
        return hook_plan(key, hook.verify_steps, "vzdump backup-end")

    def restore(key: str) -> Outcome:
        return hook_plan(key, hook.restore_steps, "vzdump abort")

    actions = Actions(
        freeze=freeze, thaw=thaw, dump=dump, prepare=prepare, verify=verify, restore=restore
    )
    code, outcomes, line = run_hook(config, call, actions)
    for outcome in outcomes:
        view.finished(outcome)
    if call.phase == "backup-end" and outcomes:
        # the end of this guest's backup: whether it is application-consistent goes out (the
        # metrics file is rewritten after every command)
        _notify_end(config, outcomes, "vzdump backup-end")
    if line:
        print(f"snapcoord: vzdump-hook {where}: {line}")
    return code


def _notify_end(config: Config, outcomes: list[Outcome], command: str) -> None:
    keys = [o.vm for o in outcomes]
    if not any(config.vm(k).notify.ping_url or config.vm(k).notify.webhook_url for k in keys):
        return
    from snapcoord.notify import Notifier

    _warn(Notifier(config, keys).finish(outcomes, command))


def cmd_freeze_hook(args: argparse.Namespace) -> int:
    from snapcoord.plans import hook

    config = _load(args)
    build = {
        "install": hook.install_steps,
        "status": hook.status_steps,
        "uninstall": hook.uninstall_steps,
    }[args.action]

    def job(key: str, reporter: Reporter) -> Outcome:
        return _guarded(
            key,
            f"freeze-hook {args.action}",
            lambda: run_plan(
                config,
                key,
                build,
                title=f"freeze-hook {args.action}",
                reporter=reporter,
                dry_run=args.dry_run,
            ),
        )

    return _fleet(args, config, job, command=f"freeze-hook {args.action}")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "freeze-hook": cmd_freeze_hook,
    "freeze": cmd_freeze,
    "thaw": cmd_thaw,
    "vzdump-hook": cmd_vzdump_hook,
    "snapshot": cmd_snapshot,
    "prune": cmd_prune,
    "status": cmd_status,
    "check": cmd_check,
    "list": cmd_list,
    "revert": cmd_revert,
    "delete": cmd_delete,
    "restore-dump": cmd_restore_dump,
    "recover": cmd_recover,
    "verify": cmd_verify,
    "config": cmd_config,
}


# -- running a plan ---------------------------------------------------------------------------


def _confirm(args: argparse.Namespace, question: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question.split('?')[0]}: refusing without --yes (no terminal to ask)")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError("cancelled")


def _run(
    args: argparse.Namespace,
    config: Config,
    key: str,
    build: Callable[[RunContext], list[Step]],
    *,
    title: str,
) -> int:
    """One plan on one VM (revert, delete, restore-dump): printed as it runs."""
    view = JsonView() if args.json else StepLinesView()
    outcome = run_plan(
        config, key, build, title=title, reporter=view.reporter(key), dry_run=args.dry_run
    )
    view.finished(outcome)
    return outcome.exit_code

"""Command line: argument parsing and dispatch. The only place that prints errors and picks exit
codes (docs/exit-codes.md)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from snapcoord import __version__
from snapcoord.config import Config, load_config
from snapcoord.errors import ConfigError, ExitCode, SnapcoordError, UsageError
from snapcoord.example import example_config
from snapcoord.naming import new_run_id
from snapcoord.output import HumanReporter, LogHandler, print_json, run_summary
from snapcoord.plans import (
    RunContext,
    WatchdogKeptArmed,
    delete_steps,
    revert_steps,
    snapshot_steps,
)
from snapcoord.run import RunResult, SilentReporter, Step
from snapcoord.session import Session

log = logging.getLogger("snapcoord")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapcoord",
        description="Consistent VM snapshots of database servers.",
        epilog="Exit codes: docs/exit-codes.md (0 ok, 2 usage/config, 3 hypervisor, "
        "4 preflight/guest, 5 snapshot failed, 6 service not restored, 75 locked, 130 interrupted)",
    )
    parser.add_argument("--version", action="version", version=f"snapcoord {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        help="configuration file (default: $SNAPCOORD_CONFIG, "
        "./snapcoord.toml, ~/.config/snapcoord/config.toml, /etc/snapcoord/config.toml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("snapshot", help="stop services, snapshot, restart: for each VM")
    p.add_argument("vms", nargs="+", metavar="VM")
    p.add_argument("--label", help="label in the snapshot name (default: from the config)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, touch nothing")
    p.add_argument("--json", action="store_true", help="one JSON object per VM on stdout")

    p = sub.add_parser("list", help="list a VM's snapshots")
    p.add_argument("vm", metavar="VM")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("revert", help="revert a VM to a snapshot")
    p.add_argument("vm", metavar="VM")
    p.add_argument("--to", metavar="NAME", help="snapshot name (default: newest snapcoord one)")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.add_argument(
        "--no-safety-snapshot", action="store_true", help="do not snapshot the current state first"
    )
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("delete", help="delete a snapshot")
    p.add_argument("vm", metavar="VM")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "restore-dump", help="replay a stored dump into the guest (drops its databases first)"
    )
    p.add_argument("vm", metavar="VM")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--from",
        dest="from_snapshot",
        metavar="SNAPSHOT-NAME",
        help="the dump taken with this snapshot (default: the newest good one)",
    )
    source.add_argument("--file", type=Path, metavar="PATH", help="a dump file (.sql.gz/.sql)")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.add_argument("--dry-run", action="store_true", help="verify, show what would be dropped")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("recover", help="restart services a crashed run left stopped")
    p.add_argument("vm", metavar="VM")

    p = sub.add_parser("config", help="check the configuration or print an example")
    p.add_argument("action", choices=("check", "example"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("snapcoord: %(levelname)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose or args.debug else logging.WARNING,
        handlers=[handler],
    )
    try:
        return int(COMMANDS[args.command](args))
    except SnapcoordError as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, ConfigError):
            lines = [f"{exc.source}: {p}" if exc.source else p for p in exc.problems]
        else:
            lines = [str(exc)]
        for line in lines:
            print(f"snapcoord: error: {line}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("snapcoord: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    for warning in config.warnings:
        print(f"snapcoord: warning: {warning}", file=sys.stderr)
    return config


# -- commands ---------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "example":
        print(example_config())
        return ExitCode.OK
    config = _load(args)
    print(f"{config.source}: ok ({len(config.hypervisors)} hypervisors, {len(config.vms)} VMs)")
    return ExitCode.OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    config = _load(args)
    for key in args.vms:
        config.vm(key)  # every name must exist before the first run starts
    exit_code = ExitCode.OK
    for key in args.vms:
        label = args.label or config.vm(key).label

        def build(ctx: RunContext, label: str = label) -> list[Step]:
            return snapshot_steps(ctx, label=label)

        code = _run(args, config, key, build, title="snapshot")
        if exit_code == ExitCode.OK:
            exit_code = ExitCode(code)
    return exit_code


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
    config = _load(args)
    ctx = RunContext.create(config, args.vm, new_run_id())
    with ctx.adapter:
        vm = ctx.adapter.find_vm(ctx.vm_cfg.ref)
        snapshots = ctx.adapter.list_snapshots(vm)
    rows: list[dict[str, Any]] = [
        {
            "name": s.name,
            "id": s.id,
            "created": s.created.isoformat() if s.created else None,
            "description": s.description,
            "parent": s.parent,
            "memory": s.memory,
            "current": s.current,
            "snapcoord": s.is_snapcoord,
        }
        for s in snapshots
    ]
    if args.json:
        print_json({"vm": args.vm, "snapshots": rows})
        return ExitCode.OK
    if not rows:
        print(f"{args.vm}: no snapshots")
    for row in rows:
        flags = ("*" if row["current"] else " ") + ("s" if row["snapcoord"] else " ")
        created = (row["created"] or "?")[:19]
        print(f"{flags} {created}  {row['name']}")
    return ExitCode.OK


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
    from snapcoord.recover import recover

    config = _load(args)
    for line in recover(config, args.vm):
        print(f"{args.vm}: {line}")
    return ExitCode.OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "snapshot": cmd_snapshot,
    "list": cmd_list,
    "revert": cmd_revert,
    "delete": cmd_delete,
    "restore-dump": cmd_restore_dump,
    "recover": cmd_recover,
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
    """Run one plan for one VM under its lock and journal; print and return its exit code."""
    run_id = new_run_id()
    ctx = RunContext.create(config, key, run_id)
    steps = build(ctx)
    if args.dry_run:
        _print_plan(key, steps, ctx)
        return ExitCode.OK
    reporter = SilentReporter() if args.json else HumanReporter(key)
    result = RunResult(window=ctx.window)
    session = Session(config, key, run_id)
    try:
        with session:
            result = session.execute(ctx, steps, reporter)
    except SnapcoordError as exc:
        result.failures.append(exc)
    summary = run_summary(
        key,
        result,
        run=run_id,
        command=title,
        snapshot=ctx.snapshot_name or None,
        notes=ctx.notes,
        **ctx.outputs,
    )
    if ctx.watchdog is not None:  # left armed: something it guards was down
        summary["watchdog_fires_at"] = round(ctx.watchdog.fires_at, 3)
    session.finish(ctx, result, summary)
    _report(args, key, result, summary)
    return result.exit_code


def _report(args: argparse.Namespace, key: str, result: RunResult, summary: dict[str, Any]) -> None:
    if args.json:
        print_json(summary)
    else:
        window = summary["window_seconds"]
        for note in summary["notes"]:
            print(f"{key}: note: {note}")
        status = "ok" if result.ok else f"FAILED (exit {result.exit_code})"
        parts = [f"{key}: {summary['command']} {status}"]
        if summary.get("snapshot"):
            parts.append(f"snapshot {summary['snapshot']}")
        if summary["services_down"]:
            parts.append(f"service window still open: {', '.join(summary['services_down'])} down")
        elif window is not None:
            parts.append(f"service window {window:.2f} s")
        elif summary.get("consistency") == "pause":
            paused = summary.get("write_pause_seconds")
            held = "" if paused is None else f"writes paused {paused:.2f} s, "
            parts.append(f"{held}no service stopped")
        print(", ".join(parts))
    for failure in result.failures:
        print(f"snapcoord: error: {failure}", file=sys.stderr)
    for bug in result.bugs:
        traceback.print_exception(bug, file=sys.stderr)
    said = any(isinstance(f, WatchdogKeptArmed) for f in result.failures)
    if result.window.still_down and not said:
        print(
            f"snapcoord: error: {key}: still stopped: {', '.join(result.window.still_down)}",
            file=sys.stderr,
        )


def _print_plan(key: str, steps: list[Step], ctx: RunContext) -> None:
    print(f"{key}: plan (dry run, nothing is touched):")
    undos = []
    for number, step in enumerate(steps, 1):
        if step.do is not None:
            print(f"  {number:2}. {step.name}" + (f": {step.describe}" if step.describe else ""))
        if step.undo is not None:
            undos.append(step.undo_name or f"undo {step.name}")
    if undos:
        print("  then, always, in this order:")
        for name in reversed(undos):
            print(f"      - {name}")
    for note in ctx.notes:
        print(f"  note: {note}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

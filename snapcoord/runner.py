"""One plan for one VM, run the same way by every command and by the freeze holder: under the
VM's lock and run journal (snapcoord/session.py), its steps reported as they go, its result
summarised (the JSON object) and told in lines (stdout) and error lines (stderr)."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from snapcoord.errors import ExitCode, SnapcoordError
from snapcoord.naming import new_run_id
from snapcoord.outcome import Outcome
from snapcoord.output import error_line, run_summary
from snapcoord.plans.bracket import WatchdogKeptArmed
from snapcoord.plans.context import RunContext
from snapcoord.run import Reporter, RunResult, Step
from snapcoord.session import Session
from snapcoord.settings import Config


def run_plan(
    config: Config,
    key: str,
    build: Callable[[RunContext], list[Step]],
    *,
    title: str,
    reporter: Reporter,
    dry_run: bool = False,
    after: Callable[[RunContext, RunResult], None] | None = None,
) -> Outcome:
    """Run one plan for one VM under its lock and journal. ``after`` runs once the plan has
    ended (services back), still under the lock. ``dry_run``: the plan's lines, nothing run."""
    run_id = new_run_id()
    ctx = RunContext.create(config, key, run_id)
    ctx.keep_connection = after is not None
    ctx.command = title
    steps = build(ctx)
    if dry_run:
        plan = _plan_lines(key, steps, ctx)
        return Outcome(
            key, ExitCode.OK, {"vm": key, "ok": True, "exit_code": 0, "plan": plan}, plan
        )
    result = RunResult(window=ctx.window)
    session = Session(config, key, run_id)
    try:
        with session:
            result = session.execute(ctx, steps, reporter)
            if after is not None:
                after(ctx, result)
    except SnapcoordError as exc:
        result.failures.append(exc)
    finally:
        if ctx.keep_connection:
            ctx.adapter.close()
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
    # a snapshot run names its snapshot only once it was taken (a failed run took none)
    untaken = title == "snapshot" and ctx.snapshot is None
    lines, errors = _report_lines(key, result, summary, name_snapshot=not untaken)
    return Outcome(key, result.exit_code, summary, lines, errors)


def _report_lines(
    key: str, result: RunResult, summary: dict[str, Any], *, name_snapshot: bool = True
) -> tuple[list[str], list[str]]:
    """The human result of one run: notes and a status line; error lines for stderr."""
    lines = [f"{key}: note: {note}" for note in summary["notes"]]
    window = summary["window_seconds"]
    status = "ok" if result.ok else f"FAILED (exit {result.exit_code})"
    parts = [f"{key}: {summary['command']} {status}"]
    if summary.get("snapshot") and name_snapshot:
        parts.append(f"snapshot {summary['snapshot']}")
    if summary["services_down"]:
        parts.append(f"service window still open: {', '.join(summary['services_down'])} down")
    elif window is not None:
        parts.append(f"service window {window:.2f} s")
    elif summary.get("consistency") == "pause":
        paused = summary.get("write_pause_seconds")
        held = "" if paused is None else f"writes paused {paused:.2f} s, "
        parts.append(f"{held}no service stopped")
    pruned = summary.get("prune") or {}
    if pruned.get("deleted"):
        parts.append(f"pruned {len(pruned['deleted'])}")
    lines.append(", ".join(parts))
    bugs = result.bugs
    # every error line names the VM by its config key (an adapter names it as the hypervisor does)
    errors = [error_line(key, failure) for failure in result.failures if failure not in bugs]
    errors += ["".join(traceback.format_exception(bug)).rstrip() for bug in result.bugs]
    said = any(isinstance(f, WatchdogKeptArmed) for f in result.failures)
    if result.window.still_down and not said:
        errors.append(f"{key}: still stopped: {', '.join(result.window.still_down)}")
    return lines, errors


def _plan_lines(key: str, steps: list[Step], ctx: RunContext) -> list[str]:
    lines = [f"{key}: plan (dry run, nothing is touched):"]
    undos = []
    for number, step in enumerate(steps, 1):
        if step.do is not None:
            lines.append(
                f"  {number:2}. {step.name}" + (f": {step.describe}" if step.describe else "")
            )
        if step.undo is not None:
            undos.append(step.undo_name or f"undo {step.name}")
    if undos:
        lines.append("  then, always, in this order:")
        lines += [f"      - {name}" for name in reversed(undos)]
    lines += [f"  note: {note}" for note in ctx.notes]
    return lines

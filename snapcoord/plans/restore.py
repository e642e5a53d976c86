"""The ``restore-dump`` run: replay a stored logical dump into the guest's running database.

verify (sha256 against the manifest, intact stream, completion marker: before anything else)
→ connect, probe services, check the database answers → arm the guest watchdog → stop
``services`` (the database stays up) → drop every non-system database the dump contains, load
it, compare per-table row counts and checksums with the manifest → (unwind) start services,
disarm watchdog.

Dropping first is what makes the restore exact: loading table by table over a schema that
changed after the dump fails with errno 150 and leaves tables missing (docs/dump.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcoord import store
from snapcoord.config import Config
from snapcoord.errors import PreflightError, UsageError
from snapcoord.hooks import databases
from snapcoord.hooks.databases.dumpfile import RestoreSource
from snapcoord.plans.bracket import Bracket
from snapcoord.plans.context import RunContext, guest_connect_steps
from snapcoord.run import Engine, Reporter, RunResult, Step


@dataclass(frozen=True)
class DumpSource:
    """What to restore: ``--from SNAPSHOT-NAME``, ``--file PATH``, or (neither) the newest dump."""

    snapshot: str | None = None
    file: Path | None = None


def resolve_source(config: Config, vm_key: str, source: DumpSource) -> Path:
    """The run folder (or file) to restore from; a failed or missing dump is an error."""
    if source.snapshot and source.file:
        raise UsageError("use either --from or --file, not both")
    if source.file is not None:
        return Path(source.file)
    if source.snapshot:
        return store.find_dump(config.store, vm_key, source.snapshot)
    return newest_dump(config, vm_key, hint=", or pass --file")


def newest_dump(config: Config, vm_key: str, *, hint: str = "") -> Path:
    """The VM's newest complete run folder that holds a database dump (a run that archived
    files only is passed over); ``hint`` ends the error's hint."""
    dumps = [d for d in store.list_dumps(config.store, vm_key) if databases.holds_dump(d.manifest)]
    if not dumps:
        raise PreflightError(
            f"no dump of {vm_key} in {config.store}",
            vm=vm_key,
            hint="enable [vms.X.guest] dump = true and take a snapshot" + hint,
        )
    return dumps[-1].path


def restore_dump_steps(
    ctx: RunContext, *, source: DumpSource, prepared: RestoreSource | None = None
) -> list[Step]:
    """The steps of a restore-dump run (for the CLI's ``_run``). The dump is verified here,
    while the plan is built, so ``--dry-run`` can name the databases that would be dropped."""
    if ctx.transport is None or ctx.services is None:
        raise UsageError(f"{ctx.key} has no [vms.{ctx.key}.guest] table: nothing to restore into")
    path = resolve_source(ctx.config, ctx.key, source)
    kind = databases.for_dump(path)
    dump = prepared or kind.prepare_restore(path, vm=ctx.key)
    transport, services, guest = ctx.transport, ctx.services, ctx.guest
    options = ctx.vm_cfg.dump
    ctx.notes.append(
        f"dump {dump.file} verified"
        + (" against its manifest" if dump.manifest else " (no manifest: stream check only)")
    )

    def check_database() -> None:
        state = services.state
        if state is not None and state.database is not None and not state.database_running:
            raise PreflightError(
                f"the database service {state.database} is not running: restore-dump loads "
                "into a running server",
                vm=ctx.key,
                hint=f"start it: service {state.database} start",
            )
        if state is not None and state.kind != kind.NAME:
            raise PreflightError(
                f"{dump.file.name} is a {kind.FORMAT.program} dump, but the guest's database "
                f"is {state.database or 'none'}",
                vm=ctx.key,
                hint="restore it into a guest with that kind of database",
            )
        kind.check_ready(transport, vm=ctx.key, guest=guest, options=options)

    def load() -> None:
        result = kind.restore(transport, vm=ctx.key, guest=guest, options=options, source=dump)
        ctx.notes.append(
            f"restored {', '.join(result.dropped) or 'the dump'} from {dump.file.name} in "
            f"{result.seconds:.1f} s; {result.rows_checked} rows match the manifest"
        )
        ctx.notes.extend(result.warnings)

    drop = ", ".join(dump.to_drop) or "none"
    return [
        *guest_connect_steps(ctx, lease=True),
        Step("check database", check_database, describe="the database answers (it stays up)"),
        *Bracket(ctx).steps(database=False),
        Step(
            "drop databases and load dump",
            load,
            describe=f"DROP DATABASE {drop}; load {dump.file}; compare row counts and checksums",
        ),
    ]


def restore_dump(
    config: Config,
    vm_key: str,
    *,
    source: DumpSource,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    run_id: str = "restore",
) -> RunResult:
    """Run restore-dump for one VM (without the CLI's lock and journal; the CLI may instead
    pass :func:`restore_dump_steps` to its runner). ``dry_run`` verifies the dump and returns
    ``values["would_drop"]`` without touching the guest."""
    ctx = RunContext.create(config, vm_key, run_id)
    path = resolve_source(config, vm_key, source)
    prepared = databases.for_dump(path).prepare_restore(path, vm=vm_key)
    if dry_run:
        result = RunResult(window=ctx.window)
        result.values.update(dry_run_values(prepared))
        return result
    steps = restore_dump_steps(ctx, source=source, prepared=prepared)
    result = Engine(reporter, window=ctx.window).execute(steps)
    result.values.update({"dump": str(prepared.file), "dropped": prepared.to_drop,
                          "notes": list(ctx.notes)})  # fmt: skip
    return result


def dry_run_values(prepared: RestoreSource) -> dict[str, Any]:
    return {
        "dump": str(prepared.file),
        "would_drop": prepared.to_drop,
        "kept": [d for d in prepared.databases if d not in prepared.to_drop],
        "verified_against_manifest": prepared.manifest is not None,
    }

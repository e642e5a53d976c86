"""``snapcoord verify`` for one VM (a fleet job), and ``[vms.X.dump] verify = true`` after a
snapshot run's dump: both end in a :class:`~snapcoord.verify.record.VerifyRecord`, told the
same way (a line, the ``verify`` object of ``--json``, ``last-verify.json``, the metrics)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcoord import store
from snapcoord.errors import SnapcoordError, UsageError, VerifyFailed, VerifyUnavailable
from snapcoord.outcome import Outcome
from snapcoord.run import Engine, Reporter, Step
from snapcoord.settings import Config
from snapcoord.verify import record, scratch
from snapcoord.verify.dumps import DumpVerify, find_run, judge
from snapcoord.verify.record import VerifyRecord

if TYPE_CHECKING:
    from snapcoord.plans.context import RunContext
    from snapcoord.verify.boot import BootResult


def describe(found: VerifyRecord) -> str:
    """The human line of a verify, after ``<vm>: ``."""
    status = {True: "ok", False: "FAILED (exit 5)", None: "NOT RUN (exit 4)"}[found.verified]
    head = f"verify {status}: {found.what} of {found.snapshot}"
    if found.what == "dump" and found.verified is not False and found.tables:
        compared = {
            "checksums": "rows and checksums match the record",
            "rows": "row counts match the record (no checksums recorded)",
            "none": "loaded and checked (nothing recorded to compare)",
        }[found.compared]
        head += f": {found.tables} tables, {found.rows} rows, {compared}"
    if found.what == "boot" and found.verified is True:
        services = found.extra.get("services") or {}
        head += (
            f": {len(services)} services active, database check {found.extra.get('database_check')}"
        )
    if found.problem:
        head += f": {found.problem}"
    split = (
        ", ".join(f"{k} {v:.1f} s" for k, v in found.split.items()) if found.what == "boot" else ""
    )
    return f"{head} ({found.seconds:.1f} s{'; ' + split if split else ''})"


def error_for(found: VerifyRecord) -> SnapcoordError | None:
    if found.verified is True:
        return None
    cls = VerifyFailed if found.verified is False else VerifyUnavailable
    return cls(f"verify of {found.snapshot} failed: {found.problem}", vm=found.vm)


def verify_vm(
    config: Config,
    key: str,
    *,
    snapshot: str | None,
    boot: bool,
    reporter: Reporter,
) -> Outcome:
    """``snapcoord verify``: the VM's newest dump (or ``snapshot``'s), or with ``boot`` its
    newest snapcoord snapshot (or ``snapshot``) booted in an isolated copy."""
    notes: list[str] = []
    code: int | None = None
    guest = config.vm(key).guest
    if not boot and (guest is None or not guest.dump) and not store.list_dumps(config.store, key):
        line = f"{key}: verify: nothing to verify (no dump configured or stored)"
        summary = {"vm": key, "ok": True, "exit_code": 0, "command": "verify", "verify": None}
        return Outcome(key, 0, summary, [line])
    try:
        if boot:
            found, notes, code = verify_boot(config, key, snapshot, reporter)
        else:
            job = DumpVerify(config, key, find_run(config, key, snapshot))
            found, result = job.run(reporter)
            notes, code = job.notes, result.exit_code  # 130 when interrupted, 1 for a bug
    except SnapcoordError as exc:
        return Outcome.failed(key, "verify", exc)
    return outcome_of(found, notes, code=code)


def outcome_of(found: VerifyRecord, notes: list[str], *, code: int | None = None) -> Outcome:
    """The outcome of a verify; ``code`` (the run's) overrides the record's own exit code."""
    code = found.exit_code if code is None else code
    summary: dict[str, Any] = {
        "vm": found.vm,
        "ok": code == 0,
        "exit_code": code,
        "command": "verify",
        "verify": found.as_dict(),
        "notes": notes,
    }
    lines = [f"{found.vm}: note: {note}" for note in notes]
    lines.append(f"{found.vm}: {describe(found)}")
    errors = []
    error = error_for(found)
    if error is not None:
        errors.append(error.line(found.vm))
        summary["errors"] = errors
    return Outcome(found.vm, code, summary, lines, errors)


def after_snapshot(ctx: RunContext) -> VerifyRecord | None:
    """``[vms.X.dump] verify = true``: verify the dump this run stored, once the services run
    again (never inside the service window). None when the run stored no dump."""
    folder = ctx.outputs.get("store_folder")
    if not ctx.vm_cfg.dump.verify or not folder or "dump" not in ctx.outputs:
        return None
    job = DumpVerify(ctx.config, ctx.key, Path(folder))
    found, _ = job.run()
    ctx.notes.extend(job.notes)
    ctx.outputs["verify"] = found.as_dict()
    ctx.notes.append(describe(found))
    return found


# -- boot --------------------------------------------------------------------------------------


def verify_boot(
    config: Config, key: str, snapshot: str | None, reporter: Reporter | None = None
) -> tuple[VerifyRecord, list[str], int]:
    """Boot ``snapshot`` (default: the VM's newest snapcoord snapshot) in an isolated copy on
    libvirt and check its services and database (snapcoord/verify/boot.py). Returns the record,
    the notes and the exit code. Runs as a step of the step engine, so SIGINT/SIGTERM/SIGHUP
    interrupt it with its teardown (the domain destroyed, the copy removed)."""
    from snapcoord.adapters import open_adapter
    from snapcoord.naming import parse_name

    vm_cfg = config.vm(key)
    settings = config.hypervisors[vm_cfg.hypervisor]
    if settings.type == "libvirt":
        from snapcoord.verify import boot  # imports libvirt: only for a libvirt VM
    else:
        raise UsageError(
            f"verify --boot runs on libvirt only; {key} is on {settings.type}",
            hint="docs/verify.md says how the same is done by hand on Proxmox VE and vSphere",
        )
    guest = vm_cfg.guest
    services = list(guest.services) if guest is not None else []
    database = guest.database if guest is not None else "none"
    adapter = open_adapter(vm_cfg.hypervisor, settings)
    booted: list[BootResult] = []
    with adapter:
        vm = adapter.find_vm(vm_cfg.ref)
        names = [s.name for s in adapter.list_snapshots(vm)]
        if snapshot is None:
            ours = [n for n in names if parse_name(n) is not None]
            if not ours:
                raise UsageError(f"{key} has no snapcoord snapshot to boot", vm=key)
            snapshot = ours[-1]
        elif snapshot not in names:
            raise UsageError(
                f"no snapshot {snapshot!r} of {key} (snapshots: {', '.join(names) or 'none'})",
                vm=key,
            )
        chosen = snapshot

        def boot_it() -> None:
            with scratch.workspace(Path(config.defaults.verify_dir), vm=key) as workspace:
                work = workspace / "boot"
                work.mkdir(mode=0o700)  # root's: boot.py lets QEMU's group in while it copies
                booted.append(
                    boot.boot_verify(
                        adapter.conn,  # type: ignore[attr-defined]
                        vm.name,
                        chosen,
                        services=services,
                        database=database,
                        timeout=vm_cfg.dump.verify_timeout,
                        work=work,
                    )
                )

        started = time.monotonic()
        step = Step("boot the snapshot in an isolated copy", boot_it, describe=chosen)
        run = Engine(reporter).execute([step])
    verified, problem = judge(run)
    notes: list[str] = []
    extra: dict[str, Any] = {}
    split: dict[str, float] = {}
    if booted:
        result = booted[0]
        verified, problem = result.ok, result.problem
        notes = list(result.notes)
        split = dict(result.seconds)
        extra = {"services": dict(result.services), "database_check": result.database_check}
    found = VerifyRecord(
        vm=key,
        what="boot",
        snapshot=chosen,
        verified=verified,
        finished=time.time(),
        seconds=time.monotonic() - started,
        problem=problem,
        split=split,
        extra=extra,
    )
    try:
        record.save(config.store, found, None)
    except (OSError, SnapcoordError) as exc:
        notes.append(f"the verify result could not be saved: {exc}")
    return found, notes, run.exit_code if not booted else found.exit_code

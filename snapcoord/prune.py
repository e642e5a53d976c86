"""``snapcoord prune``, and the prune that follows a snapshot run: delete the VM's own snapshots
that its retention policy does not keep, with their run folders in the store, and the run folders
whose snapshot is gone by the same policy (docs/retention.md).

Nothing here runs inside a service window: ``snapshot`` calls :func:`after_snapshot` once its
services are back.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcoord import inventory
from snapcoord import store as runs
from snapcoord.adapters import open_adapter
from snapcoord.adapters.base import VM, Adapter, Snapshot
from snapcoord.config import Config
from snapcoord.errors import ExitCode, SnapcoordError, SnapshotNotFound
from snapcoord.lock import VMLock
from snapcoord.naming import new_run_id, parse_name
from snapcoord.outcome import Outcome
from snapcoord.retention import Item, decide_groups, own_snapshots
from snapcoord.settings import RetentionPolicy, VMConfig

if TYPE_CHECKING:
    from snapcoord.plans import RunContext

log = logging.getLogger(__name__)


def _message(exc: SnapcoordError) -> str:
    """The error without the VM prefix (the caller's line names the VM)."""
    return f"{exc.message} ({exc.hint})" if exc.hint else exc.message


def _line(key: str, exc: SnapcoordError) -> str:
    """One error line that starts with the VM's config key (the hypervisor's name may differ)."""
    return str(exc) if exc.vm == key else f"{key}: {exc}"


def _delete(adapter: Adapter, vm: VM, snapshot: Snapshot, vm_cfg: VMConfig) -> str | None:
    """Delete one snapshot; the error text when it failed (a snapshot already gone is fine)."""
    try:
        adapter.delete_snapshot(vm, snapshot, timeout=vm_cfg.snapshot_timeout)
    except SnapshotNotFound:
        log.info("%s: %s was already gone", vm_cfg.key, snapshot.name)
    except SnapcoordError as exc:
        return _message(exc)
    return None


def _run_folders(store: Path, key: str) -> set[str]:
    """Snapshot names that have a run folder (complete or failed) in the store."""
    return {info.snapshot for info in runs.list_dumps(store, key, include_failed=True)}


def _orphans_to_delete(
    folders: set[str],
    remaining: list[Snapshot],
    policy: RetentionPolicy,
    tz: tzinfo | None,
) -> list[str]:
    """Run folders whose snapshot is gone, that the policy would not keep: decided together with
    the snapshots that stay, by the time in their name. Folders not named like a snapcoord
    snapshot are left alone."""
    existing = {s.name for s in remaining}
    groups = own_snapshots(remaining)
    orphans: set[str] = set()
    for name in folders - existing:
        parsed = parse_name(name)
        if parsed is None:
            continue
        label, when = parsed
        groups.setdefault(label, []).append(Item(name, when))
        orphans.add(name)
    if not orphans:
        return []
    return [
        d.name for d in decide_groups(groups, policy, tz=tz) if not d.keep and d.name in orphans
    ]


def prune_snapshots(
    adapter: Adapter,
    vm: VM,
    vm_cfg: VMConfig,
    store: Path,
    *,
    dry_run: bool,
    now: datetime | None = None,
    tz: tzinfo | None = None,
) -> dict[str, Any]:
    """Prune one VM by its (configured) policy; no locking, the adapter is open and the VM found.

    Deletes oldest first; a failed delete is reported and the others go on. Returns the dict
    ``--json`` shows: ``kept`` (name, reasons), ``deleted`` (would be deleted, in a dry run),
    ``failed`` (name, what, error), ``folders_deleted``, ``dry_run``, ``policy``, ``inventory``.
    ``tz``: the zone calendar buckets are counted in (None: the local zone)."""
    policy = vm_cfg.retention
    if policy is None:
        raise ValueError(f"{vm_cfg.key}: prune_snapshots needs a retention policy")
    key = vm_cfg.key
    snapshots = adapter.list_snapshots(vm)
    by_name = {s.name: s for s in snapshots}
    decisions = decide_groups(own_snapshots(snapshots), policy, tz=tz)
    folders = _run_folders(store, key)
    result: dict[str, Any] = {
        "kept": [{"name": d.name, "reasons": list(d.reasons)} for d in decisions if d.keep],
        "deleted": [],
        "failed": [],
        "folders_deleted": [],
        "dry_run": dry_run,
        "policy": asdict(policy),
    }
    gone: set[str] = set()
    for decision in (d for d in decisions if not d.keep):
        name = decision.name
        error = None if dry_run else _delete(adapter, vm, by_name[name], vm_cfg)
        if error is not None:
            result["failed"].append({"name": name, "what": "snapshot", "error": error})
            continue
        result["deleted"].append(name)
        gone.add(name)
        _drop_folder(result, store, key, name, present=name in folders, dry_run=dry_run)
    remaining = [s for s in snapshots if s.name not in gone]
    for name in _orphans_to_delete(folders - gone, remaining, policy, tz):
        _drop_folder(result, store, key, name, present=True, dry_run=dry_run)
    listed = snapshots if dry_run or not (gone or result["failed"]) else _relist(adapter, vm)
    after = listed if listed is not None else remaining
    result["inventory"] = inventory.record(store, key, after, now=now).as_dict()
    return result


def _relist(adapter: Adapter, vm: VM) -> list[Snapshot] | None:
    """The snapshots after deleting (None when the hypervisor does not answer now)."""
    try:
        return adapter.list_snapshots(vm)
    except SnapcoordError as exc:
        log.warning("%s: listing the snapshots after pruning failed: %s", vm.name, exc)
        return None


def _drop_folder(
    result: dict[str, Any], store: Path, key: str, name: str, *, present: bool, dry_run: bool
) -> None:
    """Remove the run folders of ``name`` (complete, failed, partial) and note it in ``result``."""
    if dry_run:
        if present:
            result["folders_deleted"].append(name)
        return
    try:
        removed = runs.remove_run(store, key, name)
    except (OSError, SnapcoordError) as exc:
        text = _message(exc) if isinstance(exc, SnapcoordError) else str(exc)
        error = f"cannot remove its run folder: {text}"
        result["failed"].append({"name": name, "what": "run folder", "error": error})
        return
    if removed:
        result["folders_deleted"].append(name)


# -- the prune command, one VM ---------------------------------------------------------------


def _summary(key: str, exit_code: int, **fields: Any) -> dict[str, Any]:
    return {"vm": key, "command": "prune", "ok": exit_code == 0, "exit_code": exit_code, **fields}


def _stamp_order(name: str) -> tuple[str, str]:
    parsed = parse_name(name)
    return (parsed[1].isoformat() if parsed else "", name)


def _lines(key: str, result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Human lines (stdout) in time order, and error lines (stderr)."""
    dry = result["dry_run"]
    delete = "would delete" if dry else "delete"
    kept = {item["name"]: item["reasons"] for item in result["kept"]}
    failed = [f for f in result["failed"] if f["what"] == "snapshot"]
    snapshots = [*kept, *result["deleted"], *(f["name"] for f in failed)]
    lines = []
    for name in sorted(snapshots, key=_stamp_order):
        if name in kept:
            lines.append(f"{key}: keep {name} ({', '.join(kept[name])})")
        elif name in result["deleted"]:
            lines.append(f"{key}: {delete} {name}")
    for name in result["folders_deleted"]:
        why = "with its snapshot" if name in result["deleted"] else "its snapshot is gone"
        lines.append(f"{key}: {delete} run folder {name} ({why})")
    errors = [f"{key}: could not delete {f['what']} {f['name']}: {f['error']}" for f in failed]
    errors += [
        f"{key}: {f['name']}: {f['error']}" for f in result["failed"] if f["what"] != "snapshot"
    ]
    counts = f"kept {len(kept)}, {delete}{'' if dry else 'd'} {len(result['deleted'])}"
    if result["failed"]:
        lines.append(f"{key}: prune failed, {counts}, failed {len(result['failed'])}")
    else:
        lines.append(f"{key}: prune {'dry run' if dry else 'ok'}, {counts}")
    return lines, errors


def _exit_code(result: dict[str, Any]) -> int:
    whats = {f["what"] for f in result["failed"]}
    if "snapshot" in whats:
        return int(ExitCode.HYPERVISOR)
    return int(ExitCode.PREFLIGHT) if whats else int(ExitCode.OK)


def prune_vm(config: Config, key: str, *, dry_run: bool) -> Outcome:
    """``snapcoord prune`` for one VM: lock it (unless dry run), prune by its policy, and say
    what was kept and why, what was deleted. Never raises a :class:`SnapcoordError`: it becomes
    the outcome's exit code and one error line."""
    try:
        vm_cfg = config.vm(key)
        if vm_cfg.retention is None:
            line = (
                f"{key}: no retention policy (set keep_* in [defaults] or [vms.{key}]): "
                "nothing pruned"
            )
            empty: dict[str, list[Any]] = {
                "kept": [],
                "deleted": [],
                "failed": [],
                "folders_deleted": [],
            }
            return Outcome(key, 0, _summary(key, 0, **empty, dry_run=dry_run, policy=None), [line])
        with contextlib.ExitStack() as stack:
            if not dry_run:
                stack.enter_context(VMLock(config.store, key, new_run_id()))
            settings = config.hypervisors[vm_cfg.hypervisor]
            adapter = stack.enter_context(open_adapter(vm_cfg.hypervisor, settings))
            vm = adapter.find_vm(vm_cfg.ref)
            result = prune_snapshots(adapter, vm, vm_cfg, config.store, dry_run=dry_run)
    except SnapcoordError as exc:
        text = _line(key, exc)
        code = int(exc.exit_code)
        return Outcome(key, code, _summary(key, code, error=text, dry_run=dry_run), [], [text])
    lines, errors = _lines(key, result)
    code = _exit_code(result)
    return Outcome(key, code, _summary(key, code, **result), lines, errors)


# -- after a snapshot run ---------------------------------------------------------------------


def after_snapshot(ctx: RunContext) -> dict[str, Any]:
    """Prune the VM of a snapshot run that has ended (services back; the caller still holds the
    VM lock), when it has a policy, and record its snapshot inventory either way.

    ``ctx`` is the run's :class:`snapcoord.plans.RunContext`. Its hypervisor session is used when
    the run left it open (``ctx.keep_connection``, the VM found); otherwise a fresh one is opened
    and closed here. Never raises: any problem comes back as ``{"error": "<vm>: ..."}`` (a
    warning for the caller, never a failed snapshot); deletes that failed are in ``failed`` and
    summed up in ``error`` too."""
    vm_cfg, config = ctx.vm_cfg, ctx.config
    key = vm_cfg.key
    try:
        if ctx.keep_connection and ctx.vm is not None:
            result = _after(ctx.adapter, ctx.vm, vm_cfg, config.store)
        else:
            settings = config.hypervisors[vm_cfg.hypervisor]
            with open_adapter(vm_cfg.hypervisor, settings) as adapter:
                result = _after(adapter, adapter.find_vm(vm_cfg.ref), vm_cfg, config.store)
    except SnapcoordError as exc:
        return {"error": _line(key, exc)}
    except Exception as exc:  # a prune problem never fails the snapshot run
        log.debug("%s: prune after snapshot failed", key, exc_info=True)
        return {"error": f"{key}: prune failed: {type(exc).__name__}: {exc}"}
    if result.get("failed"):
        problems = "; ".join(f"{f['name']}: {f['error']}" for f in result["failed"])
        result["error"] = f"{key}: prune: {len(result['failed'])} not deleted: {problems}"
    return result


def _after(adapter: Adapter, vm: VM, vm_cfg: VMConfig, store: Path) -> dict[str, Any]:
    if vm_cfg.retention is None:
        listed = adapter.list_snapshots(vm)
        return {"policy": None, "inventory": inventory.record(store, vm_cfg.key, listed).as_dict()}
    return prune_snapshots(adapter, vm, vm_cfg, store, dry_run=False)

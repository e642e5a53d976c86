"""Prune against the Proxmox VE API double over HTTPS: exactly what the policy keeps remains,
foreign snapshots and the current one are never touched, run folders go with their snapshot,
orphan run folders follow the policy by their own time, a failed delete stops nothing, dry runs
change nothing, a second run deletes nothing; the job (prune_vm), after_snapshot and the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from snapcoord import inventory, store
from snapcoord.adapters import open_adapter
from snapcoord.adapters.base import MARKER
from snapcoord.adapters.proxmox import ProxmoxAdapter
from snapcoord.config import load_config
from snapcoord.errors import ExitCode
from snapcoord.lock import VMLock
from snapcoord.naming import parse_name, snapshot_name
from snapcoord.plans import RunContext
from snapcoord.prune import after_snapshot, prune_snapshots, prune_vm
from snapcoord.settings import Config
from tests.cli_helpers import json_lines, snapcoord, write_config
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    TOKEN_ENV,
    TOKEN_SECRET,
    Cert,
    hypervisor_table,
    make_cert,
    start_double,
)

VMID = 100  # "db1" on pve1, the VM key is "db"
POLICY = {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 3}
DESCRIPTION = f"{MARKER} label=nightly run=seeded"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def name(text: str, label: str = "nightly") -> str:
    return snapshot_name(label, at(text))


# Nightly at 01:00 UTC from 2026-10-25 to 2026-12-03 (40), ten "manual" ones on 2026-10-28.
NIGHTLY = [name((at("2026-10-25T01:00") + timedelta(days=d)).isoformat()[:16]) for d in range(40)]
MANUAL = [name(f"2026-10-28T{h:02d}:00", "manual") for h in range(10, 20)]
CURRENT = name("2026-11-01T01:00")  # the VM was reverted to it
FOREIGN = {
    "before-upgrade": "made by hand",  # no marker, foreign name
    "marked-by-hand": f"{MARKER} copied description",  # marker, foreign name
    name("2026-09-01T01:00"): "a look-alike without the marker",  # the pattern, no marker
}
KEPT_NIGHTLY = {
    name("2026-12-03T01:00"): ["newest", "daily 2026-12-03", "weekly 2026-W49", "monthly 2026-12"],
    name("2026-12-02T01:00"): ["daily 2026-12-02"],
    name("2026-12-01T01:00"): ["daily 2026-12-01"],
    name("2026-11-30T01:00"): ["daily 2026-11-30", "monthly 2026-11"],
    name("2026-11-29T01:00"): ["daily 2026-11-29", "weekly 2026-W48"],
    name("2026-11-28T01:00"): ["daily 2026-11-28"],
    name("2026-11-27T01:00"): ["daily 2026-11-27"],
    name("2026-11-22T01:00"): ["weekly 2026-W47"],
    name("2026-11-15T01:00"): ["weekly 2026-W46"],
    name("2026-10-31T01:00"): ["monthly 2026-10"],
    CURRENT: ["current"],
}
KEPT_MANUAL = {
    MANUAL[-1]: ["newest", "daily 2026-10-28", "weekly 2026-W44", "monthly 2026-10"],
}
KEPT = {**KEPT_NIGHTLY, **KEPT_MANUAL}
DELETED = [n for n in sorted([*NIGHTLY, *MANUAL], key=lambda n: n[-16:]) if n not in KEPT]
# Run folders: one of a deleted snapshot, one of a kept one, orphans (snapshot gone) by time.
FOLDER_DELETED = name("2026-11-10T01:00")
FOLDER_KEPT = name("2026-12-03T01:00")
ORPHAN_KEPT = name("2026-12-02T13:00")  # the newest of its day: daily 2026-12-02
ORPHANS_DELETED = [name("2026-09-15T01:00"), name("2026-10-20T01:00")]
ORPHAN_FAILED = name("2026-10-21T01:00")  # a run whose dump failed, snapshot gone
HAND_MADE = "hand-made"  # not a snapcoord name: left alone


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("pve-prune-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert, task_seconds=0.02)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Calendar buckets count in the local zone: make it UTC for the expected names."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def seed(double: PveApiDouble) -> None:
    """The snapshots in time order (each the parent of the next), then a rollback to CURRENT."""
    seeded = {n: DESCRIPTION for n in [*NIGHTLY, *MANUAL]} | FOREIGN

    def taken(snap: str) -> datetime:
        parsed = parse_name(snap)
        return parsed[1] if parsed else at("2026-09-01T01:00")

    for snap in sorted(seeded, key=taken):
        double.cluster.add_snapshot(VMID, snap, int(taken(snap).timestamp()), seeded[snap])
    double.cluster.guests[VMID].parent = CURRENT


def seed_store(store_dir: Path) -> None:
    for snap in (FOLDER_DELETED, FOLDER_KEPT, ORPHAN_KEPT, *ORPHANS_DELETED, HAND_MADE):
        with store.opened_run(store_dir, "db", snap) as run:
            sink = run.sink("mysql.sql.gz")
            sink.write(b"dump")
            sink.finish()
    failed = store.RunDir.begin(store_dir, "db", ORPHAN_FAILED)
    failed.fail("dump failed")


def folders(store_dir: Path) -> set[str]:
    return {p.name for p in store.vm_dir(store_dir, "db").iterdir() if not p.name.startswith(".")}


def remaining(double: PveApiDouble) -> set[str]:
    return set(double.cluster.guests[VMID].snapshots)


def config_file(
    tmp_path: Path, double: PveApiDouble, cert: Cert, defaults: dict[str, Any] | None = None
) -> Path:
    return write_config(
        tmp_path / "snapcoord.toml",
        {
            "defaults": {
                "store": str(tmp_path / "store"),
                **(POLICY if defaults is None else defaults),
            },
            "hypervisors.pve": hypervisor_table(double, cert, lock_wait_seconds=0.2),
            "vms.db": {"hypervisor": "pve", "name": "db1"},
            "vms.web": {"hypervisor": "pve", "name": "web1", **dict.fromkeys(POLICY, 0)},
        },
    )


@pytest.fixture
def setup(
    double: PveApiDouble, cert: Cert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Config]:
    """``setup(defaults=None)``: the double and the store seeded, the loaded config."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN_SECRET)

    def make(defaults: dict[str, Any] | None = None) -> Config:
        seed(double)
        seed_store(tmp_path / "store")
        return load_config(str(config_file(tmp_path, double, cert, defaults)))

    return make


ALL_FOLDERS = {
    FOLDER_DELETED,
    FOLDER_KEPT,
    ORPHAN_KEPT,
    *ORPHANS_DELETED,
    f"{ORPHAN_FAILED}.failed",
    HAND_MADE,
}
AFTER_FOLDERS = {FOLDER_KEPT, ORPHAN_KEPT, HAND_MADE}


def test_prune_keeps_exactly_what_the_policy_says(
    setup: Callable[..., Config], double: PveApiDouble
) -> None:
    config = setup()
    store_dir = config.store
    assert folders(store_dir) == ALL_FOLDERS
    outcome = prune_vm(config, "db", dry_run=False)
    assert outcome.exit_code == 0 and outcome.errors == [], outcome.errors
    assert remaining(double) == set(KEPT) | set(FOREIGN)
    assert double.cluster.guests[VMID].parent == CURRENT
    summary = outcome.summary
    assert summary["vm"] == "db" and summary["command"] == "prune" and summary["ok"] is True
    assert {k["name"]: k["reasons"] for k in summary["kept"]} == KEPT
    assert summary["deleted"] == DELETED  # oldest first
    assert summary["failed"] == [] and summary["dry_run"] is False
    assert summary["policy"] == {"keep_last": 0, "keep_hourly": 0, **POLICY}
    assert sorted(summary["folders_deleted"]) == sorted(
        [FOLDER_DELETED, *ORPHANS_DELETED, ORPHAN_FAILED]
    )
    assert folders(store_dir) == AFTER_FOLDERS
    assert summary["inventory"]["count"] == len(KEPT) + 1  # + the marked foreign-named one
    seen = inventory.read(store_dir, "db")
    assert seen is not None and seen.as_dict() == summary["inventory"]
    # human lines: every own snapshot in time order, then folders, then the total
    lines = outcome.lines
    assert lines[0] == f"db: delete {NIGHTLY[0]}"
    assert f"db: keep {CURRENT} (current)" in lines
    first_kept = name("2026-12-03T01:00")
    assert (
        f"db: keep {first_kept} (newest, daily 2026-12-03, weekly 2026-W49, monthly 2026-12)"
        in lines
    )
    assert f"db: delete {DELETED[0]}" in lines
    assert f"db: delete run folder {FOLDER_DELETED} (with its snapshot)" in lines
    assert f"db: delete run folder {ORPHANS_DELETED[0]} (its snapshot is gone)" in lines
    assert lines[-1] == f"db: prune ok, kept {len(KEPT)}, deleted {len(DELETED)}"
    assert not any(n in line for line in lines for n in FOREIGN)

    again = prune_vm(config, "db", dry_run=False)
    assert again.exit_code == 0
    assert again.summary["deleted"] == [] and again.summary["folders_deleted"] == []
    assert {k["name"]: k["reasons"] for k in again.summary["kept"]} == KEPT
    assert remaining(double) == set(KEPT) | set(FOREIGN)
    assert folders(store_dir) == AFTER_FOLDERS


def test_dry_run_deletes_nothing_and_says_what_it_would(
    setup: Callable[..., Config], double: PveApiDouble
) -> None:
    config = setup()
    before = remaining(double)
    outcome = prune_vm(config, "db", dry_run=True)
    assert outcome.exit_code == 0
    assert remaining(double) == before
    assert folders(config.store) == ALL_FOLDERS
    assert outcome.summary["dry_run"] is True
    assert outcome.summary["deleted"] == DELETED
    assert sorted(outcome.summary["folders_deleted"]) == sorted(
        [FOLDER_DELETED, *ORPHANS_DELETED, ORPHAN_FAILED]
    )
    assert f"db: would delete {DELETED[0]}" in outcome.lines
    assert outcome.lines[-1] == f"db: prune dry run, kept {len(KEPT)}, would delete {len(DELETED)}"
    assert not [line for line in outcome.lines if ": delete " in line]
    # the dry run needs no lock: it works while another run holds the VM
    with VMLock(config.store, "db", "other-run"):
        assert prune_vm(config, "db", dry_run=True).exit_code == 0


def test_a_failed_delete_is_reported_and_the_others_go_on(
    setup: Callable[..., Config], double: PveApiDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The double refuses one delete (the guest is locked by a backup while it is asked)."""
    config = setup()
    original = ProxmoxAdapter.delete_snapshot

    def delete(self: ProxmoxAdapter, vm: Any, snapshot: Any, *, timeout: float) -> None:
        if snapshot.name != FOLDER_DELETED:
            original(self, vm, snapshot, timeout=timeout)
            return
        double.cluster.lock_guest(VMID, "backup")
        try:
            original(self, vm, snapshot, timeout=timeout)
        finally:
            double.cluster.unlock_guest(VMID)

    monkeypatch.setattr(ProxmoxAdapter, "delete_snapshot", delete)
    outcome = prune_vm(config, "db", dry_run=False)
    assert outcome.exit_code == ExitCode.HYPERVISOR
    assert outcome.summary["ok"] is False
    (failed,) = outcome.summary["failed"]
    assert failed["name"] == FOLDER_DELETED and failed["what"] == "snapshot"
    assert "locked (backup)" in failed["error"]
    (error,) = outcome.errors
    assert error.startswith(f"db: could not delete snapshot {FOLDER_DELETED}: ")
    assert "\n" not in error
    assert remaining(double) == set(KEPT) | set(FOREIGN) | {FOLDER_DELETED}
    assert outcome.summary["deleted"] == [n for n in DELETED if n != FOLDER_DELETED]
    assert FOLDER_DELETED in folders(config.store)  # its run folder stays with it
    assert outcome.lines[-1] == (
        f"db: prune failed, kept {len(KEPT)}, deleted {len(DELETED) - 1}, failed 1"
    )
    # next time it goes
    monkeypatch.setattr(ProxmoxAdapter, "delete_snapshot", original)
    again = prune_vm(config, "db", dry_run=False)
    assert again.exit_code == 0 and again.summary["deleted"] == [FOLDER_DELETED]
    assert folders(config.store) == AFTER_FOLDERS


def test_no_policy_prunes_nothing(setup: Callable[..., Config], double: PveApiDouble) -> None:
    config = setup(defaults={})
    before = remaining(double)
    outcome = prune_vm(config, "db", dry_run=False)
    assert outcome.exit_code == 0
    assert outcome.lines == [
        "db: no retention policy (set keep_* in [defaults] or [vms.db]): nothing pruned"
    ]
    assert outcome.summary["policy"] is None and outcome.summary["deleted"] == []
    assert remaining(double) == before and folders(config.store) == ALL_FOLDERS
    # keep_* = 0 everywhere is no policy either
    assert prune_vm(config, "web", dry_run=False).lines[0].startswith("web: no retention policy")


def test_locked_vm_and_hypervisor_errors_are_one_line(
    setup: Callable[..., Config], double: PveApiDouble
) -> None:
    config = setup()
    with VMLock(config.store, "db", "other-run"):
        outcome = prune_vm(config, "db", dry_run=False)
    assert outcome.exit_code == ExitCode.LOCKED
    (error,) = outcome.errors
    assert error.startswith("db: locked by run other-run") and outcome.lines == []
    assert remaining(double) == set(NIGHTLY) | set(MANUAL) | set(FOREIGN)
    double.cluster.guests.pop(VMID)
    gone = prune_vm(config, "db", dry_run=False)
    assert gone.exit_code == ExitCode.HYPERVISOR
    assert len(gone.errors) == 1 and gone.errors[0].startswith("db: db1: ")
    assert gone.summary["ok"] is False and gone.summary["error"] == gone.errors[0]


def test_prune_snapshots_counts_buckets_in_the_given_zone(setup: Callable[..., Config]) -> None:
    """Pacific/Kiritimati is UTC+14: the manual snapshots of 10:00-19:00 UTC on 10-28 fall on
    10-29 there; the rest stays in the same local day, so the same snapshots go."""
    config = setup()
    zone = ZoneInfo("Pacific/Kiritimati")
    with open_adapter("pve", config.hypervisors["pve"]) as adapter:
        vm = adapter.find_vm("db1")
        result = prune_snapshots(adapter, vm, config.vm("db"), config.store, dry_run=True, tz=zone)
    assert result["deleted"] == DELETED
    reasons = {k["name"]: k["reasons"] for k in result["kept"]}
    assert reasons[MANUAL[-1]] == [
        "newest",
        "daily 2026-10-29",
        "weekly 2026-W44",
        "monthly 2026-10",
    ]


def test_after_snapshot_prunes_and_records_the_inventory(
    setup: Callable[..., Config], double: PveApiDouble
) -> None:
    config = setup()
    with VMLock(config.store, "db", "the-run"):  # the caller holds it: no deadlock
        result = after_snapshot(RunContext.create(config, "db", "the-run"))
    assert "error" not in result
    assert result["deleted"] == DELETED
    assert remaining(double) == set(KEPT) | set(FOREIGN)
    seen = inventory.read(config.store, "db")
    assert seen is not None and seen.as_dict() == result["inventory"]
    assert result["inventory"]["count"] == len(KEPT) + 1


def test_after_snapshot_uses_the_session_the_run_left_open(
    setup: Callable[..., Config], double: PveApiDouble
) -> None:
    config = setup()
    ctx = RunContext.create(config, "db", "the-run")
    with ctx.adapter:
        ctx.vm = ctx.adapter.find_vm("db1")
        ctx.keep_connection = True
        # the double logs a request just after answering it: wait for find_vm's entry
        deadline = time.monotonic() + 5
        while not any(e.path.endswith("/resources") for e in double.log):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        logins = len(double.log)
        result = after_snapshot(ctx)
        paths = [entry.path for entry in double.log[logins:]]
    assert result["deleted"] == DELETED
    assert not [p for p in paths if "/access/" in p or p.endswith("/resources")], paths


def test_after_snapshot_without_policy_only_records(
    setup: Callable[..., Config], double: PveApiDouble
) -> None:
    config = setup(defaults={})
    result = after_snapshot(RunContext.create(config, "db", "the-run"))
    assert result["policy"] is None
    assert result["inventory"]["count"] == len(NIGHTLY) + len(MANUAL) + 1
    assert remaining(double) == set(NIGHTLY) | set(MANUAL) | set(FOREIGN)


def test_after_snapshot_never_raises(
    setup: Callable[..., Config], double: PveApiDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = setup()
    ctx = RunContext.create(config, "db", "the-run")

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr("snapcoord.prune.prune_snapshots", broken)
        assert after_snapshot(ctx) == {"error": "db: prune failed: RuntimeError: boom"}
    double.cluster.guests.pop(VMID)  # the VM is gone
    result = after_snapshot(ctx)
    assert set(result) == {"error"} and result["error"].startswith("db: ")
    assert "\n" not in result["error"]


# -- through the CLI -------------------------------------------------------------------------------


def test_cli_prune_dry_run_then_prune_json(
    setup: Callable[..., Config], double: PveApiDouble, tmp_path: Path
) -> None:
    config = setup()
    env = {TOKEN_ENV: TOKEN_SECRET, "TZ": "UTC"}
    args = ("-c", config.source, "prune")
    dry = snapcoord(*args, "db", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"db: would delete {DELETED[0]}" in dry.stdout.splitlines()
    assert f"db: keep {CURRENT} (current)" in dry.stdout.splitlines()
    assert remaining(double) == set(NIGHTLY) | set(MANUAL) | set(FOREIGN)

    proc = snapcoord(*args, "--all", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    objects = json_lines(proc.stdout)
    by_vm = {o["vm"]: o for o in objects if "vm" in o}
    assert by_vm["db"]["ok"] is True and by_vm["db"]["command"] == "prune"
    assert by_vm["db"]["deleted"] == DELETED
    assert {k["name"]: k["reasons"] for k in by_vm["db"]["kept"]} == KEPT
    assert by_vm["web"]["policy"] is None and by_vm["web"]["deleted"] == []
    assert any("summary" in o for o in objects)
    assert remaining(double) == set(KEPT) | set(FOREIGN)
    assert folders(config.store) == AFTER_FOLDERS

    again = snapcoord(*args, "db", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == f"db: prune ok, kept {len(KEPT)}, deleted 0"


def test_cli_snapshot_prunes_after_the_run(
    setup: Callable[..., Config], double: PveApiDouble
) -> None:
    """``snapshot`` prunes once the run ended; the new snapshot (its own label) is kept, and the
    VM now runs from it, so the one it ran from before is no longer kept as current."""
    config = setup()
    env = {TOKEN_ENV: TOKEN_SECRET, "TZ": "UTC"}
    proc = snapcoord("-c", config.source, "snapshot", "db", "--label", "cli", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    (result,) = [o for o in json_lines(proc.stdout) if o.get("vm") == "db"]
    new = result["snapshot"]
    pruned = result["prune"]
    assert "error" not in pruned
    assert pruned["deleted"] == sorted([*DELETED, CURRENT], key=lambda n: n[-16:])
    kept = {k["name"]: k["reasons"] for k in pruned["kept"]}
    assert kept[new][0] == "newest" and kept.keys() - {new} == KEPT.keys() - {CURRENT}
    assert remaining(double) == set(KEPT) - {CURRENT} | set(FOREIGN) | {new}
    assert folders(config.store) == AFTER_FOLDERS
    seen = inventory.read(config.store, "db")
    assert seen is not None and seen.as_dict() == pruned["inventory"]

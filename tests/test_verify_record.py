"""The verify's record and its reporting, without a database: the comparison's first difference,
the one boundary where verify.json / last-verify.json become a record (hostile files give None),
the human line, the exit codes, the metrics (checked by promtool) and status."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from snapcoord import metrics
from snapcoord.config import Config, load_config
from snapcoord.errors import ExitCode
from snapcoord.hooks.databases.dumpfile import RestoreSource, TableSum
from snapcoord.status import status_vm
from snapcoord.verify import record
from snapcoord.verify.dumps import differences
from snapcoord.verify.jobs import describe, outcome_of
from snapcoord.verify.record import VerifyRecord
from tests.cli_helpers import snapcoord, write_config
from tests.test_metrics import parse, promtool_check, value


@pytest.fixture
def config(tmp_path: Path) -> Config:
    tables = {
        "defaults": {"store": str(tmp_path / "store"), "metrics_file": str(tmp_path / "s.prom")},
        "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
        "vms.db1": {"hypervisor": "lab", "name": "test"},
    }
    return load_config(str(write_config(tmp_path / "c.toml", tables)))


def a_record(**changes: Any) -> VerifyRecord:
    fields: dict[str, Any] = {
        "vm": "db1",
        "what": "dump",
        "snapshot": "snapcoord-nightly-20261207T030000Z",
        "verified": True,
        "finished": 1_800_000_000.5,
        "seconds": 38.25,
        "kind": "mysql",
        "tables": 214,
        "rows": 1_204_113,
        "compared": "checksums",
        "split": {"load": 30.0, "compare": 5.0},
    }
    fields.update(changes)
    return VerifyRecord(**fields)


# -- the comparison ---------------------------------------------------------------------------


def test_differences_name_each_kind_of_difference_in_table_order() -> None:
    expected = {"a.t1": 10, "a.t2": 5, "a.t3": 7, "b.t": 1}
    sums = {"a.t1": "100", "a.t2": "55", "a.t3": "77", "b.t": "1"}
    found = {
        "a.t1": TableSum(10, "100"),  # equal
        "a.t2": TableSum(5, "56"),  # same rows, other data
        "a.t3": TableSum(6, "70"),  # a row lost
        "c.new": TableSum(3, "3"),  # not in the record
    }  # b.t missing
    assert differences(expected, sums, found) == [
        "table a.t2: 5 rows as recorded, but the checksum differs (recorded 55, loaded 56): "
        "the data changed",
        "table a.t3: 7 rows recorded, 6 loaded",
        "table b.t: recorded with 1 rows, missing after the load",
        "table c.new: loaded (3 rows) but not in the record",
    ]


def test_without_recorded_checksums_only_rows_are_compared() -> None:
    found = {"a.t": TableSum(3, "999")}
    assert differences({"a.t": 3}, None, found) == []
    assert differences({"a.t": 4}, None, found) == ["table a.t: 4 rows recorded, 3 loaded"]


def test_equal_figures_give_no_difference() -> None:
    found = {"a.t": TableSum(0, "0"), "a.u": TableSum(2, "17")}
    assert differences({"a.t": 0, "a.u": 2}, {"a.t": "0", "a.u": "17"}, found) == []


# -- the record -------------------------------------------------------------------------------


def test_a_record_survives_its_file(config: Config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    found = a_record(verified=False, problem="table a.t: 4 rows recorded, 3 loaded", mismatches=2)
    record.save(config.store, found, run_dir)
    for read in (record.read_run(run_dir), record.read_last(config.store, "db1")):
        assert read is not None
        assert read.as_dict() == found.as_dict()
    data = json.loads((run_dir / record.RUN_FILE).read_text())
    assert data["verified"] is False
    assert data["first_mismatch"] == "table a.t: 4 rows recorded, 3 loaded"
    assert os.stat(run_dir / record.RUN_FILE).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "data",
    [
        [],
        "x",
        {},
        {"vm": "db1", "what": "dump", "snapshot": "s", "verified": "yes", "finished": 1.0,
         "seconds": 1.0},
        {"vm": "db1", "what": "disk", "snapshot": "s", "verified": True, "finished": 1.0,
         "seconds": 1.0},
        {"vm": "db1", "what": "dump", "snapshot": "s", "verified": True, "finished": math.inf,
         "seconds": 1.0},
        {"vm": "db1", "what": "dump", "snapshot": "s", "verified": True, "finished": 1e300,
         "seconds": 1.0},
        {"vm": "db1", "what": "dump", "snapshot": "s", "verified": True, "finished": 1.0,
         "seconds": -1},
        {"vm": "db1\x1b[2J", "what": "dump", "snapshot": "s", "verified": True, "finished": 1.0,
         "seconds": 1.0},
        {"vm": "db1", "what": "dump", "snapshot": 7, "verified": True, "finished": 1.0,
         "seconds": 1.0},
    ],
)  # fmt: skip
def test_a_hostile_record_is_no_record(data: Any) -> None:
    assert VerifyRecord.parse(data) is None


def test_bad_fields_inside_a_valid_record_are_dropped() -> None:
    parsed = VerifyRecord.parse(
        {"vm": "db1", "what": "dump", "snapshot": "s", "verified": None, "finished": 1.0,
         "seconds": 2.0, "tables": True, "rows": -5, "compared": "everything", "kind": "x y",
         "problem": "p" * 5000, "split_seconds": {"load": "fast", "check": 1.5, "x": math.nan}}
    )  # fmt: skip
    assert parsed is not None
    assert (parsed.tables, parsed.rows, parsed.compared, parsed.kind) == (0, 0, "none", None)
    assert parsed.problem is not None and len(parsed.problem) == 2000
    assert parsed.split == {"check": 1.5}


def test_unreadable_or_linked_files_are_no_record(config: Config, tmp_path: Path) -> None:
    path = record.last_path(config.store, "db1")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert record.read_last(config.store, "db1") is None
    path.unlink()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(a_record().as_dict()))
    path.symlink_to(target)
    assert record.read_last(config.store, "db1") is None  # a link is never followed


# -- telling it -------------------------------------------------------------------------------


def test_lines_and_exit_codes() -> None:
    good = outcome_of(a_record(), [])
    assert good.exit_code == 0 and good.errors == []
    assert good.lines[-1] == (
        "db1: verify ok: dump of snapcoord-nightly-20261207T030000Z: 214 tables, 1204113 rows, "
        "rows and checksums match the record (38.2 s)"
    )
    assert good.summary["verify"]["verified"] is True
    bad = outcome_of(a_record(verified=False, problem="table a.t: 4 rows recorded, 3 loaded"), [])
    assert bad.exit_code == ExitCode.SNAPSHOT_FAILED == 5
    assert bad.errors == [
        "db1: verify of snapcoord-nightly-20261207T030000Z failed: table a.t: 4 rows recorded, "
        "3 loaded"
    ]
    assert bad.summary["verify"]["first_mismatch"] == "table a.t: 4 rows recorded, 3 loaded"
    not_run = outcome_of(a_record(verified=None, problem="mariadbd not found"), ["a note"])
    assert not_run.exit_code == ExitCode.PREFLIGHT == 4
    assert not_run.summary["verify"]["first_mismatch"] is None
    assert not_run.lines[0] == "db1: note: a note"
    assert describe(a_record(compared="rows")).endswith(
        "row counts match the record (no checksums recorded) (38.2 s)"
    )


def test_metrics_carry_the_last_verify(config: Config) -> None:
    record.save(config.store, a_record(verified=False, problem="x"), None)
    metrics.write_metrics(config)
    prom = Path(str(config.defaults.metrics_file))
    promtool_check(prom)
    samples = parse(prom.read_text())
    assert value(samples, "last_verify_success", vm="db1", what="dump") == 0
    assert value(samples, "last_verify_timestamp_seconds", vm="db1", what="dump") == 1800000000.5
    assert value(samples, "verify_seconds", vm="db1", what="dump") == 38.25
    record.save(config.store, a_record(), None)
    samples = parse(metrics.render(config))
    assert value(samples, "last_verify_success", vm="db1", what="dump") == 1


def test_status_shows_the_last_verify(config: Config) -> None:
    record.save(config.store, a_record(verified=False, problem="table a.t: 4 rows recorded"), None)
    outcome = status_vm(config, "db1", offline=True, now=1_800_000_000.5 + 7200)
    assert outcome.summary["last_verify"]["verified"] is False
    line = outcome.lines[-1]
    assert line.startswith("db1: last verify (dump) FAILED ")
    assert line.endswith(
        "(2 h ago): snapcoord-nightly-20261207T030000Z: table a.t: 4 rows recorded"
    )


# -- the command's refusals (no database needed) ------------------------------------------------


def test_a_vm_without_dumps_has_nothing_to_verify(config: Config, tmp_path: Path) -> None:
    proc = snapcoord("-c", str(tmp_path / "c.toml"), "verify", "--all")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "db1: verify: nothing to verify (no dump configured or stored)",
        "verify: 1 VM: 1 ok (exit 0)",
    ]


def test_the_command_refuses_in_one_line(config: Config, tmp_path: Path) -> None:
    text = (tmp_path / "c.toml").read_text()
    (tmp_path / "c.toml").write_text(text + '[vms.db1.guest]\nhost = "h"\ndump = true\n')
    path = str(tmp_path / "c.toml")
    proc = snapcoord("-c", path, "verify", "db1")
    assert proc.returncode == 4
    assert proc.stderr.splitlines() == [
        f"snapcoord: error: db1: no dump of db1 in {config.store} (enable [vms.X.guest] dump = "
        "true and take a snapshot)"
    ]
    proc = snapcoord("-c", path, "verify", "db1", "--from", "snapcoord-x-20261207T000000Z")
    assert proc.returncode == 4
    assert "no dump of snapshot snapcoord-x-20261207T000000Z" in proc.stderr
    proc = snapcoord("-c", path, "verify", "db1", "--from", "../../etc")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    proc = snapcoord("-c", path, "verify", "nope")
    assert proc.returncode == 2 and "no VM 'nope'" in proc.stderr


def test_boot_verify_is_libvirt_only(tmp_path: Path) -> None:
    tables = {
        "defaults": {"store": str(tmp_path / "store")},
        "hypervisors.vc": {"type": "vsphere", "host": "127.0.0.1", "user": "u",
                           "password": {"env": "X_PASSWORD"}, "thumbprint": "sha256:" + "ab" * 32},
        "vms.db1": {"hypervisor": "vc", "name": "db1"},
    }  # fmt: skip
    path = str(write_config(tmp_path / "c.toml", tables))
    proc = snapcoord("-c", path, "verify", "db1", "--boot", env={"X_PASSWORD": "p"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "snapcoord: error: db1: verify --boot runs on libvirt only; db1 is on vsphere "
        "(docs/verify.md says how the same is done by hand on Proxmox VE and vSphere)"
    ]


# -- what a manifest's figures are worth ----------------------------------------------------------


def _source(manifest: dict[str, Any] | None) -> RestoreSource:
    return RestoreSource(Path("/x/mysql.sql.gz"), "gzip", manifest, ["a"], ["a"], "mysqldump")


def test_figures_of_a_pause_mode_dump_are_not_compared() -> None:
    section = {"tables": {"a.t": 3}, "checksums": {"a.t": "9"}, "checksum_method": "m/1"}
    stopped = _source({"mysqldump": section})
    assert stopped.figures_comparable and stopped.expected_rows == {"a.t": 3}
    paused = _source({"mysqldump": section, "consistency": {"mode": "pause"}})
    assert not paused.figures_comparable and paused.expected_rows is None
    assert "consistency = pause" in paused.unchecked_reason
    assert "no manifest" in _source(None).unchecked_reason


@pytest.mark.parametrize("count", ["3", 3.0, -1, True, None, [3], 10**16])
def test_a_hand_edited_count_makes_the_record_unusable_not_a_traceback(count: Any) -> None:
    source = _source({"mysqldump": {"tables": {"a.t": 3, "a.u": count}}})
    assert source.expected_rows is None
    assert "unreadable" in source.unchecked_reason


def test_the_newest_dump_passes_over_a_run_that_archived_files_only(config: Config) -> None:
    """restore-dump and verify take the newest run folder that holds a dump: a newer run
    with archives only (a VM with dump = false since) is not a dump."""
    from snapcoord import store
    from snapcoord.plans.restore import newest_dump

    folder = store.vm_dir(config.store, "db1")
    folder.mkdir(parents=True)
    for name, finished, section in (
        ("snapcoord-a-20261201T000000Z", "2026-12-01T00:00:00+00:00", {"mysqldump": {}}),
        ("snapcoord-a-20261202T000000Z", "2026-12-02T00:00:00+00:00", {"archive": {}}),
    ):
        (folder / name).mkdir()
        manifest = {"format": store.FORMAT, "snapshot": name, "status": "complete",
                    "finished": finished, "files": {}, **section}  # fmt: skip
        (folder / name / store.MANIFEST).write_text(json.dumps(manifest))
    assert newest_dump(config, "db1").name == "snapcoord-a-20261201T000000Z"

"""restore-dump on the real loopback guest: verify, stop services, drop, load, compare, restart."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord import store
from snapcoord.errors import ExitCode
from snapcoord.guest import shell_transport
from snapcoord.hooks.databases import mysql
from snapcoord.plans.restore import DumpSource, restore_dump
from tests import lab
from tests.idoit_fixture import DATABASES, IdoitDB
from tests.test_mysqldump import make_config, take_dump

pytestmark = pytest.mark.real
IDOIT = list(DATABASES)


@pytest.fixture
def dumped(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, tmp_path: Path
) -> Iterator[tuple[Any, Path]]:
    """A config for the loopback guest and a verified dump of the pristine i-doit databases."""
    config = make_config(ssh_guest, tmp_path / "store", databases=IDOIT, compression="gzip")
    vm = config.vm("lab")
    assert vm.guest is not None
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        _, folder = take_dump(transport, vm, config.store, "snap-1")
    finally:
        transport.close()
    yield config, folder


def test_restore_dump_brings_back_the_exact_data_after_schema_and_data_changes(
    dumped: tuple[Any, Path], idoit_db: IdoitDB, guest_services: lab.GuestServices
) -> None:
    config, _ = dumped
    idoit_db.mutate_schema_for_errno150()
    idoit_db.mutate_data()
    assert not idoit_db.is_pristine()

    result = restore_dump(config, "lab", source=DumpSource(snapshot="snap-1"))

    assert result.ok, [str(f) for f in result.failures]
    assert idoit_db.is_pristine()  # checksums of every table and the schema fingerprint
    assert lab.row_counts(IDOIT) == idoit_db.row_counts
    assert "idoit_data.isys_catg_cloud_list" not in lab.base_tables(IDOIT)
    names = [(r.name, r.ok) for r in result.records]
    assert ("stop services", True) in names and ("start services", True) in names
    assert ("drop databases and load dump", True) in names
    assert guest_services.running("apache2") and guest_services.running("cron")
    assert not any("database" in r.name and "stop" in r.name for r in result.records)
    assert guest_services.running("mariadb")  # the database stayed up: nothing stopped it
    assert result.values["dropped"] == IDOIT


def test_loading_without_dropping_first_fails_with_errno_150_and_loses_a_table(
    dumped: tuple[Any, Path], idoit_db: IdoitDB
) -> None:
    config, folder = dumped
    idoit_db.mutate_schema_for_errno150()
    before = set(lab.base_tables(IDOIT))

    # what an admin would do by hand: gunzip < mysql.sql.gz | mysql
    naive = lab.load_sql(folder / "mysql.sql.gz")

    assert naive.returncode != 0
    assert "errno: 150" in naive.stderr
    assert "Foreign key constraint is incorrectly formed" in naive.stderr
    lost = {t for t in before if t.startswith("idoit_data.isys_catg_")} - set(
        lab.base_tables(IDOIT)
    )
    assert lost, "the failed load should have dropped a child table without recreating it"

    # the same dump with the drop first restores exactly
    vm = config.vm("lab")
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        restored = mysql.restore(
            transport, vm="lab", guest=vm.guest, options=vm.dump, source=folder
        )
    finally:
        transport.close()
    assert restored.dropped == IDOIT and not restored.mismatches
    assert idoit_db.is_pristine()


def test_corrupted_dump_is_refused_before_the_database_is_touched(
    dumped: tuple[Any, Path], idoit_db: IdoitDB, guest_services: lab.GuestServices
) -> None:
    config, folder = dumped
    idoit_db.mutate_data()
    changed = idoit_db.current_checksums()
    dump_file = folder / "mysql.sql.gz"
    data = bytearray(dump_file.read_bytes())
    data[len(data) // 2] ^= 0x55
    dump_file.write_bytes(bytes(data))

    with pytest.raises(store.CorruptDump, match="sha256") as info:
        restore_dump(config, "lab", source=DumpSource(snapshot="snap-1"))
    assert info.value.exit_code == ExitCode.PREFLIGHT
    assert idoit_db.current_checksums() == changed  # untouched
    assert guest_services.running("apache2") and guest_services.running("cron")

    # a truncated file given with --file (no manifest next to it) is refused too
    loose = folder.parent / "loose.sql.gz"
    original = data[:]
    original[len(data) // 2] ^= 0x55
    loose.write_bytes(bytes(original[: len(original) - 40]))
    with pytest.raises(store.CorruptDump, match=r"truncated|gzip"):
        restore_dump(config, "lab", source=DumpSource(file=loose))
    assert idoit_db.current_checksums() == changed


def test_dry_run_names_the_databases_and_changes_nothing(
    dumped: tuple[Any, Path], idoit_db: IdoitDB
) -> None:
    config, _ = dumped
    idoit_db.mutate_data()
    changed = idoit_db.current_checksums()
    result = restore_dump(config, "lab", source=DumpSource(), dry_run=True)  # newest dump
    assert result.values["would_drop"] == IDOIT
    assert result.values["verified_against_manifest"] is True
    assert not result.records
    assert idoit_db.current_checksums() == changed


def test_bare_file_restores_without_row_comparison(
    dumped: tuple[Any, Path], idoit_db: IdoitDB, tmp_path: Path
) -> None:
    config, folder = dumped
    idoit_db.mutate_data()
    loose = tmp_path / "copy" / "idoit.sql.gz"
    loose.parent.mkdir()
    shutil.copy(folder / "mysql.sql.gz", loose)
    result = restore_dump(config, "lab", source=DumpSource(file=loose))
    assert result.ok, [str(f) for f in result.failures]
    assert any("not compared" in note for note in result.values["notes"])
    assert idoit_db.is_pristine()


def test_row_count_mismatch_fails_the_restore_and_restarts_services(
    dumped: tuple[Any, Path], idoit_db: IdoitDB, guest_services: lab.GuestServices
) -> None:
    config, folder = dumped
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["mysqldump"]["tables"]["idoit_data.isys_obj"] += 1
    manifest_path.write_text(json.dumps(manifest))

    result = restore_dump(config, "lab", source=DumpSource(snapshot="snap-1"))

    assert result.exit_code == ExitCode.SNAPSHOT_FAILED
    assert "idoit_data.isys_obj: expected" in str(result.failures[0])
    assert guest_services.running("apache2") and guest_services.running("cron")
    assert [r.name for r in result.records if r.undo][:1] == ["start services"]


def test_missing_and_failed_dumps_are_named(dumped: tuple[Any, Path]) -> None:
    config, folder = dumped
    with pytest.raises(Exception, match="no dump of snapshot nope"):
        restore_dump(config, "lab", source=DumpSource(snapshot="nope"))
    folder.rename(folder.with_name("snap-1.failed"))
    with pytest.raises(store.CorruptDump, match="failed when it was taken"):
        restore_dump(config, "lab", source=DumpSource(snapshot="snap-1"))


# A restore refuses a dump cut short inside an intact gzip stream before anything is dropped.
def test_a_cut_short_dump_in_a_valid_gzip_is_refused_before_anything_is_dropped(
    dumped: tuple[Any, Path],
    idoit_db: IdoitDB,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config, folder = dumped
    sql = gzip.decompress((folder / "mysql.sql.gz").read_bytes())
    cut = sql.rfind(b"\n", 0, len(sql) // 2) + 1  # whole statements only: it would load
    loose = tmp_path / "cut" / "idoit.sql.gz"
    loose.parent.mkdir()
    loose.write_bytes(gzip.compress(sql[:cut]))  # an intact gzip stream of half the SQL
    idoit_db.mutate_data()
    changed = idoit_db.current_checksums()

    with pytest.raises(store.CorruptDump, match="Dump completed") as info:
        restore_dump(config, "lab", source=DumpSource(file=loose))

    assert info.value.exit_code == ExitCode.PREFLIGHT
    assert idoit_db.current_checksums() == changed  # nothing dropped, nothing loaded
    assert guest_services.all_running()


def test_a_single_stream_restore_compares_every_tables_checksum(
    dumped: tuple[Any, Path], idoit_db: IdoitDB
) -> None:
    """A one-stream dump's manifest has every table's checksum as well as its row count: the
    restore compares both, as a parallel dump's does. A value changed with the row count
    intact is a difference (here: the manifest's checksum of one table, changed); a manifest
    from before checksums were recorded is restored on its row counts, as before."""
    config, folder = dumped
    vm = config.vm("lab")
    manifest_path = folder / store.MANIFEST
    original = manifest_path.read_text()
    manifest = json.loads(original)
    assert manifest["mysqldump"]["format"] == "single" and manifest["mysqldump"]["checksums"]
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        restored = mysql.restore(transport, vm="lab", guest=vm.guest, options=vm.dump,
                                 source=folder)  # fmt: skip
        assert restored.checksums_checked == len(idoit_db.row_counts)
        assert not restored.mismatches and not restored.warnings and idoit_db.is_pristine()

        table = "idoit_data.isys_obj"
        manifest["mysqldump"]["checksums"][table] = "12345"
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(mysql.RestoreFailed, match=f"checksums differ.*{table}"):
            mysql.restore(transport, vm="lab", guest=vm.guest, options=vm.dump, source=folder)

        del manifest["mysqldump"]["checksums"], manifest["mysqldump"]["checksum_method"]
        manifest_path.write_text(json.dumps(manifest))
        older = mysql.restore(transport, vm="lab", guest=vm.guest, options=vm.dump,
                              source=folder)  # fmt: skip
        assert older.checksums_checked == 0 and not older.mismatches
        assert idoit_db.is_pristine()
    finally:
        transport.close()
        manifest_path.write_text(original)

"""`snapcoord snapshot` with `mysqldump = true` over the real loopback SSH guest: the dump is taken
inside the window (services stopped, database up), lands verified in the store, loads into a
scratch server with identical checksums; a failing dump follows on_dump_failure."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from tests import idoit_fixture, lab
from tests.cli_helpers import json_lines, snapcoord, write_config
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture


def _config(tmp_path: Path, uri: str, guest: dict[str, Any], **mysqldump: Any) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store"), "label": "dump"},
        "hypervisors.lab": {"type": "libvirt", "uri": uri},
        "vms.db1": {"hypervisor": "lab"},
        "vms.db1.guest": {**guest, "dump": True},
    }
    if mysqldump:
        tables["vms.db1.dump"] = mysqldump
    return write_config(tmp_path / "c.toml", tables)


def test_snapshot_with_dump_stores_a_verified_dump_that_loads_identically(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
    scratch_mariadb: lab.ScratchMariaDB,
) -> None:
    # gzip: this test reads the stream by hand (tests/test_compression_lab.py takes the default)
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table(), compression="gzip")
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    (run,) = json_lines(proc.stdout)
    names = [s["name"] for s in run["steps"] if not s["undo"]]
    assert names.index("stop services") < names.index("dump to store")
    assert names.index("dump to store") < names.index("stop database")

    folder = Path(run["store_folder"])
    assert folder == tmp_path / "store" / "db1" / run["snapshot"]
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    manifest = json.loads((folder / "manifest.json").read_text())
    dump_file = folder / run["dump"]["file"]
    assert oct(dump_file.stat().st_mode & 0o777) == "0o600"
    digest = hashlib.sha256(dump_file.read_bytes()).hexdigest()
    assert digest == run["dump"]["sha256"]
    assert manifest["files"][dump_file.name]["sha256"] == digest
    assert manifest["snapshot"] == run["snapshot"] and manifest["snapshot_taken"] is True
    assert run["dump"]["compression"] == "gzip" and dump_file.name == "mysql.sql.gz"
    subprocess.run(["gunzip", "-t", str(dump_file)], check=True)
    with gzip.open(dump_file) as handle:
        tail = handle.read()[-200:]
    assert b"-- Dump completed" in tail

    scratch_mariadb.load(dump_file)
    dbs = ["idoit_system", "idoit_data"]
    assert scratch_mariadb.checksums(dbs) == idoit_db.checksums
    assert all(guest_services.states().values())


def test_failing_dump_aborts_by_default_and_continue_snapshots_anyway(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
) -> None:
    idoit_fixture.add_broken_view()  # the idoit_db fixture rebuilds the dataset afterwards
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table())
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json", timeout=600)
    (run,) = json_lines(proc.stdout)
    assert proc.returncode == 4, proc.stderr
    assert "hypervisor snapshot" not in [s["name"] for s in run["steps"]]
    assert all(guest_services.states().values())
    store = tmp_path / "store" / "db1"
    assert [p.name for p in store.iterdir()] == [f"{run['snapshot']}.failed"]

    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table(), on_dump_failure="continue")
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json", timeout=600)
    (run,) = json_lines(proc.stdout)
    assert proc.returncode == 4
    assert "hypervisor snapshot" in [s["name"] for s in run["steps"] if s["ok"]]
    assert any("snapshot taken anyway" in n for n in run["notes"])
    assert all(guest_services.states().values())


def test_unwritable_store_is_caught_in_preflight(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table())
    store = str(tmp_path / "store")
    config.write_text(config.read_text().replace(store, "/proc/snapcoord-store"))
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json", timeout=300)
    (run,) = json_lines(proc.stdout)
    assert proc.returncode == 4
    assert run["window_seconds"] is None  # nothing was stopped
    assert all(guest_services.states().values())


def test_restore_dump_cli_drops_first_and_brings_back_exact_data(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table())
    taken = snapcoord("-c", str(config), "snapshot", "db1", "--json", timeout=600)
    assert taken.returncode == 0, taken.stderr
    snapshot = json_lines(taken.stdout)[0]["snapshot"]

    idoit_db.mutate_schema_for_errno150()
    idoit_db.mutate_data()
    assert lab.table_checksums(["idoit_system", "idoit_data"]) != idoit_db.checksums

    plan = snapcoord("-c", str(config), "restore-dump", "db1", "--from", snapshot, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "idoit_data" in plan.stdout and "idoit_system" in plan.stdout

    refused = snapcoord("-c", str(config), "restore-dump", "db1", stdin="")
    assert refused.returncode == 2 and "--yes" in refused.stderr

    done = snapcoord(
        "-c", str(config), "restore-dump", "db1", "--from", snapshot, "--yes", "--json", timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert lab.table_checksums(["idoit_system", "idoit_data"]) == idoit_db.checksums
    assert all(guest_services.states().values())

    dump_file = next((tmp_path / "store" / "db1" / snapshot).glob("mysql.sql*"))
    data = bytearray(dump_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump_file.write_bytes(bytes(data))
    corrupt = snapcoord("-c", str(config), "restore-dump", "db1", "--yes", timeout=300)
    assert corrupt.returncode == 4, corrupt.stderr
    assert lab.table_checksums(["idoit_system", "idoit_data"]) == idoit_db.checksums

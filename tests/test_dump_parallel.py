"""The parallel, consistent MySQL dump ([vms.X.dump] threads) and its parallel restore, on the
real loopback SSH guest and the lab MariaDB (hooks/databases/mysql_parallel.py)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord import store
from snapcoord.config import VMConfig
from snapcoord.guest import shell_transport
from tests import lab
from tests.idoit_fixture import DATABASES, IdoitDB
from tests.test_mysqldump import take_dump, vm_config

pytestmark = pytest.mark.real
IDOIT = list(DATABASES)
COMPLETED = re.compile(rb"\n-- Dump completed(?: on [^\n]*)?\n*$")


@pytest.fixture
def transport_for(ssh_guest: lab.SshGuest) -> Iterator[Any]:
    """The VM's own SSH transport, opened (closed after the test)."""
    opened: list[Any] = []

    def make(vm: VMConfig) -> Any:
        assert vm.guest is not None
        transport = shell_transport(vm.guest, vm=vm.key)
        transport.open()
        opened.append(transport)
        return transport

    yield make
    for transport in opened:
        transport.close()


def sql_of(path: Path) -> bytes:
    """The SQL of a stored file (zstd, gzip or plain), read with the standard tools."""
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    if path.name.endswith(".gz"):
        return subprocess.run(["gzip", "-dc", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def lock_free() -> bool:
    """A write commits at once: no read lock of the dump is left."""
    done = lab.mysql_exec(
        "SET SESSION lock_wait_timeout = 2; CREATE DATABASE IF NOT EXISTS snapcoord_lockprobe;"
        "CREATE TABLE IF NOT EXISTS snapcoord_lockprobe.t (x INT) ENGINE=InnoDB;"
        "INSERT INTO snapcoord_lockprobe.t VALUES (1); DROP DATABASE snapcoord_lockprobe;",
        check=False,
    )
    return done.returncode == 0


def no_lock_session() -> bool:
    rows = lab.mysql_rows(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'FLUSH TABLES%'"
        " OR STATE LIKE '%global read lock%'"
    )
    return rows[0][0] == "0"


@pytest.mark.parametrize("threads", [2, 4])
def test_parallel_dump_stores_parts_each_complete_and_every_table_in_exactly_one(
    threads: int, ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    vm = vm_config(ssh_guest, tmp_path, databases=IDOIT, compression="zstd", threads=threads)
    result, folder = take_dump(transport_for(vm), vm, tmp_path)

    manifest = store.verify(folder)
    section = manifest["mysqldump"]
    assert section["format"] == "parallel" and section["valid"] is True
    assert section["threads"] == threads
    parts = section["parts"]
    tables = [p for p in parts if p["role"] == "tables"]
    assert len(tables) == threads
    assert [p["file"] for p in tables] == [
        f"mysql.part{i:02d}.sql.zst" for i in range(1, threads + 1)
    ]
    assert parts[-1] == {"file": "mysql.objects.sql.zst", "role": "objects", "tables": []}
    listed = [t for p in tables for t in p["tables"]]
    assert sorted(listed) == sorted(lab.base_tables(IDOIT))  # each base table once
    assert len(listed) == len(set(listed))
    assert section["tables"] == idoit_db.row_counts
    assert result.parts == [p["file"] for p in parts]
    assert sorted(os.listdir(folder)) == sorted([*result.parts, store.MANIFEST])
    for part in parts:
        name = part["file"]
        assert manifest["files"][name]["sha256"] == store.sha256_file(folder / name)
        sql = sql_of(folder / name)
        assert COMPLETED.search(sql[-200:]), name
        for table in part["tables"]:
            _db, t = table.split(".", 1)
            assert f"CREATE TABLE `{t}`".encode() in sql
    objects = sql_of(folder / "mysql.objects.sql.zst")
    assert b"CREATE TABLE" not in objects.replace(b"CREATE TABLE `", b"")  # views only
    assert b"VIEW" in objects and b"PROCEDURE" in objects and b"EVENT" in objects
    assert lock_free() and no_lock_session()

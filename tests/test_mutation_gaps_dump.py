"""A dump is complete only when its SQL ends with mysqldump's '-- Dump completed' line: neither an
exit status of 0 nor an intact gzip stream is enough. Real MariaDB and mysqldump; the cut-short
dumps are made from real ones."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest

from snapcoord import store
from snapcoord.config import parse_config
from snapcoord.errors import ExitCode
from snapcoord.guest import open_transport
from snapcoord.hooks.databases import dumpfile, mysql
from snapcoord.plans.restore import DumpSource, restore_dump
from tests import lab
from tests.idoit_fixture import IdoitDB
from tests.test_restore_dump import dumped  # noqa: F401 - fixture

pytestmark = pytest.mark.real

DATABASE = "snapcoord_gap_dump"

# A mysqldump in the guest's PATH that cuts its output short and still exits 0 (a wrapper, a
# container exec, a proxy that loses the end of the stream: the status alone is not trusted).
CUTTING_MYSQLDUMP = """#!/bin/sh
{mysqldump} "$@" | head -c 1500
exit 0
"""


def test_a_dump_that_exits_0_without_the_completion_line_is_refused(
    guest_services: lab.GuestServices, tmp_path: Path
) -> None:
    real = lab.which("mysqldump")
    assert real is not None
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "mysqldump"
    wrapper.write_text(CUTTING_MYSQLDUMP.format(mysqldump=real))
    wrapper.chmod(0o755)
    lab.mysql_exec(
        f"DROP DATABASE IF EXISTS {DATABASE}; CREATE DATABASE {DATABASE};"
        f"CREATE TABLE {DATABASE}.t (id INT PRIMARY KEY, v VARCHAR(200));"
        f"USE {DATABASE}; INSERT INTO t SELECT seq, REPEAT('x', 150) FROM seq_1_to_200;"
    )
    root = tmp_path / "store"
    config = parse_config(
        {
            "defaults": {"store": str(root)},
            "hypervisors": {"lab": {"type": "libvirt", "uri": "test:///default"}},
            "vms": {
                "lab": {
                    "hypervisor": "lab",
                    "guest": {
                        "transport": "exec",
                        "exec_prefix": ["env", f"PATH={wrapper_dir}:/usr/bin:/bin"],
                        "dump": True,
                    },
                    "dump": {"databases": [DATABASE]},
                }
            },
        }
    )
    vm = config.vm("lab")
    assert vm.guest is not None
    transport = open_transport(vm.guest, vm="lab")
    transport.open()
    try:
        run = store.RunDir.begin(root, "lab", "snap-cut")
        with pytest.raises(dumpfile.DumpFailed, match="Dump completed"):
            mysql.dump(transport, vm="lab", guest=vm.guest, options=vm.dump, run_dir=run)
    finally:
        transport.close()
        lab.mysql_exec(f"DROP DATABASE IF EXISTS {DATABASE}")
    assert store.list_dumps(root, "lab") == []  # never presented as a usable dump
    assert (root / "lab" / "snap-cut.failed").is_dir()


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

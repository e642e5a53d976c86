"""snapcoord/verify/mysql.py against the real thing: Debian's mariadbd as a throwaway server on
the coordinator (here: the lab sandbox), fed real dumps that snapcoord's dump code took from
the lab guest's MariaDB (the i-doit-like schema with foreign keys, about 120k rows)."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcoord.errors import VerifyFailed, VerifyUnavailable
from snapcoord.guest import shell_transport
from snapcoord.hooks.databases import mysql as mysql_kind
from snapcoord.hooks.databases.dumpfile import RestoreSource, TableSum
from snapcoord.verify import mysql, scratch
from tests import lab
from tests.idoit_fixture import DATABASES, IdoitDB
from tests.test_mysqldump import take_dump, vm_config
from tests.test_verify_scratch import nobody_processes, status_field
from tests.verify_helpers import (
    recorded_figures,
    uids_running,
    verified_figures,
    verify_folder,
)

pytestmark = pytest.mark.real
IDOIT = list(DATABASES)
TIMEOUT = 600.0


@pytest.fixture
def verify_dir() -> Iterator[Path]:
    """A root-owned 0755 folder nobody can traverse; after the test, no process of nobody and
    no work folder may remain."""
    lab.require_root()
    lab.require("/usr/sbin/mariadbd", "mariadb-server-core")
    assert not nobody_processes(), "a nobody process ran before the test"
    with verify_folder() as path:
        yield path
        assert not nobody_processes()
        assert [n for n in os.listdir(path) if n.startswith(scratch.PREFIX)] == []


@pytest.fixture
def dumped(ssh_guest: lab.SshGuest, idoit_db: IdoitDB, tmp_path: Path) -> Path:
    """A run folder with a dump of the pristine i-doit databases, taken by snapcoord."""
    vm = vm_config(ssh_guest, tmp_path / "store", databases=IDOIT, compression="gzip")
    assert vm.guest is not None
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        _, folder = take_dump(transport, vm, tmp_path / "store", "snap-1")
    finally:
        transport.close()
    return folder


def _plain(source: RestoreSource, sql: bytes, path: Path) -> RestoreSource:
    """A RestoreSource of an uncompressed SQL file (no manifest), like a hand-made dump."""
    path.write_bytes(sql)
    return RestoreSource(path, "none", None, list(source.databases), list(source.to_drop),
                         source.section)  # fmt: skip


def test_a_good_dump_loads_and_measures_what_was_recorded_at_dump_time(
    dumped: Path, verify_dir: Path, idoit_db: IdoitDB
) -> None:
    source = mysql_kind.prepare_restore(dumped, vm="lab")
    assert source.checksum_method == mysql_kind.CHECKSUM_METHOD
    expected_sums = source.expected_checksums
    assert expected_sums is not None and source.expected_rows == idoit_db.row_counts
    mysql.require(vm="lab")
    with scratch.workspace(verify_dir, vm="lab") as work, \
            mysql.server(work, vm="lab", timeout=TIMEOUT) as server:  # fmt: skip
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        assert Path(f"/proc/{server.process.pid}/comm").read_text().strip() == "mariadbd"
        for name in ("Uid", "Gid"):
            assert status_field(status, name).split() == ["65534"] * 4
        assert int(status_field(status, "CapEff"), 16) == 0
        seconds = mysql.load(server, source, vm="lab", timeout=TIMEOUT)
        measured = mysql.measure(server, IDOIT, vm="lab", timeout=TIMEOUT)
        mysql.check(server, vm="lab", timeout=TIMEOUT)
        pid = server.process.pid
    assert seconds > 0
    assert {name: s.rows for name, s in measured.items()} == source.expected_rows
    assert {name: s.checksum for name, s in measured.items()} == expected_sums
    assert not Path(f"/proc/{pid}").exists()
    assert not work.exists()


def test_a_changed_value_with_the_same_row_counts_shows_in_the_checksum(
    dumped: Path, verify_dir: Path, tmp_path: Path
) -> None:
    source = mysql_kind.prepare_restore(dumped, vm="lab")
    sql = gzip.decompress(source.file.read_bytes())
    marker = b"(7,'Object 7',"  # one title of isys_obj: same row count, other data
    assert sql.count(marker) == 1
    changed = _plain(source, sql.replace(marker, b"(7,'Object 7!',"), tmp_path / "changed.sql")
    with scratch.workspace(verify_dir) as work, mysql.server(work, vm="lab", timeout=TIMEOUT) as s:
        mysql.load(s, changed, vm="lab", timeout=TIMEOUT)
        measured = mysql.measure(s, IDOIT, vm="lab", timeout=TIMEOUT)
    expected = source.expected_checksums or {}
    rows = source.expected_rows or {}
    differ = sorted(n for n, s in measured.items() if s.checksum != expected[n])
    assert differ == ["idoit_data.isys_obj"]
    assert all(s.rows == rows[n] for n, s in measured.items())


def test_a_dump_that_does_not_load_is_verify_failed_with_the_clients_error(
    dumped: Path, verify_dir: Path, tmp_path: Path
) -> None:
    source = mysql_kind.prepare_restore(dumped, vm="lab")
    sql = gzip.decompress(source.file.read_bytes())
    broken = _plain(source, sql.replace(b"INSERT INTO", b"INSERT INTOO", 1), tmp_path / "b.sql")
    with scratch.workspace(verify_dir) as work, mysql.server(work, vm="lab", timeout=TIMEOUT) as s:
        with pytest.raises(VerifyFailed, match=r"does not load: ERROR 1064 "):
            mysql.load(s, broken, vm="lab", timeout=TIMEOUT)
        assert s.alive()


def test_a_server_that_dies_mid_load_is_verify_unavailable(dumped: Path, verify_dir: Path) -> None:
    source = mysql_kind.prepare_restore(dumped, vm="lab")
    with scratch.workspace(verify_dir) as work, mysql.server(work, vm="lab", timeout=TIMEOUT) as s:
        killed = threading.Event()

        def kill_when_loading() -> None:  # once the load has created the first database
            deadline = time.monotonic() + 120
            while not (work / "data" / "idoit_data").exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(s.process.pid, signal.SIGKILL)
            killed.set()

        killer = threading.Thread(target=kill_when_loading)
        killer.start()
        try:
            with pytest.raises(VerifyUnavailable, match="server died while the dump loaded"):
                mysql.load(s, source, vm="lab", timeout=TIMEOUT)
        finally:
            killer.join()
        assert killed.is_set()


def test_a_missing_server_binary_names_the_package(
    verify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mysql, "SERVERS", (str(verify_dir / "mariadbd"),))
    with pytest.raises(VerifyUnavailable, match=r"server .* not found") as caught:
        mysql.require(vm="lab")
    assert caught.value.hint is not None and "mariadb-server-core" in caught.value.hint
    assert caught.value.exit_code == 4
    monkeypatch.undo()
    monkeypatch.setattr(mysql, "CHECKS", (str(verify_dir / "mariadb-check"),))
    refused = pytest.raises(VerifyUnavailable, match="mariadb-check")
    with refused as caught, scratch.workspace(verify_dir) as work, \
            mysql.server(work, vm="lab", timeout=60):  # fmt: skip
        pytest.fail("a server started without mariadb-check")
    assert caught.value.hint is not None and "mariadb-client-core" in caught.value.hint


def test_a_server_that_will_not_start_is_verify_unavailable_with_its_log_line(
    verify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mysql, "SERVER_OPTIONS", (*mysql.SERVER_OPTIONS, "--no-such-option"))
    refused = pytest.raises(VerifyUnavailable, match=r"would not start.*no-such-option")
    with refused, scratch.workspace(verify_dir) as work, mysql.server(work, vm="lab", timeout=120):
        pytest.fail("the server started")


#: a shell escape of the hostile dump that the test can see run (as a process of nobody)
SLEEP = "3.21"


def _hostile_sql(markers: dict[str, Path]) -> bytes:
    lines = [f"\\! touch {markers['bang']}", f"system touch {markers['system']}",
             f"\\! sleep {SLEEP}", "CREATE DATABASE hostile;",
             "-- Dump completed on 2026-01-01"]  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def test_shell_escapes_in_a_dump_never_run_as_root_and_leave_nothing(
    verify_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --sandbox the client refuses them; without it (an older client) they run, as
    nobody in a private /tmp on a read-only system: the marker in root's 0700 folder never
    appears, and neither does the one in a world-writable folder or in /tmp."""
    root_only = tmp_path / "root-only"  # pytest's folders are root's, 0700
    root_only.mkdir(mode=0o700)
    shared = Path(tempfile.mkdtemp(dir="/var/tmp"))
    shared.chmod(0o1777)
    markers = {"bang": root_only / "bang", "system": root_only / "system"}
    source = RestoreSource(tmp_path / "hostile.sql", "none", None, ["hostile"], ["hostile"],
                           "mysqldump")  # fmt: skip
    source.file.write_bytes(_hostile_sql(markers))
    with scratch.workspace(verify_dir) as work, mysql.server(work, vm="lab", timeout=TIMEOUT) as s:
        assert "--sandbox" in s.client.connection
        with pytest.raises(VerifyFailed, match="sandbox mode"):
            mysql.load(s, source, vm="lab", timeout=TIMEOUT)
    assert not any(p.exists() for p in markers.values())

    monkeypatch.setattr(mysql, "_sandbox_option", lambda client: ())
    markers_shared = {"bang": shared / "bang", "system": Path("/tmp") / f"system-{shared.name}"}
    ran: list[int] = []
    for where in (markers, markers_shared):
        source.file.write_bytes(_hostile_sql(where))
        with uids_running(["sleep", SLEEP]) as seen, scratch.workspace(verify_dir) as work, \
                mysql.server(work, vm="lab", timeout=TIMEOUT) as s:  # fmt: skip
            assert "--sandbox" not in s.client.connection
            with contextlib.suppress(VerifyFailed):  # what matters is who ran the lines
                mysql.load(s, source, vm="lab", timeout=TIMEOUT)
        ran += seen
    assert ran, "without --sandbox the client runs the lines"
    assert set(ran) == {65534}
    assert not any(p.exists() for p in [*markers.values(), *markers_shared.values()])
    subprocess.run(["rm", "-rf", str(shared)], check=True)


HOLDER = """
import signal, sys
from pathlib import Path
from typing import Any
from snapcoord.errors import Interrupted
from snapcoord.hooks.databases import mysql as kind
from snapcoord.verify import mysql, scratch

def interrupted(signum, frame):
    raise Interrupted("interrupted by SIGTERM")

signal.signal(signal.SIGTERM, interrupted)
source = kind.prepare_restore(Path(sys.argv[2]), vm="lab")
with scratch.workspace(Path(sys.argv[1])) as work, mysql.server(work, vm="lab", timeout=600) as s:
    print(work, s.process.pid, flush=True)
    mysql.load(s, source, vm="lab", timeout=600)
    print("loaded", flush=True)
"""


def test_sigterm_during_the_load_leaves_no_server_and_no_file(
    dumped: Path, verify_dir: Path
) -> None:
    argv = [sys.executable, "-I", "-c", textwrap.dedent(HOLDER), str(verify_dir), str(dumped)]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    work_text, pid_text = holder.stdout.readline().split()
    work, pid = Path(work_text), int(pid_text)
    deadline = time.monotonic() + 120
    while not (work / "data" / "idoit_data").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    holder.send_signal(signal.SIGTERM)
    rest = holder.stdout.read()
    assert holder.wait(timeout=120) != 0
    assert "loaded" not in rest
    assert not Path(f"/proc/{pid}").exists()
    assert not work.exists()


def test_check_names_a_corrupt_table(verify_dir: Path, tmp_path: Path) -> None:
    source = RestoreSource(tmp_path / "d.sql", "none", None, ["shop"], ["shop"], "mysqldump")
    source.file.write_bytes(
        b"CREATE DATABASE shop; CREATE TABLE shop.items (id INT PRIMARY KEY, name TEXT)"
        b" ENGINE=MyISAM; INSERT INTO shop.items VALUES (1,'a'),(2,'b'),(3,'c');\n"
        b"FLUSH TABLES;\n-- Dump completed\n"
    )
    with scratch.workspace(verify_dir) as work, mysql.server(work, vm="lab", timeout=TIMEOUT) as s:
        mysql.load(s, source, vm="lab", timeout=TIMEOUT)
        mysql.check(s, vm="lab", timeout=TIMEOUT)  # healthy: passes
        s.client.query(s.transport, "FLUSH TABLES;", timeout=60)
        index = work / "data" / "shop" / "items.MYI"
        data = bytearray(index.read_bytes())
        data[0:64] = b"\xff" * 64  # the index header
        index.write_bytes(bytes(data))
        with pytest.raises(VerifyFailed, match=r"mariadb-check reports: shop\.items"):
            mysql.check(s, vm="lab", timeout=TIMEOUT)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_default_dump_of_all_databases_verifies_in_every_codec(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, verify_dir: Path, tmp_path: Path, compression: str
) -> None:
    """The default dump holds the guest's ``mysql`` database too: loading its account tables
    into the throwaway server must not lock the verify out of it."""
    vm = vm_config(ssh_guest, tmp_path / "store", compression=compression)
    assert vm.guest is not None
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        _, folder = take_dump(transport, vm, tmp_path / "store")
    finally:
        transport.close()
    source = mysql_kind.prepare_restore(folder, vm="lab")
    assert "mysql" in source.databases and source.compression == compression
    recorded = recorded_figures(source)
    databases = sorted({name.split(".", 1)[0] for name in recorded})
    assert set(IDOIT) <= set(databases)
    assert verified_figures(source, verify_dir, databases) == recorded


COLUMN_KINDS = """
DROP DATABASE IF EXISTS vsums; CREATE DATABASE vsums CHARACTER SET utf8mb4;
CREATE TABLE vsums.kinds (
  id INT PRIMARY KEY,
  f FLOAT, d DOUBLE, n DECIMAL(20,6), bits BIT(5),
  b BLOB, vb VARBINARY(16), bin BINARY(4),
  t1 VARCHAR(40) COLLATE utf8mb4_general_ci, t2 VARCHAR(40) COLLATE utf8mb4_unicode_ci,
  l1 VARCHAR(40) CHARACTER SET latin1, j JSON,
  ts TIMESTAMP NULL, dt DATETIME(6), e ENUM('a','b'), s SET('x','y'),
  gv INT AS (id * 2) VIRTUAL, gs VARCHAR(80) AS (CONCAT(t1, '/', t2)) STORED
) ENGINE=InnoDB;
INSERT INTO vsums.kinds (id, f, d, n, bits, b, vb, bin, t1, t2, l1, j, ts, dt, e, s) VALUES
 (1, 0.1, 0.1, 1.5, b'10101', UNHEX('00FF80C3'), UNHEX('DEADBEEF'), 'ab', 'Ünï', 'cødé', 'Müller',
  '{"a": [1, 2.5, "x"]}', '2024-03-31 01:30:00', '2024-01-01 12:00:00.123456', 'b', 'x,y'),
 (2, 3.14159274, 2.718281828459045, -0.000001, b'0', '', '', '', '', '', '', '{}',
  '2024-10-27 02:30:00', NULL, 'a', ''),
 (3, 1e-7, 1.7976931348623157e308, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL);
CREATE TABLE vsums.empty_text (id INT PRIMARY KEY, v VARCHAR(10));
CREATE TABLE vsums.null_text (id INT PRIMARY KEY, v VARCHAR(10));
INSERT INTO vsums.empty_text VALUES (1, '');
INSERT INTO vsums.null_text VALUES (1, NULL);
CREATE TABLE vsums.nothing (id INT PRIMARY KEY);
"""


def test_every_column_kind_sums_the_same_after_the_dump_reloads(
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    verify_dir: Path,
    tmp_path: Path,
) -> None:
    """FLOAT/DOUBLE, DECIMAL, BIT, BLOB/BINARY with bytes that are no UTF-8, two collations in
    one row, latin1, JSON, TIMESTAMP (the guest's session in another time zone), generated
    columns: the sums taken in the guest at dump time equal the throwaway server's."""
    lab.mysql_exec(COLUMN_KINDS)
    lab.mysql_exec("SET GLOBAL time_zone = '+05:00'")  # the dump's sessions: not UTC
    try:
        vm = vm_config(ssh_guest, tmp_path / "store", databases=["vsums"])
        assert vm.guest is not None
        transport = shell_transport(vm.guest, vm="lab")
        transport.open()
        try:
            _, folder = take_dump(transport, vm, tmp_path / "store")
        finally:
            transport.close()
    finally:
        lab.mysql_exec("SET GLOBAL time_zone = 'SYSTEM'; DROP DATABASE IF EXISTS vsums")
    source = mysql_kind.prepare_restore(folder, vm="lab")
    recorded = recorded_figures(source)
    assert recorded["vsums.kinds"][0] == 3
    assert recorded["vsums.empty_text"][1] != recorded["vsums.null_text"][1]  # '' is not NULL
    assert verified_figures(source, verify_dir, ["vsums"]) == recorded


def test_a_full_verify_dir_during_the_load_is_verify_unavailable(
    dumped: Path, verify_dir: Path
) -> None:
    """verify_dir on a tmpfs with room for the fresh server (about 160 MB) but not the data."""
    lab.run(["mount", "-t", "tmpfs", "-o", "size=180m,mode=0755", "verify", str(verify_dir)])
    try:
        source = mysql_kind.prepare_restore(dumped, vm="lab")
        with scratch.workspace(verify_dir) as work, \
                mysql.server(work, vm="lab", timeout=TIMEOUT) as s:  # fmt: skip
            with pytest.raises(VerifyUnavailable, match="out of disk space"):
                mysql.load(s, source, vm="lab", timeout=TIMEOUT)
            assert s.alive()
        assert os.listdir(verify_dir) == []
    finally:
        lab.run(["umount", str(verify_dir)])


def test_a_load_that_outlasts_its_timeout_is_verify_unavailable(
    verify_dir: Path, tmp_path: Path
) -> None:
    source = RestoreSource(tmp_path / "slow.sql", "none", None, ["slow"], ["slow"], "mysqldump")
    source.file.write_bytes(b"CREATE DATABASE slow; SELECT SLEEP(60);\n-- Dump completed\n")
    with scratch.workspace(verify_dir) as work, mysql.server(work, vm="lab", timeout=TIMEOUT) as s:
        with pytest.raises(VerifyUnavailable, match="did not finish within 2 s"):
            mysql.load(s, source, vm="lab", timeout=2)
        assert s.alive()


def test_the_measure_in_key_ranges_adds_up_to_the_one_pass_figures(
    dumped: Path, verify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big tables (here: more than 1000 rows) are measured in primary-key ranges on several
    connections; the sums add up to table_sums' one pass, also over holes in the key, a
    negative key, a composite key (never split) and an empty table."""
    monkeypatch.setattr(mysql, "SPLIT_ROWS", 1000)
    monkeypatch.setattr(mysql.os, "cpu_count", lambda: 4)
    source = mysql_kind.prepare_restore(dumped, vm="lab")
    extra = (
        "CREATE DATABASE holes; USE holes;"
        "CREATE TABLE gaps (id BIGINT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB;"
        "INSERT INTO gaps SELECT CAST(seq AS SIGNED) * 7 - 5000, CONCAT('v', seq)"
        " FROM seq_1_to_5000;"
        "DELETE FROM gaps WHERE id % 3 = 0;"
        "CREATE TABLE pair (a INT, b INT, PRIMARY KEY (a, b)) ENGINE=InnoDB;"
        "INSERT INTO pair SELECT seq, seq FROM seq_1_to_3000;"
        "CREATE TABLE nothing (id INT PRIMARY KEY) ENGINE=InnoDB;"
        "ANALYZE TABLE gaps, pair;"
    )
    with scratch.workspace(verify_dir) as work, mysql.server(work, vm="lab", timeout=TIMEOUT) as s:
        mysql.load(s, source, vm="lab", timeout=TIMEOUT)
        s.client.query(s.transport, extra, timeout=TIMEOUT)
        databases = [*IDOIT, "holes"]
        plans = mysql_kind.sum_plans(s.client, s.transport, databases, timeout=TIMEOUT)
        split = {p.name: len(mysql._units(s, p, 4, timeout=TIMEOUT)) for p in plans}
        parallel = mysql.measure(s, databases, vm="lab", timeout=TIMEOUT)
        one_pass = mysql_kind.table_sums(s.client, s.transport, databases, timeout=TIMEOUT)
    assert split["holes.gaps"] > 1 and split["idoit_data.isys_obj"] > 1
    assert split["holes.pair"] == 1 and split["holes.nothing"] == 1
    assert parallel == one_pass
    assert parallel["holes.nothing"] == TableSum(0, "0")
    assert parallel["holes.gaps"].rows == sum((7 * n - 5000) % 3 != 0 for n in range(1, 5001))

"""snapcoord/verify/postgresql.py against the real thing: Debian's PostgreSQL server binaries
run as a throwaway cluster, confined (nobody, no network), loading real pg_dumpall dumps that
snapcoord's dump code took from the lab guest's PostgreSQL (tests/pg_fixture.py).

Every test ends with no process of the user nobody left (the sandbox's /proc shows only its
own processes, and the lab runs none as nobody) and an empty verify folder."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcoord.errors import GuestError, VerifyFailed, VerifyUnavailable
from snapcoord.guest import SshTransport
from snapcoord.hooks.databases import postgresql as pg
from snapcoord.hooks.databases.dumpfile import RestoreSource, TableSum
from snapcoord.verify import postgresql as verify
from snapcoord.verify import scratch
from tests import lab, pg_fixture
from tests.test_postgresql import pg_vm, take_dump
from tests.test_postgresql import transport as transport  # the fixture
from tests.verify_helpers import uids_running

pytestmark = pytest.mark.real

#: a statement that keeps a backend busy (and never waiting on a latch) for hours
BUSY = "SELECT /* snapcoord-slow */ sum(x) FROM (SELECT generate_series(1, 1000000000000) x) s;"
COMPLETE = b"\n--\n-- PostgreSQL database cluster dump complete\n--\n\n"
TIMEOUT = 300.0


def _nobody_processes() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        uid = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Uid:"))
        if uid == str(scratch.NOBODY):
            found.append(f"{entry} {cmdline.decode(errors='replace').strip()}")
    return found


@pytest.fixture
def verify_dir() -> Iterator[Path]:
    """A root-owned 0755 folder nobody can traverse; afterwards it must be empty and no
    process of nobody may be left."""
    lab.require_root()
    assert _nobody_processes() == []
    path = Path(tempfile.mkdtemp(prefix="verify-dir-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
        assert os.listdir(path) == []
        assert _nobody_processes() == []
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


@contextlib.contextmanager
def throwaway(verify_dir: Path) -> Iterator[verify.Server]:
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(scratch.workspace(verify_dir))
        yield stack.enter_context(verify.server(work, vm="lab", timeout=TIMEOUT))


def bare_dump(folder: Path, sql: bytes) -> RestoreSource:
    """A dump file without a manifest (what restore-dump accepts as a file)."""
    folder.mkdir()
    file = folder / "postgresql.sql"
    file.write_bytes(sql + COMPLETE)
    return pg.prepare_restore(file, vm="lab")


def measured_differences(
    source: RestoreSource, measured: dict[str, TableSum]
) -> dict[str, tuple[object, object]]:
    """Tables whose (rows, checksum) differ from what the manifest recorded."""
    rows, sums = source.expected_rows or {}, source.expected_checksums or {}
    expected = {t: TableSum(rows[t], sums.get(t)) for t in rows}
    return {
        t: (expected.get(t), measured.get(t))
        for t in sorted(set(expected) | set(measured))
        if expected.get(t) != measured.get(t)
    }


def _uid(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Uid:"))


# -- a good dump -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_good_dump_loads_and_measures_what_the_manifest_recorded(
    ssh_guest: lab.SshGuest,
    transport: SshTransport,
    pg_shop: pg_fixture.PgShop,
    tmp_path: Path,
    verify_dir: Path,
    compression: str,
) -> None:
    vm = pg_vm(ssh_guest, tmp_path, compression=compression)
    _, folder = take_dump(transport, vm, tmp_path)
    source = pg.prepare_restore(folder, vm="lab")
    databases = json.loads((folder / "manifest.json").read_text())["pg_dumpall"]["databases"]
    assert source.checksum_method == pg.CHECKSUM_METHOD
    verify.require(vm="lab")

    with throwaway(verify_dir) as server:
        # the server: nobody, in a network namespace of its own, a socket in the work folder
        assert _uid(server.pid) == "65534"
        assert os.readlink(f"/proc/{server.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert (server.socket_dir / f".s.PGSQL.{verify.PORT}").is_socket()
        work = server.socket_dir.parent
        assert work.parent == verify_dir
        seconds = verify.load(server, source, vm="lab", timeout=TIMEOUT)
        assert seconds > 0
        measured = verify.measure(server, databases, vm="lab", timeout=TIMEOUT)
        verify.check(server, vm="lab", timeout=TIMEOUT)
        pid = server.pid

    assert measured_differences(source, measured) == {}
    shop = {t for t in measured if t.split(".")[0] in pg_fixture.DATABASES}
    assert {t: measured[t].rows for t in shop} == pg_shop.row_counts
    assert not Path(f"/proc/{pid}").exists()
    assert not work.exists()


def test_a_child_table_whose_columns_move_in_the_reload_sums_the_same(
    ssh_guest: lab.SshGuest,
    transport: SshTransport,
    pg_shop: pg_fixture.PgShop,
    tmp_path: Path,
    verify_dir: Path,
) -> None:
    """A parent that gained a column after its child was made: in the guest the child has it
    last, reloaded it comes before the child's own (pg_dump's CREATE TABLE ... INHERITS).
    table_sums builds each row in the order of the column names, so both sides agree."""
    lab.psql(
        "CREATE TABLE public.base (id int);"
        "CREATE TABLE public.child (note text) INHERITS (public.base);"
        "ALTER TABLE public.base ADD COLUMN added int;"
        "INSERT INTO public.child VALUES (1, 'one', 10), (2, 'two', 20);",
        pg_fixture.SHOP,
    )
    columns = ("SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute"
               " WHERE attrelid = 'public.child'::regclass AND attnum > 0;")  # fmt: skip
    assert lab.psql(columns, pg_fixture.SHOP) == ["id,note,added"]
    vm = pg_vm(ssh_guest, tmp_path)
    _, folder = take_dump(transport, vm, tmp_path)
    source = pg.prepare_restore(folder, vm="lab")
    with throwaway(verify_dir) as server:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
        reloaded = server.client.query(server.transport, columns, timeout=60,
                                       database=pg_fixture.SHOP)  # fmt: skip
        measured = verify.measure(server, [pg_fixture.SHOP], vm="lab", timeout=TIMEOUT)
    assert reloaded == ["id,added,note"]  # the columns did move
    child = f"{pg_fixture.SHOP}.public.child"
    assert measured[child] == TableSum(2, (source.expected_checksums or {})[child])
    differences = measured_differences(source, measured)
    assert [t for t in differences if t.startswith(f"{pg_fixture.SHOP}.")] == []


def test_the_parallel_measure_adds_up_to_table_sums_on_one_connection(
    ssh_guest: lab.SshGuest,
    transport: SshTransport,
    pg_shop: pg_fixture.PgShop,
    tmp_path: Path,
    verify_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A big table (split into block ranges: the split size lowered so a lab-sized table is
    big, and more connections than one query's parallel scan has processes) whose rows were
    updated and deleted in the guest before the dump (holes in its heap), an empty table and
    the fixture's small ones: the pieces, measured on several connections, add up to the
    one-pass figures of table_sums and of the manifest; a value changed in one range is a
    difference at that table only."""
    lab.psql(
        "CREATE TABLE public.big (id int PRIMARY KEY, label text, amount numeric, at timestamptz);"
        "INSERT INTO public.big SELECT i, 'row ' || i, i * 1.5, '2026-01-01'::timestamptz"
        " + i * interval '1 minute' FROM generate_series(1, 60000) i;"
        "UPDATE public.big SET label = label || ' updated' WHERE id % 7 = 0;"
        "DELETE FROM public.big WHERE id % 5 = 0 OR id BETWEEN 20000 AND 25000;"
        "CREATE TABLE public.nothing (id int, note text);",
        pg_fixture.SHOP,
    )
    vm = pg_vm(ssh_guest, tmp_path)
    _, folder = take_dump(transport, vm, tmp_path)
    source = pg.prepare_restore(folder, vm="lab")
    databases = json.loads((folder / "manifest.json").read_text())["pg_dumpall"]["databases"]
    big, nothing = f"{pg_fixture.SHOP}.public.big", f"{pg_fixture.SHOP}.public.nothing"
    monkeypatch.setattr(verify, "SPLIT_BYTES", 256 * 1024)
    monkeypatch.setattr(verify, "workers", lambda: 4)  # more than one query's 1 + 2 processes

    with throwaway(verify_dir) as server:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
        units = verify.plan(server, databases, count=4, timeout=TIMEOUT)
        unsplit = verify.plan(server, databases, count=3, timeout=TIMEOUT)
        oid = server.client.query(server.transport, "SELECT 'public.big'::regclass::oid;",
                                  timeout=60, database=pg_fixture.SHOP)  # fmt: skip
        pieces = [u for u in units if u.oid == int(oid[0]) and u.database == pg_fixture.SHOP]
        one_pass = pg.table_sums(server.client, server.transport, databases, timeout=TIMEOUT)
        measured = verify.measure(server, databases, vm="lab", timeout=TIMEOUT)
        server.client.query(server.transport, "UPDATE public.big SET amount = amount + 1"
                            " WHERE id = 31001;", timeout=60, database=pg_fixture.SHOP)  # fmt: skip
        changed = verify.measure(server, databases, vm="lab", timeout=TIMEOUT)

    assert len(pieces) >= 3  # split, the first and last range open-ended
    assert len(unsplit) == len({(u.database, u.oid) for u in units})  # 3: one query's share
    assert pieces[0].first is None and pieces[-1].end is None
    assert all(a.end == b.first for a, b in itertools.pairwise(pieces))
    assert measured == one_pass
    assert measured_differences(source, measured) == {}
    assert measured[big].rows == 44000
    assert measured[nothing] == TableSum(0, "0")
    assert [t for t in changed if changed[t] != measured[t]] == [big]
    assert changed[big].rows == measured[big].rows


# -- bad dumps -------------------------------------------------------------------------------------


def _rewrite_stored_dump(folder: Path, old: bytes, new: bytes) -> None:
    """Change the stored SQL and recompute its sha256 and size in the manifest: the checksum
    of the file no longer tells."""
    dump = folder / "postgresql.sql"
    sql = dump.read_bytes()
    assert sql.count(old) == 1
    dump.write_bytes(sql.replace(old, new))
    manifest_file = folder / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    entry = manifest["files"]["postgresql.sql"]
    entry["sha256"] = hashlib.sha256(dump.read_bytes()).hexdigest()
    entry["size"] = dump.stat().st_size
    manifest_file.write_text(json.dumps(manifest))


def test_one_changed_value_is_a_checksum_mismatch_at_its_table(
    ssh_guest: lab.SshGuest,
    transport: SshTransport,
    pg_shop: pg_fixture.PgShop,
    tmp_path: Path,
    verify_dir: Path,
) -> None:
    vm = pg_vm(ssh_guest, tmp_path, compression="none")
    _, folder = take_dump(transport, vm, tmp_path)
    # a COPY line of public.customers: "17<TAB>customer 17"
    _rewrite_stored_dump(folder, b"\n17\tcustomer 17\n", b"\n17\tcustomer 71\n")
    source = pg.prepare_restore(folder, vm="lab")  # its sha256 matches again
    databases = json.loads((folder / "manifest.json").read_text())["pg_dumpall"]["databases"]

    with throwaway(verify_dir) as server:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
        measured = verify.measure(server, databases, vm="lab", timeout=TIMEOUT)
        verify.check(server, vm="lab", timeout=TIMEOUT)  # the data load fine: only the sum tells

    differences = measured_differences(source, measured)
    table = f"{pg_fixture.SHOP}.public.customers"
    assert list(differences) == [table]
    want, got = differences[table]
    assert isinstance(want, TableSum) and isinstance(got, TableSum)
    assert want.rows == got.rows == pg_shop.row_counts[table]
    assert want.checksum != got.checksum


def test_a_dump_that_does_not_load_fails_with_the_first_error(
    tmp_path: Path, verify_dir: Path
) -> None:
    source = bare_dump(
        tmp_path / "broken",
        b"CREATE DATABASE snapcoord_broken WITH TEMPLATE = template0;\n"
        b"\\connect snapcoord_broken\n"
        b"CREATE TABLE t (id int PRIMARY KEY);\n"
        b"INSERT INTO t VALUES (1), (1);\n"
        b"SELECT * FROM no_such_table;\n",
    )
    with throwaway(verify_dir) as server, pytest.raises(VerifyFailed) as info:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
    assert "duplicate key" in info.value.message and "(+1 more errors)" in info.value.message
    assert info.value.exit_code == 5


def test_a_database_the_load_did_not_create_fails_the_measure(
    tmp_path: Path, verify_dir: Path
) -> None:
    source = bare_dump(tmp_path / "one", b"CREATE DATABASE snapcoord_one;\n")
    with throwaway(verify_dir) as server:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
        with pytest.raises(VerifyFailed, match="'snapcoord_two' is missing"):
            verify.measure(server, ["postgres", "snapcoord_one", "snapcoord_two"], vm="lab",
                           timeout=TIMEOUT)  # fmt: skip


def test_a_dump_of_a_newer_server_than_the_binaries_is_unavailable(
    tmp_path: Path, verify_dir: Path
) -> None:
    source = bare_dump(tmp_path / "newer", b"--\n-- Dumped from database version 99.1\n--\n")
    with throwaway(verify_dir) as server, pytest.raises(VerifyUnavailable) as info:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
    assert "PostgreSQL 99" in info.value.message
    assert "postgresql-99" in (info.value.hint or "")
    assert info.value.exit_code == 4


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        (b"CREATE DATABASE snapcoord_loc WITH TEMPLATE = template0 ENCODING = 'UTF8'"
         b" LOCALE_PROVIDER = libc LOCALE = 'xx_XX.UTF-8';\n", "locale 'xx_XX.UTF-8'"),
        (b"CREATE EXTENSION snapcoord_no_such_extension;\n", "snapcoord_no_such_extension"),
        (b"CREATE TABLESPACE fast OWNER postgres LOCATION '/srv/fast';\n"
         b"CREATE DATABASE snapcoord_ts TABLESPACE fast;\n", "tablespace fast"),
    ],
    ids=["locale", "extension", "tablespace"],
)  # fmt: skip
def test_what_the_coordinator_lacks_is_unavailable_not_a_failed_dump(
    tmp_path: Path, verify_dir: Path, sql: bytes, named: str
) -> None:
    source = bare_dump(tmp_path / "needs", b"\\connect template1\n" + sql)
    with throwaway(verify_dir) as server, pytest.raises(VerifyUnavailable) as info:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
    assert named in info.value.message
    assert not Path("/srv/fast").exists()


# -- the coordinator's faults ----------------------------------------------------------------------


def _wait_for(predicate: object, seconds: float = 60.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT /* snapcoord-slow */ pg_sleep(120);",
        # busy without waiting on a latch: this backend does not notice the postmaster's death
        # and runs on after it, until the server's stop kills it by its network namespace
        BUSY,
    ],
    ids=["sleeping", "busy"],
)
def test_a_server_that_dies_during_the_load_is_unavailable(
    tmp_path: Path, verify_dir: Path, statement: str
) -> None:
    source = bare_dump(
        tmp_path / "slow",
        b"CREATE DATABASE snapcoord_slow;\n\\connect snapcoord_slow\n"
        b"CREATE TABLE t (id int);\n" + statement.encode() + b"\nINSERT INTO t VALUES (1);\n",
    )
    outcome: list[BaseException] = []

    def loading(server: verify.Server) -> None:
        try:
            verify.load(server, source, vm="lab", timeout=TIMEOUT)
        except BaseException as exc:
            outcome.append(exc)

    with throwaway(verify_dir) as server:
        loader = threading.Thread(target=loading, args=(server,))
        loader.start()

        def running() -> bool:
            lines = server.client.query(
                server.transport,
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND query LIKE '%snapcoord-slow%' AND state = 'active';",
                timeout=60,
            )
            return lines == ["1"]

        _wait_for(running)
        os.kill(server.pid, signal.SIGKILL)  # the postmaster alone
        with pytest.raises(VerifyUnavailable, match="stopped during the measurement"):
            verify.measure(server, ["postgres"], vm="lab", timeout=TIMEOUT)
    loader.join(timeout=120)
    assert not loader.is_alive()
    (error,) = outcome
    assert isinstance(error, VerifyUnavailable)
    assert "stopped during the load" in error.message


HOLDER = """
import signal, sys
from pathlib import Path
from snapcoord.errors import Interrupted
from snapcoord.hooks.databases import postgresql as pg
from snapcoord.verify import postgresql as verify, scratch

def interrupted(signum, frame):  # what the CLI does on SIGTERM
    raise Interrupted("interrupted by SIGTERM")

signal.signal(signal.SIGTERM, interrupted)
source = pg.prepare_restore(Path(sys.argv[2]), vm="lab")
with scratch.workspace(Path(sys.argv[1])) as work:
    with verify.server(work, vm="lab", timeout=300) as server:
        print(work, server.pid, flush=True)
        verify.load(server, source, vm="lab", timeout=300)
"""


def test_sigterm_during_the_load_stops_the_server_and_removes_every_file(
    tmp_path: Path, verify_dir: Path
) -> None:
    source = bare_dump(tmp_path / "busy", b"CREATE DATABASE snapcoord_busy;\n\\connect "
                       b"snapcoord_busy\n" + BUSY.encode() + b"\n")  # fmt: skip
    argv = [sys.executable, "-I", "-c", HOLDER, str(verify_dir), str(source.file)]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        work_name, pid = holder.stdout.readline().split()
        work = Path(work_name)
        psql = [str(verify.binaries(vm="lab").bindir / "psql"), "-X", "-A", "-t",
                f"--host={work / 'socket'}", "--username=postgres", "--dbname=postgres", "-c",
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND query LIKE '%snapcoord-slow%' AND state = 'active';"]  # fmt: skip

        def busy() -> bool:
            out = subprocess.run(scratch.confined(psql, work=work), capture_output=True, text=True,
                                 timeout=60)  # fmt: skip
            return out.stdout.strip() == "1"

        _wait_for(busy)
        holder.send_signal(signal.SIGTERM)
        _, err = holder.communicate(timeout=120)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode != 0 and "Interrupted" in err
    assert not Path(f"/proc/{pid}").exists()
    assert not work.exists()  # and the fixture: no process of nobody, verify_dir empty


def test_a_full_verify_dir_during_the_load_is_unavailable(tmp_path: Path, verify_dir: Path) -> None:
    """verify_dir on a tmpfs with room for a fresh cluster (about 40 MB) but not the data."""
    lab.run(["mount", "-t", "tmpfs", "-o", "size=90m,mode=0755", "verify", str(verify_dir)])
    try:
        source = bare_dump(
            tmp_path / "big",
            b"CREATE DATABASE snapcoord_big;\n\\connect snapcoord_big\n"
            b"CREATE TABLE t AS SELECT g, repeat('x', 1000) AS pad"
            b" FROM generate_series(1, 200000) g;\n",
        )
        # extending the table's file fails (an ERROR), or writing WAL (a PANIC: the server
        # stops): either is the coordinator's
        full = pytest.raises(VerifyUnavailable, match="out of disk space")
        with throwaway(verify_dir) as server, full:
            verify.load(server, source, vm="lab", timeout=TIMEOUT)
        assert os.listdir(verify_dir) == []
    finally:
        lab.run(["umount", str(verify_dir)])


def test_a_load_that_outlasts_its_timeout_is_unavailable(tmp_path: Path, verify_dir: Path) -> None:
    source = bare_dump(tmp_path / "slow", b"SELECT pg_sleep(60);\n")
    with throwaway(verify_dir) as server:
        with pytest.raises(VerifyUnavailable, match="timed out after 2 s"):
            verify.load(server, source, vm="lab", timeout=2)
        assert server.alive()


def test_a_measure_that_outlasts_its_timeout_is_unavailable(
    tmp_path: Path, verify_dir: Path
) -> None:
    source = bare_dump(tmp_path / "locked", b"CREATE TABLE public.t (id int);\n")
    with throwaway(verify_dir) as server:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
        holder = subprocess.Popen(  # another session holds the table for a minute
            scratch.confined([str(server.binaries.bindir / "psql"), "-X", "-q",
                              f"--host={server.socket_dir}", "--username=postgres", "-c",
                              "BEGIN; LOCK TABLE public.t; SELECT pg_sleep(60);"],
                             work=server.socket_dir.parent),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            held = ("SELECT count(*) FROM pg_locks WHERE relation = 'public.t'::regclass"
                    " AND mode = 'AccessExclusiveLock' AND granted;")  # fmt: skip
            _wait_for(lambda: server.client.query(server.transport, held, timeout=60) == ["1"])
            with pytest.raises(VerifyUnavailable, match="did not finish in time"):
                verify.measure(server, ["postgres"], vm="lab", timeout=2)
        finally:
            holder.kill()
            holder.wait()


def test_a_connection_of_the_parallel_measure_past_its_timeout_is_unavailable(
    tmp_path: Path, verify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections, each measuring a table; the second table is locked by another session
    once the measurement is planned: that connection's psql times out in its thread, which is
    the verify's timeout, not a failed dump."""
    source = bare_dump(
        tmp_path / "two",
        b"CREATE TABLE public.t1 (id int);\nCREATE TABLE public.t2 (id int);\n"
        b"INSERT INTO public.t1 VALUES (1);\n",
    )
    monkeypatch.setattr(verify, "workers", lambda: 2)
    holders: list[subprocess.Popen[bytes]] = []
    planned: list[list[verify.Unit]] = []
    real_plan = verify.plan

    with throwaway(verify_dir) as server:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)

        def plan_then_lock(*args: object, **kwargs: object) -> list[verify.Unit]:
            units = real_plan(*args, **kwargs)  # type: ignore[arg-type]
            planned.append(units)
            holders.append(subprocess.Popen(  # another session holds t2 for a minute
                scratch.confined([str(server.binaries.bindir / "psql"), "-X", "-q",
                                  f"--host={server.socket_dir}", "--username=postgres", "-c",
                                  "BEGIN; LOCK TABLE public.t2; SELECT pg_sleep(60);"],
                                 work=server.socket_dir.parent),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            held = ("SELECT count(*) FROM pg_locks WHERE relation = 'public.t2'::regclass"
                    " AND mode = 'AccessExclusiveLock' AND granted;")  # fmt: skip
            _wait_for(lambda: server.client.query(server.transport, held, timeout=60) == ["1"])
            return units

        monkeypatch.setattr(verify, "plan", plan_then_lock)
        try:
            with pytest.raises(VerifyUnavailable, match="did not finish in time"):
                verify.measure(server, ["postgres"], vm="lab", timeout=3)
        finally:
            for holder in holders:
                holder.kill()
                holder.wait()
    assert len(planned) == 1 and len(planned[0]) == 2  # one table per connection


def test_missing_or_untrusted_binaries_are_unavailable_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab.require_root()
    root = tmp_path / "postgresql"
    bindir = root / "15" / "bin"
    bindir.mkdir(parents=True)
    monkeypatch.setattr(verify, "BIN_ROOT", root)
    with pytest.raises(VerifyUnavailable) as info:
        verify.require(vm="lab")
    assert f"{bindir}/initdb" in info.value.message
    assert "postgresql-15" in (info.value.hint or "")

    # every program there, but one of them writable by others: not used
    for program in verify.PROGRAMS:
        shutil.copy(Path("/usr/lib/postgresql/15/bin") / program, bindir / program)
    (bindir / "psql").chmod(0o777)
    with pytest.raises(VerifyUnavailable, match="psql"):
        verify.require(vm="lab")
    (bindir / "psql").chmod(0o755)
    verify.require(vm="lab")
    assert verify.binaries(vm="lab") == verify.Binaries(bindir, 15)

    # a newer major's client package alone (psql, no server): the newest complete set is used
    client_only = root / "16" / "bin"
    client_only.mkdir(parents=True)
    shutil.copy(bindir / "psql", client_only / "psql")
    assert verify.binaries(vm="lab") == verify.Binaries(bindir, 15)
    (bindir / "initdb").unlink()
    with pytest.raises(VerifyUnavailable) as info:
        verify.require(vm="lab")
    assert f"{client_only}/initdb" in info.value.message  # the newest major's gap is named


# -- a hostile dump ------------------------------------------------------------------------------


#: a shell escape of the hostile dump that the test can see run (a process and its uid)
SLEEP = "3.33"


def test_shell_escapes_in_a_dump_run_as_nobody_without_network_and_leave_nothing(
    tmp_path: Path, verify_dir: Path
) -> None:
    """psql's ``\\!`` lines and the server's ``COPY ... TO PROGRAM`` run as nobody, in a
    network namespace with only ``lo``, on a read-only system with a /tmp of their own: what
    they write in the coordinator's /tmp (here a folder anyone may write in) never lands; the
    server can write only in its own folders of the work folder."""
    root_probe = Path(f"/root/snapcoord-verify-probe-{os.getpid()}")
    drop = Path(tempfile.mkdtemp(prefix="verify-drop-", dir="/tmp"))
    drop.chmod(0o777)  # anyone may write here: nothing the dump runs may land in it
    try:
        with uids_running(["sleep", SLEEP]) as ran, throwaway(verify_dir) as server:
            program_out = server.data_dir / "server-program"  # the server's own folder
            only_lo = "grep -q -v -e '|' -e '^ *lo:' /proc/net/dev"  # another device: exit 0
            source = bare_dump(
                tmp_path / "hostile",
                f"\\! touch {root_probe}\n"
                f"\\! id -u > {drop}/psql-escape\n"
                f"\\! {only_lo} || sleep {SLEEP}\n"
                f"COPY (SELECT 1) TO PROGRAM "
                f"'id -u > {drop}/server-program; id -u > {program_out}';\n".encode(),
            )
            verify.load(server, source, vm="lab", timeout=TIMEOUT)
            assert program_out.read_text().strip() == "65534"
        assert not root_probe.exists()
        assert sorted(os.listdir(drop)) == []
        assert ran, "the escape that sleeps when lo is the only network device did not run"
        assert set(ran) == {65534}
    finally:
        root_probe.unlink(missing_ok=True)
        shutil.rmtree(drop)


def test_measure_and_check_run_only_pg_catalog_functions(tmp_path: Path, verify_dir: Path) -> None:
    """A dump that puts a schema of its own first in a database's search_path, with an md5()
    that would count every row as the same: table_sums still calls pg_catalog's."""
    source = bare_dump(
        tmp_path / "shadow",
        b"CREATE DATABASE snapcoord_shadow;\n"
        b"ALTER DATABASE snapcoord_shadow SET search_path = evil, pg_catalog, public;\n"
        b"\\connect snapcoord_shadow\n"
        b"CREATE SCHEMA evil;\n"
        b"CREATE FUNCTION evil.md5(text) RETURNS text LANGUAGE sql"
        b" AS $$SELECT '00000000'::text$$;\n"
        b"CREATE TABLE public.t (id int);\nINSERT INTO public.t VALUES (1), (2);\n",
    )
    with throwaway(verify_dir) as server:
        verify.load(server, source, vm="lab", timeout=TIMEOUT)
        measured = verify.measure(server, ["snapcoord_shadow"], vm="lab", timeout=TIMEOUT)
        (shadowed,) = server.client.query(
            server.transport, "SELECT md5('x');", timeout=60, database="snapcoord_shadow"
        )
        verify.check(server, vm="lab", timeout=TIMEOUT)
    assert shadowed == "00000000"  # the planted function is what an unqualified call finds
    (total,) = measured.values()
    by_hand = sum(int(hashlib.md5(f"({i})".encode()).hexdigest()[:8], 16) for i in (1, 2))
    assert total == TableSum(2, str(by_hand))


def test_queries_of_a_stopped_server_raise_guest_errors_that_verify_translates(
    tmp_path: Path, verify_dir: Path
) -> None:
    with throwaway(verify_dir) as server:
        server.process.send_signal(signal.SIGINT)
        server.process.wait(timeout=60)
        with pytest.raises(GuestError):
            server.client.query(server.transport, "SELECT 1;", timeout=60)
        with pytest.raises(VerifyUnavailable, match="stopped during the check"):
            verify.check(server, vm="lab", timeout=TIMEOUT)


def test_an_unready_server_is_unavailable_and_leaves_nothing(
    verify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab.require_root()
    monkeypatch.setattr(verify, "SETTINGS", (*verify.SETTINGS, "shared_buffers=1TB"))
    with pytest.raises(VerifyUnavailable, match="did not start") as info, throwaway(verify_dir):
        pass
    assert "memory" in info.value.message or "shared" in info.value.message, info.value.message

"""The parallel, consistent MySQL dump ([vms.X.dump] threads) and its parallel restore, on the
real loopback SSH guest and the lab MariaDB (hooks/databases/mysql_parallel.py)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord import store
from snapcoord.config import VMConfig
from snapcoord.errors import ConfigError, ExitCode, PreflightError
from snapcoord.guest import ExecTransport, shell_transport
from snapcoord.hooks.databases import dumpfile, mysql
from snapcoord.plans.restore import DumpSource, restore_dump
from tests import lab
from tests.idoit_fixture import DATABASES, IdoitDB
from tests.test_mysqldump import (
    _wait,
    guest_processes,
    make_config,
    slow_dump_config,
    take_dump,
    vm_config,
)
from tests.verify_helpers import recorded_figures, verified_figures, verify_folder

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


# -- consistency under a concurrent writer ----------------------------------------------------

CONSIST = "snapcoord_consist"


@pytest.fixture
def writer(idoit_db: IdoitDB) -> Iterator[Any]:
    """Two tables that one transaction after another updates together (a stored procedure
    in a loop, in the guest's server): at any consistent view their sums are equal."""
    lab.mysql_exec(
        f"DROP DATABASE IF EXISTS {CONSIST}; CREATE DATABASE {CONSIST};"
        f"CREATE TABLE {CONSIST}.a (id INT PRIMARY KEY, v BIGINT NOT NULL) ENGINE=InnoDB;"
        f"CREATE TABLE {CONSIST}.b (id INT PRIMARY KEY, v BIGINT NOT NULL) ENGINE=InnoDB;"
        f"INSERT INTO {CONSIST}.a VALUES (1, 0), (2, 0); INSERT INTO {CONSIST}.b VALUES (1, 0);"
    )
    lab.mysql_exec(
        "DELIMITER //\n"
        f"CREATE PROCEDURE {CONSIST}.w() BEGIN WHILE 1 DO START TRANSACTION;"
        f" UPDATE {CONSIST}.a SET v = v + 1 WHERE id = 1;"
        f" UPDATE {CONSIST}.b SET v = v + 1 WHERE id = 1; COMMIT; END WHILE; END //\n"
        "DELIMITER ;\n"
    )
    process = subprocess.Popen(
        lab.mysql_argv(None, "--unbuffered"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(
        f"SELECT CONNECTION_ID(); SET SESSION innodb_lock_wait_timeout = 600;"
        f" CALL {CONSIST}.w();\n".encode()
    )
    process.stdin.flush()
    connection = int(process.stdout.readline())

    def committed() -> int:
        return int(lab.mysql_rows(f"SELECT v FROM {CONSIST}.b WHERE id = 1")[0][0])

    assert _wait(lambda: committed() > 50), "the writer does not commit"
    try:
        yield committed
    finally:
        lab.mysql_exec(f"KILL {connection}", check=False)
        process.stdin.close()
        process.wait(timeout=30)
        lab.mysql_exec(f"DROP DATABASE IF EXISTS {CONSIST}")


def _sums_after_load(folder: Path, scratch: lab.ScratchMariaDB) -> tuple[int, int]:
    scratch.reset()
    for name in sorted(os.listdir(folder)):
        if name.startswith("mysql.") and name.endswith(".sql"):
            loaded = scratch.load(folder / name)
            assert loaded.returncode == 0, loaded.stderr
    rows = lab.mysql_rows(
        f"SELECT (SELECT SUM(v) FROM {CONSIST}.a), (SELECT SUM(v) FROM {CONSIST}.b)",
        scratch.socket,
    )
    return int(rows[0][0]), int(rows[0][1])


def test_parts_agree_while_a_writer_commits_to_two_tables_and_the_lock_is_gone_after(
    ssh_guest: lab.SshGuest,
    writer: Any,
    scratch_mariadb: lab.ScratchMariaDB,
    transport_for: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = vm_config(ssh_guest, tmp_path, databases=[CONSIST], compression="none", threads=2)
    transport = transport_for(vm)
    before = writer()
    _, folder = take_dump(transport, vm, tmp_path, "snap-c")
    section = store.verify(folder)["mysqldump"]
    # one table in each part: two sessions, two snapshots
    assert [p["tables"] for p in section["parts"]] == [
        [f"{CONSIST}.a"], [f"{CONSIST}.b"], [],
    ]  # fmt: skip
    assert section["lock"]["until"] == "every part ended"
    a, b = _sums_after_load(folder, scratch_mariadb)
    assert a == b > before  # one view: the writer's transactions are whole in both parts
    assert lock_free() and no_lock_session()
    after = writer()
    assert _wait(lambda: writer() > after), "the writer is blocked after the dump"

    # the control: without the read lock the two sessions' views differ (the test can tell)
    monkeypatch.setitem(mysql.PAUSE_METHODS, "ftwrl", ("DO 0",))
    differed = False
    for attempt in range(6):
        _, unlocked = take_dump(transport, vm, tmp_path, f"snap-u{attempt}")
        a, b = _sums_after_load(unlocked, scratch_mariadb)
        if a != b:
            differed = True
            break
    assert differed, "without the lock the parts always agreed: the test proves nothing"


def test_a_part_killed_mid_stream_fails_the_run_cleanly_and_releases_everything(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    vm = slow_dump_config(ssh_guest, tmp_path, threads=2)
    transport = transport_for(vm)
    plan = mysql.preflight(transport, vm="lab", guest=vm.guest, options=vm.dump)
    assert plan.threads == 2
    run = store.RunDir.begin(tmp_path, "lab", "snap-k")
    killed: list[int] = []

    def killer() -> None:
        def streaming() -> bool:
            parts = list(run.path.glob(".mysql.part*.part"))
            return len(parts) == 2 and all(p.stat().st_size > 0 for p in parts)

        if _wait(streaming, 60):
            # a table part's mysqldump, not the objects part's (--no-data): which one started
            # first, and so has the lowest PID, depends on the threads
            pids = [p for p in guest_processes(ssh_guest) if "--no-data" not in _cmdline(p)]
            if pids:
                os.kill(min(pids), 9)
                killed.append(min(pids))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(dumpfile.DumpFailed, match=r"parallel mysqldump failed: mysql\.part0[12]"):
        mysql.dump(transport, vm="lab", guest=vm.guest, options=vm.dump, run_dir=run, plan=plan)
    thread.join()
    assert killed
    failed = tmp_path / "lab" / "snap-k.failed"
    assert failed.is_dir() and not (tmp_path / "lab" / "snap-k").exists()
    assert any(p.name.endswith(".incomplete") for p in failed.iterdir())
    assert store.list_dumps(tmp_path, "lab") == []
    assert _wait(lambda: not guest_processes(ssh_guest)), "a part kept running in the guest"
    assert lock_free() and no_lock_session()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class StreamHook:
    """The VM's transport, with each dump stream's keyword arguments passed through
    :meth:`change` first (``stream``: 1 for the first stream started); ``seconds`` is the
    wrapper's delay or pause."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds
        self.streams = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run_streaming(self, argv: Any, **kwargs: Any) -> Any:
        self.streams += 1
        return self.inner.run_streaming(argv, **self.change(self.streams, kwargs))

    def change(self, stream: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs


class SlowReader(StreamHook):
    """Every dump stream read slowly (``seconds`` per chunk received): the guest's mysqldump
    waits on a full pipe, as behind a slow link."""

    def change(self, stream: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        consume = kwargs.get("consume")
        if consume is not None:

            def slowly(chunk: bytes) -> None:
                time.sleep(self.seconds)
                consume(chunk)

            kwargs["consume"] = slowly
        return kwargs


def test_writes_wait_while_the_parts_stream_and_go_on_once_they_ended(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    """The read lock lasts the whole parallel dump (the server cannot tell the parts' sessions
    from another of the same user): behind a slow reader, a write waits while the parts
    stream, and commits once the dump ended."""
    vm = slow_dump_config(ssh_guest, tmp_path, threads=2)
    transport = SlowReader(transport_for(vm), 0.1)
    plan = mysql.preflight(transport, vm="lab", guest=vm.guest, options=vm.dump)
    run = store.RunDir.begin(tmp_path, "lab", "snap-l")
    seen: dict[str, Any] = {}

    def writer() -> None:
        def streaming() -> bool:
            parts = list(run.path.glob(".mysql.part*.part"))
            return len(parts) == 2 and all(p.stat().st_size > 0 for p in parts)

        if _wait(streaming, 60):
            seen["committed"] = lock_free()  # waits up to 2 s for a lock
            seen["still_streaming"] = sorted(p.name for p in run.path.glob(".mysql.part*.part"))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    result = mysql.dump(transport, vm="lab", guest=vm.guest, options=vm.dump, run_dir=run,
                        plan=plan)  # fmt: skip
    thread.join()
    assert len(seen["still_streaming"]) == 2, "the parts had ended: the test proves nothing"
    assert seen["committed"] is False, "a write committed while the parts streamed"
    assert lock_free() and no_lock_session()
    lock = run.sections[mysql.SECTION]["lock"]
    assert lock["until"] == "every part ended"
    assert lock["held_seconds"] > result.seconds / 2


@pytest.mark.parametrize("streamed", [1, 256 * 1024])
def test_a_connection_cut_mid_part_fails_the_run_cleanly_and_releases_everything(
    streamed: int,
    ssh_guest: lab.SshGuest,
    idoit_db: IdoitDB,
    transport_for: Any,
    tmp_path: Path,
) -> None:
    """The SSH connection (the ControlMaster every part streams over, the lock's session too)
    dies once every part has stored ``streamed`` bytes: at the first bytes, mostly while the
    read lock still waits for the parts' snapshots; later, in the middle of the table data.
    Either way the run fails with one error, keeps nothing as a dump, and leaves no part
    process and no lock in the guest."""
    vm = slow_dump_config(ssh_guest, tmp_path, threads=2)
    transport = SlowReader(transport_for(vm), 0.02)  # still streaming at the cut
    plan = mysql.preflight(transport, vm="lab", guest=vm.guest, options=vm.dump)
    assert plan.threads == 2
    run = store.RunDir.begin(tmp_path, "lab", "snap-c")
    cut: list[int] = []

    def cutter() -> None:
        def streaming() -> bool:
            parts = list(run.path.glob(".mysql.part*.part"))
            return len(parts) == 2 and all(p.stat().st_size >= streamed for p in parts)

        if _wait(streaming, 60):
            cut.extend(lab.cut_server_side(ssh_guest))

    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    with pytest.raises(dumpfile.DumpFailed) as failed_dump:
        mysql.dump(transport, vm="lab", guest=vm.guest, options=vm.dump, run_dir=run, plan=plan)
    thread.join()
    assert cut, "no sshd child served the connection"
    # which stream notices the cut first varies: a table part, the objects part (it streams
    # over the same connection at the same time; seen in CI), or the lock's session still
    # waiting for the parts' snapshots (a part's mysqldump starts streaming before the others
    # opened)
    assert re.fullmatch(
        r"parallel mysqldump failed: (mysql\.(part0[12]|objects)\.sql\.gz: .+|the read lock for a "
        r"consistent parallel dump failed: .+the connection to the guest was lost)",
        failed_dump.value.message,
    ), failed_dump.value.message
    assert failed_dump.value.hint is not None
    assert failed_dump.value.hint.startswith("nothing valid was stored; the lock was released")
    failed = tmp_path / "lab" / "snap-c.failed"
    assert failed.is_dir() and not (tmp_path / "lab" / "snap-c").exists()
    assert store.list_dumps(tmp_path, "lab") == []
    assert _wait(lambda: not guest_processes(ssh_guest)), "a part kept running in the guest"
    assert lock_free() and no_lock_session()


def test_a_part_that_fails_while_the_lock_is_held_releases_it(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    # a table the server cannot read (a view over a dropped table is the i-doit fixture's
    # way): every part that dumps it fails at once, under the lock
    vm = vm_config(ssh_guest, tmp_path, databases=IDOIT, compression="zstd", threads=2)
    transport = transport_for(vm)
    plan = mysql.preflight(transport, vm="lab", guest=vm.guest, options=vm.dump)
    run = store.RunDir.begin(tmp_path, "lab", "snap-f")
    from tests import idoit_fixture

    idoit_fixture.add_broken_view()
    try:
        with pytest.raises(dumpfile.DumpFailed, match="parallel mysqldump failed"):
            mysql.dump(transport, vm="lab", guest=vm.guest, options=vm.dump, run_dir=run,
                       plan=plan)  # fmt: skip
    finally:
        idoit_fixture.remove_broken_view()
    assert (tmp_path / "lab" / "snap-f.failed").is_dir()
    assert _wait(lambda: not guest_processes(ssh_guest)), "a part kept running in the guest"
    assert lock_free() and no_lock_session()


# -- threads = "auto" and bad values ------------------------------------------------------------


def test_auto_is_one_stream_on_small_data_and_the_cores_above_the_threshold(
    ssh_guest: lab.SshGuest,
    idoit_db: IdoitDB,
    transport_for: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = vm_config(ssh_guest, tmp_path, databases=IDOIT, compression="zstd")
    assert vm.dump.threads == "auto"  # the default
    transport = transport_for(vm)
    plan = mysql.preflight(transport, vm="lab", guest=vm.guest, options=vm.dump)
    assert plan.data_bytes < mysql.PARALLEL_MIN_BYTES and plan.threads == 1
    result, folder = take_dump(transport, vm, tmp_path, "snap-small")
    section = store.verify(folder)["mysqldump"]
    assert section["format"] == "single" and section["file"] == "mysql.sql.zst"
    assert "parts" not in section and result.parts == []

    monkeypatch.setattr(mysql, "PARALLEL_MIN_BYTES", 1)  # the i-doit data is "large" now
    cores = int(subprocess.run(["nproc"], capture_output=True, check=True, text=True).stdout)
    plan = mysql.preflight(transport, vm="lab", guest=vm.guest, options=vm.dump)
    assert plan.threads == min(cores, 8) and plan.threads_note is None
    if cores > 1:
        _, folder = take_dump(transport, vm, tmp_path, "snap-large")
        section = store.verify(folder)["mysqldump"]
        assert section["format"] == "parallel" and section["threads"] == min(cores, 8)


def test_resolve_threads_caps_at_eight_and_keeps_one_stream_over_the_agent() -> None:
    from dataclasses import replace

    guest = vm_config_guest()
    big = mysql.PARALLEL_MIN_BYTES
    assert mysql.resolve_threads("auto", cores=32, data_bytes=big, guest=guest, vm="v") == (8, None)
    assert mysql.resolve_threads("auto", cores=4, data_bytes=big - 1, guest=guest, vm="v") == (
        1, None,
    )  # fmt: skip
    assert mysql.resolve_threads(3, cores=1, data_bytes=0, guest=guest, vm="v") == (3, None)
    agent = replace(guest, transport="agent", dump_transport="agent")
    threads, note = mysql.resolve_threads(4, cores=4, data_bytes=big, guest=agent, vm="v")
    assert threads == 1 and note is not None and "dump_transport = 'ssh'" in note
    assert mysql.resolve_threads("auto", cores=4, data_bytes=big, guest=agent, vm="v") == (1, None)
    over_ssh = replace(agent, dump_transport="ssh")
    assert mysql.resolve_threads(4, cores=4, data_bytes=0, guest=over_ssh, vm="v") == (4, None)


def vm_config_guest() -> Any:
    from snapcoord.config import parse_config

    raw = {
        "defaults": {"store": "/tmp/x"},
        "hypervisors": {"lab": {"type": "libvirt", "uri": "test:///default"}},
        "vms": {"v": {"hypervisor": "lab", "guest": {"host": "h", "dump": True}}},
    }
    guest = parse_config(raw).vm("v").guest
    assert guest is not None
    return guest


@pytest.mark.parametrize("value", [0, 9, -1, "many", "", True, 2.5, [2]])
def test_a_bad_threads_value_is_one_config_line(value: Any) -> None:
    from snapcoord.config import parse_config

    raw = {
        "defaults": {"store": "/tmp/x"},
        "hypervisors": {"lab": {"type": "libvirt", "uri": "test:///default"}},
        "vms": {"v": {"hypervisor": "lab", "dump": {"threads": value}}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    assert "vms.v.dump.threads" in text and 'must be "auto" or an integer 1-8' in text
    assert "\n" not in text.strip() or text.count("threads") == 1


# -- restore-dump, verify and the documented commands --------------------------------------------


@pytest.fixture
def parallel_dumped(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, tmp_path: Path
) -> Iterator[tuple[Any, Path]]:
    """A config for the loopback guest and a parallel (threads = 3) dump of the pristine i-doit
    databases."""
    config = make_config(
        ssh_guest, tmp_path / "store", databases=IDOIT, compression="zstd", threads=3
    )
    vm = config.vm("lab")
    assert vm.guest is not None
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        _, folder = take_dump(transport, vm, config.store, "snap-p")
    finally:
        transport.close()
    assert store.verify(folder)["mysqldump"]["format"] == "parallel"
    yield config, folder


def test_restore_dump_of_a_parallel_dump_is_exact_by_checksum(
    parallel_dumped: tuple[Any, Path], idoit_db: IdoitDB, guest_services: lab.GuestServices
) -> None:
    config, _ = parallel_dumped
    idoit_db.mutate_schema_for_errno150()  # a child table must be dropped first (errno 150)
    idoit_db.mutate_data()
    assert not idoit_db.is_pristine()

    result = restore_dump(config, "lab", source=DumpSource(snapshot="snap-p"))

    assert result.ok, [str(f) for f in result.failures]
    assert idoit_db.is_pristine()  # checksums of every table and the schema fingerprint
    assert result.values["dropped"] == IDOIT
    assert ("drop databases and load dump", True) in [(r.name, r.ok) for r in result.records]
    assert guest_services.running("apache2") and guest_services.running("cron")


def test_restore_compares_checksums_and_fails_on_a_changed_value(
    parallel_dumped: tuple[Any, Path], idoit_db: IdoitDB, ssh_guest: lab.SshGuest
) -> None:
    config, folder = parallel_dumped
    vm = config.vm("lab")
    prepared = mysql.prepare_restore(folder, vm="lab")
    assert prepared.format == "parallel" and prepared.to_drop == IDOIT
    assert [p.role for p in prepared.parts] == ["tables"] * 3 + ["objects"]
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        restored = mysql.restore(transport, vm="lab", guest=vm.guest, options=vm.dump,
                                 source=prepared)  # fmt: skip
        assert restored.checksums_checked == len(idoit_db.row_counts)
        assert not restored.mismatches and idoit_db.is_pristine()
        # the manifest's checksum of one table no longer matches what the dump holds
        manifest = store.read_manifest(folder)
        table = "idoit_data.isys_obj"
        manifest["mysqldump"]["checksums"][table] = "12345"
        (folder / store.MANIFEST).write_text(json.dumps(manifest))
        changed = mysql.prepare_restore(folder, vm="lab")
        with pytest.raises(dumpfile.RestoreFailed, match=f"checksums differ.*{table}"):
            mysql.restore(transport, vm="lab", guest=vm.guest, options=vm.dump, source=changed)
    finally:
        transport.close()


def test_a_corrupt_part_is_refused_before_anything_is_dropped(
    parallel_dumped: tuple[Any, Path], idoit_db: IdoitDB
) -> None:
    config, folder = parallel_dumped
    idoit_db.mutate_data()
    changed = idoit_db.current_checksums()
    part = folder / "mysql.part02.sql.zst"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x55
    part.write_bytes(bytes(data))

    with pytest.raises(store.CorruptDump, match=r"part02.*sha256") as info:
        restore_dump(config, "lab", source=DumpSource(snapshot="snap-p"))
    assert info.value.exit_code == ExitCode.PREFLIGHT
    assert idoit_db.current_checksums() == changed  # untouched


def test_a_part_cut_short_with_its_sha256_recomputed_is_refused_too(
    parallel_dumped: tuple[Any, Path], idoit_db: IdoitDB
) -> None:
    _, folder = parallel_dumped
    part = folder / "mysql.part01.sql.zst"
    sql = sql_of(part)
    cut = subprocess.run(["zstd", "-q", "-c"], input=sql[: len(sql) // 2], capture_output=True,
                         check=True).stdout  # fmt: skip
    part.write_bytes(cut)
    manifest = store.read_manifest(folder)
    manifest["files"][part.name].update(sha256=store.sha256_file(part), size=len(cut))
    (folder / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(store.CorruptDump, match=r"part01.*Dump completed") as info:
        mysql.prepare_restore(folder, vm="lab")
    assert info.value.hint == "nothing was changed"


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda s: s.update(parts="mysql.part01.sql.zst"), "has no list of parts"),
        (lambda s: s.update(parts=[]), "has no list of parts"),
        (lambda s: s["parts"].__setitem__(0, "x"), "part 1 as something other than a table"),
        (lambda s: s["parts"][0].update(file="../../etc/passwd"), "not one of its files"),
        (lambda s: s["parts"][1].update(file=s["parts"][0]["file"]), "not one of its files"),
        (lambda s: s["parts"][0].update(role="data"), "unknown role 'data'"),
        (lambda s: s["parts"][0].update(tables=[1, 2]), "tables of part mysql.part01"),
        (lambda s: s["parts"].pop(), "one objects part and at least one tables part"),
        (lambda s: s.update(format="sharded"), "unknown format 'sharded'"),
    ],
)
def test_a_hand_edited_parts_list_is_one_clear_error(
    parallel_dumped: tuple[Any, Path], edit: Any, says: str
) -> None:
    _, folder = parallel_dumped
    manifest = store.read_manifest(folder)
    edit(manifest["mysqldump"])
    (folder / store.MANIFEST).write_text(json.dumps(manifest))
    for read in (
        lambda: mysql.prepare_restore(folder, vm="lab"),
        lambda: dumpfile.read_recorded(folder, mysql.FORMAT, vm="lab"),
    ):
        with pytest.raises(store.CorruptDump) as info:
            read()
        assert says in info.value.message and "\n" not in info.value.message


def test_one_part_given_as_a_file_is_refused_with_what_to_do(
    parallel_dumped: tuple[Any, Path],
) -> None:
    _, folder = parallel_dumped
    with pytest.raises(PreflightError, match="one part of a parallel dump") as info:
        mysql.prepare_restore(folder / "mysql.part01.sql.zst", vm="lab")
    assert info.value.hint is not None and str(folder) in info.value.hint


def test_the_documented_commands_restore_a_parallel_dump_by_hand(
    parallel_dumped: tuple[Any, Path], idoit_db: IdoitDB
) -> None:
    _, folder = parallel_dumped
    idoit_db.mutate_schema_for_errno150()
    idoit_db.mutate_data()
    text = (Path(__file__).parent.parent / "docs" / "dump.md").read_text()
    block = text.split("<!-- restore-parallel-by-hand:", 1)[1].split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    lines = block.splitlines()
    assert lines[0].startswith("cd ")  # the example's run folder: this test's instead
    script = "\n".join(lines[1:]) + "\n"
    done = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert idoit_db.is_pristine()
    # the same commands stop at a damaged part, before anything is dropped
    idoit_db.mutate_data()
    changed = idoit_db.current_checksums()
    part = folder / "mysql.part03.sql.zst"
    part.write_bytes(part.read_bytes()[:-20])
    failed = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True,
                            timeout=600, check=False)  # fmt: skip
    assert failed.returncode != 0
    assert idoit_db.current_checksums() == changed


def test_verify_loads_the_parts_and_measures_what_was_recorded(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, tmp_path: Path
) -> None:
    lab.require_root()
    lab.require("/usr/sbin/mariadbd", "mariadb-server-core")
    # the default: every database, the guest's mysql schema too
    vm = vm_config(ssh_guest, tmp_path / "store", compression="zstd", threads=2)
    assert vm.guest is not None
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        _, folder = take_dump(transport, vm, tmp_path / "store")
    finally:
        transport.close()
    source = dumpfile.read_recorded(folder, mysql.FORMAT, vm="lab")
    assert source.format == "parallel" and "mysql" in source.databases
    expected = recorded_figures(source)
    databases = sorted({name.split(".", 1)[0] for name in expected})
    with verify_folder() as verify_dir:
        assert verified_figures(source, verify_dir, databases) == expected


class SlowToStart(StreamHook):
    """The first dump stream started only after ``seconds`` (an SSH session slow to open): its
    guest script is not waiting for its option file in time."""

    def change(self, stream: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        if stream == 1:
            time.sleep(self.seconds)
        return kwargs


class LateOptionFile(StreamHook):
    """The first dump stream's option file reaches the guest only after ``seconds`` (its
    session is up and waiting): that mysqldump connects late, while the lock is held."""

    def change(self, stream: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        source = kwargs.get("source")
        if stream == 1 and source is not None:
            kwargs["source"] = Delayed(source, self.seconds)
        return kwargs


class Delayed(io.RawIOBase):
    def __init__(self, source: Any, delay: float) -> None:
        super().__init__()
        self.source, self.delay = source, delay

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        time.sleep(self.delay)
        self.delay = 0.0
        buffer[: len(data)] = data
        return len(data)


def test_a_part_session_that_does_not_start_within_command_timeout_fails_before_any_lock(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    vm = vm_config(ssh_guest, tmp_path, guest_keys={"command_timeout": 5}, databases=IDOIT,
                   compression="zstd", threads=2)  # fmt: skip
    inner = transport_for(vm)
    plan = mysql.preflight(inner, vm="lab", guest=vm.guest, options=vm.dump)
    run = store.RunDir.begin(tmp_path, "lab", "snap-s")
    # the slow one is whichever part's thread asked first
    with pytest.raises(dumpfile.DumpFailed, match=r"mysql\.(part0[12]|objects)\.sql\.zst: its "
                       r"session in the guest did not start within 5 s") as failed:  # fmt: skip
        mysql.dump(SlowToStart(inner, 8), vm="lab", guest=vm.guest, options=vm.dump,
                   run_dir=run, plan=plan)  # fmt: skip
    assert failed.value.hint is not None
    assert failed.value.hint.startswith("nothing valid was stored; nothing was locked;")
    assert failed.value.hint.endswith(
        "; raise [vms.X.guest] command_timeout or set [vms.X.dump] threads = 1"
    )
    assert (tmp_path / "lab" / "snap-s.failed").is_dir()
    assert store.list_dumps(tmp_path, "lab") == []
    assert _wait(lambda: not guest_processes(ssh_guest)), "a part kept running in the guest"
    assert lock_free() and no_lock_session()


def test_a_stranger_s_snapshot_does_not_end_the_lock_before_a_late_part_starts(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    """One part's option file arrives 8 s late, and meanwhile another session of the dump's
    user (root here), connected after the lock was taken, opens a REPEATABLE READ snapshot: to
    the server it looks like that part. The lock stays until the late part, too, has dumped (a
    write waits meanwhile), and the dump is whole."""
    vm = vm_config(ssh_guest, tmp_path, guest_keys={"command_timeout": 5}, databases=IDOIT,
                   compression="zstd", threads=2)  # fmt: skip
    inner = transport_for(vm)
    plan = mysql.preflight(inner, vm="lab", guest=vm.guest, options=vm.dump)
    run = store.RunDir.begin(tmp_path, "lab", "snap-t")
    seen: dict[str, Any] = {}
    strangers: list[subprocess.Popen[bytes]] = []

    def stranger_and_writer() -> None:
        if _wait(lambda: not lock_free(), 30):  # the lock is taken
            strangers.append(subprocess.Popen(
                lab.mysql_argv(None, "-e",
                               "START TRANSACTION WITH CONSISTENT SNAPSHOT; SELECT SLEEP(30)"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            time.sleep(2)  # the other parts and the stranger have their snapshots by now
            seen["committed"] = lock_free()

    thread = threading.Thread(target=stranger_and_writer, daemon=True)
    thread.start()
    try:
        result = mysql.dump(LateOptionFile(inner, 8), vm="lab", guest=vm.guest, options=vm.dump,
                            run_dir=run, plan=plan)  # fmt: skip
        thread.join()
    finally:
        for stranger in strangers:
            stranger.kill()
            stranger.wait()
    assert strangers, "the lock was never seen taken"
    assert seen.get("committed") is False, "a write committed before the late part had dumped"
    assert run.sections[mysql.SECTION]["lock"]["held_seconds"] >= 8
    assert sorted(result.parts) == sorted(
        ["mysql.part01.sql.zst", "mysql.part02.sql.zst", "mysql.objects.sql.zst"]
    )
    assert lock_free() and no_lock_session()


ODD_NAMES = ['a"b', "c\\d", "--ignore-table=x", "x.y", "sp ace", "tick`t", "v$w", "ümlaut", "日本"]


def test_odd_table_names_each_land_in_one_part_and_never_become_options(
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    scratch_mariadb: lab.ScratchMariaDB,
    transport_for: Any,
    tmp_path: Path,
) -> None:
    db = "snapcoord_names"
    quoted = ["`" + n.replace("`", "``") + "`" for n in ODD_NAMES]
    lab.mysql_exec(
        f"SET NAMES utf8mb4; DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db} CHARACTER SET"
        f" utf8mb4; USE {db};"
        + "".join(f"CREATE TABLE {q} (id INT PRIMARY KEY) ENGINE=InnoDB;" for q in quoted)
        + "".join(f"INSERT INTO {q} VALUES ({i});" for i, q in enumerate(quoted, 1))
        + f'CREATE VIEW `v ie"w` AS SELECT * FROM {quoted[0]};'
    )
    try:
        vm = vm_config(ssh_guest, tmp_path, databases=[db], compression="none", threads=3)
        _, folder = take_dump(transport_for(vm), vm, tmp_path, "snap-n")
        section = store.verify(folder)["mysqldump"]
        listed = [t for p in section["parts"] for t in p["tables"]]
        assert sorted(listed) == sorted(f"{db}.{n}" for n in ODD_NAMES)
        for part in section["parts"][:-1]:
            sql = (folder / part["file"]).read_bytes()
            created = re.findall(rb"^CREATE TABLE `((?:[^`]|``)+)`", sql, re.MULTILINE)
            names = sorted(c.replace(b"``", b"`").decode() for c in created)
            assert names == sorted(t.split(".", 1)[1] for t in part["tables"])
            assert b"VIEW" not in sql
        assert b'v ie"w' in (folder / "mysql.objects.sql").read_bytes()
        for name in [p["file"] for p in section["parts"]]:
            loaded = scratch_mariadb.load(folder / name)
            assert loaded.returncode == 0, loaded.stderr
        client = mysql.Client(vm="lab", sudo=False, user="root",
                              connection=(f"--socket={scratch_mariadb.socket}",))  # fmt: skip
        loaded_rows = mysql.row_counts(client, ExecTransport([], vm="lab"), [db], timeout=60)
        assert loaded_rows == section["tables"] == {f"{db}.{n}": 1 for n in ODD_NAMES}
    finally:
        lab.mysql_exec(f"DROP DATABASE IF EXISTS {db}")

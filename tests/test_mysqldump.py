"""mysqldump streamed off the real loopback SSH guest into the store (real MariaDB, real sshd)."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from snapcoord import store
from snapcoord.config import Config, VMConfig, parse_config
from snapcoord.errors import ExitCode, PreflightError
from snapcoord.guest import ExecTransport, Transport, shell_transport
from snapcoord.hooks.databases import dumpfile, mysql
from snapcoord.secrets import Secret
from snapcoord.shell import Completed
from tests import lab
from tests.idoit_fixture import DATABASES, IdoitDB

pytestmark = pytest.mark.real
IDOIT = list(DATABASES)


def make_config(
    guest: lab.SshGuest, store_root: Path, *, guest_keys: dict[str, Any] | None = None, **dump: Any
) -> Config:
    """A validated config with one VM ``lab`` (schema defaults filled in) for the loopback guest."""
    raw = {
        "defaults": {"store": str(store_root)},
        "hypervisors": {"lab": {"type": "libvirt", "uri": "test:///default"}},
        "vms": {
            "lab": {
                "hypervisor": "lab",
                "guest": guest.guest_table(dump=True, **(guest_keys or {})),
                "dump": dump,
            }
        },
    }
    return parse_config(raw)


def vm_config(
    guest: lab.SshGuest, store_root: Path, *, guest_keys: dict[str, Any] | None = None, **dump: Any
) -> VMConfig:
    return make_config(guest, store_root, guest_keys=guest_keys, **dump).vm("lab")


def slow_dump_config(guest: lab.SshGuest, store_root: Path, **dump: Any) -> VMConfig:
    """The i-doit databases dumped with one INSERT per row (and gzip): slow enough to cut,
    kill or hold up the dump while it streams."""
    return vm_config(
        guest,
        store_root,
        databases=IDOIT,
        options=["--single-transaction", "--skip-extended-insert"],
        compression="gzip",
        **dump,
    )


class RecordingTransport:
    """Wraps a transport and keeps every local command line it builds (to look for secrets)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.description = inner.description
        self.lines: list[list[str]] = []

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def command_line(self, argv: Sequence[str], *, sudo: bool = False) -> list[str]:
        line = self.inner.command_line(argv, sudo=sudo)
        self.lines.append(line)
        return line

    def run(self, argv: Sequence[str], **kwargs: Any) -> Completed:
        self.lines.append(self.inner.command_line(argv, sudo=kwargs.get("sudo", False)))
        return self.inner.run(argv, **kwargs)

    def run_streaming(self, argv: Sequence[str], **kwargs: Any) -> Completed:
        self.lines.append(self.inner.command_line(argv, sudo=kwargs.get("sudo", False)))
        return self.inner.run_streaming(argv, **kwargs)


@pytest.fixture
def transport_for(ssh_guest: lab.SshGuest) -> Iterator[Any]:
    opened: list[Transport] = []

    def make(vm: VMConfig) -> RecordingTransport:
        assert vm.guest is not None
        transport = RecordingTransport(shell_transport(vm.guest, vm=vm.key))
        transport.open()
        opened.append(transport)
        return transport

    yield make
    for transport in opened:
        transport.close()


def take_dump(
    transport: Transport, vm: VMConfig, store_root: Path, snapshot: str = "snap-1", **kw: Any
) -> tuple[dumpfile.DumpResult, Path]:
    assert vm.guest is not None
    plan = mysql.preflight(
        transport, vm=vm.key, guest=vm.guest, options=vm.dump, store_root=store_root
    )
    run = store.RunDir.begin(store_root, vm.key, snapshot)
    result = mysql.dump(
        transport,
        vm=vm.key,
        guest=vm.guest,
        options=vm.dump,
        run_dir=run,
        plan=plan,
        **kw,
    )
    return result, run.commit()


def test_dump_is_verified_and_loads_with_identical_checksums(
    ssh_guest: lab.SshGuest,
    idoit_db: IdoitDB,
    scratch_mariadb: lab.ScratchMariaDB,
    transport_for: Any,
    tmp_path: Path,
) -> None:
    vm = vm_config(ssh_guest, tmp_path, databases=IDOIT, compression="gzip")
    result, folder = take_dump(transport_for(vm), vm, tmp_path)

    assert folder == tmp_path / "lab" / "snap-1"
    dump_file = folder / "mysql.sql.gz"
    manifest = store.verify(folder)
    assert manifest["files"]["mysql.sql.gz"]["sha256"] == store.sha256_file(dump_file)
    assert result.sha256 == manifest["files"]["mysql.sql.gz"]["sha256"]
    section = manifest["mysqldump"]
    assert section["valid"] is True
    assert section["databases"] == IDOIT
    assert section["tables"] == idoit_db.row_counts
    assert section["server_version"].startswith("10.")
    assert section["mysqldump_exit"] == 0
    assert section["started"] <= section["finished"]
    assert result.rows == idoit_db.total_rows >= 100_000
    assert subprocess.run(["gunzip", "-t", str(dump_file)], check=False).returncode == 0

    loaded = scratch_mariadb.load(dump_file)
    assert loaded.returncode == 0, loaded.stderr
    assert scratch_mariadb.checksums(IDOIT) == idoit_db.checksums
    assert lab.row_counts(IDOIT, scratch_mariadb.socket) == idoit_db.row_counts
    # the manifest carries a checksum of every table, the same on the loaded copy
    assert section["checksum_method"] == "mysql-crc32-sum/1"
    assert set(section["checksums"]) == set(section["tables"])
    assert all(value.isdigit() and int(value) > 0 for value in section["checksums"].values())
    loaded_client = mysql.Client(vm="lab", sudo=False, user="root",
                                 connection=(f"--socket={scratch_mariadb.socket}",))  # fmt: skip
    sums = mysql.table_sums(loaded_client, ExecTransport([], vm="lab"), IDOIT, timeout=600)
    assert {name: s.checksum for name, s in sums.items()} == section["checksums"]
    assert {name: s.rows for name, s in sums.items()} == section["tables"]
    # the view, the trigger and the routine came along
    objects = lab.mysql_rows(
        "SELECT COUNT(*) FROM information_schema.VIEWS WHERE TABLE_SCHEMA LIKE 'idoit%' UNION ALL "
        "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA LIKE 'idoit%' "
        "UNION ALL SELECT COUNT(*) FROM information_schema.ROUTINES "
        "WHERE ROUTINE_SCHEMA LIKE 'idoit%'",
        scratch_mariadb.socket,
    )
    assert all(int(row[0]) >= 1 for row in objects)


def test_default_dump_holds_all_databases(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    vm = vm_config(ssh_guest, tmp_path)
    transport = transport_for(vm)
    plan = mysql.preflight(transport, vm="lab", guest=vm.guest, options=vm.dump)
    assert plan.all_databases and "--all-databases" in plan.argv
    assert {"mysql", *IDOIT} <= set(plan.databases)
    assert not {"information_schema", "performance_schema", "sys"} & set(plan.databases)
    result, folder = take_dump(transport, vm, tmp_path)
    source = mysql.prepare_restore(folder, vm="lab")
    assert {"mysql", *IDOIT} <= set(source.databases)
    assert "mysql" not in source.to_drop  # system schemas are never dropped
    assert set(IDOIT) <= set(source.to_drop)
    assert result.tables >= len(idoit_db.row_counts)


@pytest.mark.parametrize(
    ("compression", "where", "tester"),
    [
        ("gzip", "coordinator", ["gunzip", "-t"]),
        ("gzip", "guest", ["gunzip", "-t"]),
        ("zstd", "guest", ["zstd", "-q", "-t"]),
        ("none", "guest", ["true"]),
    ],
)
def test_other_codecs_and_compression_places(
    ssh_guest: lab.SshGuest,
    idoit_db: IdoitDB,
    scratch_mariadb: lab.ScratchMariaDB,
    transport_for: Any,
    tmp_path: Path,
    compression: str,
    where: str,
    tester: list[str],
) -> None:
    vm = vm_config(ssh_guest, tmp_path, databases=IDOIT, compression=compression)
    result, folder = take_dump(transport_for(vm), vm, tmp_path, compress_on=where)
    manifest = store.verify(folder)
    assert manifest["mysqldump"]["compressed_on"] == where
    assert result.path.name == mysql.DUMP_NAMES[compression]
    stored = folder / result.path.name
    assert subprocess.run([*tester, str(stored)], check=False).returncode == 0
    source = mysql.prepare_restore(folder, vm="lab")
    assert source.to_drop == IDOIT
    if compression == "none":
        assert scratch_mariadb.load(stored).returncode == 0
        assert scratch_mariadb.checksums(IDOIT) == idoit_db.checksums


def test_sudo_login_and_password_never_on_a_command_line(
    sudo_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    password = 'S3cr"et\\pa ss#;$(x)' + os.urandom(4).hex()
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    lab.mysql_exec(
        "DROP USER IF EXISTS 'snapdump'@'localhost';"
        f"CREATE USER 'snapdump'@'localhost' IDENTIFIED BY '{quoted}';"
        "GRANT SELECT, SHOW VIEW, TRIGGER, LOCK TABLES, EVENT, RELOAD, PROCESS, "
        "SHOW DATABASES ON *.* TO 'snapdump'@'localhost';"
        "GRANT SELECT ON mysql.proc TO 'snapdump'@'localhost';"
    )
    vm = vm_config(sudo_guest, tmp_path, databases=IDOIT, user="snapdump")
    vm = replace(vm, dump=replace(vm.dump, password=Secret("env:TEST", password)))
    transport = transport_for(vm)
    seen: list[str] = []
    stop = threading.Event()

    def watch_process_table() -> None:  # `ps` while the dump runs
        while not stop.is_set():
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False)
            seen.append(ps.stdout)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_process_table, daemon=True)
    watcher.start()
    try:
        result, folder = take_dump(transport, vm, tmp_path)
    finally:
        stop.set()
        watcher.join()
        lab.mysql_exec("DROP USER IF EXISTS 'snapdump'@'localhost'")
    assert result.rows == idoit_db.total_rows
    assert any("mysqldump" in snapshot for snapshot in seen)  # the watcher saw the dump run
    assert not any(password in snapshot for snapshot in seen)
    assert transport.lines and not any(password in " ".join(line) for line in transport.lines)
    assert "--defaults-extra-file=" in " ".join(transport.lines[-1])
    assert password not in (folder / "manifest.json").read_text()
    assert not list(Path("/tmp").glob("snapcoord-my.*"))  # the option file was removed


def test_wrong_password_fails_in_preflight(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    vm = vm_config(ssh_guest, tmp_path, user="nosuchuser")
    vm = replace(vm, dump=replace(vm.dump, password=Secret("env:TEST", "wrong-password-123")))
    with pytest.raises(PreflightError, match="Access denied") as info:
        mysql.preflight(transport_for(vm), vm="lab", guest=vm.guest, options=vm.dump)
    assert "wrong-password-123" not in str(info.value)
    assert info.value.exit_code == ExitCode.PREFLIGHT


@pytest.mark.parametrize(
    ("dump", "message"),
    [
        ({"options": ["--result-file=/tmp/x"]}, "--result-file"),
        ({"options": ["--compact"]}, "--compact"),
        ({"options": ["-psecret"]}, "'-p' \\(--password\\)"),  # the password is not echoed
        ({"options": ["--pass=secret"]}, "--password"),  # an abbreviation (finding 10)
        ({"databases": ["nosuchdb_snapcoord"]}, "nosuchdb_snapcoord"),
        # a database name like "-x" is a config problem now (tests/test_option_injection.py)
    ],
)
def test_preflight_rejects_bad_settings(
    ssh_guest: lab.SshGuest,
    transport_for: Any,
    tmp_path: Path,
    dump: dict[str, Any],
    message: str,
) -> None:
    lab.ensure_running(["mariadb"])
    vm = vm_config(ssh_guest, tmp_path, **dump)
    with pytest.raises(PreflightError, match=message):
        mysql.preflight(transport_for(vm), vm="lab", guest=vm.guest, options=vm.dump)


def test_preflight_catches_a_full_store(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tiny_store: Path
) -> None:
    vm = vm_config(ssh_guest, tiny_store, databases=IDOIT, compression="none")
    with pytest.raises(store.StoreError, match="free, the dump needs"):
        mysql.preflight(
            transport_for(vm), vm="lab", guest=vm.guest, options=vm.dump, store_root=tiny_store
        )


@pytest.fixture
def tiny_store(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    # mode=0700: a store must be private (a fresh tmpfs root is 1777)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def guest_processes(guest: lab.SshGuest, command: str = "mysqldump") -> list[int]:
    """PIDs of ``command`` processes started through *this* lab sshd (other tests may dump
    too)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_text = (entry / "stat").read_text()
        except OSError:
            continue
        comm_end = stat_text.rindex(")")
        names[int(entry.name)] = stat_text[stat_text.index("(") + 1 : comm_end]
        parents[int(entry.name)] = int(stat_text[comm_end + 2 :].split()[1])
    found = []
    for pid, name in names.items():
        if name != command:
            continue
        current = pid
        while current > 1:
            current = parents.get(current, 1)
            if current == guest.pid:
                found.append(pid)
                break
    return found


def _wait(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_store_filling_up_mid_stream_is_a_failed_dump(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tiny_store: Path
) -> None:
    vm = vm_config(ssh_guest, tiny_store, databases=IDOIT, compression="none")
    run = store.RunDir.begin(tiny_store, "lab", "snap-full")
    # the sink stops before the file system is full (store.SPACE_MARGIN; on this 1 MiB store,
    # at once), as it would on ENOSPC: a failed dump, nothing listed, mysqldump ended
    with pytest.raises(dumpfile.DumpFailed, match="stopped before it would leave less") as info:
        mysql.dump(transport_for(vm), vm="lab", guest=vm.guest, options=vm.dump, run_dir=run)
    assert info.value.exit_code == ExitCode.PREFLIGHT
    assert info.value.failed_dir == tiny_store / "lab" / "snap-full.failed"
    assert store.list_dumps(tiny_store, "lab") == []
    assert not (tiny_store / "lab" / "snap-full").exists()
    assert _wait(lambda: not guest_processes(ssh_guest)), "mysqldump kept running in the guest"


def test_mysqldump_killed_mid_stream_records_no_valid_dump(
    ssh_guest: lab.SshGuest, idoit_db: IdoitDB, transport_for: Any, tmp_path: Path
) -> None:
    vm = slow_dump_config(ssh_guest, tmp_path)
    transport = transport_for(vm)
    run = store.RunDir.begin(tmp_path, "lab", "snap-killed")
    part = run.path / ".mysql.sql.gz.part"
    killed: list[int] = []

    def killer() -> None:
        if _wait(lambda: part.exists() and part.stat().st_size > 0):
            for pid in guest_processes(ssh_guest):
                os.kill(pid, 9)
                killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(dumpfile.DumpFailed, match="mysqldump exited 137"):
        mysql.dump(transport, vm="lab", guest=vm.guest, options=vm.dump, run_dir=run)
    thread.join()
    assert killed
    failed = tmp_path / "lab" / "snap-killed.failed"
    assert failed.is_dir() and not (tmp_path / "lab" / "snap-killed").exists()
    assert (failed / "mysql.sql.gz.incomplete").is_file()  # kept for inspection only
    assert store.list_dumps(tmp_path, "lab") == []
    with pytest.raises(store.CorruptDump):
        store.find_dump(tmp_path, "lab", "snap-killed")


class CutWhileLoading(io.RawIOBase):
    """A dump file that, before its first bytes reach the guest, waits for the guest's
    ``mysql`` client and then cuts the SSH connection under it."""

    def __init__(self, path: Path, guest: lab.SshGuest) -> None:
        self.handle = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.guest = guest
        self.cut: list[int] = []

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.cut:
            assert _wait(lambda: guest_processes(self.guest, "mysql")), "no mysql in the guest"
            self.cut = lab.cut_server_side(self.guest)
        return self.handle.readinto(buffer)

    def close(self) -> None:
        self.handle.close()
        super().close()


class CuttingTransport(RecordingTransport):
    """Streams into the guest come from a :class:`CutWhileLoading` of the same file."""

    def __init__(self, inner: Transport, guest: lab.SshGuest) -> None:
        super().__init__(inner)
        self.guest = guest
        self.sources: list[CutWhileLoading] = []

    def run_streaming(self, argv: Sequence[str], **kwargs: Any) -> Completed:
        source = CutWhileLoading(Path(kwargs["source"].name), self.guest)
        self.sources.append(source)
        with source:
            return super().run_streaming(argv, **{**kwargs, "source": source})


def test_a_connection_lost_while_a_dump_loads_is_a_failed_restore(
    ssh_guest: lab.SshGuest, tmp_path: Path
) -> None:
    lab.ensure_running(["mariadb"])
    dump = tmp_path / "cut.sql"
    dump.write_bytes(
        b"-- a hand-made dump\n"
        b"CREATE DATABASE /*!32312 IF NOT EXISTS*/ `snapcoord_cut`;\n"
        b"USE `snapcoord_cut`;\nCREATE TABLE t (id INT PRIMARY KEY);\n"
        b"INSERT INTO t VALUES (1),(2),(3);\n-- Dump completed on 2025-01-01  0:00:00\n"
    )
    vm = vm_config(ssh_guest, tmp_path)
    assert vm.guest is not None
    transport = CuttingTransport(shell_transport(vm.guest, vm="lab"), ssh_guest)
    transport.open()
    try:
        with pytest.raises(dumpfile.RestoreFailed, match="lost the SSH connection") as info:
            mysql.restore(transport, vm="lab", guest=vm.guest, options=vm.dump, source=dump)
    finally:
        transport.close()
        lab.mysql_exec("DROP DATABASE IF EXISTS snapcoord_cut")
    sources = transport.sources
    assert sources and sources[0].cut, "no sshd child served the connection"
    assert info.value.exit_code == ExitCode.SNAPSHOT_FAILED
    assert info.value.hint is not None and "snapcoord_cut may be incomplete" in info.value.hint


def test_a_table_that_errors_fails_the_dump(
    ssh_guest: lab.SshGuest, transport_for: Any, tmp_path: Path
) -> None:
    lab.ensure_running(["mariadb"])
    lab.mysql_exec(
        "DROP DATABASE IF EXISTS snapcoord_broken; CREATE DATABASE snapcoord_broken;"
        "CREATE TABLE snapcoord_broken.t (id INT PRIMARY KEY);"
        "INSERT INTO snapcoord_broken.t VALUES (1);"
        "CREATE VIEW snapcoord_broken.v AS SELECT id FROM snapcoord_broken.t;"
        "DROP TABLE snapcoord_broken.t;"
    )
    try:
        vm = vm_config(ssh_guest, tmp_path, databases=["snapcoord_broken"])
        run = store.RunDir.begin(tmp_path, "lab", "snap-broken")
        with pytest.raises(dumpfile.DumpFailed, match="mysqldump exited 2") as info:
            mysql.dump(transport_for(vm), vm="lab", guest=vm.guest, options=vm.dump, run_dir=run)
    finally:
        lab.mysql_exec("DROP DATABASE IF EXISTS snapcoord_broken")
    assert "references invalid table" in str(info.value) or "1356" in str(info.value)
    assert store.list_dumps(tmp_path, "lab") == []


def test_archive_of_guest_paths_restores_by_hand(
    ssh_guest: lab.SshGuest, transport_for: Any, tmp_path: Path
) -> None:
    from snapcoord.hooks import archive

    source = tmp_path / "guest-files"
    (source / "conf.d").mkdir(parents=True)
    (source / "conf.d" / "site.conf").write_text("ServerName example\n")
    (source / "index.php").write_bytes(os.urandom(4096))
    vm = vm_config(ssh_guest, tmp_path)
    transport = transport_for(vm)
    paths = [str(source / "conf.d"), str(source / "index.php")]
    assert archive.preflight(transport, vm="lab", paths=paths, store_root=tmp_path) > 0
    run = store.RunDir.begin(tmp_path, "lab", "snap-files")
    result = archive.dump(transport, vm="lab", paths=paths, run_dir=run)
    folder = run.commit()
    manifest = store.verify(folder)
    assert manifest["files"]["files.tar.gz"]["sha256"] == result.sha256
    assert manifest["archive"]["paths"] == paths
    assert subprocess.run(["gunzip", "-t", str(folder / "files.tar.gz")]).returncode == 0
    # the documented manual restore: tar -xzf files.tar.gz -C /  (here into another root)
    target = tmp_path / "restored"
    target.mkdir()
    subprocess.run(["tar", "-xzf", str(folder / "files.tar.gz"), "-C", str(target)], check=True)
    restored = target / str(source).lstrip("/")
    assert (restored / "conf.d" / "site.conf").read_text() == "ServerName example\n"
    assert (restored / "index.php").read_bytes() == (source / "index.php").read_bytes()


def test_archive_of_a_missing_path_fails_cleanly(
    ssh_guest: lab.SshGuest, transport_for: Any, tmp_path: Path
) -> None:
    from snapcoord.hooks import archive

    vm = vm_config(ssh_guest, tmp_path)
    transport = transport_for(vm)
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(PreflightError, match="does not exist"):
        archive.preflight(transport, vm="lab", paths=[missing])
    run = store.RunDir.begin(tmp_path, "lab", "snap-nofiles")
    with pytest.raises(dumpfile.DumpFailed, match="does not exist"):
        archive.dump(transport, vm="lab", paths=[missing], run_dir=run)
    assert store.list_dumps(tmp_path, "lab") == []


# -- a dump cut short in the guest -------------------------------------------------------------
# A dump is complete only when its SQL ends with mysqldump's '-- Dump completed' line: neither an
# exit status of 0 nor an intact gzip stream is enough. Real MariaDB and mysqldump; the cut-short
# dumps are made from real ones.


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
    transport = shell_transport(vm.guest, vm="lab")
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

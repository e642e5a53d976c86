"""The PostgreSQL database kind against the loopback guest's real PostgreSQL (Debian's cluster,
started through its init script): probe, verified stop/start, pg_dumpall streamed into the
store, restore (drop first) with row counts compared, and the fault cases."""

from __future__ import annotations

import gzip
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord import store
from snapcoord.config import VMConfig, parse_config
from snapcoord.errors import PreflightError
from snapcoord.guest import SshTransport, Transport, shell_transport
from snapcoord.hooks import databases
from snapcoord.hooks.databases import dumpfile, postgresql
from snapcoord.hooks.guest.services import Services
from snapcoord.run import ServiceWindow
from snapcoord.secrets import Secret
from snapcoord.store import CorruptDump
from tests import lab, pg_fixture
from tests.test_guest_transport import table

pytestmark = pytest.mark.real


def pg_vm(
    guest: lab.SshGuest, store_root: Path, *, sudo: bool | None = None, **dump: Any
) -> VMConfig:
    keys: dict[str, Any] = {} if sudo is None else {"sudo": sudo}
    raw = {
        "defaults": {"store": str(store_root)},
        "hypervisors": {"lab": {"type": "libvirt", "uri": "test:///default"}},
        "vms": {
            "lab": {
                "hypervisor": "lab",
                "guest": guest.guest_table(dump=True, database="postgresql", **keys),
                "dump": dump,
            }
        },
    }
    return parse_config(raw).vm("lab")


@pytest.fixture
def transport(ssh_guest: lab.SshGuest) -> Iterator[SshTransport]:
    transport = SshTransport(table(ssh_guest, database="postgresql"), vm="lab")
    transport.open()
    try:
        yield transport
    finally:
        transport.close()


def take_dump(
    transport: Transport, vm: VMConfig, root: Path, snapshot: str = "snap-1"
) -> tuple[dumpfile.DumpResult, Path]:
    assert vm.guest is not None
    plan = postgresql.preflight(
        transport, vm=vm.key, guest=vm.guest, options=vm.dump, store_root=root
    )
    run = store.RunDir.begin(root, vm.key, snapshot)
    result = postgresql.dump(
        transport, vm=vm.key, guest=vm.guest, options=vm.dump, run_dir=run, plan=plan
    )
    return result, run.commit()


def restore(transport: Transport, vm: VMConfig, source: Path) -> dumpfile.RestoreResult:
    assert vm.guest is not None
    postgresql.check_ready(transport, vm=vm.key, guest=vm.guest, options=vm.dump)
    return postgresql.restore(transport, vm=vm.key, guest=vm.guest, options=vm.dump, source=source)


# -- the server in the guest ---------------------------------------------------------------------


def test_postgresql_listens_on_loopback_and_its_socket_only(pg_services: lab.GuestServices) -> None:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    addresses = [line.split()[3] for line in out.splitlines() if '"postgres"' in line]
    assert addresses
    assert all(a.startswith(("127.0.0.1:", "[::1]:")) for a in addresses), addresses


def test_probe_finds_postgresql_named_and_auto(
    transport: SshTransport,
    ssh_guest: lab.SshGuest,
    pg_services: lab.GuestServices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = Services(transport, table(ssh_guest, database="postgresql"), vm="lab").probe()
    assert state.database == "postgresql" and state.kind == "postgresql"
    assert state.database_running
    pid = lab.postmaster_pid()
    assert state.pidfile is not None and Path(state.pidfile).read_text().split()[0] == str(pid)

    # beside MariaDB, "auto" keeps choosing MariaDB (the registry's order) ...
    both = Services(transport, table(ssh_guest, database="auto"), vm="lab").probe()
    assert both.database == "mariadb"
    # ... and finds PostgreSQL on a guest without MySQL/MariaDB (that kind configured out)
    kinds = databases._registry()
    monkeypatch.setattr(databases, "_registry", lambda: {"postgresql": kinds["postgresql"]})
    auto = Services(transport, table(ssh_guest, database="auto"), vm="lab").probe()
    assert auto.database == "postgresql" and auto.kind == "postgresql"
    assert auto.pidfile == state.pidfile


def test_stop_and_start_are_verified_and_really_restart(
    transport: SshTransport, ssh_guest: lab.SshGuest, pg_services: lab.GuestServices
) -> None:
    before = lab.postmaster_pid()
    started_at = lab.pg_start_time()
    assert before is not None
    svc = Services(transport, table(ssh_guest, database="postgresql"), vm="lab")
    svc.probe()
    window = ServiceWindow()
    svc.stop(["apache2", "cron"], window)
    svc.stop_database(window)
    assert lab.postmaster_pid() is None
    assert not pathlib_exists(f"/proc/{before}")
    assert subprocess.run(["pg_isready", "-q"], check=False).returncode != 0
    svc.still_stopped()  # db_down: postmaster gone and pg_isready refused, on the right port
    svc.start_database(window)
    after = lab.postmaster_pid()
    assert after is not None and after != before
    assert lab.pg_start_time() != started_at
    svc.start(["apache2", "cron"], window)
    assert pg_services.all_running() and window.still_down == []
    assert {"postgresql stop", "postgresql start"} <= set(svc.timings)


def pathlib_exists(path: str) -> bool:
    return Path(path).exists()


# -- dump and restore ------------------------------------------------------------------------------


def test_dump_restore_round_trip_is_exact(
    ssh_guest: lab.SshGuest,
    transport: SshTransport,
    pg_shop: pg_fixture.PgShop,
    tmp_path: Path,
) -> None:
    vm = pg_vm(ssh_guest, tmp_path, compression="gzip")
    result, folder = take_dump(transport, vm, tmp_path)
    dump_file = folder / "postgresql.sql.gz"
    assert result.path == dump_file and oct(dump_file.stat().st_mode & 0o777) == "0o600"
    manifest = json.loads((folder / "manifest.json").read_text())
    section = manifest["pg_dumpall"]
    assert section["valid"] is True and section["pg_dumpall_exit"] == 0
    assert section["server_version"].startswith("15")
    assert set(pg_fixture.DATABASES) <= set(section["databases"])
    shop = {k: v for k, v in section["tables"].items() if k.split(".")[0] in pg_fixture.DATABASES}
    assert shop == pg_shop.row_counts
    # a checksum for every counted table (postgresql.table_sums), recomputed here by hand for
    # one: customers' columns (id, name) are in name order already, so ROW(...) is t's text
    assert section["checksum_method"] == "postgresql-md5-sum/1"
    assert set(section["checksums"]) == set(section["tables"])
    assert all(isinstance(v, str) and v.isdigit() for v in section["checksums"].values())
    (by_hand,) = lab.psql("SELECT sum(('x' || left(md5(t::text), 8))::bit(32)::bigint) "
                          "FROM public.customers t;", pg_fixture.SHOP)  # fmt: skip
    assert section["checksums"][f"{pg_fixture.SHOP}.public.customers"] == by_hand
    assert section["checksums"][f"{pg_fixture.SHOP}.sales.orders"] != "0"
    assert manifest["files"]["postgresql.sql.gz"]["sha256"] == result.sha256
    with gzip.open(dump_file) as handle:
        assert b"CREATE ROLE snapcoord_app;" in handle.read()

    prepared = postgresql.prepare_restore(folder, vm="lab")
    assert set(prepared.to_drop) == set(pg_fixture.DATABASES)  # not the bait in a table's data
    assert not set(prepared.to_drop) & {"postgres", "template0", "template1"}

    pg_fixture.mutate()
    assert pg_shop.current() != pg_shop
    restored = restore(transport, vm, folder)
    assert restored.mismatches == [] and restored.rows_checked >= sum(pg_shop.row_counts.values())
    assert restored.checksums_checked == len(section["checksums"])  # every table's, compared
    assert pg_shop.current() == pg_shop  # rows, the sequence's value, the view
    # the foreign key is back: an order of an unknown customer is refused
    bad = "INSERT INTO sales.orders (customer_id, total) VALUES (99999, 1);"
    with pytest.raises(lab.LabError, match="foreign key"):
        lab.psql(bad, pg_fixture.SHOP)
    # the role existed: kept (the documented harmless error), its dumped grants restored
    owner = lab.psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = "
                     f"'{pg_fixture.SHOP}';")  # fmt: skip
    assert owner == [pg_fixture.ROLE]
    assert any("already existed" in w for w in restored.warnings)


def test_a_restored_value_that_differs_from_the_manifests_checksum_fails_the_restore(
    ssh_guest: lab.SshGuest, transport: SshTransport, pg_shop: pg_fixture.PgShop, tmp_path: Path
) -> None:
    """The row counts alone would pass: the manifest's checksum of one table is changed (what a
    changed value with the same number of rows looks like to the comparison)."""
    vm = pg_vm(ssh_guest, tmp_path, compression="zstd")
    _, folder = take_dump(transport, vm, tmp_path)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    table = f"{pg_fixture.SHOP}.public.customers"
    manifest["pg_dumpall"]["checksums"][table] = "12345"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(dumpfile.RestoreFailed, match=f"checksums differ.*: {table}"):
        restore(transport, vm, folder)
    assert pg_shop.current() == pg_shop  # the load itself was complete: only the figure differs


def test_restore_succeeds_where_the_dumped_databases_are_gone(
    ssh_guest: lab.SshGuest, transport: SshTransport, pg_shop: pg_fixture.PgShop, tmp_path: Path
) -> None:
    vm = pg_vm(ssh_guest, tmp_path, compression="zstd")
    _, folder = take_dump(transport, vm, tmp_path)
    assert (folder / "postgresql.sql.zst").is_file()
    lab.pg_drop_databases(pg_fixture.DATABASES)
    restore(transport, vm, folder)
    assert pg_shop.current() == pg_shop


def test_a_truncated_dump_is_refused_before_anything_changes(
    ssh_guest: lab.SshGuest, transport: SshTransport, pg_shop: pg_fixture.PgShop, tmp_path: Path
) -> None:
    vm = pg_vm(ssh_guest, tmp_path, compression="none")
    _, folder = take_dump(transport, vm, tmp_path)
    whole = (folder / "postgresql.sql").read_bytes()
    cut = tmp_path / "cut" / "postgresql.sql"
    cut.parent.mkdir()
    cut.write_bytes(whole[: len(whole) * 2 // 3])  # a bare file: no manifest to check it by
    regz = tmp_path / "cutgz" / "postgresql.sql.gz"
    regz.parent.mkdir()
    regz.write_bytes(gzip.compress(whole)[:-40])
    pg_fixture.mutate()
    mutated = pg_shop.current()
    for source in (cut, regz):
        with pytest.raises(CorruptDump):
            restore(transport, vm, source)
        assert pg_shop.current() == mutated  # nothing was dropped or loaded

    # a stored dump edited after the fact fails its checksum, also before any change
    (folder / "postgresql.sql").write_bytes(whole.replace(b"customer 1", b"customer X", 1))
    with pytest.raises(CorruptDump):
        restore(transport, vm, folder)
    assert pg_shop.current() == mutated


def test_a_load_error_fails_the_restore_loudly(
    ssh_guest: lab.SshGuest, transport: SshTransport, pg_shop: pg_fixture.PgShop, tmp_path: Path
) -> None:
    vm = pg_vm(ssh_guest, tmp_path)
    dump = tmp_path / "broken" / "postgresql.sql"
    dump.parent.mkdir()
    dump.write_bytes(
        b"CREATE DATABASE snapcoord_broken WITH TEMPLATE = template0;\n"
        b"\\connect snapcoord_broken\n"
        b"CREATE TABLE t (id int PRIMARY KEY);\n"
        b"INSERT INTO t VALUES (1), (1);\n"  # a real error: duplicate key
        b"\n--\n-- PostgreSQL database cluster dump complete\n--\n\n"
    )
    try:
        with pytest.raises(dumpfile.RestoreFailed, match="duplicate key"):
            restore(transport, vm, dump)
    finally:
        lab.pg_drop_databases(["snapcoord_broken"])


def test_a_dump_with_tables_in_postgres_is_refused_before_anything_changes(
    ssh_guest: lab.SshGuest, transport: SshTransport, pg_shop: pg_fixture.PgShop, tmp_path: Path
) -> None:
    lab.psql("CREATE TABLE public.snapcoord_in_postgres (id int);")
    try:
        vm = pg_vm(ssh_guest, tmp_path)
        _, folder = take_dump(transport, vm, tmp_path)
        pg_fixture.mutate()
        mutated = pg_shop.current()
        with pytest.raises(PreflightError, match="postgres"):
            restore(transport, vm, folder)
        assert pg_shop.current() == mutated
    finally:
        lab.psql("DROP TABLE IF EXISTS public.snapcoord_in_postgres;")


# -- faults ----------------------------------------------------------------------------------------


@pytest.fixture
def locked_orders(pg_shop: pg_fixture.PgShop) -> Iterator[None]:
    with pg_fixture.orders_locked(8):
        yield


def test_a_failing_pg_dumpall_is_a_failed_dump(
    ssh_guest: lab.SshGuest, transport: SshTransport, locked_orders: None, tmp_path: Path
) -> None:
    vm = pg_vm(ssh_guest, tmp_path, options=["--lock-wait-timeout=200"], compression="gzip")
    with pytest.raises(dumpfile.DumpFailed) as info:
        take_dump(transport, vm, tmp_path, "snap-locked")
    failed = tmp_path / "lab" / "snap-locked.failed"
    assert info.value.failed_dir == failed and failed.is_dir()
    assert not (tmp_path / "lab" / "snap-locked").exists()
    assert (failed / "postgresql.sql.gz.incomplete").is_file()
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["pg_dumpall"]["valid"] is False
    assert manifest["pg_dumpall"]["pg_dumpall_exit"] not in (0, None)
    with pytest.raises(CorruptDump):
        store.find_dump(tmp_path, "lab", "snap-locked")


class CuttingTransport:
    """Cuts the SSH connection (the sshd children serving it) once the dump has streamed its
    first bytes."""

    def __init__(self, inner: Transport, guest: lab.SshGuest) -> None:
        self.inner = inner
        self.guest = guest
        self.cut: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run_streaming(self, argv: Any, **kwargs: Any) -> Any:
        consume = kwargs["consume"]

        def cutting(chunk: bytes) -> None:
            consume(chunk)
            if not self.cut:
                self.cut = lab.cut_server_side(self.guest)

        return self.inner.run_streaming(argv, **{**kwargs, "consume": cutting})


def test_a_cut_stream_records_no_valid_dump(
    ssh_guest: lab.SshGuest, pg_shop: pg_fixture.PgShop, tmp_path: Path
) -> None:
    # enough data that the stream is still running when the connection is cut
    lab.psql("INSERT INTO public.notes SELECT repeat(md5(g::text), 40), g FROM "
             "generate_series(10, 60000) g;", pg_fixture.SHOP)  # fmt: skip
    vm = pg_vm(ssh_guest, tmp_path, compression="none")
    assert vm.guest is not None
    inner = shell_transport(vm.guest, vm="lab")
    inner.open()
    cutting = CuttingTransport(inner, ssh_guest)
    try:
        run = store.RunDir.begin(tmp_path, "lab", "snap-cut")
        with pytest.raises(dumpfile.DumpFailed):
            postgresql.dump(cutting, vm="lab", guest=vm.guest, options=vm.dump, run_dir=run)  # type: ignore[arg-type]
    finally:
        inner.close()
    assert cutting.cut, "no sshd child served the connection"
    assert (tmp_path / "lab" / "snap-cut.failed").is_dir()
    assert not (tmp_path / "lab" / "snap-cut").exists()


@pytest.mark.parametrize(
    ("dump", "key"),
    [
        ({"password": {"env": "SNAPCOORD_TEST_PG_PASSWORD"}}, "password"),
        ({"databases": ["snapcoord_shop"]}, "databases"),
        ({"options": ["-f", "/tmp/x"]}, "options"),
        ({"options": ["--file=/tmp/x"]}, "--file"),
        ({"options": ["--schema-only"]}, "--schema-only"),
        ({"options": ["--username=someone"]}, "--username"),
        ({"user": "Not A User"}, "user"),
    ],
)
def test_preflight_refuses_what_cannot_work(
    ssh_guest: lab.SshGuest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dump: dict[str, Any],
    key: str,
) -> None:
    monkeypatch.setenv("SNAPCOORD_TEST_PG_PASSWORD", "s3cret")
    vm = pg_vm(ssh_guest, tmp_path, **dump)
    with pytest.raises(PreflightError) as info:
        postgresql.check_options(vm.dump, vm="lab")
    assert key in info.value.message
    if isinstance(vm.dump.password, Secret):
        assert "s3cret" not in info.value.message + (info.value.hint or "")


def preflight(vm: VMConfig) -> dumpfile.DumpPlan:
    assert vm.guest is not None
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    try:
        return postgresql.preflight(transport, vm="lab", guest=vm.guest, options=vm.dump)
    finally:
        transport.close()


def test_preflight_needs_root_and_a_superuser(
    nosudo_guest: lab.SshGuest, ssh_guest: lab.SshGuest, pg_services: lab.GuestServices,
    tmp_path: Path,
) -> None:  # fmt: skip
    vm = pg_vm(nosudo_guest, tmp_path, sudo=False)
    assert vm.guest is not None and not vm.guest.sudo
    with pytest.raises(PreflightError) as info:
        preflight(vm)
    assert "sudo" in (info.value.hint or "")
    lab.psql("DO $$BEGIN CREATE ROLE nobody LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; "
             "END$$;")  # fmt: skip
    vm = pg_vm(ssh_guest, tmp_path, user="nobody")
    assert vm.guest is not None
    with pytest.raises(PreflightError) as info:
        preflight(vm)
    assert "superuser" in info.value.message

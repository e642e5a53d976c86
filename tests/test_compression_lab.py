"""Issue 28, item 5, on the real lab guest (MariaDB and PostgreSQL over the lab's sshd): the
default ``compression = "auto"`` stores a zstd dump that ``restore-dump`` restores, and a guest
without zstd gets a gzip dump and the note that says why, on the run's line and in its JSON.

"Without zstd": for one test, a non-executable file is bind-mounted over /usr/bin/zstd in this
worker's lab sandbox (its private mount namespace: the host never sees it), so the guest's
``command -v zstd`` finds nothing; it is unmounted after the test. The coordinator is the same
sandbox: a gzip dump needs no zstd there (zlib compresses it, gzip loads it in the guest).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import idoit_fixture, lab, pg_fixture
from tests.cli_helpers import json_lines, snapcoord, write_config
from tests.lab import sandbox
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

pytestmark = pytest.mark.real
ZSTD = "/usr/bin/zstd"
NOTE = (
    "dump compressed with gzip: zstd not found in the guest (install zstd in the guest, or set "
    "[vms.db1.dump] compression)"
)


def _config(tmp_path: Path, uri: str, guest: dict[str, Any], **dump: Any) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store"), "label": "codec"},
        "hypervisors.lab": {"type": "libvirt", "uri": uri},
        "vms.db1": {"hypervisor": "lab"},
        # lab services stop in ~2 s; the watchdog must outlast both stops (config check)
        "vms.db1.guest": {"watchdog_seconds": 120, "stop_timeout": 30.0, **guest, "dump": True},
    }
    if dump:
        tables["vms.db1.dump"] = dump
    return write_config(tmp_path / "c.toml", tables)


def _guest_has_zstd(ssh_guest: lab.SshGuest) -> bool:
    """What the dump's probe sees: ``command -v zstd`` in the guest's sh."""
    return ssh_guest.ssh("sh", "-c", "command -v zstd", check=False).returncode == 0


@pytest.fixture
def no_zstd_in_guest(tmp_path: Path, ssh_guest: lab.SshGuest) -> Iterator[None]:
    """/usr/bin/zstd hidden behind a non-executable file in this sandbox for one test."""
    if not sandbox.active():
        pytest.fail("hiding zstd needs the lab sandbox's private mount namespace", pytrace=False)
    assert Path(ZSTD).is_file() and _guest_has_zstd(ssh_guest)
    hider = tmp_path / "not-zstd"
    hider.write_text("not zstd\n")
    hider.chmod(0o644)
    lab.run(["mount", "--bind", str(hider), ZSTD])
    try:
        assert not _guest_has_zstd(ssh_guest), "zstd is still found in the guest"
        yield
    finally:
        lab.run(["umount", ZSTD])
    assert _guest_has_zstd(ssh_guest)


def _snapshot(config: Path) -> dict[str, Any]:
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    (run,) = json_lines(proc.stdout)
    return run


def _manifest(run: dict[str, Any]) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((Path(run["store_folder"]) / "manifest.json").read_text())
    return manifest


def _restore(config: Path, run: dict[str, Any]) -> None:
    done = snapcoord("-c", str(config), "restore-dump", "db1", "--from", run["snapshot"],
                     "--yes", "--json", timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (restored,) = json_lines(done.stdout)
    assert restored["ok"] is True


def _check_line(config: Path) -> str:
    """The dump check's finding in ``snapcoord check``'s JSON."""
    proc = snapcoord("-c", str(config), "check", "db1", "--json", timeout=300)
    (result,) = json_lines(proc.stdout)
    (finding,) = [c for c in result["checks"] if c["check"] == "dump"]
    assert finding["ok"] is True, finding
    fell_back = "zstd not found" in finding["detail"]
    assert result["notes"] == ([NOTE] if fell_back else []), result
    return str(finding["detail"])


def _expect_gzip_with_the_note(config: Path, stem: str, section: str) -> dict[str, Any]:
    """A run of ``config`` on the guest without zstd: gzip, and the note on the human line and
    in the JSON."""
    human = snapcoord("-c", str(config), "snapshot", "db1", timeout=600)
    assert human.returncode == 0, human.stderr
    assert f"db1: note: {NOTE}" in human.stdout.splitlines(), human.stdout
    run = _snapshot(config)
    assert run["notes"].count(NOTE) == 1, run["notes"]
    assert run["dump"]["compression"] == "gzip" and run["dump"]["file"] == f"{stem}.sql.gz"
    manifest = _manifest(run)
    assert manifest[section]["compression"] == "gzip"
    assert manifest[section]["compressed_on"] == "coordinator"
    dump_file = Path(run["store_folder"]) / run["dump"]["file"]
    assert subprocess.run(["gzip", "-t", str(dump_file)], check=False).returncode == 0
    return run


# -- MariaDB ---------------------------------------------------------------------------------------


def test_mariadb_default_is_zstd_and_restore_dump_restores_it(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table())
    planned = snapcoord("-c", str(config), "snapshot", "db1", "--dry-run", timeout=300)
    assert planned.returncode == 0, planned.stderr
    assert "| zstd (gzip where zstd is missing) > store" in planned.stdout, planned.stdout
    assert "dump: zstd" in _check_line(config)
    run = _snapshot(config)
    assert run["dump"]["compression"] == "zstd" and run["dump"]["file"] == "mysql.sql.zst"
    assert not any("compressed with gzip" in n for n in run["notes"]), run["notes"]
    section = _manifest(run)["mysqldump"]
    assert section["compression"] == "zstd" and section["compressed_on"] == "guest"
    dump_file = Path(run["store_folder"]) / "mysql.sql.zst"
    assert subprocess.run(["zstd", "-q", "-t", str(dump_file)], check=False).returncode == 0

    idoit_db.mutate_data()
    assert not idoit_db.is_pristine()
    _restore(config, run)
    assert idoit_db.is_pristine()
    assert all(guest_services.states().values())


def test_mariadb_guest_without_zstd_gets_gzip_and_the_note(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
    no_zstd_in_guest: None,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table())
    detail = _check_line(config)
    assert "dump: gzip (zstd not found in the guest: install zstd in the guest" in detail
    checked = snapcoord("-c", str(config), "check", "db1", timeout=300)
    assert checked.stdout.splitlines()[0] == f"db1: note: {NOTE}", checked.stdout  # then its line
    run = _expect_gzip_with_the_note(config, "mysql", "mysqldump")
    idoit_db.mutate_data()
    _restore(config, run)  # a gzip dump restores without zstd anywhere
    assert idoit_db.is_pristine()

    # an explicit zstd is still refused in preflight, before anything stopped
    (tmp_path / "strict").mkdir()
    strict = _config(tmp_path / "strict", libvirt_node, ssh_guest.guest_table(),
                     compression="zstd")  # fmt: skip
    refused = snapcoord("-c", str(strict), "snapshot", "db1", timeout=300)
    assert refused.returncode == 4, refused.stderr
    assert "cannot dump: zstd not found in the guest" in refused.stderr
    assert all(guest_services.states().values())


# -- PostgreSQL ------------------------------------------------------------------------------------
# (the default's zstd dump and its restore-dump: tests/test_postgresql_e2e.py's first test)


def test_postgresql_guest_without_zstd_gets_gzip_and_the_note(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    pg_shop: pg_fixture.PgShop,
    pg_services: lab.GuestServices,
    no_zstd_in_guest: None,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table(database="postgresql"))
    assert "dump: gzip (zstd not found in the guest" in _check_line(config)
    run = _expect_gzip_with_the_note(config, "postgresql", "pg_dumpall")
    pg_fixture.mutate()
    assert pg_shop.current() != pg_shop
    _restore(config, run)
    assert pg_shop.current() == pg_shop
    assert pg_services.all_running()

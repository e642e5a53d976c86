"""The guest lab itself works: sshd with strict host keys, users, services, datasets."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from snapcoord.schema import GUEST
from tests import idoit_fixture, lab
from tests.idoit_fixture import IdoitDB

pytestmark = pytest.mark.real


def test_ssh_with_strict_host_key_checking(ssh_guest: lab.SshGuest) -> None:
    proc = ssh_guest.ssh("id", "-u")
    assert proc.stdout.strip() == "0"
    assert ssh_guest.running()
    assert Path(f"/proc/{ssh_guest.pid}").exists()


def test_ssh_config_alias_works(ssh_guest: lab.SshGuest) -> None:
    proc = lab.run(["ssh", "-F", str(ssh_guest.ssh_config), lab.LAB_ALIAS, "echo", "alias-ok"])
    assert proc.stdout.strip() == "alias-ok"


def test_wrong_known_hosts_is_refused(ssh_guest: lab.SshGuest) -> None:
    proc = ssh_guest.ssh("true", known_hosts=ssh_guest.wrong_known_hosts, check=False)
    assert proc.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stderr


def test_unknown_host_is_refused(ssh_guest: lab.SshGuest, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    proc = ssh_guest.ssh("true", known_hosts=empty, check=False)
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr


def test_host_key_fingerprint_matches_known_hosts(ssh_guest: lab.SshGuest) -> None:
    proc = lab.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(ssh_guest.known_hosts)])
    assert ssh_guest.host_key_fingerprint in proc.stdout


def test_guest_table_uses_schema_keys(ssh_guest: lab.SshGuest) -> None:
    table = ssh_guest.guest_table(services=["cron"], dump=True)
    assert set(table) <= set(GUEST)
    assert table["transport"] == "ssh"
    assert table["port"] == ssh_guest.port
    assert table["user"] == "root"
    assert table["sudo"] is False
    assert table["services"] == ["cron"]
    assert table["dump"] is True
    assert Path(table["identity_file"]).is_file()
    for key, value in table.items():
        check = GUEST[key].check
        assert check is None or check(value) is None, key


def test_sudo_user_has_passwordless_sudo(sudo_guest: lab.SshGuest) -> None:
    assert sudo_guest.ssh("id", "-un").stdout.strip() == lab.SUDO_USER
    assert sudo_guest.ssh("sudo", "-n", "id", "-u").stdout.strip() == "0"
    assert sudo_guest.guest_table()["sudo"] is True


def test_nosudo_user_cannot_sudo(nosudo_guest: lab.SshGuest) -> None:
    assert nosudo_guest.ssh("id", "-un").stdout.strip() == lab.NOSUDO_USER
    proc = nosudo_guest.ssh("sudo", "-n", "true", check=False)
    assert proc.returncode != 0
    assert "password is required" in proc.stderr or "not allowed" in proc.stderr


def test_test_users_are_idempotent(guest_users: dict[str, str]) -> None:
    assert lab.ensure_test_users() == guest_users


def test_services_running(guest_services: lab.GuestServices) -> None:
    assert guest_services.states() == {"mariadb": True, "apache2": True, "cron": True}
    assert guest_services.mysqld_running()
    assert lab.mysqladmin_ping()
    assert guest_services.mariadb_uptime() >= 0


def test_stopped_database_is_seen_from_outside(guest_services: lab.GuestServices) -> None:
    guest_services.stop("mariadb")
    assert not guest_services.running("mariadb")
    assert not guest_services.mysqld_running()
    assert not lab.mysqladmin_ping()
    guest_services.start("mariadb")
    assert guest_services.mysqld_running()
    assert guest_services.mariadb_uptime() < 60


def test_guest_services_restores_a_stopped_service(guest_services: lab.GuestServices) -> None:
    guest_services.stop("cron")
    assert not guest_services.running("cron")
    # the next test's fixture (and this one's teardown) starts it again


def test_services_are_back_after_previous_test(guest_services: lab.GuestServices) -> None:
    assert guest_services.running("cron")


def test_service_status_over_ssh(
    ssh_guest: lab.SshGuest, guest_services: lab.GuestServices
) -> None:
    proc = ssh_guest.ssh("service", "cron", "status", check=False)
    assert proc.returncode == 0


def test_idoit_dataset_shape(idoit_db: IdoitDB) -> None:
    assert idoit_db.total_rows >= 100_000
    assert set(idoit_db.databases) == {"idoit_system", "idoit_data"}
    engines = lab.mysql_rows(
        "SELECT DISTINCT ENGINE FROM information_schema.TABLES "
        "WHERE TABLE_SCHEMA IN ('idoit_system', 'idoit_data') AND TABLE_TYPE = 'BASE TABLE'"
    )
    assert engines == [["InnoDB"]]
    objects = idoit_db.objects
    assert "idoit_data.isys_catg_global_list -> isys_obj" in objects["foreign_keys"]
    assert "idoit_system.isys_licence -> isys_mandator" in objects["foreign_keys"]
    assert objects["views"] == ["idoit_data.isys_v_obj_overview"]
    assert objects["triggers"] == ["idoit_data.isys_obj_after_update"]
    assert "idoit_data.isys_obj_count FUNCTION" in objects["routines"]
    assert objects["events"] == ["idoit_data.isys_ev_cleanup"]
    # child tables sort before their parent, as i-doit's isys_catg_* before isys_obj
    tables = sorted(idoit_db.row_counts)
    assert tables.index("idoit_data.isys_catg_global_list") < tables.index("idoit_data.isys_obj")


def test_idoit_trigger_and_routine_work(idoit_db: IdoitDB) -> None:
    rows = lab.mysql_rows(
        "SELECT idoit_data.isys_obj_count(1);"
        "UPDATE idoit_data.isys_obj SET isys_obj__title = 'renamed' WHERE isys_obj__id = 1;"
        "SELECT COUNT(*) FROM idoit_data.isys_logbook "
        "WHERE isys_logbook__event = 'C__LOGBOOK_EVENT__OBJECT_CHANGED';"
    )
    assert int(rows[0][0]) > 0
    assert rows[1] == ["1"]
    assert not idoit_db.is_pristine()


def test_idoit_db_is_pristine_again(idoit_db: IdoitDB) -> None:
    assert idoit_db.is_pristine()


def test_dump_loads_into_scratch_with_identical_checksums(
    idoit_db: IdoitDB, scratch_mariadb: lab.ScratchMariaDB, tmp_path: Path
) -> None:
    dump = tmp_path / "dump.sql"
    lab.mysqldump_to(dump, idoit_db.databases)
    gz = tmp_path / "dump.sql.gz"
    with dump.open("rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    proc = scratch_mariadb.load(gz)
    assert proc.returncode == 0, proc.stderr
    assert scratch_mariadb.checksums(idoit_db.databases) == idoit_db.checksums
    assert lab.row_counts(idoit_db.databases, scratch_mariadb.socket) == idoit_db.row_counts


def test_scratch_server_is_private(scratch_mariadb: lab.ScratchMariaDB) -> None:
    assert scratch_mariadb.databases() == []
    assert scratch_mariadb.pid not in lab.mysqld_pids()
    assert lab.mysqladmin_ping(scratch_mariadb.socket)


def test_errno150_restore_over_changed_schema(idoit_db: IdoitDB, tmp_path: Path) -> None:
    """The reason restore-dump drops the databases first."""
    dump = tmp_path / "idoit.sql"
    # The product dumps --all-databases (verified by hand to fail the same way); the test dumps
    # only the i-doit databases so that it never rewrites other databases on a shared machine.
    lab.mysqldump_to(dump, idoit_db.databases)
    idoit_db.mutate_schema_for_errno150()
    idoit_db.mutate_data()

    plain = lab.load_sql(dump)
    assert plain.returncode != 0
    assert 'errno: 150 "Foreign key constraint is incorrectly formed"' in plain.stderr
    after = idoit_db.current_checksums()
    assert idoit_fixture.ERRNO150_LOST_TABLE not in after  # the restore lost a table

    lab.mysql_exec("DROP DATABASE idoit_data; DROP DATABASE idoit_system;")
    dropped_first = lab.load_sql(dump)
    assert dropped_first.returncode == 0, dropped_first.stderr
    assert idoit_db.current_checksums() == idoit_db.checksums
    assert idoit_fixture.ERRNO150_NEW_TABLE not in idoit_db.current_checksums()
    assert idoit_db.is_pristine()


def test_mysqldump_can_be_broken_mid_stream(idoit_db: IdoitDB, tmp_path: Path) -> None:
    idoit_fixture.add_broken_view()
    out = tmp_path / "broken.sql"
    with out.open("wb") as fh:
        proc = subprocess.run(
            ["mysqldump", *lab.DUMP_OPTIONS, "--databases", *idoit_db.databases],
            stdout=fh,
            stderr=subprocess.PIPE,
            check=False,
        )
    assert proc.returncode != 0
    assert b"isys_v_broken" in proc.stderr
    data = out.read_bytes()
    assert b"INSERT INTO `isys_obj`" in data  # it failed after streaming data
    assert b"-- Dump completed" not in data


def test_broken_service_fails_to_start_and_is_repaired(
    guest_services: lab.GuestServices,
) -> None:
    before = Path("/etc/default/cron").read_text()
    guest_services.break_start("cron")
    guest_services.stop("cron")
    # Debian's cron init script exits 0 even when cron did not start: check the status
    lab.run(lab.service_argv("cron", "start"), check=False)
    assert not guest_services.running("cron")
    assert lab.repair_service("cron")
    assert Path("/etc/default/cron").read_text() == before
    assert not lab.repair_service("cron")


def test_break_command_is_a_hook_command(ssh_guest: lab.SshGuest) -> None:
    command = lab.break_service_command("apache2")
    try:
        ssh_guest.ssh("sh", "-c", command)
        proc = lab.run(["apache2ctl", "configtest"], check=False)
        assert proc.returncode != 0
    finally:
        assert lab.repair_service("apache2")
    assert lab.run(["apache2ctl", "configtest"], check=False).returncode == 0


def test_require_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y some-package"):
        lab.require("snapcoord-no-such-command", "some-package")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must install it"):
        lab.require("snapcoord-no-such-command", "some-package")
    assert lab.require("sh") == shutil.which("sh")


def test_lab_cli_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.lab", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert proc.returncode == 0
    assert "guest" in proc.stdout

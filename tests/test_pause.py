"""Pausing writes, piece by piece: the lock session and the MySQL pause against a real (scratch)
MariaDB through the exec transport (this machine as the guest), the pure parts on their own.
End to end through the CLI and SSH: tests/test_pause_e2e.py."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from snapcoord.config import parse_table
from snapcoord.errors import ConfigError, PreflightError, SnapshotFailed
from snapcoord.guest import ExecTransport
from snapcoord.hooks import databases
from snapcoord.hooks.databases import mysql_pause, pause, postgresql
from snapcoord.secrets import Secret
from snapcoord.settings import DumpConfig, GuestConfig
from tests import lab
from tests.guest_fixtures import wait_for


def guest(**overrides: object) -> GuestConfig:
    table = {"transport": "exec", "database": "mariadb", "consistency": "pause", **overrides}
    return parse_table(GuestConfig, table)


def dump_options(server: lab.ScratchMariaDB) -> DumpConfig:
    return parse_table(DumpConfig, {"options": [f"--socket={server.socket}", "--user=root"]})


def write_commits(server: lab.ScratchMariaDB, *, wait: int = 1) -> bool:
    """Does an InnoDB commit go through within ``wait`` seconds?"""
    result = lab.mysql_exec(
        f"SET SESSION lock_wait_timeout = {wait}; INSERT INTO t.w VALUES (1);",
        server.socket,
        check=False,
        timeout=wait + 30,
    )
    return result.returncode == 0


@pytest.fixture
def server(scratch_mariadb: lab.ScratchMariaDB) -> lab.ScratchMariaDB:
    scratch_mariadb.sql("CREATE DATABASE t; CREATE TABLE t.w (v INT) ENGINE=InnoDB;")
    return scratch_mariadb


def make_pause(server: lab.ScratchMariaDB, **overrides: object) -> mysql_pause.MySQLPause:
    transport = ExecTransport([], vm="db1")
    g, options = guest(**overrides), dump_options(server)
    plan = mysql_pause.check_pause(transport, vm="db1", guest=g, options=options)
    return mysql_pause.MySQLPause(
        transport, vm="db1", guest=g, options=options, plan=plan, run_id="unit"
    )


@pytest.mark.parametrize("method", ["backup_stage", "ftwrl"])
def test_hold_blocks_commits_until_release(server: lab.ScratchMariaDB, method: str) -> None:
    held = make_pause(server, pause_method=method)
    try:
        held.hold()
        assert held.result.method == method and held.result.connection_id
        assert not write_commits(server)
        assert server.sql("SELECT COUNT(*) FROM t.w").stdout.strip() == "0"  # reads go on
        held.check_alive()
        held.verify()
    finally:
        held.release()
    assert write_commits(server)
    assert held.result.seconds is not None and held.result.seconds > 1
    assert not held.session.alive


def test_the_guest_time_limit_ends_the_lock(server: lab.ScratchMariaDB) -> None:
    held = make_pause(server, pause_timeout=5.0)
    held.hold()
    try:
        assert not write_commits(server)
        time.sleep(max(0.0, held.remaining()) + 0.5)
        assert write_commits(server)  # killed by timeout -s KILL in the guest
        with pytest.raises(pause.LockLost, match="lock"):
            held.check_alive()
        with pytest.raises(pause.LockLost, match="crash-consistent"):
            held.verify()
    finally:
        held.release()


def sleeping(server: lab.ScratchMariaDB) -> bool:
    """A ``SELECT SLEEP(...)`` has run in the server long enough to count as a long statement
    (``mysql_pause.LONG_STATEMENT_SECONDS``), as its process list says."""
    rows = lab.mysql_rows(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP(%'"
        f" AND TIME >= {mysql_pause.LONG_STATEMENT_SECONDS}",
        server.socket,
    )
    return rows[0][0] != "0"


def test_a_long_statement_refuses_before_anything_is_held(server: lab.ScratchMariaDB) -> None:
    sleeper = subprocess.Popen(
        [*lab.mysql_argv(server.socket), "-e", "SELECT SLEEP(30)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: sleeping(server), 30, "the long statement to run")
        held = make_pause(server, pause_method="ftwrl")
        with pytest.raises(PreflightError, match=r"not pausing writes: id \d+ running"):
            held.hold()
        assert write_commits(server)  # nothing was held
        held.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_long_statement_is_named_by_its_kind_never_by_its_text(
    server: lab.ScratchMariaDB,
) -> None:
    """issue 23, finding 15: the text of another session's SQL may hold a password."""
    sleeper = subprocess.Popen(
        [*lab.mysql_argv(server.socket), "-e", "SELECT SLEEP(30), 'hunter2-secret'"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: sleeping(server), 30, "the long statement to run")
        held = make_pause(server, pause_method="ftwrl")
        with pytest.raises(PreflightError) as caught:
            held.hold()
        assert "hunter2" not in str(caught.value)
        assert "a SELECT statement of user root" in str(caught.value), caught.value
        held.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_kill_sessions_ends_marked_clients(server: lab.ScratchMariaDB) -> None:
    held = make_pause(server)
    held.hold()
    assert not write_commits(server)
    transport = ExecTransport([], vm="db1")
    # another run's sessions only: this one (run "unit") is left alone, commits stay held
    assert (
        pause.kill_sessions(transport, runs=["uni", "unit2"], vm="db1", sudo=False, timeout=30)
        == []
    )
    assert not write_commits(server)
    killed = pause.kill_sessions(transport, runs=["unit"], vm="db1", sudo=False, timeout=30)
    assert killed
    assert write_commits(server, wait=5)
    held.release()


def test_prove_writes_commits_and_leaves_nothing(server: lab.ScratchMariaDB) -> None:
    transport = ExecTransport([], vm="db1")
    mysql_pause.prove_writes(
        transport, vm="db1", guest=guest(), options=dump_options(server), run_id="r1"
    )
    assert "snapcoord_probe" not in server.databases()
    held = make_pause(server, pause_timeout=30.0)
    held.hold()
    try:
        with pytest.raises(SnapshotFailed, match="test write did not commit"):
            mysql_pause.prove_writes(
                transport, vm="db1", guest=guest(), options=dump_options(server), run_id="r2"
            )
    finally:
        held.release()


def test_check_pause_reads_the_server(server: lab.ScratchMariaDB) -> None:
    transport = ExecTransport([], vm="db1")
    plan = mysql_pause.check_pause(transport, vm="db1", guest=guest(), options=dump_options(server))
    assert plan.method == "backup_stage"  # MariaDB 10.11
    assert plan.datadir and Path(plan.datadir).is_dir()
    assert plan.binlog is False  # the scratch server runs without a binary log
    assert "BACKUP STAGE BLOCK_COMMIT" in plan.statements
    server.sql("CREATE TABLE t.m (i INT) ENGINE=MyISAM")
    plan = mysql_pause.check_pause(transport, vm="db1", guest=guest(), options=dump_options(server))
    assert "1 MyISAM table(s)" in plan.sync
    assert plan.extra["non_transactional_tables"] == {"MyISAM": 1}


# -- pure parts --------------------------------------------------------------------------------


def test_position_query_follows_the_server() -> None:
    assert "SHOW MASTER STATUS" in mysql_pause.position_sql("10.11.6-MariaDB-0+deb12u1")
    assert "gtid_binlog_pos" in mysql_pause.position_sql("10.11.6-MariaDB")
    assert "SHOW MASTER STATUS" in mysql_pause.position_sql("8.0.36")
    assert "SHOW BINARY LOG STATUS" in mysql_pause.position_sql("8.4.0")
    rows = [["binlog", "0-1-42"], ["bin.000003", "1234", "", ""]]
    assert mysql_pause._position(rows) == {"gtid": "0-1-42", "file": "bin.000003", "offset": "1234"}


@pytest.mark.parametrize(
    ("version", "expected"),
    [("10.11.6-MariaDB", True), ("10.4.0-MariaDB", True), ("10.3.39-MariaDB", False),
     ("8.0.36", False), ("11.4.2-MariaDB-log", True)],
)  # fmt: skip
def test_backup_stage_needs_mariadb_10_4(version: str, expected: bool) -> None:
    assert mysql_pause._supports_backup_stage(version) is expected


def test_lock_wait_is_a_third_of_pause_timeout_at_most_10_s() -> None:
    assert mysql_pause.lock_wait(guest(pause_timeout=6.0)) == 2
    assert mysql_pause.lock_wait(guest(pause_timeout=60.0)) == 10
    assert mysql_pause.lock_wait(guest(pause_timeout=5.0)) == 1


def test_postgresql_refuses_to_pause() -> None:
    with pytest.raises(PreflightError, match="not possible with PostgreSQL") as info:
        postgresql.check_pause(
            ExecTransport([], vm="pg1"),
            vm="pg1",
            guest=guest(),
            options=parse_table(DumpConfig, {}),
        )
    assert info.value.hint and "consistency = 'stop'" in info.value.hint
    assert databases.get("postgresql").PAUSE_METHODS == {}
    assert set(databases.get("mysql").PAUSE_METHODS) == {"backup_stage", "ftwrl"}


def test_config_rejects_unknown_consistency() -> None:
    with pytest.raises(ConfigError, match="consistency"):
        parse_table(GuestConfig, {"transport": "exec", "consistency": "freeze"})
    with pytest.raises(ConfigError, match="pause_timeout"):
        parse_table(GuestConfig, {"transport": "exec", "pause_timeout": 1})


def test_a_killed_lock_session_leaves_no_password_behind(server: lab.ScratchMariaDB) -> None:
    """Issue 23, finding 11: the client's option file (user and password) reaches it on a pipe,
    never as a file; a lock session killed as after a revert or a dead holder leaves nothing
    with the password anywhere in the guest's /tmp or /run."""
    password = "pause-Secret-7f3a"
    server.sql(
        "CREATE USER 'pauser'@'localhost' IDENTIFIED BY 'pause-Secret-7f3a';"
        "GRANT RELOAD, PROCESS ON *.* TO 'pauser'@'localhost';"
    )
    options = parse_table(DumpConfig, {"options": [f"--socket={server.socket}"], "user": "pauser"})
    options = replace(options, password=Secret("env:TEST", password))
    transport = ExecTransport([], vm="db1")
    g = guest(pause_method="backup_stage")
    plan = mysql_pause.check_pause(transport, vm="db1", guest=g, options=options)
    held = mysql_pause.MySQLPause(
        transport, vm="db1", guest=g, options=options, plan=plan, run_id="unit"
    )
    try:
        held.hold()
        assert not write_commits(server)
        sessions = [pid for pid, _c, args in lab.process_table() if pause.MARKER_PREFIX in args]
        assert sessions, "the lock session runs"
        fds = [os.readlink(f"/proc/{pid}/fd/9") for pid in sessions if os.path.exists(
            f"/proc/{pid}/fd/9")]  # fmt: skip
        assert fds and all(fd.startswith("pipe:") for fd in fds), fds
        assert pause.kill_sessions(transport, runs=["unit"], vm="db1", sudo=False, timeout=30)
        wait_for(lambda: write_commits(server), 30, "commits to flow after the kill")
    finally:
        held.release()
    found = lab.run(["grep", "-rlF", "--exclude-dir=pytest-of-*", "--exclude-dir=libvirt", password,
                     "/tmp", "/run"], check=False)  # fmt: skip
    assert found.stdout == "", f"the password was left in {found.stdout}"

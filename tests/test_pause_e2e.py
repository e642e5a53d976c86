"""``consistency = "pause"`` end to end: the CLI in a child process, libvirt's test driver (its
``create_snapshot`` made slow on purpose, tests/guest_fixtures.py), and the loopback guest's real
MariaDB (binary log on), Apache and cron behind a real sshd. A writer commits a row every 10 ms
and a reader times a SELECT every 10 ms while the snapshot is taken (tests/pause_load.py).

Checked by state: which commits were acknowledged when (by their GTIDs), how long reads took,
the server processes' PIDs, whether writes go on after a fault."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import lab, pause_load
from tests.cli_helpers import json_lines, snapcoord
from tests.faultproxy import FaultProxy, known_hosts_for
from tests.guest_fixtures import (
    guest_config,
    lab_services,  # noqa: F401 - fixture
    popen_observed,
    run_observed,
    wait_for,
)
from tests.libvirt_nodes import libvirt_node, naming_run, write_node  # noqa: F401 - fixture

MARKER = "snapcoord-pause:"
REVERT_TARGET = "snapcoord-manual-20260101T020000Z"  # a running-state snapshot of db1 in the node
SNAPSHOT_RUN = "20260101T020000Z-aaaaaa"  # the run that took it (staged: naming_run)


@pytest.fixture
def paused_lab(lab_services: lab.GuestServices) -> Iterator[lab.GuestServices]:
    """The lab services with the binary log on and a fresh table for the writer."""
    pause_load.ensure_binlog()
    pause_load.reset_schema()
    yield lab_services
    assert lock_sessions() == [], "a lock session outlived its run"
    pause_load.drop_schema()


def lock_sessions() -> list[int]:
    """PIDs of snapcoord lock sessions on this machine (the guest)."""
    return [pid for pid, _comm, args in lab.process_table() if MARKER in args]


def service_pids() -> dict[str, int]:
    """The main process of each service: a restart changes it."""
    table = list(lab.process_table())
    return {
        "mysqld": min(lab.mysqld_pids()),
        "apache2": min(pid for pid, comm, _ in table if comm == "apache2"),
        "cron": min(pid for pid, comm, _ in table if comm == "cron"),
    }


def pause_config(tmp_path: Path, uri: str, guest: dict[str, Any], **kw: Any) -> Path:
    table = {"consistency": "pause", "pause_timeout": 20.0, **guest}
    return guest_config(tmp_path, uri, table, **kw)


def run_snapshot(config: Path, tmp_path: Path, *, snapshot_seconds: float = 0) -> tuple[
    int, dict[str, Any], str
]:  # fmt: skip
    proc = run_observed(
        "-c", str(config), "snapshot", "web1", "--json",
        observe=tmp_path / "o.jsonl", snapshot_seconds=snapshot_seconds,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    (summary,) = json_lines(proc.stdout)
    return proc.returncode, summary, proc.stderr


def assert_writes_flow(load: pause_load.Load, within: float) -> float:
    """A commit is acknowledged again within ``within`` seconds; returns how long it took."""
    mark = time.time()
    return wait_for(lambda: load.last_ack() > mark, within, "a commit to be acknowledged")


@pytest.mark.parametrize("method", ["backup_stage", "ftwrl"])
def test_pause_holds_commits_but_not_reads_and_stops_nothing(
    method: str,
    ssh_guest: lab.SshGuest,
    paused_lab: lab.GuestServices,
    tmp_path: Path,
    libvirt_node: str,
) -> None:
    guest = ssh_guest.guest_table(pause_method=method)
    config = pause_config(tmp_path, libvirt_node, guest)
    before = service_pids()
    uptime = paused_lab.mariadb_uptime()
    started = time.time()

    with pause_load.Load() as load:
        load.settle()
        code, summary, stderr = run_snapshot(config, tmp_path, snapshot_seconds=1.0)
        load.settle()

    assert code == 0, stderr
    assert summary["consistency"] == "pause" and summary["window_seconds"] is None
    pause = summary["pause"]
    assert pause["method"] == method
    held_from, release_sent = pause["held_from"], pause["release_sent"]
    assert held_from < release_sent
    # Commits: none acknowledged while held. A commit after the recorded position was
    # acknowledged only after the release was sent; the position is the last commit before.
    position = pause_load.gtid_seq(summary["position"]["gtid"])
    commits = load.commits()
    early = [seq for got, seq in commits if got < release_sent]
    late = [(got, seq) for got, seq in commits if seq > position]
    assert max(early) == position, (early[-5:], position)
    assert late and all(got > release_sent for got, _ in late)
    # Nothing committed while held: a commit sent once the lock held is acknowledged only after
    # the release. One acknowledged in between was committed before the lock (at or before the
    # position) and its answer was still on its way: the writer reads the answer from a pipe and
    # stamps it when its thread runs, which on a loaded machine is after held_from (seen once).
    assert not any(held_from < sent and got < release_sent for sent, got, _ in load.sent_commits())
    assert all(seq <= position for got, seq in commits if held_from < got < release_sent)
    # The writer really was held for the snapshot call (1 s), and writes went on after.
    assert summary["write_pause_seconds"] >= 1.0
    assert late[0][0] - held_from >= 1.0
    # Reads went on throughout: none sent while held took 200 ms or more.
    during = [latency for sent, latency in load.reads() if held_from <= sent <= release_sent]
    assert len(during) >= 10 and max(during) < 0.2, during
    # Nothing was stopped or restarted.
    assert service_pids() == before
    assert paused_lab.mariadb_uptime() >= uptime + int(time.time() - started) - 1
    assert paused_lab.states() == {"mariadb": True, "apache2": True, "cron": True}
    assert not any(s["name"] in ("stop services", "stop database") for s in summary["steps"])


def test_human_output_says_how_long_writes_were_paused(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    config = pause_config(tmp_path, libvirt_node, ssh_guest.guest_table())
    proc = run_observed("-c", str(config), "snapshot", "web1", observe=tmp_path / "o.jsonl")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "writes paused" in last and "no service stopped" in last, last
    assert "service window" not in last


def test_dump_runs_before_the_pause_with_single_transaction(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    guest = ssh_guest.guest_table(dump=True)
    config = pause_config(tmp_path, libvirt_node, guest)
    tables = {"vms.web1.dump": {"options": ["--routines"], "databases": [pause_load.SCHEMA]}}
    config.write_text(config.read_text() + _toml(tables))
    before = service_pids()

    with pause_load.Load() as load:
        load.settle()
        code, summary, stderr = run_snapshot(config, tmp_path)

    assert code == 0, stderr
    assert service_pids() == before
    folder = Path(summary["store_folder"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "--single-transaction" in manifest["mysqldump"]["options"]
    record = manifest["consistency"]
    assert record["mode"] == "pause"
    assert record["dump_precedes_snapshot_seconds"] >= 0
    assert record["position_at_dump"]["gtid"]
    assert record["snapshot_position"] == summary["position"]
    steps = [s["name"] for s in summary["steps"] if not s["undo"]]
    assert steps.index("dump to store") < steps.index("pause writes")


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, table in tables.items():
        out.append(f"\n[{name}]")
        out += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(out) + "\n"


def _hold_then(
    config: Path, tmp_path: Path, fault: Any, *, snapshot_seconds: float = 60
) -> tuple[pause_load.Load, subprocess.Popen[str], float, str]:
    """Start a run whose snapshot call takes long; once commits stall, apply ``fault``; return
    the load, the run's process, how long writes took to flow again, and the run's output."""
    with pause_load.Load() as load:
        load.settle()
        proc = popen_observed(
            "-c", str(config), "snapshot", "web1", "--json",
            observe=tmp_path / "o.jsonl", snapshot_seconds=snapshot_seconds,
        )  # fmt: skip
        try:
            wait_for(lambda: load.stalled_for() > 1.0, 60, "commits to be held")
            assert lock_sessions(), "no lock session in the guest while commits are held"
            fault(proc)
            resumed = assert_writes_flow(load, within=25)
            stdout, _stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return load, proc, resumed, stdout


def test_sigkill_while_held_releases_the_lock(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    config = pause_config(tmp_path, libvirt_node, ssh_guest.guest_table())
    before = service_pids()

    _load, proc, resumed, _ = _hold_then(config, tmp_path, lambda p: p.send_signal(signal.SIGKILL))

    assert proc.returncode == -signal.SIGKILL
    assert resumed < 20  # within the guest-side limit (pause_timeout = 20 s); EOF ends it sooner
    wait_for(lambda: not lock_sessions(), 25, "the lock session to end")
    assert service_pids() == before
    # The next run finds nothing stopped, clears the killed run's journal and succeeds.
    code, summary, stderr = run_snapshot(config, tmp_path)
    assert code == 0, stderr
    assert summary["consistency"] == "pause"


def test_sigterm_while_held_releases_the_lock_and_exits_130(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    config = pause_config(tmp_path, libvirt_node, ssh_guest.guest_table())

    _load, proc, resumed, stdout = _hold_then(
        config, tmp_path, lambda p: p.send_signal(signal.SIGTERM), snapshot_seconds=5
    )

    assert proc.returncode == 130, stdout
    assert resumed < 10  # the unwind released it (the snapshot call was let finish first)
    (summary,) = json_lines(stdout)
    assert "resume writes" in [s["name"] for s in summary["steps"] if s["ok"]]
    assert summary["write_pause_seconds"] > 0


def test_ssh_connection_cut_while_held_releases_the_lock(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    config = pause_config(tmp_path, libvirt_node, ssh_guest.guest_table())

    def cut(_proc: subprocess.Popen[str]) -> None:
        assert lab.cut_server_side(ssh_guest), "no sshd child served the run's connection"

    _load, proc, resumed, stdout = _hold_then(config, tmp_path, cut, snapshot_seconds=5)

    assert resumed < 20
    (summary,) = json_lines(stdout)
    assert proc.returncode == 5  # the lock was lost: the snapshot is not at a known point
    assert any("crash-consistent" in e for e in summary["errors"]), summary["errors"]
    wait_for(lambda: not lock_sessions(), 25, "the lock session to end")


def test_a_stalled_connection_ends_the_lock_at_the_guest_time_limit(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    """The network stalls (no FIN, no RST): sshd does not notice, only the guest's time limit
    (pause_timeout = 8 s) ends the session."""
    proxy = FaultProxy((ssh_guest.host, ssh_guest.port)).start()
    try:
        known = known_hosts_for(
            ssh_guest.workdir / "host_ed25519.pub", proxy.port, tmp_path / "known_hosts.proxy"
        )
        guest = ssh_guest.guest_table(port=proxy.port, known_hosts=str(known), pause_timeout=8.0)
        config = guest_config(tmp_path, libvirt_node, {"consistency": "pause", **guest})

        _load, proc, resumed, stdout = _hold_then(
            config, tmp_path, lambda p: proxy.stall(120), snapshot_seconds=30
        )

        assert resumed < 8  # the stall came after the session started: its limit ends it
        assert proc.returncode == 5, stdout
        (summary,) = json_lines(stdout)
        assert any("crash-consistent" in e for e in summary["errors"]), summary["errors"]
    finally:
        proxy.stop()


def test_pause_timeout_spent_during_the_snapshot_fails_with_exit_5(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    guest = ssh_guest.guest_table(pause_timeout=6.0)
    config = guest_config(tmp_path, libvirt_node, {"consistency": "pause", **guest})
    before = service_pids()

    code, _summary, stderr = run_snapshot(config, tmp_path, snapshot_seconds=9)

    assert code == 5, stderr
    assert "crash-consistent" in stderr
    assert len(stderr.strip().splitlines()) <= 2, stderr
    assert service_pids() == before
    pause_load.reset_schema()  # writes commit again
    lab.mysql_exec(f"INSERT INTO {pause_load.SCHEMA}.w (v) VALUES (1)", timeout=10)


@pytest.mark.parametrize("method", ["ftwrl", "backup_stage"])
def test_a_long_statement_is_refused_before_anything_is_held(
    method: str,
    ssh_guest: lab.SshGuest,
    paused_lab: lab.GuestServices,
    tmp_path: Path,
    libvirt_node: str,
) -> None:
    guest = ssh_guest.guest_table(pause_method=method)
    config = pause_config(tmp_path, libvirt_node, guest)
    table = f"{pause_load.SCHEMA}.other"  # not the writer's: a waiting DDL would block it
    lab.mysql_exec(f"CREATE TABLE {table} (i INT) ENGINE=InnoDB; INSERT INTO {table} VALUES (1)")
    blockers: list[subprocess.Popen[str]] = []
    if method == "ftwrl":  # a long SELECT: FTWRL would wait behind it, blocking readers
        blockers.append(_client(f"SELECT SLEEP(60) FROM {table} LIMIT 1;"))
    else:  # a DDL waiting behind an open transaction's metadata lock
        blockers.append(_client(f"BEGIN; SELECT * FROM {table}; SELECT SLEEP(60);"))
        wait_for(lambda: running_statements("SELECT SLEEP(60)"), 30, "the open transaction")
        blockers.append(_client(f"ALTER TABLE {table} ADD COLUMN x INT;"))
    try:
        wait_for(lambda: running_statements(("SELECT SLEEP(60)", "ALTER TABLE")[len(blockers) - 1]),
                 30, "the blocking statement")  # fmt: skip
        before = lock_statements()
        with pause_load.Load() as load:
            load.settle()
            code, summary, stderr = run_snapshot(config, tmp_path)
            load.settle()
        after = lock_statements()
    finally:
        for blocker in blockers:
            blocker.kill()
            blocker.wait()
    assert code == 4, stderr
    assert "not pausing writes" in stderr and "running" in stderr
    assert "hypervisor snapshot" not in [s["name"] for s in summary["steps"]]
    # Nothing was held: the server ran no BACKUP STAGE and no FLUSH, and commits went on.
    assert after == before
    assert summary["write_pause_seconds"] is None
    assert load.commits() and load.writer.error is None


def running_statements(prefix: str) -> bool:
    """A statement starting with ``prefix`` runs (or waits) in the guest's server right now."""
    like = prefix.replace("\\", "\\\\").replace("'", "''").replace("%", "\\%") + "%"
    rows = lab.mysql_rows(
        f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE '{like}'"
    )
    return rows[0][0] != "0"


def lock_statements() -> dict[str, int]:
    """How many BACKUP STAGE and FLUSH statements the guest's server has run (counters)."""
    rows = lab.mysql_rows("SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_backup', 'Com_flush')")
    return {name: int(value) for name, value in rows}


def _client(sql: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["mysql", "--batch", "-N", "-e", sql],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_revert_ends_a_lock_session_the_snapshot_brought_back_and_proves_a_write(
    ssh_guest: lab.SshGuest, paused_lab: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    """A RAM snapshot taken while writes were held resumes with that lock session. libvirt's
    test driver holds no guest memory, so the resumed session is staged: a client holding
    BACKUP STAGE BLOCK_COMMIT with the snapcoord marker of the run that took the snapshot (its
    description names it), as the snapshot's would be."""
    node = write_node(tmp_path / "node", naming_run(REVERT_TARGET, SNAPSHOT_RUN))
    config = pause_config(tmp_path, node, ssh_guest.guest_table(), vm="db1")
    holder = subprocess.Popen(
        [
            *lab.mysql_argv(None, "--unbuffered", "--skip-reconnect"),
            f"--init-command=SET @m='{MARKER}{SNAPSHOT_RUN}'",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin and holder.stdout
    holder.stdin.write("BACKUP STAGE START; BACKUP STAGE BLOCK_COMMIT; SELECT 'held';\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "held"
    blocked = lab.run(
        lab.mysql_argv(None, "-e", f"SET SESSION lock_wait_timeout = 1;"
                       f"INSERT INTO {pause_load.SCHEMA}.w (v) VALUES (1)"),
        check=False,
    )  # fmt: skip
    assert blocked.returncode != 0  # the staged session really holds commits

    proc = run_observed(
        "-c", str(config), "revert", "db1", "--to", REVERT_TARGET, "--yes", "--json",
        observe=tmp_path / "r.jsonl",
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert holder.wait(timeout=10) == -signal.SIGKILL, result
    assert any("lock session" in n for n in result["notes"]), result["notes"]
    assert any("test write committed" in n for n in result["notes"]), result["notes"]
    lab.mysql_exec(f"INSERT INTO {pause_load.SCHEMA}.w (v) VALUES (2)", timeout=10)
    assert lab.mysql_rows("SHOW DATABASES LIKE 'snapcoord_probe'") == []


def test_dry_run_shows_the_sql_plan(tmp_path: Path) -> None:
    guest = {"host": "db1.example.org", "consistency": "pause", "database": "mariadb"}
    config = guest_config(tmp_path, "test:///default", guest)
    proc = snapcoord("-c", str(config), "snapshot", "web1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "pause writes" in out and "BACKUP STAGE BLOCK_COMMIT" in out
    assert "FLUSH TABLES WITH READ LOCK" in out  # auto: the method is chosen by the version
    assert "resume writes" in out
    assert "stop services" not in out and "arm guest watchdog" not in out


def test_pause_without_a_database_is_refused_in_preflight(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    guest = ssh_guest.guest_table(database="none")
    config = pause_config(tmp_path, libvirt_node, guest)
    before = service_pids()

    code, summary, stderr = run_snapshot(config, tmp_path)

    assert code == 4, stderr
    (line,) = stderr.strip().splitlines()
    assert "web1: consistency = 'pause' needs a database" in line and "consistency = 'stop'" in line
    assert "hypervisor snapshot" not in [s["name"] for s in summary["steps"]]
    assert service_pids() == before

"""``status``: the last run, an unfinished run, and snapcoord's own snapshots — from the Proxmox
API double after real ``snapcoord snapshot`` runs through the CLI, or ``--offline`` from the
store; an unreachable hypervisor is one error line (exit 3) that suggests --offline."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from snapcoord import inventory, status
from snapcoord.adapters.base import MARKER
from snapcoord.config import Config, load_config
from snapcoord.journal import Journal
from snapcoord.status import human_bytes, status_vm
from tests.cli_helpers import json_lines, snapcoord, write_config
from tests.pve_api import PveApiDouble
from tests.pve_api.cluster import Snap
from tests.pve_api.testing import TOKEN_ID, TOKEN_SECRET, Cert, make_cert, start_double

TOKEN_ENV = "SNAPCOORD_TEST_PVE_TOKEN"
DAY = 86400.0


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("status-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert, task_seconds=0.05)
    yield server
    server.stop()


def pve_tables(tmp_path: Path, port: int, cert: Cert, **defaults: Any) -> dict[str, Any]:
    """db (qemu 100), ct (lxc 101), remote (qemu 201) on the double; no guest tables."""
    return {
        "defaults": {"store": str(tmp_path / "store"), "label": "nightly", **defaults},
        "hypervisors.pve": {
            "type": "proxmox",
            "host": "127.0.0.1",
            "port": port,
            "token_id": TOKEN_ID,
            "token_secret": {"env": TOKEN_ENV},
            "ca_file": str(cert.cert),
            "lock_wait_seconds": 1.0,
        },
        "vms.db": {"hypervisor": "pve", "name": "db1"},
        "vms.ct": {"hypervisor": "pve", "vmid": 101},
        "vms.remote": {"hypervisor": "pve", "vmid": 201},
    }


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return snapcoord("-c", str(config), *args, env={TOKEN_ENV: TOKEN_SECRET})


def load(path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv(TOKEN_ENV, TOKEN_SECRET)
    return load_config(str(path))


def add_snapshot(double: PveApiDouble, vmid: int, name: str, age: float, *, own: bool) -> None:
    description = f"{MARKER} label=nightly run=r-{name}" if own else "taken by hand"
    snap = Snap(name=name, snaptime=int(time.time() - age), description=description)
    double.cluster.guests[vmid].snapshots[name] = snap


def test_status_after_real_runs(
    double: PveApiDouble, cert: Cert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "c.toml", pve_tables(tmp_path, double.port, cert))
    add_snapshot(double, 100, "snapcoord-nightly-old", 6 * DAY, own=True)
    add_snapshot(double, 100, "before-upgrade", 30 * DAY, own=False)  # not snapcoord's
    proc = cli(path, "snapshot", "db", "--json")
    assert proc.returncode == 0, proc.stderr
    (run,) = json_lines(proc.stdout)
    config = load(path, monkeypatch)

    outcome = status_vm(config, "db", offline=False)
    assert outcome.exit_code == 0 and outcome.errors == []
    summary = outcome.summary
    assert summary["vm"] == "db" and summary["command"] == "status" and summary["ok"] is True
    last = summary["last_run"]
    assert last["run"] == run["run"] and last["command"] == "snapshot" and last["ok"] is True
    assert last["snapshot"] == run["snapshot"] and last["exit_code"] == 0
    assert (
        last["ended"] == datetime.fromtimestamp(run["steps"][-1]["ended"]).astimezone().isoformat()
    )
    assert 0 < last["duration_seconds"] < 30
    assert summary["unfinished_run"] is None
    snaps = summary["snapshots"]
    assert snaps["source"] == "hypervisor" and snaps["count"] == 2
    assert 6 * DAY - 60 < snaps["oldest_age_seconds"] < 6 * DAY + 60
    assert 0 <= snaps["newest_age_seconds"] < 60
    (line,) = outcome.lines
    assert line.startswith("db: last snapshot ok ")
    assert "; 2 snapshots, newest " in line and line.endswith(" s, oldest 6 d")
    assert json.loads(json.dumps(summary)) == summary  # plain JSON

    # what was seen is kept: --offline shows it without the hypervisor
    double.stop()
    offline = status_vm(config, "db", offline=True)
    assert offline.exit_code == 0
    assert offline.summary["snapshots"]["source"] == "store"
    assert offline.summary["snapshots"]["count"] == 2
    assert " 2 snapshots as seen at " in offline.lines[0]


def test_unreachable_hypervisor_is_one_line_and_suggests_offline(
    double: PveApiDouble, cert: Cert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "c.toml", pve_tables(tmp_path, double.port, cert))
    assert cli(path, "snapshot", "ct").returncode == 0
    double.stop()
    outcome = status_vm(load(path, monkeypatch), "ct", offline=False)
    assert outcome.exit_code == 3
    (error,) = outcome.errors
    assert error.startswith("ct: cannot list snapshots on hypervisor pve: ")
    assert "--offline" in error and "Traceback" not in error and "\n" not in error
    assert outcome.summary["ok"] is False and outcome.summary["exit_code"] == 3
    assert outcome.summary["last_run"]["ok"] is True  # what is known is still shown
    assert outcome.lines[0].startswith("ct: last snapshot ok ")


def test_a_failed_last_run_is_information_not_a_failure(
    double: PveApiDouble, cert: Cert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "c.toml", pve_tables(tmp_path, double.port, cert))
    double.cluster.lock_guest(201, "backup")
    proc = cli(path, "snapshot", "remote")
    assert proc.returncode == 3, proc.stderr
    outcome = status_vm(load(path, monkeypatch), "remote", offline=False)
    assert outcome.exit_code == 0 and outcome.summary["ok"] is True
    last = outcome.summary["last_run"]
    assert last["ok"] is False and last["exit_code"] == 3 and "locked" in last["errors"][0]
    assert "remote: last snapshot FAILED (exit 3) " in outcome.lines[0]
    assert "; 0 snapshots" in outcome.lines[0]
    assert outcome.lines[1].startswith("remote:   error: ") and "locked" in outcome.lines[1]


# -- from files only (offline) -------------------------------------------------------------------


@pytest.fixture
def offline_config(tmp_path: Path) -> Config:
    tables = {
        "defaults": {"store": str(tmp_path / "store")},
        "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
        "vms.db1": {"hypervisor": "lab", "name": "test"},
    }
    return load_config(str(write_config(tmp_path / "c.toml", tables)))


def write_last_run(config: Config, key: str, summary: dict[str, Any]) -> None:
    Journal(config.store, key).finish(summary)


NOW = datetime(2026, 12, 1, 5, 0, 12).astimezone().timestamp()


def realistic_run(ended: float, *, ok: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "vm": "db1",
        "ok": ok,
        "exit_code": 0 if ok else 5,
        "run": "20261201T030000Z-ab12",
        "command": "snapshot",
        "snapshot": "snapcoord-nightly-20261201T030005Z",
        "notes": [],
        "window_seconds": 4.412,
        "services_down": [],
        "errors": [] if ok else ["db1: snapshot failed: disk full", "db1: second"],
        "steps": [
            {"name": "connect to hypervisor lab", "started": ended - 12.5, "ended": ended - 12.4},
            {"name": "hypervisor snapshot", "started": ended - 5.0, "ended": ended - 1.0},
            {"name": "start services", "started": ended - 1.0, "ended": ended},
        ],
        "dump": {"file": "all.sql.gz", "bytes": int(12.3 * 1024 * 1024), "sql_bytes": 99},
        **extra,
    }


def test_the_human_line(offline_config: Config) -> None:
    ended = NOW - 2 * 3600
    write_last_run(offline_config, "db1", realistic_run(ended))
    seen = datetime.fromtimestamp(NOW - 600).astimezone()
    times = [datetime.fromtimestamp(NOW - age).astimezone() for age in (6 * DAY, 2 * 3600)]
    inventory.record(offline_config.store, "db1", [], now=seen)  # the file's shape
    data = {
        "seen_at": seen.isoformat(),
        "count": 7,
        "oldest": times[0].isoformat(),
        "newest": times[1].isoformat(),
    }
    (offline_config.store / "journal" / "db1.inventory.json").write_text(json.dumps(data))
    outcome = status_vm(offline_config, "db1", offline=True, now=NOW)
    assert outcome.exit_code == 0
    assert outcome.lines == [
        "db1: last snapshot ok 2026-12-01 03:00:12 (2 h ago), window 4.4 s, dump 12.3 MiB; "
        "7 snapshots as seen at 2026-12-01 04:50:12, newest 2 h, oldest 6 d"
    ]
    last = outcome.summary["last_run"]
    assert last["duration_seconds"] == 12.5 and last["dump_bytes"] == int(12.3 * 1024 * 1024)
    assert last["window_seconds"] == 4.412


def test_nothing_known(offline_config: Config) -> None:
    outcome = status_vm(offline_config, "db1", offline=True, now=NOW)
    assert outcome.exit_code == 0 and outcome.lines == ["db1: no run recorded"]
    assert outcome.summary["last_run"] is None and outcome.summary["snapshots"] is None


def test_failed_run_without_steps_uses_the_file_time(offline_config: Config) -> None:
    write_last_run(
        offline_config, "db1", {"vm": "db1", "ok": False, "exit_code": 4, "command": "revert"}
    )
    outcome = status_vm(offline_config, "db1", offline=True)
    assert outcome.lines[0].startswith("db1: last revert FAILED (exit 4) ")
    assert outcome.lines[0].endswith("(0 s ago)")


def test_a_run_in_progress(offline_config: Config) -> None:
    write_last_run(offline_config, "db1", realistic_run(NOW - 86400))
    Journal(offline_config.store, "db1").write(
        {"run": "r2", "vm": "db1", "stopped": ["apache2"], "pid": os.getpid(), "pending": []}
    )
    outcome = status_vm(offline_config, "db1", offline=True, now=NOW)
    assert outcome.summary["unfinished_run"] == {
        "run": "r2",
        "pid": os.getpid(),
        "pid_alive": True,
        "snapshot": None,
        "stopped": ["apache2"],
        "freeze": None,
    }
    assert outcome.lines[-1] == f"db1: run r2 in progress (pid {os.getpid()})"


def test_an_unfinished_run_whose_process_is_gone(offline_config: Config) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    Journal(offline_config.store, "db1").write(
        {"run": "r3", "vm": "db1", "stopped": ["mariadb", "cron"], "pid": child.pid}
    )
    outcome = status_vm(offline_config, "db1", offline=True, now=NOW)
    assert outcome.exit_code == 0
    assert outcome.summary["unfinished_run"]["pid_alive"] is False
    assert outcome.lines == [
        "db1: no run recorded",
        f"db1: unfinished run r3 (pid {child.pid} gone; may be down: mariadb, cron): "
        "see `snapcoord recover db1`",
    ]


def test_unreadable_files_do_not_break_status(offline_config: Config) -> None:
    folder = offline_config.store / "journal"
    folder.mkdir(parents=True)
    (folder / "db1.last-run.json").write_text("{not json")
    (folder / "db1.json").write_text("[1, 2")
    outcome = status_vm(offline_config, "db1", offline=True)
    assert outcome.exit_code == 0 and outcome.summary["last_run"] is None
    assert outcome.summary["unfinished_run"]["run"] is None


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (int(12.3 * 2**20), "12.3 MiB")],
)
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text


def test_ages() -> None:
    assert [status._ago(s) for s in (5, 200, 7200, 6 * DAY)] == ["5 s", "3 min", "2 h", "6 d"]


def test_status_through_the_cli(double: PveApiDouble, cert: Cert, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", pve_tables(tmp_path, double.port, cert))
    assert cli(path, "snapshot", "db").returncode == 0
    proc = cli(path, "status")  # every VM by default
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    (db,) = [line for line in lines if line.startswith("db: ")]
    assert db.startswith("db: last snapshot ok ") and "; 1 snapshot, newest " in db
    assert any(line.startswith("ct: no run recorded; 0 snapshots") for line in lines)

    proc = cli(path, "status", "db", "--json")
    assert proc.returncode == 0, proc.stderr
    (summary,) = [o for o in json_lines(proc.stdout) if o.get("vm") == "db"]
    assert summary["command"] == "status" and summary["snapshots"]["count"] == 1

    double.stop()
    proc = cli(path, "status", "db")
    assert proc.returncode == 3
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--offline" in errors[0] and "Traceback" not in proc.stderr
    proc = cli(path, "status", "db", "--offline")
    assert proc.returncode == 0, proc.stderr
    assert "1 snapshot as seen at " in proc.stdout

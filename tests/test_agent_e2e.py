"""``transport = "agent"`` end to end through the CLI and the Proxmox VE API double: the double's
``agent/exec``, ``exec-status``, ``file-read`` and ``file-write`` (tests/pve_api, behaviour from
qemu-server) forward to a real qemu-ga in the lab guest (tests/qga_fixture.py), which runs the
lab's real Apache, cron and MariaDB. No SSH is configured at all: there is no host, key or
known_hosts in these configurations, and no sshd runs for them.

Each plan the issue names: a snapshot with a dump, a pause-mode snapshot, a revert, a
restore-dump, freeze and thaw, check; and the agent's faults inside a run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import lab
from tests.cli_helpers import assert_paused_not_stopped, json_lines, snapcoord, write_config
from tests.guest_fixtures import wait_for, watchdog_pids
from tests.idoit_fixture import DATABASES, IdoitDB
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import TOKEN_ID, TOKEN_SECRET, Cert, make_cert, start_double
from tests.qga_fixture import LabAgent, start_agent

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("_require_qga")]

TOKEN_ENV = "SNAPCOORD_TEST_PVE_TOKEN"
VMID = 100  # "db1", a qemu VM on pve1 in the double
IDOIT = list(DATABASES)


@pytest.fixture
def _require_qga() -> None:
    lab.require("qemu-ga")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("pve-agent-tls"))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[LabAgent]:
    running = start_agent(tmp_path / "qga")
    yield running
    running.stop()


@pytest.fixture
def double(cert: Cert, agent: LabAgent) -> Iterator[PveApiDouble]:
    server = start_double(cert, task_seconds=0.3)
    server.cluster.attach_agent(VMID, agent.socket)
    yield server
    server.stop()


def agent_config(
    tmp_path: Path, double: PveApiDouble, cert: Cert, **guest: Any
) -> tuple[Path, dict[str, Any]]:
    table = {
        "transport": "agent",
        "services": ["apache2", "cron"],
        "database": "mariadb",
        "watchdog_seconds": 60,
        "stop_timeout": 15.0,
        **guest,
    }
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store"), "label": "test"},
        "hypervisors.pve": {
            "type": "proxmox",
            "host": "127.0.0.1",
            "port": double.port,
            "token_id": TOKEN_ID,
            "token_secret": {"env": TOKEN_ENV},
            "ca_file": str(cert.cert),
        },
        "vms.db": {"hypervisor": "pve", "name": "db1"},
        "vms.db.guest": table,
    }
    if "dump" in guest:
        tables["vms.db.dump"] = {"databases": IDOIT}
    path = write_config(tmp_path / "agent.toml", tables)
    return path, tables


@pytest.fixture
def run(tmp_path: Path) -> Callable[..., Any]:
    def call(config: Path, *args: str) -> Any:
        return snapcoord("-c", str(config), *args, env={TOKEN_ENV: TOKEN_SECRET})

    return call


def no_ssh_config(tables: dict[str, Any]) -> None:
    """Nothing in the configuration could open an SSH connection."""
    guest = tables["vms.db.guest"]
    assert not {"host", "port", "user", "identity_file", "known_hosts"} & set(guest)


def agent_calls(double: PveApiDouble) -> list[str]:
    return [path for _method, path in double.calls() if "/agent/" in path]


def nothing_left(agent: LabAgent) -> None:
    transfer = agent.transfer_dir
    assert not (transfer.exists() and list(transfer.iterdir())), "a dump left in the guest"
    channels = Path("/run/snapcoord/channel")
    assert not (channels.exists() and list(channels.iterdir())), "a channel left in the guest"


@pytest.mark.usefixtures("idoit_db")
def test_a_snapshot_with_a_dump_runs_every_guest_command_through_the_agent(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config, tables = agent_config(tmp_path, double, cert, dump=True)
    no_ssh_config(tables)
    proc = run(config, "snapshot", "db", "--json")
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["ok"] is True and result["services_down"] == []
    names = [s["name"] for s in result["steps"]]
    snap_at = names.index("hypervisor snapshot")
    assert {"stop services", "stop database"} <= set(names[:snap_at])
    assert guest_services.all_running()
    assert result["snapshot"] in double.cluster.guests[VMID].snapshots
    assert any(path.endswith("/agent/exec") for path in agent_calls(double))
    assert any("/agent/file-read" in path for path in agent_calls(double))
    manifest = json.loads(next((tmp_path / "store").rglob("manifest.json")).read_text())
    assert manifest["status"] == "complete"
    assert not watchdog_pids(result["run"])
    nothing_left(agent)


def test_a_pause_holds_commits_through_the_agent(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config, _ = agent_config(tmp_path, double, cert, consistency="pause", pause_timeout=20.0)
    server = lab.mysqld_pids()
    proc = run(config, "snapshot", "db", "--json")
    result = assert_paused_not_stopped(proc, server_before=server, server_after=lab.mysqld_pids())
    assert result["snapshot"] in double.cluster.guests[VMID].snapshots
    assert guest_services.all_running()
    nothing_left(agent)


def test_revert_through_the_agent_restarts_what_ran(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config, _ = agent_config(tmp_path, double, cert)
    taken = run(config, "snapshot", "db", "--json")
    assert taken.returncode == 0, taken.stderr
    (snap,) = json_lines(taken.stdout)
    proc = run(config, "revert", "db", "--to", snap["snapshot"], "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["ok"] is True
    assert guest_services.all_running()


def test_restore_dump_through_the_agent_is_exact(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    idoit_db: IdoitDB,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config, _ = agent_config(tmp_path, double, cert, dump=True)
    taken = run(config, "snapshot", "db", "--json")
    assert taken.returncode == 0, taken.stderr
    (snap,) = json_lines(taken.stdout)
    idoit_db.mutate_schema_for_errno150()
    idoit_db.mutate_data()
    assert not idoit_db.is_pristine()
    writes_before = len([p for p in agent_calls(double) if "/agent/file-write" in p])
    proc = run(config, "restore-dump", "db", "--from", snap["snapshot"], "--yes")
    assert proc.returncode == 0, proc.stderr
    assert idoit_db.is_pristine()
    assert lab.row_counts(IDOIT) == idoit_db.row_counts
    assert len([p for p in agent_calls(double) if "/agent/file-write" in p]) > writes_before
    assert guest_services.all_running()
    nothing_left(agent)


def test_freeze_and_thaw_through_the_agent(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config, _ = agent_config(tmp_path, double, cert)
    frozen = run(config, "freeze", "db", "--max-seconds", "120")
    assert frozen.returncode == 0, frozen.stderr
    assert not any(guest_services.states().values())  # apache2, cron, mariadb all stopped
    thawed = run(config, "thaw", "db")
    assert thawed.returncode == 0, thawed.stderr
    assert guest_services.all_running()


def test_check_through_the_agent(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config, _ = agent_config(tmp_path, double, cert)
    proc = run(config, "check", "db")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("db: ready"), proc.stdout


# -- the agent's faults inside a run -----------------------------------------------------------


def test_no_agent_in_the_guest_is_refused_before_anything_stops_with_the_fix(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    agent.stop()
    config, _ = agent_config(tmp_path, double, cert)
    proc = run(config, "snapshot", "db", "--json")
    assert proc.returncode != 0
    (result,) = json_lines(proc.stdout)
    assert "stop services" not in [s["name"] for s in result["steps"]]
    assert "QEMU guest agent is not running" in proc.stderr
    assert "qemu-guest-agent" in proc.stderr  # the fix
    assert guest_services.all_running()


def test_an_agent_that_stops_answering_in_the_window_is_healed_by_the_watchdog(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    """qemu-ga freezes (SIGSTOP) right after the database stopped: no command reaches the
    guest any more. snapcoord's undos retry within their budget and give up; the watchdog,
    detached from the agent, brings every service back."""
    config, _ = agent_config(
        tmp_path, double, cert, watchdog_seconds=25, stop_timeout=5.0, command_timeout=5.0,
        start_timeout=5.0,
    )  # fmt: skip
    stopped_agent: list[bool] = []

    def freeze_agent_when_db_down() -> None:
        wait_for(lambda: not lab.mysqld_running(), 60, "the database stopped by the run")
        os.kill(agent.pid, signal.SIGSTOP)
        stopped_agent.append(True)

    watcher = threading.Thread(target=freeze_agent_when_db_down, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        proc = run(config, "snapshot", "db", "--json")
    finally:
        watcher.join(timeout=5)
    assert stopped_agent, "the fault fired"
    assert proc.returncode == 6, proc.stderr
    wait_for(guest_services.all_running, 25 + 10 - (time.monotonic() - started) + 30,
             "the watchdog restarting every service")  # fmt: skip
    os.kill(agent.pid, signal.SIGCONT)


def test_a_vm_without_an_agent_configured_is_refused_with_qm_set(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    agent: LabAgent,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    double.cluster.guests[VMID].agent = None  # no `agent` key in the VM's configuration
    config, _ = agent_config(tmp_path, double, cert)
    proc = run(config, "snapshot", "db", "--json")
    assert proc.returncode == 4, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert "stop services" not in [s["name"] for s in result["steps"]]
    assert "has no QEMU guest agent configured" in proc.stderr
    assert f"qm set {VMID} --agent 1" in proc.stderr
    checked = run(config, "check", "db")
    assert checked.returncode == 4
    assert f"qm set {VMID} --agent 1" in checked.stderr
    assert guest_services.all_running()

"""The CLI end to end against the Proxmox VE API double over HTTPS: snapshot, list, revert,
delete for qemu VMs and lxc containers by name and vmid, locks, nodes, auth, TLS, and the full
guest-bracketed run (loopback SSH guest; exec transport with a `pct exec`-style prefix)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import lab
from tests.cli_helpers import assert_paused_not_stopped, json_lines, snapcoord, write_config
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    PASSWORD,
    TOKEN_ID,
    TOKEN_SECRET,
    USER,
    Cert,
    make_cert,
    start_double,
)

TOKEN_ENV = "SNAPCOORD_TEST_PVE_TOKEN"
PASSWORD_ENV = "SNAPCOORD_TEST_PVE_PASSWORD"
WRONG = "00000000-dead-beef-0000-000000000000"

VMS: dict[str, dict[str, Any]] = {
    "vms.db": {"name": "db1"},  # qemu on pve1
    "vms.db100": {"vmid": 100},
    "vms.ct": {"name": "ct1"},  # lxc on pve1
    "vms.ct101": {"vmid": 101},
    "vms.remote": {"name": "db-remote"},  # qemu on pve3
    "vms.ctremote": {"vmid": 200},  # lxc on pve3
    "vms.twin": {"name": "twin"},  # two guests of that name
}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("pve-cli-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert, task_seconds=0.3)
    yield server
    server.stop()


def pve_config(
    path: Path,
    double: PveApiDouble,
    cert: Cert,
    *,
    auth: str = "token",
    tls: dict[str, Any] | None = None,
    guest: dict[str, Any] | None = None,
    **hypervisor: Any,
) -> Path:
    credentials: dict[str, Any]
    if auth == "token":
        credentials = {"token_id": TOKEN_ID, "token_secret": {"env": TOKEN_ENV}}
    else:
        credentials = {"user": USER, "password": {"env": PASSWORD_ENV}}
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(path.parent / "store"), "label": "test"},
        "hypervisors.pve": {
            "type": "proxmox",
            "host": "127.0.0.1",
            "port": double.port,
            **credentials,
            **(tls if tls is not None else {"ca_file": str(cert.cert)}),
            **hypervisor,
        },
    }
    for name, ref in VMS.items():
        tables[name] = {"hypervisor": "pve", **ref}
        if guest is not None and name in ("vms.db", "vms.ct"):
            tables[f"{name}.guest"] = guest
    return write_config(path, tables)


@pytest.fixture
def run(double: PveApiDouble, cert: Cert, tmp_path: Path) -> Callable[..., Any]:
    """``run(*args, config=None, token=None)`` -> CompletedProcess of the real CLI."""
    default = pve_config(tmp_path / "snapcoord.toml", double, cert)

    def call(*args: str, config: Path | None = None, token: str | None = None) -> Any:
        env = {TOKEN_ENV: token or TOKEN_SECRET, PASSWORD_ENV: PASSWORD}
        return snapcoord("-c", str(config or default), *args, env=env)

    return call


def snapshots(run: Callable[..., Any], vm: str, **kw: Any) -> list[dict[str, Any]]:
    proc = run("list", vm, "--json", **kw)
    assert proc.returncode == 0, proc.stderr
    (out,) = json_lines(proc.stdout)
    assert out["vm"] == vm
    result: list[dict[str, Any]] = out["snapshots"]
    return result


def snapshot_ok(run: Callable[..., Any], vm: str, label: str, **kw: Any) -> str:
    proc = run("snapshot", vm, "--label", label, "--json", **kw)
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["vm"] == vm and result["ok"] is True and result["exit_code"] == 0
    assert "hypervisor snapshot" in [s["name"] for s in result["steps"]]
    name: str = result["snapshot"]
    assert name.startswith(f"snapcoord-{label}-")
    return name


@pytest.mark.parametrize(
    ("vm", "vmid"), [("db", 100), ("db100", 100), ("ct", 101), ("ct101", 101), ("remote", 201)]
)
def test_snapshot_list_revert_delete(
    run: Callable[..., Any], double: PveApiDouble, vm: str, vmid: int
) -> None:
    first = snapshot_ok(run, vm, "one")
    (snap,) = snapshots(run, vm)
    assert snap["name"] == first and snap["id"] == first and snap["snapcoord"] is True
    assert snap["current"] is True and snap["parent"] is None and snap["memory"] is False
    assert snap["created"].endswith("+00:00") and snap["description"].startswith("snapcoord:")
    assert first in run("list", vm).stdout

    second = snapshot_ok(run, vm, "two")
    listed = snapshots(run, vm)
    assert [s["name"] for s in listed] == [first, second]
    assert listed[1]["parent"] == first

    proc = run("revert", vm, "--to", first, "--yes", "--json", "--no-safety-snapshot")
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout)[0]["snapshot"] == first
    assert {s["name"]: s["current"] for s in snapshots(run, vm)} == {first: True, second: False}
    assert double.cluster.guests[vmid].status == "running"  # power state kept

    proc = run("delete", vm, second, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert [s["name"] for s in snapshots(run, vm)] == [first]
    assert set(double.cluster.guests[vmid].snapshots) == {first}


def test_revert_takes_a_safety_snapshot_first(run: Callable[..., Any]) -> None:
    name = snapshot_ok(run, "ctremote", "base")
    proc = run("revert", "ctremote", "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["snapshot"] == name
    assert "safety snapshot" in [s["name"] for s in result["steps"]]
    assert len(snapshots(run, "ctremote")) == 2


def test_lock_released_after_two_seconds(run: Callable[..., Any], double: PveApiDouble) -> None:
    double.cluster.lock_guest(100, "backup", seconds=2.0)
    snapshot_ok(run, "db", "locked")
    # waited in preflight (before any service would stop), then one create
    polls = [e for e in double.log if e.path == "/nodes/pve1/qemu/100/config"]
    assert len(polls) >= 2
    attempts = [e for e in double.log if e.method == "POST" and e.path.endswith("/snapshot")]
    assert len(attempts) == 1


def test_lock_held_fails_clearly(
    run: Callable[..., Any], double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    config = pve_config(tmp_path / "lock.toml", double, cert, lock_wait_seconds=1.0)
    double.cluster.lock_guest(101, "snapshot-delete")
    proc = run("snapshot", "ct", "--json", config=config)
    assert proc.returncode == 3, proc.stderr  # refused in preflight
    assert "CT is locked (snapshot-delete) for more than 1 s" in proc.stderr
    assert "pct unlock 101" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert double.cluster.guests[101].snapshots == {}


def test_duplicate_guest_names_listed(run: Callable[..., Any]) -> None:
    proc = run("list", "twin")
    assert proc.returncode == 3
    assert "vmids 103 on pve1, 104 on pve2" in proc.stderr and "vmid" in proc.stderr


def test_ticket_auth(
    run: Callable[..., Any], double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    config = pve_config(tmp_path / "ticket.toml", double, cert, auth="ticket")
    name = snapshot_ok(run, "db", "ticket", config=config)
    assert [s["name"] for s in snapshots(run, "db", config=config)] == [name]
    assert [e.status for e in double.log if e.path == "/access/ticket"] == [200, 200]


def test_wrong_token_exits_3_without_the_secret(run: Callable[..., Any]) -> None:
    proc = run("snapshot", "db", "--json", token=WRONG)
    assert proc.returncode == 3, proc.stderr
    assert "authentication" in proc.stderr and "token_id/token_secret" in proc.stderr
    assert WRONG not in proc.stderr + proc.stdout and TOKEN_SECRET not in proc.stderr
    assert "Traceback" not in proc.stderr
    # the connect step itself fails (it asks GET /version): never "ok" before anything connected
    (result,) = json_lines(proc.stdout)
    assert [(s["name"], s["ok"]) for s in result["steps"]] == [("connect to hypervisor pve", False)]
    plain = run("snapshot", "db", token=WRONG)
    assert plain.returncode == 3
    assert "connect to hypervisor pve ... FAILED" in plain.stdout and " ok " not in plain.stdout


def test_tls(run: Callable[..., Any], double: PveApiDouble, cert: Cert, tmp_path: Path) -> None:
    plain = pve_config(tmp_path / "plain.toml", double, cert, tls={})
    proc = run("list", "db", config=plain)
    assert proc.returncode == 3 and "TLS certificate of 127.0.0.1" in proc.stderr
    other = make_cert(tmp_path, "other")
    wrong_ca = pve_config(tmp_path / "wrong.toml", double, cert, tls={"ca_file": str(other.cert)})
    assert run("list", "db", config=wrong_ca).returncode == 3
    pinned = pve_config(tmp_path / "pin.toml", double, cert, tls={"thumbprint": cert.sha256})
    snapshot_ok(run, "db", "pinned", config=pinned)
    bad_pin = pve_config(tmp_path / "pin2.toml", double, cert, tls={"thumbprint": other.sha256})
    assert run("list", "db", config=bad_pin).returncode == 3
    insecure = pve_config(tmp_path / "lab.toml", double, cert, tls={"verify_tls": False})
    proc = run("list", "db", config=insecure)
    assert proc.returncode == 0 and "verify_tls = false" in proc.stderr


def test_memory_on_a_container_is_refused_before_anything(
    run: Callable[..., Any], double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    config = pve_config(tmp_path / "mem.toml", double, cert)
    text = config.read_text().replace(
        '[vms.ct]\nhypervisor = "pve"', '[vms.ct]\nhypervisor = "pve"\nmemory = true'
    )
    config.write_text(text)
    proc = run("snapshot", "ct", "--json", config=config)
    assert proc.returncode == 3, proc.stderr
    assert "containers have no RAM state" in proc.stderr
    assert not any(e.method == "POST" for e in double.log)


# -- the full run: guest services stopped around the Proxmox snapshot -------------------------


@pytest.fixture
def pct(tmp_path: Path) -> list[str]:
    """A `pct exec CTID --`-style prefix: runs the command "inside the container" (here)."""
    script = tmp_path / "pct"
    script.write_text('#!/bin/sh\n[ "$1" = exec ] && [ "$3" = -- ] || exit 2\nshift 3\nexec "$@"\n')
    script.chmod(0o755)
    return [str(script), "exec", "101", "--"]


@pytest.mark.real
def test_guest_bracketed_snapshot_over_ssh(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config = pve_config(tmp_path / "guest.toml", double, cert, guest=ssh_guest.guest_table())
    proc = run("snapshot", "db", "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["ok"] is True and result["services_down"] == []
    assert result["window_seconds"] is not None and result["window_seconds"] > 0
    names = [s["name"] for s in result["steps"]]
    snap_at = names.index("hypervisor snapshot")
    assert {"stop services", "stop database"} <= set(names[:snap_at])
    assert {"start database", "start services"} <= set(names[snap_at + 1 :])
    assert guest_services.all_running()
    assert [s["name"] for s in snapshots(run, "db")] == [result["snapshot"]]


@pytest.mark.real
def test_pause_holds_commits_around_the_proxmox_snapshot(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    guest = ssh_guest.guest_table(consistency="pause", pause_timeout=20.0)
    config = pve_config(tmp_path / "pause.toml", double, cert, guest=guest)
    server = lab.mysqld_pids()

    proc = run("snapshot", "db", "--json", config=config)

    result = assert_paused_not_stopped(proc, server_before=server, server_after=lab.mysqld_pids())
    assert [s["name"] for s in snapshots(run, "db")] == [result["snapshot"]]


@pytest.mark.real
def test_locked_vm_stops_nothing(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    config = pve_config(
        tmp_path / "guest.toml", double, cert, guest=ssh_guest.guest_table(), lock_wait_seconds=0.5
    )
    double.cluster.lock_guest(100, "backup")
    proc = run("snapshot", "db", "--json", config=config)
    assert proc.returncode == 3, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["services_down"] == [] and "VM is locked (backup)" in proc.stderr
    names = [s["name"] for s in result["steps"]]
    assert "stop services" not in names  # refused before anything was stopped
    assert guest_services.all_running()


@pytest.mark.real
def test_container_with_exec_transport(
    run: Callable[..., Any],
    double: PveApiDouble,
    cert: Cert,
    pct: list[str],
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    lab.require_root()
    guest = {
        "transport": "exec",
        "exec_prefix": pct,
        "services": ["apache2", "cron"],
        "database": "mariadb",
    }
    config = pve_config(tmp_path / "ct.toml", double, cert, guest=guest)
    proc = run("snapshot", "ct", "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["ok"] is True and result["services_down"] == []
    assert result["window_seconds"] is not None
    assert guest_services.all_running()
    assert list(double.cluster.guests[101].snapshots) == [result["snapshot"]]

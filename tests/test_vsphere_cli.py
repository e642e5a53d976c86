"""The CLI end to end on the vSphere simulator: snapshot, list, revert, delete, TLS, errors,
and the full guest-bracketed run (loopback SSH guest with MariaDB, Apache and cron)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import lab
from tests.cli_helpers import assert_paused_not_stopped, json_lines, snapcoord, write_config
from tests.vcsim_fixture import (  # noqa: F401 - fixtures
    CLUSTER_VM,
    FAIL_VM,
    HOST_VM,
    VCSim,
    vcsim,
    vcsim_binary,
    vcsim_factory,
)

pytestmark = pytest.mark.real

PASSWORD_ENV = "SNAPCOORD_TEST_VC_PASSWORD"
WRONG_PASSWORD = "definitely-wrong-pw"


def vc_config(
    path: Path,
    sim: VCSim,
    *,
    tls: dict[str, Any] | None = None,
    guest: dict[str, Any] | None = None,
    **hypervisor: Any,
) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(path.parent / "store"), "label": "test"},
        "hypervisors.vc": {
            "type": "vsphere",
            "host": sim.host,
            "port": sim.port,
            "user": sim.user,
            "password": {"env": PASSWORD_ENV},
            **(tls if tls is not None else {"ca_file": str(sim.cert_file)}),
            **hypervisor,
        },
        "vms.db": {"hypervisor": "vc", "name": CLUSTER_VM},
        "vms.bypath": {"hypervisor": "vc", "name": f"DC0/vm/{HOST_VM}"},
        "vms.bad": {"hypervisor": "vc", "name": FAIL_VM},
    }
    if guest is not None:
        tables["vms.db.guest"] = guest
        tables["vms.bad.guest"] = guest
    return write_config(path, tables)


@pytest.fixture
def run(vcsim: VCSim, tmp_path: Path) -> Callable[..., Any]:
    """``run(*args, config=None, password=None)`` -> CompletedProcess of the real CLI."""
    default = vc_config(tmp_path / "snapcoord.toml", vcsim)

    def call(*args: str, config: Path | None = None, password: str | None = None) -> Any:
        env = {PASSWORD_ENV: password or vcsim.password}
        return snapcoord("-c", str(config or default), *args, env=env)

    return call


def snapshot_names(run: Callable[..., Any], vm: str) -> list[str]:
    proc = run("list", vm, "--json")
    assert proc.returncode == 0, proc.stderr
    (out,) = json_lines(proc.stdout)
    return [s["name"] for s in out["snapshots"]]


def test_snapshot_list_revert_delete(run: Callable[..., Any]) -> None:
    first = run("snapshot", "db", "--json")
    assert first.returncode == 0, first.stderr
    (result,) = json_lines(first.stdout)
    assert result["vm"] == "db" and result["ok"] is True and result["exit_code"] == 0
    assert result["snapshot"].startswith("snapcoord-test-")
    assert result["window_seconds"] is None  # hypervisor-only: nothing was stopped
    assert "hypervisor snapshot" in [s["name"] for s in result["steps"]]
    name = result["snapshot"]

    listed = run("list", "db", "--json")
    (out,) = json_lines(listed.stdout)
    assert out["vm"] == "db"
    (snap,) = out["snapshots"]
    assert snap["name"] == name and snap["snapcoord"] is True and snap["current"] is True
    assert snap["id"].startswith("snapshot-") and snap["parent"] is None
    assert snap["created"].endswith("+00:00")
    assert set(snap) >= {"description", "memory"}
    assert name in run("list", "db").stdout

    other = run("snapshot", "db", "--label", "second", "--json")
    assert other.returncode == 0, other.stderr
    second = json_lines(other.stdout)[0]["snapshot"]
    assert snapshot_names(run, "db") == [name, second]

    revert = run("revert", "db", "--to", name, "--yes", "--json", "--no-safety-snapshot")
    assert revert.returncode == 0, revert.stderr
    assert json_lines(revert.stdout)[0]["snapshot"] == name
    (out,) = json_lines(run("list", "db", "--json").stdout)
    assert {s["name"]: s["current"] for s in out["snapshots"]} == {name: True, second: False}

    deleted = run("delete", "db", second, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert snapshot_names(run, "db") == [name]


def test_revert_takes_a_safety_snapshot_first(run: Callable[..., Any]) -> None:
    made = run("snapshot", "db", "--json")
    name = json_lines(made.stdout)[0]["snapshot"]
    revert = run("revert", "db", "--yes", "--json")
    assert revert.returncode == 0, revert.stderr
    (result,) = json_lines(revert.stdout)
    assert result["snapshot"] == name  # default: the newest snapcoord snapshot
    assert "safety snapshot" in [s["name"] for s in result["steps"]]
    assert len(snapshot_names(run, "db")) == 2


def test_vm_by_inventory_path(run: Callable[..., Any]) -> None:
    proc = run("snapshot", "bypath", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(snapshot_names(run, "bypath")) == 1


def test_delete_missing_snapshot_exits_3(run: Callable[..., Any]) -> None:
    proc = run("delete", "db", "nope", "--yes")
    assert proc.returncode == 3
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_failing_snapshot_task_exits_5(run: Callable[..., Any]) -> None:
    proc = run("snapshot", "bad", "--json")
    assert proc.returncode == 5
    (result,) = json_lines(proc.stdout)
    assert result["ok"] is False and result["exit_code"] == 5
    assert "InvalidPowerState" in proc.stderr and FAIL_VM in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_password_exits_3_without_the_password(run: Callable[..., Any]) -> None:
    proc = run("list", "db", password=WRONG_PASSWORD)
    assert proc.returncode == 3
    assert "failed" in proc.stderr and "check user and password" in proc.stderr
    assert WRONG_PASSWORD not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_tls_pinned_by_thumbprint(run: Callable[..., Any], vcsim: VCSim, tmp_path: Path) -> None:
    config = vc_config(tmp_path / "pin.toml", vcsim, tls={"thumbprint": vcsim.thumbprint})
    proc = run("snapshot", "db", "--json", config=config)
    assert proc.returncode == 0, proc.stderr


def test_unknown_certificate_is_refused(
    run: Callable[..., Any],
    vcsim: VCSim,
    tmp_path: Path,
) -> None:
    config = vc_config(tmp_path / "plain.toml", vcsim, tls={})
    proc = run("snapshot", "db", "--json", config=config)
    assert proc.returncode == 3
    assert "not trusted" in proc.stderr and "Traceback" not in proc.stderr
    wrong = "sha256:" + ":".join(["00"] * 32)
    pinned = vc_config(tmp_path / "wrong.toml", vcsim, tls={"thumbprint": wrong})
    proc = run("list", "db", config=pinned)
    assert proc.returncode == 3 and "does not match the pinned one" in proc.stderr


def test_verify_tls_false_works_with_a_warning(
    run: Callable[..., Any],
    vcsim: VCSim,
    tmp_path: Path,
) -> None:
    config = vc_config(tmp_path / "lab.toml", vcsim, tls={"verify_tls": False})
    proc = run("list", "db", config=config)
    assert proc.returncode == 0, proc.stderr
    assert "verify_tls = false" in proc.stderr


def test_too_many_snapshots_warns(run: Callable[..., Any], vcsim: VCSim, tmp_path: Path) -> None:
    config = vc_config(tmp_path / "max.toml", vcsim, max_snapshots=1)
    for label in ("one", "two"):
        assert run("snapshot", "db", "--label", label, config=config).returncode == 0
    proc = run("snapshot", "db", "--label", "three", config=config)
    assert proc.returncode == 0, proc.stderr
    assert "has 2 snapshots, more than max_snapshots = 1" in proc.stderr


# -- the full run: guest services stopped around the vSphere snapshot ------------------------


@pytest.fixture
def guest_config(
    vcsim: VCSim,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> Path:
    return vc_config(tmp_path / "guest.toml", vcsim, guest=ssh_guest.guest_table())


def test_guest_bracketed_snapshot(
    run: Callable[..., Any], guest_config: Path, guest_services: lab.GuestServices
) -> None:
    proc = run("snapshot", "db", "--json", config=guest_config)
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["ok"] is True
    assert result["window_seconds"] is not None and result["window_seconds"] > 0
    assert result["services_down"] == []
    names = [s["name"] for s in result["steps"]]
    snap_at = names.index("hypervisor snapshot")
    assert {"stop services", "stop database"} <= set(names[:snap_at])
    assert {"start database", "start services"} <= set(names[snap_at + 1 :])
    assert guest_services.all_running()
    assert snapshot_names(run, "db") == [result["snapshot"]]


def test_failing_snapshot_restores_guest_services(
    run: Callable[..., Any], guest_config: Path, guest_services: lab.GuestServices
) -> None:
    proc = run("snapshot", "bad", "--json", config=guest_config)
    assert proc.returncode == 5, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["services_down"] == []
    assert "InvalidPowerState" in proc.stderr
    assert guest_services.all_running()


# -- consistency = "pause": commits held around the vSphere snapshot, nothing stopped ---------


@pytest.fixture
def pause_config(
    vcsim: VCSim, ssh_guest: lab.SshGuest, guest_services: lab.GuestServices, tmp_path: Path
) -> Path:
    guest = ssh_guest.guest_table(consistency="pause", pause_timeout=20.0)
    return vc_config(tmp_path / "pause.toml", vcsim, guest=guest)


def test_pause_holds_commits_around_the_vsphere_snapshot(
    run: Callable[..., Any], pause_config: Path, guest_services: lab.GuestServices
) -> None:
    server = lab.mysqld_pids()

    proc = run("snapshot", "db", "--json", config=pause_config)

    result = assert_paused_not_stopped(proc, server_before=server, server_after=lab.mysqld_pids())
    assert snapshot_names(run, "db") == [result["snapshot"]]


def test_pause_failing_snapshot_releases_commits(
    run: Callable[..., Any], pause_config: Path, guest_services: lab.GuestServices
) -> None:
    proc = run("snapshot", "bad", "--json", config=pause_config)

    assert proc.returncode == 5, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert "resume writes" in [s["name"] for s in result["steps"] if s["ok"]]
    lab.mysql_exec(
        "SET SESSION lock_wait_timeout = 2; CREATE DATABASE snapcoord_vs_probe;"
        "DROP DATABASE snapcoord_vs_probe;",
        timeout=30,
    )  # DDL commits: nothing is held any more

"""``snapcoord check`` end to end: the Proxmox VE API double over HTTPS (with the privilege model
of tests/pve_api/data/pve-check-api.json) and the loopback lab guest (real sshd, sudo,
MariaDB, Apache, cron). A good setup passes without a service stopped or a process replaced and
without one changing request to the hypervisor; each broken piece gives exactly one line with
its fix and exit 4, and the other VMs of the run are still checked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import lab
from tests.cli_helpers import json_lines, snapcoord, write_config
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    TOKEN_ENV,
    TOKEN_ID,
    TOKEN_SECRET,
    Cert,
    hypervisor_table,
    make_cert,
    start_double,
)
from tests.vcsim_fixture import (  # noqa: F401 - fixtures
    CLUSTER_VM,
    VCSim,
    vcsim_binary,
    vcsim_factory,
)

#: what a snapshot run with a dump needs of the guest, checked in this order
GUEST_CHECKS = ["guest", "services", "clock", "dump", "store"]
HYPERVISOR_CHECKS = ["hypervisor", "vm", "privileges", "snapshot"]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("check-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert, task_seconds=0.1)
    yield server
    server.stop()


@pytest.fixture
def check(double: PveApiDouble, cert: Cert, tmp_path: Path) -> Callable[..., Any]:
    """``check(*args, guest=None, vms=None, **hypervisor)``: run ``snapcoord check`` on a
    config with VM ``db`` (VMID 100, qemu) and, if given, its ``guest`` table."""

    def call(
        *args: str,
        guest: dict[str, Any] | None = None,
        vms: dict[str, dict[str, Any]] | None = None,
        **hypervisor: Any,
    ) -> Any:
        tables: dict[str, dict[str, Any]] = {
            "defaults": {"store": str(tmp_path / "store"), "label": "test"},
            "hypervisors.pve": hypervisor_table(
                double, cert, **{"lock_wait_seconds": 30, **hypervisor}
            ),
            "vms.db": {"hypervisor": "pve", "vmid": 100},
        }
        if guest is not None:
            tables["vms.db.guest"] = guest
        for name, keys in (vms or {}).items():
            tables[f"vms.{name}"] = {"hypervisor": "pve", **keys}
        config = write_config(tmp_path / "snapcoord.toml", tables)
        return snapcoord("-c", str(config), "check", *args, env={TOKEN_ENV: TOKEN_SECRET})

    return call


def _result(proc: Any) -> dict[str, Any]:
    (result,) = [r for r in json_lines(proc.stdout) if "summary" not in r]
    return result


def _problems(proc: Any) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def _processes() -> dict[str, list[int]]:
    """The PIDs of the guest's services: a stop or restart replaces them."""
    found: dict[str, list[int]] = {}
    for pid, comm, _args in lab.process_table():
        if comm in ("apache2", "cron", "mariadbd", "mysqld"):
            found.setdefault(comm, []).append(pid)
    return {comm: sorted(pids) for comm, pids in found.items()}


def _changing_requests(double: PveApiDouble) -> list[str]:
    return [f"{e.method} {e.path}" for e in double.log if e.method not in ("GET",)]


@pytest.mark.real
def test_a_good_setup_passes_and_changes_nothing(
    check: Callable[..., Any],
    double: PveApiDouble,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
) -> None:
    before = _processes()
    assert {"apache2", "cron"} <= set(before)

    proc = check("db", "--json", guest=ssh_guest.guest_table(dump=True))

    assert proc.returncode == 0, proc.stderr
    result = _result(proc)
    checks = {c["check"]: c for c in result["checks"]}
    assert list(checks) == ["watchdog", *HYPERVISOR_CHECKS, *GUEST_CHECKS]
    assert all(c["ok"] and c["fix"] is None for c in checks.values()), checks
    assert "running" in checks["services"]["detail"]
    assert "credentials work" in checks["dump"]["detail"]
    assert _processes() == before  # nothing stopped, nothing restarted
    assert _changing_requests(double) == []  # nothing asked of the hypervisor but reads
    assert double.cluster.guests[100].snapshots == {}
    assert proc.stderr == ""


@pytest.mark.real
def test_plain_output_is_one_line_per_vm(
    check: Callable[..., Any], ssh_guest: lab.SshGuest, guest_services: lab.GuestServices
) -> None:
    proc = check("db", guest=ssh_guest.guest_table())
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.endswith(
        "db: ready: watchdog, hypervisor, vm, privileges, snapshot, guest, services, clock"
    )


def test_a_token_without_the_snapshot_privilege(
    check: Callable[..., Any], double: PveApiDouble
) -> None:
    double.grant(TOKEN_ID, "/vms/100", {"VM.Audit"})
    proc = check("db")
    assert proc.returncode == 4, proc.stderr
    (line,) = _problems(proc)
    assert "db: privileges: the session lacks VM.Snapshot on the VM (needed to snapshot)" in line
    assert "fix: grant the role of docs/first-setup.md" in line


def test_the_privileges_come_from_the_token_and_its_path(
    check: Callable[..., Any], double: PveApiDouble
) -> None:
    """An ACL on a path above the VM (propagated) is enough; one on another VM is not."""
    double.grant(TOKEN_ID, "/vms", {"VM.Audit", "VM.Snapshot"})
    assert check("db").returncode == 0
    double.acl[TOKEN_ID] = {
        "/vms/100": frozenset({"VM.Audit"}),
        "/vms/101": frozenset({"VM.Audit", "VM.Snapshot"}),
    }
    proc = check("db", "--json")
    assert proc.returncode == 4
    (privileges,) = [c for c in _result(proc)["checks"] if c["check"] == "privileges"]
    assert privileges["ok"] is False
    assert "lacks VM.Snapshot on the VM" in privileges["detail"]


def test_retention_and_quiesce_need_their_privileges_too(
    check: Callable[..., Any], double: PveApiDouble
) -> None:
    double.grant(TOKEN_ID, "/", {"VM.Audit", "VM.Snapshot"})
    assert check("db").returncode == 0
    proc = check("db", vms={"db": {"vmid": 100, "quiesce": True, "keep_last": 3}})
    assert proc.returncode == 4
    privileges, snapshot = _problems(proc)
    # the double is Proxmox VE 9.0: the agent privilege of 9 (8 had VM.Monitor)
    needed = "(needed to snapshot and prune and quiesce)"
    assert f"lacks VM.GuestAgent.Audit on the VM {needed}" in privileges
    # and the agent's ping, refused for that reason, says so in the snapshot check
    assert "db: snapshot: quiesce needs the QEMU guest agent" in snapshot
    assert "Permission check failed (/vms/100, VM.GuestAgent.Audit|" in snapshot


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("template", "db: snapshot: VM 100 is a template"),
        ("storage", "db: snapshot: a disk of VM 100 is on storage that cannot take snapshots"),
        ("lock", "db: snapshot: VM 100 is locked (backup)"),
    ],
)
def test_a_vm_that_cannot_take_a_snapshot(
    check: Callable[..., Any], double: PveApiDouble, breakage: str, expected: str
) -> None:
    guest = double.cluster.guests[100]
    if breakage == "template":
        guest.template = True
    elif breakage == "storage":
        guest.snapshot_storage = False
    else:
        double.cluster.lock_guest(100, "backup")
    proc = check("db")
    assert proc.returncode == 4, proc.stderr
    (line,) = _problems(proc)
    assert expected in line and "; fix: " in line


def test_an_unreachable_hypervisor_is_one_line(check: Callable[..., Any]) -> None:
    proc = check("db", port=1)
    assert proc.returncode == 4
    (line,) = _problems(proc)
    assert line.startswith("snapcoord: error: db: hypervisor: cannot reach 127.0.0.1:1")


@pytest.mark.real
def test_a_missing_sudo_rule(
    check: Callable[..., Any], nosudo_guest: lab.SshGuest, guest_services: lab.GuestServices
) -> None:
    proc = check("db", guest=nosudo_guest.guest_table())
    assert proc.returncode == 4, proc.stderr
    (line,) = _problems(proc)
    assert "db: services: sudo -n refused to run 'sh'" in line
    assert "fix: give the SSH user passwordless sudo" in line


@pytest.mark.real
def test_an_unknown_host_key(
    check: Callable[..., Any],
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    proc = check("db", guest=ssh_guest.guest_table(known_hosts=str(empty)))
    assert proc.returncode == 4, proc.stderr
    (line,) = _problems(proc)
    assert "db: guest: " in line and "host key" in line.lower()
    assert "; fix: " in line
    assert empty.read_text() == ""  # check learned no key


@pytest.mark.real
def test_a_stopped_service(
    check: Callable[..., Any], ssh_guest: lab.SshGuest, guest_services: lab.GuestServices
) -> None:
    guest_services.stop("cron")
    before = _processes()
    proc = check("db", guest=ssh_guest.guest_table())
    assert proc.returncode == 4, proc.stderr
    (line,) = _problems(proc)
    assert "db: services: cron not running" in line and "fix: start it" in line
    assert not guest_services.running("cron")  # check starts nothing either
    assert _processes() == before


@pytest.mark.real
def test_a_watchdog_that_fires_before_the_stops_end(
    check: Callable[..., Any], ssh_guest: lab.SshGuest, guest_services: lab.GuestServices
) -> None:
    """apache2 and cron stop one after the other, then the database: 3 x 30 s may pass before
    the last stop ends, and a watchdog of 60 s would start services in the middle of a run."""
    guest = ssh_guest.guest_table(watchdog_seconds=60, stop_timeout=30, parallel_services=False)
    proc = check("db", "--json", guest=guest)
    assert proc.returncode == 4, proc.stderr
    (line,) = _problems(proc)
    assert "db: watchdog: vms.db.guest.watchdog_seconds: 60 s fires before the stops" in line
    assert line.endswith("; fix: set watchdog_seconds to at least 91 or lower stop_timeout")
    checks = {c["check"]: c["ok"] for c in _result(proc)["checks"]}
    assert checks.pop("watchdog") is False and all(checks.values())
    ok = check("db", guest={**guest, "watchdog_seconds": 91})
    assert ok.returncode == 0, ok.stderr


def test_every_vm_is_checked_and_listed_in_order(
    check: Callable[..., Any], double: PveApiDouble
) -> None:
    """One VM's problem does not stop the others; the lines come in the configuration's order."""
    vms = {"web": {"vmid": 101}, "zz": {"name": "no-such-vm"}, "app": {"vmid": 100}}
    proc = check("--all", "--parallel", "3", vms=vms)
    assert proc.returncode == 4, proc.stderr
    out = [line for line in proc.stdout.splitlines() if not line.startswith("check:")]
    assert [line.split(":")[0] for line in out] == ["db", "web", "zz", "app"]
    assert out[2].startswith("zz: 1 problem")
    (line,) = _problems(proc)
    assert "zz: vm: " in line
    assert proc.stdout.splitlines()[-1].startswith("check: 4 VMs: 3 ok, 1 preflight_failed")


# -- the other hypervisors ---------------------------------------------------------------------


def test_libvirt_has_no_privileges_to_ask_about(tmp_path: Path, libvirt_node: str) -> None:
    config = write_config(
        tmp_path / "snapcoord.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.lab": {"type": "libvirt", "uri": libvirt_node},
            "vms.db1": {"hypervisor": "lab"},
            "vms.ghost": {"hypervisor": "lab", "name": "no-such-domain"},
        },
    )
    proc = snapcoord("-c", str(config), "check", "--json")
    assert proc.returncode == 4
    results = {r["vm"]: r for r in json_lines(proc.stdout) if "vm" in r}
    assert [c["check"] for c in results["db1"]["checks"]] == HYPERVISOR_CHECKS
    assert all(c["ok"] for c in results["db1"]["checks"])
    (line,) = _problems(proc)
    assert line.startswith("snapcoord: error: ghost: vm: ")


@pytest.mark.real
@pytest.mark.parametrize("denied", [None, "VirtualMachine.State.CreateSnapshot"])
def test_vsphere_privileges_of_the_session(
    vcsim_factory: Callable[..., VCSim], tmp_path: Path, denied: str | None
) -> None:
    sim = vcsim_factory(deny_privilege=denied)
    config = write_config(
        tmp_path / "snapcoord.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.vc": {
                "type": "vsphere",
                "host": sim.host,
                "port": sim.port,
                "user": sim.user,
                "password": {"env": "VC_PASSWORD"},
                "ca_file": str(sim.cert_file),
            },
            "vms.db": {"hypervisor": "vc", "name": CLUSTER_VM},
        },
    )
    proc = snapcoord("-c", str(config), "check", env={"VC_PASSWORD": sim.password})
    if denied is None:
        assert proc.returncode == 0, proc.stderr
        ready, summary = proc.stdout.splitlines()
        assert ready.endswith("db: ready: hypervisor, vm, privileges, snapshot")
        assert summary == "check: 1 VM: 1 ok (exit 0)"
    else:
        assert proc.returncode == 4
        (line,) = _problems(proc)
        assert f"db: privileges: the session lacks {denied} on the VM" in line


def test_an_interrupt_ends_the_checks_instead_of_being_one_of_their_problems(
    tmp_path: Path,
) -> None:
    from snapcoord.check import Checker
    from snapcoord.config import parse_config
    from snapcoord.errors import Interrupted

    config = parse_config(
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors": {"lab": {"type": "libvirt", "uri": "test:///default"}},
            "vms": {"db": {"hypervisor": "lab"}},
        }
    )
    checker = Checker(config, "db")

    def interrupted() -> str:
        raise Interrupted("interrupted by SIGTERM")

    with pytest.raises(Interrupted):
        checker._check("vm", interrupted)
    assert checker.findings == []

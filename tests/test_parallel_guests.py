"""Several real guests at once: three lab guests, each a sandbox of its own with its own sshd,
MariaDB, Apache and cron (tests/lab/guests.py), driven by one snapcoord run in parallel.

A fleet snapshot over real SSH where one guest's connection is cut inside its window (the
others finish, the cut one is brought back, the summary says so), and ``freeze``/``thaw`` of two
guests at once. Checked by each guest's own state, seen over its own sshd."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import lab
from tests.cli_helpers import REPO, json_lines, snapcoord, write_config
from tests.faultproxy import FaultProxy, known_hosts_for
from tests.guest_fixtures import wait_for
from tests.lab.guests import more_guests
from tests.libvirt_nodes import (
    DomainSpec,
    NodeFactory,
    libvirt_node_factory,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.real

SERVICES = ("mariadb", "apache2", "cron")
VMS = ("vm-a", "vm-b", "vm-c")
HOOK = "sleep 8"  # the frozen hook: every window lasts long enough to overlap the others


@pytest.fixture
def guests(ssh_guest: lab.SshGuest) -> Iterator[list[lab.SshGuest]]:
    """Three more lab guests (``ssh_guest`` makes sure the worker's own lab is set up)."""
    with more_guests(len(VMS)) as started:
        yield started


def states(guest: lab.SshGuest) -> dict[str, bool]:
    """The guest's services, asked over its own sshd (never through snapcoord's connection)."""
    script = "; ".join(
        f"service {name} status >/dev/null 2>&1 && echo {name}=1 || echo {name}=0"
        for name in SERVICES
    )
    out = guest.ssh("sh", "-c", script, timeout=60).stdout.split()
    return {line.split("=")[0]: line.endswith("=1") for line in out}


def all_down(guest: lab.SshGuest) -> bool:
    return not any(states(guest).values())


def watchdogs(guest: lab.SshGuest) -> str:
    found = guest.ssh("sh", "-c", "pgrep -af '[s]napcoord-watchdog-' || true", timeout=60)
    return found.stdout.strip()


def fleet_config(
    tmp_path: Path, uri: str, tables_by_vm: dict[str, dict[str, Any]], hook: str | None
) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store"), "label": "test"},
        "hypervisors.lab": {"type": "libvirt", "uri": uri},
    }
    for vm, guest in tables_by_vm.items():
        tables[f"vms.{vm}"] = {"hypervisor": "lab"}
        tables[f"vms.{vm}.guest"] = {"watchdog_seconds": 120, "stop_timeout": 30.0, **guest}
        if hook:
            tables[f"vms.{vm}.hooks"] = {"frozen": [hook]}
    return write_config(tmp_path / "snapcoord.toml", tables)


def node(factory: NodeFactory) -> str:
    return factory(
        [DomainSpec(vm, f"5e6ab1d2-0000-4000-8000-00000000010{i}") for i, vm in enumerate(VMS)]
    )


def test_fleet_over_ssh_to_three_guests_one_connection_cut_the_others_finish(
    guests: list[lab.SshGuest], libvirt_node_factory: NodeFactory, tmp_path: Path
) -> None:
    cut_guest = guests[2]
    proxy = FaultProxy((cut_guest.host, cut_guest.port)).start()
    try:
        known = known_hosts_for(
            cut_guest.workdir / "host_ed25519.pub", proxy.port, tmp_path / "known_hosts.proxy"
        )
        tables = {vm: g.guest_table() for vm, g in zip(VMS, guests, strict=True)}
        tables["vm-c"] = cut_guest.guest_table(port=proxy.port, known_hosts=str(known))
        config = fleet_config(tmp_path, node(libvirt_node_factory), tables, HOOK)
        assert all(all(states(g).values()) for g in guests)

        child = snapcoord_popen(config, "snapshot", "--all", "--parallel", "3", "--json")
        try:
            # all three windows are open at once: every guest's services are down
            wait_for(lambda: all(all_down(g) for g in guests), 90, "all three windows to open")
            # vm-c's frozen hook runs: cut its connection inside the window
            wait_for(lambda: hook_runs(cut_guest), 30, "vm-c's frozen hook")
            assert proxy.cut() >= 1, "vm-c's connection went through the proxy"
            out, err = child.communicate(timeout=240)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        proxy.stop()

    *per_vm, last = json_lines(out)
    codes = {item["vm"]: item["exit_code"] for item in per_vm}
    assert codes["vm-a"] == 0 and codes["vm-b"] == 0, err
    assert codes["vm-c"] != 0, "the cut connection failed vm-c's frozen hook"
    assert all(item["services_down"] == [] for item in per_vm), per_vm
    assert last["summary"]["vms"] == 3 and last["summary"]["ok"] == 2
    assert last["summary"]["failed"] == 1
    assert last["summary"]["peak_parallel"] == 3
    assert child.returncode == codes["vm-c"], err
    assert "Traceback" not in err
    # the promise, by state: every service of every guest runs again, no watchdog is left
    for guest in guests:
        assert states(guest) == dict.fromkeys(SERVICES, True)
        assert watchdogs(guest) == ""


def hook_runs(guest: lab.SshGuest) -> bool:
    return guest.ssh("pgrep", "-fx", HOOK, check=False, timeout=30).returncode == 0


def snapcoord_popen(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "snapcoord", "-c", str(config), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip


def test_freeze_and_thaw_of_two_guests_at_once_over_ssh(
    guests: list[lab.SshGuest], libvirt_node_factory: NodeFactory, tmp_path: Path
) -> None:
    pair = guests[:2]
    tables = {vm: g.guest_table() for vm, g in zip(VMS, pair, strict=False)}
    config = fleet_config(tmp_path, node(libvirt_node_factory), tables, None)

    frozen = snapcoord("-c", str(config), "freeze", "--all", "--parallel", "2", "--json")
    assert frozen.returncode == 0, frozen.stdout + frozen.stderr
    *per_vm, last = json_lines(frozen.stdout)
    assert sorted(item["vm"] for item in per_vm) == ["vm-a", "vm-b"]
    assert last["summary"]["ok"] == 2 and last["summary"]["peak_parallel"] == 2
    for guest in pair:  # both frozen at once, each by its own holder and watchdog
        assert all_down(guest), states(guest)
        assert watchdogs(guest) != ""
    assert all(states(g) == dict.fromkeys(SERVICES, True) for g in guests[2:]), "untouched"

    thawed = snapcoord("-c", str(config), "thaw", "--all", "--parallel", "2", "--json")
    assert thawed.returncode == 0, thawed.stdout + thawed.stderr
    for guest in pair:
        assert states(guest) == dict.fromkeys(SERVICES, True)
        wait_for(lambda g=guest: watchdogs(g) == "", 10, "the watchdog to be disarmed")

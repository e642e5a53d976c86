"""adapters/permissions.py against what the Proxmox VE adapter really calls.

Each operation is driven through the real adapter, against the API double over HTTPS, the way
the commands drive it (snapshot: preflight check, list, create; revert: list, power state,
safety snapshot, rollback with start=1, the thaw check; ...). Every request it made is looked up
in the API schema extract (tests/pve_api/data, from proxmox/pve-docs ``apidata.js``, Proxmox VE 9)
and its ``permissions`` must be met by the operation's privileges, with the guest agent's for
PVE 9 where the operation uses the agent. And no privilege is listed that no request needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from snapcoord.adapters import permissions
from snapcoord.adapters.proxmox import ProxmoxAdapter
from tests.cli_helpers import REPO
from tests.pve_api import PveApiDouble
from tests.pve_api.server import Logged
from tests.pve_api.testing import Cert, make_cert, start_double, token_settings

T = 30.0
SCHEMA = REPO / "tests" / "pve_api" / "data" / "pve-snapshot-api.json"
#: Checked in the handler's code, not in the schema: qemu-server 7ba9640b (2026-05-04) checks
#: VM.PowerMgmt before a rollback with start=1 (tests/pve_api/data/NOTES.md, section 5).
IN_CODE = {("POST", "rollback", "start"): ("VM.PowerMgmt",)}


def endpoints() -> list[tuple[str, re.Pattern[str], dict[str, Any]]]:
    found = []
    for entry in json.loads(SCHEMA.read_text())["endpoints"]:
        pattern = re.sub(r"\\\{[a-z]+\\\}", "[^/]+", re.escape(entry["path"]))
        found.append((entry["method"], re.compile(pattern + "$"), entry["permissions"]))
    return found


def required(entry: Logged) -> list[tuple[tuple[str, ...], bool]]:
    """What one request needs: (privileges, any of them?) per check; none for 'user: all'."""
    matches = [
        perm
        for method, path, perm in endpoints()
        if method == entry.method and path.match(entry.path)
    ]
    assert len(matches) == 1, f"{entry.method} {entry.path}: not in the schema extract"
    perm = matches[0]
    needs: list[tuple[tuple[str, ...], bool]] = []
    if "check" in perm:
        kind, path, privileges, *rest = perm["check"]
        assert kind == "perm" and path == permissions.PROXMOX_ACL_PATH, perm
        needs.append((tuple(privileges), rest[:2] == ["any", 1]))
    else:
        assert perm.get("user") == "all", perm  # e.g. a task's status: its owner may read it
    for (method, tail, param), privileges in IN_CODE.items():
        if entry.method == method and entry.path.endswith("/" + tail) and param in entry.params:
            needs.append((privileges, False))
    return needs


def met(granted: set[str], privileges: tuple[str, ...], any_of: bool) -> bool:
    return bool(granted & set(privileges)) if any_of else set(privileges) <= granted


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("pve-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert)
    yield server
    server.stop()


def run_list(adapter: ProxmoxAdapter, double: PveApiDouble) -> None:
    adapter.list_snapshots(adapter.find_vm("db1"))


def run_snapshot(adapter: ProxmoxAdapter, double: PveApiDouble, quiesce: bool = False) -> None:
    vm = adapter.find_vm("db1")
    adapter.check_snapshot_ready(vm, memory=False, quiesce=quiesce)
    adapter.list_snapshots(vm)
    adapter.create_snapshot(vm, "snap-a", "", memory=False, quiesce=quiesce, timeout=T)


def run_prune(adapter: ProxmoxAdapter, double: PveApiDouble) -> None:
    vm = adapter.find_vm("db1")
    adapter.create_snapshot(vm, "old", "", memory=False, quiesce=False, timeout=T)
    double.clear_log()
    vm = adapter.find_vm("db1")
    (old,) = adapter.list_snapshots(vm)
    adapter.delete_snapshot(vm, old, timeout=T)


def run_revert(adapter: ProxmoxAdapter, double: PveApiDouble, frozen: bool = False) -> None:
    vm = adapter.find_vm("db1")
    adapter.create_snapshot(vm, "target", "", memory=False, quiesce=False, timeout=T)
    double.clear_log()
    vm = adapter.find_vm("db1")
    (target,) = adapter.list_snapshots(vm)
    adapter.power_state(vm)
    adapter.create_snapshot(vm, "safety", "", memory=False, quiesce=False, timeout=T)
    adapter.revert_snapshot(vm, target, start=None, timeout=T)  # running: start=1
    double.cluster.guests[100].fs_frozen = frozen  # a snapshot taken inside a backup's freeze
    assert adapter.thaw_filesystems(vm) is frozen


def run_vzdump_hook(adapter: ProxmoxAdapter, double: PveApiDouble) -> None:
    adapter.check_backup_freeze(adapter.find_vm("db1"))


Run = Callable[[ProxmoxAdapter, PveApiDouble], None]
CASES: list[tuple[str, bool, Run]] = [
    ("list", False, run_list),
    ("snapshot", False, run_snapshot),
    ("snapshot", True, lambda a, d: run_snapshot(a, d, quiesce=True)),
    ("prune", False, run_prune),
    ("revert", False, run_revert),
    ("revert", True, lambda a, d: run_revert(a, d, frozen=True)),
    ("vzdump-hook", True, run_vzdump_hook),
]


@pytest.mark.parametrize(("operation", "agent", "run"), CASES)
def test_each_request_is_allowed_by_the_operations_privileges(
    double: PveApiDouble, cert: Cert, operation: str, agent: bool, run: Run
) -> None:
    granted = set(permissions.proxmox_privileges([operation], agent=agent, pve_major=9))
    with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
        assert isinstance(adapter, ProxmoxAdapter)
        double.clear_log()
        run(adapter, double)
    log = list(double.log)
    assert log and all(e.status == 200 for e in log), [(e.path, e.status) for e in log]
    if not agent:
        # a revert asks the agent whether the guest is frozen; refused (403), the adapter takes
        # it as "not frozen" (adapters/proxmox.py thaw_filesystems): only a revert to a snapshot
        # taken inside a backup's freeze needs the agent's privileges (the frozen case below)
        log = [e for e in log if "/agent/" not in e.path]
    checks = [need for entry in log for need in required(entry)]

    def allowed(privileges: set[str]) -> bool:
        return all(met(privileges, names, any_of) for names, any_of in checks)

    assert allowed(granted), [
        (e.method, e.path, need) for e in log for need in required(e) if not met(granted, *need)
    ]
    for privilege in sorted(granted):
        assert not allowed(granted - {privilege}), f"{operation}: {privilege} is never needed"


def test_the_agent_adds_nothing_to_operations_that_do_not_use_it() -> None:
    for major in (8, 9):
        assert permissions.proxmox_privileges(["list", "prune"], agent=True, pve_major=major) == (
            permissions.proxmox_privileges(["list", "prune"])
        )
    assert set(permissions.PROXMOX_AGENT[8]) == set(permissions.PROXMOX_AGENT[9])

"""The API double is strict: what a real Proxmox VE refuses, it refuses the same way.

Without this, the adapter tests could pass by sending requests a real cluster rejects.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.pve_api import PveApiDouble
from tests.pve_api.api import UPID_RE
from tests.pve_api.schema import MISSING, UNKNOWN

TOKEN = "root@pam!ci"
SECRET = "0b7c9d2e-aaaa-4bbb-8ccc-123456789abc"
AUTH = {"Authorization": f"PVEAPIToken={TOKEN}={SECRET}"}


@pytest.fixture
def pve() -> Iterator[PveApiDouble]:
    double = PveApiDouble(tokens={TOKEN: SECRET}, users={"ops@pve": "pw-ops"}, task_seconds=0.2)
    double.start()
    yield double
    double.stop()


def call(
    pve: PveApiDouble, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
) -> requests.Response:
    return requests.request(
        method, pve.url + path, headers=AUTH if headers is None else headers, timeout=10, **kw
    )


def wait_task(pve: PveApiDouble, upid: str) -> dict[str, Any]:
    node = upid.split(":")[1]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status: dict[str, Any] = call(pve, "GET", f"/nodes/{node}/tasks/{upid}/status").json()[
            "data"
        ]
        if status["status"] == "stopped":
            return status
        time.sleep(0.05)
    raise AssertionError("task did not stop")


SNAP = "/nodes/pve1/qemu/100/snapshot"


def test_unknown_parameter_is_refused(pve: PveApiDouble) -> None:
    res = call(pve, "POST", SNAP, data={"snapname": "ok1", "quiesce": "1"})
    assert res.status_code == 400 and res.reason == "Parameter verification failed."
    assert res.json() == {
        "data": None,
        "errors": {"quiesce": UNKNOWN},
        "message": "Parameter verification failed.\n",
    }
    assert pve.cluster.guests[100].snapshots == {}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a b", "invalid format - invalid configuration ID 'a b'\n"),
        ("1st", "invalid format - invalid configuration ID '1st'\n"),
        ("x", "invalid format - invalid configuration ID 'x'\n"),
        ("é-snap", "invalid format - invalid configuration ID 'é-snap'\n"),
        ("a" * 41, "value may only be 40 characters long"),
    ],
)
def test_bad_snapshot_name_is_refused(pve: PveApiDouble, name: str, message: str) -> None:
    res = call(pve, "POST", SNAP, data={"snapname": name})
    assert res.status_code == 400
    assert res.json()["errors"] == {"snapname": message}


def test_names_of_40_characters_and_mixed_case_pass(pve: PveApiDouble) -> None:
    res = call(pve, "POST", SNAP, data={"snapname": "A" + "b_-9" * 9 + "zzz"})
    assert res.status_code == 200 and UPID_RE.match(res.json()["data"])


def test_missing_parameter_and_booleans(pve: PveApiDouble) -> None:
    res = call(pve, "POST", SNAP, data={"description": "x"})
    assert res.json()["errors"] == {"snapname": MISSING}
    for value in ("True", "true", "yes", "on", "2"):
        res = call(pve, "POST", SNAP, data={"snapname": "s1", "vmstate": value})
        assert res.status_code == 400
        assert res.json()["errors"] == {"vmstate": f"type check ('boolean') failed - got '{value}'"}
    assert call(pve, "POST", SNAP, data={"snapname": "s1", "vmstate": "1"}).status_code == 200
    # a JSON body may carry real booleans
    assert call(pve, "POST", SNAP, json={"snapname": "s2", "vmstate": False}).status_code == 200


def test_vmid_and_node_formats(pve: PveApiDouble) -> None:
    res = call(pve, "GET", "/nodes/pve1/qemu/99/snapshot")
    assert res.status_code == 400
    assert res.json()["errors"] == {
        "vmid": "invalid format - value does not look like a valid VM ID\n"
        "\\nvalue must have a minimum value of 100"
    }
    res = call(pve, "GET", "/nodes/pve1/qemu/abc/snapshot")
    assert res.json()["errors"] == {"vmid": "type check ('integer') failed - got 'abc'"}
    res = call(pve, "GET", "/nodes/-bad-/qemu/100/snapshot")
    assert res.json()["errors"] == {
        "node": "invalid format - value does not look like a valid node name\n"
    }


def test_enum_and_uri_conflict(pve: PveApiDouble) -> None:
    res = call(pve, "GET", "/cluster/resources", params={"type": "qemu"})
    assert res.status_code == 400
    assert res.json()["errors"] == {
        "type": "value 'qemu' does not have a value in the enumeration 'vm, storage, node, sdn'"
    }
    res = call(pve, "GET", SNAP, params={"vmid": "101"})
    assert res.json()["errors"] == {
        "vmid": "duplicate parameter (already defined in URI) with conflicting values!"
    }


def test_containers_have_no_vmstate_parameter(pve: PveApiDouble) -> None:
    res = call(pve, "POST", "/nodes/pve1/lxc/101/snapshot", data={"snapname": "s", "vmstate": "0"})
    assert res.json()["errors"] == {
        "vmstate": UNKNOWN,
        "snapname": res.json()["errors"]["snapname"],
    }


@pytest.mark.parametrize(
    ("path", "name"),
    [(SNAP, "current"), (SNAP, "pending"), (SNAP, "PenDing"),
     ("/nodes/pve1/lxc/101/snapshot", "current"), ("/nodes/pve1/lxc/101/snapshot", "vzdump")],
)  # fmt: skip
def test_reserved_names_are_500_with_the_reason(pve: PveApiDouble, path: str, name: str) -> None:
    res = call(pve, "POST", path, data={"snapname": name})
    shown = name.lower() if name.lower() == "pending" else name  # Qemu.pm prints 'pending'
    assert res.status_code == 500
    assert res.reason == f"unable to use snapshot name '{shown}' (reserved name)"
    assert res.json()["message"] == f"unable to use snapshot name '{shown}' (reserved name)\n"


def test_reserved_names_differ_per_guest_type(pve: PveApiDouble) -> None:
    assert call(pve, "POST", SNAP, data={"snapname": "vzdump"}).status_code == 200
    res = call(pve, "POST", "/nodes/pve1/lxc/101/snapshot", data={"snapname": "pending"})
    assert res.status_code == 200
    res = call(pve, "POST", "/nodes/pve1/lxc/101/snapshot", data={"snapname": "VZDUMP"})
    assert res.status_code == 200  # lxc compares case-sensitively


def test_authentication(pve: PveApiDouble) -> None:
    res = call(pve, "GET", "/version", headers={})
    assert (res.status_code, res.reason, res.content) == (401, "No ticket", b"")
    bad = {"Authorization": f"PVEAPIToken={TOKEN}=wrong"}
    res = call(pve, "GET", "/version", headers=bad)
    assert (res.status_code, res.reason) == (401, "Authentication failed!")
    res = call(pve, "GET", "/version", headers={"Authorization": f"PVEAPIToken=root!ci={SECRET}"})
    assert res.status_code == 401  # token id must be USER@REALM!NAME
    assert call(pve, "GET", "/version").json()["data"]["release"]


def test_ticket_csrf_and_expiry(pve: PveApiDouble) -> None:
    res = call(
        pve, "POST", "/access/ticket", headers={}, data={"username": "ops@pve", "password": "x"}
    )
    assert (res.status_code, res.reason) == (401, "authentication failure")
    res = call(pve, "POST", "/access/ticket", headers={},
               data={"username": "ops", "realm": "pve", "password": "pw-ops"})  # fmt: skip
    ticket = res.json()["data"]
    cookie = {"Cookie": f"PVEAuthCookie={ticket['ticket']}"}
    assert call(pve, "GET", SNAP, headers=cookie).status_code == 200  # GET: no CSRF needed
    res = call(pve, "POST", SNAP, headers=cookie, data={"snapname": "t1"})
    assert (res.status_code, res.reason) == (401, "Permission denied - invalid csrf token")
    with_csrf = {**cookie, "CSRFPreventionToken": ticket["CSRFPreventionToken"]}
    res = call(pve, "POST", SNAP, headers=with_csrf, data={"snapname": "t1"})
    assert res.status_code == 200 and res.json()["data"].endswith(":ops@pve:")
    # renewal: the ticket itself is accepted as password
    res = call(pve, "POST", "/access/ticket", headers={},
               data={"username": "ops@pve", "password": ticket["ticket"]})  # fmt: skip
    assert res.status_code == 200
    pve.expire_tickets()
    assert call(pve, "GET", SNAP, headers=cookie).status_code == 401


def test_tokens_need_no_csrf_but_may_not_get_tickets(pve: PveApiDouble) -> None:
    assert call(pve, "POST", SNAP, data={"snapname": "tok"}).status_code == 200


def test_unknown_path_and_method(pve: PveApiDouble) -> None:
    res = call(pve, "GET", "/nodes/pve1/qemu/100/snapshots")
    assert res.status_code == 501
    assert res.reason == "Method 'GET /nodes/pve1/qemu/100/snapshots' not implemented"
    assert call(pve, "PUT", SNAP, data={"snapname": "x1"}).status_code == 501
    assert call(pve, "GET", "/nodes/pve1/qemu/100/snapshot", headers={}).status_code == 401


def test_task_lifecycle_and_upid_format(pve: PveApiDouble) -> None:
    upid = call(pve, "POST", SNAP, data={"snapname": "life", "description": "d"}).json()["data"]
    assert re.fullmatch(
        r"UPID:pve1:[0-9A-F]{8}:[0-9A-F]{8}:[0-9A-F]{8}:qmsnapshot:100:root@pam!ci:", upid
    )
    first = call(pve, "GET", f"/nodes/pve1/tasks/{upid}/status").json()["data"]
    assert first["status"] == "running" and "exitstatus" not in first
    assert (first["user"], first["tokenid"]) == ("root@pam", "ci")
    listed = call(pve, "GET", SNAP).json()["data"]
    assert {"name": "life", "snapstate": "prepare"}.items() <= listed[0].items()
    assert (
        call(pve, "GET", "/nodes/pve1/qemu/100/status/current").json()["data"]["lock"] == "snapshot"
    )
    assert wait_task(pve, upid)["exitstatus"] == "OK"
    listed = call(pve, "GET", SNAP).json()["data"]
    assert listed[-1]["name"] == "current" and listed[-1]["parent"] == "life"
    log = call(pve, "GET", f"/nodes/pve1/tasks/{upid}/log").json()
    assert log["data"][-1]["t"] == "TASK OK" and log["total"] == len(log["data"])
    # wrong node: the task log lives on the node that ran it
    res = call(pve, "GET", f"/nodes/pve2/tasks/{upid}/status")
    assert res.status_code == 400 and res.json()["errors"] == {"upid": "no such task"}
    res = call(pve, "GET", "/nodes/pve1/tasks/UPID:nonsense/status")
    assert res.json()["errors"] == {"upid": "unable to parse worker upid"}


def test_duplicate_name_fails_inside_the_task(pve: PveApiDouble) -> None:
    wait_task(pve, call(pve, "POST", SNAP, data={"snapname": "twice"}).json()["data"])
    res = call(pve, "POST", SNAP, data={"snapname": "twice"})
    assert res.status_code == 200  # HTTP is fine: the worker fails
    assert wait_task(pve, res.json()["data"])["exitstatus"] == "snapshot name 'twice' already used"


def test_locks_fail_tasks_with_the_lock_message(pve: PveApiDouble) -> None:
    pve.cluster.lock_guest(100, "backup", seconds=60)
    upid = call(pve, "POST", SNAP, data={"snapname": "locked"}).json()["data"]
    assert wait_task(pve, upid)["exitstatus"] == "VM is locked (backup)"
    pve.cluster.lock_guest(101, "snapshot-delete")
    upid = call(pve, "POST", "/nodes/pve1/lxc/101/snapshot", data={"snapname": "x1"}).json()["data"]
    assert wait_task(pve, upid)["exitstatus"] == "CT is locked (snapshot-delete)"
    res = call(pve, "PUT", f"{SNAP}/none/config", data={"description": "d"})
    assert (res.status_code, res.reason) == (500, "VM is locked (backup)")
    pve.cluster.lock_guest(100, "backup", seconds=0.1)
    time.sleep(0.2)
    upid = call(pve, "POST", SNAP, data={"snapname": "unlocked"}).json()["data"]
    assert wait_task(pve, upid)["exitstatus"] == "OK"


def test_rollback_of_running_vm_without_start_leaves_it_stopped(pve: PveApiDouble) -> None:
    wait_task(pve, call(pve, "POST", SNAP, data={"snapname": "r1"}).json()["data"])
    wait_task(pve, call(pve, "POST", f"{SNAP}/r1/rollback").json()["data"])
    status = call(pve, "GET", "/nodes/pve1/qemu/100/status/current").json()["data"]
    assert status["status"] == "stopped"
    wait_task(pve, call(pve, "POST", f"{SNAP}/r1/rollback", data={"start": "1"}).json()["data"])
    status = call(pve, "GET", "/nodes/pve1/qemu/100/status/current").json()["data"]
    assert status["status"] == "running"
    upid = call(pve, "POST", f"{SNAP}/gone/rollback").json()["data"]
    assert wait_task(pve, upid)["exitstatus"] == "snapshot 'gone' does not exist"


def test_guest_must_be_addressed_on_its_node_and_type(pve: PveApiDouble) -> None:
    res = call(pve, "GET", "/nodes/pve2/qemu/100/snapshot")
    assert res.status_code == 500
    assert res.reason == "Configuration file 'nodes/pve2/qemu-server/100.conf' does not exist"
    res = call(pve, "GET", "/nodes/pve1/lxc/100/snapshot")
    assert res.reason == "Configuration file 'nodes/pve1/lxc/100.conf' does not exist"


def test_cluster_resources_span_nodes_and_types(pve: PveApiDouble) -> None:
    data = call(pve, "GET", "/cluster/resources", params={"type": "vm"}).json()["data"]
    assert {(d["type"], d["node"]) for d in data} >= {("qemu", "pve1"), ("lxc", "pve3")}
    assert {d["vmid"] for d in data if d["name"] == "twin"} == {103, 104}


def test_agent_endpoints(pve: PveApiDouble) -> None:
    assert call(pve, "POST", "/nodes/pve1/qemu/100/agent/ping").json() == {"data": {"result": {}}}
    res = call(pve, "POST", "/nodes/pve2/qemu/202/agent/ping")
    assert (res.status_code, res.reason) == (500, "No QEMU guest agent configured")
    res = call(pve, "POST", "/nodes/pve1/qemu/100/agent/ping", data={"timeout": "3"})
    assert res.status_code == 400  # ping takes no parameters

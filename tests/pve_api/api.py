"""Handlers for the endpoints of the schema subset (data/pve-snapshot-api.json, 35) and of
the tests' own additions (data/pve-check-api.json); behaviour from data/NOTES.md and the latter's
``_behaviour``."""

from __future__ import annotations

import base64
import hashlib
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapcoord.agent_link import AgentCommandError, AgentUnavailable

from .cluster import TASK_TYPES, ApiError, Cluster, Guest, Snap, die, param_error

UPID_RE = re.compile(
    r"^UPID:([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):([0-9A-Fa-f]{8}):([0-9A-Fa-f]{8,9}):"
    r"([0-9A-Fa-f]{8}):([^:\s/]+):([^:\s/]*):([^:\s/]+):$"
)


@dataclass
class Reply:
    data: Any
    total: int | None = None


@dataclass
class Request:
    cluster: Cluster
    params: dict[str, Any]
    user: str  # user@realm, or user@realm!tokenid for API tokens
    issue_ticket: Callable[[str], dict[str, Any]]
    check_login: Callable[[str, str], bool]
    #: (authid, ACL path) -> {privilege: propagate}
    permissions: Callable[[str, str], dict[str, int]]
    #: the Proxmox VE major version the double claims (GET /version)
    pve_major: int = 9


Handler = Callable[[Request], Any]
HANDLERS: dict[str, Handler] = {}


def handles(*names: str) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = func
        return func

    return register


def _type_of(path_key: str) -> str:
    return "lxc" if "/lxc/" in path_key else "qemu"


def _guest(req: Request, type_: str) -> Guest:
    return req.cluster.guest_at(req.params["node"], type_, req.params["vmid"])


def _digest(guest: Guest) -> str:
    text = f"{guest.vmid}{guest.name}{guest.parent}{sorted(guest.snapshots)}{guest.lock}"
    return hashlib.sha1(text.encode()).hexdigest()  # a config digest


# -- snapshots ---------------------------------------------------------------------------


def snapshot_list(req: Request, type_: str) -> list[dict[str, Any]]:
    guest = _guest(req, type_)
    items: list[dict[str, Any]] = []
    for snap in guest.snapshots.values():
        item: dict[str, Any] = {
            "name": snap.name,
            "snaptime": snap.snaptime,
            "description": snap.description,
        }
        if type_ == "qemu":
            item["vmstate"] = 1 if snap.vmstate else 0
        if snap.parent:
            item["parent"] = snap.parent
        if snap.snapstate:
            item["snapstate"] = snap.snapstate
        items.append(item)
    random.shuffle(items)  # "Items come in no defined order (hash order)"
    current: dict[str, Any] = {
        "name": "current",
        "digest": _digest(guest),
        "running": 1 if guest.status == "running" else 0,
        "description": "You are here!",
    }
    if guest.parent:
        current["parent"] = guest.parent
    items.append(current)
    return items


def _reserved(type_: str, name: str) -> None:
    if type_ == "qemu":
        if name == "current":
            raise die("unable to use snapshot name 'current' (reserved name)")
        if name.lower() == "pending":
            raise die("unable to use snapshot name 'pending' (reserved name)")
    elif name in ("current", "vzdump"):
        raise die(f"unable to use snapshot name '{name}' (reserved name)")


def snapshot_create(req: Request, type_: str) -> str:
    cluster, params = req.cluster, req.params
    guest = _guest(req, type_)
    name = params["snapname"]
    _reserved(type_, name)
    task_type = TASK_TYPES[(type_, "snapshot")]
    node, vmid = params["node"], str(guest.vmid)
    if guest.template:
        return cluster.failed_task(
            node, task_type, vmid, req.user, "you can't take a snapshot if it's a template"
        )
    if guest.lock:
        error = f"{guest.word} is locked ({guest.lock})"
        return cluster.failed_task(node, task_type, vmid, req.user, error)
    if name in guest.snapshots:
        error = f"snapshot name '{name}' already used"
        return cluster.failed_task(node, task_type, vmid, req.user, error)

    running = guest.status == "running"
    vmstate = bool(params.get("vmstate")) and running
    if type_ == "qemu":
        freeze = running and not vmstate and guest.agent_enabled and guest.agent_running
    else:
        freeze = running
    snap = Snap(
        name=name,
        snaptime=int(time.time()),
        description=params.get("description", ""),
        vmstate=vmstate,
        parent=guest.parent,
        snapstate="prepare",
    )
    guest.snapshots[name] = snap
    guest.lock = "snapshot"
    guest.lock_until = None
    log = ["guest-fsfreeze-freeze"] if freeze else []

    def finish() -> str | None:
        if guest.lock != "snapshot":
            return "missing snapshot lock"
        snap.snapstate = None
        guest.lock = None
        guest.parent = name
        if freeze:
            guest.frozen_snapshots.append(name)
        return None

    return cluster.start_task(node, task_type, vmid, req.user, finish, log=log)


def snapshot_delete(req: Request, type_: str) -> str:
    cluster, params = req.cluster, req.params
    guest = _guest(req, type_)
    name = params["snapname"]
    task_type = TASK_TYPES[(type_, "delete")]
    node, vmid = params["node"], str(guest.vmid)
    snap = guest.snapshots.get(name)
    if snap is None:
        error = f"snapshot '{name}' does not exist"
        return cluster.failed_task(node, task_type, vmid, req.user, error)
    if guest.lock:
        error = f"{guest.word} is locked ({guest.lock})"
        return cluster.failed_task(node, task_type, vmid, req.user, error)
    guest.lock = "snapshot-delete"
    guest.lock_until = None
    snap.snapstate = "delete"

    def finish() -> str | None:
        guest.snapshots.pop(name, None)
        for other in guest.snapshots.values():
            if other.parent == name:
                other.parent = snap.parent
        if guest.parent == name:
            guest.parent = snap.parent
        guest.lock = None
        return None

    return cluster.start_task(node, task_type, vmid, req.user, finish)


def snapshot_rollback(req: Request, type_: str) -> str:
    cluster, params = req.cluster, req.params
    guest = _guest(req, type_)
    name = params["snapname"]
    task_type = TASK_TYPES[(type_, "rollback")]
    node, vmid = params["node"], str(guest.vmid)
    snap = guest.snapshots.get(name)
    fail: str | None = None
    if snap is None:
        fail = f"snapshot '{name}' does not exist"
    elif snap.snapstate:
        fail = f"unable to rollback to incomplete snapshot (snapstate = {snap.snapstate})"
    elif guest.lock:
        fail = f"{guest.word} is locked ({guest.lock})"
    if fail is not None or snap is None:
        return cluster.failed_task(node, task_type, vmid, req.user, fail or "")
    # __snapshot_rollback_vm_stop: a running guest is stopped first, whatever 'start' says.
    guest.status = "stopped"
    guest.lock = "rollback"
    guest.lock_until = None
    start = bool(params.get("start"))

    def finish() -> str | None:
        guest.lock = None
        guest.parent = name
        if snap.vmstate or start:
            guest.status = "running"
        return None

    return cluster.start_task(node, task_type, vmid, req.user, finish)


def snapshot_config_get(req: Request, type_: str) -> dict[str, Any]:
    guest = _guest(req, type_)
    snap = guest.snapshots.get(req.params["snapname"])
    if snap is None:
        raise die(f"snapshot '{req.params['snapname']}' does not exist")
    data = _config(guest)
    data.pop("digest", None)
    data.update({"snaptime": snap.snaptime, "description": snap.description})
    if type_ == "qemu" and snap.vmstate:
        data["vmstate"] = f"local:state-{guest.vmid}-{snap.name}"
    if snap.parent:
        data["parent"] = snap.parent
    else:
        data.pop("parent", None)
    if snap.snapstate:
        data["snapstate"] = snap.snapstate
    return data


def snapshot_config_put(req: Request, type_: str) -> None:
    guest = _guest(req, type_)
    if "description" not in req.params:
        return None
    if guest.lock:
        raise die(f"{guest.word} is locked ({guest.lock})")
    snap = guest.snapshots.get(req.params["snapname"])
    if snap is None:
        raise die(f"snapshot '{req.params['snapname']}' does not exist")
    snap.description = req.params["description"]
    return None


def _register_guest_endpoints() -> None:
    for type_ in ("qemu", "lxc"):
        base = f"/nodes/{{node}}/{type_}/{{vmid}}/snapshot"

        def bind(func: Callable[[Request, str], Any], t: str = type_) -> Handler:
            return lambda req: func(req, t)

        HANDLERS[f"GET {base}"] = bind(snapshot_list)
        HANDLERS[f"POST {base}"] = bind(snapshot_create)
        HANDLERS[f"GET {base}/{{snapname}}"] = lambda req: [{"cmd": "rollback"}, {"cmd": "config"}]
        HANDLERS[f"DELETE {base}/{{snapname}}"] = bind(snapshot_delete)
        HANDLERS[f"GET {base}/{{snapname}}/config"] = bind(snapshot_config_get)
        HANDLERS[f"PUT {base}/{{snapname}}/config"] = bind(snapshot_config_put)
        HANDLERS[f"POST {base}/{{snapname}}/rollback"] = bind(snapshot_rollback)
        node_base = f"/nodes/{{node}}/{type_}"
        HANDLERS[f"GET {node_base}"] = bind(guest_list)
        HANDLERS[f"GET {node_base}/{{vmid}}/status/current"] = bind(guest_status)
        HANDLERS[f"GET {node_base}/{{vmid}}/config"] = bind(guest_config)
        HANDLERS[f"POST {node_base}/{{vmid}}/status/start"] = bind(guest_start)
        HANDLERS[f"POST {node_base}/{{vmid}}/status/shutdown"] = bind(guest_shutdown)
        HANDLERS[f"GET {node_base}/{{vmid}}/feature"] = bind(guest_feature)


def guest_feature(req: Request, type_: str) -> dict[str, Any]:
    """Whether every disk's storage can take the feature (only ``snapshot`` is modelled)."""
    guest = _guest(req, type_)
    data: dict[str, Any] = {
        "hasFeature": req.params["feature"] == "snapshot" and guest.snapshot_storage
    }
    if type_ == "qemu":
        data["nodes"] = sorted(req.cluster.nodes)
    return data


# -- guests --------------------------------------------------------------------------------


def _config(guest: Guest) -> dict[str, Any]:
    data: dict[str, Any] = {"memory": "2048", "cores": 2, "digest": _digest(guest)}
    if guest.type == "qemu":
        data["name"] = guest.name
        if guest.agent is not None:
            data["agent"] = guest.agent
    else:
        data.update({"hostname": guest.name, "ostype": "debian", "arch": "amd64"})
    if guest.lock:
        data["lock"] = guest.lock
    if guest.parent:
        data["parent"] = guest.parent
    if guest.template:
        data["template"] = 1
    return data


def _status(guest: Guest) -> dict[str, Any]:
    data: dict[str, Any] = {
        "vmid": guest.vmid,
        "name": guest.name,
        "status": guest.status,
        "uptime": 1234 if guest.status == "running" else 0,
        "maxmem": 2147483648,
        "cpus": 2,
    }
    if guest.type == "qemu":
        data["qmpstatus"] = guest.status
        if guest.agent_enabled:
            data["agent"] = 1
    else:
        data["type"] = "lxc"
    if guest.lock:
        data["lock"] = guest.lock
    if guest.template:
        data["template"] = 1
    return data


def guest_list(req: Request, type_: str) -> list[dict[str, Any]]:
    node = req.params["node"]
    if node not in req.cluster.nodes:
        raise die(f"hostname lookup '{node}' failed - failed to get address info for: {node}")
    return [_status(g) for g in req.cluster.guests.values() if g.node == node and g.type == type_]


def guest_status(req: Request, type_: str) -> dict[str, Any]:
    guest = _guest(req, type_)
    data = _status(guest)
    data["ha"] = {"managed": 0}
    return data


def guest_config(req: Request, type_: str) -> dict[str, Any]:
    guest = _guest(req, type_)
    name = req.params.get("snapshot")
    if name is not None:
        snap = guest.snapshots.get(name)
        if snap is None:
            raise die(f"snapshot '{name}' does not exist")
        req.params["snapname"] = name
        return snapshot_config_get(req, type_)
    return _config(guest)


def guest_start(req: Request, type_: str) -> str:
    guest = _guest(req, type_)
    node, vmid = req.params["node"], str(guest.vmid)
    task_type = TASK_TYPES[(type_, "start")]
    if guest.status == "running":
        word = "VM" if type_ == "qemu" else "CT"
        return req.cluster.failed_task(
            node, task_type, vmid, req.user, f"{word} {guest.vmid} already running"
        )

    def finish() -> str | None:
        guest.status = "running"
        return None

    return req.cluster.start_task(node, task_type, vmid, req.user, finish)


def guest_shutdown(req: Request, type_: str) -> str:
    guest = _guest(req, type_)
    node, vmid = req.params["node"], str(guest.vmid)

    def finish() -> str | None:
        guest.status = "stopped"
        return None

    task_type = TASK_TYPES[(type_, "shutdown")]
    return req.cluster.start_task(node, task_type, vmid, req.user, finish)


def _agent(req: Request) -> Guest:
    guest = _guest(req, "qemu")
    _assert_agent_available(guest)
    return guest


@handles("POST /nodes/{node}/qemu/{vmid}/agent/ping")
def agent_ping(req: Request) -> dict[str, Any]:
    guest = _agent(req)
    if guest.agent_link is None:
        return {"result": {}}
    return {"result": _mon_cmd(guest, "guest-ping")}


@handles("POST /nodes/{node}/qemu/{vmid}/agent/fsfreeze-freeze")
def agent_freeze(req: Request) -> dict[str, Any]:
    _agent(req).fs_frozen = True
    return {"result": 1}


@handles("POST /nodes/{node}/qemu/{vmid}/agent/fsfreeze-thaw")
def agent_thaw(req: Request) -> dict[str, Any]:
    _agent(req).fs_frozen = False
    return {"result": 1}


@handles("POST /nodes/{node}/qemu/{vmid}/agent/fsfreeze-status")
def agent_status(req: Request) -> dict[str, Any]:
    return {"result": "frozen" if _agent(req).fs_frozen else "thawed"}


# -- the guest agent's commands (data/pve-agent-api.json, _behaviour) -----------------------

#: mon_cmd's timeout for the guest commands below (src/PVE/QMPClient.pm: the 5 s default)
QGA_TIMEOUT = 5.0
#: qga_check_running: the guest-ping that decides whether the agent runs
PING_TIMEOUT = 3.0
#: file-read's maximum and chunk size (src/PVE/API2/Qemu/Agent.pm)
MAX_READ_SIZE = 16 * 1024 * 1024
READ_CHUNK = 1024 * 1024
#: ``die`` without a newline: Perl appends where it died
WIDE_CHARACTER = "Wide character in subroutine entry at /usr/share/perl5/PVE/{where}."


def _agent_answers(guest: Guest) -> bool:
    """qga_check_running: guest-ping within 3 s. A VM whose agent option is disabled has no qga
    socket (mon_cmd dies); an agent that answers the ping with an error still runs."""
    if not guest.agent_enabled:
        return False
    if guest.agent_link is None:
        return guest.agent_running
    try:
        guest.agent_link.command("guest-ping", None, timeout=PING_TIMEOUT)
    except AgentUnavailable:
        return False
    except AgentCommandError:
        return True
    return True


def _assert_agent_available(guest: Guest) -> None:
    if guest.agent is None:
        raise die("No QEMU guest agent configured")
    if guest.status != "running":
        raise die(f"VM {guest.vmid} is not running")
    if not _agent_answers(guest):
        raise die("QEMU guest agent is not running")


def _mon_cmd(guest: Guest, execute: str, arguments: dict[str, Any] | None = None) -> Any:
    """mon_cmd(vmid, "guest-..."): the agent's ``return``, or ``{"error": {...}}`` when the
    agent answered an error; dies like QMPClient when it does not answer."""
    link = guest.agent_link
    if link is None:
        raise die("unable to open monitor socket")
    try:
        return link.command(execute, arguments, timeout=QGA_TIMEOUT)
    except AgentCommandError as exc:
        return {
            "error": {"class": "GenericError", "desc": exc.message.removeprefix("Agent error: ")}
        }
    except AgentUnavailable as exc:
        reason = (
            "got timeout"
            if "no answer" in exc.message
            else (f"unable to connect to VM {guest.vmid} qga socket - {exc.message}")
        )
        raise die(f"VM {guest.vmid} qga command '{execute}' failed - {reason}") from None


def _check_agent_error(result: Any, errmsg: str) -> None:
    if isinstance(result, dict) and isinstance(result.get("error"), dict):
        desc = result["error"].get("desc")
        if desc:
            raise die(f"Agent error: {desc}")
    if result is None:
        raise die(f"Agent error: {errmsg}")


def _agent_cmd(guest: Guest, cmd: str, params: dict[str, Any], errmsg: str) -> Any:
    _assert_agent_available(guest)
    result = _mon_cmd(guest, f"guest-{cmd}", params)
    _check_agent_error(result, errmsg)
    return result


def _perl_bytes(text: str, where: str) -> bytes:
    """encode_base64 of a Perl character string: its Latin-1 bytes, or the die of a character
    above U+00FF."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise die(WIDE_CHARACTER.format(where=where)) from None


@handles("POST /nodes/{node}/qemu/{vmid}/agent/exec")
def agent_exec(req: Request) -> Any:
    guest = _guest(req, "qemu")
    cmd = list(req.params["command"])
    args: dict[str, Any] = {"capture-output": True}
    args["path"] = cmd[0] if cmd else None
    args["arg"] = cmd[1:]
    data = req.params.get("input-data")
    if data is not None:
        args["input-data"] = base64.b64encode(
            _perl_bytes(data, "QemuServer/Agent.pm line 135")
        ).decode()
    if "input-data" not in args and args["path"] is None:
        raise die("command or input-data (or both) required")
    if args["path"] is None:
        del args["path"]
    return _agent_cmd(guest, "exec", args, "can't execute command")


@handles("GET /nodes/{node}/qemu/{vmid}/agent/exec-status")
def agent_exec_status(req: Request) -> Any:
    guest = _guest(req, "qemu")
    pid = int(req.params["pid"])
    result = _agent_cmd(guest, "exec-status", {"pid": pid}, f"can't get exec status for '{pid}'")
    for key in ("out-data", "err-data"):
        if result.get(key):  # decoded bytes, written one code point per byte
            result[key] = base64.b64decode(result[key]).decode("latin-1")
    return {k: (int(v) if isinstance(v, bool) else v) for k, v in result.items()}


@handles("GET /nodes/{node}/qemu/{vmid}/agent/file-read")
def agent_file_read(req: Request) -> dict[str, Any]:
    guest = _guest(req, "qemu")
    count = int(req.params.get("count", MAX_READ_SIZE))
    decode = bool(req.params.get("decode", True))
    offset = int(req.params.get("offset", 0))
    handle = _agent_cmd(guest, "file-open", {"path": req.params["file"]}, "can't open file")
    if offset > 0:
        seek = _mon_cmd(
            guest, "guest-file-seek", {"handle": handle, "offset": offset, "whence": "set"}
        )
        _check_agent_error(seek, "can't seek to offset position")
    bytes_read, eof, parts = 0, False, []
    while bytes_read < count and not eof:
        chunk_size = min(count - bytes_read, READ_CHUNK)
        read = _mon_cmd(guest, "guest-file-read", {"handle": handle, "count": chunk_size})
        _check_agent_error(read, "can't read from file")
        chunk = read["buf-b64"]
        parts.append(base64.b64decode(chunk).decode("latin-1") if decode else chunk)
        bytes_read += int(read["count"])
        eof = bool(read.get("eof"))
    _mon_cmd(guest, "guest-file-close", {"handle": handle})  # an error here is only warned
    result: dict[str, Any] = {"content": "".join(parts), "bytes-read": bytes_read}
    if not eof:
        result["truncated"] = 1
    return result


@handles("POST /nodes/{node}/qemu/{vmid}/agent/file-write")
def agent_file_write(req: Request) -> None:
    guest = _guest(req, "qemu")
    content = req.params["content"]
    encode = bool(req.params.get("encode", True))
    # encode_base64 without an end-of-line argument: lines of 76 characters (qemu-ga takes them)
    raw = _perl_bytes(content, "API2/Qemu/Agent.pm line 624") if encode else b""
    buf = base64.encodebytes(raw).decode() if encode else content
    path = req.params["file"]
    handle = _agent_cmd(guest, "file-open", {"path": path, "mode": "wb"}, "can't open file")
    _agent_cmd(guest, "file-write", {"handle": handle, "buf-b64": buf}, "can't write to file")
    _agent_cmd(guest, "file-close", {"handle": handle}, "can't close file")
    return None


# -- tasks ---------------------------------------------------------------------------------


def _task(req: Request) -> Any:
    upid = req.params["upid"]
    if not UPID_RE.match(upid):
        raise param_error({"upid": "unable to parse worker upid"})
    task = req.cluster.tasks.get(upid)
    if task is None or task.node != req.params["node"]:
        raise param_error({"upid": "no such task"})
    return task


@handles("GET /nodes/{node}/tasks/{upid}/status")
def task_status(req: Request) -> dict[str, Any]:
    task = _task(req)
    data: dict[str, Any] = {
        "upid": task.upid,
        "node": task.node,
        "pid": task.pid,
        "pstart": task.pstart,
        "starttime": task.starttime,
        "type": task.type,
        "id": task.id,
        "user": task.user,
        "status": "running" if task.exitstatus is None else "stopped",
    }
    if "!" in task.user:
        data["user"], data["tokenid"] = task.user.split("!", 1)
    if task.exitstatus is not None:
        data["exitstatus"] = task.exitstatus
    return data


@handles("GET /nodes/{node}/tasks/{upid}/log")
def task_log(req: Request) -> Reply:
    task = _task(req)
    lines = task.log or ["no content"]
    start = int(req.params.get("start", 0))
    limit = int(req.params.get("limit", 50))
    chosen = [{"n": i + 1, "t": t} for i, t in enumerate(lines)][start : start + limit]
    return Reply(chosen, total=len(lines))


@handles("DELETE /nodes/{node}/tasks/{upid}")
def task_stop(req: Request) -> None:
    task = _task(req)
    if task.exitstatus is None:
        task.exitstatus = "interrupted by signal"
        task.log.append("TASK ERROR: interrupted by signal")
    return None


# -- cluster, nodes, access -----------------------------------------------------------------


@handles("GET /cluster/resources")
def cluster_resources(req: Request) -> list[dict[str, Any]]:
    kind = req.params.get("type")
    out: list[dict[str, Any]] = []
    if kind in (None, "node"):
        for node in req.cluster.nodes:
            out.append(
                {
                    "id": f"node/{node}",
                    "node": node,
                    "type": "node",
                    "status": "online",
                    "level": "",
                    "maxcpu": 8,
                    "cpu": 0.02,
                }
            )
    if kind in (None, "vm"):
        for guest in req.cluster.guests.values():
            entry: dict[str, Any] = {
                "id": f"{guest.type}/{guest.vmid}",
                "vmid": guest.vmid,
                "node": guest.node,
                "type": guest.type,
                "name": guest.name,
                "status": guest.status,
                "template": 1 if guest.template else 0,
                "maxmem": 2147483648,
                "maxcpu": 2,
                "uptime": 1234 if guest.status == "running" else 0,
            }
            if guest.lock:
                entry["lock"] = guest.lock
            out.append(entry)
    return out


@handles("GET /nodes")
def nodes(req: Request) -> list[dict[str, Any]]:
    return [{"node": n, "status": "online", "maxcpu": 8, "level": ""} for n in req.cluster.nodes]


@handles("GET /version")
def version(req: Request) -> dict[str, Any]:
    if req.pve_major == 8:
        return {"version": "8.4.1", "release": "8.4", "repoid": "2a5fa54a", "console": "html5"}
    return {"version": "9.0.5", "release": "9.0", "repoid": "14a22df3", "console": "html5"}


@handles("GET /access/permissions")
def access_permissions(req: Request) -> dict[str, Any]:
    """Only the caller's own permissions (a user may also read its own tokens'); ``path``
    narrows it to that path: ``{path: {privilege: 1}}`` or ``{}``."""
    userid = req.params.get("userid", req.user)
    if userid != req.user and userid.split("!", 1)[0] != req.user:
        raise ApiError(403, "Permission check failed (/access, Sys.Audit)")
    path = req.params.get("path")
    if path:
        held = req.permissions(userid, path)
        return {path: held} if held else {}
    return {p: req.permissions(userid, p) for p in ("/",)}


@handles("POST /access/ticket")
def create_ticket(req: Request) -> dict[str, Any]:
    username = req.params["username"]
    realm = req.params.get("realm")
    if realm and "@" not in username:
        username = f"{username}@{realm}"
    if not req.check_login(username, req.params["password"]):
        raise ApiError(401, "authentication failure\n")
    return req.issue_ticket(username)


_register_guest_endpoints()

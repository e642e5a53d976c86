"""The simulated cluster: nodes, guests, snapshots, tasks and their behaviour (data/NOTES.md)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Task types per guest type and operation (NOTES.md section 6).
TASK_TYPES = {
    ("qemu", "snapshot"): "qmsnapshot",
    ("qemu", "delete"): "qmdelsnapshot",
    ("qemu", "rollback"): "qmrollback",
    ("qemu", "start"): "qmstart",
    ("qemu", "shutdown"): "qmshutdown",
    ("lxc", "snapshot"): "vzsnapshot",
    ("lxc", "delete"): "vzdelsnapshot",
    ("lxc", "rollback"): "vzrollback",
    ("lxc", "start"): "vzstart",
    ("lxc", "shutdown"): "vzshutdown",
}


class ApiError(Exception):
    """An error answered synchronously: status, message (first line = reason phrase), errors."""

    def __init__(
        self, status: int, message: str, errors: dict[str, str] | None = None, *, bare: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        #: answered by the HTTP server itself, before any handler: no JSON body
        self.bare = bare


def die(message: str) -> ApiError:
    """A plain ``die "text\\n"`` in a PVE API handler: HTTP 500."""
    return ApiError(500, message + "\n")


def param_error(errors: dict[str, str]) -> ApiError:
    return ApiError(400, "Parameter verification failed.\n", errors)


@dataclass
class Snap:
    name: str
    snaptime: int
    description: str = ""
    vmstate: bool = False
    parent: str | None = None
    snapstate: str | None = None


@dataclass
class Guest:
    vmid: int
    type: str  # "qemu" | "lxc"
    node: str
    name: str
    status: str = "running"
    lock: str | None = None
    lock_until: float | None = None  # monotonic; None = until unlocked
    agent: str | None = None  # qemu config 'agent' property string, e.g. "1", "enabled=1"
    agent_running: bool = False
    #: the stand-in guest agent the agent endpoints forward to (Cluster.attach_agent): a link
    #: with ``command(execute, arguments, timeout=...)`` to a real qemu-ga (tests/qga_fixture);
    #: with one, whether the agent runs is what its guest-ping answers, not ``agent_running``
    agent_link: Any = None
    template: bool = False
    #: every disk's storage can take snapshots (GET .../feature?feature=snapshot); False models
    #: a raw disk on directory storage or LVM (thick)
    snapshot_storage: bool = True
    parent: str | None = None
    snapshots: dict[str, Snap] = field(default_factory=dict)
    frozen_snapshots: list[str] = field(default_factory=list)  # taken with a guest fs freeze
    fs_frozen: bool = False  # the guest agent's fsfreeze-freeze came, no thaw yet

    @property
    def word(self) -> str:
        return "VM" if self.type == "qemu" else "CT"

    @property
    def agent_enabled(self) -> bool:
        if not self.agent:
            return False
        first = self.agent.split(",")[0]
        if "=" not in first:
            return first == "1"
        opts = dict(part.split("=", 1) for part in self.agent.split(",") if "=" in part)
        return opts.get("enabled") == "1"

    def cfspath(self, node: str) -> str:
        folder = "qemu-server" if self.type == "qemu" else "lxc"
        return f"/etc/pve/nodes/{node}/{folder}/{self.vmid}.conf"


@dataclass
class Task:
    upid: str
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str
    ends_at: float  # monotonic
    finish: Callable[[], str | None]  # returns None for OK, else the error text
    log: list[str] = field(default_factory=list)
    exitstatus: str | None = None


class Cluster:
    """State shared by all request threads; every public method takes the lock."""

    def __init__(self, *, task_seconds: float = 0.2, fail_seconds: float = 0.02) -> None:
        self.lock = threading.RLock()
        self.task_seconds = task_seconds
        #: per task type (e.g. {"qmsnapshot": 1.5}); other types take task_seconds
        self.task_durations: dict[str, float] = {}
        self.fail_seconds = fail_seconds
        self.nodes: list[str] = []
        self.guests: dict[int, Guest] = {}
        self.tasks: dict[str, Task] = {}
        self._pid = 100000 + os.getpid() % 1000
        self._pstart = 12345678

    # -- set-up and test controls (Python only, never over HTTP) -------------------------

    def add_node(self, name: str) -> None:
        with self.lock:
            if name not in self.nodes:
                self.nodes.append(name)

    def add_guest(self, vmid: int, type_: str, node: str, name: str, **kw: Any) -> Guest:
        with self.lock:
            self.add_node(node)
            guest = Guest(vmid=vmid, type=type_, node=node, name=name, **kw)
            self.guests[vmid] = guest
            return guest

    def seed(self) -> None:
        """Three nodes, qemu VMs and lxc containers, one duplicate name across nodes."""
        for node in ("pve1", "pve2", "pve3"):
            self.add_node(node)
        self.add_guest(100, "qemu", "pve1", "db1", agent="1", agent_running=True)
        self.add_guest(101, "lxc", "pve1", "ct1")
        self.add_guest(102, "qemu", "pve2", "web1")
        self.add_guest(103, "qemu", "pve1", "twin")
        self.add_guest(104, "qemu", "pve2", "twin")
        self.add_guest(200, "lxc", "pve3", "ct-remote")
        self.add_guest(201, "qemu", "pve3", "db-remote", agent="enabled=1", agent_running=True)
        self.add_guest(202, "qemu", "pve2", "noagent", status="running")
        self.add_guest(203, "qemu", "pve2", "stopped1", status="stopped")

    def attach_agent(self, vmid: int, socket: Any) -> None:
        """Back the VM's guest agent with the real qemu-ga listening on ``socket``."""
        from tests.qga_fixture import SocketAgentLink

        with self.lock:
            guest = self.guests[vmid]
            if guest.agent_link is not None:
                guest.agent_link.close()
            guest.agent_link = SocketAgentLink(socket, vm=f"VM {vmid}")

    def lock_guest(self, vmid: int, lock: str = "backup", seconds: float | None = None) -> None:
        """Set the config lock, released after ``seconds`` (None: until unlock_guest)."""
        with self.lock:
            guest = self.guests[vmid]
            guest.lock = lock
            guest.lock_until = None if seconds is None else time.monotonic() + seconds

    def unlock_guest(self, vmid: int) -> None:
        with self.lock:
            self.guests[vmid].lock = None
            self.guests[vmid].lock_until = None

    def add_snapshot(
        self, vmid: int, name: str, snaptime: int, description: str = "", *, vmstate: bool = False
    ) -> Snap:
        """A finished snapshot as if taken at ``snaptime`` (epoch seconds): its parent is the
        one the guest ran from, and the guest now runs from it (seed them oldest first)."""
        with self.lock:
            guest = self.guests[vmid]
            snap = Snap(name, snaptime, description, vmstate=vmstate, parent=guest.parent)
            guest.snapshots[name] = snap
            guest.parent = name
            return snap

    def set_status(self, vmid: int, status: str) -> None:
        with self.lock:
            self.guests[vmid].status = status

    def move_guest(self, vmid: int, node: str) -> None:
        """Migration: the guest now lives on ``node``."""
        with self.lock:
            self.add_node(node)
            self.guests[vmid].node = node

    def tick(self) -> None:
        """Finish due tasks and expire timed locks (called on every request)."""
        with self.lock:
            now = time.monotonic()
            for guest in self.guests.values():
                if guest.lock_until is not None and now >= guest.lock_until:
                    guest.lock = None
                    guest.lock_until = None
            for task in self.tasks.values():
                if task.exitstatus is None and now >= task.ends_at:
                    error = task.finish()
                    if error is None:
                        task.exitstatus = "OK"
                        task.log.append("TASK OK")
                    else:
                        text = error.strip().replace("\n", " ")
                        task.exitstatus = text
                        task.log.append(f"TASK ERROR: {text}")

    # -- lookups -----------------------------------------------------------------------

    def guest_at(self, node: str, type_: str, vmid: int) -> Guest:
        """The guest as the node's config loader sees it (500 if the config is elsewhere)."""
        if node not in self.nodes:
            raise die(f"hostname lookup '{node}' failed - failed to get address info for: {node}")
        guest = self.guests.get(vmid)
        if guest is None or guest.node != node or guest.type != type_:
            folder = "qemu-server" if type_ == "qemu" else "lxc"
            raise die(f"Configuration file 'nodes/{node}/{folder}/{vmid}.conf' does not exist")
        return guest

    # -- tasks -------------------------------------------------------------------------

    def start_task(
        self,
        node: str,
        type_: str,
        id_: str,
        user: str,
        finish: Callable[[], str | None],
        *,
        seconds: float | None = None,
        log: list[str] | None = None,
    ) -> str:
        with self.lock:
            self._pid += 1
            starttime = int(time.time())
            upid = (
                f"UPID:{node}:{self._pid:08X}:{self._pstart:08X}:{starttime:08X}:"
                f"{type_}:{id_}:{user}:"
            )
            duration = seconds
            if duration is None:
                duration = self.task_durations.get(type_, self.task_seconds)
            self.tasks[upid] = Task(
                upid=upid,
                node=node,
                pid=self._pid,
                pstart=self._pstart,
                starttime=starttime,
                type=type_,
                id=id_,
                user=user,
                ends_at=time.monotonic() + duration,
                finish=finish,
                log=list(log or []),
            )
            return upid

    def failed_task(self, node: str, type_: str, id_: str, user: str, error: str) -> str:
        """A worker that dies right away (duplicate name, lock, missing snapshot...)."""
        return self.start_task(node, type_, id_, user, lambda: error, seconds=self.fail_seconds)

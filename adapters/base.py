"""The adapter interface every hypervisor implements, and its value objects.

Semantics are the same on every hypervisor; provider detail goes into ``extra``. Native SDK
errors are translated into :mod:`snapcoord.errors` types at the adapter boundary, always naming
the VM. Waiting on a hypervisor task goes through :func:`poll_until`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from snapcoord import cancel
from snapcoord.errors import SnapshotNotFound, TaskTimeout, UnsupportedOperation
from snapcoord.settings import HypervisorSettings

if TYPE_CHECKING:
    from snapcoord.agent_link import AgentLink

T = TypeVar("T")

#: First line of every description snapcoord writes; only snapshots carrying it are ever pruned.
MARKER = "snapcoord:"


#: how often a thaw after a revert asks the guest agent again while it reconnects
THAW_POLL_SECONDS = 0.5


class PowerState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class VM:
    name: str  # the name on the hypervisor
    id: str  # stable identity: libvirt UUID, vSphere MoRef, Proxmox vmid
    hypervisor: str  # key of the [hypervisors.X] table
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    name: str
    id: str
    created: datetime | None  # timezone-aware UTC
    description: str = ""
    parent: str | None = None  # parent snapshot name
    memory: bool = False  # includes RAM state
    quiesced: bool = False
    current: bool = False  # the VM runs on top of this one
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_snapcoord(self) -> bool:
        return self.description.startswith(MARKER)


@dataclass(frozen=True)
class Capabilities:
    memory: bool  # can save RAM state
    quiesce: bool  # can ask a guest agent to freeze file systems
    disk_only: bool = (
        False  # memory=false gives a disk-only snapshot (else: documented per adapter)
    )
    extra: Mapping[str, Any] = field(default_factory=dict)


class Adapter(ABC):
    """One hypervisor connection. Use as a context manager: connect on enter, close on exit."""

    type_name: str = ""

    def __init__(self, name: str, settings: HypervisorSettings) -> None:
        self.name = name
        self.settings = settings

    def connect(self) -> None:  # noqa: B027 - optional hook
        """Open the session (called in preflight, before anything is stopped)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Close the session; must be safe to call twice."""

    def __enter__(self) -> Adapter:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abstractmethod
    def find_vm(self, ref: str) -> VM: ...

    @abstractmethod
    def list_snapshots(self, vm: VM) -> list[Snapshot]:
        """All snapshots, oldest first."""

    @abstractmethod
    def create_snapshot(
        self,
        vm: VM,
        name: str,
        description: str,
        *,
        memory: bool,
        quiesce: bool,
        timeout: float,
    ) -> Snapshot: ...

    @abstractmethod
    def revert_snapshot(
        self, vm: VM, snapshot: Snapshot, *, start: bool | None, timeout: float
    ) -> None:
        """Revert; ``start=None`` keeps the power state the VM had before the revert."""

    @abstractmethod
    def delete_snapshot(self, vm: VM, snapshot: Snapshot, *, timeout: float) -> None: ...

    @abstractmethod
    def power_state(self, vm: VM) -> PowerState: ...

    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    def check_snapshot_ready(self, vm: VM, *, memory: bool, quiesce: bool) -> None:  # noqa: B027
        """Preflight: raise if this VM cannot take the requested snapshot right now."""

    def check_snapshot_support(self, vm: VM) -> None:  # noqa: B027
        """``snapcoord check``: raise if ``vm`` can take no snapshot at all, or not now, without
        waiting (a template, disks on storage without snapshots, a task's lock)."""

    def missing_privileges(self, vm: VM, operations: Sequence[str]) -> list[str]:
        """``snapcoord check``: the privileges this session lacks on ``vm`` for ``operations``
        (keys of the adapter's privilege table: ``snapshot``, ``prune``, ``quiesce``...), each
        as the hypervisor names it (``A|B`` when either will do). Empty where the hypervisor
        has no privileges to ask about: a libvirt connection may do everything or nothing."""
        return []

    def guest_agent(self, vm: VM) -> AgentLink:
        """The VM's QEMU guest agent, for ``[vms.X.guest] transport = "agent"``
        (snapcoord/agent.py). Raises when the hypervisor has none to offer."""
        raise UnsupportedOperation(
            f"{self.type_name or 'this'} hypervisor offers no QEMU guest agent transport",
            vm=vm.name,
            hint="set [vms.X.guest] transport = 'ssh' for this VM",
        )

    def set_guest_time(self, vm: VM, epoch: float) -> bool:
        """Set the guest's clock through the hypervisor (its guest agent or tools); ``False``
        when this hypervisor cannot (the caller then sets it from inside the guest)."""
        return False

    def check_backup_freeze(self, vm: VM) -> None:
        """Preflight of the guest-side freeze hook: raise (one line, with the fix) unless this
        hypervisor's backup will call the guest agent's fs-freeze for ``vm`` and the agent
        answers. Only QEMU hypervisors have a guest agent freeze to hook into."""
        raise UnsupportedOperation(
            f"{self.type_name or 'this'} hypervisor has no guest-agent freeze for backups",
            vm=vm.name,
            hint="the freeze hook brackets backups of QEMU VMs on Proxmox VE or libvirt",
        )

    def thaw_filesystems(self, vm: VM, *, wait: float = 0.0) -> bool:
        """Thaw the guest's file systems through the guest agent if they are frozen (after a
        revert to a snapshot taken while frozen); ``True`` when something was thawed. Where the
        VM has an agent that does not answer yet (it reconnects after the revert), ask again for
        up to ``wait`` seconds before deciding that nothing is frozen."""
        return False

    def find_snapshot(self, vm: VM, name: str) -> Snapshot:
        for snapshot in self.list_snapshots(vm):
            if snapshot.name == name:
                return snapshot
        raise SnapshotNotFound(f"no snapshot named {name!r}", vm=vm.name)


def poll_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    vm: str | None = None,
    first_interval: float = 0.05,
    max_interval: float = 1.0,
) -> T:
    """Call ``check`` until it returns a value other than None; raise TaskTimeout after ``timeout``.

    The interval starts at ``first_interval`` and doubles up to ``max_interval``, so short tasks
    are seen finishing quickly and long ones are not hammered.
    """
    deadline = time.monotonic() + timeout
    interval = first_interval
    while True:
        cancel.check()
        result = check()
        if result is not None:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TaskTimeout(f"{what} did not finish within {timeout:g} s", vm=vm)
        cancel.sleep(min(interval, remaining))
        interval = min(interval * 2, max_interval)

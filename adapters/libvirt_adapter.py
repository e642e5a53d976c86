"""libvirt adapter: internal snapshots through libvirt-python.

What ``memory`` and ``quiesce`` mean here (see docs/libvirt.md):

* Snapshots are always *internal* (qcow2). An internal snapshot of a running domain always holds
  its RAM: libvirt refuses an internal disk-only snapshot of a running QEMU domain, and the only
  disk-only kind it offers (external, ``DISK_ONLY``) cannot be reverted by libvirt 9.0. So
  ``memory=False`` on a running domain still saves RAM (logged as a warning, and the returned
  :class:`Snapshot` says ``memory=True``); on a shut-off domain every snapshot is disk-only.
* ``QUIESCE`` needs a connected guest agent, and QEMU honours it only for external disk-only
  snapshots: on QEMU ``quiesce=True`` is refused before anything is stopped.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import libvirt

from snapcoord.adapters.base import (
    THAW_POLL_SECONDS,
    VM,
    Adapter,
    Capabilities,
    PowerState,
    Snapshot,
)
from snapcoord.errors import (
    HypervisorError,
    PreflightError,
    SnapcoordError,
    SnapshotExists,
    SnapshotNotFound,
    TaskTimeout,
    UnsupportedOperation,
    VMNotFound,
)
from snapcoord.settings import LibvirtSettings

if TYPE_CHECKING:
    from snapcoord.adapters.libvirt_agent import LibvirtAgentLink

log = logging.getLogger(__name__)
T = TypeVar("T")

# libvirt prints every error on stderr by default; we translate them instead.
libvirt.registerErrorHandler(lambda *_args: None, None)

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")
AGENT_CHANNEL = "org.qemu.guest_agent.0"

#: Drivers whose QUIESCE flag only works with external disk-only snapshots.
NO_INTERNAL_QUIESCE = frozenset({"QEMU"})

_STATES: dict[int, PowerState] = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.RUNNING,  # shutting down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.STOPPED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}

# libvirt error codes, grouped by the snapcoord error they become.
_UNSUPPORTED = frozenset(
    {
        libvirt.VIR_ERR_NO_SUPPORT,
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    }
)
_NO_AGENT = frozenset({libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED})
_CONNECTION = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)
# VIR_ERR_INVALID_ARG texts that mean "this flag (combination) is not supported".
_UNSUPPORTED_FLAGS_RE = re.compile(r"unsupported flags|is required by flag", re.IGNORECASE)


def _message(err: libvirt.libvirtError) -> str:
    return (err.get_error_message() or str(err)).strip()


def translate(err: libvirt.libvirtError, *, action: str, vm: str, uri: str) -> SnapcoordError:
    """Turn a libvirtError into the snapcoord error a user can act on."""
    code = err.get_error_code()
    text = _message(err)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return VMNotFound(
            f"{action}: no such domain on {uri}", vm=vm, hint="check `virsh list --all`"
        )
    if code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
        return SnapshotNotFound(f"{action}: {text}", vm=vm, hint="see `snapcoord list`")
    if code in _NO_AGENT:
        return UnsupportedOperation(
            f"{action}: the guest agent does not answer ({text})",
            vm=vm,
            hint="start qemu-guest-agent in the guest or set quiesce = false",
        )
    if code in _UNSUPPORTED or (
        code == libvirt.VIR_ERR_INVALID_ARG and _UNSUPPORTED_FLAGS_RE.search(text)
    ):
        return UnsupportedOperation(f"{action}: not supported by {uri}: {text}", vm=vm)
    if code in _CONNECTION:
        return HypervisorError(
            f"{action}: connection to libvirt at {uri} failed: {text}",
            vm=vm,
            hint="check that libvirtd runs and the URI is right",
        )
    return HypervisorError(f"{action} failed: {text}", vm=vm)


def _require_agent(vm: VM, domain_xml: str, purpose: str, or_else: str = "") -> None:
    """Raise unless the domain has the guest agent channel and the agent is connected."""
    state = agent_state(domain_xml)
    if state is None:
        raise UnsupportedOperation(
            f"{purpose} needs the QEMU guest agent, but the domain has no {AGENT_CHANNEL} channel",
            vm=vm.name,
            hint=f"add the channel, run qemu-guest-agent in the guest{or_else}",
        )
    if state == "disconnected":
        raise UnsupportedOperation(
            f"{purpose} needs the QEMU guest agent, but it is not connected",
            vm=vm.name,
            hint=f"start qemu-guest-agent in the guest{or_else}",
        )


#: libvirt's errors for an agent that does not answer yet (it reconnects after a revert)
_AGENT_NOT_YET = frozenset({libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED})


def agent_state(domain_xml: str) -> str | None:
    """The guest agent channel's state: 'connected', 'disconnected', '' (not reported) or None
    when the domain has no guest agent channel at all."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - XML from libvirt, not from users
    for target in root.iterfind("./devices/channel/target"):
        if target.get("name") == AGENT_CHANNEL:
            return target.get("state", "")
    return None


def non_qcow2_disks(domain_xml: str) -> list[str]:
    """Writable disks whose format cannot hold internal snapshots (e.g. ``vda (raw)``)."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - XML from libvirt, not from users
    bad = []
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        driver = disk.find("driver")
        fmt = driver.get("type") if driver is not None else None
        if fmt is not None and fmt != "qcow2":
            target = disk.find("target")
            dev = target.get("dev", "?") if target is not None else "?"
            bad.append(f"{dev} ({fmt})")
    return bad


def parse_snapshot(xml: str, *, current: bool, quiesced: bool = False) -> Snapshot:
    """A Snapshot from libvirt's <domainsnapshot> XML."""
    root = ET.fromstring(xml)  # noqa: S314 - XML from libvirt, not from users
    name = root.findtext("name", default="")
    stamp = root.findtext("creationTime")
    created = datetime.fromtimestamp(int(stamp), tz=UTC) if stamp else None
    state = root.findtext("state", default="")
    mem = root.find("memory")
    memory_mode = mem.get("snapshot", "") if mem is not None else ""
    if memory_mode:
        memory = memory_mode in ("internal", "external")
    else:
        memory = state in ("running", "paused", "blocked")
    disk_modes = sorted({d.get("snapshot", "") for d in root.iterfind("./disks/disk")} - {""})
    return Snapshot(
        name=name,
        id=name,
        created=created,
        description=root.findtext("description", default=""),
        parent=root.findtext("./parent/name"),
        memory=memory,
        quiesced=quiesced,
        current=current,
        extra={"state": state, "memory_mode": memory_mode or None, "disk_modes": disk_modes},
    )


def run_with_timeout(func: Callable[[], T], *, timeout: float, what: str, vm: str) -> T:
    """Run a blocking libvirt call in a worker thread; raise TaskTimeout if it outlives
    ``timeout`` (the call itself may still finish on the hypervisor)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = func()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"libvirt: {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TaskTimeout(
            f"{what} did not finish within {timeout:g} s",
            vm=vm,
            hint="libvirt may still complete it: check with `snapcoord list`",
        )
    if "error" in box:
        raise box["error"]
    result: T = box["value"]
    return result


class LibvirtAdapter(Adapter):
    type_name = "libvirt"

    settings: LibvirtSettings

    def __init__(self, name: str, settings: LibvirtSettings) -> None:
        super().__init__(name, settings)
        self.uri = settings.uri
        self._conn: libvirt.virConnect | None = None

    # -- connection -------------------------------------------------------------------------

    def connect(self) -> None:
        if self._conn is not None:
            return
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            raise HypervisorError(
                f"cannot connect to libvirt hypervisor {self.name!r} at {self.uri}: "
                f"{_message(err)}",
                hint="check that libvirtd runs, the URI is right and you may use it",
            ) from err

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                log.debug("closing %s failed", self.uri, exc_info=True)

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            self.connect()
        assert self._conn is not None
        return self._conn

    def _fail(self, err: libvirt.libvirtError, action: str, vm: str) -> SnapcoordError:
        return translate(err, action=action, vm=vm, uri=self.uri)

    # -- lookups ----------------------------------------------------------------------------

    def find_vm(self, ref: str) -> VM:
        try:
            try:
                dom = self.conn.lookupByName(ref)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN or not UUID_RE.fullmatch(ref):
                    raise
                dom = self.conn.lookupByUUIDString(ref)
            return VM(
                name=dom.name(),
                id=dom.UUIDString(),
                hypervisor=self.name,
                extra={"uri": self.uri, "persistent": bool(dom.isPersistent())},
            )
        except libvirt.libvirtError as err:
            raise self._fail(err, "find VM", ref) from err

    def _domain(self, vm: VM, action: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByUUIDString(vm.id)
        except libvirt.libvirtError as err:
            raise self._fail(err, action, vm.name) from err

    def _snapshot(self, dom: libvirt.virDomain, vm: VM, name: str, action: str) -> Any:
        try:
            return dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                raise SnapshotNotFound(
                    f"{action}: no snapshot named {name!r}", vm=vm.name, hint="see `snapcoord list`"
                ) from None
            raise self._fail(err, action, vm.name) from err

    def list_snapshots(self, vm: VM) -> list[Snapshot]:
        dom = self._domain(vm, "list snapshots")
        try:
            snaps = [
                parse_snapshot(s.getXMLDesc(0), current=bool(s.isCurrent(0)))
                for s in dom.listAllSnapshots(0)
            ]
        except libvirt.libvirtError as err:
            raise self._fail(err, "list snapshots", vm.name) from err
        return _oldest_first(snaps)

    def power_state(self, vm: VM) -> PowerState:
        dom = self._domain(vm, "read power state")
        try:
            state, _reason = dom.state(0)
            if state == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage(0):
                return PowerState.SUSPENDED
        except libvirt.libvirtError as err:
            raise self._fail(err, "read power state", vm.name) from err
        return _STATES.get(state, PowerState.UNKNOWN)

    def capabilities(self) -> Capabilities:
        try:
            driver = self.conn.getType()
            version = self.conn.getLibVersion()
        except libvirt.libvirtError as err:
            raise self._fail(err, "read capabilities", self.name) from err
        return Capabilities(
            memory=True,
            quiesce=driver not in NO_INTERNAL_QUIESCE,
            disk_only=False,
            extra={"driver": driver, "libvirt_version": version, "uri": self.uri},
        )

    # -- preflight --------------------------------------------------------------------------

    def check_snapshot_ready(self, vm: VM, *, memory: bool, quiesce: bool) -> None:
        dom = self._domain(vm, "preflight")
        try:
            state, _reason = dom.state(0)
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError as err:
            raise self._fail(err, "preflight", vm.name) from err
        if state not in (
            libvirt.VIR_DOMAIN_RUNNING,
            libvirt.VIR_DOMAIN_BLOCKED,
            libvirt.VIR_DOMAIN_PAUSED,
            libvirt.VIR_DOMAIN_SHUTOFF,
        ):
            power = _STATES.get(state, PowerState.UNKNOWN)
            raise PreflightError(
                f"cannot snapshot a domain in state {power.value} (libvirt state {state})",
                vm=vm.name,
                hint="wait until it runs or is shut off",
            )
        bad = non_qcow2_disks(xml)
        if bad:
            raise UnsupportedOperation(
                f"internal snapshots need qcow2 disks; not qcow2: {', '.join(bad)}",
                vm=vm.name,
                hint="convert the disks to qcow2",
            )
        if quiesce and state != libvirt.VIR_DOMAIN_SHUTOFF:
            self._check_quiesce(vm, xml)

    def _check_quiesce(self, vm: VM, domain_xml: str) -> None:
        driver = self.capabilities().extra["driver"]
        if driver in NO_INTERNAL_QUIESCE:
            raise UnsupportedOperation(
                f"libvirt's {driver} driver can quiesce only external disk-only snapshots, "
                "which this libvirt cannot revert",
                vm=vm.name,
                hint="set quiesce = false: the database is stopped before the snapshot anyway",
            )
        _require_agent(vm, domain_xml, "quiesce", or_else=" or set quiesce = false")

    # -- changes ----------------------------------------------------------------------------

    def create_snapshot(
        self,
        vm: VM,
        name: str,
        description: str,
        *,
        memory: bool,
        quiesce: bool,
        timeout: float,
    ) -> Snapshot:
        dom = self._domain(vm, "create snapshot")
        try:
            running = bool(dom.isActive())
            if _exists(dom, name):
                raise SnapshotExists(f"a snapshot named {name!r} already exists", vm=vm.name)
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError as err:
            raise self._fail(err, "create snapshot", vm.name) from err
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        quiesced = quiesce and running
        if quiesced:
            self._check_quiesce(vm, xml)
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        if running and not memory:
            log.warning(
                "%s: a libvirt internal snapshot of a running domain includes its RAM "
                "(memory = false cannot be honoured; see docs/libvirt.md)",
                vm.name,
            )
        elif memory and not running:
            log.info("%s: the domain is shut off: the snapshot holds no RAM", vm.name)

        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "description").text = description
        snap_xml = ET.tostring(root, encoding="unicode")
        try:
            snap = run_with_timeout(
                lambda: dom.snapshotCreateXML(snap_xml, flags),
                timeout=timeout,
                what=f"creating snapshot {name!r}",
                vm=vm.name,
            )
            return parse_snapshot(
                snap.getXMLDesc(0), current=bool(snap.isCurrent(0)), quiesced=quiesced
            )
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED and _exists(dom, name):
                raise SnapshotExists(
                    f"a snapshot named {name!r} already exists", vm=vm.name
                ) from None
            raise self._fail(err, f"create snapshot {name!r}", vm.name) from err

    def check_backup_freeze(self, vm: VM) -> None:
        """libvirt's freeze is the agent's (``virsh domfsfreeze``, ``snapshot-create
        --quiesce``): the domain needs the agent's channel, connected."""
        dom = self._domain(vm, "check the guest agent")
        try:
            domain_xml = dom.XMLDesc(0)
        except libvirt.libvirtError as err:
            raise self._fail(err, "check the guest agent", vm.name) from err
        _require_agent(vm, domain_xml, "the backup's freeze")

    def guest_agent(self, vm: VM) -> LibvirtAgentLink:
        """The domain's guest agent (adapters/libvirt_agent.py). The domain must have the
        ``org.qemu.guest_agent.0`` channel, else :class:`AgentUnavailable` with the fix; that
        qemu-ga answers is for the link's ``ping`` to find out (it may be restarting)."""
        from snapcoord.adapters.libvirt_agent import LibvirtAgentLink
        from snapcoord.agent_link import AGENT_FIX, AgentUnavailable

        dom = self._domain(vm, "find the guest agent")
        try:
            domain_xml = dom.XMLDesc(0)
        except libvirt.libvirtError as err:
            raise self._fail(err, "find the guest agent", vm.name) from err
        if agent_state(domain_xml) is None:
            raise AgentUnavailable(
                f"the domain has no {AGENT_CHANNEL} channel: no QEMU guest agent to run "
                "commands through",
                vm=vm.name,
                hint=AGENT_FIX["libvirt"],
            )
        return LibvirtAgentLink(self.uri, uuid=vm.id, vm=vm.name)

    def thaw_filesystems(self, vm: VM, *, wait: float = 0.0) -> bool:
        """Right after a revert the agent's channel may still be reconnecting (libvirt reports
        it ``disconnected`` until the guest's qemu-ga is seen again): with an agent channel,
        ask again for up to ``wait`` seconds before deciding that nothing is frozen."""
        dom = self._domain(vm, "thaw file systems")
        deadline = time.monotonic() + wait
        while True:
            try:
                state = agent_state(dom.XMLDesc(0))
                if state is None:
                    return False  # no agent channel: nothing could have frozen the guest
                if state != "disconnected":
                    return self._thaw_if_frozen(dom)
                problem = "the guest agent is not connected"
            except libvirt.libvirtError as err:
                problem = str(err)
                if err.get_error_code() not in _AGENT_NOT_YET:  # an answer that will not change
                    log.info("%s: file systems not thawed by the guest agent: %s", vm.name, err)
                    return False
            if time.monotonic() >= deadline:
                log.info("%s: file systems not thawed by the guest agent: %s", vm.name, problem)
                return False
            time.sleep(THAW_POLL_SECONDS)

    @staticmethod
    def _thaw_if_frozen(dom: libvirt.virDomain) -> bool:
        import libvirt_qemu

        reply = libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-fsfreeze-status"}', 10, 0)
        if '"frozen"' not in (reply or ""):
            return False
        dom.fsThaw(None, 0)
        return True

    def set_guest_time(self, vm: VM, epoch: float) -> bool:
        """virDomainSetTime through the QEMU guest agent; ``False`` without an agent (or on a
        driver that has no such call)."""
        dom = self._domain(vm, "set the guest clock")
        seconds = int(epoch)
        try:
            dom.setTime({"seconds": seconds, "nseconds": int((epoch - seconds) * 1e9)}, 0)
        except libvirt.libvirtError as err:
            log.info("%s: the guest clock cannot be set through libvirt: %s", vm.name, err)
            return False
        return True

    def revert_snapshot(
        self, vm: VM, snapshot: Snapshot, *, start: bool | None, timeout: float
    ) -> None:
        """Revert to ``snapshot``.

        ``start=None`` keeps the state the domain had before (running, paused or shut off);
        ``start=True`` leaves it running; ``start=False`` leaves it paused when the snapshot
        holds RAM (nothing is lost) and shut off otherwise.
        """
        action = f"revert to {snapshot.name!r}"
        dom = self._domain(vm, action)
        snap = self._snapshot(dom, vm, snapshot.name, action)
        try:
            before, _reason = dom.state(0)
            has_memory = parse_snapshot(snap.getXMLDesc(0), current=False).memory
        except libvirt.libvirtError as err:
            raise self._fail(err, action, vm.name) from err
        target = _revert_target(before, start, has_memory)
        flags = {
            PowerState.RUNNING: libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING,
            PowerState.PAUSED: libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED,
            # A RAM snapshot is loaded paused and then powered off: no guest code runs.
            PowerState.STOPPED: libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED if has_memory else 0,
        }[target]
        try:
            run_with_timeout(
                lambda: dom.revertToSnapshot(snap, flags),
                timeout=timeout,
                what=action,
                vm=vm.name,
            )
            self._settle(dom, target)
        except libvirt.libvirtError as err:
            raise self._fail(err, action, vm.name) from err

    @staticmethod
    def _settle(dom: libvirt.virDomain, target: PowerState) -> None:
        """Bring the domain into ``target`` where the driver's revert flags did not."""
        state, _reason = dom.state(0)
        if target is PowerState.STOPPED and state != libvirt.VIR_DOMAIN_SHUTOFF:
            dom.destroy()
        elif target is PowerState.RUNNING:
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
                dom.create()
            elif state == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        elif target is PowerState.PAUSED:
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
                try:
                    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
                except libvirt.libvirtError as err:
                    if err.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                        raise
                    dom.create()  # driver without START_PAUSED (test driver)
                    dom.suspend()
            elif state != libvirt.VIR_DOMAIN_PAUSED:
                dom.suspend()

    def delete_snapshot(self, vm: VM, snapshot: Snapshot, *, timeout: float) -> None:
        action = f"delete snapshot {snapshot.name!r}"
        dom = self._domain(vm, action)
        snap = self._snapshot(dom, vm, snapshot.name, action)
        try:
            run_with_timeout(lambda: snap.delete(0), timeout=timeout, what=action, vm=vm.name)
        except libvirt.libvirtError as err:
            raise self._fail(err, action, vm.name) from err


def _exists(dom: libvirt.virDomain, name: str) -> bool:
    try:
        dom.snapshotLookupByName(name, 0)
    except libvirt.libvirtError:
        return False
    return True


def _revert_target(before: int, start: bool | None, has_memory: bool) -> PowerState:
    if start is True:
        return PowerState.RUNNING
    if start is False:
        return PowerState.PAUSED if has_memory else PowerState.STOPPED
    if before in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return PowerState.RUNNING
    if before == libvirt.VIR_DOMAIN_PAUSED:
        return PowerState.PAUSED
    return PowerState.STOPPED


def _oldest_first(snaps: list[Snapshot]) -> list[Snapshot]:
    """Sort by creation time; snapshots of the same second keep parent before child."""
    parents = {s.name: s.parent for s in snaps}

    def depth(name: str) -> int:
        seen: set[str] = set()
        parent = parents.get(name)
        while parent is not None and parent not in seen:
            seen.add(parent)
            parent = parents.get(parent)
        return len(seen)

    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(snaps, key=lambda s: (s.created or epoch, depth(s.name), s.name))

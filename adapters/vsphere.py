"""vSphere adapter (vCenter or standalone ESXi) through pyVmomi.

One session per run, re-established (bounded) when it expired; every property that may be unset
is read through the PropertyCollector; every task is waited on by :meth:`VSphereAdapter._wait`.
Round-trips are kept to what the operation needs: create and delete cost the task call plus one
read per poll, list one read, revert one more read for the power state before. See docs/vsphere.md.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pyVim import connect as _connect
from pyVmomi import vim as _vim
from pyVmomi import vmodl as _vmodl
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_none

from snapcoord.adapters.base import (
    VM,
    Adapter,
    Capabilities,
    PowerState,
    Snapshot,
    poll_until,
)
from snapcoord.adapters.permissions import VSPHERE, vsphere_privileges
from snapcoord.errors import (
    HypervisorError,
    SnapcoordError,
    SnapshotFailed,
    SnapshotNotFound,
    TaskTimeout,
    UnsupportedOperation,
    UsageError,
    VMNotFound,
)
from snapcoord.settings import TLSSettings, VsphereSettings

log = logging.getLogger(__name__)

# pyVmomi's dynamic types are untyped for mypy: use them as Any.
vim: Any = _vim
vmodl: Any = _vmodl
SmartConnect: Any = _connect.SmartConnect

T = TypeVar("T")
PC = vmodl.query.PropertyCollector

#: vSphere's hard limit on the length of a snapshot chain.
MAX_CHAIN = 32
#: Re-login attempts when the server says the session is gone.
SESSION_ATTEMPTS = 3
#: Log task progress only for tasks that run longer than this (seconds).
PROGRESS_AFTER = 2.0
TASK_PROPS = ("info.state", "info.error", "info.result", "info.progress")
SNAPSHOT_FAULTS = (
    vim.fault.InvalidPowerState,
    vim.fault.SnapshotFault,
    vim.fault.FileFault,
    vim.fault.InvalidState,
    vim.fault.TaskInProgress,
)
POWER_STATES = {
    "poweredOn": PowerState.RUNNING,
    "poweredOff": PowerState.STOPPED,
    "suspended": PowerState.SUSPENDED,
}


# -- TLS ------------------------------------------------------------------------------------


class PinnedContext(ssl.SSLContext):
    """Accept exactly the certificate whose SHA-256 is ``pin``, checked on every connection
    right after the handshake, before any request (and so any credential) is sent."""

    pin: bytes = b""

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        tls = super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )
        if not do_handshake_on_connect:
            tls.do_handshake()
        der = tls.getpeercert(binary_form=True)
        if der is None or hashlib.sha256(der).digest() != self.pin:
            seen = hashlib.sha256(der).hexdigest() if der else "none"
            tls.close()
            raise ssl.SSLCertVerificationError(
                f"server certificate fingerprint sha256:{seen} does not match the pinned one"
            )
        return tls


def parse_thumbprint(value: str) -> bytes:
    """``sha256:AA:BB:..`` (colons optional) -> the 32-byte digest."""
    return bytes.fromhex(value.split(":", 1)[1].replace(":", ""))


def ssl_context(settings: TLSSettings) -> ssl.SSLContext:
    """The context for every connection: verified by default, ca_file or a pinned thumbprint
    instead, or unverified only when verify_tls = false was set."""
    if settings.thumbprint:
        pinned = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE  # replaced by the fingerprint check
        pinned.pin = parse_thumbprint(settings.thumbprint)
        return pinned
    if not settings.verify_tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if settings.ca_file:
        try:
            ctx = ssl.create_default_context(cafile=settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load ca_file {settings.ca_file!r}: {exc}") from exc
        # A trusted file may hold an old ESXi host's self-signed 1024-bit certificate, which
        # OpenSSL's default security level 2 rejects; the admin chose to trust exactly it.
        ctx.set_ciphers("DEFAULT@SECLEVEL=1")
        return ctx
    return ssl.create_default_context()


# -- value conversion -----------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: more snapshots than vSphere keeps for one VM (its limit is 496): a longer answer is refused
MAX_SNAPSHOTS = 1000


class BadAnswer(ValueError):
    """A ``vim.vm.SnapshotInfo`` of a shape vSphere does not send."""


def snapshots_from_info(info: Any) -> list[Snapshot]:
    """Flatten a ``vim.vm.SnapshotInfo`` tree (None: no snapshots), oldest first. Every node is
    checked (a snapshot reference with a MoRef ID, a name, a time or none); a tree of another
    shape, or deeper or larger than vSphere ever sends, raises :class:`BadAnswer`. Walked
    without recursion: no answer can exhaust the stack."""
    if info is None:
        return []
    current_ref = getattr(info, "currentSnapshot", None)
    current = None if current_ref is None else _moid(current_ref, "currentSnapshot")
    found: list[Snapshot] = []
    pending: list[tuple[Any, str | None]] = [
        (tree, None) for tree in reversed(_children(info, "rootSnapshotList"))
    ]
    while pending:
        tree, parent = pending.pop()
        if len(found) >= MAX_SNAPSHOTS:
            raise BadAnswer(f"more than {MAX_SNAPSHOTS} snapshots")
        ref = _moid(getattr(tree, "snapshot", None), "snapshot")
        name = getattr(tree, "name", None)
        if not isinstance(name, str) or not name or len(name) > 1024:
            raise BadAnswer(f"snapshot {ref}: no name")
        created = getattr(tree, "createTime", None)
        if created is not None and not isinstance(created, datetime):
            raise BadAnswer(f"snapshot {ref}: createTime is not a time")
        description = getattr(tree, "description", None) or ""
        if not isinstance(description, str):
            raise BadAnswer(f"snapshot {ref}: description is not text")
        found.append(
            Snapshot(
                name=name,
                id=ref,
                created=_utc(created),
                description=description,
                parent=parent,
                memory=getattr(tree, "state", None) == "poweredOn",
                quiesced=getattr(tree, "quiesced", None) is True,
                current=ref == current,
                extra={
                    "moref": ref,
                    "vsphere_id": getattr(tree, "id", None),
                    "state": str(getattr(tree, "state", None)),
                },
            )
        )
        pending += [(child, name) for child in reversed(_children(tree, "childSnapshotList"))]
    found.sort(key=lambda s: (s.created or datetime.min.replace(tzinfo=UTC), s.id))
    return found


def _children(node: Any, field: str) -> list[Any]:
    children = getattr(node, field, None)
    if children is None:
        return []
    if isinstance(children, str | bytes) or not hasattr(children, "__iter__"):
        raise BadAnswer(f"{field} is not a list")
    listed = list(children)
    if len(listed) > MAX_SNAPSHOTS:
        raise BadAnswer(f"more than {MAX_SNAPSHOTS} snapshots")
    return listed


def _moid(ref: Any, field: str) -> str:
    moid = getattr(ref, "_moId", None)
    if not isinstance(moid, str) or not moid or len(moid) > 256:
        raise BadAnswer(f"{field} has no MoRef ID")
    return moid


def chain_depth(snapshots: Sequence[Snapshot]) -> int:
    """Length of the chain the VM runs on (root .. current snapshot)."""
    by_name = {s.name: s for s in snapshots}
    node = next((s for s in snapshots if s.current), None)
    depth = 0
    while node is not None and depth <= len(snapshots):
        depth += 1
        node = by_name.get(node.parent) if node.parent else None
    return depth


def snapshot_warnings(
    snapshots: Sequence[Snapshot], *, max_snapshots: int, max_age_hours: float, now: datetime
) -> list[str]:
    """VMware advises short chains and against keeping snapshots for more than a few days."""
    warnings = []
    if len(snapshots) > max_snapshots:
        warnings.append(
            f"has {len(snapshots)} snapshots, more than max_snapshots = {max_snapshots} "
            "(long chains slow the VM down; delete old ones)"
        )
    limit = now - timedelta(hours=max_age_hours)
    for snap in snapshots:
        if snap.is_snapcoord and snap.created is not None and snap.created < limit:
            age = (now - snap.created).total_seconds() / 3600
            warnings.append(
                f"snapshot {snap.name!r} is {age:.0f} h old, older than max_age_hours = "
                f"{max_age_hours:g} (delete it once it is no longer needed)"
            )
    return warnings


def fault_text(fault: Any) -> str:
    msg = getattr(fault, "msg", None) or ""
    return f"{type(fault).__name__.rsplit('.', 1)[-1]}: {msg}".rstrip(": ")


# -- the adapter ----------------------------------------------------------------------------


class VSphereAdapter(Adapter):
    """vCenter / ESXi through pyVmomi; VM.id is the VM's MoRef ID, Snapshot.id the snapshot's."""

    type_name = "vsphere"

    settings: VsphereSettings

    def __init__(self, name: str, settings: VsphereSettings) -> None:
        super().__init__(name, settings)
        self.host = settings.host
        self.port = settings.port
        self.user = settings.user
        self.warnings: list[str] = []
        self._si: Any = None
        self._content: Any = None

    # -- session ----------------------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> VSphereAdapter:
        self.connect()
        return self

    def connect(self) -> None:
        if self._si is not None:
            return
        ctx = ssl_context(self.settings)
        if not self.settings.thumbprint and not self.settings.verify_tls:
            self._warn(
                f"{self.name}: verify_tls = false: the certificate of {self.where} is "
                "not checked (pin it with ca_file or thumbprint)"
            )
        try:
            self._si = SmartConnect(
                host=self.host,
                port=self.port,
                user=self.user,
                pwd=self.settings.password.reveal(),
                sslContext=ctx,
                httpConnectionTimeout=60,
            )
            self._content = self._si.RetrieveContent()
        except ssl.SSLCertVerificationError as exc:
            reason = getattr(exc, "verify_message", None) or exc
            raise HypervisorError(
                f"TLS certificate of {self.where} not trusted: {reason}",
                hint="set ca_file to its CA (or certificate) or pin it with thumbprint",
            ) from None
        except vim.fault.InvalidLogin as exc:
            raise HypervisorError(
                f"login to {self.where} as {self.user!r} failed: {exc.msg or 'invalid login'}",
                hint="check user and password",
            ) from None
        except vmodl.MethodFault as exc:
            raise HypervisorError(f"connecting to {self.where} failed: {fault_text(exc)}") from None
        except (OSError, ssl.SSLError) as exc:
            raise HypervisorError(
                f"cannot reach vSphere at {self.where}: {exc}",
                hint="check host, port and the network",
            ) from None

    def close(self) -> None:
        si, self._si = self._si, None
        content, self._content = self._content, None
        if si is None:
            return
        try:
            content.sessionManager.Logout()
        except Exception:
            log.debug("logout from %s failed", self.where, exc_info=True)
        try:
            si._stub.DropConnections()
        except Exception:
            log.debug("dropping connections to %s failed", self.where, exc_info=True)

    def _relogin(self) -> None:
        log.info("%s: the vSphere session expired; logging in again", self.where)
        try:
            self._content.sessionManager.Login(self.user, self.settings.password.reveal())
        except vim.fault.InvalidLogin as exc:
            raise HypervisorError(
                f"login to {self.where} as {self.user!r} failed: {exc.msg or 'invalid login'}",
                hint="check user and password",
            ) from None

    @property
    def stub(self) -> Any:
        if self._si is None:
            self.connect()
        return self._si._stub

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)

    def _call(self, func: Callable[[], T], *, action: str, vm: str | None) -> T:
        """Run one API call: re-login (bounded) when the session is gone, translate faults."""
        if self._si is None:
            self.connect()
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(vim.fault.NotAuthenticated),
                stop=stop_after_attempt(SESSION_ATTEMPTS),
                wait=wait_none(),
                before_sleep=lambda _state: self._relogin(),
                reraise=True,
            ):
                with attempt:
                    return func()
        except vmodl.MethodFault as exc:
            raise self._translate(exc, action=action, vm=vm) from None
        except (OSError, ssl.SSLError) as exc:
            raise HypervisorError(
                f"{action}: connection to {self.where} failed: {exc}", vm=vm
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _translate(self, fault: Any, *, action: str, vm: str | None) -> SnapcoordError:
        text = fault_text(fault)
        if isinstance(fault, vim.fault.NotAuthenticated):
            return HypervisorError(
                f"{action}: the session on {self.where} could not be re-established ({text})",
                vm=vm,
            )
        if isinstance(fault, vim.fault.InvalidLogin):
            return HypervisorError(
                f"{action}: login failed ({text})", vm=vm, hint="check user and password"
            )
        if isinstance(fault, vim.fault.NoPermission):
            privilege = getattr(fault, "privilegeId", None) or "?"
            return HypervisorError(
                f"{action}: permission denied (privilege {privilege})",
                vm=vm,
                hint=f"grant {self.user!r} a role with that privilege on the VM",
            )
        if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
            kind = getattr(getattr(fault, "obj", None), "_wsdlName", "")
            if kind == "VirtualMachineSnapshot":
                return SnapshotNotFound(
                    f"{action}: the snapshot no longer exists", vm=vm, hint="see `snapcoord list`"
                )
            return VMNotFound(f"{action}: the VM no longer exists on {self.where}", vm=vm)
        if isinstance(fault, vim.fault.NotFound):
            return SnapshotNotFound(f"{action}: {text}", vm=vm, hint="see `snapcoord list`")
        if isinstance(fault, vim.fault.ApplicationQuiesceFault):
            return SnapshotFailed(
                f"{action}: quiescing the guest failed ({text})",
                vm=vm,
                hint="quiesce needs VMware Tools running in the guest; fix Tools or set "
                "quiesce = false",
            )
        if isinstance(fault, SNAPSHOT_FAULTS):
            return SnapshotFailed(f"{action} failed: {text}", vm=vm)
        return HypervisorError(f"{action} failed: {text}", vm=vm)

    # -- reads ------------------------------------------------------------------------------

    def _read(self, objects: Sequence[tuple[Any, Sequence[str]]]) -> dict[str, dict[str, Any]]:
        """One RetrieveProperties for several objects; unset properties are simply absent.
        Returns {moref id: {property: value}}."""
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=obj) for obj, props in objects if props],
            propSet=[
                PC.PropertySpec(type=type(obj), pathSet=list(props))
                for obj, props in objects
                if props
            ],
        )
        result: dict[str, dict[str, Any]] = {obj._moId: {} for obj, _ in objects}
        for content in self._content.propertyCollector.RetrieveContents([spec]) or []:
            for missing in content.missingSet or []:
                if missing.fault is not None:  # e.g. NotAuthenticated: the session is gone
                    raise getattr(missing.fault, "fault", None) or missing.fault
            result[content.obj._moId] = {prop.name: prop.val for prop in content.propSet}
        return result

    def _vm_ref(self, vm: VM) -> Any:
        return vim.VirtualMachine(vm.id, self.stub)

    def _read_vm(self, vm: VM, props: Sequence[str], action: str) -> dict[str, Any]:
        return self._call(
            lambda: self._read([(self._vm_ref(vm), props)])[vm.id], action=action, vm=vm.name
        )

    # -- tasks ------------------------------------------------------------------------------

    def _wait(
        self,
        task: Any,
        *,
        vm: VM,
        what: str,
        timeout: float,
        vm_props: Sequence[str] = (),
    ) -> tuple[Any, dict[str, Any]]:
        """Wait for ``task`` reading only info.state/error/result(/progress) through the
        PropertyCollector; ``vm_props`` of the VM are read in the same call, so the values
        returned are those seen when the task had finished. Raises on fault or timeout."""
        started = time.monotonic()
        shown: list[int] = []
        vm_ref = self._vm_ref(vm)

        def check() -> tuple[Any, dict[str, Any]] | None:
            seen = self._call(
                lambda: self._read([(task, TASK_PROPS), (vm_ref, vm_props)]),
                action=what,
                vm=vm.name,
            )
            info = seen[task._moId]
            state = info.get("info.state")
            if state == "success":
                return info.get("info.result"), seen[vm.id]
            if state == "error":
                raise self._translate(info.get("info.error"), action=what, vm=vm.name)
            progress = info.get("info.progress")
            if (
                progress is not None
                and time.monotonic() - started > PROGRESS_AFTER
                and (not shown or shown[-1] != progress)
            ):
                shown.append(progress)
                log.info("%s: %s: %s%%", vm.name, what, progress)
            return None

        try:
            return poll_until(check, timeout=timeout, what=what, vm=vm.name)
        except TaskTimeout as exc:
            raise TaskTimeout(
                exc.message,
                vm=vm.name,
                hint=f"task {task._moId} may still be running on {self.host}: check it in the "
                "vSphere client before retrying",
            ) from None

    # -- lookup -----------------------------------------------------------------------------

    def find_vm(self, ref: str) -> VM:
        if ref.startswith("moref:"):
            obj = vim.VirtualMachine(ref.split(":", 1)[1], self.stub)
        elif ref.startswith("uuid:"):
            obj = self._by_uuid(ref.split(":", 1)[1], ref)
        elif "/" in ref:
            obj = self._call(
                lambda: self._content.searchIndex.FindByInventoryPath(ref), action="find VM", vm=ref
            )
            if not isinstance(obj, vim.VirtualMachine):
                raise VMNotFound(
                    f"no VM at inventory path {ref!r} on {self.where}",
                    vm=ref,
                    hint="paths look like DATACENTER/vm/FOLDER/NAME",
                )
        else:
            return self._by_name(ref)
        try:
            props = self._call(
                lambda: self._read([(obj, ["name", "config.instanceUuid"])])[obj._moId],
                action="find VM",
                vm=ref,
            )
        except VMNotFound:
            raise VMNotFound(f"no VM {ref!r} on {self.where}", vm=ref) from None
        return self._vm(obj._moId, props)

    def _vm(self, moref: str, props: Mapping[str, Any]) -> VM:
        uuid = props.get("config.instanceUuid")
        return VM(
            name=props["name"],
            id=moref,
            hypervisor=self.name,
            extra={"moref": moref, "instance_uuid": uuid},
        )

    def _by_uuid(self, uuid: str, ref: str) -> Any:
        index = self._content.searchIndex
        for instance in (True, False):  # instance UUID first, then the BIOS UUID

            def search(instance: bool = instance) -> Any:
                return index.FindByUuid(None, uuid, True, instance)

            found = self._call(search, action="find VM", vm=ref)
            if found is not None:
                return found
        raise VMNotFound(f"no VM with instance or BIOS UUID {uuid} on {self.where}", vm=ref)

    def _scope(self, ref: str) -> Any:
        datacenter = self.settings.datacenter
        folder = self.settings.folder
        index = self._content.searchIndex
        if folder:
            path = folder.strip("/")
            if datacenter and not path.startswith(f"{datacenter}/"):
                path = f"{datacenter}/vm/{path}"
            found = self._call(lambda: index.FindByInventoryPath(path), action="find VM", vm=ref)
            if not isinstance(found, vim.Folder):
                raise HypervisorError(
                    f"folder {path!r} not found on {self.where}",
                    vm=ref,
                    hint="folder is an inventory path like DC/vm/prod",
                )
            return found
        if datacenter:
            found = self._call(
                lambda: index.FindByInventoryPath(datacenter), action="find VM", vm=ref
            )
            if not isinstance(found, vim.Datacenter):
                raise HypervisorError(
                    f"datacenter {datacenter!r} not found on {self.where}", vm=ref
                )
            return found
        return self._content.rootFolder

    def _by_name(self, name: str) -> VM:
        def lookup() -> list[tuple[str, dict[str, Any]]]:
            views = self._content.viewManager
            view = views.CreateContainerView(self._scope(name), [vim.VirtualMachine], True)
            try:
                spec = PC.FilterSpec(
                    objectSet=[
                        PC.ObjectSpec(
                            obj=view,
                            skip=True,
                            selectSet=[
                                PC.TraversalSpec(
                                    name="view",
                                    path="view",
                                    skip=False,
                                    type=vim.view.ContainerView,
                                )
                            ],
                        )
                    ],
                    propSet=[
                        PC.PropertySpec(
                            type=vim.VirtualMachine, pathSet=["name", "config.instanceUuid"]
                        )
                    ],
                )
                contents = self._content.propertyCollector.RetrieveContents([spec]) or []
            finally:
                view.DestroyView()
            found = []
            for content in contents:
                props = {prop.name: prop.val for prop in content.propSet}
                if props.get("name") == name:
                    found.append((content.obj._moId, props))
            return found

        matches = self._call(lambda: lookup(), action="find VM", vm=name)
        if not matches:
            scope = self.settings.folder or self.settings.datacenter
            where = f"{self.where} (in {scope})" if scope else self.where
            raise VMNotFound(
                f"no VM named {name!r} on {where}",
                vm=name,
                hint="check the name, or use an inventory path, uuid: or moref:",
            )
        if len(matches) > 1:
            listed = ", ".join(f"{self._path(moref, name)} (moref:{moref})" for moref, _ in matches)
            raise HypervisorError(
                f"the name {name!r} matches {len(matches)} VMs: {listed}",
                vm=name,
                hint="set datacenter or folder, or name the VM by path, uuid: or moref:",
            )
        moref, props = matches[0]
        return self._vm(moref, props)

    def _path(self, moref: str, name: str) -> str:
        """Inventory path of a VM (only for messages): walk the parents up to the root."""
        parts = [name]
        obj: Any = vim.VirtualMachine(moref, self.stub)
        for _ in range(64):
            parent = self._read([(obj, ["parent"])])[obj._moId].get("parent")
            if parent is None or parent._moId == self._content.rootFolder._moId:
                break
            parts.append(self._read([(parent, ["name"])])[parent._moId].get("name", "?"))
            obj = parent
        return "/".join(reversed(parts))

    # -- snapshots --------------------------------------------------------------------------

    def list_snapshots(self, vm: VM) -> list[Snapshot]:
        props = self._read_vm(vm, ["snapshot"], "list snapshots")
        return self._snapshots(vm, props)

    def _snapshots(self, vm: VM, props: Mapping[str, Any]) -> list[Snapshot]:
        """The VM's snapshots from its ``snapshot`` property; an answer of another shape is
        one error line (exit 3)."""
        try:
            return snapshots_from_info(props.get("snapshot"))
        except BadAnswer as exc:
            raise HypervisorError(
                f"{self.where} answered with a snapshot tree snapcoord does not understand ({exc})",
                vm=vm.name,
                hint="is it vCenter or ESXi? list the VM's snapshots in the vSphere Client",
            ) from None

    def power_state(self, vm: VM) -> PowerState:
        props = self._read_vm(vm, ["runtime.powerState"], "read power state")
        return POWER_STATES.get(str(props.get("runtime.powerState")), PowerState.UNKNOWN)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            memory=True, quiesce=True, disk_only=True, extra={"max_chain": MAX_CHAIN}
        )

    def check_snapshot_ready(self, vm: VM, *, memory: bool, quiesce: bool) -> None:
        props = self._read_vm(
            vm, ["snapshot", "runtime.powerState", "guest.toolsRunningStatus"], "preflight"
        )
        snapshots = self._snapshots(vm, props)
        for message in snapshot_warnings(
            snapshots,
            max_snapshots=self.settings.max_snapshots,
            max_age_hours=self.settings.max_age_hours,
            now=datetime.now(UTC),
        ):
            self._warn(f"{vm.name}: {message}")
        if chain_depth(snapshots) >= MAX_CHAIN:
            raise UnsupportedOperation(
                f"the snapshot chain is {MAX_CHAIN} deep, vSphere's limit",
                vm=vm.name,
                hint="delete old snapshots first",
            )
        running = props.get("runtime.powerState") == "poweredOn"
        tools = props.get("guest.toolsRunningStatus")
        if quiesce and running and tools != "guestToolsRunning":
            raise UnsupportedOperation(
                f"quiesce needs VMware Tools running in the guest (Tools status: {tools})",
                vm=vm.name,
                hint="start VMware Tools / open-vm-tools or set quiesce = false",
            )

    def check_snapshot_support(self, vm: VM) -> None:
        props = self._read_vm(vm, ["config.template"], "check")
        if props.get("config.template"):
            raise UnsupportedOperation(
                f"{vm.name} is a template: vSphere takes no snapshot of a template",
                vm=vm.name,
                hint="point [vms.X] vm at the VM itself, not at a template",
            )

    def missing_privileges(self, vm: VM, operations: Sequence[str]) -> list[str]:
        # quiescing needs nothing beyond CreateSnapshot (VMware Tools does it in the guest)
        wanted = list(vsphere_privileges([op for op in operations if op in VSPHERE]))

        def ask() -> Any:
            session = self._content.sessionManager.currentSession
            return self._content.authorizationManager.HasPrivilegeOnEntities(
                entity=[self._vm_ref(vm)], sessionId=session.key, privId=wanted
            )

        granted: set[str] = set()
        for result in self._call(ask, action="read privileges", vm=vm.name) or []:
            for availability in getattr(result, "privAvailability", None) or []:
                if availability.isGranted is True and isinstance(availability.privId, str):
                    granted.add(availability.privId)
        return [priv for priv in wanted if priv not in granted]

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
        action = f"create snapshot {name!r}"
        task = self._call(
            lambda: self._vm_ref(vm).CreateSnapshot_Task(name, description, memory, quiesce),
            action=action,
            vm=vm.name,
        )
        result, props = self._wait(task, vm=vm, what=action, timeout=timeout, vm_props=["snapshot"])
        for snap in self._snapshots(vm, props):
            if snap.id == result._moId:
                return snap
        return Snapshot(
            name=name,
            id=result._moId,
            created=datetime.now(UTC),
            description=description,
            memory=memory,
            quiesced=quiesce,
            current=True,
            extra={"moref": result._moId},
        )

    def revert_snapshot(
        self, vm: VM, snapshot: Snapshot, *, start: bool | None, timeout: float
    ) -> None:
        """Revert; afterwards the VM runs if ``start`` (None: if it ran before the revert)."""
        action = f"revert to snapshot {snapshot.name!r}"
        if start is None:
            before = self._read_vm(vm, ["runtime.powerState"], action)
            start = before.get("runtime.powerState") == "poweredOn"
        snap_ref = vim.vm.Snapshot(snapshot.id, self.stub)
        task = self._call(lambda: snap_ref.RevertToSnapshot_Task(), action=action, vm=vm.name)
        _, props = self._wait(
            task, vm=vm, what=action, timeout=timeout, vm_props=["runtime.powerState"]
        )
        running = props.get("runtime.powerState") == "poweredOn"
        if start and not running:
            task = self._call(
                lambda: self._vm_ref(vm).PowerOnVM_Task(), action="power on", vm=vm.name
            )
            self._wait(task, vm=vm, what="power on after revert", timeout=timeout)
        elif not start and running:
            task = self._call(
                lambda: self._vm_ref(vm).PowerOffVM_Task(), action="power off", vm=vm.name
            )
            self._wait(task, vm=vm, what="power off after revert", timeout=timeout)

    def delete_snapshot(self, vm: VM, snapshot: Snapshot, *, timeout: float) -> None:
        action = f"delete snapshot {snapshot.name!r}"
        snap_ref = vim.vm.Snapshot(snapshot.id, self.stub)
        task = self._call(
            lambda: snap_ref.RemoveSnapshot_Task(False, True), action=action, vm=vm.name
        )
        self._wait(task, vm=vm, what=action, timeout=timeout)

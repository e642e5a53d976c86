"""The transient domain of a boot verification, as XML (pure functions, no libvirt call).

:func:`read_snapshot` reads a libvirt snapshot's XML into a :class:`SnapshotDisks`: the
snapshot's ``<domain>`` and, per disk, the file that holds the disk's state at that time: the
disk's own qcow2 with an internal snapshot in it, or, for an external snapshot, the file that
was the disk before the snapshot (now a read-only backing file of the VM's active layer). What
a throwaway copy cannot be made of is refused with one line (:class:`VerifyUnavailable`).

:func:`transient_xml` turns the snapshot's ``<domain>`` into the domain that boots the copy:
new name and uuid, the disks pointed at the copies (each with its backing chain spelled out),
only the devices an isolated boot needs (every ``<interface>``, host device, shared folder,
graphics, TPM, lease and QEMU pass-through argument removed: nothing of it reaches any
network or any of the VM's own files), serial consoles as ptys logged into the work folder, one
guest agent channel, and a static DAC label with ``relabel='no'``: libvirt changes the owner of
no file (the VM's kernel, firmware and backing files are read as they are).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

from snapcoord.errors import VerifyUnavailable

AGENT_CHANNEL = "org.qemu.guest_agent.0"

#: Devices the copy keeps as the snapshot had them (everything else is dropped; disks, serial
#: ports, consoles and channels are rebuilt).
_KEPT_DEVICES = frozenset(
    {"emulator", "controller", "video", "watchdog", "memballoon", "panic", "iommu"}
)
_INPUTS = frozenset({"mouse", "tablet", "keyboard"})
#: Devices whose removal is worth a note (they connect the VM to something outside it).
_NOTED = {
    "interface": "network interface",
    "hostdev": "host device",
    "filesystem": "shared folder",
    "graphics": "graphics",
    "redirdev": "redirected device",
    "smartcard": "smartcard",
    "tpm": "TPM",
    "lease": "lease",
    "shmem": "shared memory",
    "vsock": "vsock",
    "parallel": "parallel port",
}


@dataclass(frozen=True)
class DiskState:
    """Where one disk's state at snapshot time is."""

    target: str  # vda
    path: str  # the file to read it from
    format: str  # that file's format (qcow2, raw)
    #: the state is the internal snapshot of that name inside ``path`` (else: ``path`` itself)
    internal_snapshot: str | None


@dataclass(frozen=True)
class SnapshotDisks:
    snapshot: str
    domain: ElementTree.Element = field(repr=False)
    disks: tuple[DiskState, ...]
    #: the snapshot holds the VM's RAM (a boot verification does not restore it)
    memory: bool
    #: what is left out of the copy (removable media)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layer:
    """One file of a copy's backing chain (below the copy itself)."""

    path: str
    format: str
    size: int = 0  # virtual size in bytes


@dataclass(frozen=True)
class DiskCopy:
    target: str
    path: Path  # the copy in the work folder (qcow2)
    backing: tuple[Layer, ...]  # read-only, top first


def _refuse(vm: str, snapshot: str, what: str) -> VerifyUnavailable:
    return VerifyUnavailable(
        f"cannot boot-verify snapshot {snapshot!r}: {what}",
        vm=vm,
        hint="boot verification copies file-backed qcow2 disks (internal snapshots) or their "
        "backing files (external snapshots) only",
    )


def read_snapshot(snapshot_xml: str, *, vm: str, snapshot: str) -> SnapshotDisks:
    """The disks of a snapshot and where their state is; VerifyUnavailable for what this
    cannot copy (network, block or pool disks, shared disks, a disk left out of the snapshot)."""
    try:
        root = ElementTree.fromstring(snapshot_xml)  # noqa: S314 - from libvirt
    except ElementTree.ParseError as exc:
        raise _refuse(vm, snapshot, f"libvirt's snapshot XML does not parse ({exc})") from None
    domain = root.find("domain")
    if domain is None:
        raise _refuse(vm, snapshot, "the snapshot records no domain definition")
    memory_el = root.find("memory")
    memory_mode = memory_el.get("snapshot", "") if memory_el is not None else ""
    memory = memory_mode in ("internal", "external")
    listed = {
        d.get("name", ""): d.get("snapshot", "")
        for d in root.findall("disks/disk")
        if d.get("name")
    }
    disks: list[DiskState] = []
    notes: list[str] = []
    for disk in domain.findall("devices/disk"):
        target_el = disk.find("target")
        target = target_el.get("dev", "") if target_el is not None else ""
        device = disk.get("device", "disk")
        if device in ("cdrom", "floppy"):
            notes.append(f"{device} {target} left out")
            continue
        if not target:
            raise _refuse(vm, snapshot, "a disk has no target device name")
        kind = disk.get("type", "file")
        source = disk.find("source")
        path = source.get("file", "") if source is not None else ""
        if kind != "file":
            what = source.get("protocol", kind) if source is not None else kind
            raise _refuse(vm, snapshot, f"disk {target} is a {kind} disk ({what}), not a file")
        if disk.find("shareable") is not None:
            raise _refuse(vm, snapshot, f"disk {target} is shareable")
        if not path.startswith("/") or not path.isprintable():
            raise _refuse(vm, snapshot, f"disk {target} has no absolute file path ({path!r})")
        driver = disk.find("driver")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        mode = listed.get(target) or listed.get(path) or _default_mode(memory_mode, listed)
        if mode == "internal":
            if fmt != "qcow2":
                raise _refuse(vm, snapshot, f"disk {target} is {fmt}, not qcow2")
            disks.append(DiskState(target, path, fmt, internal_snapshot=snapshot))
        elif mode == "external":
            disks.append(DiskState(target, path, fmt, internal_snapshot=None))
        else:
            raise _refuse(vm, snapshot, f"disk {target} is not in the snapshot (snapshot={mode!r})")
    if not disks:
        raise _refuse(vm, snapshot, "the snapshot's domain has no disk to boot from")
    return SnapshotDisks(snapshot, domain, tuple(disks), memory, tuple(notes))


def _default_mode(memory_mode: str, listed: dict[str, str]) -> str:
    """A disk the snapshot does not list: internal when the snapshot is (an older libvirt, or a
    driver that lists nothing), else unknown."""
    if not listed and memory_mode in ("internal", ""):
        return "internal"
    return "missing"


def transient_xml(
    snap: SnapshotDisks,
    *,
    name: str,
    copies: dict[str, DiskCopy],
    label: str | None,
    serial_log: Path,
    nvram: Path | None,
) -> tuple[str, list[str]]:
    """The transient domain's XML and what was left out of it (one note per kind of device).
    ``label`` is QEMU's ``+uid:+gid`` (None: no DAC label, QEMU runs as root)."""
    dom = copy.deepcopy(snap.domain)
    dom.attrib.pop("id", None)
    notes: list[str] = list(snap.notes)
    for child in list(dom):
        tag = child.tag
        if tag.startswith("{"):
            notes.append("QEMU pass-through arguments left out")
            dom.remove(child)
        elif tag in ("uuid", "title", "metadata", "genid", "seclabel", "description"):
            dom.remove(child)
    _text(dom, "name").text = name
    _text(dom, "description").text = "snapcoord boot verification (throwaway, no network)"
    for event, action in (("on_poweroff", "destroy"), ("on_crash", "destroy")):
        _text(dom, event).text = action
    _nvram(dom, nvram)
    devices = dom.find("devices")
    if devices is None:
        devices = ElementTree.SubElement(dom, "devices")
    dropped: dict[str, int] = {}
    serial_ports: list[ElementTree.Element] = []
    consoles: list[ElementTree.Element] = []
    rebuilt: list[ElementTree.Element] = []
    for device in list(devices):
        tag = device.tag
        devices.remove(device)
        if tag == "disk":
            target_el = device.find("target")
            target = target_el.get("dev", "") if target_el is not None else ""
            if target in copies:
                rebuilt.append(_disk(device, copies[target]))
        elif tag == "serial":
            serial_ports.append(device)
        elif tag == "console":
            consoles.append(device)
        elif _kept(device):
            rebuilt.append(_strip_alias(device))
        elif tag in _NOTED:
            dropped[_NOTED[tag]] = dropped.get(_NOTED[tag], 0) + 1
    for what, count in dropped.items():
        notes.append(f"{count} {what}{'s' if count > 1 else ''} left out")
    for element in rebuilt:
        devices.append(element)
    for index, port in enumerate(serial_ports):
        devices.append(_pty("serial", port, serial_log if index == 0 else None))
    for console in consoles:
        target_el = console.find("target")
        if target_el is not None and target_el.get("type", "serial") in ("serial", "virtio"):
            devices.append(_pty("console", console, serial_log if serial_ports else None))
    channel = ElementTree.SubElement(devices, "channel", {"type": "unix"})
    ElementTree.SubElement(channel, "target", {"type": "virtio", "name": AGENT_CHANNEL})
    if label is not None:
        seclabel = ElementTree.SubElement(
            dom, "seclabel", {"type": "static", "model": "dac", "relabel": "no"}
        )
        ElementTree.SubElement(seclabel, "label").text = label
    return ElementTree.tostring(dom, encoding="unicode"), notes


def _text(dom: ElementTree.Element, tag: str) -> ElementTree.Element:
    element = dom.find(tag)
    if element is None:
        element = ElementTree.SubElement(dom, tag)
    return element


def _nvram(dom: ElementTree.Element, nvram: Path | None) -> None:
    os_el = dom.find("os")
    element = os_el.find("nvram") if os_el is not None else None
    if element is None or os_el is None:
        return
    if nvram is None:
        os_el.remove(element)
        return
    element.text = str(nvram)


def _kept(device: ElementTree.Element) -> bool:
    if device.tag == "input":
        return device.get("type") in _INPUTS
    if device.tag == "rng":
        return _local_rng(device)
    return device.tag in _KEPT_DEVICES


def _strip_alias(device: ElementTree.Element) -> ElementTree.Element:
    for alias in device.findall("alias"):
        device.remove(alias)
    return device


def _local_rng(device: ElementTree.Element) -> bool:
    backend = device.find("backend")
    return backend is not None and backend.get("model") in ("random", "builtin")


def _disk(original: ElementTree.Element, made: DiskCopy) -> ElementTree.Element:
    """The copy as a file disk, with the original's target, boot order, address and identity
    (serial, wwn: /dev/disk/by-id stays the same) and its backing chain read-only."""
    disk = ElementTree.Element("disk", {"type": "file", "device": original.get("device", "disk")})
    ElementTree.SubElement(disk, "driver", {"name": "qemu", "type": "qcow2"})
    ElementTree.SubElement(disk, "source", {"file": str(made.path)})
    parent = disk
    for layer in made.backing:
        store = ElementTree.SubElement(parent, "backingStore", {"type": "file"})
        ElementTree.SubElement(store, "format", {"type": layer.format})
        ElementTree.SubElement(store, "source", {"file": layer.path})
        parent = store
    ElementTree.SubElement(parent, "backingStore")
    for tag in ("target", "boot", "address", "serial", "wwn", "vendor", "product", "readonly"):
        for element in original.findall(tag):
            disk.append(copy.deepcopy(element))
    return disk


def _pty(tag: str, original: ElementTree.Element, log: Path | None) -> ElementTree.Element:
    device = ElementTree.Element(tag, {"type": "pty"})
    if log is not None:
        ElementTree.SubElement(device, "log", {"file": str(log), "append": "on"})
    target = original.find("target")
    if target is not None:
        device.append(copy.deepcopy(target))
    return device

"""Boot verification of a libvirt snapshot (``snapcoord verify VM --boot [--snapshot NAME]``):
does the snapshot's disk state boot into a guest whose services and database come up and whose
database passes its own check? Without touching the VM, its disks or its snapshot tree:

1. **copy** (:func:`_copy_disk`): a throwaway qcow2 of each disk's state in ``work``. An
   internal snapshot is read with ``qemu-img convert -U -l snapshot.name=NAME`` (``-U``: the
   VM's QEMU keeps its lock; a snapshot's clusters are never rewritten while it exists); when
   the disk has a backing file QEMU can read, only the snapshot's own clusters are copied
   (``-B``: the copy is backed by that read-only file), else the whole disk. An external
   snapshot's state is the file that was the disk before it, now a read-only backing file: the
   copy is a new empty overlay on it (or a full copy when QEMU cannot read it).
2. **boot**: a transient domain (``createXML`` with ``AUTODESTROY``: libvirtd destroys it if
   this process dies), named ``snapcoord-verify-<vm>-<random>``, built from the snapshot's own
   ``<domain>`` by :mod:`snapcoord.verify.boot_domain` (no network interface, no pass-through,
   same kernel boot settings, a guest agent channel). It **cold-boots the disk state**: a
   snapshot's memory (RAM) is not restored, so the guest boots as after a power cut at that
   moment (which is what a restore from this snapshot's disks would see too). What the guest
   had not written to its disk then (its page cache) is not in the copy: MariaDB's clean
   shutdown fsyncs InnoDB but not MyISAM or Aria files, so a snapshot taken right after a stop
   without a ``sync`` in the guest can boot with such tables broken (seen on the real guest:
   "Incorrect file format" for a MyISAM table created shortly before).
3. **checks** (:mod:`snapcoord.verify.boot_checks`): the guest agent answers, systemd finished
   booting, every configured service and the database service are active, the database's own
   check passes.
4. **teardown**, always (a problem, the timeout, an exception, ``KeyboardInterrupt`` or the
   CLI's ``Interrupted``): destroy the domain, remove every file made in ``work``.

The verdict is a :class:`BootResult`. What keeps the verification from running at all (a
snapshot it cannot copy, qemu-img failing, libvirt refusing the domain, no space) raises
:class:`~snapcoord.errors.VerifyUnavailable`; an unknown VM or snapshot raises the adapter's
errors (:class:`~snapcoord.errors.VMNotFound`, :class:`~snapcoord.errors.SnapshotNotFound`).
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import libvirt

from snapcoord import cancel, shell
from snapcoord.adapters.libvirt_agent import LibvirtAgentLink
from snapcoord.errors import SnapshotNotFound, VerifyUnavailable, VMNotFound
from snapcoord.verify.boot_checks import BootProblem, BootTimeout, GuestChecks
from snapcoord.verify.boot_domain import (
    DiskCopy,
    DiskState,
    Layer,
    read_snapshot,
    transient_xml,
)

log = logging.getLogger("snapcoord.verify.boot")

QEMU_IMG = "/usr/bin/qemu-img"
PREFIX = "snapcoord-verify-"
PHASES = ("copy", "boot", "checks", "teardown")
#: libvirt's answers when the domain is not there (any more) or not running
_GONE = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
#: seconds libvirt may take to destroy the copy
DESTROY_SECONDS = 30.0


@dataclass
class BootResult:
    ok: bool
    snapshot: str
    #: copy, boot (domain start until the agent answers and systemd finished booting),
    #: checks (services, database), teardown
    seconds: dict[str, float]
    #: unit -> systemd state in the copy (the configured services and the database's)
    services: dict[str, str]
    #: the database check's summary ("not run: ..." when it did not run)
    database_check: str
    problem: str | None
    #: what the verification left out or did differently (RAM not restored, devices dropped)
    notes: list[str] = field(default_factory=list)
    #: the transient domain's name
    domain: str = ""


def boot_verify(
    conn: libvirt.virConnect,
    domain_name: str,
    snapshot: str,
    *,
    services: Sequence[str],
    database: str,
    timeout: float,
    work: Path,
) -> BootResult:
    """Boot a throwaway copy of ``snapshot`` of ``domain_name`` and check it (module doc).

    ``services``: the VM's configured services (``[vms.X.guest] services``); ``database``: its
    ``database`` setting (a service name, ``auto`` or ``none``); ``timeout``: seconds for copy,
    boot and checks together (the teardown comes on top); ``work``: a root-only folder of the
    caller's that holds the copy (its group is set to QEMU's and its mode to 0710 while the copy
    runs, so QEMU can reach the copy; both are put back)."""
    deadline = time.monotonic() + timeout
    snap = _snapshot_xml(conn, domain_name, snapshot)
    disks = read_snapshot(snap, vm=domain_name, snapshot=snapshot)
    name = f"{PREFIX}{domain_name}-{secrets.token_hex(4)}"
    result = BootResult(
        ok=False,
        snapshot=snapshot,
        seconds=dict.fromkeys(PHASES, 0.0),
        services={},
        database_check="not run",
        problem=None,
        domain=name,
    )
    if disks.memory:
        result.notes.append("the snapshot's memory is not restored: its disks are cold-booted")
    owner = _qemu_owner(conn, disks.domain.get("type", "qemu"))
    copy = _Copy(work, name, owner, vm=domain_name)
    dom: libvirt.virDomain | None = None
    link: LibvirtAgentLink | None = None
    phase = "copy"
    started = time.monotonic()
    try:
        log.info("%s: copying the disks of snapshot %s into %s", domain_name, snapshot, work)
        copy.open()
        copies = {disk.target: copy.disk(disk, deadline=deadline) for disk in disks.disks}
        copy.boot_files(disks.domain)
        xml, notes = transient_xml(
            disks,
            name=name,
            copies=copies,
            label=f"+{owner[0]}:+{owner[1]}" if owner else None,
            serial_log=copy.path("console.log"),
            nvram=copy.nvram(disks.domain),
        )
        result.notes.extend(notes)
        cancel.check()
        phase, started = _next(result, phase, started, "boot")
        log.info("%s: booting the copy as %s (no network)", domain_name, name)
        dom = _start(conn, xml, name, vm=domain_name)
        link = LibvirtAgentLink(conn.getURI(), uuid=dom.UUIDString(), vm=name)
        checks = _checks(link, dom, copy.console, deadline=deadline, timeout=timeout)
        checks.wait_for_agent()
        result.notes.append(f"systemd: {checks.wait_for_boot()}")
        phase, started = _next(result, phase, started, "checks")
        log.info("%s: checking services and the database in %s", domain_name, name)
        _check_guest(checks, result, services, database)
        result.ok = result.problem is None
    except BootTimeout as exc:
        result.problem = f"timed out after {timeout:g} s {exc}"
    except BootProblem as exc:
        result.problem = str(exc)
    finally:
        result.seconds[phase] += time.monotonic() - started
        started = time.monotonic()
        try:
            if link is not None:
                link.close()
            _teardown(conn, dom, name, copy, result)
        finally:
            result.seconds["teardown"] = time.monotonic() - started
    if result.problem is not None:
        result.ok = False
    return result


def _next(result: BootResult, phase: str, started: float, following: str) -> tuple[str, float]:
    now = time.monotonic()
    result.seconds[phase] += now - started
    return following, now


def _snapshot_xml(conn: libvirt.virConnect, vm: str, snapshot: str) -> str:
    uri = conn.getURI()
    try:
        dom = conn.lookupByName(vm)
    except libvirt.libvirtError:
        raise VMNotFound(f"no domain named {vm!r} at {uri}", vm=vm) from None
    try:
        snap = dom.snapshotLookupByName(snapshot)
    except libvirt.libvirtError:
        raise SnapshotNotFound(
            f"no snapshot {snapshot!r}", vm=vm, hint=f"`virsh -c {uri} snapshot-list {vm}`"
        ) from None
    return str(snap.getXMLDesc(0))


def _qemu_owner(conn: libvirt.virConnect, domain_type: str) -> tuple[int, int] | None:
    """The uid and gid QEMU runs as (libvirt's DAC base label for the domain type), None
    when it runs as root or the driver has no DAC model (the test driver)."""
    try:
        caps = ElementTree.fromstring(conn.getCapabilities())  # noqa: S314 - from libvirt
    except (libvirt.libvirtError, ElementTree.ParseError):
        return None
    for model in caps.findall("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.findall("baselabel"):
            if label.get("type") == domain_type and label.text:
                owner = _parse_label(label.text)
                return owner if owner and owner != (0, 0) else None
    return None


def _parse_label(text: str) -> tuple[int, int] | None:
    user, _, group = text.strip().partition(":")
    try:
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        return None
    return uid, gid


class _Copy:
    """The files of one verification in ``work``: made for QEMU's user, all removed after."""

    def __init__(self, work: Path, name: str, owner: tuple[int, int] | None, *, vm: str) -> None:
        self.work = work
        self.name = name
        self.owner = owner
        self.vm = vm
        self.files: list[Path] = []
        self._work_stat: os.stat_result | None = None

    def open(self) -> None:
        info = os.lstat(self.work)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise VerifyUnavailable(
                f"the verify folder {self.work} is not a directory of this user", vm=self.vm
            )
        if info.st_mode & 0o027:
            raise VerifyUnavailable(
                f"the verify folder {self.work} is open to others (mode {info.st_mode & 0o777:o})",
                vm=self.vm,
            )
        if self.owner is not None:
            closed = [p for p in self.work.parents if not _allowed(p.stat(), *self.owner, 1)]
            if closed:
                raise VerifyUnavailable(
                    f"QEMU (uid {self.owner[0]}) cannot reach the verify folder {self.work}: "
                    f"{closed[0]} is closed to it",
                    vm=self.vm,
                    hint="use a verify folder under an open one, such as /var/tmp",
                )
            self._work_stat = info
            os.chown(self.work, -1, self.owner[1], follow_symlinks=False)
            os.chmod(self.work, 0o710)  # noqa: S103 - search only, for QEMU's group

    def path(self, suffix: str) -> Path:
        path = self.work / f"{self.name}.{suffix}"
        self.files.append(path)
        return path

    def _hand_over(self, path: Path) -> None:
        """Make a file of ours QEMU's (it runs as QEMU's user, and libvirt relabels nothing)."""
        if self.owner is not None:
            os.chown(path, *self.owner, follow_symlinks=False)
        os.chmod(path, 0o600)

    def disk(self, disk: DiskState, *, deadline: float) -> DiskCopy:
        made = self.path(f"{disk.target}.qcow2")
        chain = _chain(disk.path, disk.format, deadline=deadline, vm=self.vm)
        backing = chain if disk.internal_snapshot is None else chain[1:]
        thin = bool(backing) and all(self._readable(Path(layer.path)) for layer in backing)
        argv = [QEMU_IMG]
        if disk.internal_snapshot is None and thin:  # -u: size given, the file is not opened
            size = str(chain[0].size)
            argv += ["create", "-q", "-f", "qcow2", "-F", disk.format, "-b", disk.path, "-u"]
            argv += [str(made), size]
        else:
            argv += ["convert", "-U", "-f", disk.format]
            if disk.internal_snapshot is not None:
                escaped = disk.internal_snapshot.replace(",", ",,")
                argv += ["-l", f"snapshot.name={escaped}"]
            argv += ["-O", "qcow2"]
            if thin:
                argv += ["-B", backing[0].path, "-F", backing[0].format]
            argv += [disk.path, str(made)]
        _qemu_img(argv, deadline=deadline, vm=self.vm, what=f"copying disk {disk.target}")
        self._hand_over(made)
        return DiskCopy(disk.target, made, tuple(backing) if thin else ())

    def boot_files(self, domain: ElementTree.Element) -> None:
        """The VM's own kernel and initrd (direct kernel boot) where QEMU can read them; a copy
        in ``work`` when it cannot (the VM's files are never relabelled)."""
        for tag in ("kernel", "initrd", "dtb"):
            element = domain.find(f"os/{tag}")
            if element is None or not element.text:
                continue
            original = Path(element.text)
            if self._readable(original):
                continue
            made = self.path(tag)
            shutil.copyfile(original, made, follow_symlinks=False)
            self._hand_over(made)
            element.text = str(made)

    def console(self) -> str:
        """The last line the copy's serial console printed (for a boot that went wrong)."""
        try:
            text = (self.work / f"{self.name}.console.log").read_text(errors="replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def nvram(self, domain: ElementTree.Element) -> Path | None:
        """A copy of the VM's UEFI variables (the copy must not write the VM's own)."""
        element = domain.find("os/nvram")
        if element is None or not element.text:
            return None
        made = self.path("nvram")
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(element.text, made, follow_symlinks=False)
            self._hand_over(made)
        return made

    def _readable(self, path: Path) -> bool:
        """Can QEMU's user read ``path`` (by its owner, group or other bits, and search every
        folder above it)?"""
        if self.owner is None:
            return True
        uid, gid = self.owner
        try:
            info = path.stat()
            if not _allowed(info, uid, gid, 4):
                return False
            return all(_allowed(parent.stat(), uid, gid, 1) for parent in path.parents)
        except OSError:
            return False

    def remove(self) -> list[str]:
        """Remove every file made; put the folder's group and mode back. What failed, if any."""
        failed: list[str] = []
        for path in self.files:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                failed.append(f"{path}: {exc.strerror}")
        if self._work_stat is not None:
            try:
                os.chown(self.work, -1, self._work_stat.st_gid, follow_symlinks=False)
                os.chmod(self.work, stat.S_IMODE(self._work_stat.st_mode))
            except OSError as exc:
                failed.append(f"{self.work}: {exc.strerror}")
        return failed


def _allowed(info: os.stat_result, uid: int, gid: int, bit: int) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & (bit << 6))
    if info.st_gid == gid:
        return bool(info.st_mode & (bit << 3))
    return bool(info.st_mode & bit)


def _chain(path: str, fmt: str, *, deadline: float, vm: str) -> list[Layer]:
    """``path`` and its backing files, top first (``qemu-img info --backing-chain``)."""
    out = _qemu_img(
        [QEMU_IMG, "info", "-U", "--backing-chain", "--output=json", "-f", fmt, path],
        deadline=deadline,
        vm=vm,
        what=f"reading {path}",
    )
    try:
        layers: Any = json.loads(out)
    except ValueError:
        layers = None
    if not isinstance(layers, list) or not layers:
        raise VerifyUnavailable(f"qemu-img info gave no backing chain for {path}", vm=vm)
    chain: list[Layer] = []
    for layer in layers:
        name, kind, size = layer.get("filename"), layer.get("format"), layer.get("virtual-size")
        if not isinstance(name, str) or not isinstance(kind, str) or not name.startswith("/"):
            raise VerifyUnavailable(f"{path}: backing file {name!r} is not a local file", vm=vm)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise VerifyUnavailable(f"qemu-img info gave no size for {name}", vm=vm)
        chain.append(Layer(name, kind, size))
    return chain


def _qemu_img(argv: list[str], *, deadline: float, vm: str, what: str) -> str:
    left = deadline - time.monotonic()
    if left <= 0:
        raise BootTimeout(f"before {what}")
    if not os.access(QEMU_IMG, os.X_OK):
        raise VerifyUnavailable(f"{QEMU_IMG} is missing", vm=vm, hint="apt-get install qemu-utils")
    done = shell.execute(argv, timeout=left)
    if done.timed_out:
        raise BootTimeout(what)
    if not done.ok:
        text = done.error_text()
        hint = "free space in the verify folder" if "No space left" in text else None
        raise VerifyUnavailable(f"{what} failed: {text}", vm=vm, hint=hint)
    return done.stdout.decode(errors="replace")


def _start(conn: libvirt.virConnect, xml: str, name: str, *, vm: str) -> libvirt.virDomain:
    """Start the transient domain, destroyed by libvirtd when this connection closes (this
    process dies) where the driver can (QEMU's can; the test driver cannot)."""
    try:
        try:
            return conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
        except libvirt.libvirtError as exc:
            if "unsupported flags" not in (exc.get_error_message() or ""):
                raise
            return conn.createXML(xml, 0)
    except libvirt.libvirtError as exc:
        raise VerifyUnavailable(
            f"libvirt could not start the throwaway domain {name}: "
            f"{(exc.get_error_message() or str(exc)).strip()}",
            vm=vm,
        ) from None


def _checks(
    link: LibvirtAgentLink,
    dom: libvirt.virDomain,
    console: Callable[[], str],
    *,
    deadline: float,
    timeout: float,
) -> GuestChecks:
    def running() -> bool:
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError:
            return False

    return GuestChecks(link, deadline=deadline, timeout=timeout, running=running, console=console)


def _check_guest(
    checks: GuestChecks, result: BootResult, services: Sequence[str], database: str
) -> None:
    db_service = checks.find_database(database)
    units = list(dict.fromkeys([*services, *([db_service] if db_service else [])]))
    result.services = checks.services(units)
    down = [f"{unit} is {state}" for unit, state in result.services.items() if state != "active"]
    if down:
        result.database_check = "not run: services are not active"
        raise BootProblem(f"after boot: {', '.join(down)}")
    if db_service is None:
        result.database_check = "no database service" if database == "auto" else "none"
        return
    try:
        result.database_check = checks.database(db_service)
    except BootTimeout:
        result.database_check = "not finished: timed out"
        raise
    except BootProblem as exc:
        result.database_check = f"failed: {exc}"
        raise


def _teardown(
    conn: libvirt.virConnect, dom: libvirt.virDomain | None, name: str, copy: _Copy,
    result: BootResult,
) -> None:  # fmt: skip
    """Destroy the domain (found by name when a signal came between its start and the
    assignment), then remove the files; what failed becomes the result's problem."""
    failed: list[str] = []
    with _collect(failed, f"destroying {name}"):
        _destroy(conn, dom, name)
    failed += copy.remove()
    if failed:
        log.error("boot verification left something behind: %s", "; ".join(failed))
        text = "teardown: " + "; ".join(failed)
        result.problem = f"{result.problem}; {text}" if result.problem else text


def _destroy(conn: libvirt.virConnect, dom: libvirt.virDomain | None, name: str) -> None:
    deadline = time.monotonic() + DESTROY_SECONDS
    while True:
        try:
            found = dom if dom is not None else conn.lookupByName(name)
            found.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (
                libvirt.VIR_ERR_NO_DOMAIN,
                libvirt.VIR_ERR_OPERATION_INVALID,
            ):
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        dom = None  # destroyed; a transient domain is gone: look it up once more to be sure


@contextlib.contextmanager
def _collect(failed: list[str], what: str) -> Iterator[None]:
    try:
        yield
    except (libvirt.libvirtError, OSError) as exc:
        failed.append(f"{what}: {exc}")

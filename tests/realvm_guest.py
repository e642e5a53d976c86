"""A real Debian 12 guest under libvirt/QEMU (``qemu:///system``) for end-to-end tests.

The image is built by ``tests/realvm/build-image.sh`` (debootstrap, about 2 minutes, once per
version of the script) into ``/var/cache/snapcoord-realvm/<hash>/``; every pytest session boots
its own copy-on-write overlay of it. Needs root and ``apt-get install debootstrap
libvirt-daemon-system qemu-system-x86 qemu-utils openssh-client`` (scripts/install-system-deps
test). A missing component skips the test, or fails it under ``CI=true``.

The guest: Debian 12 with systemd, openssh-server, mariadb-server (``mariadb.socket`` enabled,
Debian's default), apache2, cron, qemu-guest-agent, sudo, curl, procps, python3 with
python3-venv and python3-libvirt, man-db, bash-completion, make, openssl; ``/bin/sh`` is dash.
It runs under TCG (``<domain type='qemu'>``: KVM is not dependable on these machines), 2 vCPUs,
1 GiB, direct kernel boot, root file system on ``/dev/vda``. Its only network is QEMU user
mode with ``restrict=on``: it reaches nothing outside, and ``127.0.0.1:PORT`` on the host is
forwarded to its sshd. The domain is persistent (defined), so libvirt can take internal
snapshots (with RAM, the domain runs) and revert to them; a guest agent channel
(``org.qemu.guest_agent.0``) lets libvirt talk to qemu-guest-agent.

Usage::

    from tests.realvm_guest import real_guest  # noqa: F401  (the fixture)

    @pytest.mark.realvm
    def test_something(real_guest: RealGuest) -> None:
        assert real_guest.ssh("systemctl is-active mariadb").stdout.strip() == "active"

``real_guest`` is session-scoped: one boot (about 25 s to SSH under TCG here) per session,
shared by every test and every module that imports it; tests that revert snapshots should leave
the guest running. It yields a :class:`RealGuest`:

* ``uri`` (``qemu:///system``), ``domain`` (``snapcoord-realvm-<8 hex>``, persistent),
* ``host`` (``127.0.0.1``), ``port`` (the forwarded SSH port), ``user`` (``root``),
* ``client_key`` (root's private key), ``known_hosts`` (``[127.0.0.1]:PORT <host key>``),
* ``serial_log`` (the guest's console, for debugging), ``overlay`` (its qcow2 in
  /var/lib/libvirt/images), ``image`` (:class:`Image`), ``workdir``,
* ``boot_seconds``, ``system_state`` (``systemctl is-system-running`` after boot),
* ``ssh(cmd, timeout=60, check=False, input=None)`` -> ``CompletedProcess[str]``: a shell line
  as root over a fresh strict OpenSSH connection (about 1 s each under TCG: batch commands),
* ``ssh_argv(cmd)``, ``guest_table(**overrides)`` (a ``[vms.X.guest]`` table),
  ``agent_command({"execute": ...})`` (qemu-guest-agent through libvirt), ``agent_run(argv)``
  (a command through the agent, no SSH: exit status, stdout, stderr), ``ssh_logins()`` (how
  many logins sshd accepted, from the guest's journal read through the agent: proof that a
  run made none), ``monitor(cmd)``, ``serial_tail()``.

Teardown destroys the domain, deletes its snapshots, undefines it and removes the overlay. A
session that was killed leaves its domain behind; the next session removes it (domains record
their owner's PID). Outside pytest: ``with running_libvirtd() as uri, booted_guest(ensure_image(),
workdir, uri) as guest: ...`` (tests/libvirtd.py).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import libvirt
import libvirt_qemu
import pytest

from tests import lab
from tests.libvirtd import URI, running_libvirtd

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "realvm" / "build-image.sh"
CACHE_ROOT = Path(os.environ.get("SNAPCOORD_REALVM_CACHE", "/var/cache/snapcoord-realvm"))
#: QEMU runs as libvirt-qemu: overlays live where it may write (not in pytest's tmp dirs).
IMAGES = Path("/var/lib/libvirt/images")
DOMAIN_PREFIX = "snapcoord-realvm-"
#: Seconds from starting the domain until SSH must answer.
BOOT_TIMEOUT = float(os.environ.get("SNAPCOORD_REALVM_BOOT_TIMEOUT", "180"))
BUILD_TIMEOUT = 1800.0
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
GUEST_ADDRESS = "10.0.2.15"  # QEMU user networking's DHCP lease
HOST_ADDRESS = "10.0.2.2"  # the host as seen from the guest (blocked by restrict=on)
META_NS = "https://snapcoord.invalid/realvm"

#: command -> Debian package (skip/fail messages).
PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
}


class RealVMError(RuntimeError):
    """The real guest could not be built, booted or reached (not a product failure)."""


# ---------------------------------------------------------------------------------------------
# the image


@dataclass(frozen=True)
class Image:
    """A built guest image in the cache (everything read-only, shared by all sessions)."""

    directory: Path
    qcow2: Path
    kernel: Path
    initrd: Path
    client_key: Path
    #: ``ssh-ed25519 AAAA...`` (no comment): the guest's only host key
    host_public_key: str
    manifest_path: Path
    manifest: dict[str, Any] = field(repr=False, compare=False)


def image_hash() -> str:
    """The cache key: the first 16 hex digits of build-image.sh's sha256."""
    return hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:16]


def image_dir() -> Path:
    return CACHE_ROOT / image_hash()


def image_is_cached() -> bool:
    return (image_dir() / "manifest.json").is_file()


def load_image(directory: Path) -> Image:
    manifest_path = directory / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    files: dict[str, str] = manifest["files"]
    host_key = (directory / files["host_public_key"]).read_text().split()
    return Image(
        directory=directory,
        qcow2=directory / files["disk"],
        kernel=directory / files["kernel"],
        initrd=directory / files["initrd"],
        client_key=directory / files["client_key"],
        host_public_key=f"{host_key[0]} {host_key[1]}",
        manifest_path=manifest_path,
        manifest=manifest,
    )


def ensure_image(timeout: float = BUILD_TIMEOUT) -> Image:
    """Return the cached image, building it first (build-image.sh, as root) if it is missing."""
    directory = image_dir()
    if not (directory / "manifest.json").is_file():
        env = {**os.environ, "SNAPCOORD_REALVM_CACHE": str(CACHE_ROOT)}
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RealVMError(
                f"{BUILD_SCRIPT} exited {proc.returncode}:\n"
                f"{proc.stderr[-4000:]}{proc.stdout[-500:]}"
            )
        built = Path(proc.stdout.strip().splitlines()[-1])
        if built != directory:
            raise RealVMError(f"{BUILD_SCRIPT} built {built}, expected {directory}")
    return load_image(directory)


# ---------------------------------------------------------------------------------------------
# the running guest


@dataclass
class RealGuest:
    """A booted guest domain and everything a client needs to reach it (as root, over SSH)."""

    uri: str
    domain: str
    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    serial_log: Path
    overlay: Path
    image: Image
    workdir: Path
    #: seconds from starting the domain until SSH answered
    boot_seconds: float = 0.0
    #: ``systemctl is-system-running --wait`` right after boot (``running`` or ``degraded``)
    system_state: str = ""

    def ssh_argv(self, command: str | None = None) -> list[str]:
        """argv of a strict, non-interactive ``ssh`` as root (``command`` is a shell line)."""
        argv = [
            "ssh",
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=6",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.client_key),
            "-p",
            str(self.port),
            "-l",
            self.user,
            self.host,
        ]
        if command is not None:
            argv += ["--", command]
        return argv

    def ssh(
        self,
        command: str,
        timeout: float = 60.0,
        *,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell line in the guest as root (a fresh connection each time: reverting a
        snapshot rewinds the guest's TCP state, so a shared connection would not survive)."""
        proc = subprocess.run(
            self.ssh_argv(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RealVMError(
                f"guest: {command!r} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
            )
        return proc

    def guest_table(self, **overrides: Any) -> dict[str, Any]:
        """A ``[vms.X.guest]`` table (keys of snapcoord.schema.GUEST) for this guest."""
        table: dict[str, Any] = {
            "transport": "ssh",
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "sudo": False,
            "services": ["apache2", "cron"],
            "database": "mariadb",
            "connect_timeout": 10.0,
        }
        table.update(overrides)
        return table

    def agent_command(self, command: dict[str, Any], timeout: int = 10) -> Any:
        """Send a command to qemu-guest-agent through libvirt; return the parsed reply."""
        conn = libvirt.open(self.uri)
        try:
            dom = conn.lookupByName(self.domain)
            reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), timeout, 0)
        finally:
            conn.close()
        return json.loads(reply)

    def ensure_agent(self, timeout: float = 90.0) -> bool:
        """Make sure qemu-guest-agent answers through libvirt before a test that needs it;
        True if it had to be restarted (over SSH). After an agent command timed out while the
        agent restarted, libvirt can keep saying "Guest agent not available for now" until the
        channel closes again; the restart closes it. A test that broke the agent still fails
        itself: this only keeps the tests after it from failing for the same reason."""
        ping = {"execute": "guest-ping"}
        try:
            self.agent_command(ping, timeout=5)
            return False
        except libvirt.libvirtError:
            pass
        self.ssh("systemctl restart qemu-guest-agent", check=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.agent_command(ping, timeout=5)
                return True
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    raise RealVMError(
                        f"qemu-guest-agent does not answer {timeout:g} s after a restart: {exc}"
                    ) from None
                time.sleep(1)

    def agent_run(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Run ``argv`` in the guest through qemu-guest-agent (``guest-exec``, never SSH); its
        exit status (128 + signal for a signal) and its output. For small outputs only: the
        reply carries them base64-encoded (adapters/libvirt_agent.py has the limits)."""
        started = self.agent_command(
            {
                "execute": "guest-exec",
                "arguments": {"path": argv[0], "arg": argv[1:], "capture-output": True},
            }
        )
        pid = started["return"]["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.agent_command(
                {"execute": "guest-exec-status", "arguments": {"pid": pid}}
            )["return"]
            if status["exited"]:
                break
            if time.monotonic() > deadline:
                raise RealVMError(f"guest (agent): {argv!r} still runs after {timeout:g} s")
            time.sleep(0.1)
        code = status["exitcode"] if "exitcode" in status else 128 + status.get("signal", 0)
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        return code, out, err

    def ssh_logins(self) -> int:
        """How many logins sshd accepted since the guest booted: its ``Accepted ...`` lines in
        the guest's journal, read through the guest agent (so reading them is not a login).

        The count goes up by one for each SSH connection (``ssh()`` makes a fresh one each
        time) and never for an agent call. A revert to a snapshot rewinds the journal with the
        rest of the guest: compare with a count taken while that snapshot's state was current.
        journald writes an entry a moment after sshd sends it: poll for a count to arrive."""
        journal = "journalctl --quiet --no-pager --output=cat SYSLOG_IDENTIFIER=sshd"
        code, out, err = self.agent_run(["/bin/sh", "-c", f"{journal} | grep -c '^Accepted '"])
        if code not in (0, 1):  # grep -c: 1 when nothing matched
            raise RealVMError(f"guest (agent): reading sshd's journal exited {code}: {err}")
        return int(out.strip())

    def monitor(self, command: str) -> str:
        """A human-monitor command to the running QEMU, through libvirt (``info network``).

        QEMU runs beside libvirtd on the host, outside the tests' sandbox, so its /proc entry is
        not there to read: the monitor reports what the running process does."""
        conn = libvirt.open(self.uri)
        try:
            dom = conn.lookupByName(self.domain)
            flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            return str(libvirt_qemu.qemuMonitorCommand(dom, command, flags))
        finally:
            conn.close()

    def serial_tail(self, lines: int = 40) -> str:
        return serial_tail(self.serial_log, lines)

    def wait_for_ssh(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until ``ssh true`` succeeds; return the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        last = "no attempt"
        while True:
            if not _domain_active(self.uri, self.domain):
                raise RealVMError(
                    f"domain {self.domain} stopped while waiting for SSH; serial console:\n"
                    f"{self.serial_tail()}"
                )
            try:
                proc = self.ssh("true", timeout=30)
            except subprocess.TimeoutExpired:
                last = "ssh timed out"
            else:
                if proc.returncode == 0:
                    return time.monotonic() - start
                last = proc.stderr.strip() or f"exit {proc.returncode}"
                if "Host key verification failed" in last or "IDENTIFICATION HAS CHANGED" in last:
                    raise RealVMError(f"guest host key does not match the image's: {last}")
            if time.monotonic() > deadline:
                raise RealVMError(
                    f"SSH on 127.0.0.1:{self.port} did not answer within {timeout:.0f} s "
                    f"(last: {last}); serial console:\n{self.serial_tail()}"
                )
            time.sleep(1.0)

    def teardown(self) -> None:
        """Destroy the domain, delete its snapshots, undefine it, remove the overlay."""
        remove_domain(self.uri, self.domain)
        self.overlay.unlink(missing_ok=True)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def serial_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no serial log: {exc})"
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


def _domain_active(uri: str, name: str) -> bool:
    conn = libvirt.open(uri)
    try:
        return bool(conn.lookupByName(name).isActive())
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def remove_domain(uri: str, name: str) -> None:
    """Destroy, delete every snapshot of, and undefine a domain (if it exists)."""
    conn = libvirt.open(uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        if dom.isActive():
            dom.destroy()
        for snap_name in dom.snapshotListNames():
            try:
                snap = dom.snapshotLookupByName(snap_name)
            except libvirt.libvirtError:
                continue  # went with an earlier delete
            try:
                snap.delete()
            except libvirt.libvirtError:
                snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        )
    finally:
        conn.close()


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_lock(overlay: Path) -> int:
    """Hold ``<overlay>.owner`` locked for as long as the session runs (the descriptor is closed
    at teardown, or by the kernel when the session dies): the sign of a live owner that every
    session sees, whatever PID namespace it runs in (lab sandboxes each have their own)."""
    fd = os.open(overlay.with_name(overlay.name + ".owner"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _owner_alive(overlay: Path, pid: str, start: str | None) -> bool:
    lock = overlay.with_name(overlay.name + ".owner")
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:  # a domain of an older session: its owner's PID, if visible
        return not pid.isdigit() or _process_start(int(pid)) == start
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    lock.unlink(missing_ok=True)
    return False


def reap_stale_domains(uri: str = URI) -> list[str]:
    """Remove our domains whose owning test process is gone (a killed session's leftovers).

    A session holds a lock on ``<overlay>.owner`` while its domain lives (:func:`_owner_lock`);
    domains of a live owner (another pytest session running right now, in any PID namespace)
    are left alone. Domains from before the lock fall back to the PID in their metadata.
    """
    reaped: list[str] = []
    conn = libvirt.open(uri)
    try:
        doms = conn.listAllDomains()
        for dom in doms:
            name = dom.name()
            if not name.startswith(DOMAIN_PREFIX):
                continue
            try:
                meta = dom.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT, META_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG
                )
            except libvirt.libvirtError:
                continue  # not made by this module: leave it
            owner = ElementTree.fromstring(meta).attrib
            pid, start, overlay = owner.get("pid", ""), owner.get("start"), owner.get("overlay", "")
            if not overlay.startswith(f"{IMAGES}/{DOMAIN_PREFIX}"):
                continue
            if _owner_alive(Path(overlay), pid, start):
                continue  # its session is still running
            remove_domain(uri, name)
            if overlay.startswith(f"{IMAGES}/{DOMAIN_PREFIX}"):
                Path(overlay).unlink(missing_ok=True)
            reaped.append(name)
    finally:
        conn.close()
    return reaped


def _qemu_can_read(path: Path) -> bool:
    """World-readable file in world-searchable directories (QEMU runs as libvirt-qemu)."""
    if not path.stat().st_mode & 0o004:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in path.parents)


def _readable_copy(path: Path, name: str) -> Path:
    """``path`` itself if QEMU can read it, else a copy in /var/lib/libvirt/images."""
    if _qemu_can_read(path):
        return path
    copy = IMAGES / name
    if not copy.exists():
        tmp = copy.with_name(f".{copy.name}.{os.getpid()}")
        subprocess.run(["cp", "--sparse=always", str(path), str(tmp)], check=True)
        tmp.chmod(0o644)
        tmp.rename(copy)
    return copy


def domain_xml(
    name: str,
    image: Image,
    overlay: Path,
    base: Path,
    port: int,
    serial_log: Path,
    kernel: Path,
    initrd: Path,
) -> str:
    """TCG, 2 vCPUs, 1 GiB, direct kernel boot, virtio disk, serial console logged to a file,
    a guest agent channel, and QEMU user networking (restrict=on) instead of a libvirt NIC.

    The shared base image is declared with ``relabel='no'``: libvirt leaves it root-owned and
    read-only for QEMU (world-readable is enough) instead of chowning it to libvirt-qemu."""
    start = _process_start(os.getpid()) or "0"
    x = escape
    image_hash_ = x(str(image.manifest.get("hash", "?")))
    owner = f"pid='{os.getpid()}' start='{start}' overlay='{x(str(overlay))}'"
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{x(name)}</name>
  <description>snapcoord real-VM test guest, image {image_hash_}</description>
  <metadata><realvm:owner xmlns:realvm='{META_NS}' {owner}/></metadata>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{x(str(kernel))}</kernel>
    <initrd>{x(str(initrd))}</initrd>
    <cmdline>{KERNEL_CMDLINE}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{x(str(overlay))}'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='{x(str(base))}'><seclabel model='dac' relabel='no'/></source>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>
      <log file='{x(str(serial_log))}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=n0,bus=pci.0,addr=0x1f,romfile='/>
  </qemu:commandline>
</domain>
"""


@contextlib.contextmanager
def booted_guest(
    image: Image, workdir: Path, uri: str = URI, attempts: int = 3
) -> Iterator[RealGuest]:
    """Boot a fresh overlay of ``image`` as a new persistent domain; remove it all afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    base = _readable_copy(image.qcow2, f"{DOMAIN_PREFIX}base-{image.directory.name}.qcow2")
    kernel = _readable_copy(image.kernel, f"{DOMAIN_PREFIX}base-{image.directory.name}.vmlinuz")
    initrd = _readable_copy(image.initrd, f"{DOMAIN_PREFIX}base-{image.directory.name}.initrd")
    guest: RealGuest | None = None
    owner_locks: list[tuple[int, Path]] = []
    try:
        last: Exception | None = None
        for _ in range(attempts):
            name = f"{DOMAIN_PREFIX}{secrets.token_hex(4)}"
            overlay = IMAGES / f"{name}.qcow2"
            port = lab.free_port()
            known_hosts = workdir / "known_hosts"
            known_hosts.write_text(f"[127.0.0.1]:{port} {image.host_public_key}\n")
            guest = RealGuest(
                uri=uri,
                domain=name,
                host="127.0.0.1",
                port=port,
                user="root",
                client_key=image.client_key,
                known_hosts=known_hosts,
                serial_log=workdir / f"{name}-serial.log",
                overlay=overlay,
                image=image,
                workdir=workdir,
            )
            backing = ["-F", "qcow2", "-b", str(base)]
            lab.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(overlay)])
            overlay.chmod(0o600)
            owner_locks.append((_owner_lock(overlay), overlay.with_name(overlay.name + ".owner")))
            conn = libvirt.open(uri)
            try:
                dom = conn.defineXML(
                    domain_xml(name, image, overlay, base, port, guest.serial_log, kernel, initrd)
                )
                started = time.monotonic()
                try:
                    dom.create()
                except libvirt.libvirtError as exc:
                    guest.teardown()
                    guest = None
                    if "forward" not in str(exc):
                        raise RealVMError(f"could not start the guest domain: {exc}") from exc
                    last = exc  # the port was taken between free_port() and QEMU's bind
                    continue
            finally:
                conn.close()
            guest.wait_for_ssh(BOOT_TIMEOUT - (time.monotonic() - started))
            guest.boot_seconds = time.monotonic() - started
            state = guest.ssh("timeout 120 systemctl is-system-running --wait", timeout=150)
            guest.system_state = state.stdout.strip()
            break
        else:
            raise RealVMError(f"could not start a guest domain: {last}")
        yield guest
    finally:
        if guest is not None:
            guest.teardown()
        for fd, lock in owner_locks:
            lock.unlink(missing_ok=True)
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# pytest


def _require(cmd: str) -> None:
    lab.require(cmd, PACKAGES.get(cmd, cmd))


def require_realvm() -> None:
    """Skip (fail under CI=true) unless root and every component the real guest needs exist."""
    if os.geteuid() != 0:
        msg = "the real-VM guest needs root (libvirt qemu:///system, debootstrap)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    for cmd in ("qemu-system-x86_64", "qemu-img", "libvirtd", "virtlogd", "ssh"):
        _require(cmd)
    if not image_is_cached():
        for cmd in ("debootstrap", "mkfs.ext4", "ssh-keygen"):
            _require(cmd)


@dataclass
class _Shared:
    """The session's one guest. Every test module that imports ``real_guest`` gets its own
    session-scoped instance of the fixture (pytest registers it per module); they all share
    this guest, which goes when the last of them is torn down (at the end of the session)."""

    guest: RealGuest | None = None
    stack: contextlib.ExitStack | None = None
    error: BaseException | None = None
    users: int = 0


_SHARED = _Shared()


def _boot_shared_guest(tmp_path_factory: pytest.TempPathFactory) -> RealGuest:
    if _SHARED.error is not None:
        raise RealVMError(f"the real guest failed to start earlier: {_SHARED.error}")
    if _SHARED.guest is None:
        with contextlib.ExitStack() as stack:
            try:
                image = ensure_image()
                uri = stack.enter_context(running_libvirtd(URI))
                reap_stale_domains(uri)
                workdir = tmp_path_factory.mktemp("realvm")
                _SHARED.guest = stack.enter_context(booted_guest(image, workdir, uri))
            except BaseException as exc:
                _SHARED.error = exc
                raise
            _SHARED.stack = stack.pop_all()
    return _SHARED.guest


@pytest.fixture(scope="session")
def real_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealGuest]:
    """A booted Debian 12 guest for the whole session (see the module docstring)."""
    require_realvm()
    guest = _boot_shared_guest(tmp_path_factory)
    _SHARED.users += 1
    try:
        yield guest
    finally:
        _SHARED.users -= 1
        if _SHARED.users == 0 and _SHARED.stack is not None:
            stack, _SHARED.stack, _SHARED.guest = _SHARED.stack, None, None
            stack.close()


def stored_dump(summary: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The dump a real-guest run stored, checked: its name matches its codec ("auto": zstd
    where the image has it, else gzip, and then the run said why), the codec's own tester
    accepts it. Returns the file and the run folder's manifest."""
    folder = Path(summary["store_folder"])
    dump = folder / summary["dump"]["file"]
    codec = summary["dump"]["compression"]
    assert dump.name == {"gzip": "mysql.sql.gz", "zstd": "mysql.sql.zst"}[codec]
    if codec == "gzip":
        assert any("zstd not found in the guest" in n for n in summary["notes"]), summary
    tester = {"gzip": ["gunzip", "-t"], "zstd": ["zstd", "-q", "-t"]}[codec]
    subprocess.run([*tester, str(dump)], check=True)
    return dump, json.loads((folder / "manifest.json").read_text())

"""Boot verification (snapcoord/verify/boot.py) on the real Debian 12 guest: a throwaway copy of
an internal snapshot's disks boots as a transient domain without network, its services and
MariaDB's own check are read through the guest agent, and nothing of it is left behind; the
real domain, its snapshot tree and its disk files are exactly as before.

* a snapshot taken with MariaDB stopped (as snapcoord's snapshot takes it) passes; the
  transient domain has no ``<interface>`` and no QEMU pass-through, and its QEMU has no network
  device at all (its monitor says so); the real domain's XML, snapshots and files (suspended
  meanwhile, so that nothing else writes them) are unchanged;
* a snapshot taken hypervisor-only while a writer commits to InnoDB and MyISAM tables is
  reported honestly: the result is well-formed and the check ran (what it showed is printed);
* a timeout too short to boot, and a cancelled run (the CLI's ``Interrupted``), tear down;
  a verify killed with SIGKILL leaves no domain (libvirtd's autodestroy).

Boots are few (the guest is emulated, about 30 s each): two full boots, three cut short.
Same guest as the other realvm modules (tests/lab/isolation.py QEMU_MODULES); each test leaves
MariaDB running and deletes its snapshots.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import libvirt
import libvirt_qemu
import pytest

from snapcoord import cancel
from snapcoord.errors import Interrupted
from snapcoord.verify.boot import PREFIX, BootResult, boot_verify
from tests.guest_fixtures import wait_for
from tests.realvm_guest import RealGuest, real_guest  # noqa: F401 - fixture

pytestmark = [pytest.mark.real, pytest.mark.realvm]

QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
SETUP_SQL = """
CREATE DATABASE IF NOT EXISTS bootverify;
USE bootverify;
CREATE TABLE IF NOT EXISTS parent (id INT PRIMARY KEY, name VARCHAR(40)) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS child (id INT AUTO_INCREMENT PRIMARY KEY, parent_id INT NOT NULL,
  payload VARCHAR(200), FOREIGN KEY (parent_id) REFERENCES parent (id)) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS journal (id INT AUTO_INCREMENT PRIMARY KEY, payload VARCHAR(200))
  ENGINE=MyISAM;
INSERT IGNORE INTO parent SELECT seq, CONCAT('p', seq) FROM seq_1_to_10;
INSERT INTO child (parent_id, payload) SELECT 1 + seq % 10, REPEAT('c', 150) FROM seq_1_to_2000;
INSERT INTO journal (payload) SELECT REPEAT('j', 150) FROM seq_1_to_2000;
"""
WRITER_PID = "/run/bootverify-writer.pid"
#: one client fed without pause: commits to InnoDB and MyISAM while the snapshot is taken
WRITER = (
    f"setsid sh -c 'echo $$ > {WRITER_PID}; "
    'while :; do echo "INSERT INTO child (parent_id, payload) VALUES (1, REPEAT(\\"w\\", 150)); '
    'INSERT INTO journal (payload) VALUES (REPEAT(\\"w\\", 150));"; done '
    "| mariadb bootverify' </dev/null >/dev/null 2>&1 &"
)


@pytest.fixture(scope="module")
def conn(real_guest: RealGuest) -> Iterator[libvirt.virConnect]:
    libvirt.registerErrorHandler(lambda *_a: None, None)
    opened = libvirt.open(real_guest.uri)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(scope="module")
def data(real_guest: RealGuest) -> str:
    real_guest.ssh("mariadb", input=SETUP_SQL, check=True)
    real_guest.ssh("sync", check=True)  # the tables' files are on the disk, not only in RAM
    return "bootverify"


@pytest.fixture
def work(conn: libvirt.virConnect, real_guest: RealGuest) -> Iterator[Path]:
    """A verify folder as the CLI makes it (mkdtemp under /var/tmp: QEMU runs outside the test
    sandbox and must reach it); afterwards it is empty and root-only again, and no transient
    domain of this VM is left."""
    folder = Path(tempfile.mkdtemp(prefix="snapcoord-verify.", dir="/var/tmp"))
    try:
        yield folder
        assert sorted(os.listdir(folder)) == []
        info = folder.stat()
        assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o700, 0, 0)
        assert leftover_domains(conn, real_guest.domain) == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def leftover_domains(conn: libvirt.virConnect, vm: str) -> list[str]:
    return [d.name() for d in conn.listAllDomains() if d.name().startswith(f"{PREFIX}{vm}-")]


@pytest.fixture
def snapshots(conn: libvirt.virConnect, real_guest: RealGuest) -> Iterator[list[str]]:
    """Snapshots a test takes (by name), deleted afterwards."""
    names: list[str] = []
    try:
        yield names
    finally:
        dom = conn.lookupByName(real_guest.domain)
        for name in names:
            with contextlib.suppress(libvirt.libvirtError):
                dom.snapshotLookupByName(name).delete()


def take_snapshot(conn: libvirt.virConnect, guest: RealGuest, name: str) -> None:
    """An internal snapshot of the running domain through libvirt (with its RAM)."""
    dom = conn.lookupByName(guest.domain)
    dom.snapshotCreateXML(f"<domainsnapshot><name>{name}</name></domainsnapshot>", 0)


class Watcher(threading.Thread):
    """Waits for the transient domain of ``vm`` and records what libvirt and QEMU say of it;
    then calls ``on_found`` (if any)."""

    def __init__(self, uri: str, vm: str, on_found: Any = None) -> None:
        super().__init__(daemon=True)
        self.uri, self.vm, self.on_found = uri, vm, on_found
        self.seen: dict[str, Any] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        conn = libvirt.open(self.uri)
        try:
            while not self.stop.is_set():
                names = leftover_domains(conn, self.vm)
                if names:
                    self._record(conn.lookupByName(names[0]))
                    if self.on_found is not None:
                        self.on_found()
                    return
                time.sleep(0.1)
        finally:
            conn.close()

    def _record(self, dom: libvirt.virDomain) -> None:
        self.seen["name"] = dom.name()
        self.seen["persistent"] = bool(dom.isPersistent())
        self.seen["xml"] = dom.XMLDesc(0)
        hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        for command in ("info network", "info usernet"):
            try:
                self.seen[command] = str(libvirt_qemu.qemuMonitorCommand(dom, command, hmp))
            except libvirt.libvirtError as exc:
                self.seen[command] = f"error: {exc}"


def vm_state(conn: libvirt.virConnect, guest: RealGuest) -> dict[str, Any]:
    """What must not change: the domain's live and inactive XML, its snapshots (names, XML,
    current), and its files' owner, mode, size and modification time."""
    dom = conn.lookupByName(guest.domain)
    snaps = {n: dom.snapshotLookupByName(n).getXMLDesc(0) for n in dom.snapshotListNames()}
    root = ElementTree.fromstring(dom.XMLDesc(0))
    files = [root.findtext("os/kernel"), root.findtext("os/initrd")]
    files += [s.get("file") for s in root.iter("source") if s.get("file")]
    stats = {}
    for path in files:
        assert path
        info = os.stat(path)
        stats[path] = (info.st_uid, info.st_gid, info.st_mode, info.st_size, info.st_mtime_ns)
    return {
        "xml": dom.XMLDesc(0),
        "inactive": dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
        "snapshots": snaps,
        "current": dom.snapshotCurrent().getName() if dom.hasCurrentSnapshot() else None,
        "files": stats,
    }


def well_formed(result: BootResult, snapshot: str) -> None:
    assert result.snapshot == snapshot
    assert set(result.seconds) == {"copy", "boot", "checks", "teardown"}
    assert all(isinstance(v, float) and v >= 0 for v in result.seconds.values())
    assert result.ok is (result.problem is None)
    assert "the snapshot's memory is not restored: its disks are cold-booted" in result.notes


def report(name: str, result: BootResult) -> None:
    """The figures, for docs/benchmarks.md (printed; pytest -s shows them)."""
    print(f"\nboot verify {name}: " + json.dumps(result.__dict__, default=str))


def test_good_snapshot_boots_and_passes_without_touching_the_vm(
    real_guest: RealGuest,
    conn: libvirt.virConnect,
    data: str,
    work: Path,
    snapshots: list[str],
) -> None:
    g = real_guest
    # as a stop-mode snapshot, plus a sync: the copy boots the disk without the guest's page
    # cache, and a clean shutdown of MariaDB does not fsync MyISAM files
    g.ssh("systemctl stop mariadb.socket mariadb && sync", check=True)
    try:
        snapshots.append("bootverify-good")
        take_snapshot(conn, g, "bootverify-good")
    finally:
        g.ssh("systemctl start mariadb.socket mariadb", check=True)
    dom = conn.lookupByName(g.domain)
    dom.suspend()  # nothing writes the VM's files while the copy is made and boots
    try:
        before = vm_state(conn, g)
        watcher = Watcher(g.uri, g.domain)
        watcher.start()
        result = boot_verify(
            conn,
            g.domain,
            "bootverify-good",
            services=["apache2", "cron"],
            database="mariadb",
            timeout=300,
            work=work,
        )
        watcher.stop.set()
        watcher.join(30)
        after = vm_state(conn, g)
    finally:
        dom.resume()
        g.agent_command({"execute": "guest-set-time", "arguments": {"time": time.time_ns()}})
    report("good", result)
    well_formed(result, "bootverify-good")
    assert result.ok, result.problem
    assert result.services == {"apache2": "active", "cron": "active", "mariadb": "active"}
    assert result.database_check.startswith("mariadb-check --all-databases: ")
    assert "tables OK" in result.database_check and "warning" not in result.database_check
    assert "QEMU pass-through arguments left out" in result.notes
    assert before == after

    # what ran: transient, no interface, no pass-through, an agent channel; no NIC in QEMU
    assert watcher.seen["name"] == result.domain
    assert watcher.seen["persistent"] is False
    xml = ElementTree.fromstring(watcher.seen["xml"])
    assert xml.findall(".//interface") == []
    assert xml.findall(f"{QEMU_NS}commandline") == []
    assert xml.findall("devices/hostdev") == [] and xml.findall("devices/graphics") == []
    channels = [c.find("target") for c in xml.findall("devices/channel")]
    assert [c.get("name") for c in channels if c is not None] == ["org.qemu.guest_agent.0"]
    real = ElementTree.fromstring(before["xml"])
    assert xml.findtext("os/kernel") == real.findtext("os/kernel")
    disk_sources = [s.get("file", "") for s in xml.findall("devices/disk/source")]
    assert len(disk_sources) == 1 and disk_sources[0].startswith(f"{work}/")
    assert "virtio-net" not in watcher.seen["info network"], watcher.seen["info network"]
    assert "user" not in watcher.seen["info network"], watcher.seen["info network"]
    assert "HOST_FORWARD" not in watcher.seen["info usernet"], watcher.seen["info usernet"]


def test_snapshot_taken_while_mariadb_writes_is_reported_honestly(
    real_guest: RealGuest,
    conn: libvirt.virConnect,
    data: str,
    work: Path,
    snapshots: list[str],
) -> None:
    g = real_guest
    count = "mariadb -N -e 'SELECT COUNT(*) FROM bootverify.child'"
    first = int(g.ssh(count, check=True).stdout)
    g.ssh(WRITER, check=True)
    try:
        wait_for(lambda: int(g.ssh(count, check=True).stdout) > first + 50, 60, "the writer")
        snapshots.append("bootverify-hot")
        take_snapshot(conn, g, "bootverify-hot")  # hypervisor only: no stop, no flush
        written = int(g.ssh(count, check=True).stdout)
    finally:
        g.ssh(f'kill -s TERM -- "-$(cat {WRITER_PID})"; rm -f {WRITER_PID}', check=True)
    assert written > first + 50
    result = boot_verify(
        conn,
        g.domain,
        "bootverify-hot",
        services=["apache2", "cron"],
        database="auto",
        timeout=300,
        work=work,
    )
    report("hot", result)
    well_formed(result, "bootverify-hot")
    # whatever it showed: the copy booted and MariaDB's own check ran to a verdict
    assert result.services.get("mariadb") is not None, result
    if result.ok:
        assert result.database_check.startswith("mariadb-check --all-databases: ")
        assert "tables OK" in result.database_check
    elif result.services["mariadb"] == "active":
        assert result.database_check.startswith("failed: mariadb-check --all-databases: ")
        assert result.problem == result.database_check.removeprefix("failed: ")
    else:  # MariaDB did not come up from what the disk held
        assert result.problem is not None and result.problem.startswith("after boot: ")
        assert f"mariadb is {result.services['mariadb']}" in result.problem


def test_timeout_tears_down(
    real_guest: RealGuest, conn: libvirt.virConnect, work: Path, snapshots: list[str]
) -> None:
    snapshots.append("bootverify-timeout")
    take_snapshot(conn, real_guest, "bootverify-timeout")
    watcher = Watcher(real_guest.uri, real_guest.domain)
    watcher.start()
    result = boot_verify(
        conn,
        real_guest.domain,
        "bootverify-timeout",
        services=["cron"],
        database="mariadb",
        timeout=6,  # an emulated boot takes far longer
        work=work,
    )
    watcher.stop.set()
    watcher.join(30)
    report("timeout", result)
    well_formed(result, "bootverify-timeout")
    assert not result.ok
    assert result.problem is not None and "timed out after 6 s" in result.problem
    assert result.database_check == "not run"
    assert watcher.seen.get("name") in (None, result.domain)


def test_cancel_tears_down(
    real_guest: RealGuest, conn: libvirt.virConnect, work: Path, snapshots: list[str]
) -> None:
    """SIGTERM in a run reaches a verify as the CLI's Interrupted (cancel.request, raised at
    the verify's next wait): the domain is destroyed and the copy removed all the same."""
    snapshots.append("bootverify-cancel")
    take_snapshot(conn, real_guest, "bootverify-cancel")
    watcher = Watcher(real_guest.uri, real_guest.domain, on_found=lambda: cancel.request("SIGTERM"))
    watcher.start()
    try:
        with cancel.interruptible(), pytest.raises(Interrupted):
            boot_verify(
                conn,
                real_guest.domain,
                "bootverify-cancel",
                services=["cron"],
                database="mariadb",
                timeout=300,
                work=work,
            )
    finally:
        cancel.reset()
        watcher.stop.set()
        watcher.join(30)
    assert watcher.seen["persistent"] is False


def test_sigkill_of_the_verify_leaves_no_domain(
    real_guest: RealGuest, conn: libvirt.virConnect, snapshots: list[str]
) -> None:
    """A verify killed with SIGKILL cannot tear down: libvirtd destroys the transient domain
    when the dead process's connection closes (AUTODESTROY). Its copy stays in its folder
    (``snapcoord-verify.<pid>.<random>``), for the next verify's removal of dead runs' folders."""
    snapshots.append("bootverify-kill")
    take_snapshot(conn, real_guest, "bootverify-kill")
    folder = Path(tempfile.mkdtemp(prefix="snapcoord-verify.", dir="/var/tmp"))
    code = (
        "import sys, libvirt; from pathlib import Path; "
        "from snapcoord.verify.boot import boot_verify; "
        "boot_verify(libvirt.open(sys.argv[1]), sys.argv[2], sys.argv[3], services=[], "
        "database='none', timeout=300, work=Path(sys.argv[4]))"
    )
    argv = [sys.executable, "-I", "-c", code, real_guest.uri, real_guest.domain]
    child = subprocess.Popen([*argv, "bootverify-kill", str(folder)], cwd="/")
    watcher = Watcher(real_guest.uri, real_guest.domain, on_found=lambda: child.kill())
    watcher.start()
    try:
        assert child.wait(120) == -signal.SIGKILL
        watcher.join(30)
        assert watcher.seen["persistent"] is False
        wait_for(lambda: leftover_domains(conn, real_guest.domain) == [], 60, "the autodestroy")
        name = watcher.seen["name"]
        assert sorted(os.listdir(folder)) == [f"{name}.console.log", f"{name}.vda.qcow2"]
    finally:
        if child.poll() is None:
            child.kill()
        watcher.stop.set()
        shutil.rmtree(folder, ignore_errors=True)

"""Boot verification without a real guest (snapcoord/verify/boot.py, boot_domain.py,
boot_checks.py): what it refuses, on libvirt's test driver with snapshots libvirt itself
records; the whole path up to the guest agent on the test driver, with a real qcow2 and its
internal snapshot copied by the real qemu-img (the test driver has no agent: the result says
so, and the transient domain and the copy are gone); the transient domain's XML built from a
domain with every kind of device that reaches outside it; mariadb-check's output as read.

The boot itself and the checks inside a guest: tests/test_realvm_boot_verify.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import libvirt
import pytest

from snapcoord.agent_link import ExecStatus
from snapcoord.errors import SnapshotNotFound, VerifyUnavailable, VMNotFound
from snapcoord.verify.boot import PREFIX, _Copy, boot_verify
from snapcoord.verify.boot_checks import BootProblem, GuestChecks, _problems, _summary
from snapcoord.verify.boot_domain import DiskCopy, DiskState, Layer, read_snapshot, transient_xml
from tests import lab
from tests.libvirt_nodes import DomainSpec, write_node
from tests.qga_fixture import LabAgent, start_agent


@pytest.fixture
def qemu_img() -> str:
    return lab.require("qemu-img", "qemu-utils")


@pytest.fixture(autouse=True)
def quiet_libvirt() -> None:
    libvirt.registerErrorHandler(lambda *_a: None, None)


@pytest.fixture
def work() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="snapcoord-verify.", dir="/var/tmp"))
    try:
        yield folder
        assert os.listdir(folder) == []
        assert folder.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def disk(kind: str = "file", fmt: str = "qcow2", source: str = "", target: str = "vda") -> str:
    return (
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'/>{source}"
        f"<target dev='{target}' bus='virtio'/></disk>"
    )


def node(tmp_path: Path, devices: str) -> libvirt.virConnect:
    """A test-driver node with domain ``vm1`` (those devices) and a snapshot ``s1`` of it."""
    uri = write_node(
        tmp_path / "node",
        (DomainSpec("vm1", "5e6ab1d2-0000-4000-8000-0000000000a1", devices=devices),),
    )
    conn = libvirt.open(uri)
    conn.lookupByName("vm1").snapshotCreateXML(
        "<domainsnapshot><name>s1</name></domainsnapshot>", 0
    )
    return conn


def verify(conn: libvirt.virConnect, work: Path, vm: str = "vm1", snapshot: str = "s1") -> object:
    return boot_verify(
        conn, vm, snapshot, services=["cron"], database="mariadb", timeout=60, work=work
    )


def test_unknown_vm_and_snapshot(tmp_path: Path, work: Path) -> None:
    conn = node(tmp_path, disk(source="<source file='/var/lib/x.qcow2'/>"))
    with pytest.raises(VMNotFound, match="no domain named 'nosuch'"):
        verify(conn, work, vm="nosuch")
    with pytest.raises(SnapshotNotFound, match="no snapshot 'nosuch'") as caught:
        verify(conn, work, snapshot="nosuch")
    assert caught.value.vm == "vm1" and "snapshot-list vm1" in str(caught.value.hint)


@pytest.mark.parametrize(
    ("devices", "refusal"),
    [
        (
            disk("network", "raw", "<source protocol='rbd' name='pool/img'>"
                 "<host name='10.0.0.1'/></source>"),
            "disk vda is a network disk (rbd), not a file",
        ),
        (disk("block", "raw", "<source dev='/dev/vg0/vm1'/>"), "disk vda is a block disk"),
        (disk(fmt="raw", source="<source file='/var/lib/vm1.img'/>"), "disk vda is raw, not qcow2"),
        ("", "the snapshot's domain has no disk to boot from"),
        (
            disk(source="<source file='/var/lib/vm1.qcow2'/>")[:-7] + "<shareable/></disk>",
            "disk vda is shareable",
        ),
    ],
)  # fmt: skip
def test_refuses_what_it_cannot_copy_in_one_line(
    tmp_path: Path, work: Path, devices: str, refusal: str
) -> None:
    conn = node(tmp_path, devices)
    with pytest.raises(VerifyUnavailable) as caught:
        verify(conn, work)
    line = str(caught.value)
    assert line.startswith(f"vm1: cannot boot-verify snapshot 's1': {refusal}"), line
    assert "\n" not in line
    assert [d.name() for d in conn.listAllDomains()] == ["vm1"]


def test_missing_disk_file_is_unavailable_and_leaves_nothing(
    tmp_path: Path, work: Path, qemu_img: str
) -> None:
    conn = node(tmp_path, disk(source=f"<source file='{tmp_path}/gone.qcow2'/>"))
    with pytest.raises(VerifyUnavailable, match=f"reading {tmp_path}/gone.qcow2 failed: "):
        verify(conn, work)


def test_whole_path_on_the_test_driver(tmp_path: Path, work: Path, qemu_img: str) -> None:
    """A real qcow2 with a backing file and an internal snapshot (qemu-img): the copy is made
    (thin: backed by the same base), the transient domain starts on the test driver without the
    VM's interface, no agent answers there (the verdict says so at the timeout), and teardown
    removes the domain and the copy; the VM's image and its snapshot table are unchanged."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)],
        check=True,
    )
    subprocess.run([qemu_img, "snapshot", "-c", "s1", str(top)], check=True)
    before = (top.stat().st_mtime_ns, top.stat().st_size, base.stat().st_mtime_ns)
    conn = node(
        tmp_path,
        disk(source=f"<source file='{top}'/>")
        + "<interface type='network'><source network='default'/></interface>",
    )
    seen: dict[str, str] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for dom in conn.listAllDomains():
                if dom.name().startswith(f"{PREFIX}vm1-") and "xml" not in seen:
                    seen["xml"] = dom.XMLDesc(0)
                    seen["copy"] = ",".join(sorted(os.listdir(work)))
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = boot_verify(
            conn, "vm1", "s1", services=["cron"], database="mariadb", timeout=5, work=work
        )
    finally:
        stop.set()
        watcher.join(10)
    assert not result.ok
    assert result.problem == (
        "timed out after 5 s waiting for the guest agent to answer (does the guest run "
        "qemu-guest-agent?)"
    )
    assert result.database_check == "not run"
    assert result.seconds["copy"] > 0 and result.seconds["teardown"] >= 0
    assert [d.name() for d in conn.listAllDomains()] == ["vm1"]
    assert (top.stat().st_mtime_ns, top.stat().st_size, base.stat().st_mtime_ns) == before
    assert (
        "s1"
        in subprocess.run(
            [qemu_img, "snapshot", "-l", str(top)], capture_output=True, text=True, check=True
        ).stdout
    )
    assert "1 network interface left out" in result.notes
    if seen:  # the test driver "boots" at once: the watcher may or may not see it
        xml = ElementTree.fromstring(seen["xml"])
        assert xml.findall(".//interface") == []
        (source,) = xml.findall("devices/disk/source")
        assert source.get("file") == f"{work}/{result.domain}.vda.qcow2"
        assert seen["copy"] == f"{result.domain}.vda.qcow2"


DOMAIN = """<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>shop</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
  <genid>aaaaaaaa-2222-3333-4444-555555555555</genid>
  <metadata><x:owner xmlns:x='urn:x'/></metadata>
  <memory unit='KiB'>1048576</memory><vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/boot/vmlinuz</kernel>
    <initrd>/boot/initrd</initrd><cmdline>root=/dev/vda rw console=ttyS0</cmdline>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/shop_VARS.fd</nvram></os>
  <on_poweroff>restart</on_poweroff>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/shop.qcow2' index='1'/>
      <target dev='vda' bus='virtio'/><serial>SHOP-ROOT</serial><alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/></disk>
    <disk type='file' device='cdrom'><source file='/srv/iso/debian.iso'/>
      <target dev='sda' bus='sata'/><readonly/></disk>
    <controller type='usb' index='0'/>
    <interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>
    <interface type='network'><source network='default'/></interface>
    <hostdev mode='subsystem' type='pci'><source><address bus='0x03'/></source></hostdev>
    <filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>
    <graphics type='vnc' port='5901' listen='0.0.0.0' passwd='secret'/>
    <video><model type='vga'/></video>
    <serial type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/>
      <target port='0'/></serial>
    <console type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/>
      <target type='serial' port='0'/></console>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <channel type='unix'><source mode='bind' path='/run/shop-ga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>
    <input type='tablet' bus='usb'/>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <vsock model='virtio'><cid auto='no' address='3'/></vsock>
    <rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='10.0.0.9'
      service='1234'/></backend></rng>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='virtio'/>
  </devices>
  <qemu:commandline><qemu:arg value='-netdev'/><qemu:arg value='user,id=n0'/></qemu:commandline>
</domain>"""


def snapshot_of(domain: str, disks: str, memory: str = "internal") -> str:
    return (
        f"<domainsnapshot><name>nightly</name><memory snapshot='{memory}'/>"
        f"<disks>{disks}</disks>{domain}</domainsnapshot>"
    )


def test_transient_domain_reaches_nothing_outside(tmp_path: Path) -> None:
    snap = read_snapshot(
        snapshot_of(DOMAIN, "<disk name='vda' snapshot='internal'/>"), vm="shop", snapshot="nightly"
    )
    assert [(d.target, d.path, d.format, d.internal_snapshot) for d in snap.disks] == [
        ("vda", "/var/lib/libvirt/images/shop.qcow2", "qcow2", "nightly")
    ]
    assert snap.memory and snap.notes == ("cdrom sda left out",)
    copy_path = tmp_path / "copy.qcow2"
    made = DiskCopy("vda", copy_path, (Layer("/srv/base.qcow2", "qcow2"),))
    xml, notes = transient_xml(
        snap,
        name="snapcoord-verify-shop-1234abcd",
        copies={"vda": made},
        label="+64055:+64055",
        serial_log=tmp_path / "console.log",
        nvram=tmp_path / "nvram",
    )
    dom = ElementTree.fromstring(xml)
    assert dom.get("id") is None and dom.get("type") == "kvm"
    assert dom.findtext("name") == "snapcoord-verify-shop-1234abcd"
    for gone in ("uuid", "genid", "metadata"):
        assert dom.find(gone) is None, gone
    assert dom.findall("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") == []
    assert dom.findtext("on_poweroff") == "destroy"
    # the same kernel boot; UEFI variables from a copy (never the VM's own file)
    assert dom.findtext("os/kernel") == "/boot/vmlinuz"
    assert dom.findtext("os/cmdline") == "root=/dev/vda rw console=ttyS0"
    assert dom.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE.fd"
    assert dom.findtext("os/nvram") == str(tmp_path / "nvram")
    devices = dom.find("devices")
    assert devices is not None
    tags = sorted(child.tag for child in devices)
    assert tags == sorted(
        ["emulator", "disk", "controller", "video", "serial", "console", "channel", "input",
         "rng", "memballoon"]
    )  # fmt: skip
    (disk_el,) = devices.findall("disk")
    assert disk_el.find("source").get("file") == str(copy_path)  # type: ignore[union-attr]
    assert disk_el.find("driver").attrib == {"name": "qemu", "type": "qcow2"}  # type: ignore[union-attr]
    backing = disk_el.find("backingStore")
    assert backing is not None and backing.find("source").get("file") == "/srv/base.qcow2"  # type: ignore[union-attr]
    assert backing.find("backingStore") is not None  # the chain ends there
    assert disk_el.findtext("serial") == "SHOP-ROOT" and disk_el.find("alias") is None
    for port in devices.findall("serial") + devices.findall("console"):
        assert port.get("type") == "pty" and port.find("source") is None
        assert port.find("log").get("file") == str(tmp_path / "console.log")  # type: ignore[union-attr]
    (channel,) = devices.findall("channel")
    assert channel.get("type") == "unix" and channel.find("source") is None
    assert channel.find("target").attrib == {"type": "virtio", "name": "org.qemu.guest_agent.0"}  # type: ignore[union-attr]
    assert [i.get("type") for i in devices.findall("input")] == ["tablet"]
    assert [r.find("backend").get("model") for r in devices.findall("rng")] == ["random"]  # type: ignore[union-attr]
    (label,) = dom.findall("seclabel")
    assert label.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert label.findtext("label") == "+64055:+64055"
    assert "secret" not in xml
    assert sorted(notes) == sorted(
        ["cdrom sda left out", "QEMU pass-through arguments left out",
         "2 network interfaces left out", "1 host device left out", "1 shared folder left out",
         "1 graphics left out", "1 TPM left out", "1 vsock left out"]
    )  # fmt: skip


def test_external_snapshot_reads_the_file_before_it() -> None:
    snap = read_snapshot(
        snapshot_of(
            DOMAIN,
            "<disk name='vda' snapshot='external' type='file'><driver type='qcow2'/>"
            "<source file='/var/lib/libvirt/images/shop.nightly'/></disk>",
            memory="no",
        ),
        vm="shop",
        snapshot="nightly",
    )
    (only,) = snap.disks
    assert (only.path, only.internal_snapshot) == ("/var/lib/libvirt/images/shop.qcow2", None)
    assert not snap.memory


def test_a_disk_left_out_of_the_snapshot_is_refused() -> None:
    with pytest.raises(
        VerifyUnavailable, match=r"disk vda is not in the snapshot \(snapshot='no'\)"
    ):
        read_snapshot(
            snapshot_of(DOMAIN, "<disk name='vda' snapshot='no'/>", memory="no"),
            vm="shop",
            snapshot="nightly",
        )


def test_mariadb_check_output_as_read() -> None:
    """mariadb-check prints ``table  OK`` or the table then ``error    : text`` lines (the
    guest script counts the OK lines and passes the rest)."""
    out = (
        b"ok 57\n"
        b"bootverify.journal\n"
        b"warning  : 1 client is using or hasn't closed the table properly\n"
        b"status   : OK\n"
        b"mysql.general_log\n"
        b"note     : The storage engine for the table doesn't support check\n"
        b"shop.orders\n"
        b"error    : Table './shop/orders' is marked as crashed and should be repaired\n"
    )
    ok, rest = _summary(ExecStatus(exited=True, exitcode=2, stdout=out))
    assert ok == 57
    assert _problems(rest, "error") == [
        "shop.orders: Table './shop/orders' is marked as crashed and should be repaired"
    ]
    assert _problems(rest, "warning") == [
        "bootverify.journal: 1 client is using or hasn't closed the table properly"
    ]


# -- the database checks, through a real qemu-ga against the lab guest's real servers ----------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[LabAgent]:
    lab.require("qemu-ga", "qemu-guest-agent")
    running = start_agent(tmp_path / "qga")
    yield running
    running.stop()


def checks_through(agent: LabAgent) -> GuestChecks:
    return GuestChecks(
        agent.link("lab"), deadline=time.monotonic() + 120, timeout=120, running=lambda: True
    )


def mariadb(sql: str) -> str:
    done = subprocess.run(
        ["mariadb", "-N", "-e", sql], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_mariadb_check_passes_and_names_a_broken_table(idoit_db: object, agent: LabAgent) -> None:
    """mariadb-check --all-databases in the guest (here: the lab guest's MariaDB with the
    i-doit-like data) passes; a MyISAM table whose index file was overwritten fails it, by name."""
    checks = checks_through(agent)
    summary = checks.database("mariadb")
    assert re.fullmatch(r"mariadb-check --all-databases: \d+ tables OK", summary), summary
    assert int(summary.split()[2]) >= 20  # the i-doit-like tables and MariaDB's own
    mariadb(
        "CREATE DATABASE bootcheck; USE bootcheck; CREATE TABLE notes (id INT PRIMARY KEY, "
        "v VARCHAR(40)) ENGINE=MyISAM; INSERT INTO notes SELECT seq, 'x' "
        "FROM seq_1_to_500; FLUSH TABLES"
    )
    try:
        datadir = mariadb("SELECT @@datadir").strip()
        index = Path(datadir) / "bootcheck" / "notes.MYI"
        with open(index, "r+b") as handle:  # the key file's header and root, zeroed
            handle.seek(0)
            handle.write(b"\0" * 4096)
        mariadb("FLUSH TABLES")
        with pytest.raises(BootProblem) as caught:
            checks.database("mariadb")
        line = str(caught.value)
        assert line.startswith("mariadb-check --all-databases: bootcheck.notes: "), line
    finally:
        mariadb("DROP DATABASE IF EXISTS bootcheck")


def test_postgresql_check_queries_every_database(pg_shop: object, agent: LabAgent) -> None:
    summary = checks_through(agent).database("postgresql")
    listed = subprocess.run(
        ["runuser", "-u", "postgres", "--", "psql", "-XAtc",
         "SELECT count(*) FROM pg_database WHERE datallowconn"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    assert summary == f"PostgreSQL: {listed} databases answered a query"
    assert int(listed) >= 3  # postgres, template1 and the shop's


def image_info(qemu_img: str, path: Path) -> dict[str, object]:
    done = subprocess.run(
        [qemu_img, "info", "-U", "--output=json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    info: dict[str, object] = json.loads(done.stdout)
    return info


@pytest.mark.parametrize("readable", [True, False])
def test_external_snapshot_copy(
    request: pytest.FixtureRequest, work: Path, qemu_img: str, readable: bool
) -> None:
    """An external snapshot's state is the file before it: the copy is an empty overlay on it
    when QEMU's user can read it, else a full copy (QEMU's user here: nobody, and the file sits
    in a root-only folder in the second case). Work's group and mode come back afterwards."""
    images = Path(tempfile.mkdtemp(prefix="snapcoord-test-images.", dir="/var/tmp"))
    images.chmod(0o755 if readable else 0o700)  # /var/tmp: open to all above it
    request.addfinalizer(lambda: shutil.rmtree(images))
    before = images / "shop.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(before), "32M"], check=True)
    before.chmod(0o644)
    copy = _Copy(work, "snapcoord-verify-shop-00000000", (65534, 65534), vm="shop")
    copy.open()
    try:
        assert (work.stat().st_mode & 0o777, work.stat().st_gid) == (0o710, 65534)
        made = copy.disk(
            DiskState("vda", str(before), "qcow2", internal_snapshot=None),
            deadline=time.monotonic() + 60,
        )
        info = image_info(qemu_img, made.path)
        assert made.path == work / "snapcoord-verify-shop-00000000.vda.qcow2"
        assert (made.path.stat().st_uid, made.path.stat().st_mode & 0o777) == (65534, 0o600)
        assert info["virtual-size"] == 32 << 20
        if readable:
            assert info["backing-filename"] == str(before)
            assert made.backing == (Layer(str(before), "qcow2", 32 << 20),)
        else:
            assert "backing-filename" not in info and made.backing == ()
    finally:
        assert copy.remove() == []
    assert os.listdir(work) == []
    assert (work.stat().st_mode & 0o777, work.stat().st_gid) == (0o700, 0)

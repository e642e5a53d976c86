"""The libvirt adapter against a real libvirtd + QEMU (``qemu:///system``).

Needs ``libvirt-daemon-system qemu-system-x86 qemu-utils`` (apt) and root. If libvirtd is not
running, the module starts ``virtlogd`` and ``libvirtd`` in the foreground and stops them (by
PID) afterwards. The domains have no OS: firmware spins, which is enough to snapshot RAM and
disks. Disk images go to /var/lib/libvirt/images (QEMU runs as libvirt-qemu and cannot enter
pytest's private tmp dirs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from snapcoord.adapters.base import VM, PowerState
from snapcoord.adapters.libvirt_adapter import LibvirtAdapter
from snapcoord.errors import UnsupportedOperation
from snapcoord.settings import LibvirtSettings
from tests.libvirtd import URI, running_libvirtd

IMAGES = Path("/var/lib/libvirt/images")
NEEDED = ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img")

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        any(shutil.which(b) is None for b in NEEDED) or os.geteuid() != 0,
        reason="needs root and apt: libvirt-daemon-system qemu-system-x86 qemu-utils",
    ),
]


MakeDomain = Callable[..., str]


@pytest.fixture(scope="module")
def qemu_uri() -> Iterator[str]:
    with running_libvirtd(URI) as uri:
        yield uri


def _domain_xml(name: str, disk: Path, fmt: str) -> str:
    return f"""<domain type='{"kvm" if os.path.exists("/dev/kvm") else "qemu"}'>
  <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"""


@pytest.fixture
def make_domain(qemu_uri: str) -> Iterator[MakeDomain]:
    conn = libvirt.open(qemu_uri)
    made: list[tuple[libvirt.virDomain, Path]] = []

    def make(fmt: str = "qcow2") -> str:
        name = f"snapcoord-test-{uuid.uuid4().hex[:8]}"
        disk = IMAGES / f"{name}.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(disk), "64M"], check=True)
        dom = conn.defineXML(_domain_xml(name, disk, fmt))
        made.append((dom, disk))
        dom.create()
        return name

    yield make
    for dom, disk in made:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        disk.unlink(missing_ok=True)
    conn.close()


@pytest.fixture
def adapter(qemu_uri: str) -> Iterator[LibvirtAdapter]:
    with LibvirtAdapter("kvm", LibvirtSettings("libvirt", qemu_uri)) as opened:
        assert isinstance(opened, LibvirtAdapter)
        yield opened


def _stop(adapter: LibvirtAdapter, vm: VM) -> None:
    adapter.conn.lookupByUUIDString(vm.id).destroy()


def test_snapshot_revert_delete_on_qemu(adapter: LibvirtAdapter, make_domain: MakeDomain) -> None:
    vm = adapter.find_vm(make_domain())
    caps = adapter.capabilities()
    assert caps.extra["driver"] == "QEMU"
    assert caps.quiesce is False
    adapter.check_snapshot_ready(vm, memory=False, quiesce=False)

    live = adapter.create_snapshot(
        vm, "live", "snapcoord: a", memory=False, quiesce=False, timeout=120
    )
    assert live.memory is True  # a running domain's internal snapshot always holds RAM
    assert live.extra["disk_modes"] == ["internal"]
    _stop(adapter, vm)
    cold = adapter.create_snapshot(
        vm, "cold", "snapcoord: b", memory=True, quiesce=False, timeout=120
    )
    assert cold.memory is False
    assert [s.name for s in adapter.list_snapshots(vm)] == ["live", "cold"]

    # shut off + RAM snapshot + start=None: stays shut off
    adapter.revert_snapshot(vm, live, start=None, timeout=120)
    assert adapter.power_state(vm) is PowerState.STOPPED
    # start=True on a disk-only snapshot boots it
    adapter.revert_snapshot(vm, cold, start=True, timeout=120)
    assert adapter.power_state(vm) is PowerState.RUNNING
    # running + RAM snapshot + start=None: running
    adapter.revert_snapshot(vm, live, start=None, timeout=120)
    assert adapter.power_state(vm) is PowerState.RUNNING
    # start=False on a RAM snapshot: paused
    adapter.revert_snapshot(vm, live, start=False, timeout=120)
    assert adapter.power_state(vm) is PowerState.PAUSED
    assert [s.current for s in adapter.list_snapshots(vm)] == [True, False]

    adapter.delete_snapshot(vm, live, timeout=120)
    adapter.delete_snapshot(vm, cold, timeout=120)
    assert adapter.list_snapshots(vm) == []


def test_quiesce_is_refused_on_qemu(adapter: LibvirtAdapter, make_domain: MakeDomain) -> None:
    vm = adapter.find_vm(make_domain())
    with pytest.raises(UnsupportedOperation, match="quiesce = false"):
        adapter.check_snapshot_ready(vm, memory=True, quiesce=True)
    with pytest.raises(UnsupportedOperation):
        adapter.create_snapshot(vm, "q", "", memory=True, quiesce=True, timeout=120)
    assert adapter.list_snapshots(vm) == []


def test_raw_disk_is_refused_in_preflight(adapter: LibvirtAdapter, make_domain: MakeDomain) -> None:
    vm = adapter.find_vm(make_domain("raw"))
    with pytest.raises(UnsupportedOperation, match=r"vda \(raw\)"):
        adapter.check_snapshot_ready(vm, memory=True, quiesce=False)
    # and libvirt itself refuses it too, mapped to a snapcoord error naming the VM
    with pytest.raises(UnsupportedOperation) as info:
        adapter.create_snapshot(vm, "r", "", memory=True, quiesce=False, timeout=120)
    assert info.value.vm == vm.name

"""The vSphere adapter against the real govmomi simulator (real SOAP, real pyVmomi, real TLS)."""

from __future__ import annotations

import logging
import ssl
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import SmartConnect
from pyVmomi import vim

from snapcoord.adapters import open_adapter
from snapcoord.adapters.base import MARKER, VM, PowerState, Snapshot
from snapcoord.adapters.vsphere import VSphereAdapter, snapshot_warnings
from snapcoord.errors import (
    HypervisorError,
    SnapshotFailed,
    SnapshotNotFound,
    TaskTimeout,
    UnsupportedOperation,
    VMNotFound,
)
from snapcoord.secrets import Secret
from tests.vcsim_fixture import (  # noqa: F401 - fixtures
    CLUSTER_VM,
    FAIL_VM,
    HANG_VM,
    HOST_VM,
    VCSim,
    vcsim,
    vcsim_binary,
    vcsim_factory,
)

pytestmark = pytest.mark.real


def direct_client(sim: VCSim) -> Any:
    """A second, independent pyVmomi session (to change the simulator behind the adapter)."""
    ctx = ssl.create_default_context(cafile=str(sim.cert_file))
    ctx.set_ciphers("DEFAULT@SECLEVEL=1")
    connect: Any = SmartConnect
    return connect(host=sim.host, port=sim.port, user=sim.user, pwd=sim.password, sslContext=ctx)


@pytest.fixture
def adapter(vcsim: VCSim) -> Iterator[VSphereAdapter]:
    with VSphereAdapter("lab", vcsim.settings()) as opened:
        yield opened


@pytest.fixture
def vm(adapter: VSphereAdapter) -> VM:
    return adapter.find_vm(CLUSTER_VM)


# -- finding VMs ----------------------------------------------------------------------------


def test_registry_opens_the_vsphere_adapter(vcsim: VCSim) -> None:
    with open_adapter("lab", vcsim.settings()) as opened:
        assert isinstance(opened, VSphereAdapter)
        assert opened.find_vm(HOST_VM).name == HOST_VM


def test_find_by_name_path_uuid_and_moref_agree(adapter: VSphereAdapter) -> None:
    by_name = adapter.find_vm(HOST_VM)
    assert by_name.hypervisor == "lab"
    assert by_name.id.startswith("vm-")
    assert by_name.extra["moref"] == by_name.id
    uuid = by_name.extra["instance_uuid"]
    assert uuid
    for ref in (f"DC0/vm/{HOST_VM}", f"moref:{by_name.id}", f"uuid:{uuid}"):
        assert adapter.find_vm(ref) == by_name, ref


def test_find_by_bios_uuid(vcsim: VCSim, adapter: VSphereAdapter) -> None:
    si = direct_client(vcsim)
    found = si.content.searchIndex.FindByInventoryPath(f"DC0/vm/{HOST_VM}")
    bios_uuid = found.config.uuid
    assert adapter.find_vm(f"uuid:{bios_uuid}").id == found._moId


@pytest.mark.parametrize(
    "ref", ["no-such-vm", "DC0/vm/no-such-vm", "moref:vm-99999", "uuid:00000000-0000-0000-0000-0"]
)
def test_unknown_vm_is_vm_not_found(adapter: VSphereAdapter, ref: str) -> None:
    with pytest.raises(VMNotFound) as err:
        adapter.find_vm(ref)
    assert err.value.vm == ref
    assert err.value.exit_code == 3


def rename(sim: VCSim, path: str, new_name: str) -> None:
    si = direct_client(sim)
    target = si.content.searchIndex.FindByInventoryPath(path)
    task = target.Rename_Task(new_name)
    assert task.info.state == "success"


def test_ambiguous_name_lists_every_match_and_scoping_resolves_it(
    vcsim_factory: Callable[..., VCSim],
) -> None:
    sim = vcsim_factory(datacenters=2)
    rename(sim, "DC1/vm/DC1_H0_VM0", HOST_VM)
    with VSphereAdapter("lab", sim.settings()) as opened:
        with pytest.raises(HypervisorError) as err:
            opened.find_vm(HOST_VM)
        text = str(err.value)
        assert "matches 2 VMs" in text
        assert f"DC0/vm/{HOST_VM}" in text and f"DC1/vm/{HOST_VM}" in text
        assert "moref:vm-" in text
        first = opened.find_vm(f"DC0/vm/{HOST_VM}")
        second = opened.find_vm(f"DC1/vm/{HOST_VM}")
        assert first.id != second.id
    with VSphereAdapter("lab", sim.settings(datacenter="DC1")) as scoped:
        assert scoped.find_vm(HOST_VM).id == second.id
    with VSphereAdapter("lab", sim.settings(folder="DC0/vm")) as scoped:
        assert scoped.find_vm(HOST_VM).id == first.id
    si = direct_client(sim)
    prod = si.content.searchIndex.FindByInventoryPath("DC1/vm").CreateFolder("prod")
    task = prod.MoveIntoFolder_Task(
        [si.content.searchIndex.FindByInventoryPath(f"DC1/vm/{HOST_VM}")]
    )
    assert task.info.state == "success"
    with VSphereAdapter("lab", sim.settings(datacenter="DC1", folder="prod")) as scoped:
        assert scoped.find_vm(HOST_VM).id == second.id
    with VSphereAdapter("lab", sim.settings(folder="DC1/vm/prod")) as scoped:
        assert scoped.find_vm(HOST_VM).id == second.id
        with pytest.raises(VMNotFound, match="in DC1/vm/prod"):
            scoped.find_vm("DC1_H0_VM1")
    with (
        VSphereAdapter("lab", sim.settings(datacenter="DC9")) as scoped,
        pytest.raises(HypervisorError, match="datacenter 'DC9' not found"),
    ):
        scoped.find_vm(HOST_VM)


# -- snapshots ------------------------------------------------------------------------------


def test_create_list_revert_delete(adapter: VSphereAdapter, vm: VM) -> None:
    assert adapter.list_snapshots(vm) == []
    before = datetime.now(UTC)
    first = adapter.create_snapshot(
        vm, "snap-1", f"{MARKER} first", memory=False, quiesce=False, timeout=30
    )
    assert first.name == "snap-1"
    assert first.id.startswith("snapshot-")
    assert first.is_snapcoord
    assert first.current and first.parent is None
    assert first.created is not None and first.created.tzinfo is not None
    assert first.created.utcoffset() == timedelta(0)
    assert (
        before - timedelta(seconds=5) <= first.created <= datetime.now(UTC) + timedelta(seconds=5)
    )

    second = adapter.create_snapshot(vm, "snap-2", "manual", memory=True, quiesce=False, timeout=30)
    listed = adapter.list_snapshots(vm)
    assert [s.name for s in listed] == ["snap-1", "snap-2"]
    assert [s.current for s in listed] == [False, True]
    assert listed[1].parent == "snap-1"
    assert listed[1].description == "manual" and not listed[1].is_snapcoord
    assert listed[0].extra["moref"] == first.id
    assert adapter.find_snapshot(vm, "snap-2").id == second.id

    adapter.revert_snapshot(vm, first, start=None, timeout=30)
    assert [s.current for s in adapter.list_snapshots(vm)] == [True, False]
    assert adapter.power_state(vm) is PowerState.RUNNING

    adapter.delete_snapshot(vm, second, timeout=30)
    assert [s.name for s in adapter.list_snapshots(vm)] == ["snap-1"]
    adapter.delete_snapshot(vm, first, timeout=30)
    assert adapter.list_snapshots(vm) == []


def test_quiesced_flag_is_listed(adapter: VSphereAdapter, vm: VM) -> None:
    snap = adapter.create_snapshot(vm, "q", "d", memory=False, quiesce=True, timeout=30)
    assert snap.quiesced
    assert adapter.list_snapshots(vm)[0].quiesced


def test_revert_applies_the_requested_power_state(adapter: VSphereAdapter, vm: VM) -> None:
    snap = adapter.create_snapshot(vm, "p", "d", memory=False, quiesce=False, timeout=30)
    adapter.revert_snapshot(vm, snap, start=False, timeout=30)
    assert adapter.power_state(vm) is PowerState.STOPPED
    adapter.revert_snapshot(vm, snap, start=None, timeout=30)  # was stopped: stays stopped
    assert adapter.power_state(vm) is PowerState.STOPPED
    adapter.revert_snapshot(vm, snap, start=True, timeout=30)
    assert adapter.power_state(vm) is PowerState.RUNNING


def test_missing_snapshot_is_snapshot_not_found(adapter: VSphereAdapter, vm: VM) -> None:
    ghost = Snapshot(name="ghost", id="snapshot-99999", created=None)
    with pytest.raises(SnapshotNotFound) as err:
        adapter.revert_snapshot(vm, ghost, start=None, timeout=30)
    assert err.value.vm == vm.name
    with pytest.raises(SnapshotNotFound):
        adapter.delete_snapshot(vm, ghost, timeout=30)
    with pytest.raises(SnapshotNotFound):
        adapter.find_snapshot(vm, "ghost")


def test_failing_task_with_quiesce_is_application_quiesce_fault(adapter: VSphereAdapter) -> None:
    failing = adapter.find_vm(FAIL_VM)
    with pytest.raises(SnapshotFailed) as err:
        adapter.create_snapshot(failing, "x", "d", memory=False, quiesce=True, timeout=30)
    assert err.value.vm == FAIL_VM
    assert err.value.exit_code == 5
    assert "ApplicationQuiesceFault" in err.value.message
    assert "VMware Tools" in str(err.value)


def test_failing_task_without_quiesce_is_invalid_power_state(adapter: VSphereAdapter) -> None:
    failing = adapter.find_vm(FAIL_VM)
    with pytest.raises(SnapshotFailed) as err:
        adapter.create_snapshot(failing, "x", "d", memory=False, quiesce=False, timeout=30)
    assert "InvalidPowerState" in err.value.message
    assert "current state" in err.value.message
    assert adapter.list_snapshots(failing) == []


def test_task_that_never_ends_raises_task_timeout_and_shows_progress(
    adapter: VSphereAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    hanging = adapter.find_vm(HANG_VM)
    with (
        caplog.at_level(logging.INFO, logger="snapcoord.adapters.vsphere"),
        pytest.raises(TaskTimeout) as err,
    ):
        adapter.create_snapshot(hanging, "x", "d", memory=False, quiesce=False, timeout=3)
    assert err.value.vm == HANG_VM
    assert err.value.exit_code == 3
    assert "did not finish within 3 s" in err.value.message
    assert f"{HANG_VM}: create snapshot 'x': 1%" in caplog.text
    assert err.value.hint and "task-" in err.value.hint


# -- preflight and warnings -----------------------------------------------------------------


def test_warns_about_too_many_snapshots(
    vcsim: VCSim,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with VSphereAdapter("lab", vcsim.settings(max_snapshots=2)) as opened:
        target = opened.find_vm(CLUSTER_VM)
        for index in range(3):
            opened.create_snapshot(
                target, f"s{index}", "d", memory=False, quiesce=False, timeout=30
            )
        with caplog.at_level(logging.WARNING, logger="snapcoord.adapters.vsphere"):
            opened.check_snapshot_ready(target, memory=False, quiesce=False)
    assert any("has 3 snapshots, more than max_snapshots = 2" in w for w in opened.warnings)
    assert "has 3 snapshots" in caplog.text


def test_warns_about_old_snapcoord_snapshots_only(vcsim: VCSim) -> None:
    with VSphereAdapter("lab", vcsim.settings(max_age_hours=1e-9)) as opened:
        target = opened.find_vm(CLUSTER_VM)
        opened.create_snapshot(
            target, "mine", f"{MARKER} run", memory=False, quiesce=False, timeout=30
        )
        opened.create_snapshot(target, "theirs", "by hand", memory=False, quiesce=False, timeout=30)
        opened.check_snapshot_ready(target, memory=False, quiesce=False)
    old = [w for w in opened.warnings if "older than max_age_hours" in w]
    assert len(old) == 1 and "'mine'" in old[0]


def test_snapshot_warnings_logic() -> None:
    now = datetime(2024, 5, 1, tzinfo=UTC)

    def snap(name: str, hours: float, description: str) -> Snapshot:
        return Snapshot(
            name=name, id=name, created=now - timedelta(hours=hours), description=description
        )

    snaps = [snap("a", 100, f"{MARKER} x"), snap("b", 1, f"{MARKER} y"), snap("c", 500, "z")]
    assert snapshot_warnings(snaps, max_snapshots=3, max_age_hours=72, now=now) == [
        "snapshot 'a' is 100 h old, older than max_age_hours = 72 "
        "(delete it once it is no longer needed)"
    ]
    assert len(snapshot_warnings(snaps, max_snapshots=2, max_age_hours=1000, now=now)) == 1


def test_quiesce_preflight_needs_vmware_tools(adapter: VSphereAdapter, vm: VM) -> None:
    adapter.check_snapshot_ready(vm, memory=False, quiesce=False)
    with pytest.raises(UnsupportedOperation, match="VMware Tools") as err:
        adapter.check_snapshot_ready(vm, memory=False, quiesce=True)  # the simulator has no Tools
    assert err.value.vm == vm.name


# -- TLS and login --------------------------------------------------------------------------


def test_thumbprint_pinning_connects(vcsim: VCSim) -> None:
    settings = vcsim.settings(ca_file=None, thumbprint=vcsim.thumbprint)
    with VSphereAdapter("lab", settings) as opened:
        assert opened.find_vm(HOST_VM).name == HOST_VM


def test_thumbprint_without_colons_and_lowercase_connects(vcsim: VCSim) -> None:
    pin = "sha256:" + vcsim.thumbprint.split(":", 1)[1].replace(":", "").lower()
    with VSphereAdapter("lab", vcsim.settings(ca_file=None, thumbprint=pin)) as opened:
        assert opened.find_vm(HOST_VM).name == HOST_VM


def test_wrong_thumbprint_is_refused(vcsim: VCSim) -> None:
    wrong = "sha256:" + ":".join(["AB"] * 32)
    with pytest.raises(HypervisorError, match="not trusted") as err:
        VSphereAdapter("lab", vcsim.settings(ca_file=None, thumbprint=wrong)).connect()
    assert "does not match the pinned one" in str(err.value)


def test_unknown_certificate_is_refused(vcsim: VCSim) -> None:
    """Verification is on by default, also for 127.0.0.1 (pyVmomi would skip it there)."""
    with pytest.raises(HypervisorError, match="not trusted") as err:
        VSphereAdapter("lab", vcsim.settings(ca_file=None)).connect()
    assert err.value.exit_code == 3
    assert err.value.hint and "thumbprint" in err.value.hint


def test_other_ca_file_is_refused(vcsim: VCSim, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    with pytest.raises(HypervisorError, match="not trusted"):
        VSphereAdapter("lab", vcsim.settings(ca_file=str(cert))).connect()


def test_verify_tls_false_connects_with_a_warning(
    vcsim: VCSim,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="snapcoord.adapters.vsphere"),
        VSphereAdapter("lab", vcsim.settings(ca_file=None, verify_tls=False)) as opened,
    ):
        assert opened.find_vm(HOST_VM).name == HOST_VM
    assert "verify_tls = false" in caplog.text
    assert any("verify_tls = false" in w for w in opened.warnings)


def test_wrong_password_is_hypervisor_error_without_the_secret(vcsim: VCSim) -> None:
    settings = vcsim.settings(password=Secret("test", "not-the-password"))
    with pytest.raises(HypervisorError) as err:
        VSphereAdapter("lab", settings).connect()
    text = str(err.value)
    assert f"as {vcsim.user!r} failed" in text
    assert "check user and password" in text
    assert "not-the-password" not in text and vcsim.password not in text
    assert err.value.exit_code == 3


def test_unreachable_host_is_hypervisor_error(vcsim: VCSim) -> None:
    settings = vcsim.settings(port=1)
    with pytest.raises(HypervisorError, match=r"cannot reach vSphere at 127\.0\.0\.1:1\b"):
        VSphereAdapter("lab", settings).connect()


# -- session --------------------------------------------------------------------------------


def test_session_logged_out_is_re_established(
    adapter: VSphereAdapter, vm: VM, caplog: pytest.LogCaptureFixture
) -> None:
    adapter._content.sessionManager.Logout()  # what an expired session looks like
    with caplog.at_level(logging.INFO, logger="snapcoord.adapters.vsphere"):
        assert adapter.list_snapshots(vm) == []
    assert "logging in again" in caplog.text


def test_session_terminated_by_the_server_is_re_established(
    vcsim: VCSim,
    adapter: VSphereAdapter,
    vm: VM,
) -> None:
    key = adapter._content.sessionManager.currentSession.key
    other = direct_client(vcsim)
    other.content.sessionManager.TerminateSession([key])
    snap = adapter.create_snapshot(vm, "after", "d", memory=False, quiesce=False, timeout=30)
    assert [s.id for s in adapter.list_snapshots(vm)] == [snap.id]
    assert adapter._content.sessionManager.currentSession.key != key


def test_close_logs_out_and_is_idempotent(vcsim: VCSim) -> None:
    opened = VSphereAdapter("lab", vcsim.settings())
    opened.connect()
    key = opened._content.sessionManager.currentSession.key
    other = direct_client(vcsim)
    assert other.content.sessionManager.SessionIsActive(key, vcsim.user)
    opened.close()
    opened.close()
    assert not other.content.sessionManager.SessionIsActive(key, vcsim.user)


def test_one_session_for_many_calls(vcsim: VCSim, adapter: VSphereAdapter, vm: VM) -> None:
    key = adapter._content.sessionManager.currentSession.key
    for _ in range(3):
        adapter.list_snapshots(vm)
        adapter.power_state(vm)
    other = direct_client(vcsim)
    sessions = {s.key for s in other.content.sessionManager.sessionList}
    assert key in sessions
    assert len(sessions) == 2  # the adapter's and this test's
    assert isinstance(adapter._content.rootFolder, vim.Folder)


def test_vsphere_has_no_qemu_guest_agent(adapter: VSphereAdapter, vm: VM) -> None:
    """The adapter interface's default: one line naming the transports that do work."""
    with pytest.raises(UnsupportedOperation, match="no QEMU guest agent") as info:
        adapter.guest_agent(vm)
    assert info.value.vm == vm.name and info.value.hint and "ssh" in info.value.hint

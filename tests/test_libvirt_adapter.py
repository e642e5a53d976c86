"""The libvirt adapter against libvirt's real test driver, one private node file per test."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest

from snapcoord.adapters import adapter_class, open_adapter
from snapcoord.adapters import libvirt_adapter as mod
from snapcoord.adapters.base import VM, PowerState, Snapshot
from snapcoord.adapters.libvirt_adapter import LibvirtAdapter
from snapcoord.adapters.libvirt_agent import LibvirtAgentLink, libvirt_seconds
from snapcoord.agent_link import AGENT_FIX, AgentCommandError, AgentUnavailable
from snapcoord.config import parse_table
from snapcoord.errors import (
    ExitCode,
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
from tests import libvirt_nodes
from tests.libvirt_nodes import DB1_UUID, DomainSpec, NodeFactory, SnapSpec

# fixtures (assigned, not imported, so that using them as arguments is not a redefinition)
libvirt_node = libvirt_nodes.libvirt_node
libvirt_node_factory = libvirt_nodes.libvirt_node_factory

SNAP_OLD = "snapcoord-manual-20260101T020000Z"
SNAP_CURRENT = "before-upgrade"


@pytest.fixture
def adapter(libvirt_node: str) -> Iterator[LibvirtAdapter]:
    with LibvirtAdapter("lab", LibvirtSettings("libvirt", libvirt_node)) as opened:
        assert isinstance(opened, LibvirtAdapter)
        yield opened


def raw_domain(adapter: LibvirtAdapter, vm: VM) -> libvirt.virDomain:
    """Side channel to the same connection, to check what the adapter really did."""
    return adapter.conn.lookupByUUIDString(vm.id)


def names(snaps: list[Snapshot]) -> list[str]:
    return [s.name for s in snaps]


# -- registry and connection -------------------------------------------------------------------


def test_registry_opens_the_libvirt_adapter(libvirt_node: str) -> None:
    assert adapter_class("libvirt") is LibvirtAdapter
    opened = open_adapter("lab", LibvirtSettings("libvirt", libvirt_node))
    assert isinstance(opened, LibvirtAdapter)
    assert opened.type_name == "libvirt"
    with opened:
        assert opened.find_vm("db1").name == "db1"


def test_connection_failure_names_the_uri(tmp_path: pytest.TempPathFactory) -> None:
    uri = f"test://{tmp_path}/missing/node.xml"
    adapter = LibvirtAdapter("lab", LibvirtSettings("libvirt", uri))
    with pytest.raises(HypervisorError) as info:
        adapter.connect()
    assert uri in str(info.value)
    assert "'lab'" in str(info.value)
    assert info.value.exit_code == ExitCode.HYPERVISOR


def test_refused_remote_connection_is_a_hypervisor_error() -> None:
    adapter = LibvirtAdapter("lab", LibvirtSettings("libvirt", "test+tcp://127.0.0.1:1/default"))
    with pytest.raises(HypervisorError, match=r"127\.0\.0\.1:1"):
        adapter.find_vm("db1")  # connects lazily


def test_close_is_idempotent_and_reconnects_lazily(libvirt_node: str) -> None:
    adapter = LibvirtAdapter("lab", LibvirtSettings("libvirt", libvirt_node))
    adapter.connect()
    adapter.close()
    adapter.close()
    assert adapter.find_vm("web1").name == "web1"
    adapter.close()


def test_default_uri_is_qemu_system() -> None:
    assert (
        LibvirtAdapter("lab", parse_table(LibvirtSettings, {"type": "libvirt"})).uri
        == "qemu:///system"
    )


def test_libvirt_errors_are_not_printed_on_stderr(
    adapter: LibvirtAdapter, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(VMNotFound):
        adapter.find_vm("nope")
    assert "not found" not in capfd.readouterr().err.lower()


# -- find_vm -----------------------------------------------------------------------------------


def test_find_vm_by_name(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("db1")
    assert vm.name == "db1"
    assert vm.id == DB1_UUID
    assert vm.hypervisor == "lab"
    assert vm.extra["persistent"] is True


@pytest.mark.parametrize("ref", [DB1_UUID, DB1_UUID.upper(), DB1_UUID.replace("-", "")])
def test_find_vm_by_uuid(adapter: LibvirtAdapter, ref: str) -> None:
    assert adapter.find_vm(ref).name == "db1"


@pytest.mark.parametrize("ref", ["nope", "5e6ab1d2-0000-4000-8000-0000000000ff"])
def test_find_vm_unknown(adapter: LibvirtAdapter, ref: str) -> None:
    with pytest.raises(VMNotFound) as info:
        adapter.find_vm(ref)
    assert info.value.vm == ref
    assert str(info.value).startswith(f"{ref}: ")
    assert info.value.exit_code == ExitCode.HYPERVISOR


def test_vm_that_vanished_after_lookup(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("web1")
    dom = raw_domain(adapter, vm)
    dom.destroy()
    dom.undefine()
    calls: list[Callable[[], object]] = [
        lambda: adapter.power_state(vm),
        lambda: adapter.list_snapshots(vm),
        lambda: adapter.create_snapshot(vm, "s", "", memory=True, quiesce=False, timeout=10),
        lambda: adapter.check_snapshot_ready(vm, memory=True, quiesce=False),
    ]
    for call in calls:
        with pytest.raises(VMNotFound) as info:
            call()
        assert info.value.vm == "web1"


# -- list_snapshots ----------------------------------------------------------------------------


def test_list_preloaded_snapshots(adapter: LibvirtAdapter) -> None:
    old, current = adapter.list_snapshots(adapter.find_vm("db1"))
    assert old.name == SNAP_OLD
    assert old.created == datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
    assert old.created.tzinfo is not None
    assert old.description == "snapcoord: label=manual"
    assert old.is_snapcoord
    assert old.parent is None
    assert old.memory is True  # taken of a running domain
    assert old.current is False
    assert current.name == SNAP_CURRENT
    assert current.parent == SNAP_OLD
    assert current.description == "taken by hand & kept"
    assert not current.is_snapcoord
    assert current.memory is False  # taken of a shut-off domain
    assert current.current is True
    assert current.extra["state"] == "shutoff"


def test_list_without_snapshots(adapter: LibvirtAdapter) -> None:
    assert adapter.list_snapshots(adapter.find_vm("web1")) == []


def test_list_is_oldest_first_even_within_one_second(
    libvirt_node_factory: NodeFactory,
) -> None:
    same = datetime(2026, 3, 1, tzinfo=UTC)
    uri = libvirt_node_factory(
        [
            DomainSpec(
                "db",
                "5e6ab1d2-0000-4000-8000-0000000000a1",
                snapshots=(  # listed child first; all in the same second
                    SnapSpec("zz-child", same, parent="mm-middle", current=True),
                    SnapSpec("mm-middle", same, parent="aa-root"),
                    SnapSpec("aa-root", same),
                    SnapSpec("b-older", datetime(2025, 1, 1, tzinfo=UTC)),
                ),
            )
        ]
    )
    with LibvirtAdapter("lab", LibvirtSettings("libvirt", uri)) as adapter:
        listed = adapter.list_snapshots(adapter.find_vm("db"))
    assert names(listed) == ["b-older", "aa-root", "mm-middle", "zz-child"]


# -- create ------------------------------------------------------------------------------------


def test_create_on_running_domain(
    adapter: LibvirtAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    vm = adapter.find_vm("db1")
    description = "snapcoord: run=1 <&> 'quoted'"
    with caplog.at_level(logging.WARNING):
        snap = adapter.create_snapshot(
            vm,
            "snapcoord-manual-20261126T010203Z",
            description,
            memory=False,
            quiesce=False,
            timeout=30,
        )
    assert snap.name == "snapcoord-manual-20261126T010203Z"
    assert snap.description == description
    assert snap.is_snapcoord
    assert snap.memory is True  # memory=false cannot be honoured for a running domain
    assert "includes its RAM" in caplog.text
    assert snap.quiesced is False
    assert snap.current is True
    assert snap.parent == SNAP_CURRENT
    assert snap.created is not None and snap.created.tzinfo is not None
    listed = adapter.list_snapshots(vm)
    assert names(listed) == [SNAP_OLD, SNAP_CURRENT, snap.name]
    assert [s.current for s in listed] == [False, False, True]
    assert listed[-1].description == description
    assert adapter.power_state(vm) is PowerState.RUNNING


def test_create_with_memory_on_running_domain_logs_no_warning(
    adapter: LibvirtAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        snap = adapter.create_snapshot(
            adapter.find_vm("web1"), "s1", "", memory=True, quiesce=False, timeout=30
        )
    assert snap.memory is True
    assert caplog.records == []


def test_create_on_shut_off_domain_is_disk_only(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("stopped1")
    snap = adapter.create_snapshot(vm, "s1", "d", memory=True, quiesce=True, timeout=30)
    assert snap.memory is False
    assert snap.quiesced is False  # nothing runs, nothing to freeze
    assert snap.extra["state"] == "shutoff"
    assert adapter.power_state(vm) is PowerState.STOPPED


def test_create_on_paused_domain_keeps_it_paused(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("paused1")
    snap = adapter.create_snapshot(vm, "s1", "", memory=True, quiesce=False, timeout=30)
    assert snap.memory is True
    assert adapter.power_state(vm) is PowerState.PAUSED


def test_create_duplicate_name(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("db1")
    with pytest.raises(SnapshotExists) as info:
        adapter.create_snapshot(vm, SNAP_OLD, "", memory=True, quiesce=False, timeout=30)
    assert info.value.vm == "db1"
    assert SNAP_OLD in str(info.value)
    assert len(adapter.list_snapshots(vm)) == 2


def test_create_quiesced_with_guest_agent(adapter: LibvirtAdapter) -> None:
    snap = adapter.create_snapshot(
        adapter.find_vm("agent1"), "q1", "", memory=True, quiesce=True, timeout=30
    )
    assert snap.quiesced is True


def test_create_quiesced_without_guest_agent(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("db1")
    with pytest.raises(UnsupportedOperation, match="guest agent") as info:
        adapter.create_snapshot(vm, "q1", "", memory=True, quiesce=True, timeout=30)
    assert info.value.vm == "db1"
    assert "quiesce = false" in str(info.value)
    assert names(adapter.list_snapshots(vm)) == [SNAP_OLD, SNAP_CURRENT]


def test_guest_agent_needs_the_agent_channel(adapter: LibvirtAdapter) -> None:
    with pytest.raises(AgentUnavailable, match=r"no org\.qemu\.guest_agent\.0 channel") as info:
        adapter.guest_agent(adapter.find_vm("db1"))
    assert info.value.vm == "db1" and info.value.hint == AGENT_FIX["libvirt"]
    link = adapter.guest_agent(adapter.find_vm("agent1"))
    assert isinstance(link, LibvirtAgentLink) and link.vm == "agent1"
    assert "agent1" in link.description and adapter.uri in link.description
    # libvirt's test driver has no qemuAgentCommand: an error, not a hang or a traceback
    with pytest.raises(AgentCommandError, match="no guest agent commands"):
        link.ping(timeout=5)
    link.close()
    link.close()


def test_guest_agent_call_that_libvirtd_never_answers_is_abandoned(
    adapter: LibvirtAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvirt's own timeout ends a call to an agent that does not answer (tested on the real
    guest); a libvirtd that itself hangs is left behind after the margin, and the link's next
    call opens a new connection."""
    import libvirt_qemu

    from snapcoord.adapters import libvirt_agent

    release = threading.Event()
    calls: list[int] = []

    def hangs(domain: object, text: str, seconds: int, flags: int) -> str:
        calls.append(seconds)
        release.wait(30)
        return '{"return":{}}'

    monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", hangs)
    monkeypatch.setattr(libvirt_agent, "SYNC_SECONDS", 0)
    monkeypatch.setattr(libvirt_agent, "RPC_MARGIN", 0.2)
    link = adapter.guest_agent(adapter.find_vm("agent1"))
    assert isinstance(link, LibvirtAgentLink)
    try:
        with pytest.raises(AgentUnavailable, match="libvirt did not return guest-ping") as info:
            link.ping(timeout=0.1)
        assert calls == [1] and "check libvirtd" in (info.value.hint or "")
        assert link._conn is None  # the next call starts on a new connection
    finally:
        release.set()
        link.close()


def test_guest_agent_timeouts_are_whole_seconds_never_a_special_value() -> None:
    """qemuAgentCommand: -2 blocks forever, -1 is libvirt's default, 0 does not wait."""
    assert [libvirt_seconds(t) for t in (0.2, 1, 1.01, 29.5, 30)] == [1, 1, 2, 30, 30]
    assert {libvirt_seconds(t) for t in (0, -1, -2, float("inf"), float("nan"))} == {1}


def test_guest_agent_limits_fit_libvirts_messages() -> None:
    from snapcoord.adapters.libvirt_agent import REMOTE_STRING_MAX

    def base64_length(raw: int) -> int:
        return (raw + 2) // 3 * 4

    # a read's reply: its base64 and the JSON around it, under libvirt's string limit
    assert base64_length(LibvirtAgentLink.max_read) + 100 < REMOTE_STRING_MAX
    assert LibvirtAgentLink.max_write == LibvirtAgentLink.max_input == 64 << 10


def test_create_timeout_raises(adapter: LibvirtAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = mod.run_with_timeout

    def slow_first(func, **kwargs):  # type: ignore[no-untyped-def]
        def blocked():  # type: ignore[no-untyped-def]
            release.wait(30)
            return func()

        return real(blocked, **kwargs)

    monkeypatch.setattr(mod, "run_with_timeout", slow_first)
    vm = adapter.find_vm("web1")
    try:
        with pytest.raises(TaskTimeout, match="creating snapshot 's1'") as info:
            adapter.create_snapshot(vm, "s1", "", memory=True, quiesce=False, timeout=0.01)
        assert info.value.vm == "web1"
    finally:
        release.set()


# -- run_with_timeout (pure) -------------------------------------------------------------------


def test_run_with_timeout_returns_and_raises() -> None:
    assert mod.run_with_timeout(lambda: 42, timeout=10, what="x", vm="v") == 42

    def boom() -> None:
        raise ValueError("inner")

    with pytest.raises(ValueError, match="inner"):
        mod.run_with_timeout(boom, timeout=10, what="x", vm="v")
    gate = threading.Event()
    try:
        with pytest.raises(TaskTimeout, match="waiting did not finish"):
            mod.run_with_timeout(lambda: gate.wait(30), timeout=0.01, what="waiting", vm="v")
    finally:
        gate.set()


# -- revert ------------------------------------------------------------------------------------


def _memory_kib(adapter: LibvirtAdapter, vm: VM) -> int:
    return int(raw_domain(adapter, vm).info()[2])


def test_revert_restores_the_snapshot(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("web1")
    snap = adapter.create_snapshot(vm, "s1", "", memory=True, quiesce=False, timeout=30)
    raw_domain(adapter, vm).setMemory(524288)
    assert _memory_kib(adapter, vm) == 524288
    adapter.revert_snapshot(vm, snap, start=None, timeout=30)
    assert _memory_kib(adapter, vm) == 1048576
    assert adapter.power_state(vm) is PowerState.RUNNING


def test_revert_moves_current(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("db1")
    adapter.revert_snapshot(vm, adapter.find_snapshot(vm, SNAP_OLD), start=None, timeout=30)
    assert [s.current for s in adapter.list_snapshots(vm)] == [True, False]


@pytest.mark.parametrize(
    ("vm_name", "target", "start", "expected"),
    [
        # start=None keeps the pre-revert state, whatever the snapshot holds
        ("db1", SNAP_OLD, None, PowerState.RUNNING),
        ("db1", SNAP_CURRENT, None, PowerState.RUNNING),  # disk-only: booted again
        ("stopped1", "mem", None, PowerState.STOPPED),  # RAM snapshot, stays off
        ("paused1", "mem", None, PowerState.PAUSED),
        # start=True: running
        ("stopped1", "mem", True, PowerState.RUNNING),
        ("db1", SNAP_CURRENT, True, PowerState.RUNNING),
        # start=False: paused when the snapshot holds RAM, stopped when it does not
        ("db1", SNAP_OLD, False, PowerState.PAUSED),
        ("db1", SNAP_CURRENT, False, PowerState.STOPPED),
    ],
)
def test_revert_power_state(
    adapter: LibvirtAdapter,
    vm_name: str,
    target: str,
    start: bool | None,
    expected: PowerState,
) -> None:
    vm = adapter.find_vm(vm_name)
    if target == "mem":
        # take a RAM snapshot while running, then put the VM back into its node state
        dom = raw_domain(adapter, vm)
        before = adapter.power_state(vm)
        if before is PowerState.STOPPED:
            dom.create()
        elif before is PowerState.PAUSED:
            dom.resume()
        adapter.create_snapshot(vm, "mem", "", memory=True, quiesce=False, timeout=30)
        if before is PowerState.STOPPED:
            dom.destroy()
        elif before is PowerState.PAUSED:
            dom.suspend()
        assert adapter.power_state(vm) is before
    snap = adapter.find_snapshot(vm, target)
    adapter.revert_snapshot(vm, snap, start=start, timeout=30)
    assert adapter.power_state(vm) is expected
    assert next(s for s in adapter.list_snapshots(vm) if s.name == target).current


def test_revert_to_missing_snapshot(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("db1")
    ghost = Snapshot(name="ghost", id="ghost", created=None)
    with pytest.raises(SnapshotNotFound, match="ghost") as info:
        adapter.revert_snapshot(vm, ghost, start=None, timeout=30)
    assert info.value.vm == "db1"
    assert info.value.exit_code == ExitCode.HYPERVISOR


# -- delete ------------------------------------------------------------------------------------


def test_delete_reparents_children(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("db1")
    new = adapter.create_snapshot(vm, "s3", "", memory=True, quiesce=False, timeout=30)
    adapter.delete_snapshot(vm, adapter.find_snapshot(vm, SNAP_CURRENT), timeout=30)
    listed = adapter.list_snapshots(vm)
    assert names(listed) == [SNAP_OLD, "s3"]
    assert listed[1].parent == SNAP_OLD
    adapter.delete_snapshot(vm, new, timeout=30)
    assert names(adapter.list_snapshots(vm)) == [SNAP_OLD]


def test_delete_missing_snapshot(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("db1")
    snap = adapter.find_snapshot(vm, SNAP_CURRENT)
    adapter.delete_snapshot(vm, snap, timeout=30)
    with pytest.raises(SnapshotNotFound, match=SNAP_CURRENT) as info:
        adapter.delete_snapshot(vm, snap, timeout=30)
    assert info.value.vm == "db1"


def test_find_snapshot_missing(adapter: LibvirtAdapter) -> None:
    with pytest.raises(SnapshotNotFound):
        adapter.find_snapshot(adapter.find_vm("db1"), "nope")


# -- power state, capabilities -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("vm_name", "expected"),
    [
        ("db1", PowerState.RUNNING),
        ("stopped1", PowerState.STOPPED),
        ("paused1", PowerState.PAUSED),
        ("sleepy1", PowerState.SUSPENDED),
    ],
)
def test_power_state(adapter: LibvirtAdapter, vm_name: str, expected: PowerState) -> None:
    assert adapter.power_state(adapter.find_vm(vm_name)) is expected


def test_power_state_with_managed_save_is_suspended(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("web1")
    raw_domain(adapter, vm).managedSave(0)
    assert adapter.power_state(vm) is PowerState.SUSPENDED


def test_capabilities(adapter: LibvirtAdapter) -> None:
    caps = adapter.capabilities()
    assert caps.memory is True
    assert caps.disk_only is False  # memory=false is not honoured on running domains
    assert caps.quiesce is True  # the test driver accepts QUIESCE with internal snapshots
    assert caps.extra["driver"] == "TEST"
    assert caps.extra["libvirt_version"] >= 9_000_000


# -- check_snapshot_ready ----------------------------------------------------------------------


@pytest.mark.parametrize("vm_name", ["db1", "stopped1", "paused1", "agent1"])
def test_ready(adapter: LibvirtAdapter, vm_name: str) -> None:
    adapter.check_snapshot_ready(adapter.find_vm(vm_name), memory=True, quiesce=False)


def test_ready_quiesce_with_agent_and_on_shut_off_domain(adapter: LibvirtAdapter) -> None:
    adapter.check_snapshot_ready(adapter.find_vm("agent1"), memory=False, quiesce=True)
    adapter.check_snapshot_ready(adapter.find_vm("stopped1"), memory=False, quiesce=True)


def test_not_ready_when_pm_suspended(adapter: LibvirtAdapter) -> None:
    with pytest.raises(PreflightError, match="suspended") as info:
        adapter.check_snapshot_ready(adapter.find_vm("sleepy1"), memory=True, quiesce=False)
    assert info.value.vm == "sleepy1"
    assert info.value.exit_code == ExitCode.PREFLIGHT


def test_not_ready_with_raw_disk(adapter: LibvirtAdapter) -> None:
    with pytest.raises(UnsupportedOperation, match=r"vda \(raw\)") as info:
        adapter.check_snapshot_ready(adapter.find_vm("rawdisk1"), memory=True, quiesce=False)
    assert "sda" not in str(info.value)  # read-only cdrom is ignored
    assert info.value.vm == "rawdisk1"


def test_not_ready_quiesce_without_agent(adapter: LibvirtAdapter) -> None:
    with pytest.raises(UnsupportedOperation, match=r"org\.qemu\.guest_agent\.0") as info:
        adapter.check_snapshot_ready(adapter.find_vm("db1"), memory=True, quiesce=True)
    assert info.value.vm == "db1"


def test_not_ready_quiesce_with_disconnected_agent(
    adapter: LibvirtAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test driver does not report the channel state; QEMU does.
    monkeypatch.setattr(mod, "agent_state", lambda _xml: "disconnected")
    with pytest.raises(UnsupportedOperation, match="not connected"):
        adapter.check_snapshot_ready(adapter.find_vm("agent1"), memory=True, quiesce=True)


def test_not_ready_quiesce_on_qemu_like_driver(
    adapter: LibvirtAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # QEMU's QUIESCE needs external disk-only snapshots; pretend the test driver were QEMU.
    monkeypatch.setattr(mod, "NO_INTERNAL_QUIESCE", frozenset({"TEST"}))
    assert adapter.capabilities().quiesce is False
    with pytest.raises(UnsupportedOperation, match="external disk-only") as info:
        adapter.check_snapshot_ready(adapter.find_vm("agent1"), memory=True, quiesce=True)
    assert "quiesce = false" in str(info.value)


# -- pure helpers ------------------------------------------------------------------------------


def test_agent_state_parsing() -> None:
    def dom(channel: str) -> str:
        return f"<domain><devices>{channel}</devices></domain>"

    target = "<target type='virtio' name='org.qemu.guest_agent.0'{}/>"
    assert mod.agent_state(dom("")) is None
    other = "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>"
    assert mod.agent_state(dom(other)) is None
    assert mod.agent_state(dom(f"<channel>{target.format('')}</channel>")) == ""
    connected = target.format(" state='connected'")
    assert mod.agent_state(dom(f"<channel>{connected}</channel>")) == "connected"


def _error(code: int, message: str) -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, 10, message, 2, None, None, None, 0, 0)
    return err


@pytest.mark.parametrize(
    ("code", "message", "expected", "text"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, "Domain not found", VMNotFound, "no such domain"),
        (libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT, "no snapshot 'x'", SnapshotNotFound, "no snapshot"),
        (
            libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
            "Guest agent is not responding",
            UnsupportedOperation,
            "guest agent does not answer",
        ),
        (libvirt.VIR_ERR_AGENT_UNSYNCED, "agent unsynced", UnsupportedOperation, "guest agent"),
        (
            libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
            "QEMU guest agent is not configured",
            UnsupportedOperation,
            "not supported",
        ),
        (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, "nope", UnsupportedOperation, "not supported"),
        (
            libvirt.VIR_ERR_INVALID_ARG,
            "unsupported flags (0x10) in function x",
            UnsupportedOperation,
            "unsupported flags",
        ),
        (  # what QEMU says to QUIESCE without DISK_ONLY
            libvirt.VIR_ERR_INVALID_ARG,
            "Flag 'VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY' is required by flag "
            "'VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE'",
            UnsupportedOperation,
            "is required by flag",
        ),
        (libvirt.VIR_ERR_INVALID_ARG, "Invalid UUID", HypervisorError, "Invalid UUID"),
        (libvirt.VIR_ERR_SYSTEM_ERROR, "Cannot recv data", HypervisorError, "connection"),
        (libvirt.VIR_ERR_INTERNAL_ERROR, "boom", HypervisorError, "boom"),
    ],
)
def test_translate(code: int, message: str, expected: type[SnapcoordError], text: str) -> None:
    result = mod.translate(_error(code, message), action="do it", vm="db9", uri="qemu:///system")
    assert type(result) is expected
    assert result.vm == "db9"
    assert text in str(result)
    assert str(result).startswith("db9: do it")


def test_unsupported_flags_from_the_real_driver(adapter: LibvirtAdapter) -> None:
    dom = raw_domain(adapter, adapter.find_vm("web1"))
    with pytest.raises(libvirt.libvirtError) as info:
        dom.snapshotCreateXML(
            "<domainsnapshot><name>d</name></domainsnapshot>",
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY,
        )
    result = mod.translate(info.value, action="create", vm="web1", uri=adapter.uri)
    assert isinstance(result, UnsupportedOperation)


# -- the demo node (make demo) -----------------------------------------------------------------


def test_demo_node_loads() -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / "demo-node.xml"
    with LibvirtAdapter("demo", LibvirtSettings("libvirt", f"test://{path}")) as adapter:
        db = adapter.find_vm("demo-db")
        web = adapter.find_vm("demo-web-stopped")
        assert adapter.power_state(db) is PowerState.RUNNING
        assert adapter.power_state(web) is PowerState.STOPPED
        (old,) = adapter.list_snapshots(db)
        assert old.name == "snapcoord-manual-20261101T020000Z"
        assert old.is_snapcoord
        assert old.created == datetime(2026, 11, 1, 2, 0, tzinfo=UTC)
        adapter.check_snapshot_ready(db, memory=False, quiesce=False)


# -- the guest agent freeze of backups (the freeze hook's preflight) ---------------------------


def test_a_domain_without_the_agent_channel_has_no_backup_freeze(adapter: LibvirtAdapter) -> None:
    vm = adapter.find_vm("web1")
    with pytest.raises(UnsupportedOperation) as caught:
        adapter.check_backup_freeze(vm)
    assert caught.value.exit_code == 3
    assert "no org.qemu.guest_agent.0 channel" in caught.value.message
    assert adapter.thaw_filesystems(vm) is False, "nothing to thaw without an agent"


class _RevertedDomain:
    """A domain right after a revert to a snapshot taken inside the agent's freeze: its agent
    channel reads ``disconnected`` for the first ``late`` looks, then ``connected``; the guest
    is frozen until thawed. (The test driver has no guest agent; the real one is
    tests/test_realvm_fsfreeze.py's revert.)"""

    def __init__(self, late: int) -> None:
        self.late = late
        self.looks = 0
        self.frozen = True
        self.thaws = 0

    def XMLDesc(self, flags: int) -> str:
        self.looks += 1
        state = "disconnected" if self.looks <= self.late else "connected"
        return (
            "<domain><devices><channel type='unix'>"
            f"<target type='virtio' name='{mod.AGENT_CHANNEL}' state='{state}'/>"
            "</channel></devices></domain>"
        )

    def fsThaw(self, mountpoints: object, flags: int) -> int:
        self.frozen = False
        self.thaws += 1
        return 1


def test_the_thaw_after_a_revert_waits_for_the_agent_channel(
    adapter: LibvirtAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt_qemu

    monkeypatch.setattr(mod, "THAW_POLL_SECONDS", 0.01)
    vm = adapter.find_vm("web1")
    dom = _RevertedDomain(late=3)
    monkeypatch.setattr(adapter, "_domain", lambda vm, action: dom)

    def status(domain: _RevertedDomain, command: str, timeout: int, flags: int) -> str:
        assert domain is dom and "guest-fsfreeze-status" in command
        return '{"return": "frozen"}' if dom.frozen else '{"return": "thawed"}'

    monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", status)
    assert adapter.thaw_filesystems(vm) is False, "no wait: a disconnected channel is final"
    assert dom.frozen and dom.thaws == 0
    assert adapter.thaw_filesystems(vm, wait=30) is True
    assert not dom.frozen and dom.thaws == 1 and dom.looks == 4
    assert adapter.thaw_filesystems(vm, wait=30) is False, "thawed already: nothing to do"
    assert dom.thaws == 1

    def refused(domain: _RevertedDomain, command: str, timeout: int, flags: int) -> str:
        raise libvirt.libvirtError("Operation not supported: the agent command is disabled")

    monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", refused)
    looks = dom.looks
    assert adapter.thaw_filesystems(vm, wait=30) is False
    assert dom.looks == looks + 1, "an answer that will not change is not asked again"

"""ProxmoxAdapter against the strict API double over real HTTPS (tests/pve_api)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcoord.adapters.base import MARKER, PowerState
from snapcoord.adapters.proxmox import ProxmoxAdapter
from snapcoord.errors import (
    HypervisorError,
    SnapshotExists,
    SnapshotNotFound,
    UnsupportedOperation,
    UsageError,
    VMNotFound,
)
from snapcoord.secrets import Secret
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    PASSWORD,
    TOKEN_SECRET,
    Cert,
    make_cert,
    start_double,
    ticket_settings,
    token_settings,
)

T = 30.0  # task timeout


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("pve-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert)
    yield server
    server.stop()


@pytest.fixture
def adapter(double: PveApiDouble, cert: Cert) -> Iterator[ProxmoxAdapter]:
    with ProxmoxAdapter("pve", token_settings(double, cert)) as connected:
        assert isinstance(connected, ProxmoxAdapter)
        yield connected


def _cycle(adapter: ProxmoxAdapter, ref: str) -> None:
    """create, list, revert, delete on one guest: the whole life of a snapcoord snapshot."""
    vm = adapter.find_vm(ref)
    description = f"{MARKER} run 1\nsecond line"
    first = adapter.create_snapshot(
        vm, "snap-a", description, memory=False, quiesce=False, timeout=T
    )
    assert first.name == "snap-a" and first.created is not None
    adapter.create_snapshot(vm, "snap_b", "manual", memory=False, quiesce=False, timeout=T)
    snaps = adapter.list_snapshots(vm)
    assert [s.name for s in snaps] == ["snap-a", "snap_b"]  # oldest first, no 'current'
    assert snaps[0].description == description and snaps[0].is_snapcoord
    assert snaps[1].parent == "snap-a" and snaps[1].current and not snaps[0].current
    assert not snaps[1].is_snapcoord

    adapter.revert_snapshot(vm, snaps[0], start=None, timeout=T)
    assert adapter.power_state(vm) is PowerState.RUNNING  # was running: started again
    assert [s.name for s in adapter.list_snapshots(vm) if s.current] == ["snap-a"]

    adapter.delete_snapshot(vm, snaps[1], timeout=T)
    adapter.delete_snapshot(vm, snaps[0], timeout=T)
    assert adapter.list_snapshots(vm) == []


@pytest.mark.parametrize("ref", ["db1", "100", "ct1", "101"])
def test_cycle_qemu_and_lxc_by_name_and_vmid(adapter: ProxmoxAdapter, ref: str) -> None:
    _cycle(adapter, ref)


def test_find_vm_reads_node_and_type_from_cluster_resources(adapter: ProxmoxAdapter) -> None:
    vm = adapter.find_vm("ct-remote")
    assert vm.id == "200" and dict(vm.extra) == {"node": "pve3", "type": "lxc", "vmid": 200}
    vm = adapter.find_vm("102")
    assert vm.name == "web1" and vm.extra["node"] == "pve2" and vm.extra["type"] == "qemu"


def test_guest_on_another_node(adapter: ProxmoxAdapter) -> None:
    _cycle(adapter, "db-remote")


def test_guest_migrated_since_lookup(double: PveApiDouble, adapter: ProxmoxAdapter) -> None:
    vm = adapter.find_vm("web1")
    double.cluster.move_guest(102, "pve3")
    with pytest.raises(VMNotFound, match="migrated"):
        adapter.list_snapshots(vm)
    assert adapter.find_vm("web1").extra["node"] == "pve3"  # a fresh lookup follows it


def test_unknown_and_duplicate_names(adapter: ProxmoxAdapter) -> None:
    with pytest.raises(VMNotFound, match="nosuch"):
        adapter.find_vm("nosuch")
    with pytest.raises(VMNotFound, match="vmid 999"):
        adapter.find_vm("999")
    with pytest.raises(
        HypervisorError, match=r"2 guests are named 'twin' \(vmids 103 on pve1, 104"
    ):
        adapter.find_vm("twin")
    assert adapter.find_vm("104").extra["node"] == "pve2"


def test_duplicate_snapshot_name_is_snapshot_exists(adapter: ProxmoxAdapter) -> None:
    vm = adapter.find_vm("db1")
    adapter.create_snapshot(vm, "dup", "x", memory=False, quiesce=False, timeout=T)
    with pytest.raises(SnapshotExists, match="snapshot name 'dup' already used"):
        adapter.create_snapshot(vm, "dup", "x", memory=False, quiesce=False, timeout=T)


def test_missing_snapshot(adapter: ProxmoxAdapter) -> None:
    vm = adapter.find_vm("ct1")
    with pytest.raises(SnapshotNotFound):
        adapter.find_snapshot(vm, "nope")
    ghost = adapter.create_snapshot(vm, "ghost", "x", memory=False, quiesce=False, timeout=T)
    adapter.delete_snapshot(vm, ghost, timeout=T)
    with pytest.raises(SnapshotNotFound, match="snapshot 'ghost' does not exist"):
        adapter.delete_snapshot(vm, ghost, timeout=T)


def test_reserved_and_invalid_names_refused_before_any_call(adapter: ProxmoxAdapter) -> None:
    qemu, lxc = adapter.find_vm("db1"), adapter.find_vm("ct1")
    before = len(adapter.requests)
    for vm, name in [(qemu, "current"), (qemu, "PENDING"), (lxc, "vzdump"), (lxc, "current")]:
        with pytest.raises(UsageError, match="reserved"):
            adapter.create_snapshot(vm, name, "", memory=False, quiesce=False, timeout=T)
    for name in ["1abc", "a", "with space", "x" * 41]:
        with pytest.raises(UsageError, match="not valid"):
            adapter.create_snapshot(qemu, name, "", memory=False, quiesce=False, timeout=T)
    assert len(adapter.requests) == before
    # 'vzdump' is only reserved for containers; 'pending' only for VMs
    adapter.create_snapshot(qemu, "vzdump", "", memory=False, quiesce=False, timeout=T)
    adapter.create_snapshot(lxc, "pending", "", memory=False, quiesce=False, timeout=T)


def test_lock_released_after_two_seconds_is_waited_for(
    double: PveApiDouble, adapter: ProxmoxAdapter
) -> None:
    vm = adapter.find_vm("db1")
    double.cluster.lock_guest(100, "backup", seconds=2.0)
    snap = adapter.create_snapshot(vm, "after-lock", "", memory=False, quiesce=False, timeout=T)
    assert snap.name in [s.name for s in adapter.list_snapshots(vm)]
    failed = [e for e in double.log if e.method == "POST" and e.path.endswith("/snapshot")]
    assert len(failed) >= 2  # the first attempt met the lock


def test_lock_held_fails_clearly(double: PveApiDouble, cert: Cert) -> None:
    settings = token_settings(double, cert, lock_wait_seconds=1.0)
    with ProxmoxAdapter("pve", settings) as adapter:
        vm = adapter.find_vm("ct1")
        double.cluster.lock_guest(101, "snapshot-delete")
        with pytest.raises(HypervisorError) as info:
            adapter.create_snapshot(vm, "blocked", "", memory=False, quiesce=False, timeout=T)
    text = str(info.value)
    assert "CT is locked (snapshot-delete)" in text and "pct unlock 101" in text
    assert "waiting 1 s" in text


def test_a_lock_name_that_is_not_a_word_is_quoted_and_stays_on_one_line(
    double: PveApiDouble, adapter: ProxmoxAdapter
) -> None:
    vm = adapter.find_vm("db1")
    double.cluster.lock_guest(100, "backup\n\x1b[2Jrm -rf /")
    with pytest.raises(HypervisorError) as info:
        adapter.check_snapshot_support(vm)
    text = str(info.value)
    assert "VM 100 is locked ('backup\\n\\x1b[2Jrm -rf /')" in text
    assert "\n" not in text and "\x1b" not in text


def test_preflight_waits_for_a_lock(double: PveApiDouble, cert: Cert) -> None:
    settings = token_settings(double, cert, lock_wait_seconds=1.0)
    with ProxmoxAdapter("pve", settings) as adapter:
        vm = adapter.find_vm("db1")
        double.cluster.lock_guest(100, "backup", seconds=0.6)
        adapter.check_snapshot_ready(vm, memory=False, quiesce=True)
        assert adapter.requests.count("GET /nodes/pve1/qemu/100/config") >= 2
        double.cluster.lock_guest(100, "migrate")
        with pytest.raises(HypervisorError, match=r"VM is locked \(migrate\) for more than 1 s"):
            adapter.check_snapshot_ready(vm, memory=False, quiesce=False)


def test_lock_taken_by_a_concurrent_snapshot(double: PveApiDouble, cert: Cert) -> None:
    """Two runs on one VM: the second waits for the first task's 'snapshot' lock."""
    double.cluster.task_seconds = 1.0
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
                vm = adapter.find_vm("db1")
                adapter.create_snapshot(vm, name, "", memory=False, quiesce=False, timeout=T)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(double.cluster.guests[100].snapshots) == {"one", "two"}


def test_revert_keeps_power_state(double: PveApiDouble, adapter: ProxmoxAdapter) -> None:
    vm = adapter.find_vm("web1")
    snap = adapter.create_snapshot(vm, "base", "", memory=False, quiesce=False, timeout=T)
    # A rollback stops a running VM; without start=1 it would stay off.
    adapter.revert_snapshot(vm, snap, start=None, timeout=T)
    assert adapter.power_state(vm) is PowerState.RUNNING
    rollbacks = [e for e in double.log if e.path.endswith("/rollback")]
    assert rollbacks[-1].params == {"start": "1"}

    double.cluster.set_status(102, "stopped")
    adapter.revert_snapshot(vm, snap, start=None, timeout=T)
    assert adapter.power_state(vm) is PowerState.STOPPED
    rollbacks = [e for e in double.log if e.path.endswith("/rollback")]
    assert rollbacks[-1].params == {}

    adapter.revert_snapshot(vm, snap, start=True, timeout=T)
    assert adapter.power_state(vm) is PowerState.RUNNING
    adapter.revert_snapshot(vm, snap, start=False, timeout=T)
    assert adapter.power_state(vm) is PowerState.STOPPED


def test_memory_snapshot_qemu_only(double: PveApiDouble, adapter: ProxmoxAdapter) -> None:
    vm = adapter.find_vm("db1")
    snap = adapter.create_snapshot(vm, "withram", "", memory=True, quiesce=False, timeout=T)
    assert snap.memory and adapter.list_snapshots(vm)[0].memory
    ct = adapter.find_vm("ct1")
    with pytest.raises(UnsupportedOperation, match="containers have no RAM"):
        adapter.check_snapshot_ready(ct, memory=True, quiesce=False)
    with pytest.raises(UnsupportedOperation, match="containers have no RAM"):
        adapter.create_snapshot(ct, "withram", "", memory=True, quiesce=False, timeout=T)


def test_quiesce_checks_the_guest_agent(double: PveApiDouble, adapter: ProxmoxAdapter) -> None:
    adapter.check_snapshot_ready(adapter.find_vm("db1"), memory=False, quiesce=True)
    adapter.check_snapshot_ready(adapter.find_vm("ct1"), memory=False, quiesce=True)
    adapter.check_snapshot_ready(adapter.find_vm("stopped1"), memory=False, quiesce=False)

    with pytest.raises(UnsupportedOperation, match="not enabled for VM 202") as info:
        adapter.check_snapshot_ready(adapter.find_vm("noagent"), memory=False, quiesce=True)
    assert "qm set 202 --agent enabled=1" in str(info.value)

    double.cluster.guests[201].agent_running = False
    with pytest.raises(UnsupportedOperation, match="QEMU guest agent is not running"):
        adapter.check_snapshot_ready(adapter.find_vm("db-remote"), memory=False, quiesce=True)

    with pytest.raises(UnsupportedOperation, match="not both"):
        adapter.check_snapshot_ready(adapter.find_vm("db1"), memory=True, quiesce=True)

    # PVE itself froze the file systems through the agent for the quiesced snapshot
    vm = adapter.find_vm("db1")
    adapter.create_snapshot(vm, "frozen", "", memory=False, quiesce=True, timeout=T)
    assert double.cluster.guests[100].frozen_snapshots == ["frozen"]


def test_task_timeout_raises(double: PveApiDouble, adapter: ProxmoxAdapter) -> None:
    double.cluster.task_seconds = 30.0
    vm = adapter.find_vm("ct1")
    from snapcoord.errors import TaskTimeout

    with pytest.raises(TaskTimeout, match="snapshot 'slow'"):
        adapter.create_snapshot(vm, "slow", "", memory=False, quiesce=False, timeout=0.5)


def test_ticket_auth_with_csrf_and_relogin(double: PveApiDouble, cert: Cert) -> None:
    with ProxmoxAdapter("pve", ticket_settings(double, cert)) as adapter:
        assert isinstance(adapter, ProxmoxAdapter)
        vm = adapter.find_vm("db1")
        adapter.create_snapshot(vm, "t1", "", memory=False, quiesce=False, timeout=T)
        double.expire_tickets()  # two hours later: the ticket is refused
        adapter.create_snapshot(vm, "t2", "", memory=False, quiesce=False, timeout=T)
        assert [s.name for s in adapter.list_snapshots(vm)] == ["t1", "t2"]
    logins = [e for e in double.log if e.path == "/access/ticket"]
    assert len(logins) == 2 and all(e.status == 200 for e in logins)
    assert all(e.params["password"] == "***" for e in logins)  # the double's own log masks it
    refused = [e for e in double.log if e.status == 401]
    assert len(refused) == 1


def test_wrong_password(double: PveApiDouble, cert: Cert) -> None:
    settings = ticket_settings(double, cert, password=Secret("env:X", "wrong-pw-123"))
    with pytest.raises(HypervisorError, match=r"login to 127\.0\.0\.1") as info:
        ProxmoxAdapter("pve", settings).connect()
    assert "wrong-pw-123" not in str(info.value) and PASSWORD not in str(info.value)


def test_wrong_token_is_hypervisor_error(double: PveApiDouble, cert: Cert) -> None:
    settings = token_settings(double, cert, token_secret=Secret("env:X", "not-the-secret-42"))
    adapter = ProxmoxAdapter("pve", settings)
    with pytest.raises(HypervisorError) as info:
        adapter.connect()  # proxmoxer is lazy: connect itself asks (GET /version)
    assert adapter.requests == ["GET /version"]  # refused (401, below), nothing after it
    with pytest.raises(HypervisorError, match="authentication"):  # not left half-connected
        adapter.find_vm("db1")
    text = str(info.value)
    assert "authentication" in text and "token_id/token_secret" in text
    assert "not-the-secret-42" not in text and TOKEN_SECRET not in text


def test_tls_unknown_certificate_refused(double: PveApiDouble, cert: Cert, tmp_path: Path) -> None:
    other = make_cert(tmp_path, "other")
    settings = token_settings(double, cert, ca_file=str(other.cert))
    with pytest.raises(HypervisorError) as info:
        ProxmoxAdapter("pve", settings).connect()
    assert "TLS certificate of 127.0.0.1" in str(info.value) and "ca_file" in str(info.value)

    settings = token_settings(double, cert, ca_file=None)  # system CAs only: refused too
    with pytest.raises(HypervisorError, match="TLS"):
        ProxmoxAdapter("pve", settings).connect()


def test_tls_fingerprint_pin(double: PveApiDouble, cert: Cert, tmp_path: Path) -> None:
    settings = token_settings(double, cert, thumbprint=cert.sha256, ca_file=None)
    with ProxmoxAdapter("pve", settings) as adapter:
        assert adapter.find_vm("db1").id == "100"
    wrong = token_settings(double, cert, thumbprint=make_cert(tmp_path, "x").sha256)
    with pytest.raises(HypervisorError, match="TLS"):
        ProxmoxAdapter("pve", wrong).connect()
    # the ticket login goes through the pinned session too
    pinned = ticket_settings(double, cert, thumbprint=cert.sha256, ca_file=None)
    with ProxmoxAdapter("pve", pinned) as adapter:
        assert adapter.find_vm("ct1").id == "101"


def test_verify_tls_false_only_when_asked(double: PveApiDouble, cert: Cert) -> None:
    settings = token_settings(double, cert, verify_tls=False, ca_file=None)
    with ProxmoxAdapter("pve", settings) as adapter:
        assert adapter.find_vm("db1").id == "100"


def test_unreachable_host(cert: Cert, double: PveApiDouble) -> None:
    settings = token_settings(double, cert, port=1)
    with pytest.raises(HypervisorError, match="reach"):
        ProxmoxAdapter("pve", settings).connect()


def test_connect_asks_the_api_once_and_only_once(double: PveApiDouble, cert: Cert) -> None:
    with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
        assert isinstance(adapter, ProxmoxAdapter)
        assert adapter.requests == ["GET /version"]
        adapter.connect()  # already connected: nothing more
        adapter.find_vm("db1")
        assert adapter.requests == ["GET /version", "GET /cluster/resources"]
    # the double logs a request once it has answered it: the first one is logged by now
    assert (double.log[0].method, double.log[0].path, double.log[0].status) == (
        "GET",
        "/version",
        200,
    )


def test_only_needed_calls_for_a_snapshot(double: PveApiDouble, adapter: ProxmoxAdapter) -> None:
    vm = adapter.find_vm("db1")
    start = len(adapter.requests)
    adapter.create_snapshot(vm, "counted", "", memory=False, quiesce=False, timeout=T)
    made = adapter.requests[start:]
    assert made[0] == "POST /nodes/pve1/qemu/100/snapshot"
    assert all("/tasks/UPID:pve1:" in call and call.endswith("/status") for call in made[1:])


# -- a failed snapshot task --------------------------------------------------------------------
# A Proxmox task that ends in an error (not a lock, not a name clash) fails the call: the
# adapter reads the task's exit status and never reports a failed snapshot as taken. Against the
# strict API double over real HTTPS (tests/pve_api).


def test_a_failed_snapshot_task_raises_with_the_task_error(
    double: PveApiDouble, adapter: ProxmoxAdapter
) -> None:
    double.cluster.add_guest(300, "qemu", "pve1", "golden", template=True, status="stopped")
    vm = adapter.find_vm("golden")
    with pytest.raises(HypervisorError, match="template") as info:
        adapter.create_snapshot(vm, "snap-a", "x", memory=False, quiesce=False, timeout=T)
    assert not isinstance(info.value, SnapshotExists | SnapshotNotFound)
    assert info.value.vm == "golden"
    assert adapter.list_snapshots(vm) == []


def test_proxy_settings_of_the_environment_are_honoured(
    double: PveApiDouble, cert: Cert, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read once per session (not on every request), but still obeyed: a proxy that is not
    there fails the connection; NO_PROXY for the host bypasses it."""
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    unreachable = ProxmoxAdapter("pve", token_settings(double, cert))
    with pytest.raises(HypervisorError, match="cannot reach"), unreachable:
        unreachable.find_vm("db1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
        assert adapter.find_vm("db1").extra["vmid"] == 100
        assert adapter._session is not None and adapter._session.trust_env is False


# -- the guest agent freeze of backups (the freeze hook) ---------------------------------------


def test_backup_freeze_preflight_and_the_thaw_after_a_revert(
    double: PveApiDouble, adapter: ProxmoxAdapter
) -> None:
    db1 = adapter.find_vm("db1")
    adapter.check_backup_freeze(db1)  # agent "1": freeze-fs defaults to on
    with pytest.raises(UnsupportedOperation, match="containers have no guest agent"):
        adapter.check_backup_freeze(adapter.find_vm("ct1"))
    with pytest.raises(UnsupportedOperation, match="not enabled"):
        adapter.check_backup_freeze(adapter.find_vm("noagent"))
    # a guest that came back frozen (a snapshot taken inside the agent's freeze)
    assert adapter.thaw_filesystems(db1) is False, "thawed already: nothing to do"
    double.cluster.guests[100].fs_frozen = True
    assert adapter.thaw_filesystems(db1) is True
    assert double.cluster.guests[100].fs_frozen is False
    assert adapter.thaw_filesystems(adapter.find_vm("noagent")) is False


def test_the_thaw_after_a_revert_waits_for_the_agent_to_answer_again(
    double: PveApiDouble, adapter: ProxmoxAdapter
) -> None:
    """Right after a rollback the guest's qemu-ga (running in the restored RAM) is not seen yet:
    the API says "QEMU guest agent is not running". The thaw asks again until it answers."""
    db1 = adapter.find_vm("db1")
    guest = double.cluster.guests[100]
    guest.fs_frozen, guest.agent_running = True, False
    assert adapter.thaw_filesystems(db1) is False, "no wait: not answering counts as not frozen"
    assert guest.fs_frozen is True
    double.clear_log()
    back = threading.Timer(1.0, lambda: setattr(guest, "agent_running", True))
    back.start()
    try:
        assert adapter.thaw_filesystems(db1, wait=30) is True
    finally:
        back.cancel()
    assert guest.fs_frozen is False
    asked = [e for e in double.log if e.path.endswith("/agent/fsfreeze-status")]
    assert len(asked) >= 2 and asked[0].status != 200 and asked[-1].status == 200
    # an answer that cannot change is final at once: no agent configured, or the VM's agent off
    double.clear_log()
    assert adapter.thaw_filesystems(adapter.find_vm("noagent"), wait=30) is False
    assert not [e for e in double.log if "/agent/" in e.path], "no agent: never asked"


def test_the_thaw_after_a_revert_gives_up_when_the_agent_never_answers(
    double: PveApiDouble, adapter: ProxmoxAdapter
) -> None:
    """An agent that stays away (qemu-ga not started in the restored guest): the wait ends at
    ``wait`` seconds, nothing is thawed, and the revert goes on (its guest checks tell)."""
    db1 = adapter.find_vm("db1")
    guest = double.cluster.guests[100]
    guest.fs_frozen, guest.agent_running = True, False
    double.clear_log()
    started = time.monotonic()
    assert adapter.thaw_filesystems(db1, wait=1.5) is False
    waited = time.monotonic() - started
    assert waited >= 1.5, "gave up before its wait"
    assert guest.fs_frozen is True, "nothing answered, nothing thawed"
    asked = [e for e in double.log if e.path.endswith("/agent/fsfreeze-status")]
    assert len(asked) >= 3 and all(e.status != 200 for e in asked)
    assert not [e for e in double.log if e.path.endswith("/agent/fsfreeze-thaw")]

"""A Proxmox task that ends in an error (not a lock, not a name clash) fails the call: the
adapter reads the task's exit status and never reports a failed snapshot as taken. Against the
strict API double over real HTTPS (tests/pve_api)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from snapcoord.adapters.proxmox import ProxmoxAdapter
from snapcoord.errors import HypervisorError, SnapshotExists, SnapshotNotFound
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import Cert, make_cert, start_double, token_settings

T = 30.0


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("pve-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert)
    server.cluster.add_guest(300, "qemu", "pve1", "golden", template=True, status="stopped")
    yield server
    server.stop()


@pytest.fixture
def adapter(double: PveApiDouble, cert: Cert) -> Iterator[ProxmoxAdapter]:
    with ProxmoxAdapter("pve", token_settings(double, cert)) as connected:
        assert isinstance(connected, ProxmoxAdapter)
        yield connected


def test_a_failed_snapshot_task_raises_with_the_task_error(adapter: ProxmoxAdapter) -> None:
    vm = adapter.find_vm("golden")
    with pytest.raises(HypervisorError, match="template") as info:
        adapter.create_snapshot(vm, "snap-a", "x", memory=False, quiesce=False, timeout=T)
    assert not isinstance(info.value, SnapshotExists | SnapshotNotFound)
    assert info.value.vm == "golden"
    assert adapter.list_snapshots(vm) == []

"""Two coordinators against the real Debian 12 guest (docs/lease.md): two configurations with
stores of their own, one libvirt/QEMU guest with systemd and its real /run. While the first holds
the guest (``freeze``), the second's snapshot is refused with exit 75 naming the holder, and no
unit changes; after thaw the second takes its snapshot. Same guest as tests/test_realvm.py (the
QEMU group): it leaves every unit active and no lease behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from snapcoord.hooks.guest import lease
from tests.cli_helpers import json_lines, snapcoord, write_config
from tests.realvm_guest import RealGuest, real_guest  # noqa: F401 - fixture

pytestmark = pytest.mark.realvm

UNITS = ("apache2.service", "cron.service", "mariadb.service", "mariadb.socket")


def coordinator(guest: RealGuest, folder: Path) -> Path:
    folder.mkdir()
    return write_config(
        folder / "snapcoord.toml",
        {
            "defaults": {"store": str(folder / "store"), "label": "lease"},
            "hypervisors.qemu": {"type": "libvirt", "uri": guest.uri},
            "vms.guest": {"hypervisor": "qemu", "name": guest.domain},
            "vms.guest.guest": {
                **guest.guest_table(),
                "database": "auto",
                "watchdog_seconds": 120,
                "stop_timeout": 25.0,
            },
        },
    )


def units(guest: RealGuest) -> dict[str, str]:
    out = guest.ssh("systemctl is-active " + " ".join(UNITS), timeout=60).stdout.split()
    return dict(zip(UNITS, out, strict=True))


def guest_lease(guest: RealGuest) -> lease.LeaseRecord | None:
    proc = guest.ssh(f"cat {lease.LEASE_FILE}", timeout=60)
    if proc.returncode != 0:
        return None
    return lease.LeaseRecord.parse(proc.stdout.splitlines(), vm="guest")


def run_json(config: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = snapcoord("-c", str(config), *args, "--json", timeout=900)
    assert "Traceback" not in proc.stderr, proc.stderr
    (summary,) = json_lines(proc.stdout)
    return proc.returncode, summary, proc.stderr


def test_a_second_coordinator_is_refused_on_the_real_guest(
    real_guest: RealGuest, tmp_path: Path
) -> None:
    first, second = coordinator(real_guest, tmp_path / "a"), coordinator(real_guest, tmp_path / "b")
    assert set(units(real_guest).values()) == {"active"}
    frozen = snapcoord("-c", str(first), "freeze", "guest", "--max-seconds", "600", timeout=900)
    assert frozen.returncode == 0, frozen.stderr
    try:
        held = guest_lease(real_guest)
        assert held is not None and held.command == "freeze"
        quiet = units(real_guest)
        assert quiet["mariadb.service"] == "inactive" and quiet["apache2.service"] == "inactive"

        code, summary, stderr = run_json(second, "snapshot", "guest")
        assert code == 75, stderr
        assert (
            f"the guest is held by another coordinator: {held.holder()} since "
            f"{lease.utc(held.since)}" in stderr
        )
        assert "stop services" not in [s["name"] for s in summary["steps"]]
        assert units(real_guest) == quiet, "the second coordinator changed a unit"
        assert guest_lease(real_guest) == held
    finally:
        thawed = snapcoord("-c", str(first), "thaw", "guest", timeout=900)
    assert thawed.returncode == 0, thawed.stderr
    assert guest_lease(real_guest) is None
    assert set(units(real_guest).values()) == {"active"}

    code, summary, stderr = run_json(second, "snapshot", "guest")
    assert code == 0, stderr
    assert guest_lease(real_guest) is None
    assert set(units(real_guest).values()) == {"active"}
    # the snapshot it took goes again: the guest's other tests count theirs
    name = summary["snapshot"]
    deleted = snapcoord("-c", str(second), "delete", "guest", name, "--yes", timeout=600)
    assert deleted.returncode == 0, deleted.stderr

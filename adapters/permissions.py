"""TEMPORARY (lead): replaced by the setup helper's table at merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PROXMOX: dict[str, tuple[tuple[str, ...], ...]] = {
    "snapshot": (("VM.Audit",), ("VM.Snapshot",)),
    "prune": (("VM.Snapshot",),),
    # PVE 9 (qemu-server b92a40ce): VM.GuestAgent.*; PVE 8 (stable-bookworm): VM.Monitor
    "quiesce": (("VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted", "VM.Monitor"),),
}

VSPHERE: dict[str, tuple[tuple[str, ...], ...]] = {
    "snapshot": (("VirtualMachine.State.CreateSnapshot",),),
    "prune": (("VirtualMachine.State.RemoveSnapshot",),),
    "quiesce": (),
}


def required_privileges(
    table: Mapping[str, tuple[tuple[str, ...], ...]], operations: Sequence[str]
) -> list[tuple[str, ...]]:
    seen: list[tuple[str, ...]] = []
    for operation in operations:
        for need in table.get(operation, ()):
            if need not in seen:
                seen.append(need)
    return seen

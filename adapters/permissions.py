"""The hypervisor privileges snapcoord's API calls need, per operation: data only.

One place for them: docs/first-setup.md prints them (tests/test_first_setup.py checks that the
docs list exactly these) and ``snapcoord check`` compares them with what the token or session
really holds. Keys are operations as the CLI runs them; values are privilege IDs as the
hypervisor spells them.

Proxmox VE (privileges on :data:`PROXMOX_ACL_PATH`, or a pool or ``/vms`` above it), from the
``permissions`` of each endpoint the adapter calls (adapters/proxmox.py):

- proxmox/pve-docs ``api-viewer/apidata.js`` at e5010dcea566a205770572cfbc5fe0af220d5077;
- proxmox/qemu-server ``src/PVE/API2/Qemu.pm`` and ``src/PVE/API2/Qemu/Agent.pm`` at
  e6352be67f70042a7433a3a3c712b36d02f9f7cb (9.2.6); the PVE 8 agent privilege from
  ``Agent.pm`` before b92a40ce8a861e127ab3ab484b63544fba44a705 ("api: agent: use more specific
  guest agent privileges", first in qemu-server 9.0.3), i.e. at
  f485c9cbe717b9be612b70580f301d6cce115abb;
- proxmox/pve-container ``src/PVE/API2/LXC/Snapshot.pm`` at
  94f558522ef61f9858c39c264d0ac4e697e49268;
- proxmox/pve-manager ``PVE/API2/Tasks.pm`` and ``PVE/API2/Cluster.pm`` at
  14a22df35955d97dfc1af21e117dc894a29df0c9.

=========================================  =====================================================
call                                       permission
=========================================  =====================================================
GET /cluster/resources?type=vm             any user; lists only guests with VM.Audit on them
GET .../status/current, .../config         VM.Audit
GET .../snapshot                           VM.Audit
POST .../snapshot (also with vmstate=1)    VM.Snapshot
DELETE .../snapshot/{name}                 VM.Snapshot
POST .../snapshot/{name}/rollback          VM.Snapshot or VM.Snapshot.Rollback; with start=1 also
                                           VM.PowerMgmt (qemu-server 7ba9640b; snapcoord passes
                                           start=1 when the guest ran before the revert)
GET /nodes/{node}/tasks/{upid}/status      none for the task's owner (the token that started it)
POST .../agent/ping                        PVE 8: VM.Monitor; PVE 9: VM.GuestAgent.Audit
POST .../agent/fsfreeze-status             PVE 8: VM.Monitor; PVE 9: VM.GuestAgent.Audit or
                                           VM.GuestAgent.FileSystemMgmt
POST .../agent/fsfreeze-thaw               PVE 8: VM.Monitor; PVE 9: VM.GuestAgent.FileSystemMgmt
POST .../agent/exec, GET .../exec-status   PVE 8: VM.Monitor; PVE 9: VM.GuestAgent.Unrestricted
GET .../agent/file-read                    PVE 8: VM.Monitor; PVE 9: VM.GuestAgent.FileRead or
                                           VM.GuestAgent.Unrestricted
POST .../agent/file-write                  PVE 8: VM.Monitor; PVE 9: VM.GuestAgent.FileWrite or
                                           VM.GuestAgent.Unrestricted
=========================================  =====================================================

vSphere: the role's privileges on the VM, from VMware's API reference ("Required privilege" of
each method; pyvmomi's docs ``vim.VirtualMachine`` and ``vim.vm.Snapshot``). Reading inventory
and properties (SearchIndex, ContainerView, PropertyCollector, the task's own state) needs
``System.Read`` (with ``System.View`` and ``System.Anonymous``), which every vSphere role
contains and cannot drop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: Where the Proxmox VE role is granted (``pveum acl modify``); ``{vmid}`` is the guest's VMID.
PROXMOX_ACL_PATH = "/vms/{vmid}"

#: Proxmox VE privileges per operation (qemu VMs and lxc containers alike).
#: ``list``: list and status. ``snapshot``: a snapshot run (it prunes with the same privilege).
#: ``prune``: deleting old snapshots. ``revert``: a safety snapshot, the rollback, and starting
#: the guest again when it ran before. ``vzdump-hook``: the hook reads the VM's agent option.
PROXMOX: Mapping[str, tuple[str, ...]] = {
    "list": ("VM.Audit",),
    "snapshot": ("VM.Audit", "VM.Snapshot"),
    "prune": ("VM.Audit", "VM.Snapshot"),
    "revert": ("VM.Audit", "VM.PowerMgmt", "VM.Snapshot"),
    "vzdump-hook": ("VM.Audit",),
}

#: Proxmox VE guest agent privileges, per major version, per operation; needed only where the
#: agent is used: ``snapshot`` with ``quiesce = true`` (the agent ping), ``vzdump-hook`` (the
#: agent ping), ``revert`` to a snapshot taken inside a backup's freeze (fsfreeze-status, then
#: fsfreeze-thaw). PVE 9 replaced VM.Monitor with the VM.GuestAgent.* privileges.
PROXMOX_AGENT: Mapping[int, Mapping[str, tuple[str, ...]]] = {
    8: {
        "snapshot": ("VM.Monitor",),
        "vzdump-hook": ("VM.Monitor",),
        "revert": ("VM.Monitor",),
    },
    9: {
        "snapshot": ("VM.GuestAgent.Audit",),
        "vzdump-hook": ("VM.GuestAgent.Audit",),
        "revert": ("VM.GuestAgent.FileSystemMgmt",),  # it may also ask fsfreeze-status
    },
}

#: Proxmox VE privileges of the agent transport (``[vms.X.guest] transport = "agent"``), per
#: major version: exec, exec-status, file-read and file-write on ``/vms/{vmid}``. PVE 9 asks
#: VM.GuestAgent.Unrestricted for exec and exec-status (file-read and file-write would also take
#: VM.GuestAgent.FileRead / FileWrite, which Unrestricted covers); PVE 8 VM.Monitor for all.
PROXMOX_AGENT_TRANSPORT: Mapping[int, tuple[str, ...]] = {
    8: ("VM.Monitor",),
    9: ("VM.GuestAgent.Unrestricted",),
}

#: vSphere privileges per operation, on the VM (or a folder above it, propagated).
#: ``revert`` powers the VM on (or off) afterwards to keep the power state it had before.
VSPHERE: Mapping[str, tuple[str, ...]] = {
    "list": ("System.Read",),
    "snapshot": ("System.Read", "VirtualMachine.State.CreateSnapshot"),
    "prune": ("System.Read", "VirtualMachine.State.RemoveSnapshot"),
    "revert": (
        "System.Read",
        "VirtualMachine.Interact.PowerOff",
        "VirtualMachine.Interact.PowerOn",
        "VirtualMachine.State.CreateSnapshot",
        "VirtualMachine.State.RevertToSnapshot",
    ),
}


def union(
    table: Mapping[str, tuple[str, ...]], operations: Iterable[str] | None = None
) -> tuple[str, ...]:
    """The sorted union of the privileges of ``operations`` (all of ``table``'s when None);
    an operation the table does not know is a bug in the caller (KeyError)."""
    names = table.keys() if operations is None else operations
    return tuple(sorted({privilege for name in names for privilege in table[name]}))


def proxmox_privileges(
    operations: Iterable[str] | None = None, *, agent: bool = False, pve_major: int = 8
) -> tuple[str, ...]:
    """Proxmox VE privileges for ``operations`` (all when None), with the guest agent's for
    ``pve_major`` when ``agent``."""
    names = list(PROXMOX) if operations is None else list(operations)
    base = union(PROXMOX, names)
    if not agent:
        return base
    agent_table = PROXMOX_AGENT[8 if pve_major < 9 else 9]
    extra = union(agent_table, [n for n in names if n in agent_table])
    return tuple(sorted({*base, *extra}))


def proxmox_agent_transport_privileges(pve_major: int) -> tuple[str, ...]:
    """What the agent transport needs on Proxmox VE ``pve_major``."""
    return PROXMOX_AGENT_TRANSPORT[8 if pve_major < 9 else 9]


def vsphere_privileges(operations: Iterable[str] | None = None) -> tuple[str, ...]:
    """vSphere privileges for ``operations`` (all when None)."""
    return union(VSPHERE, operations)

"""The one factory for guest transports: SSH and exec (snapcoord/guest.py) or the hypervisor's
guest agent (snapcoord/agent.py), built for a VM with its adapter.

A fourth transport (VMware Tools guest operations, for example) is one more class with the
:class:`~snapcoord.guest.Transport` methods (``run``, ``run_streaming``, ``open_channel``,
``detached``, ``reconnect``) and one more branch here; docs/architecture.md shows how.
"""

from __future__ import annotations

from dataclasses import replace

from snapcoord.adapters import open_adapter
from snapcoord.adapters.base import Adapter
from snapcoord.agent import AgentTransport
from snapcoord.agent_link import AgentLink
from snapcoord.guest import Transport, shell_transport
from snapcoord.settings import Config


def open_transport(config: Config, vm_key: str, *, adapter: Adapter | None = None) -> Transport:
    """Build (not yet open) the transport ``[vms.VM.guest]`` asks for. The agent transport
    reaches the guest through ``adapter`` (the run's hypervisor session, connected before the
    transport opens); without one it opens a session of its own and closes it with itself."""
    vm_cfg = config.vm(vm_key)
    guest = vm_cfg.guest
    assert guest is not None, "a transport needs [vms.X.guest]"
    if guest.transport != "agent":
        return shell_transport(guest, vm=vm_key)
    own = adapter is None
    session = adapter or open_adapter(vm_cfg.hypervisor, config.hypervisors[vm_cfg.hypervisor])

    def connect() -> AgentLink:
        if own:
            session.connect()
        return session.guest_agent(session.find_vm(vm_cfg.ref))

    # dump_transport = "ssh": the streams (dumps, archives, restores) keep the guest's sshd
    streams = (
        shell_transport(replace(guest, transport="ssh"), vm=vm_key)
        if guest.dump_transport == "ssh"
        else None
    )
    return AgentTransport(
        guest, connect, vm=vm_key, disconnect=session.close if own else None, streams=streams
    )

"""Which steps make a snapshot run, a revert, a delete, a restore-dump: the order from DESIGN.md,
one module per command on a shared context (context.py) and the guarded bracket (bracket.py).

Everything that can fail before a service is stopped is checked first (hypervisor, VM, snapshot
name, guest connection, sudo, services); nothing that can wait runs inside the service window.
"""

from snapcoord.plans.bracket import Bracket, WatchdogKeptArmed
from snapcoord.plans.context import RunContext, guest_connect_steps
from snapcoord.plans.delete import delete_steps
from snapcoord.plans.revert import revert_steps
from snapcoord.plans.snapshot import snapshot_steps

__all__ = [
    "Bracket",
    "RunContext",
    "WatchdogKeptArmed",
    "delete_steps",
    "guest_connect_steps",
    "revert_steps",
    "snapshot_steps",
]

"""The guest's clock after a revert.

A snapshot with RAM resumes the guest with the clock it had when the snapshot was taken: after
a revert it is behind by the time since (nothing in a plain Debian guest re-syncs it soon).
snapcoord measures the offset over SSH and, beyond :data:`TOLERANCE`, sets the clock through the
hypervisor (libvirt: the QEMU guest agent) or else with ``date`` in the guest, then checks again;
a clock it cannot set is reported with its offset.
"""

from __future__ import annotations

import logging
import time

from snapcoord.adapters.base import VM, Adapter
from snapcoord.errors import GuestError
from snapcoord.guest import Transport

log = logging.getLogger("snapcoord.guest_clock")

TOLERANCE = 2.0  # seconds: what a guest clock may be off after a revert without being set
# Through sh like every privileged command, so that one sudo rule (``/bin/sh``) covers them
# all (docs/first-setup.md); the time is an argument, never part of the script.
SET_CLOCK = 'exec date -u -s "$1"'


def offset(transport: Transport, *, vm: str, timeout: float) -> float:
    """Guest clock minus host clock, in seconds (the guest read at the round trip's middle)."""
    before = time.time()
    result = transport.run(["date", "+%s.%N"], timeout=timeout)
    after = time.time()
    try:
        guest = float(result.stdout.decode().strip())
    except ValueError:
        guest = None
    if not result.ok or guest is None:
        raise GuestError(f"cannot read the guest clock: {result.error_text()}", vm=vm)
    return guest - (before + after) / 2


def sync_after_revert(
    adapter: Adapter, vm: VM, transport: Transport, *, vm_key: str, sudo: bool, timeout: float
) -> str | None:
    """Set the guest clock when it is more than :data:`TOLERANCE` off; the note to show, or
    ``None`` when it was right."""
    before = offset(transport, vm=vm_key, timeout=timeout)
    if abs(before) <= TOLERANCE:
        return None
    # The hypervisor's word is not the verdict: a call that "succeeded" without effect (no
    # agent behind it) falls through to date in the guest, like one that failed.
    if adapter.set_guest_time(vm, time.time()) and (
        abs(offset(transport, vm=vm_key, timeout=timeout)) <= TOLERANCE
    ):
        how = "through the hypervisor's guest agent"
    else:
        how = "with date in the guest"
        argv = ["sh", "-c", SET_CLOCK, "sh", f"@{time.time():.3f}"]
        result = transport.run(argv, sudo=sudo, timeout=timeout)
        if not result.ok:
            log.warning("%s: setting the guest clock failed: %s", vm_key, result.error_text())
    after = offset(transport, vm=vm_key, timeout=timeout)
    if abs(after) <= TOLERANCE:
        return f"the guest clock was {before:+.1f} s off after the revert: set {how}"
    message = (
        f"the guest clock is {after:+.1f} s off after the revert and could not be set "
        "(enable time sync in the guest: chrony, systemd-timesyncd, or the hypervisor's agent)"
    )
    log.warning("%s: %s", vm_key, message)
    return message

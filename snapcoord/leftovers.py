"""What a run that did not finish left behind (power loss on the management host, kill -9, a
guest that was unreachable until its watchdog fired): the run journal names what it stopped.

:func:`check_unfinished_run`: every new run looks first (snapcoord/session.py). When everything
the journal names runs again and that run's watchdog is gone, the journal is cleared with a note
and the run goes on, so one network blip does not stall a nightly schedule. Otherwise it refuses
(exit 4) and points to ``snapcoord recover`` (snapcoord/recover.py).
"""

from __future__ import annotations

from typing import Any

from snapcoord.config import Config
from snapcoord.errors import GuestError, PreflightError
from snapcoord.guest import open_transport
from snapcoord.hooks.guest import watchdog
from snapcoord.hooks.guest.services import Services

#: The journal's ``pending`` names this undo from just before a watchdog is armed.
DISARM = "disarm guest watchdog"


def unfinished(data: dict[str, Any]) -> bool:
    """Whether a journal's run may have left something behind in the guest."""
    return bool(data.get("stopped") or data.get("watchdog") or DISARM in data.get("pending", []))


def check_unfinished_run(config: Config, vm_key: str, data: dict[str, Any]) -> str:
    """Look in the guest whether the unfinished run ``data`` left anything behind. Returns the
    note to show when nothing is left; raises :class:`PreflightError` otherwise."""
    run = data.get("run")
    stopped = [str(s) for s in data.get("stopped") or []]
    dog = watchdog.Watchdog.from_dict(data["watchdog"]) if data.get("watchdog") else None
    hint = f"run: snapcoord recover {vm_key}"
    refuse = (
        f"run {run} did not finish and may have left {', '.join(stopped) or 'services'} stopped"
    )
    guest = config.vm(vm_key).guest
    if guest is None:
        raise PreflightError(refuse, vm=vm_key, hint=hint)
    transport = open_transport(guest, vm=vm_key)
    try:
        transport.open()
        services = Services(transport, guest, vm=vm_key)
        state = services.probe(warm=False)
        down = [s for s in stopped if not state.running.get(s)]
        left = []
        if dog is not None or DISARM in data.get("pending", []):
            left = watchdog.running(
                transport,
                watchdog.run_id_of(dog.marker) if dog else str(run),
                vm=vm_key,
                sudo=guest.sudo,
                timeout=guest.command_timeout,
            )
    except GuestError as exc:
        raise PreflightError(
            f"{refuse}; the guest cannot be checked: {exc.message}", vm=vm_key, hint=hint
        ) from exc
    finally:
        transport.close()
    if down:
        raise PreflightError(
            f"run {run} did not finish and left {', '.join(down)} stopped", vm=vm_key, hint=hint
        )
    if left:
        raise PreflightError(
            f"run {run} did not finish and its guest watchdog is still armed (pid "
            f"{', '.join(map(str, left))})",
            vm=vm_key,
            hint=f"wait until it has fired, or {hint}",
        )
    found = f"{', '.join(stopped)} running" if stopped else "nothing stopped"
    return f"run {run} did not finish; found {found} and no watchdog of it: cleared its journal"

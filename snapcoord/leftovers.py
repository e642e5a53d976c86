"""What a run that did not finish left behind (power loss on the management host, kill -9, a
guest that was unreachable until its watchdog fired): the run journal names what it stopped.

:func:`check_unfinished_run`: every new run looks first (snapcoord/session.py). When everything
the journal names runs again and that run's watchdog is gone, the journal is cleared with a note
and the run goes on, so one network blip does not stall a nightly schedule. Otherwise it refuses
(exit 4) and points to ``snapcoord recover`` (snapcoord/recover.py).
"""

from __future__ import annotations

import json

from snapcoord.config import Config
from snapcoord.errors import GuestError, PreflightError
from snapcoord.hooks import databases
from snapcoord.hooks.guest import watchdog
from snapcoord.hooks.guest.services import Services
from snapcoord.journal import Journal, RunRecord
from snapcoord.transports import open_transport

#: The journal's ``pending`` names this undo from just before a watchdog is armed.
DISARM = "disarm guest watchdog"


def read_record(config: Config, vm_key: str) -> RunRecord | None:
    """The VM's run journal as a checked record; None without one. A journal that is not what
    snapcoord wrote (a service the configuration does not name, a foreign PID or marker)
    raises :class:`snapcoord.journal.CorruptJournal` (exit 4) and nothing in it is acted on."""
    journal = Journal(config.store, vm_key)
    text = journal.read_bytes()  # a link is not followed: CorruptJournal
    if text is None:
        return None
    data: object
    try:
        data = json.loads(text)
    except ValueError:
        data = "unreadable JSON"
    return RunRecord.parse(data, services=services_of(config, vm_key), vm=vm_key, path=journal.path)


def services_of(config: Config, vm_key: str) -> frozenset[str]:
    """Every service a run of this VM may stop: the configured ones and its database's."""
    guest = config.vm(vm_key).guest
    if guest is None:
        return frozenset()
    names = set(guest.services)
    if guest.database == "auto":
        names.update(databases.auto_candidates())
    elif guest.database != "none":
        names.add(guest.database)
    return frozenset(names)


def unfinished(record: RunRecord) -> bool:
    """Whether a journal's run may have left something behind in the guest."""
    return bool(record.stopped or record.watchdog or DISARM in record.pending)


def check_unfinished_run(config: Config, vm_key: str, record: RunRecord) -> str:
    """Look in the guest whether the unfinished run ``record`` left anything behind. Returns
    the note to show when nothing is left; raises :class:`PreflightError` otherwise."""
    run = record.run
    stopped = list(record.stopped)
    dog = record.watchdog
    hint = f"run: snapcoord recover {vm_key}"
    refuse = (
        f"run {run} did not finish and may have left {', '.join(stopped) or 'services'} stopped"
    )
    guest = config.vm(vm_key).guest
    if guest is None:
        raise PreflightError(refuse, vm=vm_key, hint=hint)
    transport = open_transport(config, vm_key)
    try:
        transport.open()
        services = Services(transport, guest, vm=vm_key)
        state = services.probe(warm=False)
        down = [s for s in stopped if not state.running.get(s)]
        left = []
        if dog is not None or DISARM in record.pending:
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

"""``snapcoord recover VM``: after a run that did not finish, start what its journal says was
stopped, then disarm its watchdog (snapcoord/leftovers.py says what a journal means)."""

from __future__ import annotations

import os
import socket

from snapcoord.config import Config
from snapcoord.errors import ExitCode, PreflightError, ServiceNotRestored, SnapcoordError
from snapcoord.hooks.guest import lease, watchdog
from snapcoord.hooks.guest.services import Services
from snapcoord.leftovers import DISARM, read_record, unfinished
from snapcoord.naming import new_run_id
from snapcoord.outcome import Outcome
from snapcoord.run import ServiceWindow
from snapcoord.session import Session
from snapcoord.transports import open_transport


def recover_vm(config: Config, key: str) -> Outcome:
    """:func:`recover` as an outcome (``actions``: what it did), so that several VMs can be
    recovered at once, each on its own: one that fails never stops the others."""
    try:
        actions = recover(config, key)
    except SnapcoordError as exc:
        return Outcome.failed(key, "recover", exc, actions=[])
    summary = {"vm": key, "ok": True, "exit_code": 0, "command": "recover", "actions": actions}
    lines = [f"{key}: {action}" for action in actions]
    return Outcome(key, ExitCode.OK, {**summary, "errors": []}, lines)


def recover(config: Config, vm_key: str) -> list[str]:
    vm_cfg = config.vm(vm_key)
    run_id = new_run_id()
    with Session(config, vm_key, run_id) as session:  # a live run holds it: exit 75
        journal = session.journal
        record = read_record(config, vm_key)
        if record is None:
            return ["nothing to recover: no unfinished run"]
        stopped = list(record.stopped)
        if not unfinished(record):
            journal.clear()
            return [f"run {record.run} left nothing stopped"]
        if vm_cfg.guest is None:
            raise PreflightError(
                "the journal names guest services but the VM has no [guest]", vm=vm_key
            )
        transport = open_transport(config, vm_key)
        transport.open()
        lines = []
        guest = vm_cfg.guest
        holder = lease.Holder.of(
            host=socket.gethostname(), pid=os.getpid(), run=run_id, command="recover"
        )
        held = False
        try:
            # another coordinator's run in the guest: refuse (exit 75) before starting anything
            # (the lease of the run it recovers is taken over: the VM lock proves it gone)
            lease.take(transport, holder, seconds=guest.watchdog_seconds, vm=vm_key,
                       sudo=guest.sudo, timeout=guest.command_timeout,
                       take_over=[record.run])  # fmt: skip
            held = True
            services = Services(transport, vm_cfg.guest, vm=vm_key)
            state = services.probe()
            state.stopped = list(stopped)
            window = ServiceWindow()
            database = record.database
            if database and database in stopped:
                services.start_database(window)
                lines.append(f"started {database}")
            others = [s for s in stopped if s != database]
            if others:
                services.start(others, window)
                lines.append(f"started {', '.join(others)}")
            dogs = [record.watchdog] if record.watchdog else []
            if not dogs and DISARM in record.pending:  # killed while arming it
                sudo, timeout = (
                    vm_cfg.guest.sudo,
                    vm_cfg.guest.command_timeout,
                )
                run = record.run
                pids = watchdog.running(transport, run, vm=vm_key, sudo=sudo, timeout=timeout)
                dogs = [watchdog.Watchdog(pid, watchdog.MARKER_PREFIX + run, 0, ()) for pid in pids]
            for dog in dogs:
                outcome = watchdog.disarm(
                    transport,
                    dog,
                    env=services.script_env(),
                    vm=vm_key,
                    sudo=vm_cfg.guest.sudo,
                    timeout=vm_cfg.guest.command_timeout,
                )
                if outcome.down:
                    raise ServiceNotRestored(
                        f"{', '.join(outcome.down)} down again: the watchdog stays armed",
                        vm=vm_key,
                    )
                lines.append(
                    "disarmed the watchdog" if outcome.was_armed else "the watchdog had already run"
                )
        finally:
            if held:
                lease.release(transport, run_id, vm=vm_key, sudo=guest.sudo,
                              timeout=guest.command_timeout)  # fmt: skip
            transport.close()
        journal.clear()
        return lines or ["nothing was left stopped"]

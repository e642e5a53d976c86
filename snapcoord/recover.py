"""`snapcoord recover VM`: after a crash (power loss on the management host, kill -9), start what
the unfinished run's journal says it stopped, and disarm its watchdog."""

from __future__ import annotations

from snapcoord.config import Config
from snapcoord.errors import PreflightError
from snapcoord.guest import open_transport
from snapcoord.hooks import watchdog
from snapcoord.hooks.services import Services
from snapcoord.journal import Journal
from snapcoord.lock import VMLock
from snapcoord.naming import new_run_id
from snapcoord.run import ServiceWindow


def recover(config: Config, vm_key: str) -> list[str]:
    vm_cfg = config.vm(vm_key)
    journal = Journal(config.store, vm_key)
    with VMLock(config.store, vm_key, new_run_id()):  # a live run holds it: exit 75
        data = journal.read()
        if data is None:
            return ["nothing to recover: no unfinished run"]
        stopped = [str(s) for s in data.get("stopped") or []]
        if not stopped and not data.get("watchdog"):
            journal.clear()
            return [f"run {data.get('run')} left nothing stopped"]
        if vm_cfg.guest is None:
            raise PreflightError(
                "the journal names guest services but the VM has no [guest]", vm=vm_key
            )
        transport = open_transport(vm_cfg.guest, vm=vm_key)
        transport.open()
        lines = []
        try:
            services = Services(transport, vm_cfg.guest, vm=vm_key)
            state = services.probe()
            state.stopped = list(stopped)
            window = ServiceWindow()
            database = data.get("database")
            if database and database in stopped:
                services.start_database(window)
                lines.append(f"started {database}")
            others = [s for s in stopped if s != database]
            if others:
                services.start(others, window)
                lines.append(f"started {', '.join(others)}")
            wd = data.get("watchdog")
            if wd:
                dog = watchdog.Watchdog(
                    int(wd["pid"]),
                    str(wd["marker"]),
                    int(wd["seconds"]),
                    tuple(wd.get("services", ())),
                )
                sudo = bool(vm_cfg.guest.get("sudo"))
                timeout = float(vm_cfg.guest["command_timeout"])
                armed = watchdog.disarm(transport, dog, vm=vm_key, sudo=sudo, timeout=timeout)
                lines.append("disarmed the watchdog" if armed else "the watchdog had already run")
        finally:
            transport.close()
        journal.clear()
        return lines or ["nothing was left stopped"]

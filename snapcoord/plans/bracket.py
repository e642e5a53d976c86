"""The guarded part of a run: arm the watchdog, stop the services (and the database); the undos
start exactly those again and disarm the watchdog."""

from __future__ import annotations

import time
from datetime import datetime

from snapcoord.errors import (
    GuestError,
    ServiceNotRestored,
)
from snapcoord.hooks.guest import watchdog
from snapcoord.hooks.guest.services import GuestServices
from snapcoord.plans.context import RunContext
from snapcoord.reconnect import reconnecting
from snapcoord.run import Step


class Bracket:
    """The guarded part of a run: arm the watchdog, stop the services that run (and, for a
    snapshot, the database); the undos start exactly those again and disarm the watchdog.
    Shared by the snapshot and the restore-dump plans."""

    def __init__(self, ctx: RunContext) -> None:
        assert ctx.services is not None and ctx.transport is not None
        self.ctx = ctx
        self.services = ctx.services
        self.transport = ctx.transport
        guest = ctx.guest
        self.guest = guest
        self.parallel = guest.parallel_services
        self.sudo = guest.sudo
        self.timeout = guest.command_timeout
        self.database = False
        #: the still-stopped check runs at the end of the last stop's script (see steps())
        self.check_in_last_stop = False
        self.services_stop_last = False
        self._arming = False  # arm() started: the guest may run a watchdog not yet recorded

    def steps(
        self, *, database: bool, check_in_last_stop: bool = False, services_last: bool = False
    ) -> list[Step]:
        """``check_in_last_stop``: the still-stopped check follows the last stop directly
        (:meth:`Services.confirm_still_stopped`), so the last stop's script runs it: the
        database's stop, or the services' stop when it is the last (``services_last``: no step
        between it and the check, and no database stop after it)."""
        self.database = database
        self.check_in_last_stop = check_in_last_stop
        self.services_stop_last = services_last
        names = ", ".join(self.guest.services)
        steps = [
            Step(
                "arm guest watchdog",
                self.arm,
                self.disarm,
                undo_name="disarm guest watchdog",
                undo_first=True,  # journalled before arming: a kill mid-arm is still looked for
                describe=f"restarts stopped services after {self.guest.watchdog_seconds} s",
            ),
            Step(
                "stop services",
                self.stop_services,
                self.start_services,
                undo_first=True,
                undo_name="start services",
                describe=f"{names} (those running)" + (", in parallel" if self.parallel else ""),
            ),
        ]
        if database:
            steps.append(
                Step(
                    "stop database",
                    self.stop_database,
                    self.start_database,
                    undo_first=True,
                    undo_name="start database",
                    describe=f"database={self.guest.database}",
                )
            )
        return steps

    @property
    def state(self) -> GuestServices:
        assert self.services.state is not None, "probe the services first"
        return self.services.state

    def arm(self) -> None:
        if self.ctx.lease is not None:  # ends no later than the watchdog fires (guest clock)
            self.ctx.lease.renew(self.guest.watchdog_seconds)
        st = self.state
        database = st.database if self.database and st.database_running else None
        order = ([database] if database else []) + list(reversed(st.to_stop()))
        if not order:
            return
        self.services.budget.guard_watchdog(time.monotonic(), self.guest.watchdog_seconds)
        self._arming = True
        self.ctx.watchdog = watchdog.arm(
            self.transport,
            vm=self.ctx.key,
            run_id=self.ctx.run_id,
            init=st.init,
            seconds=self.guest.watchdog_seconds,
            services=order,
            database=database,
            sudo=self.sudo,
            timeout=self.timeout,
            triggers=self.services.triggers_text(),
        )
        self.services.guard = self.ctx.watchdog.marker if self.ctx.watchdog.guarded else None

    def disarm(self) -> None:
        """Disarm only once everything the watchdog guards runs again; otherwise leave it armed
        (it will start what is down) and say when it fires."""
        dog = self.ctx.watchdog
        if dog is None:
            self._disarm_unrecorded()
            return
        down = self.ctx.window.still_down
        if down:
            raise WatchdogKeptArmed(dog, down, vm=self.ctx.key)
        retried = False

        def attempt() -> watchdog.Disarmed:
            nonlocal retried
            retried = retried or self.transport.generation != generation
            return watchdog.disarm(
                self.transport,
                dog,
                env=self.services.script_env(),
                vm=self.ctx.key,
                sudo=self.sudo,
                timeout=self.timeout,
            )

        generation = self.transport.generation
        outcome = reconnecting(
            self.transport,
            attempt,
            what=f"{self.ctx.key}: disarming the guest watchdog",
            budget=self.services.budget,
        )
        if outcome.down:
            raise WatchdogKeptArmed(dog, list(outcome.down), vm=self.ctx.key)
        self.ctx.watchdog = None
        if outcome.was_armed:
            return
        if retried:  # an attempt cut short may have disarmed it already
            self.ctx.notes.append("the guest watchdog was gone when disarming it again")
            return
        raise GuestError(
            f"the guest watchdog had already fired after {dog.seconds} s: services were "
            "restarted while the run was still working",
            vm=self.ctx.key,
            hint="raise watchdog_seconds above the service window and run again",
        )

    def _disarm_unrecorded(self) -> None:
        """Arming was cut short (a signal, a lost connection) after the guest may have started
        the watchdog: find it by this run's marker. Nothing was stopped yet, so it goes."""
        if not self._arming:
            return
        pids = watchdog.running(
            self.transport, self.ctx.run_id, vm=self.ctx.key, sudo=self.sudo, timeout=self.timeout
        )
        for pid in pids:
            marker = watchdog.MARKER_PREFIX + self.ctx.run_id
            watchdog.disarm(
                self.transport,
                watchdog.Watchdog(pid, marker, 0, ()),
                env=self.services.script_env(),
                vm=self.ctx.key,
                sudo=self.sudo,
                timeout=self.timeout,
            )

    def stop_services(self) -> None:
        last = self.services_stop_last and not (self.database and self.state.database_running)
        self.services.stop(
            self.state.to_stop(),
            self.ctx.window,
            parallel=self.parallel,
            check=self.check_in_last_stop and last,
        )

    def start_services(self) -> None:
        st = self.state
        names = [s for s in st.services if s in st.stopped]
        self.services.start(names, self.ctx.window, parallel=self.parallel)

    def stop_database(self) -> None:
        if self.state.database_running:
            self.services.stop_database(self.ctx.window, check=self.check_in_last_stop)

    def start_database(self) -> None:
        st = self.state
        if st.database is not None and st.database in st.stopped:
            self.services.start_database(self.ctx.window)


class WatchdogKeptArmed(ServiceNotRestored):
    """Something the watchdog guards is down: it stays armed and will start it."""

    def __init__(self, dog: watchdog.Watchdog, down: list[str], *, vm: str) -> None:
        self.down = down
        self.fires_at = dog.fires_at
        left = dog.fires_at - time.time()
        when = datetime.fromtimestamp(dog.fires_at).strftime("%H:%M:%S")
        due = f"in {left:.0f} s" if left >= 1 else "due now"
        them = "it" if len(down) == 1 else "them"
        super().__init__(
            f"{', '.join(down)} still down; the guest watchdog will start {them} at {when} ({due})",
            vm=vm,
            hint=f"if not, run: snapcoord recover {vm}",
        )

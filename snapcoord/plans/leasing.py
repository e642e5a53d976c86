"""A run's hold on its guest (hooks/guest/lease.py): the lease is taken in preflight, right after
the guest probe and before anything is stopped; renewed right before the watchdog is armed
(until it fires) or commits are held (until the guest ends the lock session); released by the
last undo before the guest connection closes, once everything is back."""

from __future__ import annotations

import os
import re
import socket
from typing import TYPE_CHECKING

from snapcoord.errors import GuestError
from snapcoord.hooks.guest import lease
from snapcoord.run import Step

if TYPE_CHECKING:
    from snapcoord.plans.context import RunContext


class GuestLease:
    """The lease of one run (``ctx``) in its guest, taken over ``ctx.transport``."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.held = False  # a take was sent: the undo releases (a no-op if it never landed)
        self.record: lease.LeaseRecord | None = None
        #: runs of this coordinator whose lease this run may take over: the unfinished run its
        #: journal names, once the guest was checked (snapcoord/session.py); its VM lock
        #: proves that run is gone
        self.inherit: tuple[str, ...] = ()

    def _holder(self) -> lease.Holder:
        command = re.sub(r"[^a-z-]", "-", self.ctx.command.lower()).strip("-") or "run"
        return lease.Holder.of(
            host=socket.gethostname(), pid=os.getpid(), run=self.ctx.run_id, command=command[:32]
        )

    def step(self) -> Step:
        return Step(
            "take guest lease",
            self.take,
            self.release,
            undo_name="release guest lease",
            undo_first=True,  # the take may land in the guest even if its answer is lost
            describe=f"{lease.LEASE_FILE} in the guest: refuse (exit 75) if another "
            f"coordinator holds it; until the guest's clock + {self.ctx.guest.watchdog_seconds} s",
        )

    def take(
        self,
        seconds: float | None = None,
        *,
        take_over: tuple[str, ...] = (),
        taken_before: int = 0,
    ) -> lease.Taken:
        """Take or renew the lease for ``seconds`` (default: ``watchdog_seconds``)."""
        ctx = self.ctx
        assert ctx.transport is not None
        was_held, self.held = self.held, True
        try:
            taken = self._take(seconds, take_over + self.inherit, taken_before)
        except (lease.GuestBusy, lease.CorruptLease, lease.UnsafeLeaseDir):
            self.held = was_held  # refused: the guest wrote nothing (a renewal stays held)
            raise
        self.record = taken.record
        old = taken.replaced
        if old is not None:
            why = "expired" if taken.now >= old.expires else "resurrected by the revert"
            ctx.notes.append(
                f"took over the guest lease of {old.holder()} since {lease.utc(old.since)} ({why})"
            )
        return taken

    def _take(
        self, seconds: float | None, take_over: tuple[str, ...], taken_before: int
    ) -> lease.Taken:
        ctx = self.ctx
        assert ctx.transport is not None
        return lease.take(
            ctx.transport,
            self._holder(),
            seconds=int(seconds if seconds is not None else ctx.guest.watchdog_seconds),
            vm=ctx.key,
            sudo=ctx.guest.sudo,
            timeout=ctx.guest.command_timeout,
            take_over=take_over,
            taken_before=taken_before,
        )

    def renew(self, seconds: float) -> None:
        """Before the watchdog is armed or commits are held: the lease then ends no later than
        they do, by the guest's clock. Refuses (exit 75) if another run took it meanwhile."""
        if self.held:
            self.take(seconds)

    def release(self) -> None:
        """Remove the lease if it is still this run's. A failure is a note: the lease then ends
        at its expiry on its own."""
        if not self.held:
            return
        ctx = self.ctx
        assert ctx.transport is not None
        from snapcoord.reconnect import reconnecting

        def attempt() -> str:
            assert ctx.transport is not None
            return lease.release(
                ctx.transport,
                ctx.run_id,
                vm=ctx.key,
                sudo=ctx.guest.sudo,
                timeout=ctx.guest.command_timeout,
            )

        try:
            if ctx.services is not None:
                verdict = reconnecting(
                    ctx.transport,
                    attempt,
                    what=f"{ctx.key}: releasing the guest lease",
                    budget=ctx.services.budget,
                )
            else:
                verdict = attempt()
        except GuestError as exc:
            until = f" at {lease.utc(self.record.expires)}" if self.record else ""
            ctx.notes.append(
                f"the guest lease could not be released ({exc.message}): it ends{until} "
                "(guest clock)"
            )
            return
        self.held = False
        if verdict == "other":
            ctx.notes.append("the guest lease was another run's when releasing it: left to it")

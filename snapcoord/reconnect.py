"""Guest actions that survive a lost connection: reconnect and repeat, within a budget.

Used for everything that puts the guest back (starting services, disarming the watchdog): a
connection that drops while services are down must not leave them down. Only transient failures
(:class:`~snapcoord.guest.GuestUnreachable`: a lost or stalled connection, a refused connect) are
retried; a host key or authentication failure is not. The budget ends well before the guest
watchdog fires, so snapcoord and the watchdog never both act at the last moment, and the run ends
in time to say what it left to the watchdog.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from snapcoord.guest import GuestUnreachable, Transport

log = logging.getLogger("snapcoord.reconnect")

T = TypeVar("T")

#: The budget ends this long before the guest watchdog fires.
WATCHDOG_MARGIN = 10.0


@dataclass
class ReconnectBudget:
    """How long one action may keep retrying: at most ``seconds`` from its first failure (so an
    attempt that timed out still gets another), and never past ``hard_deadline`` (monotonic;
    set when a watchdog is armed)."""

    seconds: float
    hard_deadline: float | None = None

    def guard_watchdog(self, armed_at: float, watchdog_seconds: float) -> None:
        """``armed_at``: monotonic time just before the watchdog was started."""
        self.hard_deadline = armed_at + watchdog_seconds - WATCHDOG_MARGIN

    def deadline(self, first_failure: float) -> float:
        hard = math.inf if self.hard_deadline is None else self.hard_deadline
        return min(first_failure + self.seconds, hard)


def reconnecting(
    transport: Transport, action: Callable[[], T], *, what: str, budget: ReconnectBudget
) -> T:
    """Run ``action``; on a transient guest failure reconnect ``transport`` and run it again
    until it succeeds or the budget is spent (then the last failure is raised, saying so).
    ``action`` must be safe to repeat (a start of a running service is a no-op)."""
    started = time.monotonic()
    deadline = math.inf  # set at the first failure
    state = {"calls": 0, "generation": transport.generation}

    def once() -> T:
        state["calls"] += 1
        if state["calls"] > 1:
            transport.reconnect(state["generation"])  # may fail: retried like the action
        state["generation"] = transport.generation
        return action()

    failures: list[GuestUnreachable] = []

    def out_of_budget(retry_state: RetryCallState) -> bool:
        nonlocal deadline
        if deadline == math.inf:
            deadline = budget.deadline(time.monotonic())
        return time.monotonic() >= deadline

    def log_failure(retry_state: RetryCallState) -> None:
        failure = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(failure, GuestUnreachable):
            failures.append(failure)
        log.warning(
            "%s: %s; reconnecting (%.0f s left)",
            what,
            getattr(failure, "message", failure),
            max(0.0, deadline - time.monotonic()),
        )

    retrying = Retrying(
        retry=retry_if_exception_type(GuestUnreachable),
        stop=out_of_budget,
        wait=wait_exponential(multiplier=0.5, max=3),
        before_sleep=log_failure,
        sleep=lambda seconds: time.sleep(min(seconds, max(0.0, deadline - time.monotonic()))),
        reraise=True,
    )
    try:
        return retrying(once)
    except GuestUnreachable as exc:
        if state["calls"] == 1:
            raise  # the budget allowed no second attempt
        first = failures[0]
        last = "" if exc.message == first.message else f", last: {exc.message}"
        raise type(first)(
            f"{first.message}; gave up after {state['calls']} attempts in "
            f"{time.monotonic() - started:.0f} s{last}",
            vm=first.vm,
            hint=first.hint,
        ) from exc

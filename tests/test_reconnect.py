"""Reconnect and retry: the budget logic with a scripted transport, then the real SSH transport
against the loopback sshd with the server side of its connection killed (TESTING-NOTES: killing
the sshd processes that serve a connection cuts the ControlMaster and its warm shells while the
guest stays reachable)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from snapcoord.errors import GuestError
from snapcoord.guest import ConnectionLost, GuestUnreachable, NoAnswer, SshTransport
from snapcoord.reconnect import WATCHDOG_MARGIN, ReconnectBudget, reconnecting
from tests import lab
from tests.test_guest_transport import table

# -- the budget, with a scripted transport -----------------------------------------------------


class ScriptedTransport:
    """Counts reconnects; ``reconnect_failures`` makes the first N reconnects fail."""

    def __init__(self, reconnect_failures: int = 0, reconnect_error: GuestError | None = None):
        self.generation = 0
        self.reconnects: list[int] = []
        self.reconnect_failures = reconnect_failures
        self.reconnect_error = reconnect_error

    def reconnect(self, generation: int) -> None:
        self.reconnects.append(generation)
        if self.reconnect_error is not None:
            raise self.reconnect_error
        if self.reconnect_failures:
            self.reconnect_failures -= 1
            raise GuestUnreachable("connection refused", vm="db1")
        self.generation += 1


def failing(times: int, error: Callable[[], GuestError]) -> Callable[[], str]:
    calls = {"n": 0}

    def action() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return f"ok after {calls['n']}"

    return action


def test_a_lost_connection_is_reconnected_and_the_action_repeated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = ScriptedTransport()
    action = failing(2, lambda: ConnectionLost("lost the SSH connection to db1", vm="db1"))
    with caplog.at_level(logging.WARNING, logger="snapcoord.reconnect"):
        result = reconnecting(
            transport,  # type: ignore[arg-type]
            action,
            what="db1: starting mariadb",
            budget=ReconnectBudget(30),
        )
    assert result == "ok after 3"
    assert transport.reconnects == [0, 1]  # each reconnect names the generation that failed
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and all("starting mariadb" in m and "reconnecting" in m for m in logged)


def test_a_failed_reconnect_is_retried_too() -> None:
    transport = ScriptedTransport(reconnect_failures=2)
    action = failing(1, lambda: NoAnswer("no answer within 5 s", vm="db1"))
    result = reconnecting(
        transport,  # type: ignore[arg-type]
        action,
        what="x",
        budget=ReconnectBudget(30),
    )
    assert result == "ok after 2"
    assert len(transport.reconnects) == 3


def test_host_key_or_login_failures_are_not_retried() -> None:
    transport = ScriptedTransport(reconnect_error=GuestError("host key verification failed"))
    action = failing(5, lambda: ConnectionLost("lost", vm="db1"))
    with pytest.raises(GuestError, match="host key") as info:
        reconnecting(transport, action, what="x", budget=ReconnectBudget(30))  # type: ignore[arg-type]
    assert not isinstance(info.value, GuestUnreachable)
    assert transport.reconnects == [0]  # one reconnect, no second


def test_a_plain_guest_error_is_not_retried() -> None:
    transport = ScriptedTransport()
    action = failing(1, lambda: GuestError("mariadb: unknown job"))
    with pytest.raises(GuestError, match="unknown job"):
        reconnecting(transport, action, what="x", budget=ReconnectBudget(30))  # type: ignore[arg-type]
    assert transport.reconnects == []


def test_the_budget_ends_the_retries_and_the_error_says_so() -> None:
    transport = ScriptedTransport(reconnect_failures=1000)
    action = failing(1000, lambda: ConnectionLost("lost the SSH connection to db1", vm="db1"))
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match=r"gave up after \d+ attempts in \d+ s") as info:
        reconnecting(transport, action, what="x", budget=ReconnectBudget(2.0))  # type: ignore[arg-type]
    spent = time.monotonic() - started
    assert 1.5 <= spent < 4.0
    assert "lost the SSH connection to db1" in info.value.message


def test_the_budget_ends_before_the_watchdog_fires() -> None:
    budget = ReconnectBudget(120)
    armed = time.monotonic()
    budget.guard_watchdog(armed, 30)
    assert budget.deadline(armed + 1) == pytest.approx(armed + 30 - WATCHDOG_MARGIN)
    assert ReconnectBudget(5).deadline(armed) == armed + 5  # no watchdog: from the failure
    # A watchdog that fires in less than the margin leaves no time for a second attempt.
    budget.guard_watchdog(time.monotonic(), WATCHDOG_MARGIN - 1)
    transport = ScriptedTransport()
    with pytest.raises(ConnectionLost) as info:
        reconnecting(
            transport,  # type: ignore[arg-type]
            failing(1, lambda: ConnectionLost("lost", vm="db1")),
            what="x",
            budget=budget,
        )
    assert transport.reconnects == []
    assert "gave up" not in info.value.message


# -- the real SSH transport ------------------------------------------------------------------


@pytest.mark.real
def test_the_ssh_transport_reconnects_after_the_server_side_died(ssh_guest: lab.SshGuest) -> None:
    transport = SshTransport(table(ssh_guest), vm="lab")
    transport.open()
    try:
        transport.warm(2, sudo=False)
        assert lab.cut_server_side(ssh_guest), "no sshd child served the connection"
        generation = transport.generation
        script = "echo a long remote script body; " * 20
        with pytest.raises(ConnectionLost) as info:
            transport.run(["sh", "-c", script], timeout=30)
        message = str(info.value)
        assert "lost the SSH connection" in message and "remote script body" not in message
        transport.reconnect(generation)
        assert transport.generation == generation + 1
        assert len(transport._idle[False]) == 2  # the warm shells came back
        result = transport.run(["echo", "back"], timeout=30)
        assert result.ok and result.stdout == b"back\n"
        transport.reconnect(generation)  # a stale generation: someone reconnected already
        assert transport.generation == generation + 1
    finally:
        control_dir = transport._dir
        transport.close()
    assert control_dir is not None
    assert [p for p, _c, args in lab.process_table() if control_dir in args] == []


@pytest.mark.real
def test_concurrent_failures_reconnect_once(ssh_guest: lab.SshGuest) -> None:
    transport = SshTransport(table(ssh_guest), vm="lab")
    transport.open()
    try:
        lab.cut_server_side(ssh_guest)
        generation = transport.generation
        threads = [
            threading.Thread(target=transport.reconnect, args=(generation,)) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert transport.generation == generation + 1
        assert transport.run(["true"], timeout=30).ok
    finally:
        transport.close()


@pytest.mark.real
def test_a_changed_host_key_on_reconnect_is_not_unreachable(ssh_guest: lab.SshGuest) -> None:
    guest_table = table(ssh_guest)
    transport = SshTransport(guest_table, vm="lab")
    transport.open()
    try:
        # the key "changed"
        transport.guest = replace(guest_table, known_hosts=str(ssh_guest.wrong_known_hosts))
        with pytest.raises(GuestError, match="host key") as info:
            transport.reconnect(transport.generation)
        assert not isinstance(info.value, GuestUnreachable)  # never retried
    finally:
        transport.close()


def test_an_attempt_that_timed_out_gets_another_within_the_budget() -> None:
    """The budget counts from the first failure: a start that timed out after the whole
    start_timeout (a stalled link) is still repeated once the connection is back."""
    transport = ScriptedTransport()
    calls = {"n": 0}

    def slow_then_ok() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(1.2)  # longer than the budget itself
            raise NoAnswer("no answer within 1 s", vm="db1")
        return "started"

    result = reconnecting(
        transport,  # type: ignore[arg-type]
        slow_then_ok,
        what="x",
        budget=ReconnectBudget(1.0),
    )
    assert result == "started" and transport.reconnects == [0]

"""The step engine: undo order, every undo runs, exit codes, signals, the service window."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from snapcoord.errors import (
    ExitCode,
    GuestError,
    HypervisorError,
    ServiceNotRestored,
    SnapshotFailed,
)
from snapcoord.run import Engine, ServiceWindow, SilentReporter, Step, run_parallel

NAMES = ["connect", "arm", "stop services", "stop database", "snapshot"]
FAILURES = {
    "connect": HypervisorError("down"),
    "arm": GuestError("no sh"),
    "stop services": GuestError("stop failed"),
    "stop database": GuestError("stop failed"),
    "snapshot": SnapshotFailed("task error"),
}


def _plan(log: list[str], fail_at: str | None, *, undo_fail: str | None = None) -> list[Step]:
    def do(name: str) -> None:
        log.append(f"do {name}")
        if name == fail_at:
            raise FAILURES[name]

    def undo(name: str) -> None:
        log.append(f"undo {name}")
        if name == undo_fail:
            raise ServiceNotRestored(f"{name} would not start")

    steps = []
    for name in NAMES:
        has_undo = name != "snapshot"
        steps.append(
            Step(
                name,
                lambda n=name: do(n),
                (lambda n=name: undo(n)) if has_undo else None,
                undo_first=name.startswith("stop"),
            )
        )
    return steps


@pytest.mark.parametrize("position", range(len(NAMES)))
def test_failure_at_every_position_unwinds_exactly_what_was_pushed(position: int) -> None:
    fail_at = NAMES[position]
    log: list[str] = []
    result = Engine().execute(_plan(log, fail_at))

    done = [f"do {n}" for n in NAMES[: position + 1]]
    # steps whose undo was pushed: those that succeeded, plus a failed "stop" (undo_first)
    pushed = [n for n in NAMES[:position] if n != "snapshot"]
    if fail_at.startswith("stop"):
        pushed.append(fail_at)
    assert log == done + [f"undo {n}" for n in reversed(pushed)]
    assert result.exit_code == FAILURES[fail_at].exit_code
    assert result.failures == [FAILURES[fail_at]]
    assert [r.name for r in result.records if not r.ok] == [fail_at]


def test_success_still_unwinds_everything_in_reverse() -> None:
    log: list[str] = []
    result = Engine().execute(_plan(log, None))
    assert result.ok and result.exit_code == ExitCode.OK
    assert log[-4:] == ["undo stop database", "undo stop services", "undo arm", "undo connect"]


def test_a_failing_undo_does_not_stop_the_others_and_a_service_left_down_gives_6() -> None:
    log: list[str] = []
    result = Engine().execute(_plan(log, "snapshot", undo_fail="stop database"))
    assert log[-4:] == ["undo stop database", "undo stop services", "undo arm", "undo connect"]
    assert [type(f) for f in result.failures] == [SnapshotFailed, ServiceNotRestored]
    assert result.exit_code == ExitCode.SERVICE_NOT_RESTORED


def test_a_bug_is_exit_1_and_still_unwinds() -> None:
    log: list[str] = []

    def broken() -> None:
        raise ZeroDivisionError("bug")

    steps = [Step("a", lambda: log.append("a"), lambda: log.append("undo a")), Step("b", broken)]
    result = Engine().execute(steps)
    assert log == ["a", "undo a"]
    assert result.exit_code == ExitCode.BUG
    assert len(result.bugs) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_inside_a_step_unwinds_and_exits_130(signum: int) -> None:
    log: list[str] = []
    started = threading.Event()

    def long_step() -> None:
        started.set()
        log.append("long")
        threading.Event().wait(10)  # interrupted by the signal handler
        log.append("never")

    def undo_that_gets_signalled() -> None:
        os.kill(os.getpid(), signum)  # a second signal during the unwind is ignored
        log.append("undo a")

    steps = [Step("a", lambda: None, undo_that_gets_signalled), Step("long", long_step)]
    timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signum))
    timer.start()
    result = Engine().execute(steps)
    timer.join()
    assert log == ["long", "undo a"]
    assert result.exit_code == ExitCode.INTERRUPTED
    assert signal.getsignal(signum) is not None  # handlers restored afterwards


def test_window_from_first_stop_to_last_confirmed_start() -> None:
    window = ServiceWindow()
    assert window.seconds is None
    window.stop_issued("apache2")
    window.stop_issued("mariadb")
    window.confirmed_running("mariadb")
    assert window.still_down == ["apache2"] and window.closed is None
    window.confirmed_running("apache2")
    assert window.closed is not None and window.still_down == []
    assert window.seconds == pytest.approx(window.closed - window.opened)  # type: ignore[operator]


def test_engine_reports_journal_changes_with_pending_undos() -> None:
    seen: list[list[str]] = []
    steps = [Step("a", lambda: None, lambda: None), Step("b", lambda: None, lambda: None)]
    Engine(on_change=lambda e: seen.append([s.name for s in e.pending_undos])).execute(steps)
    assert ["a", "b"] in seen and seen[-1] == []


def test_run_parallel_waits_for_all_then_raises_first_error() -> None:
    done: list[str] = []

    def slow() -> None:
        threading.Event().wait(0.2)
        done.append("slow")

    def bad() -> None:
        raise GuestError("x")

    with pytest.raises(GuestError):
        run_parallel([bad, slow])
    assert done == ["slow"]


class _Notes(SilentReporter):
    def __init__(self, taken: threading.Event) -> None:
        self.taken = taken
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.taken.set()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_parallel_actions_run_is_raised_once_every_one_has_ended(
    signum: int,
) -> None:
    """Parallel service stops in flight when a signal lands: the undo (which starts the
    services) runs only once every stop has ended, else it races them and leaves one down.
    ``taken`` is set when the engine took the signal, or (wrongly) when the undo runs."""
    log: list[str] = []
    taken = threading.Event()

    def first() -> None:
        os.kill(os.getpid(), signum)  # arrives while both actions are in flight
        taken.wait(10)  # a bound, not a timing assertion
        log.append("first ended")

    def second() -> None:
        taken.wait(10)
        log.append("second ended")

    def undo() -> None:
        taken.set()
        log.append("undo")

    reporter = _Notes(taken)
    steps = [Step("stop services", lambda: run_parallel([first, second]), undo, undo_first=True)]
    result = Engine(reporter).execute(steps)
    assert sorted(log[:2]) == ["first ended", "second ended"] and log[2:] == ["undo"]
    assert result.exit_code == ExitCode.INTERRUPTED
    name = signal.Signals(signum).name
    assert [n for n in reporter.notes if n.startswith(f"{name} received")]


def test_run_parallel_without_the_engine_raises_keyboard_interrupt_after_all_ended() -> None:
    """Another SIGINT handler (Ctrl-C outside a run) runs only once every action has ended,
    even when the signal lands while the threads are still being started."""
    log: list[str] = []

    def handler(signum: int, frame: object) -> None:
        log.append("handler")
        raise KeyboardInterrupt

    def first() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(0.5)  # the command goes on after the signal
        log.append("first ended")

    def second() -> None:
        log.append("second ended")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_parallel([first, second])
        assert sorted(log[:2]) == ["first ended", "second ended"] and log[2:] == ["handler"]
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)

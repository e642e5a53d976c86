"""The step engine: ordered steps, each with an optional undo; unwind in reverse, always.

A step's undo is pushed *before* its ``do`` runs when the do can half-happen (a service stop that
timed out may still have stopped the service), otherwise after it succeeded. On success, failure,
exception, SIGINT, SIGTERM or SIGHUP every pushed undo runs in reverse order, even when another
undo failed; further signals during the unwind are noted, not obeyed. While a step waits for
guest commands in flight (service stops issued together, a shielded stop) a signal is deferred
until they have all ended (:func:`finish_in_threads`): an undo that started a service before
its stop had ended would leave it down. Every failure is kept; see :meth:`RunResult.exit_code`
for which one decides the exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from snapcoord import cancel
from snapcoord.errors import ExitCode, Interrupted, ServiceNotRestored, SnapcoordError

log = logging.getLogger("snapcoord.run")

Action = Callable[[], Any]


@dataclass
class Step:
    name: str
    do: Action | None = None  # None: a step that only schedules its undo
    undo: Action | None = None
    undo_name: str | None = None
    undo_first: bool = False  # push the undo before running do (do may half-happen)
    describe: str = ""  # what --dry-run shows: commands, hypervisor calls


@dataclass
class StepRecord:
    name: str
    started: float  # epoch seconds
    ended: float | None = None
    ok: bool | None = None
    error: str | None = None
    undo: bool = False

    @property
    def seconds(self) -> float:
        return (self.ended or time.time()) - self.started

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "started": round(self.started, 3),
            "ended": None if self.ended is None else round(self.ended, 3),
            "ok": self.ok,
            "error": self.error,
            "undo": self.undo,
        }


class Reporter(Protocol):
    def step_started(self, record: StepRecord) -> None: ...

    def step_ended(self, record: StepRecord) -> None: ...

    def note(self, text: str) -> None: ...


class SilentReporter:
    def step_started(self, record: StepRecord) -> None:
        pass

    def step_ended(self, record: StepRecord) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class ServiceWindow:
    """The outage users feel: from the first service stop issued to the moment the last stopped
    service is confirmed running again. Thread-safe (services may stop in parallel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: set[str] = set()
        self.opened: float | None = None  # monotonic
        self.closed: float | None = None

    def stop_issued(self, service: str) -> None:
        with self._lock:
            if self.opened is None:
                self.opened = time.monotonic()
            self._down.add(service)
            self.closed = None

    def confirmed_running(self, service: str) -> None:
        with self._lock:
            self._down.discard(service)
            if not self._down and self.opened is not None:
                self.closed = time.monotonic()

    @property
    def still_down(self) -> list[str]:
        with self._lock:
            return sorted(self._down)

    @property
    def seconds(self) -> float | None:
        """Window length; None when no service was stopped. Open windows count up to now."""
        if self.opened is None:
            return None
        return (self.closed or time.monotonic()) - self.opened


@dataclass
class RunResult:
    records: list[StepRecord] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    window: ServiceWindow = field(default_factory=ServiceWindow)
    values: dict[str, Any] = field(default_factory=dict)  # plan outputs (snapshot name, ...)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        """The first failure decides, except that a service left down always gives 6 and a bug 1."""
        if not self.failures:
            return ExitCode.OK
        if any(isinstance(f, ServiceNotRestored) for f in self.failures):
            return ExitCode.SERVICE_NOT_RESTORED
        first = self.failures[0]
        if isinstance(first, SnapcoordError):
            return int(first.exit_code)
        if isinstance(first, KeyboardInterrupt):
            return ExitCode.INTERRUPTED
        return ExitCode.BUG

    @property
    def bugs(self) -> list[BaseException]:
        return [f for f in self.failures if not isinstance(f, SnapcoordError | KeyboardInterrupt)]


class Engine:
    """Runs a plan of steps. ``on_change`` is told after every step (the run journal listens)."""

    def __init__(
        self,
        reporter: Reporter | None = None,
        *,
        window: ServiceWindow | None = None,
        on_change: Callable[[Engine], None] | None = None,
    ) -> None:
        self.reporter = reporter or SilentReporter()
        self.result = RunResult(window=window or ServiceWindow())
        self.on_change = on_change
        self.pending_undos: list[Step] = []
        self._unwinding = False
        self._interrupted = False

    @property
    def window(self) -> ServiceWindow:
        return self.result.window

    def execute(self, steps: Sequence[Step]) -> RunResult:
        with self._signals_raise_interrupted():
            try:
                for step in steps:
                    self._run_step(step)
            except BaseException as exc:
                self.result.failures.append(_as_failure(exc))
            finally:
                self._unwinding = True
                self._unwind()
        return self.result

    def _run_step(self, step: Step) -> None:
        with cancel.interruptible():
            cancel.check()  # a parallel run was cancelled: start no further step
        if step.undo is not None and step.undo_first:
            self._push(step)
        if step.do is not None:
            record = StepRecord(step.name, time.time())
            self.result.records.append(record)
            self.reporter.step_started(record)
            try:
                with cancel.interruptible():
                    step.do()
            except BaseException as exc:
                failure = _as_failure(exc)
                record.ended, record.ok, record.error = time.time(), False, _text(failure)
                self.reporter.step_ended(record)
                raise failure from exc if failure is not exc else None
            record.ended, record.ok = time.time(), True
            self.reporter.step_ended(record)
        if step.undo is not None and not step.undo_first:
            self._push(step)
        self._changed()

    def _push(self, step: Step) -> None:
        self.pending_undos.append(step)
        self._changed()

    def _unwind(self) -> None:
        while self.pending_undos:
            step = self.pending_undos[-1]
            assert step.undo is not None
            record = StepRecord(step.undo_name or f"undo {step.name}", time.time(), undo=True)
            self.result.records.append(record)
            self.reporter.step_started(record)
            try:
                step.undo()
                record.ok = True
            except BaseException as exc:
                failure = _as_failure(exc)
                record.ok, record.error = False, _text(failure)
                self.result.failures.append(failure)
            record.ended = time.time()
            self.reporter.step_ended(record)
            self.pending_undos.pop()
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    @contextmanager
    def _signals_raise_interrupted(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handler = _EngineSignals(self)
        previous = {sig: signal.signal(sig, handler) for sig in WATCHED_SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _EngineSignals:
    """The engine's handler: the first signal raises :class:`Interrupted` in the running step;
    later ones, and any during the unwind, are noted and ignored."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        engine = self.engine
        name = signal.Signals(signum).name
        if engine._unwinding or engine._interrupted:
            engine.reporter.note(f"{name} received while restoring: finishing the restore first")
            return
        engine._interrupted = True
        raise Interrupted(f"interrupted by {name}: restoring everything that was changed")

    def held(self, signum: int) -> None:
        """The signal arrived while guest commands were in flight (:func:`signals_deferred`):
        this handler runs once they have ended."""
        engine = self.engine
        if not (engine._unwinding or engine._interrupted):
            name = signal.Signals(signum).name
            engine.reporter.note(
                f"{name} received: letting the guest commands in flight finish, then "
                "restoring everything that was changed"
            )


def _text(failure: BaseException) -> str:
    """A step's error as its line shows it: the line names the VM already."""
    return failure.text() if isinstance(failure, SnapcoordError) else str(failure)


def _as_failure(exc: BaseException) -> BaseException:
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted("interrupted: restoring everything that was changed")
    return exc


class _Deferral:
    """SIGINT, SIGTERM and SIGHUP kept back while the main thread waits for guest commands in
    flight (:func:`signals_deferred`). Signal handlers run in the main thread only, and only
    the main thread defers, so no lock is needed."""

    def __init__(self) -> None:
        self.depth = 0
        self.previous: dict[int, Any] = {}  # signal -> the handler it had before
        self.pending: list[tuple[int, FrameType | None]] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append((signum, frame))
        held = getattr(self.previous.get(signum), "held", None)
        if len(self.pending) == 1 and callable(held):
            held(signum)


_deferral = _Deferral()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Inside this block SIGINT, SIGTERM and SIGHUP do nothing but wait: when it ends, the
    handlers they had run for them (the engine's raises :class:`Interrupted`; the default
    action of SIGTERM ends the process). Nothing can raise out of the block's waits and thread
    starts because of them. A no-op outside the main thread, and inside another such block."""
    if threading.current_thread() is not threading.main_thread() or _deferral.depth:
        yield
        return
    deferral = _deferral
    deferral.depth += 1
    try:
        for watched in WATCHED_SIGNALS:
            old = signal.getsignal(watched)
            if old is not None:  # None: a handler not set from Python, left alone
                deferral.previous[watched] = old
                signal.signal(watched, deferral)
        yield
    finally:
        for sig, handler in deferral.previous.items():
            signal.signal(sig, handler)
        previous, pending = deferral.previous, deferral.pending
        deferral.previous, deferral.pending = {}, []
        deferral.depth -= 1
        for signum, frame in pending:
            _deliver(previous[signum], signum, frame)


def _deliver(handler: Any, signum: int, frame: FrameType | None) -> None:
    """Act on a deferred signal as its handler would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action (SIGTERM, SIGHUP: end the process)


def finish_in_threads(actions: Sequence[Action]) -> list[BaseException | None]:
    """Run each action in a thread of its own and wait until *every one* has ended, whatever
    signal arrives meanwhile; return what each raised (None: it returned).

    A service stop on its way must not be abandoned: the unwind would start the service while
    its stop still runs, or before the stop reached the guest, and leave it down. So SIGINT,
    SIGTERM and SIGHUP are deferred (:func:`signals_deferred`) from before the first thread
    starts until the last one has ended; their handlers run then (the engine's raises). The
    wait is on Events, never ``Thread.join``: a join that a signal interrupts may mark the
    thread as stopped while it still runs (CPython 3.11, bpo-45274's fix), so the next join
    returns at once; an exception from any other signal's handler is kept until all ended."""
    errors: list[BaseException | None] = [None] * len(actions)
    done = [threading.Event() for _ in actions]

    def worker(index: int) -> None:
        try:
            actions[index]()
        except BaseException as exc:  # handed to the caller
            errors[index] = exc
        finally:
            done[index].set()

    interrupted: BaseException | None = None
    with signals_deferred():
        for index in range(len(actions)):
            threading.Thread(target=worker, args=(index,), daemon=True).start()
        for event in done:
            while not event.is_set():
                try:
                    event.wait()
                except BaseException as exc:  # re-raised once every action has ended
                    interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    return errors


def run_parallel(actions: Sequence[Action]) -> None:
    """Run actions concurrently; wait for *all* of them (even when interrupted: the interrupt
    is raised afterwards) before raising the first failure, so no undo races a stop that is
    still in flight."""
    if len(actions) <= 1:
        for action in actions:
            action()
        return
    for error in finish_in_threads(actions):
        if error is not None:
            raise error

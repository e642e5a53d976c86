"""The step engine: ordered steps, each with an optional undo; unwind in reverse, always.

A step's undo is pushed *before* its ``do`` runs when the do can half-happen (a service stop that
timed out may still have stopped the service), otherwise after it succeeded. On success, failure,
exception, SIGINT, SIGTERM or SIGHUP every pushed undo runs in reverse order, even when another
undo failed; further signals during the unwind are noted, not obeyed. Every failure is kept; see
:meth:`RunResult.exit_code` for which one decides the exit code.
"""

from __future__ import annotations

import logging
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

        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._unwinding or self._interrupted:
                self.reporter.note(f"{name} received while restoring: finishing the restore first")
                return
            self._interrupted = True
            raise Interrupted(f"interrupted by {name}: restoring everything that was changed")

        watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, handler) for sig in watched}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _text(failure: BaseException) -> str:
    """A step's error as its line shows it: the line names the VM already."""
    return failure.text() if isinstance(failure, SnapcoordError) else str(failure)


def _as_failure(exc: BaseException) -> BaseException:
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted("interrupted: restoring everything that was changed")
    return exc


def run_parallel(actions: Sequence[Action]) -> None:
    """Run actions concurrently; wait for *all* of them (even when interrupted) before raising
    the first failure, so no undo races a stop that is still in flight."""
    if len(actions) <= 1:
        for action in actions:
            action()
        return
    errors: list[BaseException | None] = [None] * len(actions)

    def worker(index: int) -> None:
        try:
            actions[index]()
        except BaseException as exc:
            errors[index] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(actions))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        for thread in threads:  # a signal arrived: let in-flight commands finish first
            thread.join()
        raise
    for error in errors:
        if error is not None:
            raise error

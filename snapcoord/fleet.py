"""Running one command over many VMs: at most ``--parallel`` at once and at most
``max_parallel`` per hypervisor, each VM with its own lock, journal and undo chain.

One VM's failure never stops the others. SIGINT/SIGTERM/SIGHUP starts no further VM and cancels
the running ones (each unwinds everything it changed, see :mod:`snapcoord.cancel`); VMs that
never started are reported as interrupted. The exit code is the most severe of the VMs' codes
(:data:`SEVERITY`, docs/exit-codes.md).

When only one VM can run at a time, VMs run one after another in the main thread, where a
signal interrupts a step at once, exactly as for a single VM.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from snapcoord import cancel
from snapcoord.errors import ExitCode
from snapcoord.outcome import Outcome
from snapcoord.run import Reporter

#: Most severe first: a service left down, a bug, an interrupted run, a failed snapshot, then
#: failures that changed nothing, then a busy VM.
SEVERITY: tuple[int, ...] = (
    ExitCode.SERVICE_NOT_RESTORED,
    ExitCode.BUG,
    ExitCode.INTERRUPTED,
    ExitCode.SNAPSHOT_FAILED,
    ExitCode.PREFLIGHT,
    ExitCode.HYPERVISOR,
    ExitCode.LOCKED,
    ExitCode.USAGE,
    ExitCode.OK,
)

#: the word for each exit code in the summary's counts
OUTCOME_NAMES: dict[int, str] = {
    ExitCode.OK: "ok",
    ExitCode.BUG: "bug",
    ExitCode.USAGE: "usage",
    ExitCode.HYPERVISOR: "hypervisor_error",
    ExitCode.PREFLIGHT: "preflight_failed",
    ExitCode.SNAPSHOT_FAILED: "failed",
    ExitCode.SERVICE_NOT_RESTORED: "service_not_restored",
    ExitCode.LOCKED: "locked",
    ExitCode.INTERRUPTED: "interrupted",
}


def most_severe(codes: list[int]) -> int:
    """The fleet's exit code; a code outside :data:`SEVERITY` counts as a bug."""
    rank = {code: index for index, code in enumerate(SEVERITY)}
    worst = int(ExitCode.OK)
    for code in codes:
        if rank.get(code, 1) < rank[worst]:
            worst = code if code in rank else int(ExitCode.BUG)
    return worst


def summary(outcomes: list[Outcome], *, command: str, seconds: float) -> dict[str, Any]:
    counts = Counter(OUTCOME_NAMES.get(o.exit_code, "bug") for o in outcomes)
    return {
        "command": command,
        "vms": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "outcomes": dict(sorted(counts.items())),
        "exit_code": most_severe([o.exit_code for o in outcomes]),
        "seconds": round(seconds, 3),
    }


class View(Protocol):
    """How a fleet run is shown while it runs (see snapcoord.live)."""

    def reporter(self, vm: str) -> Reporter: ...

    def finished(self, outcome: Outcome) -> None: ...

    def tick(self) -> None: ...

    def close(self) -> None: ...


Job = Callable[[str, Reporter], Outcome]


@dataclass
class FleetRun:
    keys: list[str]
    hypervisor_of: dict[str, str]
    limits: dict[str, int]  # hypervisor -> max_parallel
    parallel: int
    view: View
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    #: the most VMs seen running at once, in total and per hypervisor (for tests and benches)
    peak: int = 0
    peak_per_hypervisor: dict[str, int] = field(default_factory=dict)
    interrupted_by: str | None = None

    def run(self, job: Job) -> list[Outcome]:
        if self.parallel <= 1 or len(self.keys) <= 1:
            self._run_in_order(job)
        else:
            self._run_in_threads(job)
        for key in self.keys:  # never started: a signal came first
            if key not in self.outcomes:
                self._finish(_not_started(key, self.interrupted_by or "interrupted"))
        return [self.outcomes[key] for key in self.keys]

    def _finish(self, outcome: Outcome) -> None:
        self.outcomes[outcome.vm] = outcome
        self.view.finished(outcome)

    def _run_in_order(self, job: Job) -> None:
        for key in self.keys:
            self.peak = 1
            hv = self.hypervisor_of[key]
            self.peak_per_hypervisor[hv] = 1
            outcome = job(key, self.view.reporter(key))
            self._finish(outcome)
            if outcome.exit_code == ExitCode.INTERRUPTED:
                self.interrupted_by = "interrupted"
                break

    def _run_in_threads(self, job: Job) -> None:
        pending = deque(self.keys)
        running: dict[str, threading.Thread] = {}
        per_hv: Counter[str] = Counter()
        done: deque[Outcome] = deque()
        wake = threading.Condition()

        def worker(key: str) -> None:
            try:
                outcome = job(key, self.view.reporter(key))
            except BaseException as exc:  # a bug in the job itself: still an outcome
                outcome = Outcome(key, ExitCode.BUG, _bug_summary(key, exc), errors=[repr(exc)])
            with wake:
                done.append(outcome)
                wake.notify()

        with _signals_cancel(self):
            while pending or running:
                with wake:
                    while pending and not self.interrupted_by and len(running) < self.parallel:
                        key = _next_startable(pending, per_hv, self.hypervisor_of, self.limits)
                        if key is None:
                            break
                        hv = self.hypervisor_of[key]
                        per_hv[hv] += 1
                        thread = threading.Thread(
                            target=worker, args=(key,), name=f"vm-{key}", daemon=True
                        )
                        running[key] = thread
                        self.peak = max(self.peak, len(running))
                        self.peak_per_hypervisor[hv] = max(
                            self.peak_per_hypervisor.get(hv, 0), per_hv[hv]
                        )
                        thread.start()
                    if self.interrupted_by:
                        pending.clear()
                    if not done:
                        wake.wait(0.25)
                    finished = list(done)
                    done.clear()
                for outcome in finished:
                    running.pop(outcome.vm).join()
                    per_hv[self.hypervisor_of[outcome.vm]] -= 1
                    self._finish(outcome)
                self.view.tick()


def _next_startable(
    pending: deque[str], per_hv: Counter[str], hypervisor_of: dict[str, str], limits: dict[str, int]
) -> str | None:
    """The first pending VM whose hypervisor is below its limit (taken out of ``pending``)."""
    for key in pending:
        hv = hypervisor_of[key]
        if per_hv[hv] < limits.get(hv, 1):
            pending.remove(key)
            return key
    return None


@contextmanager
def _signals_cancel(run: FleetRun) -> Iterator[None]:
    """While workers run, a signal cancels them instead of raising in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if run.interrupted_by is None:
            run.interrupted_by = f"interrupted by {name}"
            cancel.request(run.interrupted_by)

    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in watched}
    cancel.reset()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        cancel.reset()


def _not_started(key: str, why: str) -> Outcome:
    message = f"{key}: not started: {why}"
    return Outcome(
        key,
        ExitCode.INTERRUPTED,
        {"vm": key, "ok": False, "exit_code": int(ExitCode.INTERRUPTED), "errors": [message]},
        errors=[message],
    )


def _bug_summary(key: str, exc: BaseException) -> dict[str, Any]:
    return {"vm": key, "ok": False, "exit_code": int(ExitCode.BUG), "errors": [repr(exc)]}

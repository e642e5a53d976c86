"""Run ``snapcoord`` with ONE fault injected at ONE position of a snapshot run (issue 9).

``python -m tests.fault_runner ARGS...`` runs ``snapcoord ARGS...`` like ``python -m
tests.guest_fixtures`` does (the libvirt adapter replaced by an observing one) and, chosen by
environment variables, injects a fault at a precise point of the run, without touching product
code: it wraps the step engine's reporter (``step_started`` / ``step_ended`` see every
:class:`snapcoord.run.StepRecord`) and the adapter's ``create_snapshot``.

``SNAPCOORD_TEST_FAULT=<position>:<fault>``
    what to inject where (:data:`POSITIONS`, :data:`FAULTS`); unset: no fault, only the log.
``SNAPCOORD_TEST_PROXY_CONTROL=<path>``
    the control socket of the :class:`tests.faultproxy.FaultProxy` between snapcoord and the
    guest (for ``drop``, ``unreachable`` and ``hang``).
``SNAPCOORD_TEST_FAULT_LOG=<path>``
    JSON lines: every step started/ended, the watchdog armed (pid, marker), the fault (when, at
    which step, whether it hit its position: a cell whose fault never fired or missed its
    position must fail), notes, the SSH control directories the run created.
``SNAPCOORD_TEST_FAULT_REFUSE_SECONDS`` / ``SNAPCOORD_TEST_FAULT_STALL_SECONDS``
    how long ``unreachable`` refuses and ``hang`` stalls (defaults 60 and 8).
``SNAPCOORD_TEST_OBSERVE``
    as in tests/guest_fixtures.py: the guest's services seen from outside at ``create_snapshot``.

Timer-based positions fire from a daemon thread; signals are sent by that thread to the process
itself (``os.kill(os.getpid(), ...)``), as an outside ``kill`` would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcoord.adapters.base import VM, Snapshot
from snapcoord.errors import HypervisorError
from tests.faultproxy import control

FAULT_ENV = "SNAPCOORD_TEST_FAULT"
CONTROL_ENV = "SNAPCOORD_TEST_PROXY_CONTROL"
LOG_ENV = "SNAPCOORD_TEST_FAULT_LOG"
REFUSE_ENV = "SNAPCOORD_TEST_FAULT_REFUSE_SECONDS"
STALL_ENV = "SNAPCOORD_TEST_FAULT_STALL_SECONDS"

#: create_snapshot waits this long after firing a fault, then takes the snapshot.
SNAPSHOT_PAUSE = 2.0


@dataclass(frozen=True)
class Position:
    """Where a fault fires: ``delay`` seconds after step ``step`` (an undo when ``undo``)
    ``moment`` (``started``/``ended``; ``adapter``: inside ``create_snapshot``)."""

    step: str
    undo: bool
    moment: str
    delay: float
    doc: str


POSITIONS: dict[str, Position] = {
    "after_arm": Position(
        "arm guest watchdog", False, "ended", 0.0, "right after the watchdog was armed"
    ),
    # 0.05 s: while the stops are on their way to the guest (a SIGTERM there once left apache2
    # down: the unwind did not wait for a stop in flight); 0.3 s: while the init scripts work.
    "early_in_service_stops": Position(
        "stop services", False, "started", 0.05, "0.05 s into stopping apache2 and cron"
    ),
    "during_service_stops": Position(
        "stop services", False, "started", 0.3, "0.3 s into stopping apache2 and cron"
    ),
    "during_dump": Position(
        "dump to store", False, "started", 0.2, "0.2 s into the mysqldump to the store"
    ),
    "after_database_stop": Position(
        "stop database", False, "ended", 0.0, "right after MariaDB was stopped"
    ),
    "during_frozen_hook": Position(
        "frozen hooks", False, "started", 0.5, "0.5 s into the frozen hook `sleep 3`"
    ),
    "during_snapshot": Position(
        "hypervisor snapshot",
        False,
        "adapter",
        0.0,
        f"inside the hypervisor's create_snapshot (which then waits {SNAPSHOT_PAUSE:g} s)",
    ),
    "during_database_start": Position(
        "start database", True, "started", 0.2, "0.2 s into the unwind's MariaDB start"
    ),
    # apache2's init script returns after 0.1 s or after 1.1 s (it polls its PID file once a
    # second): 0.2 s would often be too late.
    "during_service_starts": Position(
        "start services", True, "started", 0.03, "0.03 s into the unwind's apache2/cron start"
    ),
}

FAULTS: dict[str, str] = {
    "drop": "the proxy cuts every connection; new ones connect at once",
    "unreachable": "the proxy cuts every connection and refuses new ones past the watchdog",
    "sigterm": "SIGTERM to snapcoord",
    "sigkill": "SIGKILL to snapcoord",
    "hypervisor_error": "create_snapshot raises HypervisorError",
    "hang": "the proxy forwards nothing for longer than the command's timeout",
}

PROXY_FAULTS = frozenset({"drop", "unreachable", "hang"})
SIGNAL_FAULTS = {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}


def applicable(position: str, fault: str) -> bool:
    """A hypervisor error can only happen in the hypervisor call."""
    return fault != "hypervisor_error" or POSITIONS[position].moment == "adapter"


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Injector:
    """Watches the run's steps and fires the one configured fault at its position."""

    def __init__(
        self,
        position: str | None,
        fault: str | None,
        *,
        log_path: str | None,
        control_path: str | None,
        refuse_seconds: float,
        stall_seconds: float,
    ) -> None:
        self.position = POSITIONS[position] if position else None
        self.position_name = position
        self.fault = fault
        self.log_path = log_path
        self.control_path = control_path
        self.refuse_seconds = refuse_seconds
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        self._armed = self.position is not None  # fires once
        self._running: list[Any] = []  # StepRecords started and not yet ended

    # -- log -------------------------------------------------------------------------------
    def record(self, event: str, **data: Any) -> None:
        if not self.log_path:
            return
        # "mono": the machine's CLOCK_MONOTONIC (one clock for every process here), which the
        # cells measure elapsed time by: the wall clock ("t") can be stepped in the middle of a
        # cell, the guest watchdog's `sleep` counts monotonic time
        stamp = {"t": round(time.time(), 3), "mono": round(time.monotonic(), 3)}
        line = json.dumps({"event": event, **stamp, **data}, default=str)
        with self._lock, open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    # -- reporter hooks --------------------------------------------------------------------
    def step_started(self, record: Any) -> None:
        with self._lock:
            self._running.append(record)
        self.record("step", phase="started", name=record.name, undo=record.undo)
        pos = self.position
        if pos and pos.moment == "started" and self._matches(record):
            self._later(pos.delay, record)

    def step_ended(self, record: Any) -> None:
        with self._lock:
            if record in self._running:
                self._running.remove(record)
        self.record(
            "step",
            phase="ended",
            name=record.name,
            undo=record.undo,
            ok=record.ok,
            error=record.error,
        )
        pos = self.position
        if pos and pos.moment == "ended" and record.ok and self._matches(record):
            if self.fault in SIGNAL_FAULTS:
                self._later(0.0, record)  # a signal comes from outside, like `kill`
            else:
                self._fire(record)  # before the next step starts

    def note(self, text: str) -> None:
        self.record("note", text=text)

    def in_snapshot(self) -> None:
        """Called inside create_snapshot: fire, then let the hypervisor call go on."""
        pos = self.position
        if not (pos and pos.moment == "adapter" and self._take()):
            return
        current = self._current()
        hit = current is not None and current.name == pos.step and current.ended is None
        if self.fault == "hypervisor_error":
            self._log_fault(hit, current)
            raise HypervisorError("simulated failure: datastore full (fault injection)")
        if self.fault in SIGNAL_FAULTS:
            self._later(0.0, current, taken=True)
        else:
            self._fire(current, taken=True)
        time.sleep(SNAPSHOT_PAUSE)

    # -- firing ----------------------------------------------------------------------------
    def _matches(self, record: Any) -> bool:
        pos = self.position
        return pos is not None and record.name == pos.step and bool(record.undo) == pos.undo

    def _take(self) -> bool:
        with self._lock:
            armed, self._armed = self._armed, False
            return armed

    def _current(self) -> Any:
        with self._lock:
            return self._running[-1] if self._running else None

    def _later(self, delay: float, record: Any, *, taken: bool = False) -> None:
        if not taken and not self._take():
            return

        def wait_and_fire() -> None:
            time.sleep(max(0.0, record.started + delay - time.time()) if delay else 0.0)
            self._fire(record, taken=True)

        threading.Thread(target=wait_and_fire, daemon=True, name="fault-trigger").start()

    def _fire(self, target: Any, *, taken: bool = False) -> None:
        if not taken and not self._take():
            return
        pos = self.position
        assert pos is not None and self.fault is not None
        if pos.moment == "ended":
            hit = bool(target.ok) and target.ended is not None
        else:  # during a step: it must still be running
            hit = target is not None and target.name == pos.step and target.ended is None
        self._log_fault(hit, self._current())
        try:
            answer = self._inject()
        except Exception as exc:  # the test fails on it: the fault did not happen
            self.record("fault_error", error=f"{type(exc).__name__}: {exc}")
            return
        self.record("fault_done", answer=answer)

    def _log_fault(self, hit: bool, current: Any) -> None:
        self.record(
            "fault",
            position=self.position_name,
            fault=self.fault,
            step=self.position.step if self.position else None,
            hit=hit,
            running_step=current.name if current is not None else None,
        )

    def _inject(self) -> str:
        fault = self.fault
        if fault in SIGNAL_FAULTS:
            os.kill(os.getpid(), SIGNAL_FAULTS[fault])
            return "signalled"
        commands = {
            "drop": "cut",
            "unreachable": f"refuse {self.refuse_seconds:g}",
            "hang": f"stall {self.stall_seconds:g}",
        }
        if fault not in commands:
            raise RuntimeError(f"{fault} cannot be injected at {self.position_name}")
        if not self.control_path:
            raise RuntimeError(f"{CONTROL_ENV} is not set: no proxy to control")
        return control(self.control_path, commands[fault])


class _SpyReporter:
    """Passes everything to the engine's own reporter, and tells the injector."""

    def __init__(self, inner: Any, injector: Injector) -> None:
        self._inner = inner
        self._injector = injector

    def step_started(self, record: Any) -> None:
        self._inner.step_started(record)
        self._injector.step_started(record)

    def step_ended(self, record: Any) -> None:
        self._inner.step_ended(record)
        self._injector.step_ended(record)

    def note(self, text: str) -> None:
        self._inner.note(text)
        self._injector.note(text)

    def __getattr__(self, name: str) -> Any:  # reporter methods added later pass through
        return getattr(self._inner, name)


def _adapter_class(injector: Injector) -> type:
    from tests.guest_fixtures import _observing_class

    base: Any = _observing_class()

    class FaultyLibvirtAdapter(base):  # type: ignore[misc]
        """The observing libvirt adapter; the fault fires inside ``create_snapshot``."""

        def create_snapshot(
            self,
            vm: VM,
            name: str,
            description: str,
            *,
            memory: bool,
            quiesce: bool,
            timeout: float,
        ) -> Snapshot:
            injector.in_snapshot()
            # The observing adapter records the guest's services, then takes the snapshot.
            snapshot: Snapshot = super().create_snapshot(
                vm, name, description, memory=memory, quiesce=quiesce, timeout=timeout
            )
            return snapshot

    return FaultyLibvirtAdapter


FaultyLibvirtAdapter: Any = None  # set by main(); the class needs libvirt


def _install(injector: Injector) -> None:
    """Hook the injector into the run: reporter, watchdog arming, SSH control directories."""
    from snapcoord import run as engine_module
    from snapcoord.hooks.guest import watchdog

    original_init: Callable[..., None] = engine_module.Engine.__init__

    def engine_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.reporter = _SpyReporter(self.reporter, injector)

    engine_module.Engine.__init__ = engine_init  # type: ignore[method-assign]

    original_arm: Callable[..., Any] = watchdog.arm

    def arm(*args: Any, **kwargs: Any) -> Any:
        dog = original_arm(*args, **kwargs)
        injector.record(
            "watchdog_armed",
            pid=dog.pid,
            marker=dog.marker,
            seconds=dog.seconds,
            services=list(dog.services),
        )
        return dog

    watchdog.arm = arm

    original_mkdtemp: Callable[..., str] = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        path = original_mkdtemp(*args, **kwargs)
        if Path(path).name.startswith("snapcoord-ssh-"):
            injector.record("ssh_dir", path=path)
        return path

    tempfile.mkdtemp = mkdtemp  # type: ignore[assignment]


def injector_from_env() -> Injector:
    spec = os.environ.get(FAULT_ENV, "").strip()
    position: str | None = None
    fault: str | None = None
    if spec:
        position, _, fault = spec.partition(":")
        if position not in POSITIONS or fault not in FAULTS:
            raise SystemExit(
                f"fault_runner: bad {FAULT_ENV}={spec!r}: "
                f"positions {sorted(POSITIONS)}, faults {sorted(FAULTS)}"
            )
        if not applicable(position, fault):
            raise SystemExit(f"fault_runner: {fault} at {position} is not applicable")
    return Injector(
        position,
        fault,
        log_path=os.environ.get(LOG_ENV),
        control_path=os.environ.get(CONTROL_ENV),
        refuse_seconds=float(os.environ.get(REFUSE_ENV, "60")),
        stall_seconds=float(os.environ.get(STALL_ENV, "8")),
    )


def main(argv: list[str]) -> int:
    global FaultyLibvirtAdapter
    from snapcoord import adapters, cli

    injector = injector_from_env()
    _install(injector)
    FaultyLibvirtAdapter = _adapter_class(injector)
    adapters.REGISTRY["libvirt"] = (__name__, "FaultyLibvirtAdapter", "libvirt", ("libvirt",))
    injector.record(
        "runner", pid=os.getpid(), position=injector.position_name, fault=injector.fault
    )
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

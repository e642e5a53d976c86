"""How a command over one or many VMs is shown while it runs.

- one VM at a time: the step lines as they happen (:class:`~snapcoord.output.HumanReporter`);
- several at once, no terminal (cron mail, journald): whole lines only, one per finished step;
- several at once on a terminal: a live block, one line per running VM (its current step and
  elapsed time), redrawn in place, with each finished VM's result printed above it;
- ``--json``: one object per VM as it finishes.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from snapcoord.fleet import View
from snapcoord.outcome import Outcome
from snapcoord.output import HumanReporter, print_json, raw_stream
from snapcoord.run import Reporter, SilentReporter, StepRecord


class _Printer:
    """Prints finished VMs' lines; shared by every view. A view that draws nothing between
    events keeps the no-op ``tick`` and ``close``."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.lock = threading.Lock()

    def outcome(self, outcome: Outcome) -> None:
        for line in outcome.lines:
            self.out.write(line + "\n")
        self.out.flush()
        self.errors(outcome)

    def errors(self, outcome: Outcome) -> None:
        for line in outcome.errors:
            self.err.write(f"snapcoord: error: {line}\n")
        self.err.flush()

    def tick(self) -> None:
        """Nothing to redraw."""

    def close(self) -> None:
        """Nothing on screen to clean up."""


class StepLinesView(_Printer):
    """One VM at a time: the familiar step lines."""

    def reporter(self, vm: str) -> Reporter:
        return HumanReporter(vm, self.out)

    def finished(self, outcome: Outcome) -> None:
        self.outcome(outcome)


class JsonView(_Printer):
    def reporter(self, vm: str) -> Reporter:
        return SilentReporter()

    def finished(self, outcome: Outcome) -> None:
        with self.lock:
            print_json(outcome.summary, self.out)
            self.out.flush()
            self.errors(outcome)


class DocumentView(_Printer):
    """``--json`` of a command that prints one document when every VM has finished (list,
    recover): nothing on stdout meanwhile; each VM's errors on stderr as it finishes."""

    def reporter(self, vm: str) -> Reporter:
        return SilentReporter()

    def finished(self, outcome: Outcome) -> None:
        with self.lock:
            self.errors(outcome)


class _LineReporter:
    """Whole lines only, so VMs running at once never split each other's lines."""

    def __init__(self, vm: str, view: PlainView) -> None:
        self.vm = vm
        self.view = view

    def step_started(self, record: StepRecord) -> None:
        pass

    def step_ended(self, record: StepRecord) -> None:
        arrow = "<-" if record.undo else "->"
        status = "ok" if record.ok else f"FAILED: {record.error}"
        self.view.line(f"{self.vm}: {arrow} {record.name} {status} ({record.seconds:.2f} s)")

    def note(self, text: str) -> None:
        self.view.line(f"{self.vm}: {text}")


class PlainView(_Printer):
    """Several VMs at once without a terminal."""

    def reporter(self, vm: str) -> Reporter:
        return _LineReporter(vm, self)

    def line(self, text: str) -> None:
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def finished(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcome(outcome)


class _LiveReporter:
    def __init__(self, vm: str, view: LiveView) -> None:
        self.vm = vm
        self.view = view

    def step_started(self, record: StepRecord) -> None:
        self.view.set_step(self.vm, ("undo: " if record.undo else "") + record.name)

    def step_ended(self, record: StepRecord) -> None:
        if not record.ok:
            self.view.above(f"{self.vm}: {record.name} FAILED: {record.error}")

    def note(self, text: str) -> None:
        self.view.above(f"{self.vm}: {text}")


class LiveView(_Printer):
    """Several VMs at once on a terminal: a block of running VMs, redrawn in place."""

    CLEAR_LINE = "\x1b[2K"

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        super().__init__(out, err)
        self.running: dict[str, tuple[str, float, float]] = {}  # vm -> step, step start, start
        self.drawn = 0  # lines of the live block now on screen
        self._ticker = threading.Event()
        self._thread = threading.Thread(target=self._tick_loop, name="live-view", daemon=True)
        self._thread.start()

    def reporter(self, vm: str) -> Reporter:
        with self.lock:
            now = time.monotonic()
            self.running[vm] = ("starting", now, now)
        return _LiveReporter(vm, self)

    def set_step(self, vm: str, step: str) -> None:
        with self.lock:
            started = self.running.get(vm, ("", 0.0, time.monotonic()))[2]
            self.running[vm] = (step, time.monotonic(), started)
            self._redraw()

    def above(self, text: str) -> None:
        with self.lock:
            self._erase()
            self.out.write(text + "\n")
            self._draw()

    def finished(self, outcome: Outcome) -> None:
        with self.lock:
            self.running.pop(outcome.vm, None)
            self._erase()
            self.outcome(outcome)
            self._draw()

    def tick(self) -> None:
        with self.lock:
            self._redraw()

    def close(self) -> None:
        self._ticker.set()
        with self.lock:
            self._erase()
            self.out.flush()

    def _tick_loop(self) -> None:
        while not self._ticker.wait(0.5):
            self.tick()

    def _erase(self) -> None:
        if self.drawn:
            raw_stream(self.out).write(f"\x1b[{self.drawn}F" + "\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        now = time.monotonic()
        for vm, (step, _, started) in sorted(self.running.items()):
            raw_stream(self.out).write(self.CLEAR_LINE)
            self.out.write(f"  {vm}: {step} ... {now - started:.0f} s\n")
        self.drawn = len(self.running)
        self.out.flush()

    def _redraw(self) -> None:
        self._erase()
        self._draw()


class InOrder:
    """Another view, with each VM's result shown in the order of ``keys`` as soon as every VM
    before it has finished (the fleet finishes every key, a VM never started too)."""

    def __init__(self, view: View, keys: list[str]) -> None:
        self.view = view
        self.keys = keys
        self.waiting: dict[str, Outcome] = {}
        self.shown = 0

    def reporter(self, vm: str) -> Reporter:
        return self.view.reporter(vm)

    def finished(self, outcome: Outcome) -> None:
        self.waiting[outcome.vm] = outcome
        while self.shown < len(self.keys) and self.keys[self.shown] in self.waiting:
            self.view.finished(self.waiting.pop(self.keys[self.shown]))
            self.shown += 1

    def tick(self) -> None:
        self.view.tick()

    def close(self) -> None:
        for outcome in self.waiting.values():  # not in keys: shown rather than lost
            self.view.finished(outcome)
        self.waiting.clear()
        self.view.close()


def pick_view(*, json: bool, concurrent: bool, stream: TextIO | None = None) -> View:
    out = stream or sys.stdout
    if json:
        return JsonView(out)
    if not concurrent:
        return StepLinesView(out)
    if out.isatty():
        return LiveView(out)
    return PlainView(out)

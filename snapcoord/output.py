"""How runs are shown: step lines as they happen for people, one JSON object per VM for tools."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from snapcoord.run import RunResult, StepRecord


class HumanReporter:
    """Prints ``vm  step ... ok 1.23 s`` lines as steps start and end."""

    #: The reporter whose line is open, so a log message can end that line first.
    active: HumanReporter | None = None

    def __init__(self, vm: str, stream: TextIO | None = None) -> None:
        self.vm = vm
        self.stream = stream or sys.stdout
        self._open: StepRecord | None = None

    def step_started(self, record: StepRecord) -> None:
        self._finish_line()
        arrow = "<-" if record.undo else "->"
        self.stream.write(f"{self.vm}: {arrow} {record.name} ...")
        self.stream.flush()
        self._open = record
        HumanReporter.active = self

    def step_ended(self, record: StepRecord) -> None:
        status = "ok" if record.ok else f"FAILED: {record.error}"
        if self._open is record:
            self.stream.write(f" {status} ({record.seconds:.2f} s)\n")
        else:
            self.stream.write(f"{self.vm}:    {record.name}: {status} ({record.seconds:.2f} s)\n")
        self.stream.flush()
        self._open = None

    def note(self, text: str) -> None:
        self._finish_line()
        self.stream.write(f"{self.vm}: {text}\n")
        self.stream.flush()

    def _finish_line(self) -> None:
        if self._open is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._open = None


class LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to stderr, never glued to the end of an open step line."""

    def emit(self, record: logging.LogRecord) -> None:
        if HumanReporter.active is not None:
            HumanReporter.active._finish_line()
        super().emit(record)


def run_summary(vm: str, result: RunResult, **fields: Any) -> dict[str, Any]:
    """The run as one JSON object. ``window_seconds`` is the measured service window only when
    every stopped service was confirmed running again: otherwise ``None``, and ``services_down``
    names what is (or may still be) down."""
    window = None if result.window.still_down else result.window.seconds
    return {
        "vm": vm,
        "ok": result.ok,
        "exit_code": int(result.exit_code),
        **fields,
        "window_seconds": None if window is None else round(window, 3),
        "services_down": result.window.still_down,
        "errors": [str(f) for f in result.failures],
        "steps": [r.as_dict() for r in result.records],
    }


def print_json(data: dict[str, Any], stream: TextIO | None = None) -> None:
    (stream or sys.stdout).write(json.dumps(data, default=str) + "\n")

"""How runs are shown: step lines as they happen for people, one JSON object per VM for tools."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import datetime
from typing import Any, TextIO

from snapcoord.errors import SnapcoordError
from snapcoord.run import RunResult, StepRecord

#: C0 and C1 controls but tab and newline, DEL, and the bidirectional overrides: what a
#: hypervisor, a guest or a file could put into a name to rewrite the terminal or the line
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\u202e``): a
    snapshot name with a terminal escape sequence is printed, never executed by the terminal."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def plural(count: int, noun: str) -> str:
    """``1 VM``, ``3 VMs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class PrintableStream:
    """A text stream that writes everything through :func:`printable`; ``raw`` is the stream
    below, for the live view's own cursor movements."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        return self.raw.write(printable(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def iso_now() -> str:
    """The local time in ISO 8601 with its offset, to the second: ``2026-12-07T01:02:03+01:00``."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


class StampedStream:
    """A text stream whose every line starts with :func:`iso_now` and a space, while ``on``:
    for output that is not a terminal (cron mail, a log file, journald), so that each line can
    be read against the hypervisor's task log. A line is stamped when its first character is
    written (a step line: when the step started)."""

    def __init__(self, raw: TextIO, *, on: bool) -> None:
        self.raw = raw
        self.on = on
        self._line_start = True
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if not self.on:
            return self.raw.write(text)
        with self._lock:
            pieces = []
            for piece in text.splitlines(keepends=True):
                if self._line_start:
                    pieces.append(iso_now() + " ")
                pieces.append(piece)
                self._line_start = piece.endswith(("\n", "\r"))
            return self.raw.write("".join(pieces))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def raw_stream(stream: TextIO) -> TextIO:
    """The stream below a :class:`PrintableStream` (any other stream itself)."""
    return stream.raw if isinstance(stream, PrintableStream) else stream


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
        "errors": [
            f.line(vm) if isinstance(f, SnapcoordError) else str(f) for f in result.failures
        ],
        "steps": [r.as_dict() for r in result.records],
    }


def error_line(vm: str, failure: BaseException) -> str:
    """One error line that names the VM by its configuration key ``vm`` first (an adapter
    names it as the hypervisor does: it follows in brackets, see ``SnapcoordError.line``)."""
    if isinstance(failure, SnapcoordError):
        return failure.line(vm)
    line = str(failure)
    return line if line.startswith(f"{vm}:") else f"{vm}: {line}"


def print_json(data: dict[str, Any], stream: TextIO | None = None) -> None:
    (stream or sys.stdout).write(json.dumps(data, default=str) + "\n")

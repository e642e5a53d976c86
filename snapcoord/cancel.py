"""Cancelling runs that execute in worker threads (``--parallel``): a signal is delivered only to
the main thread, which calls :func:`request`; each worker's engine then raises
:class:`~snapcoord.errors.Interrupted` at its next step or hypervisor poll and unwinds as it
would on a signal. Undo steps never see it: only code inside :func:`interruptible` (a step's
``do``) can be cancelled, so a restore always runs to its end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from snapcoord.errors import Interrupted

_requested = threading.Event()
_reason = ["interrupted"]
_local = threading.local()


def request(reason: str) -> None:
    _reason[0] = reason
    _requested.set()


def reset() -> None:
    _requested.clear()


def requested() -> bool:
    return _requested.is_set()


@contextmanager
def interruptible() -> Iterator[None]:
    previous = getattr(_local, "on", False)
    _local.on = True
    try:
        yield
    finally:
        _local.on = previous


def check() -> None:
    """Raise Interrupted when a cancel was requested and this thread may be cancelled now."""
    if getattr(_local, "on", False) and _requested.is_set():
        raise Interrupted(f"{_reason[0]}: restoring everything that was changed")


def sleep(seconds: float) -> None:
    """``time.sleep`` that ends early (raising Interrupted) when a cancel may interrupt it."""
    if getattr(_local, "on", False):
        _requested.wait(seconds)
        check()
    else:
        time.sleep(seconds)

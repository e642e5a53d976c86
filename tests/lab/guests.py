"""More lab guests for one test: each in a sandbox of its own (tests/lab/sandbox.py), nested in
the worker's, with its own sshd, MariaDB, Apache and cron on its own ports.

``with more_guests(3) as guests:`` starts them in parallel (``tests/lab/sandboxed-python -m
tests.lab guest --json``), yields :class:`tests.lab.sshd.SshGuest` handles, and ends each sandbox
when the block ends (its stdin closes; everything in it stops with it). Each one's services are
its own: the worker's lab guest (``ssh_guest``) and the others never see them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.lab.common import LabError
from tests.lab.sshd import SshGuest, guest_from_record

WRAPPER = Path(__file__).resolve().with_name("sandboxed-python")
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def more_guests(count: int, timeout: float = 180.0) -> Iterator[list[SshGuest]]:
    env = dict(os.environ, SNAPCOORD_LAB_PYTHON=sys.executable)
    logs = [tempfile.TemporaryFile() for _ in range(count)]  # noqa: SIM115 - closed below
    argv = [str(WRAPPER), "-m", "tests.lab", "guest", "--json"]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    procs = [subprocess.Popen(argv, stderr=log, cwd=ROOT, env=env, **pipes) for log in logs]
    try:
        deadline = time.monotonic() + timeout
        guests = []
        for proc, log in zip(procs, logs, strict=True):
            assert proc.stdout is not None
            ready, _, _ = select.select(
                [proc.stdout], [], [], max(0.0, deadline - time.monotonic())
            )
            line = proc.stdout.readline() if ready else b""
            if not line:
                log.seek(0)
                err = log.read().decode(errors="replace")[-800:]
                raise LabError(f"a lab guest did not start within {timeout:.0f}s: {err}")
            guests.append(guest_from_record(json.loads(line)))
        yield guests
    finally:
        for proc in procs:
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()  # --kill-child: the sandbox's init, and everything in it, dies too
                proc.wait()
        for log in logs:
            log.close()

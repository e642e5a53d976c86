"""Every local process snapcoord starts goes through :func:`execute`: argument lists only, a
timeout that kills the whole process group, and logging with secrets masked."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from snapcoord.secrets import MASK

log = logging.getLogger("snapcoord.shell")


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes  # empty when streamed to a sink
    stderr: bytes
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def error_text(self, limit: int = 300) -> str:
        """The last non-empty stderr (or stdout) line, for one-line error messages."""
        for stream in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in stream.decode(errors="replace").splitlines()]
            lines = [ln for ln in lines if ln]
            if lines:
                return lines[-1][:limit]
        return f"exit status {self.returncode}"


def display(argv: Sequence[str], secrets: Iterable[str] = ()) -> str:
    """The command as a shell-quoted line with every secret replaced by a mask."""
    text = shlex.join(argv)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def execute(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: bytes | None = None,
    stdout: BinaryIO | None = None,
    env: dict[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> Completed:
    """Run ``argv`` (never through a local shell). ``stdout`` streams output into a file object."""
    started = time.monotonic()
    log.debug("run: %s", display(argv, secrets))
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # own process group: a timeout kills children too
    )
    timed_out = False
    try:
        out, err = process.communicate(input=stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process)
        out, err = process.communicate()
    except BaseException:
        _kill_group(process)
        process.wait()
        raise
    return Completed(
        tuple(argv),
        process.returncode,
        out or b"",
        err or b"",
        time.monotonic() - started,
        timed_out,
    )


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)

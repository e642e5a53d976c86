"""Every local process snapcoord starts goes through this module: argument lists only, its own
process group (a timeout or an interrupt kills the whole group, never more), and logging with
secrets masked.

* :func:`execute` runs a command to its end with stdin as bytes and collects its output;
* :func:`stream` feeds stdin from a file object and hands stdout to a consumer, chunk by chunk,
  for data too large to hold in memory (dumps and restores);
* :func:`spawn` starts a long-lived process whose pipes the caller drives (the guest's warm
  shells), and :func:`kill_group` ends it."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, BinaryIO

from snapcoord.secrets import MASK, child_environment
from snapcoord.text import clip

log = logging.getLogger("snapcoord.shell")

CHUNK = 1 << 20
#: How long the output of a command that exited may take to end before its group is killed.
DRAIN_SECONDS = 60.0


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes  # empty when streamed to a consumer
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
                return clip(lines[-1], limit)
        return f"exit status {self.returncode}"


class OutputNotEnded(Exception):
    """A streamed command exited but its output did not end (something outside its process
    group holds the pipe open): what the consumer saw may be incomplete."""


def display(argv: Sequence[str], secrets: Iterable[str] = ()) -> str:
    """The command as a shell-quoted line with every secret replaced by a mask."""
    text = shlex.join(argv)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def python_module(module: str) -> list[str]:
    """The argv prefix for a child Python interpreter running ``module``: this interpreter in
    isolated mode (``-I``: neither the working directory nor the script's directory on
    sys.path, no PYTHON* variables, no user site directory), so a ``snapcoord/`` planted in
    the caller's directory is never imported by a process that runs as root. The installed
    snapcoord (site-packages, an editable install's finder) is found as usual; start such a
    child with ``cwd="/"`` (:func:`spawn`) so nothing else is looked up relative to the caller.
    """
    return [sys.executable, "-I", "-m", module]


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | IO[bytes] | None,
    stdout: int | IO[bytes] | None,
    stderr: int | IO[bytes] | None = subprocess.PIPE,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    secrets: Iterable[str] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (never through a local shell) in a new session, so that it has its own
    process group (:func:`kill_group` ends it with its children) and Ctrl-C on the terminal
    does not reach it. The caller waits for it or kills it. Without ``env``, the child gets
    this process's environment less the configuration's secret variables."""
    log.debug("run: %s", display(argv, secrets))
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env if env is not None else child_environment(),
        cwd=cwd,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a process started by :func:`spawn` (if it still exists)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def execute(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> Completed:
    """Run ``argv`` to its end, ``stdin`` (if any) on its stdin; collect stdout and stderr."""
    started = time.monotonic()
    process = spawn(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=env,
        secrets=secrets,
    )
    timed_out = False
    try:
        out, err = process.communicate(input=stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(process)
        out, err = process.communicate()
    except BaseException:
        kill_group(process)
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


def stream(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: bytes = b"",
    source: BinaryIO | None = None,
    consume: Callable[[bytes], None] | None = None,
    env: dict[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> Completed:
    """Run ``argv`` with ``stdin`` and then the whole of ``source`` on its stdin (fed from a
    thread), its stdout handed chunk by chunk to ``consume`` (from another thread; collected in
    ``Completed.stdout`` without one).

    If ``consume`` raises (a full store), the pipe is closed so the command dies of SIGPIPE
    instead of streaming on, and that exception is raised once the command ended, in preference
    to anything the command did. A command that stops reading its stdin ends the feeding
    quietly. A timeout kills the process group (``Completed.timed_out``); an interrupt kills it
    and is re-raised; output that does not end after the command exited raises
    :class:`OutputNotEnded`."""
    started = time.monotonic()
    feeding = bool(stdin) or source is not None
    process = spawn(
        argv,
        stdin=subprocess.PIPE if feeding else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=env,
        secrets=secrets,
    )
    assert process.stdout is not None and process.stderr is not None
    collected: dict[str, list[bytes]] = {"out": [], "err": []}
    failure: list[BaseException] = []

    def feed(pipe: IO[bytes]) -> None:
        try:
            pipe.write(stdin)
            while source is not None and (chunk := source.read(CHUNK)):
                pipe.write(chunk)
        except OSError:  # the command stopped reading (BrokenPipeError) or ended
            pass
        finally:
            with contextlib.suppress(OSError):
                pipe.close()

    def pump(pipe: IO[bytes]) -> None:
        read = getattr(pipe, "read1", pipe.read)
        try:
            while chunk := read(CHUNK):
                if consume is None:
                    collected["out"].append(chunk)
                else:
                    consume(chunk)
        except BaseException as exc:  # raised in the caller once the command ended
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                pipe.close()  # after a failure: the writer gets SIGPIPE

    def drain(pipe: IO[bytes]) -> None:
        while chunk := pipe.read(65536):
            collected["err"].append(chunk)

    threads = [
        threading.Thread(target=pump, args=(process.stdout,), daemon=True, name="shell-stdout"),
        threading.Thread(target=drain, args=(process.stderr,), daemon=True, name="shell-stderr"),
    ]
    if feeding:
        assert process.stdin is not None
        threads.append(
            threading.Thread(target=feed, args=(process.stdin,), daemon=True, name="shell-stdin")
        )
    timed_out = False
    try:  # from the first thread on: an interrupt must find the group killed
        for thread in threads:
            thread.start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(process)
            process.wait()
        if not _joined(threads, process):
            raise OutputNotEnded(f"the output of {display(argv[:1])} did not end after it exited")
    except BaseException:
        kill_group(process)
        process.wait()
        raise
    if failure:
        raise failure[0]
    out, err = b"".join(collected["out"]), b"".join(collected["err"])
    return Completed(
        tuple(argv), process.returncode, out, err, time.monotonic() - started, timed_out
    )


def _joined(threads: list[threading.Thread], process: subprocess.Popen[bytes]) -> bool:
    """Wait for the pipes of an ended command to end; kill what is left of its group if not.
    False if they still did not end."""
    deadline = time.monotonic() + DRAIN_SECONDS
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        kill_group(process)
        for thread in threads:
            thread.join(timeout=5)
    return not any(thread.is_alive() for thread in threads)

"""One run per VM at a time: an flock'ed file in the store. Never waits: a held lock is an error
naming the holder, so cron jobs that overlap fail fast instead of piling up.

The lock file is opened with ``O_NOFOLLOW`` in a folder :func:`snapcoord.store.ensure_private`
checked, and must be a plain file of the running user's with one link: a link (or a hard link
to some other file) planted at its name makes the lock fail, and is never truncated."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import stat
import time
from pathlib import Path
from types import TracebackType

from snapcoord.errors import Locked, PreflightError
from snapcoord.store import ensure_private

_OPEN = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class VMLock:
    def __init__(self, store: Path, vm: str, run_id: str) -> None:
        self.store = store
        self.path = store / "locks" / f"{vm}.lock"
        self.vm = vm
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self) -> None:
        ensure_private(self.store, "locks", vm=self.vm)
        try:
            fd = os.open(self.path, _OPEN, 0o600)
        except OSError as exc:
            problem = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise PreflightError(
                f"cannot create lock file {str(self.path)!r}: {problem}",
                vm=self.vm,
                hint="check defaults.store",
            ) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.geteuid():
            os.close(fd)
            raise PreflightError(
                f"lock file {str(self.path)!r} is not a plain file of this user's (a link or "
                "another user's file): not used",
                vm=self.vm,
                hint=f"remove it: rm {shlex.quote(str(self.path))}",
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise Locked(
                f"locked by run {holder.get('run', '?')} (pid {holder.get('pid', '?')}) "
                f"since {holder.get('since', '?')}",
                vm=self.vm,
                hint="wait for it to finish; the lock goes away with its process",
            ) from None
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.write(fd, json.dumps({"run": self.run_id, "pid": os.getpid(), "since": since}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> VMLock:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}

"""One run per VM at a time: an flock'ed file in the store. Never waits: a held lock is an error
naming the holder, so cron jobs that overlap fail fast instead of piling up."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType

from snapcoord.errors import Locked, PreflightError


class VMLock:
    def __init__(self, store: Path, vm: str, run_id: str) -> None:
        self.path = store / "locks" / f"{vm}.lock"
        self.vm = vm
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PreflightError(
                f"cannot create lock file {str(self.path)!r}: {exc.strerror}",
                vm=self.vm,
                hint="check defaults.store",
            ) from None
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

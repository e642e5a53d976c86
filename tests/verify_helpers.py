"""Loading a dump into verify's throwaway MariaDB server and comparing what it measures with
what the dump recorded: shared by the verify tests and the dump format tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snapcoord.hooks.databases.dumpfile import RestoreSource
from snapcoord.verify import mysql, scratch
from tests import lab

TIMEOUT = 600.0


@contextlib.contextmanager
def uids_running(argv: list[str]) -> Iterator[list[int]]:
    """While the block runs: the uids of every process seen running exactly ``argv`` (polled
    every 0.02 s), to see who ran a hostile dump's shell escape (a ``sleep`` of a few seconds)."""
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for pid, _comm, args in lab.process_table():
                if args.split() == argv:
                    with contextlib.suppress(OSError):
                        seen.append(os.stat(f"/proc/{pid}").st_uid)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join()


@contextlib.contextmanager
def verify_folder() -> Iterator[Path]:
    """A root-owned 0755 folder under /tmp for verify's work folders, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="verify-dir-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def verified_figures(
    source: RestoreSource, verify_dir: Path, databases: list[str]
) -> dict[str, Any]:
    """load + measure + check on a throwaway server; the measured (rows, checksum) by table."""
    with scratch.workspace(verify_dir, vm="lab") as work, \
            mysql.server(work, vm="lab", timeout=TIMEOUT) as server:  # fmt: skip
        mysql.load(server, source, vm="lab", timeout=TIMEOUT)
        measured = mysql.measure(server, databases, vm="lab", timeout=TIMEOUT)
        mysql.check(server, vm="lab", timeout=TIMEOUT)
    return {name: (m.rows, m.checksum) for name, m in measured.items()}


def recorded_figures(source: RestoreSource) -> dict[str, Any]:
    """What the dump's manifest recorded: (rows, checksum) by table."""
    rows, sums = source.expected_rows or {}, source.expected_checksums or {}
    return {name: (count, sums.get(name)) for name, count in rows.items()}

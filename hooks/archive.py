"""Optional file and configuration archive: a tar.gz of guest paths streamed into the run folder.

Taken inside the service window (files are quiet then), never written to the guest's disk.
Paths are stored relative to ``/`` so ``tar -xzf files.tar.gz -C /`` puts them back.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcoord import store
from snapcoord.errors import GuestError, PreflightError
from snapcoord.guest import Transport
from snapcoord.hooks.databases.dumpfile import DumpFailed
from snapcoord.store import RunDir

ARCHIVE_NAME = "files.tar.gz"
TAR_CHANGED = 1  # GNU tar: some files changed while being read (the archive is still complete)

# $@ = paths relative to /. Missing paths fail before tar starts; GNU tar's exit 1 (a file
# changed while read) is reported but kept; the status line comes last on stderr.
_TAR = r"""
cd / || exit 96
for p; do [ -e "$p" ] || [ -L "$p" ] || { echo "snapcoord: /$p does not exist" >&2; exit 97; }; done
tar --create --gzip --file=- --numeric-owner --one-file-system -- "$@"
rc=$?
echo "snapcoord-status tar=$rc" >&2
exit $rc
"""

_CHECK = r"""
for p; do [ -e "$p" ] || [ -L "$p" ] || { echo "$p does not exist" >&2; exit 97; }; done
command -v tar >/dev/null 2>&1 || { echo "tar not found" >&2; exit 127; }
du -sk -- "$@" 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'
"""


def _relative(paths: list[str], *, vm: str) -> list[str]:
    relative = []
    for path in paths:
        if not path.startswith("/") or "\n" in path or "/../" in f"{path}/":
            raise PreflightError(f"archive path {path!r} must be an absolute path", vm=vm)
        stripped = path.strip("/")
        relative.append(stripped or ".")
    return relative


def preflight(
    transport: Transport,
    *,
    vm: str,
    paths: list[str],
    sudo: bool = False,
    timeout: float = 60.0,
    store_root: Path | None = None,
) -> int:
    """Check the paths exist in the guest; returns their size in bytes (du) and, with
    ``store_root``, checks the store has room for it."""
    if not paths:
        return 0
    for path in paths:
        _relative([path], vm=vm)
    result = transport.run(["sh", "-c", _CHECK, "sh", *paths], sudo=sudo, timeout=timeout)
    if not result.ok:
        raise PreflightError(
            f"cannot archive: {result.error_text()}",
            vm=vm,
            hint="fix [vms.X.archive] paths",
        )
    size = int(result.stdout.decode().strip() or 0) * 1024
    if store_root is not None:
        store.check_writable(store_root, vm, size)
    return size


@dataclass
class ArchiveResult:
    path: Path
    sha256: str
    size: int
    tar_bytes: int
    seconds: float
    warnings: list[str]


def dump(
    transport: Transport,
    *,
    vm: str,
    paths: list[str],
    run_dir: RunDir,
    sudo: bool = False,
    timeout: float = 3600.0,
) -> ArchiveResult:
    """Stream ``tar -cz`` of ``paths`` into ``run_dir/files.tar.gz`` (recorded in the manifest).

    On failure the run folder is marked failed and :class:`DumpFailed` is raised."""
    relative = _relative(paths, vm=vm)
    sink = run_dir.sink(ARCHIVE_NAME)
    inflate = zlib.decompressobj(31)
    tar_bytes = 0
    started = time.monotonic()

    def consume(chunk: bytes) -> None:
        nonlocal tar_bytes
        sink.write(chunk)
        tar_bytes += len(inflate.decompress(chunk))

    problem: str | None = None
    warnings: list[str] = []
    try:
        result = transport.run_streaming(
            ["sh", "-c", _TAR, "sh", *relative], sudo=sudo, timeout=timeout, consume=consume
        )
    except OSError as exc:
        sink.discard()
        problem = f"writing {ARCHIVE_NAME} failed: {exc.strerror or exc}"
    except (GuestError, zlib.error) as exc:
        problem = str(exc)
    else:
        status = _tar_status(result.stderr)
        if result.timed_out:
            problem = "timed out"
        elif status == TAR_CHANGED:
            warnings.append("tar: some files changed while they were archived")
        elif status != 0:
            problem = f"tar exited {status}: {result.error_text()}"
        if problem is None and not inflate.eof:
            problem = "the archive stream is truncated"
    entry: dict[str, Any] = {}
    if problem is None:
        try:
            entry = sink.finish({"kind": "archive", "paths": paths, "tar_bytes": tar_bytes})
        except OSError as exc:
            problem = f"storing {ARCHIVE_NAME} failed: {exc}"
    seconds = time.monotonic() - started
    run_dir.sections["archive"] = {
        "file": ARCHIVE_NAME,
        "paths": paths,
        "seconds": round(seconds, 3),
        "valid": problem is None,
        "warnings": warnings,
    }
    if problem is not None:
        if not sink.closed:
            sink.keep_as(f"{ARCHIVE_NAME}.incomplete")
        failed = run_dir.fail(f"archive: {problem}")
        raise DumpFailed(f"archiving {', '.join(paths)} failed: {problem}", vm=vm,
                         failed_dir=failed)  # fmt: skip
    return ArchiveResult(
        run_dir.path / ARCHIVE_NAME,
        str(entry["sha256"]),
        int(entry["size"]),
        tar_bytes,
        seconds,
        warnings,
    )


def _tar_status(stderr: bytes) -> int:
    for line in reversed(stderr.decode(errors="replace").splitlines()):
        if line.startswith("snapcoord-status tar="):
            return int(line.split("=", 1)[1])
    return 255


__all__ = ["ARCHIVE_NAME", "ArchiveResult", "dump", "preflight"]

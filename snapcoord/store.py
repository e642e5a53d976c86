"""The off-guest store: one folder per VM and snapshot, written atomically, verified by sha256.

Layout::

    <store>/<vm>/<snapshot-name>/            a complete run: every file listed in manifest.json
        manifest.json                        sha256 + size of each file, dump metadata
        mysql.sql.gz                         the logical dump (gzip -9; .zst / .sql per config)
        files.tar.gz                         optional archive of guest paths
    <store>/<vm>/<snapshot-name>.failed/     a run whose dump failed: kept for inspection, never
                                             listed or restored as good
    <store>/<vm>/.<snapshot-name>.partial/   a run being written (or one that crashed)

Files are written under a temporary name, fsynced and renamed; directories are 0700, files 0600.
A run folder only gets its final name after its manifest is on disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcoord.errors import PreflightError

MANIFEST = "manifest.json"
FORMAT = 1
FAILED_SUFFIX = ".failed"
PARTIAL_SUFFIX = ".partial"
CHUNK = 1 << 20
# Room kept free besides the estimated dump size, so the store disk never runs completely full.
SPACE_MARGIN = 64 << 20

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,199}")  # fullmatch: "$" accepts "x\n"


class StoreError(PreflightError):
    """The store cannot be used (not writable, full, or a name is invalid)."""


class CorruptDump(PreflightError):
    """A stored dump failed verification: nothing was touched."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_name(kind: str, value: str, vm: str | None) -> str:
    if not _NAME_RE.fullmatch(value) or value.endswith((FAILED_SUFFIX, PARTIAL_SUFFIX)):
        raise StoreError(f"{kind} {value!r} cannot be used as a store folder name", vm=vm)
    return value


def vm_dir(store: Path, vm: str) -> Path:
    return Path(store) / _check_name("VM key", vm, vm)


def _mkdirs(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0700 (existing ones are left as they are)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def check_writable(store: Path, vm: str, needed_bytes: int) -> Path:
    """Preflight: the VM's store folder exists (0700), takes a test file, and has room for
    ``needed_bytes`` plus a margin. Returns the folder; raises :class:`StoreError`."""
    folder = vm_dir(store, vm)
    try:
        _mkdirs(folder)
        probe = folder / f".write-test-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"snapcoord\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise StoreError(
            f"store {folder} is not writable: {exc.strerror}",
            vm=vm,
            hint="fix the permissions or set defaults.store to a writable folder",
        ) from None
    available = free_bytes(folder)
    if available < needed_bytes + SPACE_MARGIN:
        raise StoreError(
            f"store {folder} has {_mib(available)} free, the dump needs about "
            f"{_mib(needed_bytes + SPACE_MARGIN)}",
            vm=vm,
            hint="free space or prune old dumps",
        )
    return folder


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


class FileSink:
    """A file in a run folder being written: hashes and counts every byte, lands atomically."""

    def __init__(self, run: RunDir, name: str) -> None:
        self.run = run
        self.name = name
        self.final = run.path / name
        self.part = run.path / f".{name}.part"
        self._fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def finish(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """fsync, re-read to confirm the checksum on disk, rename, record in the manifest."""
        os.fsync(self._fd)
        os.close(self._fd)
        self.closed = True
        on_disk = sha256_file(self.part)
        if on_disk != self.sha256:
            raise OSError(f"{self.name}: checksum on disk differs from the received stream")
        os.replace(self.part, self.final)
        fsync_dir(self.run.path)
        entry = {"sha256": self.sha256, "size": self.size, **(metadata or {})}
        self.run.files[self.name] = entry
        return entry

    def keep_as(self, name: str) -> Path:
        """Close an unfinished file and keep it under ``name`` (not in the manifest)."""
        if not self.closed:
            os.close(self._fd)
            self.closed = True
        target = self.run.path / name
        if self.part.exists():
            os.replace(self.part, target)
        return target

    def discard(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self.closed = True
        self.part.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class RunDir:
    """The folder of one run while it is being written; see the module docstring."""

    def __init__(self, store: Path, vm: str, snapshot: str) -> None:
        self.vm = vm
        self.snapshot = _check_name("snapshot name", snapshot, vm)
        self.parent = vm_dir(store, vm)
        self.final = self.parent / snapshot
        self.path = self.parent / f".{snapshot}{PARTIAL_SUFFIX}"
        self.files: dict[str, dict[str, Any]] = {}
        self.sections: dict[str, Any] = {}
        self.errors: list[str] = []
        self.started = now_iso()
        self.state = "partial"  # partial -> complete | failed

    @classmethod
    def begin(cls, store: Path, vm: str, snapshot: str) -> RunDir:
        run = cls(store, vm, snapshot)
        if run.final.exists():
            raise StoreError(f"store already holds a run {run.final}", vm=vm)
        try:
            _mkdirs(run.parent)
            if run.path.exists():  # left over from a crashed run with the same name
                shutil.rmtree(run.path)
            run.path.mkdir(mode=0o700)
            os.chmod(run.path, 0o700)
        except OSError as exc:
            raise StoreError(f"cannot create {run.path}: {exc.strerror}", vm=vm) from None
        return run

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def sink(self, name: str) -> FileSink:
        return FileSink(self, name)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "vm": self.vm,
            "snapshot": self.snapshot,
            "status": self.state if self.state != "partial" else "partial",
            "started": self.started,
            "finished": now_iso(),
            "files": self.files,
            "errors": self.errors,
            **self.sections,
        }

    def fail(self, reason: str) -> Path:
        """Mark the run failed: its folder is renamed to ``<snapshot>.failed`` at once."""
        self.errors.append(reason)
        if self.state == "failed":
            with contextlib.suppress(OSError):
                write_json_atomic(self.path / MANIFEST, self.manifest())
            return self.path
        self.state = "failed"
        target = self.parent / f"{self.snapshot}{FAILED_SUFFIX}"
        if target.exists():
            shutil.rmtree(target)
        with contextlib.suppress(OSError):  # a full disk must not hide the real failure
            write_json_atomic(self.path / MANIFEST, self.manifest())
        os.replace(self.path, target)
        fsync_dir(self.parent)
        self.path = target
        return target

    def commit(self) -> Path:
        """Write the manifest and give the folder its final name (a failed run stays failed)."""
        if self.state == "failed":
            write_json_atomic(self.path / MANIFEST, self.manifest())
            return self.path
        self.state = "complete"
        write_json_atomic(self.path / MANIFEST, self.manifest())
        os.replace(self.path, self.final)
        fsync_dir(self.parent)
        self.path = self.final
        return self.final

    def discard(self) -> None:
        """Remove a run that never produced anything worth keeping."""
        if self.state == "partial":
            shutil.rmtree(self.path, ignore_errors=True)


@dataclass(frozen=True)
class DumpInfo:
    snapshot: str
    path: Path
    status: str  # complete | failed
    finished: str
    manifest: dict[str, Any]


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CorruptDump(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CorruptDump(f"{path} is not a snapcoord manifest (format {FORMAT})")
    return data


def list_dumps(store: Path, vm: str, *, include_failed: bool = False) -> list[DumpInfo]:
    """The VM's runs, oldest first. Partial runs are never listed; failed ones only on request."""
    folder = vm_dir(store, vm)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        failed = entry.name.endswith(FAILED_SUFFIX)
        if failed and not include_failed:
            continue
        try:
            manifest = read_manifest(entry)
        except CorruptDump:
            continue
        status = str(manifest.get("status"))
        if status != "complete" and not (failed and include_failed):
            continue
        found.append(
            DumpInfo(
                str(manifest.get("snapshot")),
                entry,
                "failed" if failed else status,
                str(manifest.get("finished", "")),
                manifest,
            )
        )
    return sorted(found, key=lambda info: (info.finished, info.snapshot))


def find_dump(store: Path, vm: str, snapshot: str) -> Path:
    """The complete run folder of ``snapshot``; a failed one is named as such in the error."""
    folder = vm_dir(store, vm) / _check_name("snapshot name", snapshot, vm)
    if (folder / MANIFEST).is_file():
        return folder
    if (folder.parent / f"{snapshot}{FAILED_SUFFIX}").exists():
        raise CorruptDump(
            f"the dump of snapshot {snapshot} failed when it was taken and cannot be restored",
            vm=vm,
        )
    known = ", ".join(info.snapshot for info in list_dumps(store, vm)) or "none"
    raise PreflightError(
        f"no dump of snapshot {snapshot} in {folder.parent} (dumps: {known})", vm=vm
    )


def verify(run_dir: Path, *, vm: str | None = None) -> dict[str, Any]:
    """Check a run folder: complete manifest, every file present with its size and sha256.
    Returns the manifest; raises :class:`CorruptDump` naming the first problem."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete" or run_dir.name.endswith(FAILED_SUFFIX):
        raise CorruptDump(
            f"{run_dir} is not a complete dump (status {manifest.get('status')})", vm=vm
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptDump(f"{run_dir}: the manifest lists no files", vm=vm)
    for name, entry in files.items():
        if not _MEMBER_RE.fullmatch(name) or not isinstance(entry, dict):
            raise CorruptDump(
                f"{run_dir}: the manifest names {name!r}, which is not a file of its run folder: "
                "refusing to use it",
                vm=vm,
            )
        verify_file(run_dir / name, entry, vm=vm)
    return manifest


#: a file a manifest may list: a plain name inside its run folder (no path, no dot file)
_MEMBER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,200}")


def verify_file(path: Path, entry: dict[str, Any], *, vm: str | None = None) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        raise CorruptDump(f"{path} is missing", vm=vm) from None
    if size != entry.get("size"):
        raise CorruptDump(
            f"{path} has {size} bytes, the manifest says {entry.get('size')}: refusing to use it",
            vm=vm,
        )
    if sha256_file(path) != entry.get("sha256"):
        raise CorruptDump(
            f"{path} does not match its sha256 in the manifest: refusing to use it", vm=vm
        )


def remove_run(store: Path, vm: str, snapshot: str) -> bool:
    """Delete the run folders (good and failed) of ``snapshot``: used when pruning snapshots."""
    removed = False
    for name in (snapshot, f"{snapshot}{FAILED_SUFFIX}", f".{snapshot}{PARTIAL_SUFFIX}"):
        path = vm_dir(store, vm) / name
        if path.is_dir():
            shutil.rmtree(path)
            removed = True
    return removed


@contextlib.contextmanager
def opened_run(store: Path, vm: str, snapshot: str) -> Iterator[RunDir]:
    """``with opened_run(...) as run:`` commits on success; a partial run on error is failed."""
    run = RunDir.begin(store, vm, snapshot)
    try:
        yield run
    except BaseException as exc:
        if run.state == "partial":
            run.fail(f"run aborted: {exc}")
        raise
    run.commit()

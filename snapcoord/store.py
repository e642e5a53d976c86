"""The off-guest store: one folder per VM and snapshot, written atomically, verified by sha256.

Layout::

    <store>/<vm>/<snapshot-name>/            a complete run: every file listed in manifest.json
        manifest.json                        sha256 + size of each file, dump metadata
        mysql.sql.zst                        the logical dump (zstd; .gz / .sql per config)
        files.tar.gz                         optional archive of guest paths
    <store>/<vm>/<snapshot-name>.failed/     a run whose dump failed: kept for inspection, never
                                             listed or restored as good
    <store>/<vm>/.<snapshot-name>.partial/   a run being written (or one that crashed)

Files are written under a temporary name, fsynced and renamed; directories are 0700, files 0600.
A run folder only gets its final name after its manifest is on disk.

Before anything is written, :func:`ensure_private` checks the store (see its docstring and
docs/dump.md): the store and the folders snapcoord keeps in it (``locks``, ``journal``,
``freeze``, ``vzdump``, one per VM) belong to the running user and nobody else can write them,
nor any directory above the store. Files are created with ``O_NOFOLLOW`` (and ``O_EXCL`` for
temporary names, which are unpredictable), so a link planted in the store is never written
through, even by root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import pwd
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcoord.errors import PreflightError
from snapcoord.trust import _access, _quote, _user

MANIFEST = "manifest.json"
FORMAT = 1
FAILED_SUFFIX = ".failed"
PARTIAL_SUFFIX = ".partial"
CHUNK = 1 << 20
# Room kept free besides the estimated dump size, so the store disk never runs completely full.
SPACE_MARGIN = 64 << 20
#: a stream being written never leaves less than SPACE_MARGIN free (a dump larger than its
#: estimate never fills the file system of a root-run host); it looks again at least every this
#: many bytes, to see what other writers took
SPACE_CHECK_BYTES = 8 << 20

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


#: at most this many symbolic links are followed while checking a store path (as the kernel)
_MAX_LINKS = 40


def ensure_private(root: Path, *folders: str, vm: str | None = None) -> Path:
    """Check the store ``root`` and its ``folders`` (plain names, one level each) before
    anything is written there; create what is missing, mode 0700. Returns the last folder.

    The store and each folder must be a directory owned by the running user that neither group
    nor others can write (0700, 0750 and 0755 are fine). Every directory above the store, up to
    ``/``, must belong to root or the running user and not be writable by others, unless it has
    the sticky bit (``/tmp``: only an entry's owner can replace it), as OpenSSH's safe_path. A
    symbolic link on the way must belong to root or the running user; it is followed and its
    target checked the same way. Anything else raises :class:`StoreError`, one line naming the
    path, the problem and the command that fixes it."""
    for name in folders:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a folder name: {name!r}")
    # not os.path.abspath: ".." is resolved by the walk, after the links before it, as the kernel
    top = os.path.join(os.getcwd(), os.fspath(root)).rstrip("/") or "/"
    try:
        _walk(top, folders, vm=vm)
    except OSError as exc:  # not searchable, a file on the way: one line, not a traceback
        where = f" ({_quote(exc.filename)})" if exc.filename and exc.filename != top else ""
        raise StoreError(
            f"store {_quote(top)} cannot be used: {exc.strerror}{where}",
            vm=vm,
            hint="fix the permissions or set defaults.store to a writable folder",
        ) from None
    return Path(top).joinpath(*folders)


def _walk(top: str, folders: tuple[str, ...], *, vm: str | None) -> None:
    """Check (and create) ``top`` and ``folders`` component by component, resolving links the
    way the kernel does, so every directory that decides what the path means is checked."""
    names = [part for part in top.split("/") if part]
    # (name, private): the store and its folders are private, the directories above it not
    pending: list[tuple[str, bool]] = [(name, False) for name in names]
    if pending:
        pending[-1] = (pending[-1][0], True)
    pending += [(name, True) for name in folders]
    current = "/"
    _check_store_dir(top, "/", os.lstat("/"), private=not pending, vm=vm)
    links = 0
    while pending:
        name, private = pending.pop(0)
        if name in (".", ".."):
            current = current if name == "." else os.path.dirname(current)
            if private:
                _check_store_dir(top, current, os.lstat(current), private=True, vm=vm)
            continue
        candidate = os.path.join(current, name)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            info = _make_private_dir(top, candidate, vm=vm)
        if stat.S_ISLNK(info.st_mode):
            links += 1
            owner = _owner_problem(info.st_uid, private=False)
            if owner or links > _MAX_LINKS:
                problem = f"is a symbolic link owned by {owner}" if owner else "has a link loop"
                raise _store_error(top, candidate, problem, f"rm {_quote(candidate)}", vm=vm)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            parts = [(part, False) for part in target.split("/") if part]
            if parts:
                parts[-1] = (parts[-1][0], private)
            elif private:  # a link to "/"
                _check_store_dir(top, "/", os.lstat("/"), private=True, vm=vm)
            pending = parts + pending
            continue
        _check_store_dir(top, candidate, info, private=private, vm=vm)
        current = candidate


def _make_private_dir(top: str, path: str, *, vm: str | None) -> os.stat_result:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return os.lstat(path)  # created meanwhile: checked like any other
    except OSError as exc:  # read-only, or a parent we may not write
        raise StoreError(
            f"store {_quote(path)} is not writable: {exc.strerror}",
            vm=vm,
            hint="fix the permissions or set defaults.store to a writable folder",
        ) from None
    os.chmod(path, 0o700)  # whatever the umask
    return os.lstat(path)


def _check_store_dir(
    top: str, path: str, info: os.stat_result, *, private: bool, vm: str | None
) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise _store_error(top, path, "is not a directory", None, vm=vm)
    owner = _owner_problem(info.st_uid, private=private)
    if owner:
        user = _user_name(os.geteuid()) if private else "root"
        raise _store_error(top, path, f"is owned by {owner}", f"chown {user} {_quote(path)}", vm=vm)
    mode = stat.S_IMODE(info.st_mode)
    if private and mode & 0o022:
        fix = f"chmod 700 {_quote(path)}"
        raise _store_error(top, path, f"is {_access(mode & 0o022)} (mode {mode:04o})", fix, vm=vm)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        problem = f"is {_access(mode & 0o022)} (mode {mode:04o}, no sticky bit)"
        raise _store_error(top, path, problem, f"chmod go-w {_quote(path)}", vm=vm)


def _owner_problem(uid: int, *, private: bool) -> str | None:
    """None if ``uid`` may own a store folder (the running user) or a directory above it or a
    link on the way (root too)."""
    euid = os.geteuid()
    if uid == euid or (uid == 0 and not private):
        return None
    if private or euid == 0:
        return f"{_user(uid)}, not {_user(euid)}"
    return f"{_user(uid)}, not root or {_user(euid)}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _store_error(
    top: str, path: str, problem: str, fix: str | None, *, vm: str | None
) -> StoreError:
    where = f"store {_quote(top)}" if path == top else f"store {_quote(top)}: {_quote(path)}"
    return StoreError(
        f"{where} {problem}: refusing to use it",
        vm=vm,
        hint=f"fix: {fix}" if fix else "set defaults.store to a folder of your own",
    )


#: flags for creating a file in the store: never through a link, never a terminal, no inherit
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


def create_file(path: Path) -> int:
    """A new file at ``path`` (mode 0600), opened for writing: whatever was there (a leftover of
    an earlier run, or a link someone planted) is removed first, never opened or followed."""
    for _ in range(3):
        try:
            return os.open(path, _CREATE, 0o600)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a link is removed, not its target
    return os.open(path, _CREATE, 0o600)


def read_file(path: Path) -> bytes:
    """The contents of a regular file snapcoord wrote, without following a link at ``path``
    (``OSError`` ELOOP) or hanging on a FIFO put there."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link, not followed", str(path)) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return handle.read()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any], *, indent: int = 2) -> None:
    text = json.dumps(data, indent=indent, sort_keys=True) + "\n"
    write_atomic(path, text.encode("utf-8"))


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) through a temporary file with an unpredictable
    name created exclusively in the same folder (``mkstemp``: ``O_EXCL``, ``O_NOFOLLOW``), then
    rename it into place: a rename replaces a link at ``path``, never writes through it."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    fsync_dir(path.parent)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def check_writable(store: Path, vm: str, needed_bytes: int) -> Path:
    """Preflight: the VM's store folder exists (0700), takes a test file, and has room for
    ``needed_bytes`` plus a margin. Returns the folder; raises :class:`StoreError`."""
    folder = vm_dir(store, vm)
    ensure_private(store, folder.name, vm=vm)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        try:
            os.write(fd, b"snapcoord\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise StoreError(
            f"store {folder} is not writable: {exc.strerror}",
            vm=vm,
            hint="fix the permissions or set defaults.store to a writable folder",
        ) from None
    available = free_bytes(folder)
    if available < needed_bytes + SPACE_MARGIN:
        raise StoreError(
            f"store {folder} has {mib(available)} free, the dump needs about "
            f"{mib(needed_bytes + SPACE_MARGIN)}",
            vm=vm,
            hint="free space or prune old dumps",
        )
    return folder


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


class FileSink:
    """A file in a run folder being written: hashes and counts every byte, lands atomically."""

    def __init__(self, run: RunDir, name: str) -> None:
        self.run = run
        self.name = name
        self.final = run.path / name
        self.part = run.path / f".{name}.part"
        self._fd = create_file(self.part)
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False
        self._unchecked = 0
        self._allowance = 0  # bytes it may still write before SPACE_MARGIN: the first checks

    def write(self, data: bytes) -> None:
        self._unchecked += len(data)
        if self._unchecked >= SPACE_CHECK_BYTES or len(data) > self._allowance:
            self._unchecked = 0
            self._check_space(len(data))
        self._allowance -= len(data)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._hash.update(data)
        self.size += len(data)

    def _check_space(self, coming: int) -> None:
        """ENOSPC before the file system is full: the dump fails like on a full store (its
        partial file is removed), with SPACE_MARGIN still free for everything else."""
        left = free_bytes(self.run.path)
        self._allowance = left - SPACE_MARGIN
        if coming > self._allowance:
            raise OSError(
                errno.ENOSPC,
                f"the store's file system has {mib(left)} free after {mib(self.size)}: "
                f"stopped before it would leave less than {mib(SPACE_MARGIN)}",
            )

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
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # a link is not a stored file
    with os.fdopen(fd, "rb") as handle:
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
        ensure_private(store, run.parent.name, vm=vm)
        if run.final.exists():
            raise StoreError(f"store already holds a run {run.final}", vm=vm)
        try:
            if run.path.is_symlink():  # not ours: removed, never followed
                run.path.unlink()
            elif run.path.exists():  # left over from a crashed run with the same name
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
        data = json.loads(read_file(path))
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
        info = path.lstat()
    except OSError:
        raise CorruptDump(f"{path} is missing", vm=vm) from None
    if not stat.S_ISREG(info.st_mode):  # a link is not a stored file: never followed
        raise CorruptDump(f"{path} is not a regular file: refusing to use it", vm=vm)
    size = info.st_size
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

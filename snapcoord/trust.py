"""Files that are code or credentials for whoever runs snapcoord (root, mostly): the configuration
and ``{ file = "..." }`` secrets.

Such a file is used only if nobody but root and the running user (the effective uid) can change
it, the way OpenSSH treats its configuration and keys (``safe_path``): the file, after resolving
symbolic links, must be a regular file owned by root or the running user and not writable by
group or others, and so must every directory above it up to ``/`` (a directory with the sticky
bit, like ``/tmp``, may be writable by others: only an entry's owner can replace that entry, and
the entry below it is checked in turn). A *private* file (a secret) must also not be readable by
group or others, as ssh requires of a private key.

The file is opened once (``O_NOFOLLOW`` on the resolved path, ``O_NONBLOCK`` so a FIFO cannot
hang the open) and the checks look at that open descriptor, so what is checked is what is read.
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat

__all__ = ["UnsafeFile", "read_trusted"]


class UnsafeFile(Exception):
    """Why a file is not used, as the end of a sentence ("is writable by others (mode 0666)"),
    and the command that fixes it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


def read_trusted(path: str, *, private: bool = False) -> bytes:
    """The contents of ``path`` if only root and the running user control it (and, if
    ``private``, only they can read it). Raises :class:`UnsafeFile` if not, ``OSError`` if it
    cannot be opened or read, ``ValueError`` for a NUL in ``path``."""
    real = os.path.realpath(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(real, flags)
    try:
        _check_file(os.fstat(fd), real, private=private)
        _check_directories(real)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _check_file(info: os.stat_result, real: str, *, private: bool) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile("is not a regular file")
    owner = _owner_problem(info.st_uid)
    if owner:
        fix = f"chown root {_quote(real)}"
        if os.geteuid() != 0:
            fix = f"use a file of your own, or {fix}"
        raise UnsafeFile(f"is owned by {owner}", fix)
    mode = stat.S_IMODE(info.st_mode)
    if private and mode & 0o077:
        raise UnsafeFile(f"is {_access(mode)} (mode {mode:04o})", f"chmod go-rwx {_quote(real)}")
    if mode & 0o022:
        raise UnsafeFile(f"is {_access(mode)} (mode {mode:04o})", f"chmod go-w {_quote(real)}")


def _check_directories(real: str) -> None:
    """Every directory above ``real`` (absolute, resolved), from its own up to ``/``."""
    move = f"move {_quote(real)} to a directory only root can change, such as /etc/snapcoord"
    folder = os.path.dirname(real)
    while True:
        info = os.stat(folder)
        owner = _owner_problem(info.st_uid)
        if owner:
            raise UnsafeFile(f"is in directory {_quote(folder)}, owned by {owner}", move)
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise UnsafeFile(
                f"is in directory {_quote(folder)}, {_access(mode & 0o022)} (mode {mode:04o})",
                f"chmod go-w {_quote(folder)}, or {move}",
            )
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _owner_problem(uid: int) -> str | None:
    """None if ``uid`` may own a trusted file: root or the running user."""
    euid = os.geteuid()
    if uid in (0, euid):
        return None
    allowed = "root" if euid == 0 else f"root or {_user(euid)} (you)"
    return f"{_user(uid)}, not {allowed}"


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _access(mode: int) -> str:
    """The strongest access anyone else has: "writable by group and others" for mode 0666."""
    for bits, verb in ((0o022, "writable"), (0o044, "readable"), (0o011, "executable")):
        group, others = mode & bits & 0o070, mode & bits & 0o007
        who = [name for name, bit in (("group", group), ("others", others)) if bit]
        if who:
            return f"{verb} by {' and '.join(who)}"
    return "accessible by others"


def _quote(path: str) -> str:
    """A path for a shell command in a one-line message."""
    return shlex.quote(path) if path.isprintable() else repr(path)

"""The coordinator side of ``snapcoord verify`` that every database kind shares: a private work
folder, the confinement of every process that touches the dump, and starting and stopping a
throwaway server by its PID.

The dump comes from the guest and is treated as hostile. Everything that reads it (the server,
its client, the decompressor) runs through :func:`confined`: a fresh network namespace (only a
loopback interface, down: Unix sockets only) and a fresh mount namespace in which every mount is
read-only, ``/tmp`` and ``/dev/shm`` are empty private tmpfs (gone with the process) and only
the work folder, where a server needs it, can be written (:data:`LOCKDOWN`: a dump's shell
escapes, ``SELECT ... INTO OUTFILE`` or ``COPY ... TO`` write nowhere that outlives the verify),
then ``setpriv`` to ``nobody`` (uid and gid
65534, no supplementary groups, no capabilities, ``no_new_privs``), killed when the process
that started it ends (``--pdeathsig KILL``; the signal follows the *thread* that started the
process, so a server must be started from the thread that stops it), with an empty
environment except a fixed ``PATH`` of system folders, and ``/`` as its working folder.

The work folder is ``<verify_dir>/snapcoord-verify.<pid>.<random>``: made with ``mkdir``
(never following a link planted at its name: an existing name is skipped), owned by root,
mode 0711 (nobody can traverse it to the folders made for it, but neither list nor change it).
Every file is removed when the ``with`` block ends, whatever ended it (an exception, the CLI's
cancellation on SIGTERM, KeyboardInterrupt); removal never follows a link (``shutil.rmtree``
works with directory file descriptors). A folder left by a process that was SIGKILLed is
removed by the next :func:`workspace` (:func:`remove_leftovers`): its name carries the PID,
and the flock its verify holds on it tells a live verify of another PID namespace (a container
sharing ``verify_dir``) from a dead one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from snapcoord.errors import VerifyUnavailable
from snapcoord.guest import ExecTransport
from snapcoord.shell import kill_group, spawn

log = logging.getLogger("snapcoord.verify")

#: The unprivileged user and group every confined process runs as.
NOBODY = 65534
#: The programs of the confinement prefix (util-linux, coreutils): fixed paths only.
UNSHARE = "/usr/bin/unshare"
SETPRIV = "/usr/bin/setpriv"
ENV = "/usr/bin/env"
SH = "/bin/sh"
MOUNT = "/usr/bin/mount"
MOUNTPOINT = "/usr/bin/mountpoint"
#: The only PATH a confined process sees: system folders, nothing relative.
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PREFIX = "snapcoord-verify."
_NAME_RE = re.compile(r"snapcoord-verify\.([0-9]+)\.[0-9a-f]+")
#: Names tried before giving up when each one is taken (a planted file or link).
ATTEMPTS = 20
#: Seconds a stopped process gets between SIGTERM and SIGKILL, by default.
GRACE = 30.0


#: Run as root inside the new mount namespace (private propagation: nothing reaches the host's),
#: before the drop to nobody. $1 = the work folder ("" for none), $2 = "rw" when the process may
#: write in it, then the command. Every mount read-only, keeping its other options (a mount
#: already read-only is left as it is, and so is one that a later mount covers: no path reaches
#: it); a fresh tmpfs on /tmp and on /dev/shm (PostgreSQL's shared memory); the work folder a
#: mount of its own, kept in sight (the server's socket is there: when it is under /tmp or
#: /dev/shm it is moved aside onto the other fresh tmpfs and back on top of its own), and
#: read-write, nosuid, nodev for a process that writes in it (nobody can write only in nobody's
#: folders in it: it is root's, 0711). ``mount -n``: the userspace mount table is read-only
#: too. Any failure ends it (exit 126): nothing runs half confined.
LOCKDOWN = rf"""
PATH=/usr/sbin:/usr/bin:/sbin:/bin
w=$1; rw=$2; shift 2
while read -r _ _ _ _ mp opts _; do
  case ",$opts," in *,ro,*) continue;; esac
  mp=$(printf '%b' "$mp")
  [ -e "$mp" ] || continue
  if ! {MOUNT} -n -o "remount,bind,ro${{opts#rw}}" "$mp" 2>/dev/null && {MOUNTPOINT} -q "$mp"
  then
    echo "cannot make $mp read-only for the confined process" >&2; exit 126
  fi
done < /proc/self/mountinfo
fresh() {{ {MOUNT} -n -t tmpfs -o nosuid,nodev,size=256m,mode=1777 snapcoord-verify "$1"; }}
inside=
for d in /tmp /dev/shm; do case "$w/" in "$d"/*) inside=$d;; esac; done
if [ -n "$w" ]; then {MOUNT} -n --rbind "$w" "$w" || exit 126; fi
for d in /dev/shm /tmp; do [ "$d" = "$inside" ] || fresh "$d" || exit 126; done
if [ -n "$inside" ]; then
  aside=/dev/shm/.work; [ "$inside" = /dev/shm ] && aside=/tmp/.work
  {{ mkdir "$aside" && {MOUNT} -n --move "$w" "$aside" && fresh "$inside" && mkdir -p "$w" &&
    {MOUNT} -n --move "$aside" "$w" && rmdir "$aside"; }} || exit 126
fi
if [ -n "$w" ] && [ "$rw" = rw ]; then
  {MOUNT} -n -o remount,bind,rw,nosuid,nodev "$w" || exit 126
fi
exec "$@"
"""


def confined(argv: Sequence[str], *, work: Path | None = None, writable: bool = False) -> list[str]:
    """``argv`` run as nobody, without network, capabilities or environment, in a read-only
    system with private ``/tmp`` and ``/dev/shm`` (see above). ``work``: the verify's work
    folder, kept in sight (its server's socket) and read-only; ``writable``: the process may
    write in it (a server, or what makes its files).

    ``confined([])`` is the bare prefix, for :class:`ExecTransport`."""
    return [
        UNSHARE, "--net", "--mount", "--propagation", "private", "--",
        SH, "-c", LOCKDOWN, "sh", str(work or ""), "rw" if writable and work else "",
        SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
        "--inh-caps=-all", "--bounding-set=-all", "--pdeathsig=KILL", "--",
        ENV, "-i", "--chdir=/", f"PATH={SAFE_PATH}", "HOME=/nonexistent", "LC_ALL=C.UTF-8",
        *argv,
    ]  # fmt: skip


def transport(work: Path, *, vm: str) -> ExecTransport:
    """A local transport whose every command runs :func:`confined` (``work`` in sight, not
    writable): a kind's ``Client`` talks to the throwaway server through it exactly as it
    talks to the guest's server."""
    return ExecTransport(confined([], work=work), vm=vm)


def require_tools(*, vm: str) -> None:
    """The confinement's own programs (util-linux, coreutils)."""
    for program in (UNSHARE, SETPRIV, ENV, SH, MOUNT, MOUNTPOINT):
        if not os.access(program, os.X_OK):
            raise VerifyUnavailable(
                f"cannot verify: {program} not found on this coordinator",
                vm=vm,
                hint="install util-linux and coreutils",
            )


# --------------------------------------------------------------------------------------------
# The work folder


def _check_verify_dir(verify_dir: Path, *, vm: str | None) -> None:
    if not verify_dir.is_absolute():
        raise VerifyUnavailable(f"verify_dir {verify_dir} is not an absolute path", vm=vm)
    try:
        info = os.lstat(verify_dir)
    except OSError as exc:
        raise VerifyUnavailable(
            f"verify_dir {verify_dir} cannot be used: {exc.strerror}", vm=vm
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise VerifyUnavailable(f"verify_dir {verify_dir} is not a folder (or is a link)", vm=vm)
    for folder in [verify_dir, *verify_dir.parents]:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            raise VerifyUnavailable(
                f"verify_dir {verify_dir} cannot be reached by the user nobody ({folder} "
                "lacks o+x), which runs the throwaway server",
                vm=vm,
            )
    shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if info.st_uid != 0 or (shared and not info.st_mode & stat.S_ISVTX):
        raise VerifyUnavailable(
            f"verify_dir {verify_dir} must be owned by root and not writable by others "
            "(or sticky, like /var/tmp)",
            vm=vm,
        )


def _suffix() -> str:
    return secrets.token_hex(6)


def _make_work(verify_dir: Path, *, vm: str | None) -> Path:
    for _ in range(ATTEMPTS):
        path = verify_dir / f"{PREFIX}{os.getpid()}.{_suffix()}"
        try:
            os.mkdir(path, 0o700)  # EEXIST for anything at that name, a link included
        except FileExistsError:
            continue
        except OSError as exc:
            raise VerifyUnavailable(
                f"cannot make a work folder in {verify_dir}: {exc.strerror}", vm=vm
            ) from None
        os.chmod(path, 0o711)  # noqa: S103 - nobody may reach its own folders in it, nothing else
        return path
    raise VerifyUnavailable(
        f"cannot make a work folder in {verify_dir}: every name tried was taken", vm=vm
    )


def _lock(path: Path, *, wait: bool) -> int | None:
    """An flock on the folder itself (never through a link): held while a verify uses it, so
    a verify in another PID namespace (where the name's PID means nothing) leaves it alone.
    None when another process holds it (``wait=False``) or it is not a folder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def workspace(verify_dir: Path, *, vm: str | None = None) -> Iterator[Path]:
    """A fresh work folder in ``verify_dir``, removed with everything in it at the end.

    Leftovers of dead processes are removed first (:func:`remove_leftovers`)."""
    verify_dir = Path(verify_dir)
    _check_verify_dir(verify_dir, vm=vm)
    remove_leftovers(verify_dir)
    work = _make_work(verify_dir, vm=vm)
    lock = _lock(work, wait=True)  # non-inheritable: no child holds it after this process
    try:
        yield work
    finally:
        try:
            remove(work)
        finally:
            if lock is not None:
                os.close(lock)


def nobody_folder(work: Path, name: str) -> Path:
    """A folder ``name`` inside ``work`` owned by nobody (mode 0700), for a confined server."""
    path = work / name
    os.mkdir(path, 0o700)
    os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    return path


def remove(path: Path) -> None:
    """Remove a work folder and everything in it; links inside are removed, never followed."""
    failures: list[str] = []

    def failed(_function: object, name: str, info: tuple[type, BaseException, object]) -> None:
        exc = info[1]
        if not (isinstance(exc, OSError) and exc.errno == errno.ENOENT):
            failures.append(f"{name}: {exc}")

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path, onerror=failed)
    else:
        os.unlink(path)  # a link put where a work folder was: the link goes, its target stays
    if failures:
        log.warning("could not remove everything in %s: %s", path, failures[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(verify_dir: Path) -> list[Path]:
    """Remove the work folders in ``verify_dir`` whose process is gone (a SIGKILLed verify);
    returns what was removed. A folder of a live process is kept, and so is one whose lock a
    process holds (a verify in another PID namespace sharing ``verify_dir``)."""
    removed = []
    try:
        names = os.listdir(verify_dir)
    except OSError:
        return []
    for name in names:
        match = _NAME_RE.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        path = Path(verify_dir) / name
        if os.path.islink(path):
            remove(path)  # the link goes, never what it points to
            removed.append(path)
            continue
        lock = _lock(path, wait=False)
        if lock is None:
            continue  # in use by a process this namespace cannot see
        try:
            _end_processes_in(path)
            remove(path)
        finally:
            os.close(lock)
        removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# A confined server process


def start(
    argv: Sequence[str], *, work: Path, log_file: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` confined, able to write in ``work`` only, in a session of its own
    (stdout and stderr to ``log_file``, a root-owned file the server cannot reach, or
    discarded). Stop it with :func:`stop`."""
    output: int | object = subprocess.DEVNULL
    with contextlib.ExitStack() as stack:
        if log_file is not None:
            fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            output = stack.enter_context(open(fd, "wb"))
        return spawn(
            confined(argv, work=work, writable=True),
            stdin=subprocess.DEVNULL,
            stdout=output,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT,
            env={"PATH": SAFE_PATH},
            cwd="/",
        )


def stop(process: subprocess.Popen[bytes], *, grace: float = GRACE) -> None:
    """SIGTERM the process (by its PID), wait up to ``grace`` seconds, then SIGKILL its whole
    process group; returns when it was reaped. Safe to call on a process that already ended."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    kill_group(process)  # whatever it left in its group goes too
    process.wait()
    _wait_group_gone(process.pid, GROUP_GONE)


#: Seconds :func:`stop` waits for the rest of a killed process group to be reaped.
GROUP_GONE = 10.0


def _wait_group_gone(pgid: int, seconds: float) -> None:
    """Until no process of group ``pgid`` is left (SIGKILLed members are reaped by init)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # a member of another user's: it exists
            pass
        time.sleep(0.02)


def _end_processes_in(path: Path) -> None:
    """SIGKILL nobody's processes whose working folder is ``path`` or inside it: what a
    SIGKILLed verify left running (a PostgreSQL backend busy in one statement outlives its
    postmaster until the statement ends; its working folder is the data folder)."""
    inside = str(path)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != NOBODY:
                continue
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == inside or cwd.startswith(inside + "/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)

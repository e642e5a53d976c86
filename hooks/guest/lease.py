"""The guest lease: one coordinator at a time brackets a guest.

The coordinator's VM lock (snapcoord/lock.py) is a file on the coordinator: two coordinators (two
Proxmox nodes after a migration, a timer here and a backup product there, two configurations that
name the same guest) never see each other's. So every run that brackets a guest also holds a
lease *in the guest*: ``/run/snapcoord/lease``, taken and released by one guest command each,
atomically under ``flock`` on ``/run/snapcoord/lease.lock``. The directory must be the running
user's (root, through sudo), not writable by anybody else, and not a link, as ssh checks its own
files: a directory another user planted is refused, nothing is written through it. A guest whose
environment sets ``SNAPCOORD_LEASE_DIR`` (an absolute path, checked the same way) uses that
directory instead: the stand-in guests of the demo and the tests are one machine through
``exec``, each a guest of its own.

The lease names its holder (coordinator host, PID, run id, command, since) and ends at
``expires``, both on the **guest's** clock (``date +%s`` in the guest): a second coordinator's
clock never decides whether a lease is live. A run renews it right before it arms its watchdog
(for ``seconds`` = ``watchdog_seconds``) or pauses writes (``pause_timeout``), so the lease of a
holder that died ends no later than its watchdog fires or its lock session is ended by the guest.

Everything the guest answers is parsed here, into :class:`Answer` and :class:`LeaseRecord`; a
lease file that is not what this module writes is one :class:`CorruptLease` line, never acted on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from dataclasses import dataclass

from snapcoord.errors import GuestError, Locked, PreflightError
from snapcoord.guest import Transport

LEASE_DIR = "/run/snapcoord"
LEASE_FILE = f"{LEASE_DIR}/lease"
#: the longest a lease file may be (a few short lines)
MAX_BYTES = 1024

# $1 = action (take | release), $2 = our run id, $3 = seconds (take), $4 = host, $5 = pid,
# $6 = command, $7 = take over a live lease whose `since` is at or before this epoch (0: none),
# $8.. = run ids whose live lease we take over (resurrected by a revert).
# Prints "verdict WORD", "now EPOCH", then the lease file before ("old KEY VALUE") and after
# ("new KEY VALUE"). Verdicts: taken, busy, corrupt, released, absent, other, unsafe REASON.
SCRIPT = r"""
umask 077
d=${SNAPCOORD_LEASE_DIR:-__DIR__}; f=$d/lease
action=$1; run=$2; secs=$3; host=$4; cpid=$5; cmd=$6; before=$7; shift 7
unsafe() { echo "verdict unsafe $*"; exit 0; }
case $d in /?*) ;; *) unsafe "SNAPCOORD_LEASE_DIR must be an absolute path";; esac
echo "dir $d"
command -v flock >/dev/null 2>&1 || unsafe "flock (util-linux) is not installed in the guest"
me=$(id -u)
for p in "${d%/*}" "$d"; do
  [ -L "$p" ] && unsafe "$p is a symbolic link"
  if [ "$p" = "$d" ] && [ ! -e "$p" ]; then
    mkdir -m 0700 "$p" 2>/dev/null || [ -d "$p" ] || unsafe "cannot create $p"
  fi
  [ -L "$p" ] && unsafe "$p is a symbolic link"
  [ -d "$p" ] || unsafe "$p is not a directory"
  owner=$(stat -c %u "$p") && mode=$(stat -c %a "$p") || unsafe "cannot stat $p"
  # ssh's rule: the directory is ours, its parent root's or ours; nobody else may write
  if [ "$p" = "$d" ]; then
    [ "$owner" = "$me" ] || unsafe "$p belongs to uid $owner, not uid $me"
  else
    [ "$owner" = 0 ] || [ "$owner" = "$me" ] || unsafe "$p belongs to uid $owner"
  fi
  [ $(( 0$mode & 18 )) -eq 0 ] || unsafe "$p is writable by others (mode $mode)"
done
[ -L "$d/lease.lock" ] && unsafe "$d/lease.lock is a symbolic link"
exec 8>>"$d/lease.lock" || unsafe "cannot open $d/lease.lock"
flock -w 20 8 || unsafe "$d/lease.lock stayed locked for 20 s"
now=$(date +%s)
echo "now $now"
hrun=; hexp=; hsince=
if [ -L "$f" ] || { [ -e "$f" ] && [ ! -f "$f" ]; }; then
  echo "verdict corrupt it is not a plain file"; exit 0
fi
if [ -f "$f" ]; then
  if [ $(( $(wc -c < "$f") )) -gt __MAX__ ]; then
    echo "verdict corrupt it is longer than __MAX__ bytes"; exit 0
  fi
  sed 's/^/old /' "$f"
  # what LeaseRecord.parse accepts: six lines, each field once, each of its shape
  [ $(( $(wc -l < "$f") )) -eq 6 ] || { echo "verdict corrupt"; exit 0; }
  for re in '^host [A-Za-z0-9._-]\{1,64\}$' '^pid [0-9]\{1,12\}$' \
            '^run [A-Za-z0-9._:-]\{1,64\}$' '^command [a-z][a-z-]\{0,31\}$' \
            '^since [0-9]\{1,12\}$' '^expires [0-9]\{1,12\}$'; do
    [ "$(grep -c -- "$re" "$f")" = 1 ] || { echo "verdict corrupt"; exit 0; }
  done
  hrun=$(sed -n 's/^run //p' "$f")
  hexp=$(sed -n 's/^expires //p' "$f")
  hsince=$(sed -n 's/^since //p' "$f")
fi
if [ "$action" = release ]; then
  if [ -z "$hrun" ]; then echo "verdict absent"
  elif [ "$hrun" = "$run" ]; then rm -f "$f"; echo "verdict released"
  else echo "verdict other"; fi
  exit 0
fi
since=$now
if [ -n "$hrun" ]; then
  if [ "$hrun" = "$run" ]; then since=$hsince
  elif [ "$hexp" -gt "$now" ]; then
    over=; [ "$hsince" -le "$before" ] && over=1
    for r in "$@"; do [ "$r" = "$hrun" ] && over=1; done
    [ -n "$over" ] || { echo "verdict busy"; exit 0; }
  fi
fi
tmp=$d/lease.new
rm -f "$tmp"
printf 'host %s\npid %s\nrun %s\ncommand %s\nsince %s\nexpires %s\n' \
  "$host" "$cpid" "$run" "$cmd" "$since" "$((now + secs))" > "$tmp" && mv -f "$tmp" "$f" \
  || unsafe "cannot write $f"
sed 's/^/new /' "$f"
echo "verdict taken"
""".replace("__DIR__", LEASE_DIR).replace("__MAX__", str(MAX_BYTES))

TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_HOST = re.compile(r"[A-Za-z0-9._-]{1,64}")
_COMMAND = re.compile(r"[a-z][a-z-]{0,31}")
_NUMBER = re.compile(r"[0-9]{1,12}")
_FIELDS = ("host", "pid", "run", "command", "since", "expires")


class CorruptLease(PreflightError):
    """The guest's lease file is not one snapcoord wrote: nothing in it is acted on."""


class UnsafeLeaseDir(PreflightError):
    """The lease's directory in the guest cannot be trusted (another user's, a link, ...)."""


class GuestBusy(Locked):
    """Another coordinator holds the guest's lease (exit 75)."""

    def __init__(self, record: LeaseRecord, *, vm: str) -> None:
        self.record = record
        super().__init__(
            f"the guest is held by another coordinator: {record.holder()} since "
            f"{utc(record.since)} (guest clock)",
            vm=vm,
            hint=f"wait for it to finish; if it died, its lease ends at {utc(record.expires)} "
            "at the latest (guest clock)",
        )


@dataclass(frozen=True)
class Holder:
    """Who takes a lease: this coordinator's run."""

    host: str
    pid: int
    run: str
    command: str

    @classmethod
    def of(cls, *, host: str, pid: int, run: str, command: str) -> Holder:
        """Values as the lease file takes them: a host name cut to the allowed characters,
        a run id and a command that must already be tokens (they are snapcoord's own)."""
        clean = re.sub(r"[^A-Za-z0-9._-]", "_", host)[:64] or "unknown"
        if not TOKEN.fullmatch(run) or not _COMMAND.fullmatch(command):
            raise ValueError(f"not a lease token: run {run!r}, command {command!r}")
        return cls(clean, pid, run, command)


@dataclass(frozen=True)
class LeaseRecord:
    """A lease file, checked: every field once, each of its own shape, nothing else."""

    host: str
    pid: int
    run: str
    command: str
    since: int  # epoch seconds, guest clock
    expires: int  # epoch seconds, guest clock

    @classmethod
    def parse(cls, lines: list[str], *, vm: str, file: str = LEASE_FILE) -> LeaseRecord:
        """``lines``: the file's lines. :class:`CorruptLease` (one line, the first problem)."""
        values: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            key, _, value = line.partition(" ")
            if key not in _FIELDS:
                raise _corrupt(
                    f"line {number} is not one of {', '.join(_FIELDS)}", vm=vm, file=file
                )
            if key in values:
                raise _corrupt(f"{key} appears twice", vm=vm, file=file)
            values[key] = value
        missing = [k for k in _FIELDS if k not in values]
        if missing:
            raise _corrupt(f"no {', '.join(missing)}", vm=vm, file=file)
        shapes = {"host": _HOST, "run": TOKEN, "command": _COMMAND, "pid": _NUMBER,
                  "since": _NUMBER, "expires": _NUMBER}  # fmt: skip
        for key, shape in shapes.items():
            if not shape.fullmatch(values[key]):
                raise _corrupt(f"its {key} is not what snapcoord writes", vm=vm, file=file)
        return cls(
            host=values["host"],
            pid=int(values["pid"]),
            run=values["run"],
            command=values["command"],
            since=int(values["since"]),
            expires=int(values["expires"]),
        )

    def holder(self) -> str:
        return f"{self.host} pid {self.pid}, run {self.run} ({self.command})"


@dataclass(frozen=True)
class Answer:
    """What the lease script printed, parsed."""

    verdict: str
    reason: str  # for "unsafe"
    where: str  # the lease's directory in the guest
    now: int | None  # the guest's clock when it decided
    old: list[str]  # the lease file before
    new: list[str]  # the lease file after (taken)

    @classmethod
    def parse(cls, stdout: bytes, *, vm: str) -> Answer:
        verdict, reason, now, where = "", "", None, LEASE_DIR
        old: list[str] = []
        new: list[str] = []
        for raw in stdout.decode("utf-8", errors="replace").splitlines():
            tag, _, rest = raw.partition(" ")
            if tag == "verdict":
                verdict, _, reason = rest.partition(" ")
            elif tag == "dir" and rest.startswith("/"):
                where = rest
            elif tag == "now" and _NUMBER.fullmatch(rest):
                now = int(rest)
            elif tag == "old":
                old.append(rest)
            elif tag == "new":
                new.append(rest)
        if verdict not in ("taken", "busy", "corrupt", "released", "absent", "other", "unsafe"):
            raise GuestError("the guest lease command gave no verdict", vm=vm)
        return cls(verdict, reason, where, now, old, new)


@dataclass(frozen=True)
class Taken:
    record: LeaseRecord  # the lease as it is now in the guest: ours
    now: int  # the guest's clock when it was taken
    replaced: LeaseRecord | None  # someone else's lease that was there (expired, or taken over)


def take(
    transport: Transport,
    holder: Holder,
    *,
    seconds: int,
    vm: str,
    sudo: bool,
    timeout: float,
    take_over: Collection[str] = (),
    taken_before: int = 0,
) -> Taken:
    """Take (or renew: same run) the guest's lease until the guest's clock + ``seconds``.
    A live lease of another run is taken over only when its run is in ``take_over`` or it was
    taken at or before ``taken_before`` (guest epoch); otherwise :class:`GuestBusy`."""
    argv = ["sh", "-c", SCRIPT, "snapcoord-lease", "take", holder.run, str(int(seconds)),
            holder.host, str(holder.pid), holder.command, str(int(taken_before)),
            *take_over]  # fmt: skip
    answer = _run(transport, argv, vm=vm, sudo=sudo, timeout=timeout)
    file = f"{answer.where}/lease"
    if answer.verdict == "busy":
        raise GuestBusy(LeaseRecord.parse(answer.old, vm=vm, file=file), vm=vm)
    if answer.verdict != "taken" or answer.now is None:
        raise GuestError(f"the guest lease command answered {answer.verdict!r}", vm=vm)
    record = LeaseRecord.parse(answer.new, vm=vm, file=file)
    if record.run != holder.run:
        raise GuestError("the guest lease names another run after taking it", vm=vm)
    replaced = None
    if answer.old:
        try:
            previous = LeaseRecord.parse(answer.old, vm=vm, file=file)
        except CorruptLease:
            previous = None  # shape checked by the guest (run, since, expires): overwritten
        if previous is not None and previous.run != holder.run:
            replaced = previous
    return Taken(record, answer.now, replaced)


def release(transport: Transport, run: str, *, vm: str, sudo: bool, timeout: float) -> str:
    """Remove the lease if run ``run`` holds it. Returns ``released``, ``absent`` (no lease)
    or ``other`` (another run's: left alone)."""
    argv = ["sh", "-c", SCRIPT, "snapcoord-lease", "release", run, "0", "-", "0", "release", "0"]
    answer = _run(transport, argv, vm=vm, sudo=sudo, timeout=timeout)
    if answer.verdict not in ("released", "absent", "other"):
        raise GuestError(f"the guest lease command answered {answer.verdict!r}", vm=vm)
    return answer.verdict


def _run(transport: Transport, argv: list[str], *, vm: str, sudo: bool, timeout: float) -> Answer:
    result = transport.run(argv, sudo=sudo, timeout=timeout)
    if not result.ok:
        raise GuestError(f"the guest lease command failed: {result.error_text()}", vm=vm)
    answer = Answer.parse(result.stdout, vm=vm)
    if answer.verdict == "unsafe":
        raise UnsafeLeaseDir(
            f"the guest lease cannot be taken safely: {answer.reason}",
            vm=vm,
            hint=f"{answer.where} in the guest must be root's, mode 0700, not a link; "
            "remove what is there if nobody else made it",
        )
    if answer.verdict == "corrupt":
        file = f"{answer.where}/lease"
        if answer.reason:
            raise _corrupt(answer.reason, vm=vm, file=file)
        # the guest's own check failed; say which field the strict parse finds wrong
        LeaseRecord.parse(answer.old, vm=vm, file=file)
        raise _corrupt("it is not what snapcoord writes", vm=vm, file=file)
    return answer


def _corrupt(problem: str, *, vm: str, file: str) -> CorruptLease:
    return CorruptLease(
        f"the guest's lease file {file} is not one snapcoord wrote ({problem}): not used",
        vm=vm,
        hint=f"remove it in the guest (rm {file}) once no coordinator works on this VM",
    )


def utc(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))

"""The guest-side dead-man's switch.

Before the first stop, a detached process (``setsid``, no terminal, all descriptors closed) is
started in the guest: after ``watchdog_seconds`` it starts every service this run is going to
stop, database first, unless the run disarmed it. It does not depend on the SSH connection or on
snapcoord being alive, so a dropped connection or ``kill -9`` of snapcoord still ends with the
services running. It starts services only when they are not running, so firing late is harmless.

While it is armed, the file ``/run/snapcoord/MARKER.armed`` (its *guard*) says so: the watchdog
removes it when it fires, before it starts anything, and disarm removes it first. A stop script of
the run checks it under the service's lock and stops nothing once it is gone. A stop request that
reaches the guest late (one queued in a hung guest agent that wakes up after the watchdog fired)
would otherwise stop a service after everything was restored, with nothing left to start it.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from snapcoord.errors import GuestError
from snapcoord.guest import NoAnswer, Transport
from snapcoord.hooks import databases
from snapcoord.hooks.guest.services import _LIB

# $0 = marker (visible in ps), $1 = init, $2 = seconds; environment: SERVICES (in start order),
# DATABASE, INIT, TRIGGERS (Services.triggers_text)
_BODY = (
    _LIB
    + r"""
sleep "$2"
rm -f "/run/snapcoord/$0.armed"  # first: no stop of this run begins after this line
for s in $(echo "$SERVICES"); do
  lock "$s" 60  # a stop still in flight finishes first; after 60 s start regardless
  if [ "$s" = "$DATABASE" ]; then db_alive || svc "$s" start 9>&-
  else is_up "$s" || svc "$s" start 9>&-; fi
  exec 9>&-
done
"""
)

# Arms the watchdog and prints its PID once it leads a session of its own. Until `setsid` has run,
# the PID is this shell's forked child: not yet its own process group (which disarm kills), not
# yet free of this session. A watchdog that ended at once (no `setsid` in the guest) is an error,
# not an armed watchdog. Waits at most about 2 s for the `setsid`, then reports the PID anyway.
# Writes the guard first where /run/snapcoord can be written (as root; "guarded" after the PID).
_ARM = r"""
marker=$1; shift
guarded=
if { [ -d /run/snapcoord ] || mkdir -m 0700 /run/snapcoord 2>/dev/null; } &&
   [ -w /run/snapcoord ] && : > "/run/snapcoord/$marker.armed" 2>/dev/null; then
  guarded=" guarded"
fi
SERVICES="$3" DATABASE="$4" INIT="$1" TRIGGERS="$5" setsid sh -c "$BODY" "$marker" "$1" "$2" \
  </dev/null >/dev/null 2>&1 &
pid=$!
n=0
while [ "$n" -lt 200 ]; do
  stat=
  { read -r stat < "/proc/$pid/stat"; } 2>/dev/null
  set -- ${stat##*) }
  case "${1:-Z}" in
    Z|X) rm -f "/run/snapcoord/$marker.armed"
         echo "the watchdog (setsid sh) ended at once" >&2; exit 1;;
  esac
  [ "$4" = "$pid" ] && break
  n=$((n + 1))
  sleep 0.01 2>/dev/null || sleep 1
done
echo "$pid$guarded"
"""

# $1 = pid, $2 = marker, $3 = guarded services, $4 = the database among them, $5 = how long to
# wait for the services' locks, all of them together. Removes the guard first: no stop of the
# run begins after it. Then looks at each service under its lock (a stop still in flight ends
# first; a lock not had in time counts as down). Each lock waits for what is left of the shared
# budget (0: it is only tried), so two stuck stops cannot make the disarm outlast its command's
# timeout. Disarms only when every guarded service runs; prints "down NAME..." (left armed),
# "disarmed" or "gone" (it already fired or was never there).
# `kill -s TERM -- -PGID` works in dash and bash alike.
_DISARM = (
    _LIB
    + r"""
rm -f "/run/snapcoord/$2.armed"
end=; uptime_cs && end=$(( up + $5 * 100 ))
down=
for s in $3; do
  w=$5  # without /proc/uptime: each lock its own wait, as before
  if [ -n "$end" ] && uptime_cs; then
    left=$(( end - up )); [ "$left" -gt 0 ] || left=0
    w=$(( left / 100 )).$(( left / 10 % 10 ))$(( left % 10 ))
  fi
  if ! lock "$s" "$w"; then down="$down $s"
  elif [ "$s" = "$4" ]; then db_alive || down="$down $s"
  else is_up "$s" || down="$down $s"; fi
  exec 9>&-
done
if [ -n "$down" ]; then echo "down$down"; exit 0; fi
if [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' < "/proc/$1/cmdline" | grep -q -- "$2"; then
  kill -s TERM -- "-$1" 2>/dev/null || kill -s TERM "$1"; echo disarmed
else echo gone; fi
"""
)

# $1 = run id. Prints the PIDs of that run's watchdog processes. The marker is put together here
# so that this script's own command line never contains it.
_FIND = r"""
marker="snapcoord-watchdog-$1"
for f in /proc/[0-9]*/cmdline; do
  pid=${f#/proc/}; pid=${pid%/cmdline}
  [ "$pid" = "$$" ] && continue
  case "$(tr '\0' ' ' < "$f" 2>/dev/null)" in *"$marker"*) echo "$pid";; esac
done
exit 0
"""

# $@ = run ids. Kills the watchdogs of those runs (no other run's) with their process groups;
# prints the PIDs. The prefix is put together here so that this script's own command line (and
# sudo's) never contains a marker.
_KILL_RUNS = r"""
prefix="snapcoord-watch"; prefix="${prefix}dog-"
for f in /proc/[0-9]*/cmdline; do
  pid=${f#/proc/}; pid=${pid%/cmdline}
  [ "$pid" = "$$" ] && continue
  cmd=" $(tr '\0' ' ' < "$f" 2>/dev/null) "
  for run in "$@"; do
    case "$cmd" in
      *" $prefix$run "*) kill -s TERM -- "-$pid" 2>/dev/null || kill -s TERM "$pid" 2>/dev/null
                         echo "$pid"; break;;
    esac
  done
done
for run in "$@"; do rm -f "/run/snapcoord/$prefix$run.armed"; done
exit 0
"""

MARKER_PREFIX = "snapcoord-watchdog-"


@dataclass(frozen=True)
class Watchdog:
    pid: int
    marker: str  # snapcoord-watchdog-<run id>: also the process title in the guest
    seconds: int
    services: tuple[str, ...]  # in start order, the database first
    database: str | None = None
    armed_at: float = 0.0  # epoch seconds on this host, just before it was started
    #: its guard file was written: the run's stops check it (not kept in the journal: only the
    #: run that armed it stops services)
    guarded: bool = False

    @property
    def fires_at(self) -> float:
        """Epoch seconds (this host's clock) by which it starts what is down."""
        return self.armed_at + self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "marker": self.marker,
            "seconds": self.seconds,
            "services": list(self.services),
            "database": self.database,
            "armed_at": round(self.armed_at, 3),
        }


@dataclass(frozen=True)
class Disarmed:
    """What a disarm found: ``down`` guarded services (then it stayed armed), else whether it
    was still armed (``False``: it had fired already, or was never there)."""

    was_armed: bool
    down: tuple[str, ...] = ()


def arm(
    transport: Transport,
    *,
    vm: str,
    run_id: str,
    init: str,
    seconds: int,
    services: list[str],
    database: str | None,
    sudo: bool,
    timeout: float,
    triggers: str = "",
) -> Watchdog:
    """Start the watchdog for ``services`` (in start order, database first)."""
    marker = f"{MARKER_PREFIX}{run_id}"
    armed_at = time.time()
    script = f"BODY={shlex.quote(_db_shell(database) + _BODY)}\n{_ARM}"
    argv = [
        "sh",
        "-c",
        script,
        "sh",
        marker,
        init,
        str(seconds),
        " ".join(services),
        database or "",
        triggers,
    ]
    # detached: the watchdog outlives the agent that started it (a restart of qemu-ga)
    result = transport.run(transport.detached(argv), sudo=sudo, timeout=timeout)
    words = result.stdout.decode(errors="replace").split()
    if not result.ok or not words or not words[0].isdigit() or words[1:] not in ([], ["guarded"]):
        raise GuestError(f"cannot arm the guest watchdog: {result.error_text()}", vm=vm)
    guarded = words[1:] == ["guarded"]
    return Watchdog(int(words[0]), marker, seconds, tuple(services), database, armed_at, guarded)


def disarm(
    transport: Transport, watchdog: Watchdog, *, env: str, vm: str, sudo: bool, timeout: float
) -> Disarmed:
    """Stop the watchdog, but only if every service it guards runs. ``env``: the service
    scripts' settings (:meth:`Services.script_env`)."""
    argv = [
        "sh",
        "-c",
        _db_shell(watchdog.database) + env + _DISARM,
        "sh",
        str(watchdog.pid),
        watchdog.marker,
        " ".join(watchdog.services),
        watchdog.database or "",
        str(max(1, int(timeout) - 2)),
    ]
    result = transport.run(argv, sudo=sudo, timeout=timeout)
    if result.timed_out:
        raise NoAnswer(f"disarming the guest watchdog: no answer within {timeout:g} s", vm=vm)
    if not result.ok:
        raise GuestError(f"cannot disarm the guest watchdog: {result.error_text()}", vm=vm)
    words = result.stdout.decode(errors="replace").split()
    if words and words[0] == "down":
        return Disarmed(False, tuple(words[1:]))
    return Disarmed(words == ["disarmed"])


def _db_shell(database: str | None) -> str:
    """``db_alive`` for the database the watchdog guards: its kind follows from the service."""
    return databases.for_service(database).SHELL if database else ""


def running(transport: Transport, run_id: str, *, vm: str, sudo: bool, timeout: float) -> list[int]:
    """PIDs of run ``run_id``'s watchdog processes in the guest (empty: none left)."""
    result = transport.run(["sh", "-c", _FIND, "sh", run_id], sudo=sudo, timeout=timeout)
    if not result.ok:
        raise GuestError(f"cannot look for the guest watchdog: {result.error_text()}", vm=vm)
    return [int(w) for w in result.stdout.decode(errors="replace").split() if w.isdigit()]


def run_id_of(marker: str) -> str:
    return marker.removeprefix(MARKER_PREFIX)


def kill_runs(
    transport: Transport, runs: Collection[str], *, vm: str, sudo: bool, timeout: float
) -> list[int]:
    """Kill the watchdogs of runs ``runs`` in the guest, never another run's (another
    coordinator's live run may have one); returns their PIDs. After a revert to a snapshot with
    RAM, the watchdog of the run that took it is alive again and would start services in the
    middle of a later run."""
    if not runs:
        return []
    result = transport.run(["sh", "-c", _KILL_RUNS, "sh", *runs], sudo=sudo, timeout=timeout)
    if not result.ok:
        raise GuestError(f"cannot look for guest watchdogs: {result.error_text()}", vm=vm)
    return [int(w) for w in result.stdout.decode(errors="replace").split() if w.isdigit()]

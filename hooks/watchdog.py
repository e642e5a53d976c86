"""The guest-side dead-man's switch.

Before the first stop, a detached process (``setsid``, no terminal, all descriptors closed) is
started in the guest: after ``watchdog_seconds`` it starts every service this run is going to
stop, database first, unless the run disarmed it. It does not depend on the SSH connection or on
snapcoord being alive, so a dropped connection or ``kill -9`` of snapcoord still ends with the
services running. It starts services only when they are not running, so firing late is harmless.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from snapcoord.errors import GuestError
from snapcoord.guest import Transport
from snapcoord.hooks.services import _LIB

# $0 = marker (visible in ps), $1 = init, $2 = seconds, $3.. = services in start order
_BODY = (
    _LIB
    + r"""
sleep "$2"
for s in $(echo "$SERVICES"); do
  if [ "$s" = "$DATABASE" ]; then db_alive || svc "$s" start
  else is_up "$s" || svc "$s" start; fi
done
"""
)

# Arms the watchdog and prints its PID.
_ARM = r"""
marker=$1; shift
SERVICES="$3" DATABASE="$4" INIT="$1" setsid sh -c "$BODY" "$marker" "$1" "$2" \
  </dev/null >/dev/null 2>&1 &
echo $!
"""

# $1 = pid, $2 = marker. Prints "disarmed" or "gone" (it already fired or was never there).
_DISARM = r"""
if [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' < "/proc/$1/cmdline" | grep -q -- "$2"; then
  kill -TERM -- "-$1" 2>/dev/null || kill -TERM "$1"; echo disarmed
else echo gone; fi
"""


@dataclass(frozen=True)
class Watchdog:
    pid: int
    marker: str  # snapcoord-watchdog-<run id>: also the process title in the guest
    seconds: int
    services: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "marker": self.marker,
            "seconds": self.seconds,
            "services": list(self.services),
        }


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
) -> Watchdog:
    """Start the watchdog for ``services`` (in start order, database first)."""
    marker = f"snapcoord-watchdog-{run_id}"
    script = f"BODY={shlex.quote(_BODY)}\n{_ARM}"
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
    ]
    result = transport.run(argv, sudo=sudo, timeout=timeout)
    text = result.stdout.decode(errors="replace").strip()
    if not result.ok or not text.isdigit():
        raise GuestError(f"cannot arm the guest watchdog: {result.error_text()}", vm=vm)
    return Watchdog(int(text), marker, seconds, tuple(services))


def disarm(
    transport: Transport, watchdog: Watchdog, *, vm: str, sudo: bool, timeout: float
) -> bool:
    """Stop the watchdog. Returns False when it was already gone (it fired: say so)."""
    argv = ["sh", "-c", _DISARM, "sh", str(watchdog.pid), watchdog.marker]
    result = transport.run(argv, sudo=sudo, timeout=timeout)
    if not result.ok:
        raise GuestError(f"cannot disarm the guest watchdog: {result.error_text()}", vm=vm)
    return result.stdout.decode().strip() == "disarmed"

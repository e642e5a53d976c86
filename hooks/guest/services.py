"""Stop, start and verify guest services (web server, cron, the database).

Every function takes the open transport and does one round trip per service: the stop or start
command *and* its verification run in one small POSIX shell script, so the service window holds
no extra connection setup. "Stopped" and "started" are verified, never assumed: a database is
down when its server process is gone, up when it answers (its kind's ``db_alive``, e.g.
``mysqladmin ping``, ``pg_isready``); other services by their init system's status.
"""

from __future__ import annotations

import functools
import logging
import re
import shlex
import time
from dataclasses import dataclass, field

from snapcoord.errors import GuestError, PreflightError, ServiceNotRestored, SnapcoordError
from snapcoord.guest import GuestUnreachable, NoAnswer, Transport
from snapcoord.hooks import databases
from snapcoord.reconnect import ReconnectBudget, reconnecting
from snapcoord.run import ServiceWindow, run_parallel
from snapcoord.settings import GuestConfig
from snapcoord.shell import Completed

log = logging.getLogger("snapcoord.services")

SYSTEM_SERVICE_WRAPPERS = ("/usr/sbin/service", "/sbin/service", "/usr/bin/service", "/bin/service")

# $1 = init system, $2.. = service names. Prints "init <kind>" then "svc <name> <exists> <running>".
_PROBE = r"""
init=sysv
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then init=systemd; fi
echo "init $init"
for s in "$@"; do
  exists=0; running=0
  if [ "$init" = systemd ]; then
    systemctl cat -- "$s.service" >/dev/null 2>&1 && exists=1
    systemctl is-active --quiet -- "$s" && running=1
    # units that start it on their own (socket activation, paths, timers): active or enabled
    for t in $(systemctl show -p TriggeredBy --value -- "$s.service" 2>/dev/null); do
      e=$(systemctl is-enabled -- "$t" 2>/dev/null)
      { [ "$e" = enabled ] || systemctl is-active --quiet -- "$t"; } && echo "trigger $s $t"
    done
  else
    service "$s" status >/dev/null 2>&1; rc=$?  # LSB: 0 running, 3 stopped, else unknown
    { [ -x "/etc/init.d/$s" ] || [ $rc = 0 ] || [ $rc = 3 ]; } && exists=1
    [ $exists = 1 ] && [ $rc = 0 ] && running=1
  fi
  echo "svc $s $exists $running"
done
echo "wrapper $(command -v service)"
"""


def _probe_script(kinds: list[databases.DatabaseKind]) -> str:
    """The probe, then for each database kind that may be chosen: is its verification tool
    there ("tool NAME"), and where is its PID file ("pidfile KIND PATH")."""
    parts = [_PROBE]
    for kind in kinds:
        parts.append(f'command -v {kind.TOOL} >/dev/null 2>&1 && echo "tool {kind.TOOL}"\n')
        parts.append(f"( {kind.PROBE} ) | sed 's/^pidfile /pidfile {kind.NAME} /'\n")
    return "".join(parts) + "exit 0\n"


# Shared shell functions. $INIT selects systemctl or service. db_pid and db_alive come from the
# database kind (its SHELL, put in front by Services.script_env).
_LIB = r"""
triggers() { printf '%s\n' "$TRIGGERS" | while read -r n u; do [ "$n" = "$1" ] && echo "$u"; done; }
svc() {  # svc NAME start|stop; with systemd its active triggers (sockets...) in one transaction
  if [ "$INIT" != systemd ]; then service "$1" "$2"
  elif [ -z "${TRIGGERS:-}" ]; then systemctl "$2" -- "$1"
  else systemctl "$2" -- $(triggers "$1") "$1"; fi
}
is_up() {  # DIRECT=1: `service` is the system's wrapper, so ask the init script itself (-10 ms)
  if [ "$INIT" = systemd ]; then systemctl is-active --quiet -- "$1"
  elif [ "${DIRECT:-0}" = 1 ] && [ -x "/etc/init.d/$1" ]; then
    "/etc/init.d/$1" status >/dev/null 2>&1
  else service "$1" status >/dev/null 2>&1; fi
}
uptime_cs() { read -r up _ 2>/dev/null < /proc/uptime && up=${up%.*}${up#*.}; }  # sets $up
wait_until() {  # wait_until SECONDS command...: poll every 0.05 s for SECONDS of elapsed time
  n=$(( $1 * 20 )); end=; uptime_cs && end=$(( up + $1 * 100 )); shift
  while ! "$@"; do  # a slow guest's check takes longer than its poll: count time, not polls
    if [ -n "$end" ]; then uptime_cs; [ "$up" -ge "$end" ] && return 1
    else n=$((n - 1)); [ $n -le 0 ] && return 1; fi
    sleep 0.05
  done
}
not() { ! "$@"; }
pid_gone() { [ -z "$1" ] || ! kill -0 "$1" 2>/dev/null; }
db_down() { db_pid; pid_gone "$pid" && not db_alive; }  # what a verified database stop means
lock() {  # lock NAME SECONDS: one stop/start of a service at a time (runs, retries, watchdog)
  command -v flock >/dev/null 2>&1 || return 0  # no util-linux, or no root: no lock
  [ -d /run/snapcoord ] || mkdir -m 0700 /run/snapcoord 2>/dev/null || return 0
  [ -w /run/snapcoord ] || return 0
  exec 9>>"/run/snapcoord/$1.lock"; flock -w "$2" 9
}
"""

# A failed init command is not the verdict: the state is re-read (after a short grace) and decides.
# The service's lock is held to the end of the script, so a start issued after a lost connection
# waits for a stop still running in the guest instead of racing it. A stop's command keeps the
# lock even if its shell dies; a start's command closes it (9>&-) so no daemon inherits it.
#
# A stop checks the run's watchdog guard (GUARD: its marker) under the lock: once the watchdog
# fired or was disarmed, a stop that arrives late (queued in a hung guest agent) stops nothing.
_ACT = r"""
rc=0; w=$2
lock "$1" "$w" || { echo "another stop/start of $1 still runs after $w s" >&2; exit 11; }
if [ "$ACTION" = stop ] && [ -n "${GUARD:-}" ] && [ ! -e "/run/snapcoord/$GUARD.armed" ]; then
  echo "not stopping $1: this run's guest watchdog has fired or was disarmed" >&2; exit 13
fi
echo svc-begin
if [ "$ACTION" = start ]; then svc "$1" start 9>&- >&2 || rc=$?; else svc "$1" stop >&2 || rc=$?; fi
echo svc-end
if [ $rc != 0 ]; then
  echo "'$ACTION' of $1 exited $rc; checking its state" >&2; [ "$w" -gt 5 ] && w=5
fi
"""

_STOP_SERVICE_VERIFY = r"""
wait_until "$w" not is_up "$1" || { echo "$1 still up $w s after stop (exit $rc)" >&2; exit 11; }
"""

_STOP = "ACTION=stop\n" + _ACT + _STOP_SERVICE_VERIFY

_PID_GONE = r"""
wait_until "$w" pid_gone "$pid" || { echo "server process $pid still up after $w s" >&2; exit 11; }
"""
_NOT_ALIVE = r"""
wait_until "$w" not db_alive || { echo "still answers after $w s" >&2; exit 11; }
"""
_STOP_DB_VERIFY = _PID_GONE + _NOT_ALIVE

# its files reach the disk: a snapshot without the guest's memory, or a copy of the disks, sees
# them too (a clean MariaDB shutdown fsyncs InnoDB, not MyISAM or Aria files)
_SYNC = r"""
if command -v sync >/dev/null 2>&1; then sync || echo "sync after the stop failed" >&2; fi
"""

_STOP_DB = "ACTION=stop\ndb_pid\n" + _ACT + _STOP_DB_VERIFY + _SYNC

_START = (
    "ACTION=start\n"  # no is_up check first: an LSB/systemd start of a running service is a no-op
    + _ACT
    + r"""
wait_until "$w" is_up "$1" || { echo "$1 not running $w s after start (exit $rc)" >&2; exit 11; }
"""
)

_START_DB = (
    "ACTION=start\n"
    + _ACT
    + r"""
wait_until "$w" db_alive || { echo "no answer $w s after start" >&2; exit 11; }
"""
)

# still_down NAME &: prints "up NAME" if NAME runs (again). Run side by side, one per service:
# the slowest status check, not their sum, is waited for; each line is one short write, so the
# lines of parallel checks never mix.
_STILL_DOWN = r"""
still_down() {
  if [ "$1" = "$DATABASE" ]; then db_down || echo "up $1"; else is_up "$1" && echo "up $1"; fi
}
"""

# $@ = services this run stopped. Prints "up NAME" for each that runs again.
_STILL_STOPPED = (
    _STILL_DOWN
    + r"""
for s in "$@"; do still_down "$s" & done
wait
exit 0
"""
)

# The still-stopped check folded into the last stop's script: $1 = the service this script stops,
# $2 = its wait, $3.. = every service this run stopped. The others are checked from the moment
# the last stop command returned, side by side with $1's verification (and the database's sync);
# $1 itself once it is verified down. An exit on the way waits for the checks (no output after
# the script's end). "checked": the check ran to its end (else it is repeated on its own).
_CHECK_OTHERS = (
    _STILL_DOWN
    + r"""
trap wait EXIT
i=0
for s in "$@"; do
  i=$((i + 1)); if [ $i -gt 2 ] && [ "$s" != "$1" ]; then still_down "$s" & fi
done
"""
)

_CHECK_SELF = r"""
still_down "$1" &
wait
echo checked
exit 0
"""

# the same sync, once the server process is gone, alongside the checks and the ping
_SYNC_ALONGSIDE = r"""
if command -v sync >/dev/null 2>&1; then { sync || echo "sync after the stop failed" >&2; } & fi
"""

_STOP_CHECKED = "ACTION=stop\n" + _ACT + _CHECK_OTHERS + _STOP_SERVICE_VERIFY + _CHECK_SELF

_STOP_DB_CHECKED = (
    "ACTION=stop\ndb_pid\n"
    + _ACT
    + _CHECK_OTHERS
    + _PID_GONE
    + _SYNC_ALONGSIDE
    + _NOT_ALIVE
    + _CHECK_SELF
)

# $3 = check_url (http:// or https://, the schema checks it); `--` ends the options regardless.
_CHECK_URL = r"""
if command -v curl >/dev/null 2>&1; then curl -fsS -o /dev/null --max-time 10 -- "$3" || exit 12
elif command -v wget >/dev/null 2>&1; then wget -q -O /dev/null -T 10 -- "$3" || exit 12
else echo "neither curl nor wget in the guest for check_url" >&2; exit 12; fi
"""


@dataclass
class GuestServices:
    """What preflight learned about the guest's services."""

    init: str  # "systemd" or "sysv"
    database: str | None  # the database service actually used, None when 'none'
    services: list[str]  # configured non-database services that exist
    running: dict[str, bool] = field(default_factory=dict)  # state before the run
    stopped: list[str] = field(default_factory=list)  # what this run stopped (undo uses it)
    pidfile: str | None = None  # the database's PID file, found in preflight
    direct_status: bool = False  # `service` is the system's: init scripts may be asked directly
    #: service -> active systemd units that would start it again (mariadb -> mariadb.socket):
    #: stopped and started together with it
    triggers: dict[str, list[str]] = field(default_factory=dict)

    def to_stop(self) -> list[str]:
        """Only services that were running: never touch what the admin had stopped."""
        return [s for s in self.services if self.running.get(s)]

    @property
    def kind(self) -> str | None:
        """The name of the database's kind (hooks/databases), None without a database."""
        return databases.for_service(self.database).NAME if self.database else None

    @property
    def database_running(self) -> bool:
        return self.database is not None and self.running.get(self.database, False)


class Services:
    """Service control for one guest: probe in preflight, then stop/start with verification."""

    def __init__(self, transport: Transport, guest: GuestConfig, *, vm: str) -> None:
        self.transport = transport
        self.guest = guest
        self.vm = vm
        self.sudo = guest.sudo
        self.state: GuestServices | None = None
        #: "NAME stop|start" -> seconds the init system's own command took (from the guest clock)
        self.timings: dict[str, float] = {}
        #: How long a start keeps reconnecting after a lost connection (the bracket narrows it
        #: to end before its watchdog fires).
        self.budget = ReconnectBudget(guest.start_timeout)
        #: The still-stopped check the last stop's script ran (``check=True``): the services it
        #: looked at and those it found running again. Taken by :meth:`confirm_still_stopped`.
        self._checked: tuple[list[str], list[str]] | None = None
        #: The marker of this run's armed watchdog when its guard file was written: the stop
        #: scripts stop nothing once it is gone (see hooks/guest/watchdog.py).
        self.guard: str | None = None

    # -- preflight -------------------------------------------------------------------------
    def probe(self, *, warm: bool = True) -> GuestServices:
        """Learn the init system, which services exist and run; ``warm`` shells for the window."""
        configured = list(self.guest.services)
        database = self.guest.database
        candidates = databases.auto_candidates() if database == "auto" else []
        if database not in ("auto", "none"):
            candidates = [database]
        kinds = list({k.NAME: k for k in map(databases.for_service, candidates)}.values())
        result = self.transport.run(
            ["sh", "-c", _probe_script(kinds), "sh", *configured, *candidates],
            sudo=self.sudo,
            timeout=self.guest.command_timeout,
        )
        if not result.ok:
            raise self._preflight_failure("probing services", result.error_text())
        text = result.stdout.decode(errors="replace")
        init, exists, running, tools = _parse_probe(text)
        missing = [s for s in configured if not exists.get(s)]
        if missing:
            raise PreflightError(
                f"service(s) {', '.join(missing)} not found in the guest ({init})",
                vm=self.vm,
                hint="fix [vms.*.guest] services",
            )
        chosen: str | None
        if database == "none":
            chosen = None
        elif database == "auto":
            chosen = next((d for d in candidates if exists.get(d)), None)
            if chosen is None:
                raise PreflightError(
                    f"no database service found in the guest (looked for {', '.join(candidates)})",
                    vm=self.vm,
                    hint="set database = 'none' for a guest without a database",
                )
        else:
            if not exists.get(database):
                raise PreflightError(f"database service {database!r} not found", vm=self.vm)
            chosen = database
        kind = databases.for_service(chosen) if chosen is not None else None
        if kind is not None and kind.TOOL not in tools:
            raise PreflightError(
                f"{kind.TOOL} not found in the guest (needed to verify the database)", vm=self.vm
            )
        self.state = GuestServices(
            init=init,
            database=chosen,
            services=configured,
            running={
                s: running.get(s, False) for s in [*configured, *([chosen] if chosen else [])]
            },
            pidfile=_probe_pidfile(text, kind.NAME) if kind else None,
            direct_status=_probe_value(text, "wrapper") in SYSTEM_SERVICE_WRAPPERS,
            triggers={s: t for s, t in _probe_triggers(text).items() if s in running},
        )
        # Parallel stops each need a shell of their own; warm them now, outside the window.
        if warm:
            self.transport.warm(max(1, len(self.state.to_stop())), sudo=self.sudo)
        return self.state

    def _preflight_failure(self, what: str, text: str) -> GuestError:
        if self.sudo and ("password is required" in text or "sudo:" in text):
            return GuestError(
                f"sudo -n refused to run 'sh' ({what} and every service command need it): {text}",
                vm=self.vm,
                hint="give the SSH user passwordless sudo (NOPASSWD) for /bin/sh, or use root",
            )
        return GuestError(f"{what} failed: {text}", vm=self.vm)

    # -- the window ------------------------------------------------------------------------
    def stop(
        self, names: list[str], window: ServiceWindow, *, parallel: bool = True, check: bool = False
    ) -> None:
        """Stop ``names`` (non-database services), in parallel when allowed. ``check``: this is
        the last stop before the snapshot, so the still-stopped check runs at the end of the last
        stop's script (:meth:`confirm_still_stopped` takes its result) where one script is the
        last: one service, or one after the other."""
        self._checked = None
        fold = check and bool(names) and (len(names) == 1 or not parallel)
        actions = [
            functools.partial(self._stop_one, n, window, check=fold and i == len(names) - 1)
            for i, n in enumerate(names)
        ]
        if parallel:
            run_parallel(actions)
        else:
            for action in actions:
                action()

    def start(self, names: list[str], window: ServiceWindow, *, parallel: bool = True) -> None:
        """Start ``names`` (idempotent: starting a running service is a no-op); report every
        failure."""
        self._checked = None
        failures: list[str] = []

        def one(name: str) -> None:
            try:
                self._start_one(name, window)
            except ServiceNotRestored as exc:
                failures.append(exc.message)

        actions = [functools.partial(one, n) for n in reversed(names)]
        if parallel:
            run_parallel(actions)
        else:
            for action in actions:
                action()
        if failures:
            raise ServiceNotRestored("; ".join(sorted(failures)), vm=self.vm)

    def stop_database(self, window: ServiceWindow, *, check: bool = False) -> None:
        """Stop and verify the database; ``check`` as for :meth:`stop`."""
        assert self.state is not None and self.state.database is not None
        self._checked = None
        self._stop_one(self.state.database, window, database=True, check=check)

    def start_database(self, window: ServiceWindow) -> None:
        assert self.state is not None and self.state.database is not None
        self._checked = None
        self._start_one(self.state.database, window, database=True)

    def _stop_one(
        self, name: str, window: ServiceWindow, *, database: bool = False, check: bool = False
    ) -> None:
        """Stop and verify ``name``. ``check``: then, in the same script, check that everything
        this run stopped is still down (no round trip and no shell of its own for it)."""
        assert self.state is not None
        self.state.stopped.append(name)  # before issuing: a half-done stop is undone too
        window.stop_issued(name)
        if check:  # script_env() adds the db functions
            script = _LIB + (_STOP_DB_CHECKED if database else _STOP_CHECKED)
        else:
            script = _LIB + (_STOP_DB if database else _STOP)
        checked = list(self.state.stopped) if check else []
        timeout = self.guest.stop_timeout
        try:
            result = self._script(script, name, "stop", timeout, extra=checked)
        except GuestUnreachable as exc:
            raise type(exc)(f"stopping {name}: {exc.message}", vm=self.vm) from exc
        if not result.ok:
            raise GuestError(f"stopping {name} failed: {result.error_text()}", vm=self.vm)
        lines = result.stdout.decode(errors="replace").splitlines()
        if check and "checked" in lines:
            self._checked = (checked, _up_lines(lines))

    def _start_one(self, name: str, window: ServiceWindow, *, database: bool = False) -> None:
        """Start and verify; a lost connection is reconnected and the start repeated."""
        assert self.state is not None
        script = _LIB + (_START_DB if database else _START)
        check_url = self.guest.check_url if name in ("apache2", "httpd", "nginx") else None
        if check_url:
            script += _CHECK_URL
        timeout = self.guest.start_timeout
        extra = [check_url] if check_url else []

        def attempt() -> Completed:
            return self._script(script, name, "start", timeout, extra=extra)

        try:
            result = reconnecting(
                self.transport, attempt, what=f"{self.vm}: starting {name}", budget=self.budget
            )
        except GuestError as exc:  # transient ones only after the budget is spent
            raise ServiceNotRestored(f"starting {name}: {exc.message}", vm=self.vm) from exc
        if not result.ok:
            raise ServiceNotRestored(
                f"{name} could not be started: {result.error_text()}", vm=self.vm
            )
        if name in self.state.stopped:
            self.state.stopped.remove(name)
        window.confirmed_running(name)

    def _script(
        self,
        body: str,
        name: str,
        action: str,
        timeout: float,
        extra: list[str] | None = None,
    ) -> Completed:
        wait = str(max(1, int(timeout) - 2))
        argv = ["sh", "-c", self.script_env() + body, "sh", name, wait]
        clock = _LineClock(time.monotonic())
        # shield: an interrupt waits for the stop/start in flight; its undo must not race it
        result = self.transport.run(
            argv + (extra or []), sudo=self.sudo, timeout=timeout, shield=True, on_line=clock
        )
        if result.timed_out:
            raise NoAnswer(f"no answer within {timeout:g} s", vm=self.vm)
        if clock.seconds is not None:
            self.timings[f"{name} {action}"] = clock.seconds
            log.debug("%s %s: init command %.3f s; verified, round trip %.3f s "
                      "(%.1f ms before the command, %.1f ms after it)",
                      name, action, clock.seconds, result.seconds, *clock.around(),
                      )  # fmt: skip
        return result

    def script_env(self) -> str:
        """Shell lines that set what :data:`_LIB` reads (init system, PID file, ...) and define
        the database kind's functions."""
        pidfile = self.state.pidfile if self.state else None
        direct = int(bool(self.state and self.state.direct_status))
        database = self.state.database if self.state else None
        return (
            f"INIT={shlex.quote(self._init)}\nDIRECT={direct}\n"
            f"PIDFILE={shlex.quote(pidfile or '')}\nDATABASE={shlex.quote(database or '')}\n"
            f"TRIGGERS={shlex.quote(self.triggers_text())}\nGUARD={shlex.quote(self.guard or '')}\n"
            + self.db_shell()
        )

    def db_shell(self) -> str:
        """The database kind's shell functions (db_pid, db_alive) for the guest scripts."""
        kind = self.state.kind if self.state else None
        return databases.get(kind).SHELL if kind else ""

    def triggers_text(self) -> str:
        """The ``TRIGGERS`` the guest scripts read: one ``NAME UNIT...`` line per service."""
        triggers = self.state.triggers if self.state else {}
        return "\n".join(f"{name} {' '.join(units)}" for name, units in triggers.items() if units)

    def confirm_still_stopped(self) -> None:
        """:meth:`still_stopped` right after the last stop: when that stop's script ran the check
        (``check=True``) on exactly what this run stopped, its answer decides, with no round trip
        of its own; otherwise the check runs now. Fails as :meth:`still_stopped` does."""
        checked, self._checked = self._checked, None
        stopped = list(self.state.stopped) if self.state else []
        if checked is None or checked[0] != stopped:
            self.still_stopped()
            return
        log.debug("still stopped, checked at the end of the last stop: %s", " ".join(stopped))
        self._fail_if_up(checked[1])

    def still_stopped(
        self,
        consequence: str = "the snapshot would not be consistent, so none was taken",
        error: type[SnapcoordError] = GuestError,
    ) -> None:
        """Right before the hypervisor call: everything this run stopped is still down. A service
        that came back (a socket, a timer, another run's watchdog) makes the snapshot
        inconsistent, so the run fails instead of reporting ok. One round trip of its own."""
        self._checked = None
        stopped = list(self.state.stopped) if self.state else []
        if not stopped:
            return
        result = self.transport.run(
            ["sh", "-c", self.script_env() + _LIB + _STILL_STOPPED, "sh", *stopped],
            sudo=self.sudo,
            timeout=self.guest.command_timeout,
        )
        if result.timed_out:
            raise NoAnswer("checking that the services are still stopped: no answer", vm=self.vm)
        if not result.ok:
            raise GuestError(
                f"checking that the services are still stopped failed: {result.error_text()}",
                vm=self.vm,
            )
        self._fail_if_up(_up_lines(result.stdout.decode().splitlines()), consequence, error)

    def _fail_if_up(
        self,
        up: list[str],
        consequence: str = "the snapshot would not be consistent, so none was taken",
        error: type[SnapcoordError] = GuestError,
    ) -> None:
        if up:
            up = sorted(up, key=self._stop_order)  # parallel checks answer in any order
            raise error(
                f"{', '.join(up)} {'runs' if len(up) == 1 else 'run'} again although this run "
                f"stopped it; {consequence}",
                vm=self.vm,
                hint="look for what starts it (a socket or timer unit, a cron job, another "
                "run's watchdog)",
            )

    def _stop_order(self, name: str) -> int:
        stopped = self.state.stopped if self.state else []
        return stopped.index(name) if name in stopped else len(stopped)

    @property
    def _init(self) -> str:
        return self.state.init if self.state else "sysv"

    def describe(self, action: str, name: str) -> str:
        """One line for --dry-run."""
        verb = "systemctl" if self._init == "systemd" else "service"
        return f"{self.transport.description}: {verb} {name} {action} (verified)"


def _up_lines(lines: list[str]) -> list[str]:
    """The services a still-stopped check found running ("up NAME" lines)."""
    return [line.split()[1] for line in lines if line.startswith("up ") and len(line.split()) == 2]


def _parse_probe(
    text: str,
) -> tuple[str, dict[str, bool], dict[str, bool], set[str]]:
    init = "sysv"
    exists: dict[str, bool] = {}
    running: dict[str, bool] = {}
    tools: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "init":
            init = parts[1]
        elif len(parts) == 4 and parts[0] == "svc":
            exists[parts[1]] = parts[2] == "1"
            running[parts[1]] = parts[3] == "1"
        elif len(parts) == 2 and parts[0] == "tool":
            tools.add(parts[1])
    return init, exists, running, tools


def _probe_value(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value:
            return value
    return None


_UNIT_NAME = re.compile(r"[A-Za-z0-9@._:\\-]+\Z")


def _probe_triggers(text: str) -> dict[str, list[str]]:
    triggers: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "trigger" and _UNIT_NAME.match(parts[2]):
            triggers.setdefault(parts[1], []).append(parts[2])
    return triggers


def _probe_pidfile(text: str, kind: str) -> str | None:
    value = _probe_value(text, "pidfile")
    _, _, path = (value or "").partition(f"{kind} ")
    return path if value and value.startswith(f"{kind} /") else None


class _LineClock:
    """Times the init command from when its ``svc-begin`` / ``svc-end`` lines arrive: no clock
    process in the guest (a fork costs milliseconds), and the transport's delay cancels out."""

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.begin: float | None = None
        self.end: float | None = None
        self.seconds: float | None = None

    def __call__(self, line: bytes) -> None:
        if line == b"svc-begin":
            self.begin = time.monotonic()
        elif line == b"svc-end" and self.begin is not None:
            self.end = time.monotonic()
            self.seconds = self.end - self.begin

    def around(self) -> tuple[float, float]:
        """Milliseconds from sending the script to ``svc-begin`` (start-up, lock) and from
        ``svc-end`` to now (verification, the answer's way back)."""
        assert self.begin is not None and self.end is not None
        return (self.begin - self.sent) * 1000, (time.monotonic() - self.end) * 1000

"""The guest-side freeze hook: a small POSIX sh script, generated from a VM's configuration, that
the guest's own freeze machinery runs right before it freezes the file systems and right after
it thaws them (docs/fsfreeze-hook.md).

Why it exists: Proxmox's vzdump takes a QEMU VM's point in time inside its archive step, after
the ``pre-restart`` and ``post-restart`` hook phases; only the guest agent's fs-freeze is close
to it (qemu-server ``src/PVE/VZDump/QemuServer.pm``, e6352be). qemu-ga runs
``/etc/qemu/fsfreeze-hook`` with ``freeze`` before the freeze and ``thaw`` after the thaw and
waits for it without a timeout; VMware Tools runs ``/etc/vmware-tools/backupScripts.d/*`` with
``freeze``, ``thaw`` and ``freezeFail``. The same script answers all of them:

* ``freeze``: ``stop`` consistency stops the configured services, then the database, each
  verified (socket and other triggering units with it); ``pause`` starts a detached database
  session that holds commits (BACKUP STAGE or FTWRL) and returns once the lock is held. It arms a
  detached watchdog that restores everything after ``DEADLINE`` seconds if no thaw comes. The
  whole freeze is bounded by ``FREEZE_LIMIT``: past it, or on any failure, it restores what it
  did and exits 1 (VMware Tools then aborts the quiesce; qemu-ga would fail the freeze, but
  Debian's stock ``/etc/qemu/fsfreeze-hook`` dispatcher ignores its scripts' status, so the
  coordinator reads the failure from the log at ``backup-end``).
* ``thaw`` / ``freezeFail``: disarm the watchdog, check that what was stopped stayed stopped (or
  that the lock was still held), restore, verify; exit 0 only when everything runs.
* ``arm TOKEN``, ``log``, ``status``, ``version``: for the coordinator.

Every event goes to ``/run/snapcoord-fsfreeze/log`` (tmpfs: qemu-ga freezes only block-device
file systems, so writing there never blocks while frozen); after a thaw the cycle is also
appended to ``/var/log/snapcoord-fsfreeze.log``. Both are root-only. Background processes are
started outside the agent's control group where systemd runs (``systemd-run``), so a restart of
qemu-guest-agent does not kill them.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass

from snapcoord.hooks.guest.services import _LIB

#: Where each caller looks for the hook.
QEMU_DIR = "/etc/qemu/fsfreeze-hook.d"
QEMU_DISPATCHER = "/etc/qemu/fsfreeze-hook"
QEMU_CONF = "/etc/qemu/qemu-ga.conf"
VMWARE_DIR = "/etc/vmware-tools/backupScripts.d"
SCRIPT_NAME = "snapcoord"
RUN_DIR = "/run/snapcoord-fsfreeze"
LOG = f"{RUN_DIR}/log"
PERSISTENT_LOG = "/var/log/snapcoord-fsfreeze.log"
VERSION_TAG = "# snapcoord-fsfreeze-hook version="


@dataclass(frozen=True)
class HookSpec:
    """Everything the script is generated from (the VM's configuration and the guest's probe)."""

    vm: str
    consistency: str  # "stop" or "pause"
    services: tuple[str, ...]  # configured non-database services, in stop order
    database: str  # the database service ('' for none)
    database_shell: str  # the kind's db_pid/db_alive functions
    pidfile: str
    deadline: int  # seconds the guest stays quiesced at most when no thaw comes
    step_seconds: int  # a stop or start of one service, at most
    hold_sql: tuple[str, ...] = ()  # pause: the statements that hold commits
    lock_wait: int = 10  # pause: lock_wait_timeout of the holding session

    @property
    def freeze_limit(self) -> int:
        """The longest the hook's freeze may keep the agent waiting."""
        count = len(self.services) + (1 if self.database else 0)
        return max(5, min(self.deadline, self.step_seconds * max(1, count) + 5))


# The body. Variables come from the header the renderer writes; _LIB and the database kind's
# functions (db_pid, db_alive) come before it.
_BODY = r"""
LOG=$DIR/log; STATE=$DIR/state; WATCHDOG_UNIT=snapcoord-fsfreeze-watchdog
LOCK_UNIT=snapcoord-fsfreeze-lock; INIT=sysv; TRIGGERS=
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then INIT=systemd; fi
[ -d "$DIR" ] || mkdir -m 0700 "$DIR" || exit 70
say() { printf '%s %s\n' "$(date +%s.%N)" "$*" >> "$LOG"; }
find_triggers() {  # the units that start a service on their own (sockets, paths, timers)
  TRIGGERS=
  [ "$INIT" = systemd ] || return 0
  for s in $SERVICES $DATABASE; do
    for t in $(systemctl show -p TriggeredBy --value -- "$s.service" 2>/dev/null); do
      e=$(systemctl is-enabled -- "$t" 2>/dev/null)
      if [ "$e" = enabled ] || systemctl is-active --quiet -- "$t"; then
        TRIGGERS="$TRIGGERS
$s $t"
      fi
    done
  done
}
detach() {  # detach NAME COMMAND...: outside the agent's cgroup, no inherited descriptors
  if [ "$INIT" = systemd ] && command -v systemd-run >/dev/null 2>&1; then
    systemctl stop -- "$1" >/dev/null 2>&1; systemctl reset-failed -- "$1" >/dev/null 2>&1
    n=$1; shift
    systemd-run --quiet --collect --unit="$n" -- "$@" </dev/null >/dev/null 2>&1 8>&-
  else
    n=$1; shift
    setsid "$@" </dev/null >/dev/null 2>&1 8>&- &
    echo $! > "$DIR/$n.pid"
  fi
}
undetach() {  # undetach NAME: stop what detach started
  if [ "$INIT" = systemd ] && command -v systemd-run >/dev/null 2>&1; then
    systemctl stop -- "$1" >/dev/null 2>&1; systemctl reset-failed -- "$1" >/dev/null 2>&1
  elif [ -r "$DIR/$1.pid" ]; then
    read -r p < "$DIR/$1.pid"; kill -s KILL -- "-$p" 2>/dev/null; rm -f "$DIR/$1.pid"
  fi
  return 0
}
running() {  # running NAME: is what detach started still there
  if [ "$INIT" = systemd ] && command -v systemd-run >/dev/null 2>&1; then
    systemctl is-active --quiet -- "$1"
  else
    [ -r "$DIR/$1.pid" ] && read -r p < "$DIR/$1.pid" && kill -0 "$p" 2>/dev/null
  fi
}
stop_service() {  # stop_service NAME: stop it (with its triggers) and verify
  echo "svc $1" >> "$STATE"
  timeout -s KILL "$STEP" "$SELF" _svc "$1" stop "$TRIGGERS" >/dev/null 2>&1 8>&-
  wait_until "$STEP" not is_up "$1" || { say stop-failed "$1 still runs"; return 1; }
  say stopped "$1"
}
stop_database() {
  db_pid; p=$pid
  echo "db $DATABASE" >> "$STATE"
  timeout -s KILL "$STEP" "$SELF" _svc "$DATABASE" stop "$TRIGGERS" >/dev/null 2>&1 8>&-
  wait_until "$STEP" pid_gone "$p" ||
    { say stop-failed "$DATABASE process $p still there"; return 1; }
  wait_until "$STEP" not db_alive || { say stop-failed "$DATABASE still answers"; return 1; }
  say stopped "$DATABASE"
}
start_service() {
  timeout -s KILL "$STEP" "$SELF" _svc "$1" start "$TRIGGERS" >/dev/null 2>&1 8>&-
}
hold() {  # pause: a detached session that holds commits until released (or DEADLINE)
  rm -f "$DIR/lock.out"
  echo "lock" >> "$STATE"
  detach "$LOCK_UNIT" env HOME="${HOME:-/root}" sh -c '{ printf "%s\n" "$1"; sleep "$2"; } |
    { timeout -s KILL "$2" mysql --batch --skip-column-names --skip-reconnect --unbuffered;
      echo snapcoord-ended; } > "$3/lock.out" 2>&1' \
    snapcoord-fsfreeze-lock "$HOLD_SQL" "$DEADLINE" "$DIR"
  wait_until "$STEP" grep -q '^snapcoord-\(held\|ended\)$' "$DIR/lock.out"
  lock_held || { say hold-failed "$(tr '\n' ' ' < "$DIR/lock.out" 2>/dev/null)"; return 1; }
  say held commits
}
lock_held() {
  grep -q '^snapcoord-held$' "$DIR/lock.out" 2>/dev/null &&
    ! grep -q '^snapcoord-ended$' "$DIR/lock.out"
}
restore() {  # start what STATE lists (database first), release a lock; verify; clear STATE
  ok=0
  [ -f "$STATE" ] || return 0
  if grep -q '^lock$' "$STATE"; then
    if lock_held; then
      say released "held=yes"
    else
      say released "held=no"; ok=1
    fi
    undetach "$LOCK_UNIT"
  fi
  db=$(sed -n 's/^db //p' "$STATE")
  if [ -n "$db" ]; then
    start_service "$db"
    if wait_until "$STEP" db_alive; then say started "$db"; else say start-failed "$db"; ok=1; fi
  fi
  for s in $(sed -n 's/^svc //p' "$STATE" | sed '1!G;h;$!d'); do
    start_service "$s"
    if wait_until "$STEP" is_up "$s"; then say started "$s"; else say start-failed "$s"; ok=1; fi
  done
  rm -f "$STATE"
  return $ok
}
came_back() {  # what freeze stopped and runs again (something started it behind the freeze)
  back=
  for s in $(sed -n 's/^svc //p' "$STATE"); do is_up "$s" && back="$back $s"; done
  db=$(sed -n 's/^db //p' "$STATE")
  if [ -n "$db" ] && ! db_down; then back="$back $db"; fi
  [ -z "$back" ] || say came-back "$back"
}
persist() {  # the cycle, to the persistent log (the file systems are thawed by now)
  ( umask 077; sed -n "/ freeze-begin /,\$p" "$LOG" | tail -n 200 >> "$PERSISTENT_LOG" ) 2>/dev/null
  return 0
}
exclusive() {  # one freeze, thaw or deadline at a time
  exec 8>>"$DIR/lock"; command -v flock >/dev/null 2>&1 || return 0; flock -w "$1" 8
}

do_freeze() {
  exclusive "$STEP" ||
    { say freeze-failed "another freeze or thaw of this hook still runs"; exit 1; }
  if [ -f "$STATE" ]; then
    say stale "an earlier freeze was never thawed: restoring it first"; restore
  fi
  : > "$STATE"
  find_triggers
  say freeze-begin "vm=$VM consistency=$CONSISTENCY deadline=$DEADLINE version=$VERSION"
  undetach "$WATCHDOG_UNIT"
  detach "$WATCHDOG_UNIT" sh -c 'sleep "$1"; exec "$2" deadline' sh "$DEADLINE" "$SELF"
  echo "watchdog" >> "$STATE"
  start=$(date +%s)
  timeout -s KILL "$FREEZE_LIMIT" "$SELF" _quiesce "$TRIGGERS" 8>&-; rc=$?
  if [ $rc = 0 ]; then say freeze-ok "after $(( $(date +%s) - start )) s"; exit 0; fi
  [ $rc = 137 ] && say freeze-failed "not quiesced within $FREEZE_LIMIT s" ||
    say freeze-failed "could not quiesce (exit $rc)"
  undetach "$WATCHDOG_UNIT"
  restore && say restored || say restore-failed
  exit 1
}
do_quiesce() {  # under the freeze limit, in a child: the stops or the hold
  TRIGGERS=$1
  if [ "$CONSISTENCY" = pause ]; then hold || exit 1; exit 0; fi
  for s in $SERVICES; do
    is_up "$s" || continue
    stop_service "$s" || exit 1
  done
  if [ -n "$DATABASE" ]; then
    if db_down; then say not-running "$DATABASE"; else stop_database || exit 1; fi
  fi
  exit 0
}
do_thaw() {
  exclusive 600 || { say thaw-failed "the hook's lock is held"; exit 1; }
  if [ ! -f "$STATE" ]; then say thaw-nothing "$1"; exit 0; fi
  say thaw-begin "$1"
  undetach "$WATCHDOG_UNIT"
  find_triggers
  came_back
  if restore; then say thaw-ok "$1"; rc=0
  else say thaw-failed "not everything runs again"; rc=1; fi
  persist
  exit $rc
}
do_deadline() {
  exclusive 600 || exit 1
  [ -f "$STATE" ] || exit 0
  say deadline "no thaw within $DEADLINE s: restoring"
  find_triggers
  restore && say restored || say restore-failed
  exit 0
}

case ${1:-} in
  freeze) do_freeze ;;
  _quiesce) do_quiesce "${2:-}" ;;
  _svc) TRIGGERS=${4:-}; svc "$2" "$3" ;;
  thaw|freezeFail) do_thaw "$1" ;;
  deadline) do_deadline ;;
  recover) do_thaw recover ;;
  arm) case ${2:-} in -*|*[!A-Za-z0-9-]*|'') exit 64 ;; esac
       if [ -f "$LOG" ] && [ "$(wc -c < "$LOG")" -gt 1000000 ]; then
         tail -n 2000 "$LOG" > "$LOG.new"; mv "$LOG.new" "$LOG"
       fi
       say arm "$2"; exit 0 ;;
  log) [ -f "$LOG" ] && cat "$LOG"; exit 0 ;;
  status) echo "version $VERSION"; [ -f "$STATE" ] && echo "quiesced"; exit 0 ;;
  version) echo "$VERSION"; exit 0 ;;
  *) echo "usage: $0 freeze|thaw|freezeFail|arm TOKEN|log|status|version" >&2; exit 64 ;;
esac
"""


def render(spec: HookSpec) -> str:
    """The script for ``spec``; its version line is the sha256 of everything else."""
    hold = ""
    if spec.consistency == "pause":
        statements = [f"SET SESSION lock_wait_timeout = {spec.lock_wait}", *spec.hold_sql]
        hold = "; ".join(statements) + "; SELECT 'snapcoord-held';"
    header = (
        f"VM={shlex.quote(spec.vm)}\n"
        f"CONSISTENCY={shlex.quote(spec.consistency)}\n"
        f"SERVICES={shlex.quote(' '.join(spec.services))}\n"
        f"DATABASE={shlex.quote(spec.database)}\n"
        f"PIDFILE={shlex.quote(spec.pidfile)}\n"
        f"DEADLINE={int(spec.deadline)}\nSTEP={int(spec.step_seconds)}\n"
        f"FREEZE_LIMIT={spec.freeze_limit}\n"
        f"HOLD_SQL={shlex.quote(hold)}\n"
        f"DIR={RUN_DIR}\nPERSISTENT_LOG={PERSISTENT_LOG}\n"
    )
    content = (
        "set -u\numask 077\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        'export PATH\nSELF=$(readlink -f -- "$0")\nDIRECT=0\n'
        + header
        + _LIB
        + spec.database_shell
        + _BODY
    )
    version = hashlib.sha256(content.encode()).hexdigest()[:16]
    return (
        "#!/bin/sh\n"
        f"# snapcoord's freeze hook for VM {spec.vm}: generated by 'snapcoord freeze-hook install'"
        ", do not edit (docs/fsfreeze-hook.md)\n"
        f"{VERSION_TAG}{version}\n"
        f"VERSION={version}\n" + content
    )


def version_of(script: str) -> str | None:
    for line in script.splitlines()[:5]:
        if line.startswith(VERSION_TAG):
            return line[len(VERSION_TAG) :].strip()
    return None

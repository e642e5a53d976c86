"""The coordinator's side of the guest-side freeze hook (hooks/guest/fsfreeze.py):
``snapcoord freeze-hook install|status|uninstall``, and what ``vzdump-hook`` does with it for
QEMU VMs in snapshot mode — check it before the backup (``pre-stop``), mark where this backup's
events begin in the hook's log (``arm``), and at ``backup-end`` read the log and decide whether
the services were stopped (or commits held) across the guest agent's freeze.

Everything read back from the guest (the status lines, the log) is parsed here, into
:class:`HookStatus` and :class:`LogEvent` records; the rest of the code never sees the text.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapcoord.errors import ExitCode, GuestError, PreflightError, SnapcoordError
from snapcoord.freeze_state import VMID_MAX
from snapcoord.hooks import databases
from snapcoord.hooks.databases.mysql import PAUSE_METHODS
from snapcoord.hooks.databases.mysql_pause import _supports_backup_stage, lock_wait
from snapcoord.hooks.guest import fsfreeze
from snapcoord.plans.context import RunContext
from snapcoord.store import ensure_private, read_file, write_json_atomic
from snapcoord.values import MAX_EPOCH, integer, number

#: Who calls the hook, by hypervisor type.
CALLERS = {"libvirt": "qemu", "proxmox": "qemu", "vsphere": "vmware"}


class NotApplicationConsistent(SnapcoordError):
    """The backup's point in time was not bracketed by the hook (exit 5: vzdump marks the
    backup failed)."""

    exit_code = ExitCode.SNAPSHOT_FAILED


def caller(ctx: RunContext) -> str:
    return CALLERS.get(ctx.config.hypervisors[ctx.vm_cfg.hypervisor].type, "qemu")


def hook_path(kind: str) -> str:
    directory = fsfreeze.VMWARE_DIR if kind == "vmware" else fsfreeze.QEMU_DIR
    return f"{directory}/{fsfreeze.SCRIPT_NAME}"


# -- generating the script ------------------------------------------------------------------


def spec_for(ctx: RunContext) -> fsfreeze.HookSpec:
    """The hook's parameters from the VM's configuration and the probe (run first)."""
    assert ctx.services is not None and ctx.services.state is not None
    guest, state = ctx.guest, ctx.services.state
    kind = databases.get(state.kind) if state.kind else None
    hold: tuple[str, ...] = ()
    if guest.consistency == "pause":
        if kind is None or kind.NAME != "mysql":
            raise PreflightError(
                "the freeze hook holds commits only on MySQL/MariaDB",
                vm=ctx.key,
                hint="use consistency = 'stop' for this VM",
            )
        if ctx.vm_cfg.dump.password is not None or ctx.vm_cfg.dump.user is not None:
            raise PreflightError(
                "the freeze hook connects as the guest's root (socket authentication or "
                "/root/.my.cnf) and never stores a password in the guest, but [dump] sets a user",
                vm=ctx.key,
                hint="let root connect without a password in the guest, or use consistency = "
                "'stop'",
            )
        hold = PAUSE_METHODS[_pause_method(ctx)]
    step = int(max(guest.stop_timeout, guest.start_timeout))
    return fsfreeze.HookSpec(
        vm=ctx.key,
        consistency=guest.consistency,
        services=tuple(s for s in state.services if s != state.database),
        database=state.database or "",
        database_shell=kind.SHELL if kind else "",
        pidfile=state.pidfile or "",
        deadline=guest.freeze_hook_max_seconds,
        step_seconds=step,
        hold_sql=hold,
        lock_wait=lock_wait(guest),
    )


def _pause_method(ctx: RunContext) -> str:
    method = ctx.guest.pause_method
    if method != "auto":
        return method
    assert ctx.transport is not None
    result = ctx.transport.run(
        # through sh like every privileged command: one sudo rule covers them all
        ["sh", "-c", 'exec mysql --batch --skip-column-names -e "SELECT VERSION()"'],
        sudo=ctx.guest.sudo,
        timeout=ctx.guest.command_timeout,
    )
    if not result.ok:
        raise PreflightError(
            f"cannot ask the database for its version: {result.error_text()}", vm=ctx.key
        )
    version = result.stdout.decode(errors="replace").strip()
    return "backup_stage" if _supports_backup_stage(version) else "ftwrl"


# -- install, status, uninstall -------------------------------------------------------------

# $1 = the hook's path, $2 = caller (qemu|vmware); stdin = the script.
_INSTALL = r"""
set -u
umask 022
f=$1; d=${f%/*}
conf=/etc/qemu/qemu-ga.conf; dispatcher=/etc/qemu/fsfreeze-hook
marker="snapcoord freeze-hook install"
if [ "$2" = qemu ]; then
  command -v qemu-ga >/dev/null 2>&1 || [ -x /usr/sbin/qemu-ga ] ||
    { echo "qemu-guest-agent is not installed in the guest" >&2; exit 73; }
  [ -x "$dispatcher" ] ||
    { echo "$dispatcher is missing (qemu-guest-agent ships it)" >&2; exit 73; }
  if [ -f "$conf" ]; then
    cur=$(sed -n 's/^[[:space:]]*fsfreeze-hook[[:space:]]*=[[:space:]]*//p' "$conf" | tail -n 1)
    if [ -n "$cur" ] && [ "$cur" != "$dispatcher" ]; then
      echo "$conf names another fsfreeze hook ($cur): run $f from it" >&2; exit 72
    fi
  fi
fi
mkdir -p -- "$d" || exit 70
tmp=$(mktemp "$d/.snapcoord.XXXXXXXX") || exit 70
if ! { cat > "$tmp" && chmod 0700 "$tmp" && mv -f -- "$tmp" "$f"; }; then
  rm -f -- "$tmp"; exit 70
fi
[ "$2" = qemu ] || exit 0
changed=0
if [ ! -f "$conf" ]; then
  printf '# created by %s\n[general]\nfsfreeze-hook=%s\n' "$marker" "$dispatcher" > "$conf"
  changed=1
elif ! grep -q '^[[:space:]]*fsfreeze-hook[[:space:]]*=' "$conf"; then
  if grep -q '^\[general\]' "$conf"; then
    awk -v m="$marker" -v d="$dispatcher" '{ print }
      /^\[general\]/ && !done { print "# added by " m; print "fsfreeze-hook=" d; done = 1 }' \
      "$conf" > "$conf.snapcoord-new" && mv -f -- "$conf.snapcoord-new" "$conf"
  else
    printf '# added by %s\n[general]\nfsfreeze-hook=%s\n' "$marker" "$dispatcher" >> "$conf"
  fi
  changed=1
fi
if [ $changed = 1 ] || [ "${3:-}" = restart ]; then
  if [ -d /run/systemd/system ]; then systemctl restart qemu-guest-agent
  else service qemu-guest-agent restart; fi ||
    { echo "qemu-guest-agent did not restart" >&2; exit 74; }
fi
exit 0
"""

# $1 = the hook's path, $2 = caller. One "key value" line each.
_STATUS = r"""
f=$1
if [ -x "$f" ]; then
  echo "installed 1"; sed -n 's/^# snapcoord-fsfreeze-hook version=/version /p' "$f" | head -n 1
else echo "installed 0"; fi
if [ "$2" = qemu ]; then
  cur=$(sed -n 's/^[[:space:]]*fsfreeze-hook[[:space:]]*=[[:space:]]*//p' \
    /etc/qemu/qemu-ga.conf 2>/dev/null | tail -n 1)
  e=0; [ "$cur" = /etc/qemu/fsfreeze-hook ] && [ -x /etc/qemu/fsfreeze-hook ] && e=1
  echo "enabled $e"
  a=0
  if [ -d /run/systemd/system ]; then systemctl is-active --quiet qemu-guest-agent && a=1
  else pgrep -x qemu-ga >/dev/null 2>&1 && a=1; fi
  echo "agent $a"
else
  echo "enabled 1"; echo "agent 1"
fi
[ -f /run/snapcoord-fsfreeze/state ] && echo "quiesced 1" || echo "quiesced 0"
exit 0
"""

# $1 = the hook's path, $2 = caller.
_UNINSTALL = r"""
set -u
f=$1; conf=/etc/qemu/qemu-ga.conf
if [ -f /run/snapcoord-fsfreeze/state ]; then
  echo "the hook holds the guest quiesced now: thaw it first" >&2; exit 75
fi
rm -f -- "$f"
[ "$2" = qemu ] || exit 0
changed=0
if [ -f "$conf" ] && head -n 1 "$conf" | grep -q '^# created by snapcoord freeze-hook install'; then
  rm -f -- "$conf"; changed=1
elif [ -f "$conf" ] && grep -q '^# added by snapcoord freeze-hook install' "$conf"; then
  sed -i '/^# added by snapcoord freeze-hook install$/{N;d}' "$conf"; changed=1
fi
if [ $changed = 1 ]; then
  if [ -d /run/systemd/system ]; then systemctl restart qemu-guest-agent
  else service qemu-guest-agent restart; fi
fi
exit 0
"""


@dataclass(frozen=True)
class HookStatus:
    """What the guest says of the hook, against what this configuration would install."""

    installed: bool
    version: str | None
    expected: str
    enabled: bool
    agent: bool
    quiesced: bool

    @property
    def current(self) -> bool:
        return self.installed and self.version == self.expected

    def problem(self) -> str | None:
        """Why the hook would not bracket the next freeze; None when it would."""
        if not self.installed:
            return "the freeze hook is not installed"
        if not self.current:
            return (
                f"the freeze hook is out of date (installed {self.version or 'unknown'}, "
                f"this configuration makes {self.expected})"
            )
        if not self.enabled:
            return "the guest agent is not configured to run the freeze hook (qemu-ga.conf)"
        if not self.agent:
            return "qemu-guest-agent does not run in the guest"
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "installed": self.installed,
            "version": self.version,
            "expected": self.expected,
            "current": self.current,
            "enabled": self.enabled,
            "agent": self.agent,
            "quiesced": self.quiesced,
        }


def parse_status(text: str, expected: str) -> HookStatus:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in ("installed", "version", "enabled", "agent", "quiesced") and value:
            values[key] = value.strip()
    version = values.get("version")
    return HookStatus(
        installed=values.get("installed") == "1",
        version=version if version and re.fullmatch(r"[0-9a-f]{16}", version) else None,
        expected=expected,
        enabled=values.get("enabled") == "1",
        agent=values.get("agent") == "1",
        quiesced=values.get("quiesced") == "1",
    )


def _guest_script(ctx: RunContext, script: str, *args: str, stdin: bytes | None = None) -> str:
    assert ctx.transport is not None
    result = ctx.transport.run(
        ["sh", "-c", script, "sh", *args],
        sudo=ctx.guest.sudo,
        timeout=ctx.guest.command_timeout + ctx.guest.start_timeout,
        stdin=stdin,
    )
    if not result.ok:
        raise GuestError(f"{result.error_text()}", vm=ctx.key)
    return result.stdout.decode(errors="replace")


def install(ctx: RunContext) -> None:
    kind = caller(ctx)
    script = fsfreeze.render(spec_for(ctx))
    path = hook_path(kind)
    _guest_script(ctx, _INSTALL, path, kind, stdin=script.encode())
    version = fsfreeze.version_of(script)
    ctx.outputs["freeze_hook"] = {"path": path, "version": version, "caller": kind}
    ctx.notes.append(f"freeze hook {version} installed at {path}")


def status(ctx: RunContext) -> HookStatus:
    kind = caller(ctx)
    expected = fsfreeze.version_of(fsfreeze.render(spec_for(ctx))) or ""
    found = parse_status(_guest_script(ctx, _STATUS, hook_path(kind), kind), expected)
    ctx.outputs["freeze_hook"] = {"path": hook_path(kind), "caller": kind, **found.as_dict()}
    return found


def report_status(ctx: RunContext) -> None:
    found = status(ctx)
    problem = found.problem()
    if problem is not None:
        raise PreflightError(
            problem, vm=ctx.key, hint=f"run: snapcoord freeze-hook install {ctx.key}"
        )
    ctx.notes.append(f"freeze hook {found.version} installed, current and enabled")


def uninstall(ctx: RunContext) -> None:
    kind = caller(ctx)
    _guest_script(ctx, _UNINSTALL, hook_path(kind), kind)
    ctx.outputs["freeze_hook"] = {"path": hook_path(kind), "installed": False}


# -- around a backup ------------------------------------------------------------------------


@dataclass(frozen=True)
class Armed:
    """The coordinator's record of one backup the hook brackets (``<store>/vzdump/<vm>.json``)."""

    vm: str
    vmid: int
    token: str
    armed_at: float

    @classmethod
    def parse(cls, data: Any) -> Armed:
        if not isinstance(data, dict):
            raise ValueError("not an object")
        token, vm, vmid, armed_at = (data.get(k) for k in ("token", "vm", "vmid", "armed_at"))
        if not isinstance(token, str) or not re.fullmatch(r"[A-Za-z0-9-]{8,64}", token):
            raise ValueError("token")
        vmid = integer(vmid, 1, VMID_MAX)
        if not isinstance(vm, str) or vmid is None:
            raise ValueError("vm/vmid")
        when = number(armed_at, 0.0, MAX_EPOCH)
        if when is None:  # NaN or 1e300 once passed: a time that never ends
            raise ValueError("armed_at")
        return cls(vm, vmid, token, when)

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "vmid": self.vmid, "token": self.token, "armed_at": self.armed_at}


def armed_path(store: Path, key: str) -> Path:
    return store / "vzdump" / f"{key}.json"


def read_armed(store: Path, key: str) -> Armed | None:
    """This VM's armed record; None when there is none (or it is not one of ours: a corrupt
    file is treated as absent, and backup-end then says no freeze was prepared)."""
    import json

    try:
        return Armed.parse(json.loads(read_file(armed_path(store, key))))
    except (OSError, ValueError):
        return None


def arm(ctx: RunContext, vmid: int) -> Armed:
    import time

    assert ctx.transport is not None
    target = armed_path(ctx.config.store, ctx.key)
    ensure_private(ctx.config.store, target.parent.name, vm=ctx.key)  # before the guest's mark
    record = Armed(ctx.key, vmid, f"vzdump-{vmid}-{secrets.token_hex(6)}", time.time())
    path = hook_path(caller(ctx))
    result = ctx.transport.run(
        ["sh", path, "arm", record.token], sudo=ctx.guest.sudo, timeout=ctx.guest.command_timeout
    )
    if not result.ok:
        raise GuestError(
            f"the freeze hook did not take the mark: {result.error_text()}", vm=ctx.key
        )
    write_json_atomic(target, record.as_dict())
    ctx.outputs["armed"] = record.as_dict()
    return record


def disarm(store: Path, key: str) -> None:
    armed_path(store, key).unlink(missing_ok=True)


@dataclass(frozen=True)
class LogEvent:
    at: float
    event: str
    detail: str = ""


_EVENT = re.compile(r"(\d+(?:\.\d+)?) ([a-z-]+)(?: (.*))?\Z")


def parse_log(text: str) -> list[LogEvent]:
    events = []
    for line in text.splitlines():
        match = _EVENT.match(line.strip())
        if match:
            events.append(LogEvent(float(match[1]), match[2], match[3] or ""))
    return events


def since(events: list[LogEvent], token: str) -> list[LogEvent] | None:
    """The events after this backup's mark; None when the mark is not in the log."""
    for index in range(len(events) - 1, -1, -1):
        if events[index].event == "arm" and events[index].detail == token:
            return events[index + 1 :]
    return None


@dataclass
class Verdict:
    consistent: bool
    reason: str
    quiesced_seconds: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def judge(events: list[LogEvent] | None, consistency: str) -> Verdict:
    """Were the services stopped (or commits held) across the agent's freeze, and does
    everything run again? From the hook's events after this backup's mark."""
    if events is None:
        return Verdict(False, "this backup's mark is not in the freeze hook's log (was the guest "
                       "rebooted or reverted?)")  # fmt: skip
    listed = [{"at": e.at, "event": e.event, "detail": e.detail} for e in events]
    names = [e.event for e in events]
    if "freeze-begin" not in names:
        return Verdict(False, "the guest agent's freeze never came: no fs-freeze during this "
                       "backup (agent option freeze-fs-on-backup off, the agent not running, or "
                       "the hook not enabled)", events=listed)  # fmt: skip
    begin = max(i for i, n in enumerate(names) if n == "freeze-begin")
    cycle = events[begin:]
    cycle_names = [e.event for e in cycle]
    failed = next((e for e in cycle if e.event in ("freeze-failed", "hold-failed")), None)
    if failed is not None or "freeze-ok" not in cycle_names:
        why = failed.detail if failed else "the freeze did not finish"
        return Verdict(False, f"the freeze hook failed ({why}): the backup was taken without "
                       "the services stopped", events=listed)  # fmt: skip
    if "deadline" in cycle_names:
        return Verdict(False, "the thaw did not come before the hook's deadline "
                       "(freeze_hook_max_seconds): the services were restored while frozen",
                       events=listed)  # fmt: skip
    back = next((e for e in cycle if e.event == "came-back"), None)
    if back is not None:
        return Verdict(False, f"{back.detail.strip()} ran again behind the freeze",
                       events=listed)  # fmt: skip
    released = next((e for e in cycle if e.event == "released"), None)
    if consistency == "pause" and (released is None or released.detail != "held=yes"):
        return Verdict(False, "the commit lock ended before the thaw", events=listed)
    if "thaw-ok" not in cycle_names:
        if "thaw-failed" in cycle_names:
            return Verdict(False, "the thaw did not bring everything back", events=listed)
        return Verdict(False, "the guest agent's thaw has not come", events=listed)
    ok = next(e for e in cycle if e.event == "freeze-ok")
    thaw = next(e for e in cycle if e.event == "thaw-begin")
    return Verdict(True, "quiesced across the guest agent's freeze",
                   round(thaw.at - ok.at, 3), listed)  # fmt: skip


def read_log(ctx: RunContext) -> list[LogEvent]:
    assert ctx.transport is not None
    result = ctx.transport.run(
        ["sh", hook_path(caller(ctx)), "log"],
        sudo=ctx.guest.sudo,
        timeout=ctx.guest.command_timeout,
    )
    if not result.ok:
        raise NotApplicationConsistent(
            f"backup is not application-consistent: the freeze hook's log cannot be read "
            f"({result.error_text()})",
            vm=ctx.key,
            hint=f"snapcoord freeze-hook status {ctx.key}",
        )
    return parse_log(result.stdout.decode(errors="replace"))


def verify(ctx: RunContext) -> Verdict:
    ctx.outputs["application_consistent"] = False  # until the log says otherwise
    armed = read_armed(ctx.config.store, ctx.key)
    if armed is None:
        verdict = Verdict(False, "no freeze was prepared for this backup at pre-stop")
    else:
        try:
            events = read_log(ctx)
        finally:
            disarm(ctx.config.store, ctx.key)
        verdict = judge(since(events, armed.token), ctx.guest.consistency)
    ctx.outputs["application_consistent"] = verdict.consistent
    ctx.outputs["freeze_hook"] = {
        "reason": verdict.reason,
        "quiesced_seconds": verdict.quiesced_seconds,
        "events": verdict.events,
    }
    disarm(ctx.config.store, ctx.key)
    if not verdict.consistent:
        raise NotApplicationConsistent(
            f"backup is not application-consistent: {verdict.reason}", vm=ctx.key
        )
    ctx.notes.append(
        f"application-consistent: quiesced {verdict.quiesced_seconds:.2f} s across the guest "
        "agent's freeze"
    )
    return verdict


def recover(ctx: RunContext) -> None:
    """After an aborted backup: whatever the hook still holds is put back (idempotent)."""
    assert ctx.transport is not None
    result = ctx.transport.run(
        ["sh", hook_path(caller(ctx)), "recover"],
        sudo=ctx.guest.sudo,
        timeout=ctx.guest.command_timeout + 2 * ctx.guest.start_timeout,
    )
    disarm(ctx.config.store, ctx.key)
    if not result.ok:
        raise GuestError(f"the freeze hook could not restore: {result.error_text()}", vm=ctx.key)


def database_answers(ctx: RunContext) -> None:
    """Preflight: the database the hook will stop or lock answers now."""
    assert ctx.transport is not None and ctx.services is not None
    if ctx.services.state is None or not ctx.services.state.database:
        return
    result = ctx.transport.run(
        ["sh", "-c", ctx.services.script_env() + "db_alive"],
        sudo=ctx.guest.sudo,
        timeout=ctx.guest.command_timeout,
    )
    if not result.ok:
        raise PreflightError(
            f"{ctx.services.state.database} does not answer in the guest", vm=ctx.key
        )

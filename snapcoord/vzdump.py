"""``snapcoord vzdump-hook``: the hook script of Proxmox VE's vzdump (``--script``, or
``script:`` in /etc/vzdump.conf). vzdump calls it once per phase, each call a new process:
``<phase>`` for the job, ``<phase> <mode> <vmid>`` for each guest (docs/scheduling.md has the
sequences of pve-manager's PVE/VZDump.pm that this follows).

Where the backup's point in time is decides what each call does. For a **QEMU VM in snapshot
mode** it is inside vzdump's archive step, after ``pre-restart`` and ``post-restart``: the guest
agent's fs-freeze, then QMP ``backup``, then the thaw (qemu-server
``src/PVE/VZDump/QemuServer.pm``, e6352be). No bracket of hook phases covers it, so the guest
quiesces itself from its freeze hook (``snapcoord freeze-hook install``; hooks/guest/fsfreeze.py):

- ``pre-stop``: check that it can work (the VM's agent freezes on backup and answers, the hook
  is installed, current and enabled, the database answers), run the dump if the VM has one,
  then mark this backup in the hook's log. Exit non-zero: vzdump aborts this guest's backup.
- ``backup-end``: read the hook's log after the mark: exit 0 only when the services were stopped
  (or commits held) across the agent's freeze and everything runs again; else exit 5, so vzdump
  marks the backup failed.
- ``backup-abort``, ``job-abort``: the hook puts back whatever it still holds.

For **containers** (snapshot mode) and **suspend** mode the point in time falls between
``pre-stop`` and ``pre-restart``/``post-restart`` (pve-container ``src/PVE/VZDump/LXC.pm``,
94f5585), so the hook brackets it itself:

- ``pre-stop``: freeze the VM (snapcoord/freeze.py) for at most its ``freeze_max_seconds``.
- ``post-restart``, ``backup-abort``: thaw if still frozen (idempotent).

In **stop** mode vzdump shuts the guest down itself: ``pre-stop`` only runs the dump.
``job-end``/``job-abort`` thaw every VM a vzdump hook froze and nobody thawed. Every other phase,
and guests not in the configuration: nothing, exit 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from snapcoord.adapters import open_adapter
from snapcoord.config import Config
from snapcoord.errors import ExitCode, HypervisorError, UsageError, VMNotFound
from snapcoord.freeze_state import FreezeState
from snapcoord.journal import CorruptJournal, Journal
from snapcoord.outcome import Outcome

JOB_PHASES = ("job-init", "job-start", "job-end", "job-abort")
GUEST_PHASES = (
    "backup-start",
    "pre-stop",
    "pre-restart",
    "post-restart",
    "backup-end",
    "backup-abort",
    "log-end",
)
MODES = ("snapshot", "suspend", "stop")


@dataclass(frozen=True)
class HookCall:
    phase: str
    mode: str | None = None
    vmid: int | None = None
    vmtype: str | None = None  # $VMTYPE: qemu or lxc

    @property
    def agent_bracket(self) -> bool:
        """A QEMU VM in snapshot mode: its point in time is the guest agent's freeze, inside
        vzdump's archive step, after every phase but backup-end."""
        return self.mode == "snapshot" and self.vmtype != "lxc"

    @classmethod
    def parse(cls, argv: Sequence[str], environ: Mapping[str, str]) -> HookCall:
        if not argv:
            raise UsageError("vzdump-hook: no phase given (vzdump passes it as the first argument)")
        phase, rest = argv[0], list(argv[1:])
        if phase in GUEST_PHASES:
            vmid_ok = len(rest) == 2 and rest[1].isascii() and rest[1].isdigit()
            if not vmid_ok or rest[0] not in MODES:
                raise UsageError(
                    f"vzdump-hook {phase}: expected '<mode> <vmid>' (mode: {', '.join(MODES)}), "
                    f"got {' '.join(rest) or 'nothing'}"
                )
            return cls(phase, rest[0], int(rest[1]), environ.get("VMTYPE"))
        return cls(phase)


def vm_for_vmid(config: Config, vmid: int) -> str | None:
    """The configured VM vzdump means by ``vmid``: an explicit ``vzdump_vmid``, else a Proxmox
    VM configured by that ``vmid``, else one configured by name whose name the Proxmox API
    resolves to it. None: not ours."""
    vms = config.vms

    def proxmox(key: str) -> bool:
        return config.hypervisors[vms[key].hypervisor].type == "proxmox"

    for found in (
        [k for k, v in vms.items() if v.vzdump_vmid == vmid],
        [k for k, v in vms.items() if v.vmid == vmid and v.vzdump_vmid is None and proxmox(k)],
    ):
        if found:
            return _only(found, vmid)
    by_name = [k for k, v in vms.items() if v.vmid is None and v.vzdump_vmid is None and proxmox(k)]
    resolved = _resolve_names(config, by_name, vmid) if by_name else []
    return _only(resolved, vmid) if resolved else None


def _resolve_names(config: Config, keys: list[str], vmid: int) -> list[str]:
    found = []
    by_hypervisor: dict[str, list[str]] = {}
    for key in keys:
        by_hypervisor.setdefault(config.vms[key].hypervisor, []).append(key)
    for name, members in by_hypervisor.items():
        try:
            with open_adapter(name, config.hypervisors[name]) as adapter:
                for key in members:
                    try:
                        vm = adapter.find_vm(config.vms[key].ref)
                    except VMNotFound:
                        continue
                    if vm.id == str(vmid):
                        found.append(key)
        except HypervisorError as exc:
            raise HypervisorError(
                f"vmid {vmid}: cannot tell whether it is one of {', '.join(members)} "
                f"(configured by name): {exc.message}",
                hint="set [vms.X] vzdump_vmid (or vmid) so the hook needs no API call",
            ) from exc
    return found


def _only(keys: list[str], vmid: int) -> str:
    if len(keys) > 1:
        raise UsageError(
            f"vmid {vmid} matches several configured VMs: {', '.join(sorted(keys))}",
            hint="set vzdump_vmid on the one vzdump backs up",
        )
    return keys[0]


def frozen_by_vzdump(config: Config, vmid: int | None = None) -> list[str]:
    """VMs a vzdump hook froze (for ``vmid``, or any) that no thaw has closed yet: frozen now
    (the run journal), or put back at the limit before the thaw came (the last run)."""
    keys = []
    for key in config.vms:
        journal = Journal(config.store, key)
        try:
            current = journal.read() or {}
        except (ValueError, CorruptJournal):  # half-written by hand, a link: not a hook's freeze
            current = {}
        for data, open_run in ((current, True), (journal.read_last(), False)):
            freeze = FreezeState.parse(data.get("freeze"))
            if freeze is None or freeze.source != "vzdump":
                continue
            if vmid is not None and freeze.vmid != vmid:
                continue
            unreported = data.get("ended_by") == "limit" and not data.get("thaw_reported")
            if open_run or unreported:
                keys.append(key)
                break
    return keys


Freeze = Callable[[str, int], Outcome]  # (vm key, vmid)
Thaw = Callable[[str], Outcome]
Dump = Callable[[str], Outcome]


@dataclass
class Actions:
    """What a phase may do; the CLI wires them to the real commands, tests may observe them."""

    freeze: Freeze
    thaw: Thaw
    dump: Dump
    #: the freeze hook's path (QEMU, snapshot mode): prepare at pre-stop, verify at backup-end,
    #: restore after an abort
    prepare: Freeze
    verify: Thaw
    restore: Thaw


def armed_by_vzdump(config: Config, vmid: int | None = None) -> list[str]:
    """VMs whose freeze hook a vzdump pre-stop prepared (for ``vmid``, or any) and no
    backup-end or abort has closed."""
    from snapcoord.freeze_hook import read_armed

    keys = []
    for key in config.vms:
        armed = read_armed(config.store, key)
        if armed is not None and (vmid is None or armed.vmid == vmid):
            keys.append(key)
    return keys


def run_hook(config: Config, call: HookCall, actions: Actions) -> tuple[int, list[Outcome], str]:
    """Do what ``call``'s phase asks. Returns the exit code, the outcomes, and a line to log
    when nothing was done on purpose ('' otherwise)."""
    phase, vmid = call.phase, call.vmid
    if phase in ("job-end", "job-abort"):
        outcomes = [actions.thaw(key) for key in frozen_by_vzdump(config)]
        # a backup-end that never came: whatever a freeze hook still holds is put back
        outcomes += [actions.restore(key) for key in armed_by_vzdump(config)]
        return _worst(outcomes), outcomes, ""
    if phase not in GUEST_PHASES or vmid is None:
        return ExitCode.OK, [], ""
    if phase == "pre-stop":
        key = vm_for_vmid(config, vmid)
        if key is None:
            return ExitCode.OK, [], f"vmid {vmid} is not in {config.source}: left alone"
        if call.mode == "stop":
            outcome = actions.dump(key)
        elif call.agent_bracket:
            outcome = actions.prepare(key, vmid)
        else:
            outcome = actions.freeze(key, vmid)
        return outcome.exit_code, [outcome], ""
    if phase == "backup-end" and call.agent_bracket:
        # every QEMU snapshot-mode backup of a configured guest is judged, prepared or not
        key = vm_for_vmid(config, vmid)
        if key is None or config.vm(key).guest is None:
            return ExitCode.OK, [], ""
        outcome = actions.verify(key)
        return outcome.exit_code, [outcome], ""
    if phase == "backup-abort" and call.agent_bracket:
        outcomes = [actions.restore(key) for key in armed_by_vzdump(config, vmid)]
        outcomes += [actions.thaw(key) for key in frozen_by_vzdump(config, vmid)]
        return _worst(outcomes), outcomes, ""
    if phase not in ("post-restart", "backup-abort"):
        return ExitCode.OK, [], ""
    outcomes = [actions.thaw(key) for key in frozen_by_vzdump(config, vmid)]
    return _worst(outcomes), outcomes, ""


def _worst(outcomes: list[Outcome]) -> int:
    from snapcoord.fleet import most_severe

    return most_severe([o.exit_code for o in outcomes])

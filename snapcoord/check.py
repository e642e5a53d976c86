"""``snapcoord check``: everything a snapshot run of one VM would need, asked without stopping,
starting or changing anything, each problem as one line with its fix.

The checks follow a run's own preflight (plans/snapshot.py, plans/quiesce.py) and reuse its
pieces: the adapter's connect, find_vm and snapshot preflight; the guest's connection and
service probe; the database kind's dump or pause preflight; the store's write test. Where a run
stops at the first problem, ``check`` goes on with every check that does not depend on the
failed one, so one call lists all there is to fix. It adds what a run takes on trust: the
session's privileges on the VM, whether the VM can take a snapshot at all (template, storage),
services that are configured but not running, the watchdog's length against the stops, and the
guest clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcoord import guest_clock, store
from snapcoord.adapters import open_adapter
from snapcoord.adapters.base import VM, Adapter
from snapcoord.errors import ExitCode, Interrupted, SnapcoordError
from snapcoord.guest import Transport
from snapcoord.hooks import archive, databases
from snapcoord.hooks.databases.dumpfile import fallback_fix, fallback_note
from snapcoord.hooks.guest.services import GuestServices, Services
from snapcoord.outcome import Outcome
from snapcoord.plans.fallback import Fallback
from snapcoord.settings import Config, VMConfig
from snapcoord.status import read_last_run
from snapcoord.transports import open_transport
from snapcoord.watchdog_rule import watchdog_problem


@dataclass(frozen=True)
class Finding:
    """One check's result: what it found, or the problem and how to fix it."""

    check: str
    ok: bool
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "detail": self.detail, "fix": self.fix}

    def line(self, key: str) -> str:
        """``shopdb: sudo: sudo -n refused to run 'sh'; fix: give the SSH user ...``."""
        return f"{key}: {self.check}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


class Skip(Exception):
    """A check that depends on one that failed: not run, not reported."""


class Checker:
    """The checks of one VM, in a run's order; :meth:`run` returns every finding."""

    def __init__(self, config: Config, key: str) -> None:
        self.config = config
        self.key = key
        self.vm_cfg: VMConfig = config.vm(key)
        self.findings: list[Finding] = []
        self.adapter: Adapter | None = None
        self.vm: VM | None = None
        self.transport: Transport | None = None
        self.services: Services | None = None
        self.state: GuestServices | None = None
        #: what a run would note without it being a problem (a dump's gzip fallback)
        self.notes: list[str] = []

    # -- recording ---------------------------------------------------------------------------
    def _check(self, name: str, func: Callable[[], str]) -> bool:
        """Run one check: ``func`` returns what it found, or raises the problem."""
        try:
            detail = func()
        except Skip:
            return False
        except Interrupted:  # SIGINT/SIGTERM: no further check, the fleet reports it
            raise
        except SnapcoordError as exc:
            self.findings.append(Finding(name, False, exc.message, exc.hint or _FIXES.get(name)))
            return False
        self.findings.append(Finding(name, True, detail))
        return True

    def _problem(self, name: str, detail: str, fix: str) -> None:
        self.findings.append(Finding(name, False, detail, fix))

    # -- the checks --------------------------------------------------------------------------
    def run(self) -> list[Finding]:
        cfg = self.vm_cfg
        if cfg.guest is not None:
            problem = watchdog_problem(cfg.guest, f"vms.{self.key}.guest")
            if problem is None:
                seconds = cfg.guest.watchdog_seconds
                self.findings.append(Finding("watchdog", True, f"{seconds} s outlasts the stops"))
            else:
                detail, _, fix = problem.rpartition("; ")
                self._problem("watchdog", detail, fix)
        with self._hypervisor_session():
            connected = self.adapter is not None and self._check("hypervisor", self._connect)
            if connected and self._check("vm", self._find_vm):
                self._check("privileges", self._privileges)
                self._check("snapshot", self._snapshot_possible)
            if cfg.guest is not None:
                self._guest_checks()
        return self.findings

    @contextlib.contextmanager
    def _hypervisor_session(self) -> Iterator[None]:
        cfg = self.vm_cfg
        try:
            self.adapter = open_adapter(cfg.hypervisor, self.config.hypervisors[cfg.hypervisor])
        except SnapcoordError as exc:  # a missing SDK: one line, the guest is still checked
            self.findings.append(Finding("hypervisor", False, exc.message, exc.hint))
        try:
            yield
        finally:
            if self.transport is not None:
                with contextlib.suppress(SnapcoordError, OSError):
                    self.transport.close()
            if self.adapter is not None:
                with contextlib.suppress(SnapcoordError, OSError):
                    self.adapter.close()

    def _connect(self) -> str:
        assert self.adapter is not None
        self.adapter.connect()
        hv = self.config.hypervisors[self.vm_cfg.hypervisor]
        return f"{hv.type} {self.vm_cfg.hypervisor}: connected and logged in"

    def _find_vm(self) -> str:
        assert self.adapter is not None
        self.vm = self.adapter.find_vm(self.vm_cfg.ref)
        return f"found {self.vm.name} ({self.adapter.power_state(self.vm).value})"

    def _operations(self) -> list[str]:
        cfg = self.vm_cfg
        operations = ["snapshot"]
        if cfg.retention is not None:
            operations.append("prune")
        if cfg.quiesce:
            operations.append("quiesce")
        if cfg.guest is not None and cfg.guest.transport == "agent":
            operations.append("guest-agent")  # exec, exec-status, file-read, file-write
        return operations

    def _privileges(self) -> str:
        assert self.adapter is not None and self.vm is not None
        operations = self._operations()
        missing = self.adapter.missing_privileges(self.vm, operations)
        if missing:
            self._problem(
                "privileges",
                f"the session lacks {', '.join(missing)} on the VM (needed to "
                f"{' and '.join(operations)})",
                "grant the role of docs/first-setup.md on the VM (or a pool or folder above it)",
            )
            raise Skip
        return f"enough to {' and '.join(operations)}"

    def _snapshot_possible(self) -> str:
        assert self.adapter is not None and self.vm is not None
        cfg = self.vm_cfg
        self.adapter.check_snapshot_support(self.vm)
        self.adapter.check_snapshot_ready(self.vm, memory=cfg.memory, quiesce=cfg.quiesce)
        memory, quiesce = str(cfg.memory).lower(), str(cfg.quiesce).lower()
        return f"possible now (memory={memory}, quiesce={quiesce})"

    # -- the guest ---------------------------------------------------------------------------
    def _guest_checks(self) -> None:
        guest = self.vm_cfg.guest
        assert guest is not None
        if guest.transport == "agent" and self.vm is None:
            return  # the agent is reached through the hypervisor: its problem is reported
        self.transport = open_transport(self.config, self.key, adapter=self.adapter)
        self.services = Services(self.transport, guest, vm=self.key)
        if not self._check("guest", self._open_guest):
            return
        if not self._check("services", self._services):
            return
        self._check("clock", self._clock)
        if guest.consistency == "pause":
            self._check("pause", self._pause)
        if guest.dump:
            self._check("dump", self._dump)
            if self.vm_cfg.dump.verify:
                self._check("verify", self._verify)
        if self.vm_cfg.archive.paths:
            self._check("archive", self._archive)
        if Fallback.wanted(self.vm_cfg):
            self._check("store", self._store)

    def _open_guest(self) -> str:
        assert self.transport is not None
        self.transport.open()
        return self.transport.description

    def _services(self) -> str:
        assert self.services is not None
        guest = self.vm_cfg.guest
        assert guest is not None
        self.state = state = self.services.probe(warm=False)
        names = [*state.services, *([state.database] if state.database else [])]
        stopped = [name for name in names if not state.running.get(name)]
        if stopped:
            self._problem(
                "services",
                f"{', '.join(stopped)} not running ({state.init}): a run would neither stop "
                "nor check what is already down",
                "start it, or take it out of [vms.X.guest] services (database: set database)",
            )
            raise Skip
        sudo = "sudo -n works, " if guest.sudo else ""
        return f"{sudo}{state.init}; {', '.join(names) or 'no service'} running"

    def _clock(self) -> str:
        assert self.transport is not None and self.vm_cfg.guest is not None
        offset = guest_clock.offset(
            self.transport, vm=self.key, timeout=self.vm_cfg.guest.command_timeout
        )
        if abs(offset) > guest_clock.TOLERANCE:
            self._problem(
                "clock",
                f"the guest clock is {offset:+.1f} s off the coordinator's: run times, dump "
                "times and the hypervisor's task log will not line up",
                "enable time sync in the guest (chrony, systemd-timesyncd)",
            )
            raise Skip
        return f"{offset:+.1f} s off the coordinator's"

    def _kind(self) -> databases.DatabaseKind:
        if self.state is None or self.state.kind is None:
            raise SnapcoordError(
                "the guest has no database service to dump or pause",
                hint="set [vms.X.guest] database, or dump = false and consistency = 'stop'",
            )
        return databases.get(self.state.kind)

    def _dump(self) -> str:
        assert self.transport is not None and self.vm_cfg.guest is not None
        plan = self._kind().preflight(
            self.transport,
            vm=self.key,
            guest=self.vm_cfg.guest,
            options=self.vm_cfg.dump,
            store_root=self.config.store,
        )
        dbs = "all databases" if plan.all_databases else ", ".join(plan.databases)
        codec = {"none": "dump uncompressed"}.get(plan.compression, f"dump: {plan.compression}")
        reason = plan.compression_reason
        if reason:  # "auto" fell back to gzip: a run notes it, and so does check
            codec += f" ({reason}: {fallback_fix(self.key, reason)})"
            self.notes.append(fallback_note(self.key, reason))
        if plan.threads > 1:  # a parallel dump ([vms.X.dump] threads, docs/dump.md)
            codec += f", {plan.threads} parallel parts"
        if plan.threads_note:
            self.notes.append(plan.threads_note)
        return (
            f"{plan.server_version}: client and credentials work; {dbs}, about "
            f"{store.mib(plan.data_bytes)} of data, store has room; {codec}"
        )

    def _verify(self) -> str:
        """``verify = true``: the throwaway server's binaries on this host, and its folder."""
        from snapcoord.verify import dumps, scratch

        kind = self._kind()
        dumps.kind_module(kind.NAME).require(vm=self.key)
        folder = Path(self.config.defaults.verify_dir)
        with scratch.workspace(folder, vm=self.key):  # made and removed: it can be used
            pass
        return f"{kind.NAME} server binaries on this host; throwaway servers in {folder}"

    def _pause(self) -> str:
        assert self.transport is not None and self.vm_cfg.guest is not None
        plan = self._kind().check_pause(
            self.transport, vm=self.key, guest=self.vm_cfg.guest, options=self.vm_cfg.dump
        )
        log_text = "binary log on" if plan.binlog else "binary log off"
        return f"{plan.server_version}: commits can be held ({plan.method}, {log_text})"

    def _archive(self) -> str:
        assert self.transport is not None and self.vm_cfg.guest is not None
        paths = self.vm_cfg.archive.paths
        archive.preflight(
            self.transport,
            vm=self.key,
            paths=list(paths),
            sudo=self.vm_cfg.guest.sudo,
            timeout=self.vm_cfg.guest.command_timeout,
            store_root=self.config.store,
        )
        return f"{', '.join(paths)} readable"

    def _store(self) -> str:
        last = read_last_run(self.config.store, self.key)
        needed = (last.dump_bytes or 0) if last is not None else 0
        folder = store.check_writable(self.config.store, self.key, needed)
        room = f", room for the last dump ({store.mib(needed)})" if needed else ""
        return f"{folder} writable{room}"


_FIXES = {
    "hypervisor": "check [hypervisors.X] host, credentials and ca_file/thumbprint",
    "vm": "check [vms.X] name, vmid or path, and the session's VM.Audit/read access",
    "guest": "check [vms.X.guest] host, user, key and known_hosts (docs/first-setup.md)",
}


def check_vm(config: Config, key: str) -> Outcome:
    """Every check of VM ``key`` as an :class:`Outcome` (``command: "check"``): exit 0 when
    nothing stands in a run's way, else 4, with one line per problem; what a run would note (a
    dump compressed with gzip for want of zstd) comes first, as a run's notes do."""
    checker = Checker(config, key)
    findings = checker.run()
    problems = [f for f in findings if not f.ok]
    code = int(ExitCode.PREFLIGHT) if problems else int(ExitCode.OK)
    passed = [f.check for f in findings if f.ok]
    if problems:
        line = f"{key}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
        line += f"; passed: {', '.join(passed)}" if passed else ""
    else:
        line = f"{key}: ready: {', '.join(passed)}"
    summary = {
        "vm": key,
        "ok": not problems,
        "exit_code": code,
        "command": "check",
        "checks": [f.as_dict() for f in findings],
        "errors": [f.line(key) for f in problems],
        "notes": checker.notes,
    }
    lines = [f"{key}: note: {note}" for note in checker.notes] + [line]
    return Outcome(key, code, summary, lines, [f.line(key) for f in problems])

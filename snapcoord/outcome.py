"""What one command did on one VM: the value every per-VM job returns, so a fleet of them can be
run in parallel, printed as they finish, summarised, and reported to monitoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snapcoord.errors import SnapcoordError


@dataclass
class Outcome:
    vm: str
    exit_code: int
    #: the VM's ``--json`` object (``vm``, ``ok``, ``exit_code``, ``command`` and the command's own
    #: fields); notifications and metrics read it too
    summary: dict[str, Any]
    #: human lines for stdout, printed when the VM finished (e.g. ``db1: prune: keep ...``)
    lines: list[str] = field(default_factory=list)
    #: one-line errors for stderr (``snapcoord: error: `` is prefixed when printed)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def refused(cls, vm: str, command: str, error: SnapcoordError) -> Outcome:
        """A command that ended before its run (locked, bad input, no guest) as an outcome."""
        line = str(error)
        line = line if line.startswith(f"{vm}:") else f"{vm}: {line}"
        code = int(error.exit_code)
        summary = {"vm": vm, "ok": False, "exit_code": code, "command": command, "errors": [line]}
        return cls(vm, code, summary, errors=[line])

    @classmethod
    def failed(cls, vm: str, command: str, error: SnapcoordError, **fields: Any) -> Outcome:
        """A per-VM command (list, recover) that failed on this VM with ``error``: its one
        line names the VM by its configuration key first (``SnapcoordError.line``)."""
        line = error.line(vm)
        code = int(error.exit_code)
        summary = {"vm": vm, "ok": False, "exit_code": code, "command": command, **fields}
        return cls(vm, code, {**summary, "errors": [line]}, errors=[line])

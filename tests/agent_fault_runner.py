"""Run ``snapcoord`` over ``transport = "agent"`` with ONE agent-side fault at ONE position.

The agent transport's sibling of tests/fault_runner.py: ``python -m tests.agent_fault_runner
ARGS...`` runs ``snapcoord ARGS...`` with fault_runner's :class:`~tests.fault_runner.Injector`
(the same positions, found on the same step records; the same JSON-lines log) and the Proxmox
adapter replaced by one whose ``create_snapshot`` lets the injector fire first (the hypervisor
here is the Proxmox VE API double, not libvirt's test driver). What differs is how a fault is
made: the qemu-ga process and the API double live in the test's process, so every fault but a
signal to snapcoord is asked of the test's control socket (tests/test_agent_fault_matrix.py
``FaultControl``), which answers once the fault is in effect.

``SNAPCOORD_TEST_FAULT=<position>:<fault>``
    a position of :data:`AGENT_POSITIONS` (fault_runner's), a fault of :data:`AGENT_FAULTS`.
``SNAPCOORD_TEST_AGENT_CONTROL=<path>``
    the test's control socket (one line per command, as tests/faultproxy.py's ``control``).
``SNAPCOORD_TEST_FAULT_LOG=<path>``
    as in tests/fault_runner.py.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any

from snapcoord.adapters.base import VM, Snapshot
from tests.fault_runner import FAULT_ENV, LOG_ENV, POSITIONS, Injector, Position, _install
from tests.faultproxy import control

AGENT_CONTROL_ENV = "SNAPCOORD_TEST_AGENT_CONTROL"

#: The agent transport's faults: what each one does (the docs' fault table).
AGENT_FAULTS: dict[str, str] = {
    "agent_restart": "qemu-ga is killed and started again at once "
    "(as `systemctl restart qemu-guest-agent`)",
    "agent_hang": "qemu-ga is stopped (SIGSTOP) for longer than the command timeout, "
    "then continued",
    "agent_gone": "qemu-ga is stopped (SIGSTOP) until past the watchdog",
    "api_down": "the Proxmox API resets every connection and refuses new ones for longer than "
    "the command timeout, then answers again",
    "sigkill": "SIGKILL to snapcoord",
}


#: fault_runner's positions the agent matrix uses, as they are but one: through the agent,
#: apache2's stop may end 0.1 s after it began (its init script polls its PID file once a
#: second, or not at all), and 0.3 s would then miss the step.
AGENT_POSITIONS: dict[str, Position] = {
    name: POSITIONS[name]
    for name in ("after_arm", "during_service_stops", "during_dump", "after_database_stop",
                 "during_snapshot", "during_database_start")
}  # fmt: skip
AGENT_POSITIONS["during_service_stops"] = dataclasses.replace(
    POSITIONS["during_service_stops"], delay=0.05, doc="0.05 s into stopping apache2 and cron"
)


class AgentInjector(Injector):
    """fault_runner's injector; the fault is a signal to itself or a line to the test."""

    def __init__(self, position: str | None, fault: str | None, **kwargs: Any) -> None:
        super().__init__(position, fault, **kwargs)
        self.position = AGENT_POSITIONS[position] if position else None

    def _inject(self) -> str:
        if self.fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
            return "signalled"
        if not self.control_path:
            raise RuntimeError(f"{AGENT_CONTROL_ENV} is not set: no one to make the fault")
        return control(self.control_path, str(self.fault), timeout=30.0)


def _adapter_class(injector: Injector) -> type:
    from snapcoord.adapters.proxmox import ProxmoxAdapter

    class FaultyProxmoxAdapter(ProxmoxAdapter):
        """The Proxmox adapter; the fault fires inside ``create_snapshot``."""

        def create_snapshot(
            self,
            vm: VM,
            name: str,
            description: str,
            *,
            memory: bool,
            quiesce: bool,
            timeout: float,
        ) -> Snapshot:
            injector.in_snapshot()
            return super().create_snapshot(
                vm, name, description, memory=memory, quiesce=quiesce, timeout=timeout
            )

    return FaultyProxmoxAdapter


FaultyProxmoxAdapter: Any = None  # set by main()


def injector_from_env() -> AgentInjector:
    spec = os.environ.get(FAULT_ENV, "").strip()
    position: str | None = None
    fault: str | None = None
    if spec:
        position, _, fault = spec.partition(":")
        if position not in AGENT_POSITIONS or fault not in AGENT_FAULTS:
            raise SystemExit(
                f"agent_fault_runner: bad {FAULT_ENV}={spec!r}: "
                f"positions {sorted(AGENT_POSITIONS)}, faults {sorted(AGENT_FAULTS)}"
            )
    return AgentInjector(
        position,
        fault,
        log_path=os.environ.get(LOG_ENV),
        control_path=os.environ.get(AGENT_CONTROL_ENV),
        refuse_seconds=0.0,
        stall_seconds=0.0,
    )


def main(argv: list[str]) -> int:
    global FaultyProxmoxAdapter
    from snapcoord import adapters, cli

    injector = injector_from_env()
    _install(injector)
    FaultyProxmoxAdapter = _adapter_class(injector)
    adapters.REGISTRY["proxmox"] = (__name__, "FaultyProxmoxAdapter", "proxmox", ("proxmoxer",))
    injector.record(
        "runner", pid=os.getpid(), position=injector.position_name, fault=injector.fault
    )
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

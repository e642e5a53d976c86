"""Preflight finds a snapshot name that is already taken before anything in the guest is touched:
no service is stopped for a snapshot that cannot be created. The real snapshot plan on the step
engine, libvirt's test driver, and the demo's stand-in services (exec transport)."""

from __future__ import annotations

from pathlib import Path

from snapcoord.config import load_config
from snapcoord.errors import ExitCode, SnapshotExists
from snapcoord.plans import RunContext, snapshot_steps
from snapcoord.run import Engine
from tests.cli_helpers import STAND_IN_SERVICES, running_stand_ins, stand_in_guest
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture


def test_a_taken_snapshot_name_fails_preflight_and_stops_nothing(
    tmp_path: Path, libvirt_node: str
) -> None:
    config, state = stand_in_guest(tmp_path, libvirt_node)
    ctx = RunContext.create(load_config(str(config)), "db1", "test-run")
    steps = snapshot_steps(ctx, label="t")
    # Someone (another tool, a run in the same second) already took this name.
    ctx.adapter.connect()
    vm = ctx.adapter.find_vm(ctx.vm_cfg.ref)
    ctx.adapter.create_snapshot(
        vm, ctx.snapshot_name, "not ours", memory=False, quiesce=False, timeout=30
    )

    result = Engine(window=ctx.window).execute(steps)

    assert len(result.failures) == 1 and isinstance(result.failures[0], SnapshotExists)
    assert result.exit_code == ExitCode.HYPERVISOR
    done = [r.name for r in result.records if not r.undo]
    assert done[-1] == "check VM and snapshot name"
    assert "stop services" not in done and "stop database" not in done
    assert result.window.seconds is None  # nothing was stopped
    assert running_stand_ins(state) == STAND_IN_SERVICES

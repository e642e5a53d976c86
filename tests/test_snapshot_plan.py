"""The real snapshot plan on the step engine: a failure injected at every step position unwinds
exactly the undos pushed so far, in reverse, and leaves every service running. The guest is the
exec transport with the demo's stand-in services (real processes, no real services touched)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from snapcoord.config import load_config
from snapcoord.errors import ExitCode, GuestError, Interrupted, SnapshotExists
from snapcoord.plans import RunContext, snapshot_steps
from snapcoord.run import Engine
from tests import lab
from tests.cli_helpers import (
    STAND_IN_SERVICES,
    json_lines,
    running_stand_ins,
    snapcoord,
    stand_in_guest,
)
from tests.guest_fixtures import (
    guest_config,
    lab_services,  # noqa: F401 - fixture
    run_observed,
)
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture  # noqa: F401 - fixture  # noqa: F401 - fixture

STEPS = [
    "connect to hypervisor lab",
    "find VM",
    "check VM and snapshot name",
    "connect to guest",
    "check guest services and sudo",
    "take guest lease",
    "arm guest watchdog",
    "stop services",
    "stop database",
    "check services still stopped",
    "hypervisor snapshot",
]
HYPERVISOR = ["disconnect from hypervisor lab"]
GUEST = ["disconnect from guest", *HYPERVISOR]
LEASED = ["release guest lease", *GUEST]  # released last, once everything else is back
ARMED = ["disarm guest watchdog", *LEASED]
# The undos that must run, in order, when the step at that position fails.
EXPECTED_UNDOS = [
    [],
    HYPERVISOR,
    HYPERVISOR,
    GUEST,  # pushed before connecting: a half-open master is closed too
    GUEST,
    LEASED,  # pushed before taking it: a take whose answer was lost is released too
    ARMED,  # pushed before arming (nothing armed: a no-op)
    ["start services", *ARMED],  # a stop that failed half-way is undone too
    ["start database", "start services", *ARMED],
    ["start database", "start services", *ARMED],
    ["start database", "start services", *ARMED],
]


@pytest.fixture
def context(tmp_path: Path, libvirt_node: str) -> tuple[RunContext, Path]:
    config, state = stand_in_guest(tmp_path, libvirt_node)
    return RunContext.create(load_config(str(config)), "db1", "test-run"), state


def test_plan_order(context: tuple[RunContext, Path]) -> None:
    ctx, _ = context
    assert [s.name for s in snapshot_steps(ctx, label="t")] == STEPS


@pytest.mark.parametrize("position", range(len(STEPS)))
def test_failure_at_every_step_unwinds_exactly_and_restores_services(
    context: tuple[RunContext, Path], position: int
) -> None:
    ctx, state = context
    steps = snapshot_steps(ctx, label="t")
    injected = GuestError("injected failure", vm="db1")
    real_do = steps[position].do

    def fail() -> None:
        if position in (7, 8) and real_do is not None:
            real_do()  # the stop happened, then something went wrong
        raise injected

    steps[position].do = fail
    armed: list[int] = []
    arm = steps[STEPS.index("arm guest watchdog")]
    real_arm = arm.do
    assert real_arm is not None

    def arm_and_record() -> None:
        real_arm()
        assert ctx.watchdog is not None
        armed.append(ctx.watchdog.pid)

    if position != STEPS.index("arm guest watchdog"):
        arm.do = arm_and_record
    result = Engine(window=ctx.window).execute(steps)

    done = [r.name for r in result.records if not r.undo]
    undone = [r.name for r in result.records if r.undo]
    assert done == STEPS[: position + 1]
    assert undone == EXPECTED_UNDOS[position]
    assert result.failures == [injected]
    assert result.exit_code == ExitCode.PREFLIGHT
    assert running_stand_ins(state) == STAND_IN_SERVICES
    assert result.window.still_down == []
    assert ctx.watchdog is None
    assert not (state / "lease" / "lease").exists()  # the guest lease is released (or not taken)
    assert len(armed) == (1 if position > STEPS.index("arm guest watchdog") else 0)
    for pid in armed:  # the guest-side watchdog process is really gone (TERM is asynchronous)
        assert _gone_within(pid, seconds=5)


def _gone_within(pid: int, *, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_signal_during_the_snapshot_call_exits_130_not_5(
    context: tuple[RunContext, Path],
) -> None:
    """SIGTERM while the hypervisor call runs is an interruption, not a failed snapshot."""
    ctx, state = context
    steps = snapshot_steps(ctx, label="t")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise Interrupted("interrupted by SIGTERM: restoring everything that was changed")

    ctx.adapter.create_snapshot = interrupted  # type: ignore[method-assign,assignment]
    result = Engine(window=ctx.window).execute(steps)
    assert result.exit_code == ExitCode.INTERRUPTED
    assert [type(f) for f in result.failures] == [Interrupted]
    assert running_stand_ins(state) == STAND_IN_SERVICES


def test_a_watchdog_armed_but_not_recorded_is_found_by_its_marker_and_disarmed(
    context: tuple[RunContext, Path],
) -> None:
    """A signal that lands after the guest started the watchdog but before its PID came back."""
    ctx, state = context
    steps = snapshot_steps(ctx, label="t")
    arm = steps[STEPS.index("arm guest watchdog")]
    real_arm = arm.do
    assert real_arm is not None
    started: list[int] = []

    def arm_then_lose_it() -> None:
        real_arm()
        assert ctx.watchdog is not None
        started.append(ctx.watchdog.pid)
        ctx.watchdog = None  # the PID never reached the run
        raise Interrupted("interrupted by SIGTERM: restoring everything that was changed")

    arm.do = arm_then_lose_it
    result = Engine(window=ctx.window).execute(steps)
    assert result.exit_code == ExitCode.INTERRUPTED
    assert "disarm guest watchdog" in [r.name for r in result.records if r.undo and r.ok]
    assert started and _gone_within(started[0], seconds=5)
    assert running_stand_ins(state) == STAND_IN_SERVICES


# -- plan details ------------------------------------------------------------------------------
# The snapshot plan's unwind order on the real loopback guest: the database is started (and
# answering) before the services that use it, so a web application never starts against a dead
# database. Seen from outside: the processes' start times in /proc.


PID_FILES = {"apache2": Path("/run/apache2/apache2.pid"), "cron": Path("/run/crond.pid")}


def start_ticks(pid: int) -> int:
    """When the process started (clock ticks since boot: /proc/PID/stat field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[19])


def service_started(name: str) -> int:
    return start_ticks(int(PID_FILES[name].read_text().split()[0]))


def test_database_is_started_before_the_services(
    ssh_guest: lab.SshGuest, lab_services: lab.GuestServices, tmp_path: Path, libvirt_node: str
) -> None:
    before = {name: service_started(name) for name in PID_FILES}
    config = guest_config(tmp_path, libvirt_node, ssh_guest.guest_table())
    proc = run_observed("-c", str(config), "snapshot", "web1", "--json", observe=tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    (summary,) = json_lines(proc.stdout)
    assert summary["services_down"] == []
    assert lab_services.all_running()

    database = min(start_ticks(pid) for pid in lab.mysqld_pids())
    for name in PID_FILES:
        started = service_started(name)
        assert started != before[name], f"{name} was not restarted by the run"
        assert started > database, f"{name} was started before the database"


# -- preflight before anything stops -----------------------------------------------------------
# Preflight finds a snapshot name that is already taken before anything in the guest is touched:
# no service is stopped for a snapshot that cannot be created. The real snapshot plan on the step
# engine, libvirt's test driver, and the demo's stand-in services (exec transport).


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


def test_a_failed_snapshot_run_names_no_snapshot_a_good_one_does(
    tmp_path: Path, libvirt_node: str
) -> None:
    flag = tmp_path / "fail-before-hook"
    flag.touch()
    config, state = stand_in_guest(
        tmp_path, libvirt_node, tables={"vms.db1.hooks": {"before": [f"test ! -e {flag}"]}}
    )
    failed = snapcoord("-c", str(config), "snapshot", "db1")
    assert failed.returncode != 0, failed.stdout + failed.stderr
    [line] = [ln for ln in failed.stdout.splitlines() if ln.startswith("db1: snapshot FAILED")]
    assert "snapcoord-" not in line, "it once named the snapshot it never took"
    flag.unlink()
    done = snapcoord("-c", str(config), "snapshot", "db1")
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("db1: snapshot ok")]
    assert ", snapshot snapcoord-" in line
    assert running_stand_ins(state) == STAND_IN_SERVICES

"""The fleet runner's logic with fake jobs: limits, isolation of failures, the exit-code order,
cancellation by a signal (every running VM unwinds, no new one starts), selection, the views.
The same runner against the Proxmox API double through the CLI: tests/test_fleet_cli.py."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from typing import Any

import pytest

from snapcoord import cancel
from snapcoord.config import parse_config
from snapcoord.errors import ExitCode, UsageError
from snapcoord.fleet import SEVERITY, FleetRun, most_severe, summary
from snapcoord.outcome import Outcome
from snapcoord.run import Engine, Reporter, Step
from snapcoord.selection import Selection, select
from snapcoord.views import InOrder, JsonView, LiveView, PlainView, StepLinesView, pick_view


class Recorder:
    """Fake jobs that record how many run at once, in total and per hypervisor."""

    def __init__(self, hypervisor_of: dict[str, str], seconds: float = 0.05) -> None:
        self.hypervisor_of = hypervisor_of
        self.seconds = seconds
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.total = 0
        self.peak = 0
        self.peak_hv: dict[str, int] = {}
        self.order: list[str] = []

    def job(self, key: str, reporter: Reporter) -> Outcome:
        hv = self.hypervisor_of[key]
        with self.lock:
            self.order.append(key)
            self.total += 1
            self.now[hv] = self.now.get(hv, 0) + 1
            self.peak = max(self.peak, self.total)
            self.peak_hv[hv] = max(self.peak_hv.get(hv, 0), self.now[hv])
        time.sleep(self.seconds)
        with self.lock:
            self.total -= 1
            self.now[hv] -= 1
        code = ExitCode.SNAPSHOT_FAILED if key == "bad" else ExitCode.OK
        return Outcome(key, code, {"vm": key, "exit_code": int(code)})


def fleet(keys: list[str], hvs: dict[str, str], limits: dict[str, int], parallel: int) -> FleetRun:
    return FleetRun(keys, hvs, limits, parallel, PlainView(io.StringIO()))


def test_both_limits_hold_at_once_and_are_reached() -> None:
    keys = [f"vm{i:02}" for i in range(24)]
    hvs = {key: "a" if i % 3 else "b" for i, key in enumerate(keys)}
    recorder = Recorder(hvs)
    run = fleet(keys, hvs, {"a": 2, "b": 3}, parallel=4)
    outcomes = run.run(recorder.job)
    assert [o.vm for o in outcomes] == keys and all(o.ok for o in outcomes)
    assert recorder.peak <= 4 and recorder.peak_hv["a"] <= 2 and recorder.peak_hv["b"] <= 3
    # the limits are used, not just respected: both hypervisors ran side by side
    assert recorder.peak == 4 and recorder.peak_hv["a"] == 2
    assert run.peak == recorder.peak and run.peak_per_hypervisor == recorder.peak_hv


def test_a_hypervisor_at_its_limit_does_not_hold_up_another() -> None:
    # all of "a" first in order, limit 1: "b" VMs must start beside it, not after all of "a"
    keys = ["a1", "a2", "a3", "b1", "b2"]
    hvs = {k: k[0] for k in keys}
    recorder = Recorder(hvs, seconds=0.1)
    fleet(keys, hvs, {"a": 1, "b": 4}, parallel=3).run(recorder.job)
    assert recorder.peak_hv == {"a": 1, "b": 2}
    assert recorder.order.index("b1") < recorder.order.index("a2")


def test_one_vm_failing_or_crashing_leaves_the_others_ok() -> None:
    keys = ["good1", "bad", "boom", "good2"]
    hvs = dict.fromkeys(keys, "a")

    def job(key: str, reporter: Reporter) -> Outcome:
        if key == "boom":
            raise RuntimeError("a bug in one job")
        return Recorder(hvs).job(key, reporter)

    outcomes = fleet(keys, hvs, {"a": 4}, parallel=4).run(job)
    codes = {o.vm: o.exit_code for o in outcomes}
    assert codes == {"good1": 0, "bad": 5, "boom": ExitCode.BUG, "good2": 0}
    assert most_severe(list(codes.values())) == ExitCode.BUG


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([0, 0], 0),
        ([0, 75, 2], 75),
        ([0, 3, 4], 4),
        ([4, 5, 75], 5),
        ([5, 130], 130),
        ([130, 1, 5], 1),
        ([1, 6, 130, 0], 6),
        ([0, 42], 1),  # an unknown code is a bug
    ],
)
def test_the_most_severe_code_wins(codes: list[int], expected: int) -> None:
    assert most_severe(codes) == expected
    assert SEVERITY[0] == ExitCode.SERVICE_NOT_RESTORED and SEVERITY[-1] == ExitCode.OK


def test_summary_counts_each_outcome() -> None:
    outcomes = [
        Outcome("a", 0, {}),
        Outcome("b", 0, {}),
        Outcome("c", 5, {}),
        Outcome("d", 75, {}),
    ]
    data = summary(outcomes, command="snapshot", seconds=1.23456)
    assert data == {
        "command": "snapshot",
        "vms": 4,
        "ok": 2,
        "failed": 2,
        "outcomes": {"failed": 1, "locked": 1, "ok": 2},
        "exit_code": 5,
        "seconds": 1.235,
    }


class Guest:
    """What the fake runs change: a service per VM, stopped by a step, started by its undo."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.started_runs: list[str] = []
        self.all_started = threading.Event()


def engine_job(guest: Guest, expect_running: int) -> Any:
    def job(key: str, reporter: Reporter) -> Outcome:
        with guest.lock:
            guest.started_runs.append(key)
            if len(guest.started_runs) == expect_running:
                guest.all_started.set()

        def stop() -> None:
            with guest.lock:
                guest.running.discard(key)

        def start() -> None:
            time.sleep(0.05)  # an undo is never cut short by the cancel
            with guest.lock:
                guest.running.add(key)

        steps = [
            Step("stop service", stop, start, undo_name="start service"),
            Step("long snapshot call", lambda: cancel.sleep(30)),
            Step("never reached", lambda: None),
        ]
        result = Engine(reporter).execute(steps)
        return Outcome(key, result.exit_code, {"records": [r.as_dict() for r in result.records]})

    return job


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unwinds_every_running_vm_and_starts_no_new_one(signum: int) -> None:
    keys = [f"vm{i}" for i in range(6)]
    guest = Guest()
    guest.running.update(keys)
    run = fleet(keys, dict.fromkeys(keys, "a"), {"a": 3}, parallel=3)
    threading.Thread(
        target=lambda: guest.all_started.wait(10) and os.kill(os.getpid(), signum), daemon=True
    ).start()
    outcomes = run.run(engine_job(guest, expect_running=3))
    assert guest.started_runs == keys[:3]  # nothing started after the signal
    assert guest.running == set(keys)  # every service that ran runs again
    assert all(o.exit_code == ExitCode.INTERRUPTED for o in outcomes)
    for outcome in outcomes[:3]:
        names = [(r["name"], r["ok"]) for r in outcome.summary["records"]]
        assert names == [
            ("stop service", True),
            ("long snapshot call", False),
            ("start service", True),
        ]
    assert outcomes[3].errors == [f"vm3: not started: interrupted by {signal.Signals(signum).name}"]
    assert not cancel.requested()  # reset for whatever runs next in this process


def test_one_at_a_time_a_signal_interrupts_the_step_and_stops_the_queue() -> None:
    keys = ["vm0", "vm1", "vm2"]
    guest = Guest()
    guest.running.update(keys)

    def job(key: str, reporter: Reporter) -> Outcome:
        def stop() -> None:
            guest.running.discard(key)
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

        steps = [
            Step("stop service", stop, lambda: guest.running.add(key)),
            Step("long snapshot call", lambda: time.sleep(30)),
        ]
        guest.started_runs.append(key)
        result = Engine(reporter).execute(steps)
        return Outcome(key, result.exit_code, {})

    outcomes = fleet(keys, dict.fromkeys(keys, "a"), {"a": 4}, parallel=1).run(job)
    assert guest.started_runs == ["vm0"] and guest.running == set(keys)
    assert [o.exit_code for o in outcomes] == [130, 130, 130]


def test_cancel_never_interrupts_an_undo() -> None:
    try:
        ran: list[str] = []
        steps = [
            Step(
                "a", lambda: cancel.request("test"), lambda: (cancel.sleep(0.01), ran.append("a"))
            ),
            Step("b", lambda: ran.append("b")),
        ]
        result = Engine().execute(steps)
        assert ran == ["a"]  # b never started; a's undo ran to its end despite the cancel
        assert result.exit_code == ExitCode.INTERRUPTED
        assert [r.name for r in result.records] == ["a", "undo a"]
    finally:
        cancel.reset()


# -- selection --------------------------------------------------------------------------------

CONFIG = parse_config(
    {
        "hypervisors": {"pve": {"type": "libvirt"}, "kvm": {"type": "libvirt"}},
        "vms": {
            "db1": {"hypervisor": "pve", "tags": ["prod", "idoit"]},
            "db2": {"hypervisor": "pve", "tags": ["prod"]},
            "test1": {"hypervisor": "kvm", "tags": ["test"]},
            "web1": {"hypervisor": "kvm"},
        },
    }
)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Selection(all=True), ["db1", "db2", "test1", "web1"]),
        (Selection(tags=("prod",)), ["db1", "db2"]),
        (Selection(tags=("idoit", "test")), ["db1", "test1"]),
        (Selection(hypervisors=("kvm",)), ["test1", "web1"]),
        (Selection(all=True, exclude=("db2", "web1")), ["db1", "test1"]),
        (Selection(names=("web1", "db1")), ["web1", "db1"]),
        (Selection(names=("web1",), tags=("prod",)), ["web1", "db1", "db2"]),
    ],
)
def test_selection(selection: Selection, expected: list[str]) -> None:
    assert select(CONFIG, selection) == expected


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (Selection(), "no VM given: name VMs, or use --all, --tag T or --hypervisor H"),
        (Selection(tags=("prd",)), "no VM has tag 'prd' (tags in use: idoit, prod, test)"),
        (Selection(hypervisors=("esx",)), "no hypervisor 'esx' in <config> (defined: kvm, pve)"),
        (Selection(names=("db9",)), "no VM 'db9' in <config>"),
        (Selection(all=True, exclude=("db9",)), "no VM 'db9' in <config>"),
        (Selection(tags=("test",), exclude=("test1",)), "the selection is empty"),
    ],
)
def test_bad_selections_are_one_clear_error(selection: Selection, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        select(CONFIG, selection)
    assert str(caught.value).startswith(message) and caught.value.exit_code == 2


def test_fleet_is_a_rule_or_several_names() -> None:
    assert not Selection(names=("db1",)).is_fleet
    assert Selection(names=("db1", "db2")).is_fleet
    assert Selection(tags=("prod",)).is_fleet and Selection(all=True).is_fleet


# -- views ------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_views_are_picked_by_mode_and_terminal() -> None:
    assert isinstance(pick_view(json=True, concurrent=True, stream=Terminal()), JsonView)
    assert isinstance(pick_view(json=False, concurrent=False, stream=Terminal()), StepLinesView)
    assert isinstance(pick_view(json=False, concurrent=True, stream=io.StringIO()), PlainView)
    live = pick_view(json=False, concurrent=True, stream=Terminal())
    assert isinstance(live, LiveView)
    live.close()


def test_the_live_view_redraws_running_vms_in_place_and_prints_results_above() -> None:
    screen = Terminal()
    view = LiveView(screen, io.StringIO())
    try:
        from snapcoord.run import StepRecord

        for vm in ("db1", "db2"):
            view.reporter(vm).step_started(StepRecord("take snapshot", time.time()))
        drawn = screen.getvalue()
        assert "  db1: take snapshot ... 0 s\n" in drawn and "  db2: take snapshot" in drawn
        view.finished(Outcome("db1", 0, {}, ["db1: snapshot ok, snapshot x"]))
        after = screen.getvalue()[len(drawn) :]
        # the two-line block is erased (cursor up 2, clear to end), the result printed, and
        # only db2 drawn again
        assert after.startswith("\x1b[2F\x1b[J" + "db1: snapshot ok, snapshot x\n")
        assert "db2: take snapshot" in after and "db1: take" not in after
    finally:
        view.close()
    assert screen.getvalue().endswith("\x1b[1F\x1b[J")  # the block is gone at the end


def test_plain_lines_are_whole_lines_per_step() -> None:
    out = io.StringIO()
    view = PlainView(out, io.StringIO())
    from snapcoord.run import StepRecord

    record = StepRecord("find VM", 100.0, ended=100.25, ok=True)
    reporter = view.reporter("db1")
    reporter.step_started(record)
    reporter.step_ended(record)
    reporter.note("a note")
    assert out.getvalue() == "db1: -> find VM ok (0.25 s)\ndb1: a note\n"


def test_in_order_shows_results_in_the_selections_order_whatever_finished_first() -> None:
    """status and prune: the same lines in the same order every run. Three VMs in parallel
    finish in the reverse order (each waits for the one after it): shown a, b, c all the same."""
    out = io.StringIO()
    keys = ["a", "b", "c"]
    view = InOrder(PlainView(out), keys)
    finished = {key: threading.Event() for key in keys}

    def job(key: str, reporter: Reporter) -> Outcome:
        after = keys.index(key) + 1
        if after < len(keys):
            assert finished[keys[after]].wait(10), "the VM after it never finished"
        finished[key].set()
        return Outcome(key, ExitCode.OK, {"vm": key, "ok": True}, [f"{key}: ok"])

    run = FleetRun(keys, dict.fromkeys(keys, "hv"), {"hv": 3}, 3, view)
    outcomes = run.run(job)
    view.close()
    assert [o.vm for o in outcomes] == keys
    assert out.getvalue().splitlines() == ["a: ok", "b: ok", "c: ok"]

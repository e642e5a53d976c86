"""The fault matrix of issue 9: one fault at one position of a real snapshot run, for every
applicable (position, fault) cell, against the loopback guest's real MariaDB, Apache and cron.

snapcoord reaches the guest's sshd through the tests' own TCP proxy (tests/faultproxy.py), which
cuts, refuses or stalls connections on demand; ``python -m tests.fault_runner`` (a child process)
fires the fault at its position: on a step of the run, inside the hypervisor call, or as a
signal to itself. Every cell is judged by STATE, not by messages: the services that ran are
running again (when snapcoord exits, or within ``watchdog_seconds`` + 5 s of arming for the
faults only the guest watchdog can repair), the exit code is the documented one, ``ok`` is never
true for a failed run, the journal is cleared or kept as documented (a kept journal must heal on
the next run), and no watchdog of the run is left once the services run.

:data:`CONTRACT` is the one table of what each cell must do; docs/reliability.md is rendered from
it and the observed results (:func:`render_reliability`): ``SNAPCOORD_WRITE_DOCS=1`` writes it,
otherwise the last test asserts that the committed file is what this run produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import lab
from tests.cli_helpers import REPO, json_lines, without_stamp, write_config
from tests.fault_runner import (
    CONTROL_ENV,
    FAULT_ENV,
    FAULTS,
    LOG_ENV,
    POSITIONS,
    REFUSE_ENV,
    SNAPSHOT_PAUSE,
    STALL_ENV,
    applicable,
    read_log,
)
from tests.faultproxy import FaultProxy, known_hosts_for
from tests.guest_fixtures import (
    OBSERVE_ENV,
    VM_NAME,
    lab_services,  # noqa: F401 - fixture
    watchdog_pids,
)
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

pytestmark = pytest.mark.real

# -- the cells' configuration -----------------------------------------------------------------

#: Short enough for the matrix to run in about a quarter of an hour, long enough for a whole
#: run plus one stalled command and its retry: a stall in the unwind starts about 7.5 s after
#: arming (stops 3.2 s, frozen hook 3 s, database start 1.1 s), the command times out 6 s later,
#: the retry succeeds when the stall ends (8 s), by about 17 s; the reconnect budget ends
#: 10 s before the watchdog fires (snapcoord.reconnect.WATCHDOG_MARGIN), at 20 s.
WATCHDOG_SECONDS = 30
#: command, stop, start, dump and hook timeouts: short, so that a stall outlasts them.
TIMEOUT = 6.0
#: ``hang``: the proxy forwards nothing for this long (longer than TIMEOUT).
STALL_SECONDS = 8.0
#: ``unreachable``: new connections are refused for this long (longer than the watchdog).
REFUSE_SECONDS = WATCHDOG_SECONDS + 8
#: The watchdog must have everything running again within watchdog_seconds + this.
WATCHDOG_SLACK = 5.0
#: How long the docs test waits for cells that run on other workers.
RESULTS_WAIT = 1800.0
#: A run that takes longer than this is killed (by PID) and the cell fails.
CHILD_TIMEOUT = 240.0
FROZEN_HOOK = "sleep 3"

#: Steps that stop a service: a run that started one has a service window.
STOP_STEPS = frozenset({"stop services", "stop database"})

DOC = REPO / "docs" / "reliability.md"
WRITE_DOCS_ENV = "SNAPCOORD_WRITE_DOCS"

# -- the contract -----------------------------------------------------------------------------

CLEARED, KEPT = "cleared", "kept"
AT_EXIT, BY_WATCHDOG = "at exit", "by the watchdog"
KILLED = -9  # the process died of SIGKILL: no exit code, no output


@dataclass(frozen=True)
class Expect:
    exit: int  # docs/exit-codes.md; KILLED for SIGKILL
    journal: str  # CLEARED or KEPT (then the next run must heal it)
    restored: str  # AT_EXIT: all running when snapcoord exits; BY_WATCHDOG: within wd + 5 s

    @property
    def exit_text(self) -> str:
        return "killed (-9)" if self.exit == KILLED else str(self.exit)


OK0 = Expect(0, CLEARED, AT_EXIT)
GUEST4 = Expect(4, CLEARED, AT_EXIT)
SNAP5 = Expect(5, CLEARED, AT_EXIT)
DOWN6 = Expect(6, KEPT, BY_WATCHDOG)
INT130 = Expect(130, CLEARED, AT_EXIT)
DEAD = Expect(KILLED, KEPT, BY_WATCHDOG)

#: The ONE table: what every (position, fault) cell must do; None = not applicable.
FAULT_COLUMNS = ("drop", "unreachable", "sigterm", "sigkill", "hypervisor_error", "hang")
CONTRACT: dict[str, tuple[Expect | None, ...]] = {
    # position               drop    unreachable sigterm  sigkill hypervisor_error hang
    "after_arm":             (GUEST4, DOWN6,     INT130,  DEAD,   None,            GUEST4),
    "during_service_stops":  (GUEST4, DOWN6,     INT130,  DEAD,   None,            GUEST4),
    "during_dump":           (GUEST4, DOWN6,     INT130,  DEAD,   None,            GUEST4),
    "after_database_stop":   (GUEST4, DOWN6,     INT130,  DEAD,   None,            GUEST4),
    "during_frozen_hook":    (GUEST4, DOWN6,     INT130,  DEAD,   None,            GUEST4),
    "during_snapshot":       (OK0,    DOWN6,     INT130,  DEAD,   SNAP5,           OK0),
    "during_database_start": (OK0,    DOWN6,     OK0,     DEAD,   None,            OK0),
    "during_service_starts": (OK0,    DOWN6,     OK0,     DEAD,   None,            OK0),
}  # fmt: skip

#: Why each row of the contract is what it is (rendered into the docs).
RATIONALE: dict[str, str] = {
    "drop": "The connection is cut and new ones connect at once: the step in flight fails "
    "(exit 4; at `during_snapshot` no SSH is in flight, so the snapshot stands: exit 0), and "
    "the unwind reconnects and retries, so everything runs when snapcoord exits.",
    "unreachable": "Every connection is cut and new ones are refused for longer than the "
    "watchdog: snapcoord cannot confirm the services (exit 6, `window_seconds` null, "
    "`services_down` non-empty) and leaves the watchdog armed; it restores them within "
    "`watchdog_seconds` + 5 s. The journal stays and the next run heals it.",
    "sigterm": "Before the snapshot, SIGTERM interrupts the run and everything is unwound "
    "(exit 130); during the unwind it is noted and the unwind finishes (exit 0).",
    "sigkill": "snapcoord dies on the spot: the guest watchdog restores everything within "
    "`watchdog_seconds` + 5 s; the journal stays and the next run heals it.",
    "hypervisor_error": "Only the hypervisor call can fail this way: exit 5, services restored.",
    "hang": "Nothing is forwarded for longer than the command's timeout: the command in flight "
    "times out (exit 4); at `during_snapshot` and in the unwind the commands reconnect and "
    "retry after the stall (exit 0).",
}


def contract(position: str, fault: str) -> Expect | None:
    return CONTRACT[position][FAULT_COLUMNS.index(fault)]


CELLS: list[tuple[str, str]] = [
    (position, fault)
    for position in POSITIONS
    for fault in FAULT_COLUMNS
    if contract(position, fault) is not None
]


def test_the_contract_covers_every_position_and_fault() -> None:
    assert list(CONTRACT) == list(POSITIONS)
    assert set(FAULT_COLUMNS) == set(FAULTS)
    for position in POSITIONS:
        for fault in FAULT_COLUMNS:
            assert (contract(position, fault) is not None) == applicable(position, fault)
    assert len(CELLS) >= 40


# -- observing a cell -------------------------------------------------------------------------


@dataclass
class Observation:
    """What one cell did. Only deterministic fields go into the docs (no timings)."""

    exit: int | None = None
    journal: str = "?"
    services: str = "?"
    fault: str = "?"
    next_run: str = "-"
    flags: list[str] = field(default_factory=list)  # deterministic short tags of problems
    problems: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # timings etc.: for the report only

    @property
    def verdict(self) -> str:
        return "PASS" if not self.problems else "FAIL"

    def summary(self) -> str:
        if self.exit is None:
            exit_text = "no exit"
        elif self.exit == KILLED:
            exit_text = "killed (-9)"
        else:
            exit_text = f"exit {self.exit}"
        parts = [exit_text, f"journal {self.journal}", self.services]
        if self.next_run != "-":
            parts.append(f"next run {self.next_run}")
        if self.fault != "hit":
            parts.append(f"fault {self.fault}")
        return ", ".join(parts + self.flags)


#: (position, fault) -> what the cell observed; rendered into docs/reliability.md.
RESULTS: dict[tuple[str, str], Observation] = {}


def results_dir(factory: pytest.TempPathFactory) -> Path:
    """Where every cell leaves its observation: shared by all workers of the session (an xdist
    worker's base directory lies in the session's), so the docs test sees every cell wherever
    it ran."""
    base = factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "fault-matrix-results"
    path.mkdir(exist_ok=True)
    return path


def _result_file(folder: Path, cell: tuple[str, str]) -> Path:
    return folder / f"{cell[0]}--{cell[1]}.json"


def save_result(folder: Path, cell: tuple[str, str], obs: Observation) -> None:
    tmp = _result_file(folder, cell).with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(obs)))
    tmp.replace(_result_file(folder, cell))


def load_result(folder: Path, cell: tuple[str, str]) -> Observation | None:
    try:
        return Observation(**json.loads(_result_file(folder, cell).read_text()))
    except FileNotFoundError:
        return None


class ServiceMonitor:
    """Samples the guest's services from outside, in a thread, while a cell runs."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[str, bool]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="service-monitor")

    def start(self) -> ServiceMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            states = {name: lab.service_running(name) for name in lab.LAB_SERVICES}
            self.samples.append((time.time(), states))
            self._stop.wait(self.interval)

    def last_down(self) -> tuple[float, list[str]] | None:
        """(time, names) of the last sample in which something was down."""
        for when, states in reversed(self.samples):
            down = [n for n, up in states.items() if not up]
            if down:
                return when, down
        return None

    def up_after(self, when: float) -> float | None:
        """Time of the first all-running sample after ``when``."""
        for at, states in self.samples:
            if at > when and all(states.values()):
                return at
        return None


@dataclass
class Child:
    returncode: int | None
    stdout: str
    stderr: str
    ended: float  # epoch
    seconds: float

    @property
    def summaries(self) -> list[dict[str, Any]]:
        return json_lines(self.stdout)


def run_child(
    tmp: Path, name: str, config: Path, env: dict[str, str], *, timeout: float = CHILD_TIMEOUT
) -> Child:
    """``python -m tests.fault_runner -c CONFIG snapshot web1 --json`` in a child process."""
    out, err = tmp / f"{name}.stdout", tmp / f"{name}.stderr"
    argv = [sys.executable, "-m", "tests.fault_runner", "-c", str(config)]
    argv += ["snapshot", VM_NAME, "--json"]
    started = time.monotonic()
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=REPO)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            lab.stop_pid(proc.pid, proc)
            returncode = None
        else:
            returncode = proc.returncode
    return Child(
        returncode, out.read_text(), err.read_text(), time.time(), time.monotonic() - started
    )


def _poll(predicate: Any, until: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it holds or the epoch time ``until`` passed (checked once)."""
    while True:
        if predicate():
            return True
        if time.time() >= until:
            return False
        time.sleep(interval)


def _down(states: dict[str, bool]) -> list[str]:
    return [name for name, up in states.items() if not up]


def _kill_watchdogs(run: str) -> list[int]:
    """End the leftover watchdog of this cell's run (a process group our run started), by PID."""
    pids = watchdog_pids(run)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    return pids


class CellRun:
    """Runs one cell and checks it; every deviation from the contract becomes a problem."""

    def __init__(
        self,
        position: str,
        fault: str,
        expect: Expect,
        guest: lab.SshGuest,
        services: lab.GuestServices,
        tmp: Path,
        uri: str,
    ) -> None:
        self.position, self.fault, self.expect = position, fault, expect
        self.guest, self.services, self.tmp, self.uri = guest, services, tmp, uri
        self.obs = Observation()
        self.log = tmp / "fault.jsonl"
        self.journal = tmp / "store" / "journal" / f"{VM_NAME}.json"
        self.run_id: str | None = None
        self.armed_at: float | None = None
        self.summary: dict[str, Any] | None = None  # the run's --json object

    def problem(self, text: str, flag: str | None = None) -> None:
        """A deviation from the contract; ``flag`` names it in the docs' observed column."""
        self.obs.problems.append(text)
        if flag and flag not in self.obs.flags:
            self.obs.flags.append(flag)

    # -- the run ---------------------------------------------------------------------------
    def execute(self) -> Observation:
        proxy = FaultProxy((self.guest.host, self.guest.port)).start()
        monitor = ServiceMonitor()
        if self.expect.restored == BY_WATCHDOG:  # only there is the moment of recovery asked
            monitor.start()
        try:
            config = self._config(proxy)
            env = {
                **os.environ,
                FAULT_ENV: f"{self.position}:{self.fault}",
                CONTROL_ENV: str(proxy.control_path),
                LOG_ENV: str(self.log),
                REFUSE_ENV: str(REFUSE_SECONDS),
                STALL_ENV: str(STALL_SECONDS),
                OBSERVE_ENV: str(self.tmp / "observe.jsonl"),
            }
            child = run_child(self.tmp, "run", config, env)
            at_exit = self.services.states()
            self.obs.details.append(f"run {child.seconds:.1f} s")
            events = read_log(self.log)
            self._check_fault(events)
            self._check_exit(child)
            self._check_services(at_exit, monitor)
            self._check_journal()
            self._check_watchdog()
            if self.expect.journal == KEPT and self.journal.exists():
                self._check_next_run(proxy, env)
            return self.obs
        finally:
            monitor.stop()
            proxy.stop()  # ends whatever SSH connections a killed run left behind
            for event in read_log(self.log) + read_log(self.tmp / "next.jsonl"):
                if event["event"] == "ssh_dir":  # what a killed run could not remove
                    shutil.rmtree(event["path"], ignore_errors=True)
            if self.run_id:
                killed = _kill_watchdogs(self.run_id)
                if killed:
                    self.obs.details.append(f"killed the run's leftover watchdog {killed}")

    def _config(self, proxy: FaultProxy) -> Path:
        known = known_hosts_for(
            self.guest.workdir / "host_ed25519.pub", proxy.port, self.tmp / "known_hosts.proxy"
        )
        table = self.guest.guest_table(
            port=proxy.port,
            known_hosts=str(known),
            services=["apache2", "cron"],
            database="auto",
            watchdog_seconds=WATCHDOG_SECONDS,
            connect_timeout=5.0,
            command_timeout=TIMEOUT,
            stop_timeout=TIMEOUT,
            start_timeout=TIMEOUT,
            dump_timeout=TIMEOUT,
            dump=self.position == "during_dump",
        )
        tables: dict[str, dict[str, Any]] = {
            "defaults": {"store": str(self.tmp / "store"), "label": "test"},
            "hypervisors.lab": {"type": "libvirt", "uri": self.uri},
            f"vms.{VM_NAME}": {"hypervisor": "lab"},
            f"vms.{VM_NAME}.guest": table,
        }
        # The next run is a plain nightly run: same VM, store and journal, no slow hook.
        write_config(self.tmp / "next.toml", tables)
        hooks = {"frozen": [FROZEN_HOOK], "timeout": TIMEOUT}
        return write_config(self.tmp / "cell.toml", {**tables, f"vms.{VM_NAME}.hooks": hooks})

    # -- checks ----------------------------------------------------------------------------
    def _check_fault(self, events: list[dict[str, Any]]) -> None:
        armed = [e for e in events if e["event"] == "watchdog_armed"]
        if armed:
            self.armed_at = float(armed[0]["t"])
            self.run_id = str(armed[0]["marker"]).removeprefix("snapcoord-watchdog-")
        else:  # hooks.guest.watchdog.arm was not seen (renamed?): fall back on the arm step
            ended = [
                e
                for e in events
                if e["event"] == "step"
                and e["phase"] == "ended"
                and e["name"] == POSITIONS["after_arm"].step
                and e.get("ok")
            ]
            if ended:
                self.armed_at = float(ended[0]["t"])
        fired = [e for e in events if e["event"] == "fault"]
        errors = [e["error"] for e in events if e["event"] == "fault_error"]
        if not fired:
            self.obs.fault = "never fired"
            self.problem(f"the fault never fired: step {POSITIONS[self.position].step!r} not seen")
        elif not fired[0]["hit"]:
            self.obs.fault = "missed"
            self.problem(
                f"the fault missed its position: it fired during {fired[0]['running_step']!r}"
            )
        elif errors:
            self.obs.fault = "failed"
            self.problem(f"injecting the fault failed: {errors[0]}")
        else:
            self.obs.fault = "hit"

    def _check_exit(self, child: Child) -> None:
        self.obs.exit = child.returncode
        expected = self.expect.exit
        if child.returncode is None:
            self.problem(f"snapcoord did not exit within {CHILD_TIMEOUT:g} s (killed)")
            return
        if child.returncode != expected:
            self.problem(
                f"exit {child.returncode}, expected {self.expect.exit_text}"
                + (f" ({_first_error(child)})" if child.returncode != KILLED else "")
            )
        if "Traceback" in child.stderr:
            self.problem("a traceback on stderr", "traceback")
        if child.returncode == KILLED:
            return
        summaries = child.summaries
        if len(summaries) != 1:
            self.problem(f"{len(summaries)} JSON summaries on stdout, expected 1", "no JSON")
            return
        self.summary = summaries[0]
        self.run_id = self.run_id or summaries[0].get("run")
        self._check_summary(summaries[0], child.returncode, run="the run")
        if self.fault == "unreachable":
            if summaries[0].get("window_seconds") is not None:
                self.problem(
                    f"window_seconds is {summaries[0]['window_seconds']}, expected null: "
                    "services could not be confirmed",
                    "window not null",
                )
            if not summaries[0].get("services_down"):
                self.problem(
                    "services_down is empty although the guest was unreachable",
                    "services_down empty",
                )

    def _check_summary(self, summary: dict[str, Any], returncode: int, *, run: str) -> None:
        if summary.get("exit_code") != returncode:
            self.problem(
                f"{run}: JSON exit_code {summary.get('exit_code')} != {returncode}",
                "JSON exit_code differs",
            )
        if returncode != 0 and summary.get("ok"):
            self.problem(f"{run}: ok is true although it exited {returncode}", "ok true")
        window, down = summary.get("window_seconds"), summary.get("services_down")
        # null exactly when something is down; or when nothing was ever stopped (no window)
        stopped = any(s["name"] in STOP_STEPS and not s["undo"] for s in summary.get("steps", []))
        if (window is None) != bool(down) and (window is not None or stopped):
            self.problem(
                f"{run}: window_seconds {window} with services_down {down} "
                "(null exactly when something is down)",
                "window/services_down inconsistent",
            )

    def _check_services(self, at_exit: dict[str, bool], monitor: ServiceMonitor) -> None:
        if self.expect.restored == AT_EXIT:
            down = _down(at_exit)
            if down:
                self.problem(f"still down when snapcoord exited: {', '.join(down)}")
                self.obs.services = "DOWN at exit: " + ", ".join(down)
            else:
                self.obs.services = "all running at exit"
            reported = set(self.summary.get("services_down") or []) if self.summary else set()
            if self.summary is not None and not set(down) <= reported:
                self.problem(
                    f"an honest window: {', '.join(down)} down at exit, but the JSON says "
                    f"services_down {sorted(reported)}, window_seconds "
                    f"{self.summary.get('window_seconds')}",
                    "services_down hides a down service",
                )
            return
        if self.armed_at is None:
            self.problem("the watchdog was never armed")
            self.obs.services = "watchdog never armed"
            return
        deadline = self.armed_at + WATCHDOG_SECONDS + WATCHDOG_SLACK
        _poll(self.services.all_running, deadline)
        time.sleep(monitor.interval * 2)  # one more sample
        states = self.services.states()
        last_down = monitor.last_down()
        recovered = monitor.up_after(last_down[0]) if last_down else None
        down = _down(states)
        if down:
            self.problem(
                f"{', '.join(down)} still down {time.time() - self.armed_at:.1f} s after the "
                f"watchdog was armed (deadline {WATCHDOG_SECONDS:g} + {WATCHDOG_SLACK:g} s)"
            )
            self.obs.services = "DOWN: " + ", ".join(down)
            return
        if last_down and recovered is not None:
            after = recovered - self.armed_at
            self.obs.details.append(f"all running {after:.1f} s after arming")
            # one sampling interval of tolerance: the sample may lag the moment
            if after > WATCHDOG_SECONDS + WATCHDOG_SLACK + monitor.interval + 0.5:
                self.problem(
                    f"{', '.join(last_down[1])} ran again only {after:.1f} s after the watchdog "
                    f"was armed (at most {WATCHDOG_SECONDS:g} + {WATCHDOG_SLACK:g} s)"
                )
                self.obs.services = "running too late"
                return
        self.obs.services = f"all running within {WATCHDOG_SECONDS} + {WATCHDOG_SLACK:g} s"

    def _check_journal(self) -> None:
        self.obs.journal = KEPT if self.journal.exists() else CLEARED
        if self.run_id is None and self.journal.exists():
            with contextlib.suppress(ValueError, OSError):
                self.run_id = json.loads(self.journal.read_text()).get("run")
        if self.obs.journal != self.expect.journal:
            self.problem(f"journal {self.obs.journal}, expected {self.expect.journal}")

    def _check_watchdog(self) -> None:
        if self.run_id is None:
            return
        if self.expect.restored == BY_WATCHDOG:
            assert self.armed_at is not None
            until = self.armed_at + WATCHDOG_SECONDS + WATCHDOG_SLACK + 5
        else:
            until = time.time()  # the run ended and everything runs: disarmed already
        if not _poll(lambda: not watchdog_pids(str(self.run_id)), until):
            self.problem(
                "the run's watchdog is still in the guest although the services run"
                + (" (the run ended)" if self.expect.restored == AT_EXIT else ""),
                "watchdog left armed",
            )

    def _check_next_run(self, proxy: FaultProxy, env: dict[str, str]) -> None:
        """A kept journal heals itself: the next fault-free run clears it and succeeds."""
        proxy.resume()  # the guest is reachable again
        if not self.services.all_running():
            self.obs.next_run = "not tried"
            return
        env = {k: v for k, v in env.items() if k != FAULT_ENV}
        env[LOG_ENV] = str(self.tmp / "next.jsonl")
        child = run_child(self.tmp, "next", self.tmp / "next.toml", env)
        summaries = child.summaries
        self.obs.next_run = "ok" if child.returncode == 0 else f"exit {child.returncode}"
        if child.returncode != 0:
            self.problem(
                f"the next run exited {child.returncode} instead of healing the journal "
                f"({_first_error(child)})" + child.stderr[-3000:]
            )
        if len(summaries) == 1:
            self._check_summary(summaries[0], child.returncode or 0, run="the next run")
            said = " ".join([*summaries[0].get("notes", []), child.stderr])
            if child.returncode == 0 and self.run_id and self.run_id not in said:
                self.problem(f"the next run did not note that it cleared run {self.run_id}")
                self.obs.next_run = "ok without a note"
        else:
            self.problem(f"the next run printed {len(summaries)} JSON summaries", "no JSON")
        if self.journal.exists():
            self.problem("the next run left the journal in place", "journal not healed")
        down = _down(self.services.states())
        if down:
            self.problem(f"after the next run: {', '.join(down)} down", "down after next run")


def _first_error(child: Child) -> str:
    for line in child.stderr.splitlines():
        line = without_stamp(line)
        if line.startswith("snapcoord: error:"):
            text = line.removeprefix("snapcoord: error:").strip()
            return text if len(text) <= 160 else text[:157] + "..."
    return "no error line"


# -- the matrix -------------------------------------------------------------------------------


def setup_failed(item: pytest.Item) -> None:
    """Called by tests/conftest.py when a test of this module fails in setup: a cell that
    could not run still leaves its observation, so the docs test does not wait for it."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or getattr(item, "originalname", "") != "test_fault_cell":
        return
    cell = (callspec.params["position"], callspec.params["fault"])
    obs = Observation(problems=["the cell did not run: one of its fixtures failed"])
    save_result(results_dir(item.config._tmp_path_factory), cell, obs)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("position", "fault"), CELLS, ids=[f"{p}-{f}" for p, f in CELLS])
def test_fault_cell(
    position: str,
    fault: str,
    request: pytest.FixtureRequest,
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    libvirt_node: str,
) -> None:
    expect = contract(position, fault)
    assert expect is not None
    if position == "during_dump":
        request.getfixturevalue("idoit_db")  # a dump with data to take
    cell = CellRun(position, fault, expect, ssh_guest, lab_services, tmp_path, libvirt_node)
    try:
        obs = cell.execute()
    except BaseException as exc:
        cell.problem(f"the cell itself failed: {type(exc).__name__}: {exc}")
        obs = cell.obs
        raise
    finally:
        RESULTS[(position, fault)] = cell.obs
        save_result(results_dir(tmp_path_factory), (position, fault), cell.obs)
    if obs.problems:
        pytest.fail(
            f"{position} x {fault}: " + "; ".join(obs.problems) + f" [{', '.join(obs.details)}]",
            pytrace=False,
        )


# -- docs/reliability.md ----------------------------------------------------------------------


def render_reliability(results: dict[tuple[str, str], Observation]) -> str:
    """docs/reliability.md from the contract and the observed cells (no timings)."""
    lines = [
        "# Reliability: the fault matrix",
        "",
        "<!-- generated by tests/test_fault_matrix.py (render_reliability); do not edit: run "
        f"`{WRITE_DOCS_ENV}=1 pytest tests/test_fault_matrix.py` -->",
        "",
        "snapcoord promises that every service it stopped comes back, whatever fails. This page "
        "is rendered from the fault-matrix test run, so it cannot drift from the tests: every "
        "cell injects ONE fault at ONE position of a real `snapcoord snapshot --json` run "
        "against the loopback guest (real sshd, MariaDB, Apache, cron; libvirt's test driver "
        "as the hypervisor) and is judged by the state it leaves, not by its messages.",
        "",
        "## How faults are injected",
        "",
        "snapcoord reaches the guest's sshd through a TCP proxy of the tests' own "
        "(`tests/faultproxy.py`, 127.0.0.1 only; the host key is verified for the proxy's "
        "address). It can **cut** every connection (new ones connect at once), **refuse** "
        "(cut, then reset every new connection right after accepting it, for N seconds) and "
        "**stall** (forward no byte in either direction, on open and new connections, for N "
        "seconds). `python -m tests.fault_runner` runs snapcoord "
        "and fires the fault at its position, through the proxy's control socket or as a "
        "signal to its own process; it logs when the fault fired and during which step, and "
        "a cell whose fault did not hit its position fails.",
        "",
        "| position | where the fault fires |",
        "|---|---|",
        *(f"| `{name}` | {pos.doc} |" for name, pos in POSITIONS.items()),
        "",
        "| fault | how |",
        "|---|---|",
        *(f"| `{name}` | {FAULTS[name]} |" for name in FAULT_COLUMNS),
        "",
        f"Every cell's guest: services apache2 and cron, database `auto` (MariaDB), "
        f"`watchdog_seconds = {WATCHDOG_SECONDS}`, command/stop/start/dump/hook timeouts "
        f"{TIMEOUT:g} s, a `frozen` hook `{FROZEN_HOOK}`, mysqldump only at `during_dump`. "
        f"`hang` stalls for {STALL_SECONDS:g} s; `unreachable` refuses for "
        f"`watchdog_seconds` + {REFUSE_SECONDS - WATCHDOG_SECONDS} s; `during_snapshot` "
        f"waits {SNAPSHOT_PAUSE:g} s inside `create_snapshot` after firing.",
        "",
        "## The contract",
        "",
        "Exit codes as in [exit-codes.md](exit-codes.md); `killed (-9)`: snapcoord died of "
        "SIGKILL. For every cell:",
        "",
        "- every service that was running (mariadb, apache2, cron) runs again: when snapcoord "
        "exits, or — where only the guest watchdog can do it — within `watchdog_seconds` + "
        f"{WATCHDOG_SLACK:g} s of arming it;",
        "- the exit code is the one below, and `ok` is false whenever it is not 0; "
        "`window_seconds` is null exactly when `services_down` is not empty;",
        "- the run journal is cleared, or kept where services could not be confirmed; a kept "
        "journal heals itself: the next run finds everything running and the old watchdog "
        "gone, clears it with a note, and succeeds;",
        "- no watchdog process of the run is left in the guest once the services run.",
        "",
        *(f"- **{fault}**: {RATIONALE[fault]}" for fault in FAULT_COLUMNS),
        "",
        "| position | " + " | ".join(f"`{f}`" for f in FAULT_COLUMNS) + " |",
        "|---|" + "---|" * len(FAULT_COLUMNS),
    ]
    for position in POSITIONS:
        row = []
        for fault in FAULT_COLUMNS:
            expect = contract(position, fault)
            if expect is None:
                row.append("n/a")
                continue
            obs = results.get((position, fault))
            verdict = obs.verdict if obs else "not run"
            row.append(f"{expect.exit_text}: {verdict}")
        lines.append(f"| `{position}` | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Every cell",
        "",
        "| position | fault | expected exit | journal | services restored | observed | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for position in POSITIONS:
        for fault in FAULT_COLUMNS:
            expect = contract(position, fault)
            if expect is None:
                lines.append(f"| `{position}` | `{fault}` | n/a | | | not applicable | |")
                continue
            obs = results.get((position, fault))
            observed = obs.summary() if obs else "not run"
            verdict = obs.verdict if obs else ""
            lines.append(
                f"| `{position}` | `{fault}` | {expect.exit_text} | {expect.journal} | "
                f"{expect.restored} | {observed} | {verdict} |"
            )
    passed = sum(1 for o in results.values() if not o.problems)
    lines += ["", f"{passed} of {len(CELLS)} cells pass.", "", *two_coordinators_section(), ""]
    return "\n".join(lines)


#: The rows for two coordinators against one guest: each a test of tests/test_guest_lease.py.
TWO_COORDINATORS = (
    ("the first holds the guest (`freeze`)", "the second's snapshot and revert",
     "exit 75 naming the holder (host, PID, run, command) and since when; no service touched, "
     "no revert call; the first's own second run meets its VM lock as before",
     "test_a_second_coordinator_is_refused_while_the_first_holds_the_guest"),
    ("the first is killed (SIGKILL) inside its window", "the second's snapshot",
     "exit 75 while the dead run's lease lasts; the lease ends no later than the dead run's "
     "watchdog fires (guest clock); then the second runs and notes the expired lease it took",
     "test_a_killed_coordinators_lease_ends_no_later_than_its_watchdog"),
    ("the lease file is corrupt or hostile", "any run",
     "exit 4, one line naming the file and the problem; nothing stopped, the file left as is",
     "test_a_corrupt_lease_file_is_one_line_and_nothing_is_stopped"),
    ("the lease directory was planted by another user (owner, mode, link)", "any run",
     "exit 4, one line; nothing written through it, nothing stopped",
     "test_a_lease_directory_planted_by_another_user_is_refused"),
    ("another run's watchdog and lock session live in the guest", "our recover and revert",
     "they end only their own runs' processes (the journal's run; the snapshot's run and the "
     "lease its memory held); the other run's survive",
     "test_recover_and_revert_end_only_their_own_runs_processes"),
)  # fmt: skip


def two_coordinators_section() -> list[str]:
    """The section of docs/reliability.md for two coordinators against one guest (lease.md)."""
    return [
        "## Two coordinators, one guest",
        "",
        "Two coordinators — two configurations with stores of their own, so neither sees the "
        "other's VM lock — against one loopback guest ([lease.md](lease.md)); "
        "`tests/test_guest_lease.py`:",
        "",
        "| situation | run | what happens | test |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | `{d}` |" for a, b, c, d in TWO_COORDINATORS),
    ]


def test_reliability_docs_are_the_matrix_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Runs after every cell: the cells may run on other workers, so it waits (bounded) until
    each one has left its observation in the session's shared folder. Every cell before this
    test on this worker has run already, and the others' workers go on by themselves."""
    selected = {
        (item.callspec.params["position"], item.callspec.params["fault"])
        for item in request.session.items
        if item.originalname == "test_fault_cell" and hasattr(item, "callspec")
    }
    missing = [cell for cell in CELLS if cell not in selected]
    if missing:
        pytest.skip(f"only {len(CELLS) - len(missing)} of {len(CELLS)} cells ran: no comparison")
    folder = results_dir(tmp_path_factory)
    deadline = time.monotonic() + RESULTS_WAIT
    while True:
        found = {cell: load_result(folder, cell) for cell in CELLS}
        if all(found.values()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    absent = [f"{p} x {f}" for (p, f), obs in found.items() if obs is None]
    assert not absent, f"no result after {RESULTS_WAIT:g} s from: {', '.join(absent)}"
    RESULTS.update({cell: obs for cell, obs in found.items() if obs is not None})
    text = render_reliability(RESULTS)
    if os.environ.get(WRITE_DOCS_ENV) == "1":
        DOC.write_text(text)
        return
    committed = DOC.read_text() if DOC.exists() else ""
    assert committed == text, (
        f"{DOC.relative_to(REPO)} differs from this run's matrix: "
        f"run `{WRITE_DOCS_ENV}=1 pytest tests/test_fault_matrix.py` and commit it"
    )

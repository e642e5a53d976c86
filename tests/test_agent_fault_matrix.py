"""The agent rows of the fault matrix (issue 26): one fault at one position of a real
``snapcoord snapshot --json`` run with ``transport = "agent"``, through the Proxmox VE API double
whose agent endpoints forward to a real qemu-ga in the lab guest (tests/qga_fixture.py), which
runs the lab's real MariaDB, Apache and cron. No SSH is configured.

A sibling of tests/test_fault_matrix.py rather than more columns of it: that matrix's table,
runner and configuration are SSH's (a TCP proxy in front of sshd, libvirt's test driver), and
its faults (``drop``, ``hang``...) are not the agent's. What is the same is reused as it is: the
positions and the injector (tests/agent_fault_runner.py subclasses tests/fault_runner.py's), the
observation and every state check (:class:`AgentCellRun` subclasses
:class:`tests.test_fault_matrix.CellRun`), the results shared across xdist workers. The faults
are real events made by the test's process, which owns qemu-ga and the API double, when the
runner asks for them on :class:`FaultControl`'s socket:

* ``agent_restart``: qemu-ga killed and started again at once;
* ``agent_hang``: qemu-ga SIGSTOPped for :data:`HANG_SECONDS` (past the command timeout);
* ``agent_gone``: qemu-ga SIGSTOPped past the watchdog (continued before the next run);
* ``api_down``: the API, reached through tests/faultproxy.py, resets every connection and
  refuses new ones for :data:`API_DOWN_SECONDS` (past the command timeout);
* ``sigkill``: snapcoord kills itself.

:data:`CONTRACT` is what every cell must do; the "agent transport" section of
docs/reliability.md is rendered from it and the observed cells, and the last test checks that
the committed section is this run's (``SNAPCOORD_WRITE_DOCS=1`` writes it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import lab
from tests.agent_fault_runner import AGENT_CONTROL_ENV, AGENT_FAULTS, AGENT_POSITIONS
from tests.cli_helpers import REPO, write_config
from tests.fault_runner import FAULT_ENV, LOG_ENV, POSITIONS, SNAPSHOT_PAUSE, read_log
from tests.faultproxy import FaultProxy
from tests.idoit_fixture import DATABASES
from tests.pve_api.testing import TOKEN_ENV, TOKEN_ID, TOKEN_SECRET, Cert, make_cert, start_double
from tests.qga_fixture import LabAgent, start_agent
from tests.test_fault_matrix import (
    AGENT_SECTION_MARK,
    AT_EXIT,
    BY_WATCHDOG,
    CLEARED,
    DOC,
    KEPT,
    KILLED,
    WATCHDOG_SLACK,
    WRITE_DOCS_ENV,
    CellRun,
    Child,
    Expect,
    Observation,
    ServiceMonitor,
    _down,
    _first_error,
    _kill_watchdogs,
    load_result,
    results_dir,
    save_result,
)

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("_require_qga")]

VM = "db"
VMID = 100  # "db1", a qemu VM on pve1 in the double

# -- the cells' configuration -----------------------------------------------------------------

#: Long enough for a whole run plus one stalled agent call and its retries inside the reconnect
#: budget (it ends 10 s before the watchdog fires, snapcoord.reconnect.WATCHDOG_MARGIN), short
#: enough for the matrix to stay within a few minutes.
WATCHDOG_SECONDS = 25
#: command, stop and dump timeouts: short, so that a stall outlasts them.
TIMEOUT = 5.0
#: start timeout, also how long an undo keeps asking again from its first failure (the reconnect
#: budget, snapcoord.reconnect): longer than an ``agent_hang`` or ``api_down``, which the unwind
#: rides out, and ending before the hard limit (watchdog_seconds - 10 s after arming).
START_TIMEOUT = 12.0
#: ``agent_hang``: qemu-ga stays stopped this long (longer than TIMEOUT).
HANG_SECONDS = 7.0
#: how long the cells wait after continuing a stopped qemu-ga before they look at the services:
#: requests queued while it was stopped run then (tests/test_agent_transport.py's late stop runs
#: within a few seconds)
AGENT_WAKE_SECONDS = 3
#: ``agent_gone``: qemu-ga stays stopped past the watchdog (the next run continues it earlier).
GONE_SECONDS = WATCHDOG_SECONDS + 15
#: ``api_down``: the API refuses connections this long (longer than TIMEOUT).
API_DOWN_SECONDS = 7.0
#: A run that takes longer than this is killed (by PID) and the cell fails.
CHILD_TIMEOUT = 180.0
#: How long the docs test waits for cells that run on other workers.
RESULTS_WAIT = 900.0


# -- the contract -----------------------------------------------------------------------------

OK0 = Expect(0, CLEARED, AT_EXIT)
GUEST4 = Expect(4, CLEARED, AT_EXIT)
SNAP5 = Expect(5, CLEARED, AT_EXIT)
DOWN6 = Expect(6, KEPT, BY_WATCHDOG)
DEAD = Expect(KILLED, KEPT, BY_WATCHDOG)

FAULT_COLUMNS = tuple(AGENT_FAULTS)
CONTRACT: dict[str, tuple[Expect, ...]] = {
    # position               agent_restart agent_hang agent_gone api_down sigkill
    "after_arm":             (GUEST4,      GUEST4,    DOWN6,     GUEST4,  DEAD),
    "during_service_stops":  (GUEST4,      GUEST4,    DOWN6,     GUEST4,  DEAD),
    "during_dump":           (GUEST4,      GUEST4,    DOWN6,     GUEST4,  DEAD),
    "after_database_stop":   (OK0,         OK0,       DOWN6,     SNAP5,   DEAD),
    "during_snapshot":       (OK0,         OK0,       DOWN6,     SNAP5,   DEAD),
    "during_database_start": (OK0,         OK0,       DOWN6,     OK0,     DEAD),
}  # fmt: skip

RATIONALE: dict[str, str] = {
    "agent_restart": "qemu-ga restarts: it forgets a command it was running (its status is "
    "lost), and the API's next call finds no agent (in the lab the double's link to qemu-ga "
    "sees the restart at that call; on Proxmox, QEMU's end of the channel may hide a restart "
    "that ended). Before the database stop ends the step in flight fails (exit 4) and the "
    "unwind asks the agent again, which answers: everything runs at exit. From "
    "`after_database_stop` on (the still-stopped check ran at the end of the database's stop: "
    "no agent command runs until the snapshot is taken) only the unwind sees it, and rides it "
    "out (exit 0).",
    "agent_hang": "While qemu-ga is stopped every agent call fails (the API's 3 s guest-ping): "
    "before the database stop ends the step in flight fails (exit 4); the unwind asks again "
    "within its reconnect budget and goes on once the agent answers, so everything runs at exit "
    "(exit 0 from `after_database_stop` on).",
    "agent_gone": "No agent call can reach the guest before the watchdog fires: snapcoord "
    "cannot confirm the services (exit 6, `window_seconds` null, `services_down` non-empty) "
    "and leaves the watchdog armed; it restores them within `watchdog_seconds` + "
    f"{WATCHDOG_SLACK:g} s. A request that reached the stopped qemu-ga runs when it wakes, "
    "after the watchdog fired: a stop of the run then stops nothing (the watchdog's guard, "
    f"docs/guest.md), and the cell checks every service {AGENT_WAKE_SECONDS:g} s after "
    "continuing qemu-ga. The journal stays and the next run, with the agent back, heals it.",
    "api_down": "The hypervisor connection is the only one: while the API refuses, no guest "
    "command gets through (an agent that does not answer) and no snapshot is taken. Before the "
    "database stop ends the step in flight fails (exit 4); from `after_database_stop` on the "
    "snapshot call itself (exit 5); the unwind asks again within its reconnect budget and goes "
    "on once the API answers, so everything runs at exit (exit 0 when only the unwind met it).",
    "sigkill": "snapcoord dies on the spot: the guest watchdog, started through the agent "
    "outside qemu-ga's own processes, restores everything within `watchdog_seconds` + "
    f"{WATCHDOG_SLACK:g} s; the journal stays and the next run heals it and removes what the "
    "killed run left in the guest's transfer and channel folders.",
}


def contract(position: str, fault: str) -> Expect:
    return CONTRACT[position][FAULT_COLUMNS.index(fault)]


CELLS: list[tuple[str, str]] = [
    (position, fault) for position in AGENT_POSITIONS for fault in FAULT_COLUMNS
]


def test_the_agent_contract_covers_its_positions_and_faults() -> None:
    assert list(CONTRACT) == list(AGENT_POSITIONS)
    assert set(AGENT_POSITIONS) <= set(POSITIONS)
    assert all(AGENT_POSITIONS[p].step == POSITIONS[p].step for p in AGENT_POSITIONS)
    assert all(len(row) == len(FAULT_COLUMNS) for row in CONTRACT.values())
    assert set(RATIONALE) == set(FAULT_COLUMNS)


# -- making the faults ------------------------------------------------------------------------


class FaultControl:
    """The test's side of the runner's fault requests: a UNIX socket, one command per line,
    answered ``ok`` once the fault is in effect (tests/faultproxy.py's ``control`` is the
    client). The test owns qemu-ga and the proxy in front of the API, so it makes the faults."""

    def __init__(self, folder: Path, agent: LabAgent, proxy: FaultProxy) -> None:
        self.path = folder / "agent-control.sock"
        self.agent = agent
        self.proxy = proxy
        self.stopped_pid: int | None = None  # the qemu-ga left SIGSTOPped, until continued
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        control = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode(errors="replace").strip()
                try:
                    answer = control.make(line)
                except Exception as exc:
                    answer = f"error: {type(exc).__name__}: {exc}"
                self.wfile.write(answer.encode() + b"\n")

        self.path.unlink(missing_ok=True)
        self.server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def make(self, fault: str) -> str:
        with self._lock:
            if fault == "agent_restart":
                self.agent.restart()
                return f"ok restarted (pid {self.agent.pid})"
            if fault in ("agent_hang", "agent_gone"):
                seconds = HANG_SECONDS if fault == "agent_hang" else GONE_SECONDS
                self.stopped_pid = self.agent.pid
                os.kill(self.stopped_pid, signal.SIGSTOP)
                self._timer = threading.Timer(seconds, self.resume)
                self._timer.daemon = True
                self._timer.start()
                return f"ok stopped for {seconds:g} s"
            if fault == "api_down":
                return self.proxy.command(f"refuse {API_DOWN_SECONDS:g}")
        return f"error: unknown fault {fault!r}"

    def resume(self) -> None:
        """End a stopped agent (SIGCONT) and a refusing API now."""
        if self._timer is not None:
            self._timer.cancel()
        pid, self.stopped_pid = self.stopped_pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.proxy.resume()

    def close(self) -> None:
        self.resume()
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)


# -- one cell ---------------------------------------------------------------------------------


def guest_leftovers(agent: LabAgent) -> list[str]:
    """What a run left in the guest's transfer folder and /run/snapcoord/channel."""
    left = []
    for folder in (agent.transfer_dir, Path("/run/snapcoord/channel")):
        if folder.exists():
            left += [str(p) for p in folder.iterdir()]
    return left


class AgentCellRun(CellRun):
    """:class:`CellRun`'s checks; the run goes through the agent, the API double and the
    agent runner, the faults through :class:`FaultControl`."""

    watchdog_seconds = WATCHDOG_SECONDS

    def __init__(
        self,
        position: str,
        fault: str,
        expect: Expect,
        services: lab.GuestServices,
        tmp: Path,
        cert: Cert,
    ) -> None:
        super().__init__(position, fault, expect, None, services, tmp, "")  # type: ignore[arg-type]
        self.cert = cert
        self.journal = tmp / "store" / "journal" / f"{VM}.json"
        self.control: FaultControl | None = None

    def execute(self) -> Observation:
        agent = start_agent(self.tmp / "qga")
        double = start_double(self.cert, task_seconds=0.3)
        double.cluster.attach_agent(VMID, agent.socket)
        proxy = FaultProxy(("127.0.0.1", double.port)).start()
        self.control = FaultControl(self.tmp, agent, proxy)
        monitor = ServiceMonitor()
        if self.expect.restored == BY_WATCHDOG:
            monitor.start()
        try:
            config = self._agent_config(proxy)
            env = {
                **os.environ,
                TOKEN_ENV: TOKEN_SECRET,
                FAULT_ENV: f"{self.position}:{self.fault}",
                AGENT_CONTROL_ENV: str(self.control.path),
                LOG_ENV: str(self.log),
            }
            child = run_agent_child(self.tmp, "run", config, env)
            at_exit = self.services.states()
            self.obs.details.append(f"run {child.seconds:.1f} s")
            self._check_fault(read_log(self.log))
            self._check_exit(child)
            self._check_services(at_exit, monitor)
            self._check_journal()
            self._check_watchdog()
            if self.expect.journal == KEPT and self.journal.exists():
                self._check_agent_next_run(env)
            else:
                self.control.resume()
            self._check_guest_clean(agent)
            return self.obs
        finally:
            monitor.stop()
            self.control.close()
            proxy.stop()
            double.stop()
            agent.stop()
            if self.run_id:
                killed = _kill_watchdogs(self.run_id)
                if killed:
                    self.obs.details.append(f"killed the run's leftover watchdog {killed}")

    def _check_exit(self, child: Child) -> None:
        super()._check_exit(child)
        if self.fault != "agent_gone" or self.summary is None:
            return
        if self.summary.get("window_seconds") is not None:  # as CellRun's for "unreachable"
            self.problem(
                f"window_seconds is {self.summary['window_seconds']}, expected null: "
                "services could not be confirmed",
                "window not null",
            )
        if not self.summary.get("services_down"):
            self.problem(
                "services_down is empty although the agent was gone", "services_down empty"
            )

    def _agent_config(self, proxy: FaultProxy) -> Path:
        guest: dict[str, Any] = {
            "transport": "agent",
            "services": ["apache2", "cron"],
            "database": "mariadb",
            "watchdog_seconds": WATCHDOG_SECONDS,
            "connect_timeout": TIMEOUT,
            "command_timeout": TIMEOUT,
            "stop_timeout": TIMEOUT,
            "start_timeout": START_TIMEOUT,
            "dump_timeout": TIMEOUT,
            "dump": self.position == "during_dump",
        }
        tables: dict[str, dict[str, Any]] = {
            "defaults": {"store": str(self.tmp / "store"), "label": "test"},
            "hypervisors.pve": {
                "type": "proxmox",
                "host": "127.0.0.1",
                "port": proxy.port,
                "token_id": TOKEN_ID,
                "token_secret": {"env": TOKEN_ENV},
                "ca_file": str(self.cert.cert),
            },
            f"vms.{VM}": {"hypervisor": "pve", "name": "db1"},
            f"vms.{VM}.guest": guest,
        }
        if guest["dump"]:
            tables[f"vms.{VM}.dump"] = {"databases": list(DATABASES)}
        write_config(
            self.tmp / "next.toml", {**tables, f"vms.{VM}.guest": {**guest, "dump": False}}
        )
        return write_config(self.tmp / "cell.toml", tables)

    def _check_agent_next_run(self, env: dict[str, str]) -> None:
        """A kept journal heals itself: with the agent and the API back, the next fault-free
        run clears it, notes it, and succeeds."""
        assert self.control is not None
        self.control.resume()
        # a request that reached the stopped agent runs now: give it time to show (a stop of
        # this run must stop nothing once its watchdog fired)
        time.sleep(AGENT_WAKE_SECONDS)
        down = _down(self.services.states())
        if down:
            self.obs.next_run = "not tried"
            self.problem(
                f"{', '.join(down)} down once the agent was back", "down after the agent woke"
            )
            return
        env = {k: v for k, v in env.items() if k != FAULT_ENV}
        env[LOG_ENV] = str(self.tmp / "next.jsonl")
        child = run_agent_child(self.tmp, "next", self.tmp / "next.toml", env)
        self.obs.next_run = "ok" if child.returncode == 0 else f"exit {child.returncode}"
        if child.returncode != 0:
            self.problem(
                f"the next run exited {child.returncode} instead of healing the journal "
                f"({_first_error(child)})" + child.stderr[-3000:]
            )
        summaries = child.summaries
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

    def _check_guest_clean(self, agent: LabAgent) -> None:
        left = guest_leftovers(agent)
        if left:
            self.problem(f"left in the guest: {', '.join(left)}", "guest folders left")


def run_agent_child(tmp: Path, name: str, config: Path, env: dict[str, str]) -> Child:
    """``python -m tests.agent_fault_runner -c CONFIG snapshot db --json`` in a child process."""
    out, err = tmp / f"{name}.stdout", tmp / f"{name}.stderr"
    argv = [sys.executable, "-m", "tests.agent_fault_runner", "-c", str(config)]
    argv += ["snapshot", VM, "--json"]
    started = time.monotonic()
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=REPO)
        try:
            proc.wait(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            lab.stop_pid(proc.pid, proc)
            returncode = None
        else:
            returncode = proc.returncode
    return Child(
        returncode, out.read_text(), err.read_text(), time.time(), time.monotonic() - started
    )


# -- the matrix -------------------------------------------------------------------------------


@pytest.fixture
def _require_qga() -> None:
    lab.require("qemu-ga")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("pve-agent-faults-tls"))


def agent_results_dir(factory: pytest.TempPathFactory) -> Path:
    path = results_dir(factory) / "agent"
    path.mkdir(exist_ok=True)
    return path


def setup_failed(item: pytest.Item) -> None:
    """tests/conftest.py calls it when a test of this module fails in setup: the cell leaves
    an observation, so the docs test does not wait for it."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or getattr(item, "originalname", "") != "test_agent_fault_cell":
        return
    cell = (callspec.params["position"], callspec.params["fault"])
    obs = Observation(problems=["the cell did not run: one of its fixtures failed"])
    factory = item.config._tmp_path_factory  # type: ignore[attr-defined]
    save_result(agent_results_dir(factory), cell, obs)


@pytest.fixture
def cell_services(request: pytest.FixtureRequest, position: str) -> Iterator[lab.GuestServices]:
    """The lab's services, running, under the lab lock; with the i-doit data for a dump."""
    if position == "during_dump":
        request.getfixturevalue("idoit_db")
    services: lab.GuestServices = request.getfixturevalue("guest_services")
    yield services
    services.ensure_running()


@pytest.mark.parametrize(("position", "fault"), CELLS, ids=[f"{p}-{f}" for p, f in CELLS])
def test_agent_fault_cell(
    position: str,
    fault: str,
    cell_services: lab.GuestServices,
    cert: Cert,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    expect = contract(position, fault)
    cell = AgentCellRun(position, fault, expect, cell_services, tmp_path, cert)
    try:
        obs = cell.execute()
    except BaseException as exc:
        cell.problem(f"the cell itself failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        save_result(agent_results_dir(tmp_path_factory), (position, fault), cell.obs)
    if obs.problems:
        pytest.fail(
            f"{position} x {fault}: " + "; ".join(obs.problems) + f" [{', '.join(obs.details)}]",
            pytrace=False,
        )


# -- docs/reliability.md: the agent transport section ------------------------------------------


def render_agent_section(results: dict[tuple[str, str], Observation]) -> str:
    """The section after :data:`AGENT_SECTION_MARK` in docs/reliability.md (no timings)."""
    lines = [
        AGENT_SECTION_MARK,
        "",
        "## The agent transport",
        "",
        'The same promise with `transport = "agent"`: every guest command goes through the '
        "QEMU guest agent, here through the Proxmox VE API double (tests/pve_api) whose agent "
        "endpoints forward to a real qemu-ga in the lab guest (tests/qga_fixture.py); no SSH is "
        "configured. `python -m tests.agent_fault_runner` fires the fault with the injector "
        "above, on the same steps (`during_snapshot` inside the Proxmox adapter's "
        "`create_snapshot`); the test's process, which runs qemu-ga and the API "
        "double, makes the fault when the runner asks. Every cell is judged by state as above, "
        "and in addition nothing may be left in the guest's transfer folder or in "
        "`/run/snapcoord/channel` once the cell (and its next run, where the journal was kept) "
        "ended.",
        "",
        "| position | where the fault fires |",
        "|---|---|",
        *(f"| `{name}` | {pos.doc} |" for name, pos in AGENT_POSITIONS.items()),
        "",
        "| fault | how |",
        "|---|---|",
        *(f"| `{name}` | {AGENT_FAULTS[name]} |" for name in FAULT_COLUMNS),
        "",
        "The lab's qemu-ga runs without a cgroup of its own, so `agent_restart` here kills only "
        "qemu-ga, not what it started: that the watchdog and the pause's lock holder survive a "
        "real `systemctl restart qemu-guest-agent` (which kills the unit's cgroup) is proven on "
        "the real Debian guest in tests/test_realvm_agent.py, not here.",
        "",
        f"Every cell's guest: services apache2 and cron, database `mariadb`, "
        f"`watchdog_seconds = {WATCHDOG_SECONDS}`, command/stop/dump timeouts "
        f"{TIMEOUT:g} s, start timeout {START_TIMEOUT:g} s (also each undo's reconnect budget "
        "from its first failure), mysqldump only at `during_dump`. `agent_hang` stops qemu-ga for "
        f"{HANG_SECONDS:g} s; `agent_gone` for `watchdog_seconds` + "
        f"{GONE_SECONDS - WATCHDOG_SECONDS} s (continued before the next run); `api_down` "
        f"refuses for {API_DOWN_SECONDS:g} s; `during_snapshot` waits {SNAPSHOT_PAUSE:g} s "
        "inside `create_snapshot` after firing.",
        "",
        *(f"- **{fault}**: {RATIONALE[fault]}" for fault in FAULT_COLUMNS),
        "",
        "| position | " + " | ".join(f"`{f}`" for f in FAULT_COLUMNS) + " |",
        "|---|" + "---|" * len(FAULT_COLUMNS),
    ]
    for position in AGENT_POSITIONS:
        row = []
        for fault in FAULT_COLUMNS:
            obs = results.get((position, fault))
            row.append(
                f"{contract(position, fault).exit_text}: {obs.verdict if obs else 'not run'}"
            )
        lines.append(f"| `{position}` | " + " | ".join(row) + " |")
    lines += [
        "",
        "| position | fault | expected exit | journal | services restored | observed | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for position in AGENT_POSITIONS:
        for fault in FAULT_COLUMNS:
            expect = contract(position, fault)
            obs = results.get((position, fault))
            lines.append(
                f"| `{position}` | `{fault}` | {expect.exit_text} | {expect.journal} | "
                f"{expect.restored} | {obs.summary() if obs else 'not run'} | "
                f"{obs.verdict if obs else ''} |"
            )
    passed = sum(1 for o in results.values() if not o.problems)
    lines += ["", f"{passed} of {len(CELLS)} agent cells pass.", ""]
    return "\n".join(lines)


def test_reliability_docs_agent_section_is_the_matrix_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Runs after every cell (on any worker): waits, bounded, for every cell's observation."""
    selected = {
        (item.callspec.params["position"], item.callspec.params["fault"])
        for item in request.session.items
        if item.originalname == "test_agent_fault_cell" and hasattr(item, "callspec")
    }
    missing = [cell for cell in CELLS if cell not in selected]
    if missing:
        pytest.skip(f"only {len(CELLS) - len(missing)} of {len(CELLS)} cells ran: no comparison")
    folder = agent_results_dir(tmp_path_factory)
    deadline = time.monotonic() + RESULTS_WAIT
    while True:
        found = {cell: load_result(folder, cell) for cell in CELLS}
        if all(found.values()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    absent = [f"{p} x {f}" for (p, f), obs in found.items() if obs is None]
    assert not absent, f"no result after {RESULTS_WAIT:g} s from: {', '.join(absent)}"
    section = render_agent_section({c: o for c, o in found.items() if o is not None})
    committed = DOC.read_text() if DOC.exists() else ""
    before, mark, _ = committed.partition(AGENT_SECTION_MARK)
    if os.environ.get(WRITE_DOCS_ENV) == "1":
        DOC.write_text(before.rstrip("\n") + "\n\n" + section)
        return
    assert mark and committed == before + section, (
        f"{DOC.relative_to(REPO)}'s agent transport section differs from this run's matrix: "
        f"run `{WRITE_DOCS_ENV}=1 pytest tests/test_agent_fault_matrix.py` and commit it"
    )

"""Service window benchmark: snapcoord's stop mode, its pause mode, and a plain shell script
doing the stop steps (issues 3 and 12).

All three bracket a libvirt test-driver snapshot of ``web1`` in the loopback guest (tests/lab/:
a private sshd on 127.0.0.1, the machine's real apache2, cron and MariaDB with its binary log
on). The runs alternate (stop, pause, script, stop, ...) so drift hits all three.

* **stop** (``consistency = "stop"``) and the **script** stop apache2, cron and MariaDB, take the
  snapshot and start them again; the figure is the service window. snapcoord's *own overhead
  inside the window* is the window minus what it cannot make faster: the init system's
  stop/start commands (timed inside the guest; for the parallel phases the slowest of the
  parallel commands) and the hypervisor call (its step's duration). It is also split by window
  step: each step's duration minus its init commands, and the rest ("between steps").
* **pause** (``consistency = "pause"``) stops nothing and holds only MariaDB's commits for the
  snapshot call, while tests/pause_load.py commits a row every 10 ms and times a SELECT every
  10 ms. Figures: the longest gap between two acknowledged commits during the run (the write
  stall a client sees), ``write_pause_seconds`` (lock held -> released, as the coordinator
  measured it), the hypervisor step's duration, and the reader's p99 latency while idle (before
  the run) vs while the pause is held (reads sent in [held_from, release_sent]).

The test driver's snapshot call takes about 2 ms, so the pause holds commits for a few ms: less
than the load's 10 ms cadence. ``--snapshot-seconds S`` makes snapcoord's libvirt snapshot call
(both modes) S seconds slower, like a real hypervisor's, so the hold is long enough to sample;
the script's ``virsh`` call cannot be slowed, so S is added to its window.

Needs root (sshd, services). Run from the repository root::

    python3 -m bench.window --runs 7 [--json] [--snapshot-seconds S]
                            [--pause-method auto|backup_stage|ftwrl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests import lab, pause_load
from tests.lab import sandbox
from tests.libvirt_nodes import write_node

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "window-script.sh"
TIMING = re.compile(r"DEBUG: (\S+) (stop|start): init command ([0-9.]+) s")
IDLE_SECONDS = 2.0  # the load runs this long before the pause run: the idle baseline
SETTLE_SECONDS = 0.3  # the load's clients start up (not counted as idle)
AFTER_SECONDS = 0.5  # the load goes on after the run, so the stall's end is seen
SLOW_ENV = "SNAPCOORD_BENCH_SNAPSHOT_SECONDS"  # read by slow_snapshot_cli() in the child
SLOW_CLI = "import sys; from bench.window import slow_snapshot_cli; sys.exit(slow_snapshot_cli())"

# Goals (issue 12)
STALL_OVER_SNAPSHOT = 0.150  # write stall <= snapshot call + 150 ms
STOP_OVER_STALL = 20.0  # the stall at least 20x shorter than the stop mode's window
P99_OVER_IDLE = 0.050  # reader p99 while held within 50 ms of idle


def write_config(work: Path, guest: lab.SshGuest, uri: str, consistency: str, method: str) -> Path:
    config = work / f"snapcoord-{consistency}.toml"
    pause = f'pause_method = "{method}"\n' if consistency == "pause" else ""
    config.write_text(
        f"""[defaults]
store = "{work / "store"}"
label = "bench"

[hypervisors.lab]
type = "libvirt"
uri = "{uri}"

[vms.web1]
hypervisor = "lab"

[vms.web1.guest]
host = "{guest.host}"
port = {guest.port}
user = "{guest.user}"
identity_file = "{guest.identity_file}"
known_hosts = "{guest.known_hosts}"
services = ["apache2", "cron"]
database = "mariadb"
consistency = "{consistency}"
{pause}"""
    )
    return config


def slow_snapshot_cli() -> int:
    """snapcoord's CLI (``sys.argv[1:]``) with the libvirt snapshot call made ``$SLOW_ENV``
    seconds slower: a hypervisor slower than the test driver."""
    from snapcoord import cli
    from snapcoord.adapters.libvirt_adapter import LibvirtAdapter

    delay = float(os.environ[SLOW_ENV])
    create_snapshot = LibvirtAdapter.create_snapshot

    def slow_create_snapshot(self: LibvirtAdapter, *args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return create_snapshot(self, *args, **kwargs)

    LibvirtAdapter.create_snapshot = slow_create_snapshot
    return cli.main(sys.argv[1:])


def run_snapcoord(config: Path, snapshot_seconds: float) -> tuple[dict[str, Any], str]:
    """``snapcoord -v snapshot web1 --json``: its summary and its stderr (the DEBUG timings)."""
    args = ["-v", "-c", str(config), "snapshot", "web1", "--json"]
    start = ["-c", SLOW_CLI] if snapshot_seconds else ["-m", "snapcoord"]
    proc = subprocess.run(
        [sys.executable, *start, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, SLOW_ENV: str(snapshot_seconds)},
        timeout=300,
    )
    if proc.returncode != 0:
        raise SystemExit(f"snapcoord failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    return summary, proc.stderr


def snapshot_step(summary: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in summary["steps"] if s["name"] == "hypervisor snapshot")


# The window's steps and the init commands on their critical path (the slowest of parallel ones)
WINDOW_STEPS = {
    "stop services": ("apache2 stop", "cron stop"),
    "stop database": ("mariadb stop",),
    "check services still stopped": (),
    "start database": ("mariadb start",),
    "start services": ("apache2 start", "cron start"),
}


def overhead_by_step(summary: dict[str, Any], timings: dict[str, float]) -> dict[str, float]:
    """Where the overhead is: each window step's duration minus its init commands (the step
    times are whole milliseconds), and the rest of the window ("between steps": the first stop
    issued to its step's start, the engine between the steps, the last start confirmed)."""
    steps = {s["name"]: s["ended"] - s["started"] for s in summary["steps"]}
    split = {
        name: steps.get(name, 0.0) - max((timings[c] for c in commands), default=0.0)
        for name, commands in WINDOW_STEPS.items()
    }
    inside = sum(steps.get(name, 0.0) for name in [*WINDOW_STEPS, "hypervisor snapshot"])
    split["between steps"] = float(summary["window_seconds"]) - inside
    return split


def run_stop(config: Path, snapshot_seconds: float) -> dict[str, Any]:
    return stop_figures(*run_snapcoord(config, snapshot_seconds))


def stop_figures(summary: dict[str, Any], stderr: str) -> dict[str, Any]:
    """A stop-mode run's window, its init commands on the critical path, the hypervisor call
    and snapcoord's own overhead (whole and by step), from its ``--json`` summary and its
    ``-v`` stderr (the init commands' DEBUG timings: SSH only, where lines arrive as the
    guest writes them)."""
    timings = {f"{m[1]} {m[2]}": float(m[3]) for m in TIMING.finditer(stderr)}
    step = snapshot_step(summary)
    hypervisor = step["ended"] - step["started"]
    commands = (
        max(timings["apache2 stop"], timings["cron stop"])
        + timings["mariadb stop"]
        + timings["mariadb start"]
        + max(timings["apache2 start"], timings["cron start"])
    )
    window = float(summary["window_seconds"])
    return {
        "window": window,
        "commands": commands,
        "hypervisor": hypervisor,
        "overhead": window - commands - hypervisor,
        "timings": timings,
        "by_step": overhead_by_step(summary, timings),
    }


def longest_gap(acks: list[float], start: float, end: float) -> float:
    """The longest gap between consecutive acknowledged commits that overlaps [start, end]."""
    return max(b - a for a, b in itertools.pairwise(acks) if b >= start and a <= end)


def gap_across(acks: list[float], moment: float) -> float:
    """The gap between the last commit acknowledged before ``moment`` and the first after."""
    return next(b - a for a, b in itertools.pairwise(acks) if b > moment)


def p99(latencies: list[float]) -> float | None:
    """The 99th percentile (None for no samples; with few, it is about the slowest)."""
    if len(latencies) < 2:
        return max(latencies, default=None)
    return statistics.quantiles(latencies, n=100, method="inclusive")[98]


def run_pause(config: Path, snapshot_seconds: float) -> dict[str, Any]:
    """One pause-mode run under the writer/reader load."""
    pause_load.reset_schema()
    with pause_load.Load() as load:
        time.sleep(SETTLE_SECONDS)
        idle_from = time.time()
        time.sleep(IDLE_SECONDS)
        run_from = time.time()
        summary, _stderr = run_snapcoord(config, snapshot_seconds)
        run_to = time.time()
        time.sleep(AFTER_SECONDS)
    if load.writer.error or load.reader.error:
        raise SystemExit(f"the load failed: {load.writer.error or load.reader.error}")
    if summary.get("consistency") != "pause" or summary.get("window_seconds") is not None:
        raise SystemExit(f"not a pause-mode run: {summary.get('consistency')!r}")

    pause = summary["pause"]
    held_from, release_sent = pause["held_from"], pause["release_sent"]
    step = snapshot_step(summary)
    acks = [got for got, _seq in load.commits()]
    reads = load.reads()
    idle = [latency for sent, latency in reads if idle_from <= sent < run_from]
    held = [latency for sent, latency in reads if held_from <= sent <= release_sent]
    return {
        "method": pause["method"],
        "synced": pause["synced"],
        "stall": longest_gap(acks, run_from, run_to),
        "hold_gap": gap_across(acks, release_sent),
        "idle_gap": longest_gap(acks, idle_from, run_from),
        "write_pause": float(summary["write_pause_seconds"]),
        "hypervisor": step["ended"] - step["started"],
        # write_pause, split: lock held -> snapshot call -> release sent -> release returned
        "before_snapshot": step["started"] - held_from,
        "after_snapshot": release_sent - step["ended"],
        "release": pause["released_at"] - release_sent,
        "idle_reads": idle,
        "held_reads": held,
        "idle_p99": p99(idle),
        "held_p99": p99(held),
    }


def run_script(guest: lab.SshGuest, uri: str, index: int) -> float:
    proc = subprocess.run(
        [str(SCRIPT), str(guest.ssh_config), guest.alias, uri, "web1", f"script-{index}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-2000:]
        raise SystemExit(f"the script failed ({proc.returncode}): {output}")
    return float(proc.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values)


def settle() -> None:
    """Every service running again, and a moment's quiet before the next run."""
    lab.ensure_running()
    time.sleep(1)


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize_pause(runs: list[dict[str, Any]], stop_window: float) -> dict[str, Any]:
    """Medians over the pause-mode runs, the reader's p99 over all their reads, the goals.
    A goal that cannot be judged (no read fell in any hold) is None."""

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return median(values) if values else None

    stall, hypervisor, write_pause = med("stall"), med("hypervisor"), med("write_pause")
    assert stall is not None and hypervisor is not None and write_pause is not None
    idle_reads = [x for r in runs for x in r["idle_reads"]]
    held_reads = [x for r in runs for x in r["held_reads"]]
    idle_p99, held_p99 = p99(idle_reads), p99(held_reads)
    return {
        "method": sorted({r["method"] for r in runs}),
        "synced": runs[0]["synced"],
        "stall": [round(r["stall"], 4) for r in runs],
        "hold_gap": [round(r["hold_gap"], 4) for r in runs],
        "write_pause": [round(r["write_pause"], 4) for r in runs],
        "stall_minus_snapshot": [round(r["stall"] - r["hypervisor"], 4) for r in runs],
        "median_stall": round(stall, 4),
        "median_hold_gap": rounded(med("hold_gap")),
        "median_idle_gap": rounded(med("idle_gap")),
        "median_write_pause": round(write_pause, 4),
        "median_hypervisor": round(hypervisor, 4),
        "median_before_snapshot": rounded(med("before_snapshot")),
        "median_after_snapshot": rounded(med("after_snapshot")),
        "median_release": rounded(med("release")),
        "reads_idle": len(idle_reads),
        "reads_held": len(held_reads),
        "median_idle_p99": rounded(med("idle_p99")),
        "median_held_p99": rounded(med("held_p99")),
        "pooled_idle_p99": rounded(idle_p99),
        "pooled_held_p99": rounded(held_p99),
        "max_held_read": rounded(max(held_reads, default=None)),
        "stop_over_stall": round(stop_window / stall, 1),
        "stop_over_write_pause": round(stop_window / write_pause, 1),
        "goals": {
            "stall_le_snapshot_plus_150ms": stall <= hypervisor + STALL_OVER_SNAPSHOT,
            "stall_20x_shorter_than_stop_window": stop_window / stall >= STOP_OVER_STALL,
            "held_p99_within_50ms_of_idle": None
            if held_p99 is None or idle_p99 is None
            else held_p99 - idle_p99 <= P99_OVER_IDLE,
        },
    }


def measure(
    runs: int, snapshot_seconds: float, method: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[float]]:
    """``runs`` rounds of stop mode, pause mode (under load), the script; their raw figures."""
    stops: list[dict[str, Any]] = []
    pauses: list[dict[str, Any]] = []
    scripts: list[float] = []
    work = Path(tempfile.mkdtemp(prefix="snapcoord-bench-"))
    guest = lab.start_sshd()
    try:
        uri = write_node(work / "node")
        stop_config = write_config(work, guest, uri, "stop", method)
        pause_config = write_config(work, guest, uri, "pause", method)
        with lab.lab_lock():  # no test may touch the services meanwhile
            lab.ensure_running()
            pause_load.ensure_binlog()  # for all three: the same server in every run
            try:
                for index in range(runs):
                    stops.append(run_stop(stop_config, snapshot_seconds))
                    settle()
                    pauses.append(run_pause(pause_config, snapshot_seconds))
                    settle()
                    # virsh's call is not slowed: the time snapcoord's was slowed by is added
                    scripts.append(run_script(guest, uri, index) + snapshot_seconds)
                    settle()
            finally:
                lab.ensure_running()
                pause_load.drop_schema()
    finally:
        lab.ensure_running()
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return stops, pauses, scripts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    parser.add_argument(
        "--snapshot-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="make snapcoord's snapshot call S seconds slower (default 0: the test driver's)",
    )
    parser.add_argument(
        "--pause-method",
        default="auto",
        choices=["auto", "backup_stage", "ftwrl"],
        help="pause_method of the pause-mode runs (default auto)",
    )
    args = parser.parse_args(argv)
    # never the host's own services: the lab runs in a sandbox of its own
    sandbox.enter("bench.window", sys.argv[1:] if argv is None else list(argv))

    ours, paused, theirs = measure(args.runs, args.snapshot_seconds, args.pause_method)
    stop_window = median([r["window"] for r in ours])
    result: dict[str, Any] = {
        "runs": args.runs,
        "snapshot_seconds_added": args.snapshot_seconds,
        "snapcoord_window": [round(r["window"], 3) for r in ours],
        "script_window": [round(w, 3) for w in theirs],
        "snapcoord_overhead": [round(r["overhead"], 4) for r in ours],
        "median_snapcoord_window": round(stop_window, 3),
        "median_script_window": round(median(theirs), 3),
        "median_commands": round(median([r["commands"] for r in ours]), 3),
        "median_hypervisor": round(median([r["hypervisor"] for r in ours]), 4),
        "median_overhead": round(median([r["overhead"] for r in ours]), 4),
        "median_timings": {
            k: round(median([r["timings"][k] for r in ours]), 3) for k in ours[0]["timings"]
        },
        "median_overhead_by_step": {
            k: round(median([r["by_step"][k] for r in ours]), 4) for k in ours[0]["by_step"]
        },
        "ratio": round(stop_window / median(theirs), 3),
        "pause": summarize_pause(paused, stop_window),
    }
    result["pause"]["script_over_stall"] = round(
        median(theirs) / result["pause"]["median_stall"], 1
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_report(result)
    return 0


GOAL_LABELS = {
    "stall_le_snapshot_plus_150ms": "write stall <= snapshot call + 150 ms",
    "stall_20x_shorter_than_stop_window": "write stall >= 20x shorter than the stop window",
    "held_p99_within_50ms_of_idle": "reader p99 while held within 50 ms of idle",
}


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measurable (no read fell in a hold)"}[ok]


def print_report(result: dict[str, Any]) -> None:
    p = result["pause"]
    added = result["snapshot_seconds_added"]
    slowed = f" (snapcoord's snapshot call slowed by {added:g} s; added to the script's)"
    lines = [
        f"runs each:                  {result['runs']}{slowed if added else ''}",
        "stop mode vs plain script (service window, medians)",
        f"  plain script window:      {result['median_script_window']:.3f} s",
        f"  snapcoord stop window:    {result['median_snapcoord_window']:.3f} s",
        f"  ratio snapcoord/script:   {result['ratio']:.3f}   (goal <= 0.8)",
        f"    guest init commands:    {result['median_commands']:.3f} s (critical path)",
        f"    hypervisor call:        {ms(result['median_hypervisor'])}",
        f"    snapcoord overhead:     {ms(result['median_overhead'])} (goal < 50)",
        f"    per run overhead (ms):  {[round(o * 1000) for o in result['snapcoord_overhead']]}",
        *(
            f"      {name:<22} {seconds:.3f} s"
            for name, seconds in result["median_timings"].items()
        ),
        "    overhead by step (median; step minus its init commands):",
        *(
            f"      {name:<30} {ms(seconds)}"
            for name, seconds in result["median_overhead_by_step"].items()
        ),
        f"pause mode (method {', '.join(p['method'])}; nothing stopped), medians",
        f"  write stall (client):     {ms(p['median_stall'])} (longest gap between commits)",
        f"    gap across the hold:    {ms(p['median_hold_gap'])}",
        f"    idle, for comparison:   {ms(p['median_idle_gap'])}",
        f"  write_pause_seconds:      {ms(p['median_write_pause'])}",
        f"    lock held -> snapshot:  {ms(p['median_before_snapshot'])}",
        f"    hypervisor call:        {ms(p['median_hypervisor'])}",
        f"    snapshot -> release:    {ms(p['median_after_snapshot'])}",
        f"    release returned after: {ms(p['median_release'])}",
        f"  per run stall (ms):       {[round(s * 1000) for s in p['stall']]}",
        f"  per run stall - snapshot: {[round(s * 1000) for s in p['stall_minus_snapshot']]} ms",
        f"  stop window / stall:       {p['stop_over_stall']:.1f} x",
        f"  stop window / write_pause: {p['stop_over_write_pause']:.1f} x",
        f"  script window / stall:     {p['script_over_stall']:.1f} x",
        f"  reader p99 idle:          {ms(p['pooled_idle_p99'])} ({p['reads_idle']} reads pooled)",
        f"  reader p99 while held:    {ms(p['pooled_held_p99'])} ({p['reads_held']} reads pooled)",
        f"    slowest read held:      {ms(p['max_held_read'])}",
        f"    per-run p99 (median):   {ms(p['median_idle_p99'])} idle, "
        f"{ms(p['median_held_p99'])} held",
        "goals (pause mode):",
        *(f"  {GOAL_LABELS[name]:<50} {verdict(ok)}" for name, ok in p["goals"].items()),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

"""Service window benchmark: snapcoord vs. a plain shell script doing the same steps (issue 3).

Both bracket a libvirt test-driver snapshot of ``web1`` with stopping apache2, cron and mariadb in
the loopback guest (tests/lab/: a private sshd on 127.0.0.1, the machine's real services) and
starting them again. The runs alternate (snapcoord, script, snapcoord, ...) so drift hits both.

snapcoord's *own overhead inside the window* is the window minus what it cannot make faster:
the init system's stop/start commands (timed inside the guest; for the parallel phases the
slowest of the parallel commands) and the hypervisor call (its step's duration).

Needs root (sshd, services). Run from the repository root::

    python3 -m bench.window --runs 7 [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests import lab
from tests.libvirt_nodes import write_node

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "window-script.sh"
TIMING = re.compile(r"DEBUG: (\S+) (stop|start): init command ([0-9.]+) s")


def write_config(work: Path, guest: lab.SshGuest, uri: str) -> Path:
    config = work / "snapcoord.toml"
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
"""
    )
    return config


def run_snapcoord(config: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "snapcoord", "-v", "-c", str(config), "snapshot", "web1", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    if proc.returncode != 0:
        raise SystemExit(f"snapcoord failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    timings = {f"{m[1]} {m[2]}": float(m[3]) for m in TIMING.finditer(proc.stderr)}
    step = next(s for s in summary["steps"] if s["name"] == "hypervisor snapshot")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="snapcoord-bench-"))
    guest = lab.start_sshd()
    try:
        uri = write_node(work / "node")
        config = write_config(work, guest, uri)
        with lab.lab_lock():  # no test may touch the services meanwhile
            lab.ensure_running()
            ours: list[dict[str, Any]] = []
            theirs: list[float] = []
            for index in range(args.runs):
                ours.append(run_snapcoord(config))
                lab.ensure_running()
                time.sleep(1)
                theirs.append(run_script(guest, uri, index))
                lab.ensure_running()
                time.sleep(1)
    finally:
        lab.ensure_running()
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "runs": args.runs,
        "snapcoord_window": [round(r["window"], 3) for r in ours],
        "script_window": [round(w, 3) for w in theirs],
        "snapcoord_overhead": [round(r["overhead"], 4) for r in ours],
        "median_snapcoord_window": round(median([r["window"] for r in ours]), 3),
        "median_script_window": round(median(theirs), 3),
        "median_commands": round(median([r["commands"] for r in ours]), 3),
        "median_hypervisor": round(median([r["hypervisor"] for r in ours]), 4),
        "median_overhead": round(median([r["overhead"] for r in ours]), 4),
        "median_timings": {
            k: round(median([r["timings"][k] for r in ours]), 3) for k in ours[0]["timings"]
        },
    }
    result["ratio"] = round(result["median_snapcoord_window"] / result["median_script_window"], 3)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"runs each:                  {args.runs}")
        print(f"plain script window:        {result['median_script_window']:.3f} s (median)")
        print(f"snapcoord window:           {result['median_snapcoord_window']:.3f} s (median)")
        print(f"ratio snapcoord/script:     {result['ratio']:.3f}   (goal <= 0.8)")
        print(f"  guest init commands:      {result['median_commands']:.3f} s (critical path)")
        print(f"  hypervisor call:          {result['median_hypervisor'] * 1000:.1f} ms")
        print(f"  snapcoord overhead:       {result['median_overhead'] * 1000:.1f} ms (goal < 50)")
        per_run = [round(o * 1000) for o in result["snapcoord_overhead"]]
        print(f"  per run overhead (ms):    {per_run}")
        for name, seconds in result["median_timings"].items():
            print(f"    {name:<22} {seconds:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

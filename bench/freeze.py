"""freeze/thaw benchmark (issue 14): the service window when a backup product calls
``snapcoord freeze`` before its snapshot and ``snapcoord thaw`` right after, against a plain
pre/post shell script pair doing the same stops and starts (``bench/freeze-script.sh``).

Every call is a separate process, as a backup product makes them; the product's own snapshot
takes no time here, so the window is what the two halves cost. On the loopback guest (tests/lab/:
a private sshd on 127.0.0.1 logging in as root, whose rc files cost ~140 ms per new SSH session;
the machine's apache2, cron and MariaDB). Runs alternate (snapcoord, script, snapcoord, ...).

* **snapcoord**: the holder's ``window_seconds`` (first stop issued -> last service confirmed
  running, as every run reports it), the wall time of ``freeze`` (start -> exit 0, quiesced) and
  of ``thaw`` (start -> exit 0, everything runs), and the window in pause mode (nothing stops:
  ``write_pause_seconds``, the time commits were held).
* **script**: ``pre`` = ``ssh service apache2 stop; … cron stop; … mariadb stop``, ``post`` =
  the starts in reverse; the window from before ``pre``'s first ssh to after ``post``'s last.

Needs root (sshd, services). Run from the repository root::

    python3 -m bench.freeze --runs 7 [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.window import write_config
from tests import lab, pause_load
from tests.lab import sandbox

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "freeze-script.sh"


def snapcoord(config: Path, *args: str) -> float:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "snapcoord", "-c", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    if proc.returncode != 0:
        raise SystemExit(f"snapcoord {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.monotonic() - started


def last_run(work: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (work / "store" / "journal" / "web1.last-run.json").read_text()
    )
    return data


def run_snapcoord(config: Path, work: Path) -> dict[str, Any]:
    freeze = snapcoord(config, "freeze", "web1")
    thaw = snapcoord(config, "thaw", "web1")
    summary = last_run(work)
    return {
        "freeze": freeze,
        "thaw": thaw,
        "window": summary["window_seconds"],
        "write_pause": summary.get("write_pause_seconds"),
    }


def run_script(guest: lab.SshGuest) -> float:
    started = time.monotonic()
    for half in ("pre", "post"):
        proc = subprocess.run(
            ["sh", str(SCRIPT), half, str(guest.ssh_config), guest.alias],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise SystemExit(f"the script's {half} failed: {(proc.stdout + proc.stderr)[-2000:]}")
    return time.monotonic() - started


def settle() -> None:
    lab.ensure_running()
    time.sleep(1)


def measure(runs: int) -> dict[str, list[Any]]:
    figures: dict[str, list[Any]] = {"stop": [], "pause": [], "script": []}
    work = Path(tempfile.mkdtemp(prefix="snapcoord-bench-freeze-"))
    guest = lab.start_sshd()
    uri = "test:///default"  # freeze and thaw never call the hypervisor
    try:
        stop_config = write_config(work, guest, uri, "stop", "auto")
        pause_config = write_config(work, guest, uri, "pause", "auto")
        with lab.lab_lock():
            lab.ensure_running()
            pause_load.ensure_binlog()
            try:
                for _ in range(runs):
                    figures["stop"].append(run_snapcoord(stop_config, work))
                    settle()
                    figures["pause"].append(run_snapcoord(pause_config, work))
                    settle()
                    figures["script"].append(run_script(guest))
                    settle()
            finally:
                lab.ensure_running()
    finally:
        lab.ensure_running()
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # never the host's own services: the lab runs in a sandbox of its own
    sandbox.enter("bench.freeze", sys.argv[1:] if argv is None else list(argv))
    figures = measure(args.runs)

    def med(mode: str, key: str) -> float:
        return round(statistics.median(r[key] for r in figures[mode]), 3)

    result = {
        "runs": args.runs,
        "stop_window": med("stop", "window"),
        "stop_freeze_wall": med("stop", "freeze"),
        "stop_thaw_wall": med("stop", "thaw"),
        "pause_write_pause": med("pause", "write_pause"),
        "pause_freeze_wall": med("pause", "freeze"),
        "pause_thaw_wall": med("pause", "thaw"),
        "script_window": round(statistics.median(figures["script"]), 3),
        "raw": figures,
    }
    result["window_ratio"] = round(result["stop_window"] / result["script_window"], 3)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for key, value in result.items():
            if key != "raw":
                print(f"{key:20} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: `snapcoord snapshot --all --json --parallel N` over a fleet of VMs on the Proxmox VE
API double, whose snapshot tasks take a fixed time (1 s by default).

The double runs standalone (``python -m tests.pve_api --guests 200``, HTTPS, an API token read
from a file by snapcoord) in its own process, freshly started for every run so that no run
inherits the previous one's snapshots and tasks. The VMs are hypervisor-only (no [guest] table)
and have no retention policy: each VM's run is connect, find, check, create + poll, list.

For every run it records the command's wall time, the fleet's own time (the summary's
``seconds``: the process minus start-up and config loading), the coordinator's CPU time
(user + sys of the snapcoord process, from wait4) and its peak RSS, the summary's
``peak_parallel`` and the most snapshot tasks the double saw running at once
(``GET /_double/stats``). The ideal is ``ceil(VMs / N) x per-VM time``, the per-VM time being the
median duration of one VM's run (first step started to last step ended) in a single-VM run.
Finally one run with ``[hypervisors.pve] max_parallel = 4`` and ``--parallel 64`` shows the cap.

Usage: ``PYTHONPATH=. .venv/bin/python bench/fleet.py [--vms 200] [--serial-vms 50]
[--parallel 1,4,16,64] [--repeat 3] [--task-seconds 1] [--cap-vms 200] [--backlog 128]
[--keep DIR] [--markdown]``. ``--backlog`` is the double's listen backlog: Python's socketserver
default of 5 overflows when 64 clients connect at once, and each overflowed connect waits for the
client's SYN retransmission (1 s): an artifact of the stand-in, not of snapcoord.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.pve_api.testing import make_cert

REPO = Path(__file__).resolve().parent.parent
SNAPCOORD = Path(sys.executable).parent / "snapcoord"
TOKEN_ID = "bench@pve!fleet"
PREFIX = "fleet"


@dataclass
class Double:
    port: int
    cert: Path
    pid: int

    def stats(self) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(self.cert))
        url = f"https://127.0.0.1:{self.port}/_double/stats"
        with urllib.request.urlopen(url, context=context, timeout=10) as reply:
            result: dict[str, Any] = json.load(reply)
        return result

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def double(
    folder: Path, *, guests: int, task_seconds: float, backlog: int | None
) -> Iterator[Double]:
    """A fresh standalone double with ``guests`` extra qemu VMs fleet0001...; stopped after."""
    cert, key = folder / "pve.crt", folder / "pve.key"
    port_file = folder / "port"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "tests.pve_api", "--listen", "127.0.0.1:0"]
    command += ["--port-file", str(port_file), "--tls-cert", str(cert), "--tls-key", str(key)]
    command += ["--token-file", str(folder / "double-tokens"), "--task-seconds", str(task_seconds)]
    command += ["--guests", str(guests), "--guest-prefix", PREFIX]
    if backlog is not None:
        command += ["--backlog", str(backlog)]
    with open(folder / "double.log", "ab") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the double did not start: see {folder / 'double.log'}")
            time.sleep(0.05)
        yield Double(int(port_file.read_text()), cert, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def write_config(folder: Path, port: int, vms: int, max_parallel: int) -> Path:
    lines = [
        "[defaults]",
        f'store = "{folder / "store"}"',
        'label = "bench"',
        "",
        "[hypervisors.pve]",
        'type = "proxmox"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f'token_id = "{TOKEN_ID}"',
        f'token_secret = {{ file = "{folder / "token-secret"}" }}',
        f'ca_file = "{folder / "pve.crt"}"',
        f"max_parallel = {max_parallel}",
    ]
    for index in range(1, vms + 1):
        lines += ["", f"[vms.{PREFIX}{index:04d}]", 'hypervisor = "pve"']
    path = folder / "snapcoord.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Run:
    vms: int
    parallel: int
    max_parallel: int
    wall: float  # the snapcoord process, start to exit
    fleet_seconds: float  # the summary's seconds
    cpu: float  # user + sys of the snapcoord process
    maxrss_mb: float
    peak_parallel: int
    double_max_running: int
    double_cpu: float
    ok: int
    vm_seconds: list[float]  # each VM's run: first step started to last step ended


def snapshot_run(
    folder: Path,
    *,
    vms: int,
    guests: int,
    parallel: int,
    max_parallel: int,
    task_seconds: float,
    backlog: int | None,
) -> Run:
    (folder / "store").mkdir(exist_ok=True)
    with double(folder, guests=guests, task_seconds=task_seconds, backlog=backlog) as server:
        config = write_config(folder, server.port, vms, max_parallel)
        args = [str(SNAPCOORD), "-c", str(config), "snapshot"]
        args += ["--all", "--parallel", str(parallel)] if vms > 1 else [f"{PREFIX}0001"]
        args += ["--json"]
        cpu_before = server.cpu_seconds()
        with open(folder / "out.jsonl", "wb") as out, open(folder / "err.txt", "wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=folder)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        double_cpu = server.cpu_seconds() - cpu_before
        stats = server.stats()
    objects = [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]
    summary = objects[-1].get("summary", {}) if objects else {}
    per_vm = [o for o in objects if "vm" in o]
    if proc.returncode != 0 or len(per_vm) != vms:
        raise RuntimeError(
            f"snapcoord exited {proc.returncode} with {len(per_vm)} of {vms} results: "
            + (folder / "err.txt").read_text()[-2000:]
        )
    spans = [o["steps"][-1]["ended"] - o["steps"][0]["started"] for o in per_vm]
    task = stats["tasks"].get("qmsnapshot", {})
    return Run(
        vms=vms,
        parallel=parallel,
        max_parallel=max_parallel,
        wall=wall,
        fleet_seconds=float(summary.get("seconds", wall)),
        cpu=usage.ru_utime + usage.ru_stime,
        maxrss_mb=usage.ru_maxrss / 1024,
        peak_parallel=int(summary.get("peak_parallel", 1)),
        double_max_running=int(task.get("max_running", 0)),
        double_cpu=double_cpu,
        ok=sum(bool(o["ok"]) for o in per_vm),
        vm_seconds=spans,
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=200, help="fleet size")
    parser.add_argument(
        "--serial-vms", type=int, default=50, help="fleet size for --parallel 1 (long runs)"
    )
    parser.add_argument("--parallel", default="1,4,16,64", help="comma-separated N")
    parser.add_argument("--repeat", type=int, default=3, help="runs per N (medians reported)")
    parser.add_argument("--task-seconds", type=float, default=1.0, help="snapshot task duration")
    parser.add_argument("--cap-vms", type=int, default=200, help="VMs in the max_parallel run")
    parser.add_argument("--cap", type=int, default=4, help="max_parallel of the capped run")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    parser.add_argument(
        "--backlog",
        type=int,
        default=128,
        help="the double's listen backlog (socketserver's default 5 is overflowed by 64 connects)",
    )
    parser.add_argument("--keep", type=Path, help="keep every run's folder (output, logs) here")
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.parallel.split(",") if n]
    guests = max(args.vms, args.serial_vms, args.cap_vms)

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        top = args.keep or Path(tmp)
        top.mkdir(parents=True, exist_ok=True)
        make_cert(top)
        secret = secrets.token_hex(16)
        (top / "token-secret").write_text(secret + "\n")
        (top / "token-secret").chmod(0o600)
        (top / "double-tokens").write_text(f"{TOKEN_ID}={secret}\n")
        (top / "double-tokens").chmod(0o600)
        counter = 0

        def run(**kw: Any) -> Run:
            nonlocal counter
            counter += 1
            folder = top / f"run{counter}"
            folder.mkdir()
            for name in ("pve.crt", "pve.key", "token-secret", "double-tokens"):
                (folder / name).symlink_to(top / name)
            return snapshot_run(
                folder, guests=guests, task_seconds=args.task_seconds, backlog=args.backlog, **kw
            )

        singles = [run(vms=1, parallel=1, max_parallel=1000) for _ in range(max(args.repeat, 3))]
        per_vm = median([r.vm_seconds[0] for r in singles])
        print(
            f"one VM: per-VM time {per_vm:.3f} s (median of {len(singles)}; task "
            f"{args.task_seconds:g} s), process wall {median([r.wall for r in singles]):.3f} s, "
            f"CPU {median([r.cpu for r in singles]):.3f} s, "
            f"peak RSS {median([r.maxrss_mb for r in singles]):.1f} MB",
            flush=True,
        )
        rows: list[dict[str, Any]] = []
        for level in levels:
            vms = args.serial_vms if level == 1 else args.vms
            runs = [run(vms=vms, parallel=level, max_parallel=1000) for _ in range(args.repeat)]
            rows.append(row(runs, per_vm, level, vms, limit=1000))
            print(describe(rows[-1]), flush=True)
        cap_runs = [run(vms=args.cap_vms, parallel=64, max_parallel=args.cap)]
        rows.append(row(cap_runs, per_vm, min(64, args.cap), args.cap_vms, limit=args.cap))
        print(describe(rows[-1]), flush=True)
    if args.markdown:
        print()
        print(markdown(rows, per_vm, args))
    return 0


def row(runs: list[Run], per_vm: float, level: int, vms: int, *, limit: int) -> dict[str, Any]:
    ideal = math.ceil(vms / level) * per_vm
    wall = median([r.wall for r in runs])
    fleet = median([r.fleet_seconds for r in runs])
    cpu = median([r.cpu for r in runs])
    return {
        "parallel": runs[0].parallel,
        "max_parallel": limit,
        "vms": vms,
        "runs": len(runs),
        "ideal": ideal,
        "wall": wall,
        "wall_ratio": wall / ideal,
        "fleet": fleet,
        "fleet_ratio": fleet / ideal,
        "cpu": cpu,
        "cpu_ms_per_vm": 1000 * cpu / vms,
        "rss": max(r.maxrss_mb for r in runs),
        "peak_parallel": max(r.peak_parallel for r in runs),
        "double_max_running": max(r.double_max_running for r in runs),
        "double_cpu": median([r.double_cpu for r in runs]),
        "vm_median": median([s for r in runs for s in r.vm_seconds]),
        "vm_max": max(s for r in runs for s in r.vm_seconds),
        "ok": min(r.ok for r in runs),
        "walls": [round(r.wall, 2) for r in runs],
    }


def describe(r: dict[str, Any]) -> str:
    return (
        f"--parallel {r['parallel']} max_parallel {r['max_parallel']}: {r['vms']} VMs "
        f"({r['ok']} ok), wall {r['wall']:.2f} s {r['walls']} vs ideal {r['ideal']:.2f} s "
        f"= {r['wall_ratio']:.3f}x (fleet {r['fleet']:.2f} s = {r['fleet_ratio']:.3f}x); "
        f"CPU {r['cpu']:.2f} s ({r['cpu_ms_per_vm']:.1f} ms/VM), peak RSS {r['rss']:.1f} MB; "
        f"peak_parallel {r['peak_parallel']}, double saw {r['double_max_running']} "
        f"snapshot tasks at once (double CPU {r['double_cpu']:.2f} s); "
        f"per-VM run median {r['vm_median']:.3f} s, max {r['vm_max']:.3f} s"
    )


def markdown(rows: list[dict[str, Any]], per_vm: float, args: argparse.Namespace) -> str:
    lines = [
        "| --parallel | max_parallel | VMs | ideal | wall (median) | wall / ideal | fleet "
        "seconds / ideal | coordinator CPU | CPU per VM | peak RSS | peak_parallel | "
        "double: snapshot tasks at once | per-VM run median / max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['parallel']} | {r['max_parallel']} | {r['vms']} | {r['ideal']:.1f} s | "
            f"{r['wall']:.2f} s ({r['runs']} runs) | {r['wall_ratio']:.3f} | "
            f"{r['fleet_ratio']:.3f} | {r['cpu']:.2f} s | {r['cpu_ms_per_vm']:.1f} ms | "
            f"{r['rss']:.0f} MB | {r['peak_parallel']} | {r['double_max_running']} | "
            f"{r['vm_median']:.2f} / {r['vm_max']:.2f} s |"
        )
    lines.append("")
    lines.append(
        f"per-VM time {per_vm:.3f} s (one VM alone, task {args.task_seconds:g} s); "
        "ideal = ceil(VMs / N) x per-VM time"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

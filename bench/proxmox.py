"""Benchmark: API calls per operation and wall time of the Proxmox adapter against the API double.

The double (tests/pve_api) serves HTTPS on 127.0.0.1 with task durations close to a small real
cluster on local LVM-thin/ZFS storage (snapshot 1.5 s, rollback 2.5 s, delete 1.0 s; --scale to
change them). For each operation it prints the API requests the adapter made, the wall time,
and the *overshoot*: wall time minus the task's own duration, i.e. what polling and HTTP cost.

Usage: ``PYTHONPATH=. python3 bench/proxmox.py [--runs 5] [--scale 1.0] [--markdown]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapcoord.adapters.proxmox import ProxmoxAdapter
from tests.pve_api.testing import make_cert, start_double, ticket_settings, token_settings

DURATIONS = {
    "qmsnapshot": 1.5,
    "vzsnapshot": 1.5,
    "qmrollback": 2.5,
    "vzrollback": 2.5,
    "qmdelsnapshot": 1.0,
    "vzdelsnapshot": 1.0,
}


def _shape(call: str) -> str:
    """'GET /nodes/pve1/tasks/UPID:.../status' -> 'GET /nodes/{node}/tasks/{upid}/status'."""
    parts = call.split(" ", 1)[1].split("/")
    out = []
    for i, part in enumerate(parts):
        prev = parts[i - 1] if i else ""
        if prev == "nodes":
            part = "{node}"
        elif prev in ("qemu", "lxc") and part.isdigit():
            part = "{vmid}"
        elif part.startswith("UPID:"):
            part = "{upid}"
        elif prev == "snapshot" and part not in ("",):
            part = "{snapname}"
        out.append(part)
    return call.split(" ", 1)[0] + " " + "/".join(out)


def measure(
    adapter: ProxmoxAdapter, action: Callable[[], Any], task: float
) -> tuple[float, float, list[str]]:
    start_calls = len(adapter.requests)
    started = time.perf_counter()
    action()
    wall = time.perf_counter() - started
    return wall, wall - task, adapter.requests[start_calls:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply task durations")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    durations = {k: v * args.scale for k, v in DURATIONS.items()}

    with tempfile.TemporaryDirectory() as tmp:
        cert = make_cert(Path(tmp))
        double = start_double(cert)
        double.cluster.task_durations = durations
        results: dict[str, list[tuple[float, float, list[str]]]] = {}
        try:
            for run in range(args.runs):
                for ref, kind in (("db1", "qm"), ("ct1", "vz")):
                    rows = bench_one(double, cert, ref, kind, run, durations)
                    for key, value in rows.items():
                        results.setdefault(key, []).append(value)
            report(results, args.markdown)
        finally:
            double.stop()


def bench_one(
    double: Any, cert: Any, ref: str, kind: str, run: int, durations: dict[str, float]
) -> dict[str, tuple[float, float, list[str]]]:
    rows: dict[str, tuple[float, float, list[str]]] = {}
    guest = "qemu" if kind == "qm" else "lxc"
    name = f"bench-{run}"
    with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
        assert isinstance(adapter, ProxmoxAdapter)
        found: dict[str, Any] = {}
        rows[f"{guest}: connect + find_vm (token)"] = measure(
            adapter, lambda: found.update(vm=adapter.find_vm(ref)), 0.0
        )
        # connect() asked GET /version before measure(): count it in, as the ticket login below
        version = [c for c in adapter.requests if c == "GET /version"]
        wall, over, calls = rows[f"{guest}: connect + find_vm (token)"]
        rows[f"{guest}: connect + find_vm (token)"] = (wall, over, version + calls)
        vm = found["vm"]
        rows[f"{guest}: check_snapshot_ready(quiesce)"] = measure(
            adapter, lambda: adapter.check_snapshot_ready(vm, memory=False, quiesce=True), 0.0
        )
        rows[f"{guest}: list_snapshots"] = measure(adapter, lambda: adapter.list_snapshots(vm), 0.0)
        rows[f"{guest}: create_snapshot"] = measure(
            adapter,
            lambda: found.update(
                snap=adapter.create_snapshot(
                    vm, name, "snapcoord: bench", memory=False, quiesce=False, timeout=60
                )
            ),
            durations[f"{kind}snapshot"],
        )
        rows[f"{guest}: revert_snapshot(start=None)"] = measure(
            adapter,
            lambda: adapter.revert_snapshot(vm, found["snap"], start=None, timeout=60),
            durations[f"{kind}rollback"],
        )
        rows[f"{guest}: delete_snapshot"] = measure(
            adapter,
            lambda: adapter.delete_snapshot(vm, found["snap"], timeout=60),
            durations[f"{kind}delete".replace("delete", "delsnapshot")],
        )
        vmid = int(vm.id)
        double.cluster.lock_guest(vmid, "backup", seconds=2.0)
        rows[f"{guest}: create_snapshot, locked 2 s"] = measure(
            adapter,
            lambda: adapter.create_snapshot(
                vm, name + "l", "snapcoord: bench", memory=False, quiesce=False, timeout=60
            ),
            2.0 + durations[f"{kind}snapshot"],
        )
        adapter.delete_snapshot(vm, adapter.find_snapshot(vm, name + "l"), timeout=60)
    with ProxmoxAdapter("pve", ticket_settings(double, cert)) as adapter:
        assert isinstance(adapter, ProxmoxAdapter)
        rows[f"{guest}: connect + find_vm (ticket)"] = measure(
            adapter, lambda: adapter.find_vm(ref), 0.0
        )
        # the login happened in connect(), before measure(): count it in
        login = [c for c in adapter.requests if c.endswith("/access/ticket")]
        wall, over, calls = rows[f"{guest}: connect + find_vm (ticket)"]
        rows[f"{guest}: connect + find_vm (ticket)"] = (wall, over, login + calls)
    return rows


def report(results: dict[str, list[tuple[float, float, list[str]]]], markdown: bool) -> None:
    if markdown:
        print("| operation | API calls | calls by kind | wall (median) | overshoot (median) |")
        print("|---|---|---|---|---|")
    for key, samples in results.items():
        walls = [s[0] for s in samples]
        overs = [s[1] for s in samples]
        calls = samples[-1][2]
        kinds = Counter(_shape(c) for c in calls)
        shown = "; ".join(f"{n}x {k}" if n > 1 else k for k, n in kinds.items())
        if markdown:
            print(
                f"| {key} | {len(calls)} | {shown} | {statistics.median(walls):.3f} s "
                f"| {statistics.median(overs):+.3f} s |"
            )
        else:
            print(
                f"{key:42} calls={len(calls):2}  wall={statistics.median(walls):6.3f}s  "
                f"overshoot={statistics.median(overs):+.3f}s  [{shown}]"
            )


if __name__ == "__main__":
    main()

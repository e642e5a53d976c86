"""Per-call latency of create/list/revert/delete on the vSphere simulator: snapcoord's adapter
against a minimal direct pyVmomi script doing the same calls over one session.

    python3 bench/vsphere.py [--runs 5] [--iterations 30] [--json]

Builds and starts tests/vcsim (needs golang-go and golang-github-vmware-govmomi-dev), runs
``runs`` rounds; each round measures ``iterations`` create -> list -> revert -> delete cycles
with each implementation (alternating which goes first), and reports the median of the
per-round medians in milliseconds. Both sides verify TLS against the simulator's certificate.
"""

from __future__ import annotations

import argparse
import json
import platform
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pyVim.connect import SmartConnect  # noqa: E402
from pyVmomi import vmodl  # noqa: E402

from snapcoord.adapters.vsphere import VSphereAdapter  # noqa: E402
from tests.vcsim_fixture import CLUSTER_VM, VCSim, build_vcsim, start_vcsim, stop_vcsim  # noqa: E402

OPS = ("create", "list", "revert", "delete")
PC: Any = vmodl.query.PropertyCollector


class Direct:
    """The minimal pyVmomi script: one session, tasks polled through the PropertyCollector."""

    def __init__(self, sim: VCSim) -> None:
        ctx = ssl.create_default_context(cafile=str(sim.cert_file))
        ctx.set_ciphers("DEFAULT@SECLEVEL=1")
        connect: Any = SmartConnect
        self.si = connect(
            host=sim.host, port=sim.port, user=sim.user, pwd=sim.password, sslContext=ctx
        )
        self.content = self.si.RetrieveContent()
        self.pc = self.content.propertyCollector
        self.vm = self.content.searchIndex.FindByInventoryPath(f"DC0/vm/{CLUSTER_VM}")

    def read(self, obj: Any, props: list[str]) -> dict[str, Any]:
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=obj)],
            propSet=[PC.PropertySpec(type=type(obj), pathSet=props)],
        )
        (content,) = self.pc.RetrieveContents([spec])
        return {p.name: p.val for p in content.propSet}

    def wait(self, task: Any) -> Any:
        while True:
            info = self.read(task, ["info.state", "info.error", "info.result"])
            if info["info.state"] == "success":
                return info.get("info.result")
            if info["info.state"] == "error":
                raise RuntimeError(info.get("info.error"))
            time.sleep(0.05)

    def create(self, name: str) -> Any:
        return self.wait(self.vm.CreateSnapshot_Task(name, "bench", False, False))

    def list(self) -> Any:
        return self.read(self.vm, ["snapshot"]).get("snapshot")

    def revert(self, snap: Any) -> None:
        self.wait(snap.RevertToSnapshot_Task())

    def delete(self, snap: Any) -> None:
        self.wait(snap.RemoveSnapshot_Task(False, True))

    def close(self) -> None:
        self.content.sessionManager.Logout()


def timed(func: Callable[[], Any], sink: list[float]) -> Any:
    start = time.perf_counter()
    result = func()
    sink.append((time.perf_counter() - start) * 1000)
    return result


def cycle_snapcoord(
    adapter: VSphereAdapter, vm: Any, n: int, times: dict[str, list[float]]
) -> None:
    snap = timed(
        lambda: adapter.create_snapshot(
            vm, f"bench-{n}", "bench", memory=False, quiesce=False, timeout=60
        ),
        times["create"],
    )
    timed(lambda: adapter.list_snapshots(vm), times["list"])
    timed(lambda: adapter.revert_snapshot(vm, snap, start=None, timeout=60), times["revert"])
    timed(lambda: adapter.delete_snapshot(vm, snap, timeout=60), times["delete"])


def cycle_direct(direct: Direct, n: int, times: dict[str, list[float]]) -> None:
    snap = timed(lambda: direct.create(f"direct-{n}"), times["create"])
    timed(direct.list, times["list"])
    timed(lambda: direct.revert(snap), times["revert"])
    timed(lambda: direct.delete(snap), times["delete"])


def bench(sim: VCSim, runs: int, iterations: int) -> dict[str, dict[str, float]]:
    adapter = VSphereAdapter("bench", sim.settings())
    adapter.connect()
    vm = adapter.find_vm(CLUSTER_VM)
    direct = Direct(sim)
    medians: dict[str, dict[str, list[float]]] = {
        "snapcoord": {op: [] for op in OPS},
        "direct": {op: [] for op in OPS},
    }
    for run in range(runs + 1):  # run 0 warms up both and is discarded
        order = ["snapcoord", "direct"] if run % 2 else ["direct", "snapcoord"]
        for side in order:
            times: dict[str, list[float]] = {op: [] for op in OPS}
            for n in range(iterations):
                if side == "snapcoord":
                    cycle_snapcoord(adapter, vm, n, times)
                else:
                    cycle_direct(direct, n, times)
            if run:
                for op in OPS:
                    medians[side][op].append(statistics.median(times[op]))
    adapter.close()
    direct.close()
    return {
        side: {op: statistics.median(values) for op, values in ops.items()}
        for side, ops in medians.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, sim = start_vcsim(build_vcsim(), Path(tmp))
        try:
            result = bench(sim, args.runs, args.iterations)
        finally:
            stop_vcsim(proc)
    if args.json:
        print(json.dumps({"runs": args.runs, "iterations": args.iterations, "ms": result}))
        return 0
    print(f"vSphere simulator, {args.runs} runs x {args.iterations} cycles, "
          f"median of run medians (ms); python {platform.python_version()}")  # fmt: skip
    print("| operation | direct pyVmomi | snapcoord | overhead |")
    print("|---|---:|---:|---:|")
    for op in OPS:
        direct, ours = result["direct"][op], result["snapcoord"][op]
        print(f"| {op} | {direct:.2f} | {ours:.2f} | {ours - direct:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A fleet through the real CLI against two Proxmox VE API doubles (two clusters): 26 VMs
snapshotted in parallel, the concurrency the hypervisors saw never above ``--parallel`` nor
either cluster's ``max_parallel``; failing VMs leave the others ok and the exit code is the
most severe one; the JSON stream ends with a summary; SIGTERM cancels the fleet."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import (
    DEMO_BIN,
    REPO,
    STAND_IN_SERVICES,
    json_lines,
    running_stand_ins,
    snapcoord,
    write_config,
)
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    TOKEN_ENV,
    TOKEN_ID,
    TOKEN_SECRET,
    Cert,
    hypervisor_table,
    make_cert,
    start_double,
)

TASK_SECONDS = 0.4
PER_CLUSTER = 12


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("fleet-tls"))


@pytest.fixture
def clusters(cert: Cert) -> Iterator[dict[str, PveApiDouble]]:
    doubles = {name: start_double(cert, task_seconds=TASK_SECONDS) for name in ("pa", "pb")}
    for double in doubles.values():
        for i in range(PER_CLUSTER):
            double.cluster.add_guest(1000 + i, "qemu", "pve1", f"vm{i:02}")
    yield doubles
    for double in doubles.values():
        double.stop()


def fleet_config(
    path: Path, clusters: dict[str, PveApiDouble], cert: Cert, limits: dict[str, int]
) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(path.parent / "store"), "label": "nightly"},
    }
    for name, double in clusters.items():
        tables[f"hypervisors.{name}"] = hypervisor_table(
            double, cert, max_parallel=limits[name], lock_wait_seconds=0.5
        )
        for i in range(PER_CLUSTER):
            tags = ["prod"] if i % 2 else ["test"]
            tables[f"vms.{name}-{i:02}"] = {"hypervisor": name, "vmid": 1000 + i, "tags": tags}
    # two that fail: one not on its hypervisor (exit 3), one whose guest cannot be reached
    # (exit 4: nothing was changed)
    tables["vms.gone"] = {"hypervisor": "pa", "name": "no-such-vm", "tags": ["prod"]}
    tables["vms.mute"] = {"hypervisor": "pb", "vmid": 1000, "tags": ["prod"]}
    tables["vms.mute.guest"] = {"transport": "exec", "exec_prefix": ["/bin/false"]}
    return write_config(path, tables)


def task_intervals(double: PveApiDouble, kind: str = "qmsnapshot") -> list[tuple[float, float]]:
    with double.cluster.lock:
        return [
            (task.ends_at - TASK_SECONDS, task.ends_at)
            for task in double.cluster.tasks.values()
            if task.type == kind
        ]


def peak(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = best = 0
    for _, change in events:  # an end sorts before a start at the same instant
        now += change
        best = max(best, now)
    return best


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return snapcoord("-c", str(config), *args, env={TOKEN_ENV: TOKEN_SECRET})


def start_cli(config: Path, *args: str, **popen: Any) -> subprocess.Popen[str]:
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        [sys.executable, "-m", "snapcoord", "-c", str(config), *args],
        cwd=REPO,
        env={**os.environ, TOKEN_ENV: TOKEN_SECRET},
        text=True,
        **popen,
    )


def sigterm_when(
    child: subprocess.Popen[str], ready: Callable[[], bool], *, then: Callable[[], None]
) -> tuple[str, str]:
    """Wait until ``ready()``, call ``then()`` (assertions on the state right now), send
    SIGTERM; the child's output. The child never outlives the call."""
    try:
        deadline = time.monotonic() + 30
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready()
        then()
        child.send_signal(signal.SIGTERM)
        return child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_fleet_runs_within_both_limits_and_failures_stay_local(
    clusters: dict[str, PveApiDouble], cert: Cert, tmp_path: Path
) -> None:
    config = fleet_config(tmp_path / "snapcoord.toml", clusters, cert, {"pa": 2, "pb": 3})
    proc = run_cli(config, "snapshot", "--all", "--parallel", "4", "--json")
    *per_vm, last = json_lines(proc.stdout)

    # every VM reported once; the two broken ones failed with their own codes, nobody else
    codes = {item["vm"]: item["exit_code"] for item in per_vm}
    assert len(codes) == len(per_vm) == 2 * PER_CLUSTER + 2
    assert codes.pop("gone") == 3 and codes.pop("mute") == 4
    assert set(codes.values()) == {0}
    assert proc.returncode == 4, proc.stderr  # preflight (4) outranks hypervisor (3)
    assert last == {
        "summary": {
            "command": "snapshot",
            "vms": 26,
            "ok": 24,
            "failed": 2,
            "outcomes": {"hypervisor_error": 1, "ok": 24, "preflight_failed": 1},
            "exit_code": 4,
            "seconds": last["summary"]["seconds"],
            "peak_parallel": last["summary"]["peak_parallel"],
        }
    }
    assert "gone" in proc.stderr and "no-such-vm" in proc.stderr

    # what the hypervisors saw: one snapshot per good VM, never more at once than allowed
    for double in clusters.values():
        names = [
            s.name
            for guest in double.cluster.guests.values()
            for s in guest.snapshots.values()
            if guest.vmid >= 1000
        ]
        assert len(names) == PER_CLUSTER and all(n.startswith("snapcoord-nightly-") for n in names)
    seen_a, seen_b = (peak(task_intervals(clusters[n])) for n in ("pa", "pb"))
    both = peak(task_intervals(clusters["pa"]) + task_intervals(clusters["pb"]))
    assert seen_a <= 2 and seen_b <= 3 and both <= 4
    assert both >= 3  # it did run in parallel
    assert 3 <= last["summary"]["peak_parallel"] <= 4


def test_tag_and_exclude_select_and_plain_lines_without_a_terminal(
    clusters: dict[str, PveApiDouble], cert: Cert, tmp_path: Path
) -> None:
    config = fleet_config(tmp_path / "snapcoord.toml", clusters, cert, {"pa": 4, "pb": 4})
    proc = run_cli(
        config, "snapshot", "--tag", "prod", "--hypervisor", "pa", "--exclude", "gone",
        "--exclude", "mute", "--exclude", "pb-11",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    done = sorted(
        line.split(":")[0] for line in proc.stdout.splitlines() if ": snapshot ok, " in line
    )
    expected = sorted(
        {f"pa-{i:02}" for i in range(PER_CLUSTER)}
        | {f"pb-{i:02}" for i in range(1, PER_CLUSTER, 2)} - {"pb-11"}
    )
    assert done == expected
    # no partial lines: every step line is whole ("vm: -> step ok (t s)")
    steps = [line for line in proc.stdout.splitlines() if " -> " in line or " <- " in line]
    assert steps and all(line.endswith(" s)") for line in steps)
    assert (
        proc.stdout.splitlines()[-1]
        == f"snapshot: {len(expected)} VMs: {len(expected)} ok (exit 0)"
    )


def test_one_vm_by_name_prints_as_before_without_a_summary(
    clusters: dict[str, PveApiDouble], cert: Cert, tmp_path: Path
) -> None:
    config = fleet_config(tmp_path / "snapcoord.toml", clusters, cert, {"pa": 4, "pb": 4})
    proc = run_cli(config, "snapshot", "pa-00", "--json")
    assert proc.returncode == 0, proc.stderr
    (only,) = json_lines(proc.stdout)
    assert only["vm"] == "pa-00" and only["ok"] is True


def test_sigterm_cancels_the_running_vms_and_starts_no_new_one(
    clusters: dict[str, PveApiDouble], cert: Cert, tmp_path: Path
) -> None:
    for double in clusters.values():
        double.cluster.task_durations["qmsnapshot"] = 30.0  # long enough to be cut
    config = fleet_config(tmp_path / "snapcoord.toml", clusters, cert, {"pa": 2, "pb": 2})
    child = start_cli(
        config, "snapshot", "--hypervisor", "pa", "--exclude", "gone", "--parallel", "2", "--json"
    )
    out, err = sigterm_when(
        child, lambda: len(task_intervals(clusters["pa"])) == 2, then=lambda: None
    )
    assert child.returncode == 130, err
    *per_vm, last = json_lines(out)
    assert len(per_vm) == PER_CLUSTER and all(item["exit_code"] == 130 for item in per_vm)
    assert last["summary"]["outcomes"] == {"interrupted": PER_CLUSTER}
    not_started = [item for item in per_vm if "not started" in " ".join(item["errors"])]
    assert len(not_started) == PER_CLUSTER - 2
    assert len(task_intervals(clusters["pa"])) == 2  # no snapshot was started after the signal


def test_on_a_terminal_running_vms_are_a_live_block_redrawn_in_place(
    clusters: dict[str, PveApiDouble], cert: Cert, tmp_path: Path
) -> None:
    config = fleet_config(tmp_path / "snapcoord.toml", clusters, cert, {"pa": 3, "pb": 3})
    primary, secondary = pty.openpty()
    child = start_cli(
        config, "snapshot", "--hypervisor", "pa", "--exclude", "gone", "--parallel", "3",
        stdin=subprocess.DEVNULL, stdout=secondary,
    )  # fmt: skip
    os.close(secondary)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        assert child.wait(timeout=60) == 0, child.stderr.read() if child.stderr else ""
    finally:
        os.close(primary)
        if child.poll() is None:
            child.kill()
            child.wait()
    text = screen.decode()
    # running VMs are drawn as "  <vm>: <step> ... <n> s" and erased in place ("\x1b[<n>F\x1b[J")
    assert re.search(r"  pa-\d\d: [a-z].* \.\.\. \d+ s", text)
    assert re.search(r"\x1b\[[1-3]F\x1b\[J", text)
    finished = re.findall(r"^(pa-\d\d): snapshot ok, ", text, re.MULTILINE)
    assert sorted(finished) == [f"pa-{i:02}" for i in range(PER_CLUSTER)]
    assert " -> " not in text  # no step lines: the live block replaces them
    assert text.rstrip().endswith(f"snapshot: {PER_CLUSTER} VMs: {PER_CLUSTER} ok (exit 0)")


def guest_fleet_config(
    path: Path, double: PveApiDouble, cert: Cert, count: int
) -> tuple[Path, dict[str, Path]]:
    """``count`` VMs on one double, each with its own stand-in guest (the demo's service
    commands through the exec transport, one state folder per VM)."""
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(path.parent / "store"), "label": "nightly"},
        "hypervisors.pa": {
            "type": "proxmox",
            "host": "127.0.0.1",
            "port": double.port,
            "token_id": TOKEN_ID,
            "token_secret": {"env": TOKEN_ENV},
            "ca_file": str(cert.cert),
            "max_parallel": 3,
        },
    }
    states = {}
    for i in range(count):
        key = f"db{i}"
        state = path.parent / f"state-{key}"
        state.mkdir()
        for name in STAND_IN_SERVICES:
            (state / f"{name}.running").touch()
        states[key] = state
        tables[f"vms.{key}"] = {"hypervisor": "pa", "vmid": 1000 + i}
        tables[f"vms.{key}.guest"] = {
            "transport": "exec",
            "exec_prefix": [
                "env",
                f"PATH={DEMO_BIN}:/usr/bin:/bin",
                f"DEMO_STATE={state}",
                f"SNAPCOORD_LEASE_DIR={state}/lease",
            ],
            "database": "mariadb",
        }
    return write_config(path, tables), states


def test_guests_in_parallel_each_get_their_window_and_all_run_after(
    clusters: dict[str, PveApiDouble], cert: Cert, tmp_path: Path
) -> None:
    config, states = guest_fleet_config(tmp_path / "c.toml", clusters["pa"], cert, 6)
    proc = run_cli(config, "snapshot", "--all", "--parallel", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    *per_vm, last = json_lines(proc.stdout)
    assert sorted(r["vm"] for r in per_vm) == sorted(states)
    assert all(r["window_seconds"] > 0 and r["services_down"] == [] for r in per_vm)
    assert last["summary"]["peak_parallel"] == 3
    for state in states.values():
        assert running_stand_ins(state) == STAND_IN_SERVICES


def test_sigterm_while_guests_are_down_brings_every_service_back(
    clusters: dict[str, PveApiDouble], cert: Cert, tmp_path: Path
) -> None:
    double = clusters["pa"]
    double.cluster.task_durations["qmsnapshot"] = 30.0
    config, states = guest_fleet_config(tmp_path / "c.toml", double, cert, 5)
    child = start_cli(config, "snapshot", "--all", "--parallel", "3", "--json")
    down: list[str] = []

    def three_are_down() -> None:  # inside their window: their services are down right now
        down.extend(key for key, state in states.items() if not running_stand_ins(state))
        assert len(down) == 3, {k: running_stand_ins(s) for k, s in states.items()}

    out, err = sigterm_when(child, lambda: len(task_intervals(double)) >= 3, then=three_are_down)
    assert child.returncode == 130, err
    for state in states.values():  # every service that ran before runs again
        assert running_stand_ins(state) == STAND_IN_SERVICES
    *per_vm, _ = json_lines(out)
    interrupted = {r["vm"] for r in per_vm if r.get("window_seconds")}
    assert interrupted == set(down)  # the two never started were never touched

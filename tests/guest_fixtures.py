"""Fixtures and helpers for the guest tests: configs for the loopback guest, an observing
libvirt adapter, and a CLI runner that installs it.

The guest's real services (mariadb, apache2, cron) are the worker's lab sandbox's own
(tests/lab/sandbox.py); ``guest_services`` (tests/conftest.py) holds the sandbox's lab lock for
the whole test.

``python -m tests.guest_fixtures ARGS...`` runs ``snapcoord ARGS...`` with the libvirt adapter
replaced by :class:`ObservingLibvirtAdapter`, which records, at the moment ``create_snapshot`` is
called, what the guest's services look like *from outside* (process table, init scripts), into
the JSON-lines file named by ``$SNAPCOORD_TEST_OBSERVE``. ``$SNAPCOORD_TEST_FAIL_SNAPSHOT=1``
makes ``create_snapshot`` fail like a hypervisor would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord.adapters.base import VM, Snapshot
from snapcoord.errors import HypervisorError
from tests import lab
from tests.cli_helpers import REPO, write_config

OBSERVE_ENV = "SNAPCOORD_TEST_OBSERVE"
FAIL_ENV = "SNAPCOORD_TEST_FAIL_SNAPSHOT"
DELAY_ENV = "SNAPCOORD_TEST_SNAPSHOT_SECONDS"  # a slow hypervisor: create_snapshot takes this long
VM_NAME = "web1"  # a running domain of tests.libvirt_nodes.DEFAULT_DOMAINS


@pytest.fixture
def lab_services(guest_services: lab.GuestServices) -> Iterator[lab.GuestServices]:
    """``guest_services`` (all three running before and after, under the lab lock)."""
    yield guest_services
    guest_services.ensure_running()


def guest_config(
    tmp_path: Path,
    uri: str,
    guest: dict[str, Any],
    *,
    hooks: dict[str, Any] | None = None,
    vm: str = VM_NAME,
    name: str | None = None,
) -> Path:
    """A config with one libvirt hypervisor (``uri``) and one VM whose guest table is ``guest``."""
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store"), "label": "test"},
        "hypervisors.lab": {"type": "libvirt", "uri": uri},
        f"vms.{vm}": {"hypervisor": "lab", **({"name": name} if name else {})},
        # lab services stop in ~2 s; the watchdog must outlast both stops (config check)
        f"vms.{vm}.guest": {"watchdog_seconds": 120, "stop_timeout": 30.0, **guest},
    }
    if hooks:
        tables[f"vms.{vm}.hooks"] = hooks
    return write_config(tmp_path / "snapcoord.toml", tables)


def observed(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_observed(
    *args: str,
    observe: Path,
    fail_snapshot: bool = False,
    snapshot_seconds: float = 0,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a child process with :class:`ObservingLibvirtAdapter` installed."""
    env = {**os.environ, OBSERVE_ENV: str(observe), DELAY_ENV: str(snapshot_seconds)}
    if fail_snapshot:
        env[FAIL_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-m", "tests.guest_fixtures", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def popen_observed(*args: str, observe: Path, snapshot_seconds: float = 0) -> subprocess.Popen[str]:
    env = {**os.environ, OBSERVE_ENV: str(observe), DELAY_ENV: str(snapshot_seconds)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.guest_fixtures", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll until ``predicate()`` is true; return the seconds it took; fail the test otherwise."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def watchdog_pids(run: str) -> list[int]:
    """PIDs of the guest watchdog of run ``run`` (its arguments carry snapcoord-watchdog-<run>).

    Only this run's, and only the watchdog itself, the leader of its own process group: the
    short-lived forks of its shell carry the same arguments for a moment."""
    marker = f"snapcoord-watchdog-{run}"
    return [
        pid
        for pid, _comm, args in lab.process_table()
        if marker in args.split() and lab.stat_fields(pid)[2:3] == [str(pid)]
    ]


def guest_state() -> dict[str, Any]:
    """The guest's services, seen from outside."""
    return {
        "mysqld": lab.mysqld_running(),
        "apache2": lab.service_running("apache2"),
        "cron": lab.service_running("cron"),
        "postmaster": lab.postmaster_pid() if lab.which("pg_lsclusters") else None,
        "time": time.time(),
    }


def _observing_class() -> type:
    from snapcoord.adapters.libvirt_adapter import LibvirtAdapter

    class ObservingLibvirtAdapter(LibvirtAdapter):
        """The real libvirt adapter, plus a look at the guest when the snapshot is taken."""

        def _record(self, event: str, **data: Any) -> None:
            path = os.environ.get(OBSERVE_ENV)
            if path:
                with open(path, "a") as handle:
                    handle.write(json.dumps({"event": event, **data}) + "\n")

        def create_snapshot(
            self,
            vm: VM,
            name: str,
            description: str,
            *,
            memory: bool,
            quiesce: bool,
            timeout: float,
        ) -> Snapshot:
            self._record("create_snapshot", name=name, **guest_state())
            time.sleep(float(os.environ.get(DELAY_ENV) or 0))
            if os.environ.get(FAIL_ENV):
                raise HypervisorError("simulated failure: datastore full", vm=vm.name)
            return super().create_snapshot(
                vm, name, description, memory=memory, quiesce=quiesce, timeout=timeout
            )

        def revert_snapshot(
            self, vm: VM, snapshot: Snapshot, *, start: bool | None, timeout: float
        ) -> None:
            self._record("revert_snapshot", name=snapshot.name, **guest_state())
            super().revert_snapshot(vm, snapshot, start=start, timeout=timeout)

    return ObservingLibvirtAdapter


ObservingLibvirtAdapter = None  # set lazily by main(); the class needs libvirt


def main(argv: list[str]) -> int:
    global ObservingLibvirtAdapter
    from snapcoord import adapters, cli

    ObservingLibvirtAdapter = _observing_class()  # type: ignore[assignment]
    adapters.REGISTRY["libvirt"] = (__name__, "ObservingLibvirtAdapter", "libvirt", ("libvirt",))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Crash safety with the exec transport and the demo's stand-in services: a run killed with
SIGKILL inside the window leaves a journal; the next run refuses to start over it; `recover`
starts what it names and disarms the watchdog."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import (
    DEMO_BIN,
    REPO,
    STAND_IN_SERVICES,
    running_stand_ins,
    snapcoord,
    stand_in_guest,
)
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture  # noqa: F401 - fixture


@pytest.fixture
def exec_guest(tmp_path: Path, libvirt_node: str) -> tuple[Path, Path]:
    return stand_in_guest(
        tmp_path,
        libvirt_node,
        guest={"watchdog_seconds": 300},
        tables={"vms.db1.hooks": {"frozen": ["sleep 60"]}},
    )


def _wait_for(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_killed_run_is_recovered(exec_guest: tuple[Path, Path], tmp_path: Path) -> None:
    config, state = exec_guest
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapcoord", "-c", str(config), "snapshot", "db1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: not running_stand_ins(state))  # all three stopped: inside the window
        journal = tmp_path / "store" / "journal" / "db1.json"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    data = json.loads(journal.read_text())
    assert sorted(data["stopped"]) == ["apache2", "cron", "mariadb"]
    assert data["watchdog"]["pid"] > 0
    watchdog_pid = data["watchdog"]["pid"]
    assert Path(f"/proc/{watchdog_pid}").exists()

    refused = snapcoord("-c", str(config), "snapshot", "db1")
    assert refused.returncode == 4
    assert "snapcoord recover db1" in refused.stderr
    assert not running_stand_ins(state)  # the refused run touched nothing

    fixed = snapcoord("-c", str(config), "recover", "db1")
    assert fixed.returncode == 0, fixed.stderr
    assert "started mariadb" in fixed.stdout and "disarmed the watchdog" in fixed.stdout
    assert running_stand_ins(state) == STAND_IN_SERVICES
    _wait_for(lambda: not Path(f"/proc/{watchdog_pid}").exists() or _zombie(watchdog_pid))
    assert not journal.exists()

    again = snapcoord("-c", str(config), "recover", "db1")
    assert again.returncode == 0 and "nothing to recover" in again.stdout


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_frozen_hook_failure_restores_services_and_takes_no_snapshot(
    exec_guest: tuple[Path, Path],
) -> None:
    config, state = exec_guest
    text = config.read_text().replace('frozen = ["sleep 60"]', 'frozen = ["exit 7"]')
    config.write_text(text)
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json")
    run = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 4
    assert "frozen hook #1 failed (exit 7)" in run["errors"][0]
    assert "hypervisor snapshot" not in [s["name"] for s in run["steps"]]
    assert running_stand_ins(state) == STAND_IN_SERVICES
    assert run["window_seconds"] > 0 and run["services_down"] == []


def test_service_stopped_before_the_run_stays_stopped(exec_guest: tuple[Path, Path]) -> None:
    config, state = exec_guest
    config.write_text(config.read_text().replace('frozen = ["sleep 60"]', "frozen = []"))
    (state / "cron.running").unlink()
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert running_stand_ins(state) == {"apache2", "mariadb"}


def test_the_journal_names_the_disarm_before_the_watchdog_is_armed(
    tmp_path: Path, libvirt_node: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill during the arm must leave a journal that makes the next run look for the
    watchdog: the pending disarm is written before the arm command is sent."""
    from snapcoord import cli
    from snapcoord.config import load_config
    from snapcoord.hooks.guest import watchdog
    from snapcoord.journal import RunRecord
    from snapcoord.leftovers import DISARM, services_of, unfinished

    config, _state = stand_in_guest(tmp_path, libvirt_node, guest={"watchdog_seconds": 300})
    journal = tmp_path / "store" / "journal" / "db1.json"
    seen: list[dict[str, object]] = []
    arm = watchdog.arm

    def observed_arm(*args: object, **kwargs: object) -> watchdog.Watchdog:
        seen.append(json.loads(journal.read_text()))
        return arm(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(watchdog, "arm", observed_arm)
    assert cli.main(["-c", str(config), "snapshot", "db1"]) == 0
    (at_arm,) = seen
    assert DISARM in at_arm["pending"]  # type: ignore[operator]
    record = RunRecord.parse(
        at_arm, services=services_of(load_config(config), "db1"), vm="db1", path=journal
    )
    assert unfinished(record)
    assert not journal.exists()


# -- the journal of a killed run ---------------------------------------------------------------
# A run that leaves a service down keeps its journal: the next run refuses to start over it
# and `recover` starts what it names. The CLI in a child process, libvirt's test driver, and the
# demo's stand-in services (exec transport) with one that can be made to fail its start.


# In front of the demo's `service`: a start fails while $DEMO_STATE/NAME.broken exists.
BREAKABLE_SERVICE = f"""#!/bin/sh
if [ "$2" = start ] && [ -e "$DEMO_STATE/$1.broken" ]; then
  echo "$1: configuration error (test)" >&2; exit 1
fi
exec {DEMO_BIN}/service "$@"
"""


def breakable_cron_guest(tmp_path: Path, libvirt_node: str) -> tuple[Path, Path]:
    """(config, stand-in state folder) of db1, whose cron's configuration breaks inside the
    window: cron cannot start again until ``<state>/cron.broken`` is removed."""
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "service").write_text(BREAKABLE_SERVICE)
    (wrapper / "service").chmod(0o755)
    state = tmp_path / "state"
    config, _ = stand_in_guest(
        tmp_path,
        libvirt_node,
        guest={"start_timeout": 5.0},
        tables={"vms.db1.hooks": {"frozen": [f"touch {state}/cron.broken"]}},
        path_prefix=wrapper,
    )
    return config, state


def test_a_service_left_down_keeps_the_journal_until_recover(
    tmp_path: Path, libvirt_node: str
) -> None:
    config, state = breakable_cron_guest(tmp_path, libvirt_node)
    journal = tmp_path / "store" / "journal" / "db1.json"

    first = snapcoord("-c", str(config), "snapshot", "db1", "--json")
    assert first.returncode == 6, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["services_down"] == ["cron"]
    assert running_stand_ins(state) == {"apache2", "mariadb"}
    assert journal.exists(), "the journal of a run that left cron down was removed"
    assert "cron" in json.loads(journal.read_text())["stopped"]

    refused = snapcoord("-c", str(config), "snapshot", "db1")
    assert refused.returncode == 4
    assert "snapcoord recover db1" in refused.stderr
    assert running_stand_ins(state) == {"apache2", "mariadb"}  # the refused run touched nothing

    (state / "cron.broken").unlink()  # the admin fixed cron
    fixed = snapcoord("-c", str(config), "recover", "db1")
    assert fixed.returncode == 0, fixed.stderr
    assert running_stand_ins(state) == {"apache2", "cron", "mariadb"}
    assert not journal.exists()


def test_recover_over_a_selection_each_vm_on_its_own(tmp_path: Path, libvirt_node: str) -> None:
    """``recover --all``: db1's cron still cannot start (its one error line, exit 6), db2's is
    started, web has nothing to recover; then ``--json`` gives one document."""
    config, state = breakable_cron_guest(tmp_path, libvirt_node)
    wrapper = tmp_path / "bin"  # its breakable `service`, for db2 too
    state2 = tmp_path / "state2"
    state2.mkdir()
    for name in STAND_IN_SERVICES:
        (state2 / f"{name}.running").touch()
    prefix = ["env", f"PATH={wrapper}:{DEMO_BIN}:/usr/bin:/bin", f"DEMO_STATE={state2}",
              f"SNAPCOORD_LEASE_DIR={state2}/lease"]  # a guest of its own  # fmt: skip
    with config.open("a") as extra:
        extra.write(
            '\n[vms.db2]\nhypervisor = "lab"\nname = "web1"\n'
            f'[vms.db2.guest]\ntransport = "exec"\nexec_prefix = {json.dumps(prefix)}\n'
            'database = "mariadb"\nstart_timeout = 5.0\n'
            f'[vms.db2.hooks]\nfrozen = ["touch {state2}/cron.broken"]\n'
            '\n[vms.web]\nhypervisor = "lab"\nname = "stopped1"\n'
        )
    for vm in ("db1", "db2"):  # each run leaves its cron down and keeps its journal
        assert snapcoord("-c", str(config), "snapshot", vm).returncode == 6
    (state2 / "cron.broken").unlink()  # db2's cron is fixed, db1's is not

    proc = snapcoord("-c", str(config), "recover", "--all")
    assert proc.returncode == 6, proc.stderr
    lines = proc.stdout.splitlines()
    # the journal names all the run stopped (in the order the parallel stops were issued)
    assert lines[1] in ("db2: started apache2, cron", "db2: started cron, apache2")
    assert lines[:1] + lines[2:] == [
        "db2: started mariadb",
        "db2: disarmed the watchdog",
        "web: nothing to recover: no unfinished run",
        "recover: 3 VMs: 2 ok, 1 service_not_restored (exit 6)",
    ]
    (error,) = proc.stderr.splitlines()
    assert error.startswith("snapcoord: error: db1: ") and "cron" in error
    assert running_stand_ins(state2) == STAND_IN_SERVICES
    assert running_stand_ins(state) == {"apache2", "mariadb"}
    assert (tmp_path / "store" / "journal" / "db1.json").exists()
    assert not (tmp_path / "store" / "journal" / "db2.json").exists()

    (state / "cron.broken").unlink()
    done = snapcoord("-c", str(config), "recover", "db1", "db2", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert list(document["vms"]) == ["db1", "db2"] and document["summary"]["exit_code"] == 0
    assert "disarmed the watchdog" in document["vms"]["db1"]["actions"]
    assert any("cron" in action for action in document["vms"]["db1"]["actions"])
    assert document["vms"]["db2"]["actions"] == ["nothing to recover: no unfinished run"]
    assert running_stand_ins(state) == STAND_IN_SERVICES

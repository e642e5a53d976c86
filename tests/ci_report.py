"""pytest plugin: a failure is reported the moment it happens, with the machine's state.

pytest-xdist prints failures only once the whole session has ended. A CI run that is stopped by
its time limit therefore shows a row of ``F`` and nothing else. In the process that starts
pytest (the controller), this plugin prints, as each test ends:

* ``FAILED <nodeid> (<phase>, <seconds> s, <worker>): <last line of the error>`` for every
  failure or error, with the machine's state at that moment;
* every ``HEARTBEAT_SECONDS``, one line with the tests done so far and the machine's state.

The machine's state is the load average, the memory available, and the free space of ``/`` and
``/var/tmp``: what tells a loaded or full machine from a broken test.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

HEARTBEAT_SECONDS = 300.0
_STATE = pytest.StashKey[dict[str, float]]()
#: the controller's config (pytest_runtest_logreport is given only the report)
_CONFIG: dict[str, pytest.Config] = {}


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def _memory_available_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def _free_gib(path: str) -> float:
    try:
        return shutil.disk_usage(path).free / 2**30
    except OSError:
        return float("nan")


def machine_state() -> str:
    """One line: load average, memory available, free disk."""
    try:
        load = "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        load = "?"
    return (
        f"load {load}, {os.cpu_count()} cpus, mem available {_memory_available_gib():.1f} GiB, "
        f"free / {_free_gib('/'):.1f} GiB, /var/tmp {_free_gib('/var/tmp'):.1f} GiB"
    )


def _first_line(report: pytest.TestReport) -> str:
    """What pytest's short summary says of the failure: its crash message's first line."""
    crash = getattr(report.longrepr, "reprcrash", None)
    message = str(getattr(crash, "message", "") or "").strip()
    if not message:
        message = (report.longreprtext or "").strip() or "(no message)"
    return message.splitlines()[0][:300]


def _elapsed(config: pytest.Config) -> str:
    seconds = time.monotonic() - config.stash[_STATE]["start"]
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def pytest_configure(config: pytest.Config) -> None:
    if not _is_controller(config):
        return
    now = time.monotonic()
    config.stash[_STATE] = {"start": now, "heartbeat": now, "done": 0.0, "failed": 0.0}
    _CONFIG["config"] = config


def pytest_unconfigure(config: pytest.Config) -> None:
    _CONFIG.pop("config", None)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if _STATE in config.stash and reporter is not None:
        reporter.write_line(f"machine at start: {machine_state()}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG.get("config")
    if config is None:
        return
    state = config.stash[_STATE]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if report.when == "teardown":
        state["done"] += 1
    if report.failed:
        state["failed"] += 1
        worker = getattr(report, "node", None)
        where = getattr(worker, "gateway", None)
        worker_id = getattr(where, "id", "main")
        reporter.write("\n")
        reporter.write_line(
            f"FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s, {worker_id}, "
            f"at {_elapsed(config)}): {_first_line(report)} [{machine_state()}]",
            red=True,
        )
    now = time.monotonic()
    if now - state["heartbeat"] >= HEARTBEAT_SECONDS:
        state["heartbeat"] = now
        reporter.write("\n")
        reporter.write_line(
            f"at {_elapsed(config)}: {int(state['done'])} tests done, "
            f"{int(state['failed'])} failures; {machine_state()}"
        )

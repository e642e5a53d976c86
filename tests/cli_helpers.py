"""Running the real CLI as a subprocess, and writing configs, for the CLI tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """``tables`` maps a table name ("vms.db1.guest") to its keys."""
    lines = []
    for name, keys in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


#: what starts every line snapcoord prints on a stream that is not a terminal: the local time in
#: ISO 8601 with its offset, then a space (snapcoord.output.StampedStream; tests/test_stamps.py
#: checks it against the clock)
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ")


def unstamped(text: str, *, stamped: bool = True) -> str:
    """``text`` with the time stamp taken off each line, after checking that every line has
    one. ``stamped=False``: checks that no line has one (JSON, the example config)."""
    lines = text.splitlines(keepends=True)
    if not stamped:
        assert not any(STAMP.match(line) for line in lines), f"a stamp in: {text!r}"
        return text
    for line in lines:
        assert STAMP.match(line), f"a line without its time stamp: {line!r} in {text!r}"
    return "".join(STAMP.sub("", line, count=1) for line in lines)


def without_stamp(line: str) -> str:
    """One line without its time stamp, if it has one (for messages about a failure)."""
    found = STAMP.match(line)
    return line[found.end() :] if found else line


def stdout_stamped(args: tuple[str, ...] | list[str]) -> bool:
    """Whether snapcoord stamps its stdout for ``args`` (not a terminal): not when a program
    reads it (``--json``, ``config example``), nor for ``--help`` and ``--version``."""
    if {"--json", "-h", "--help", "--version"} & set(args):
        return False
    return not any(tuple(args[i : i + 2]) == ("config", "example") for i in range(len(args)))


class CliTimeout(subprocess.TimeoutExpired):
    """A CLI run past its timeout; the message ends with what it printed on stderr (with
    PYTHONFAULTHANDLER, every thread's stack at the timeout)."""

    def __str__(self) -> str:
        err = self.stderr if isinstance(self.stderr, str) else ""
        return f"{super().__str__()}\n--- its stderr ---\n{err[-20000:]}"


def snapcoord(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    stdin: str | None = None,
    raw: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI. One that outlives ``timeout`` is made to print every thread's stack
    (faulthandler, on SIGABRT) before it is killed: the TimeoutExpired carries where it hung.
    stdout and stderr are pipes, so every line is stamped with the time: the stamps are checked
    and taken off (:func:`unstamped`) unless ``raw``."""
    argv = [sys.executable, "-m", "snapcoord", *args]
    with subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
        cwd=REPO,
    ) as child:
        try:
            out, err = child.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGABRT)
            try:
                out, err = child.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                out, err = child.communicate()
            raise CliTimeout(argv, timeout, out, err) from None
    if not raw:
        out, err = unstamped(out, stamped=stdout_stamped(args)), unstamped(err)
    return subprocess.CompletedProcess(argv, child.returncode, out, err)


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


DEMO_BIN = REPO / "examples" / "demo-guest" / "bin"
STAND_IN_SERVICES = frozenset({"apache2", "cron", "mariadb"})


def stand_in_guest(
    tmp_path: Path,
    uri: str,
    *,
    guest: dict[str, Any] | None = None,
    tables: dict[str, dict[str, Any]] | None = None,
    path_prefix: Path | None = None,
) -> tuple[Path, Path]:
    """A config for VM ``db1`` on libvirt ``uri`` whose guest is this host through the exec
    transport with the demo's stand-in service/mysqladmin commands. Returns the config path and
    the state folder (one ``NAME.running`` file per running stand-in service; all run).
    ``path_prefix`` is searched before the stand-ins (to wrap one of them)."""
    search = "".join(f"{d}:" for d in (path_prefix, DEMO_BIN) if d is not None)
    state = tmp_path / "state"
    state.mkdir()
    for name in STAND_IN_SERVICES:
        (state / f"{name}.running").touch()
    config = write_config(
        tmp_path / "c.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.lab": {"type": "libvirt", "uri": uri},
            "vms.db1": {"hypervisor": "lab"},
            "vms.db1.guest": {
                "transport": "exec",
                # a guest of its own: its own lease directory (docs/lease.md)
                "exec_prefix": [
                    "env",
                    f"PATH={search}/usr/bin:/bin",
                    f"DEMO_STATE={state}",
                    f"SNAPCOORD_LEASE_DIR={state}/lease",
                ],
                "database": "mariadb",
                **(guest or {}),
            },
            **(tables or {}),
        },
    )
    return config, state


def running_stand_ins(state: Path) -> set[str]:
    return {p.name.removesuffix(".running") for p in state.glob("*.running")}


def assert_paused_not_stopped(
    proc: subprocess.CompletedProcess[str], *, server_before: list[int], server_after: list[int]
) -> dict[str, Any]:
    """A ``snapshot --json`` run in pause mode: ok, commits held around the hypervisor call,
    nothing stopped, the database server never restarted (same PIDs). Returns its summary."""
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert result["consistency"] == "pause" and result["window_seconds"] is None
    assert result["write_pause_seconds"] > 0
    names = [s["name"] for s in result["steps"]]
    snap_at = names.index("hypervisor snapshot")
    assert "pause writes" in names[:snap_at] and "resume writes" in names[snap_at + 1 :]
    assert not {"stop services", "stop database"} & set(names)
    assert server_after == server_before  # never restarted
    return result

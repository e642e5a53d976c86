"""tests/ci_report.py, the plugin that names each failure the moment it happens: run for real
in a child pytest (with and without xdist workers) on a tiny suite of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SUITE = """
import time

def test_passes():
    pass

def test_fails():
    assert 1 + 1 == 3, "arithmetic broke"

def test_slow_then_passes():
    time.sleep(0.2)
"""


def run_suite(tmp_path: Path, *extra: str) -> str:
    (tmp_path / "test_tiny.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.ci_report",
         "-q", "-o", "addopts=", "--rootdir", str(tmp_path), *extra, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr  # one test fails
    return result.stdout


@pytest.mark.parametrize("workers", [None, "2"])
def test_each_failure_is_named_with_its_message_and_the_machine_state(
    tmp_path: Path, workers: str | None
) -> None:
    out = run_suite(tmp_path, *(["-n", workers] if workers else ["-p", "no:xdist"]))
    assert re.search(r"^machine at start: load \S+, \d+ cpus, mem available", out, re.M), out
    failed = [line for line in out.splitlines() if line.startswith("FAILED test_tiny.py::")]
    # pytest's own summary line (-ra) says "FAILED test_tiny.py::test_fails - ..."; the
    # plugin's line has the phase, duration, worker and elapsed time
    ours = [line for line in failed if " (call, " in line]
    assert len(ours) == 1, out
    worker = r"gw\d" if workers else "main"
    assert re.fullmatch(
        rf"FAILED test_tiny\.py::test_fails \(call, \d+\.\d s, {worker}, at \d\d:\d\d\): "
        r"AssertionError: arithmetic broke.*\[load \S+, \d+ cpus, mem available [\d.]+ GiB, "
        r"free / [\d.]+ GiB, /var/tmp [\d.]+ GiB\]",
        ours[0],
    ), ours[0]
    assert "test_passes" not in "".join(ours)


def test_no_line_for_a_green_suite(tmp_path: Path) -> None:
    (tmp_path / "test_green.py").write_text("def test_ok():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.ci_report",
         "-q", "-o", "addopts=", "-p", "no:xdist", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
    assert "machine at start:" in result.stdout

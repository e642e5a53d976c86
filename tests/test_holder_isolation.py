"""The freeze holder runs isolated from the caller's directory (issue 23, medium).

``snapcoord freeze`` starts the holder as a child Python interpreter that runs as root. Started
as ``python -m snapcoord.holder`` in the caller's directory, it would import a ``snapcoord/``
package planted there. These tests plant one that writes a marker file when imported, in the
directory ``freeze`` is run from, and let the real holder start and fail fast (the hypervisor
and the guest are closed ports on 127.0.0.1: no lab services): the marker must never appear.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from snapcoord import freeze as freeze_module
from snapcoord.config import load_config
from snapcoord.freeze import freeze_vm
from snapcoord.run import SilentReporter
from snapcoord.shell import python_module
from tests.cli_helpers import write_config

TOKEN_ENV = "SNAPCOORD_TEST_PVE_TOKEN"
TOKEN = "5e6f7a8b-1c2d-4e3f-8a9b-0c1d2e3f4a5b"


def plant(folder: Path, marker: Path) -> Path:
    """A ``snapcoord`` package in ``folder`` whose import appends to ``marker``."""
    package = folder / "snapcoord"
    package.mkdir(parents=True)
    code = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (package / "__init__.py").write_text(code)
    (package / "holder.py").write_text(code + "raise SystemExit(0)\n")
    return folder


def unreachable_config(tmp_path: Path) -> Path:
    """VM ``db`` on a Proxmox host and with a guest that both refuse at once."""
    return write_config(
        tmp_path / "conf" / "snapcoord.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.pve": {
                "type": "proxmox",
                "host": "127.0.0.1",
                "port": 1,
                "token_id": "snapcoord@pve!snap",
                "token_secret": {"env": TOKEN_ENV},
            },
            "vms.db": {"hypervisor": "pve", "name": "db1"},
            "vms.db.guest": {"host": "127.0.0.1", "port": 1},
        },
    )


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "conf").mkdir()
    marker = tmp_path / "imported-from-cwd"
    return plant(tmp_path / "cwd", marker), marker


def test_the_plant_works_on_an_unisolated_interpreter(planted: tuple[Path, Path]) -> None:
    """The control: ``python -m snapcoord.holder`` in that directory runs the planted code."""
    cwd, marker = planted
    subprocess.run([sys.executable, "-m", "snapcoord.holder"], cwd=cwd, timeout=30, check=False)
    assert marker.read_text().split() == ["snapcoord", "__main__"]  # the package, then holder


def test_child_interpreters_are_isolated() -> None:
    assert python_module("snapcoord.holder") == [sys.executable, "-I", "-m", "snapcoord.holder"]
    # and the isolated interpreter still finds the installed snapcoord, from anywhere
    done = subprocess.run(
        [*python_module("snapcoord.holder"), "--help"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0 and "snapcoord-holder" in done.stdout, done.stderr


def test_freeze_never_imports_snapcoord_from_the_callers_directory(
    planted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, marker = planted
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = load_config(str(unreachable_config(tmp_path)))
    monkeypatch.chdir(cwd)
    started: list[tuple[list[str], dict[str, Any]]] = []
    real_spawn = freeze_module.spawn

    def recording_spawn(argv: list[str], **kwargs: Any) -> Any:
        started.append((list(argv), kwargs))
        return real_spawn(argv, **kwargs)

    monkeypatch.setattr(freeze_module, "spawn", recording_spawn)
    begun = time.monotonic()
    outcome = freeze_vm(config, "db", max_seconds=30, reporter=SilentReporter())
    took = time.monotonic() - begun

    assert not marker.exists(), f"the holder imported {marker.read_text().split()} from cwd"
    [(argv, kwargs)] = started
    assert argv[:4] == [sys.executable, "-I", "-m", "snapcoord.holder"]
    assert kwargs["cwd"] == "/"
    # the real holder ran (it answered with an outcome) and failed on the closed port
    assert outcome.exit_code != 0
    text = " ".join(outcome.errors)
    assert "ended without a result" not in text and "127.0.0.1" in text, text
    assert took < 20


def test_snapcoord_freeze_from_a_planted_directory(
    planted: tuple[Path, Path], tmp_path: Path
) -> None:
    """The installed console script, run from the planted directory, as cron would run it."""
    script = Path(sys.executable).parent / "snapcoord"
    if not script.exists():
        pytest.skip("no snapcoord console script next to this interpreter")
    cwd, marker = planted
    config = unreachable_config(tmp_path)
    proc = subprocess.run(
        [str(script), "-c", str(config), "freeze", "db", "--max-seconds", "30"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, TOKEN_ENV: TOKEN},
        check=False,
    )
    assert not marker.exists(), f"imported from cwd: {marker.read_text().split()}"
    assert proc.returncode != 0 and "127.0.0.1" in proc.stderr, proc.stderr
    assert "ended without a result" not in proc.stderr and "Traceback" not in proc.stderr

"""The wheel installs only the snapcoord namespace: adapters/ and hooks/ as snapcoord.adapters and
snapcoord.hooks, never as top-level packages (both names are taken on PyPI)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.cli_helpers import REPO


def test_wheel_installs_only_the_snapcoord_namespace(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("snapcoord-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"snapcoord"}
    assert "snapcoord/adapters/base.py" in names
    assert "snapcoord/adapters/libvirt_adapter.py" in names
    assert "snapcoord/hooks/guest/services.py" in names
    # every module of the tree, subpackages included (a package missing from pyproject's list
    # would install without it)
    tree = {"snapcoord": "snapcoord", "adapters": "snapcoord/adapters", "hooks": "snapcoord/hooks"}
    for folder, installed in tree.items():
        for module in (REPO / folder).rglob("*.py"):
            name = f"{installed}/{module.relative_to(REPO / folder).as_posix()}"
            assert name in names, name

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True)
    probe = (
        "import importlib.util, snapcoord.adapters.base, snapcoord.hooks.guest.services\n"
        "assert importlib.util.find_spec('snapcoord.adapters.libvirt_adapter')\n"
        "for bare in ('adapters', 'hooks'):\n"
        "    assert importlib.util.find_spec(bare) is None, bare\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr
    # The console script exists, and an SDK missing in this venv is a one-line error.
    config = tmp_path / "c.toml"
    config.write_text(
        '[hypervisors.lab]\ntype = "libvirt"\nuri = "test:///default"\n'
        '[vms.test]\nhypervisor = "lab"\n'
    )
    proc = subprocess.run(
        [str(venv / "bin" / "snapcoord"), "-c", str(config), "list", "test"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "pip install 'snapcoord[libvirt]'" in proc.stderr and "Traceback" not in proc.stderr

"""Pytest fixtures running the vSphere API simulator built from tests/vcsim/main.go.

Import the fixtures into a test module (``from tests.vcsim_fixture import vcsim  # noqa: F401``).
Each ``vcsim`` is a fresh simulator (its own state) on 127.0.0.1 with TLS; ``vcsim_factory``
starts more with options (``fail_vm``, ``hang_vm``, ``datacenters``).
"""

from __future__ import annotations

import hashlib
import os
import selectors
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from snapcoord.config import parse_table
from snapcoord.secrets import Secret
from snapcoord.settings import VsphereSettings

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "vcsim" / "build.sh"
START_TIMEOUT = 30.0

#: VMs of the simulator's VPX model (one datacenter DC0, a host H0 and a cluster C0).
HOST_VM = "DC0_H0_VM0"
FAIL_VM = "DC0_H0_VM1"
HANG_VM = "DC0_C0_RP0_VM1"
CLUSTER_VM = "DC0_C0_RP0_VM0"


@dataclass(frozen=True)
class VCSim:
    url: str  # https://127.0.0.1:PORT/sdk
    host: str
    port: int
    user: str
    password: str
    cert_pem: str  # the server certificate (self-signed test certificate)
    cert_file: Path
    pid: int

    @property
    def thumbprint(self) -> str:
        """``sha256:AA:BB:...`` of the server certificate, as snapcoord's config expects."""
        digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.cert_pem)).hexdigest().upper()
        return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    def settings(self, **overrides: Any) -> VsphereSettings:
        """Validated ``[hypervisors.X]`` settings trusting the simulator's certificate;
        ``overrides`` replace values after validation (a test may go beyond the schema's bounds)."""
        table = {
            "type": "vsphere",
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": Secret("test", self.password),
            "ca_file": str(self.cert_file),
        }
        settings = parse_table(VsphereSettings, table, path="hypervisors.lab")
        return replace(settings, **overrides)


def build_vcsim() -> Path:
    """Build the simulator if main.go changed since the cached build; return the binary."""
    done = subprocess.run(
        ["sh", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the vSphere simulator failed:\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def start_vcsim(
    binary: Path,
    workdir: Path,
    *,
    user: str = "snapuser",
    password: str = "s3cret-vc",
    fail_vm: str | None = None,
    hang_vm: str | None = None,
    deny_privilege: str | None = None,
    datacenters: int = 1,
) -> tuple[subprocess.Popen[str], VCSim]:
    cert_file = workdir / "vcsim-cert.pem"
    argv = [
        str(binary),
        "-listen=127.0.0.1:0",
        f"-user={user}",
        f"-password={password}",
        f"-datacenters={datacenters}",
        f"-cert-out={cert_file}",
    ]
    if fail_vm:
        argv.append(f"-fail-vm={fail_vm}")
    if hang_vm:
        argv.append(f"-hang-vm={hang_vm}")
    if deny_privilege:
        argv.append(f"-deny-privilege={deny_privilege}")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    line = ""
    while not line.startswith("URL ") and time.monotonic() < deadline:
        if not selector.select(timeout=deadline - time.monotonic()):
            break
        line = proc.stdout.readline()
        if not line:
            break
    selector.close()
    if not line.startswith("URL "):
        stop_vcsim(proc)
        raise RuntimeError("the vSphere simulator did not start")
    url = line.split()[1]
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    sim = VCSim(url, host, int(port), user, password, cert_file.read_text(), cert_file, proc.pid)
    return proc, sim


def stop_vcsim(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the simulator by its PID; SIGKILL it if it does not exit."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if proc.stdout:
        proc.stdout.close()


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    return build_vcsim()


@pytest.fixture
def vcsim_factory(
    vcsim_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., VCSim]]:
    procs: list[subprocess.Popen[str]] = []

    def start(**options: object) -> VCSim:
        workdir = tmp_path_factory.mktemp("vcsim")
        proc, sim = start_vcsim(vcsim_binary, workdir, **options)  # type: ignore[arg-type]
        procs.append(proc)
        return sim

    yield start
    for proc in procs:
        stop_vcsim(proc)


@pytest.fixture
def vcsim(vcsim_factory: Callable[..., VCSim]) -> VCSim:
    """A fresh simulator with a failing VM (FAIL_VM) and a never-finishing one (HANG_VM)."""
    return vcsim_factory(fail_vm=FAIL_VM, hang_vm=HANG_VM)

"""Helpers for tests using the double: a self-signed certificate, settings, a started double."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from snapcoord.config import parse_table
from snapcoord.secrets import Secret
from snapcoord.settings import ProxmoxSettings

from .server import PveApiDouble

TOKEN_ID = "snapcoord@pve!snap"
TOKEN_SECRET = "5e6f7a8b-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
USER = "backup@pve"
PASSWORD = "correct horse battery staple"
#: the environment variable the tests' configurations read the token secret from
TOKEN_ENV = "SNAPCOORD_TEST_PVE_TOKEN"


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    @property
    def sha256(self) -> str:
        """'sha256:AA:BB:...' of the certificate, the form of the ``thumbprint`` setting."""
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        digest = hashlib.sha256(der).hexdigest().upper()
        return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def make_cert(folder: Path, name: str = "pve") -> Cert:
    """A self-signed certificate for 127.0.0.1 (what a fresh PVE node has, minus the CA)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return Cert(cert, key)


def start_double(cert: Cert, **kwargs: Any) -> PveApiDouble:
    kwargs.setdefault("tokens", {TOKEN_ID: TOKEN_SECRET})
    kwargs.setdefault("users", {USER: PASSWORD})
    kwargs.setdefault("task_seconds", 0.1)
    return PveApiDouble(tls_cert=str(cert.cert), tls_key=str(cert.key), **kwargs).start()


def token_settings(double: PveApiDouble, cert: Cert, **extra: Any) -> ProxmoxSettings:
    """Adapter settings as snapcoord.config hands them over (validated, defaults filled in);
    ``extra`` replaces values after validation."""
    auth = {"token_id": TOKEN_ID, "token_secret": Secret("env:TEST", TOKEN_SECRET)}
    return _settings(double, cert, auth, extra)


def ticket_settings(double: PveApiDouble, cert: Cert, **extra: Any) -> ProxmoxSettings:
    auth = {"user": USER, "password": Secret("env:TEST", PASSWORD)}
    return _settings(double, cert, auth, extra)


def _settings(
    double: PveApiDouble, cert: Cert, auth: dict[str, Any], extra: dict[str, Any]
) -> ProxmoxSettings:
    table = {"type": "proxmox", "host": "127.0.0.1", "port": double.port, **auth}
    settings = parse_table(ProxmoxSettings, {**table, "ca_file": str(cert.cert)}, path="pve")
    return replace(settings, **extra)


def hypervisor_table(double: PveApiDouble, cert: Cert, **extra: Any) -> dict[str, Any]:
    """A ``[hypervisors.X]`` table for ``double``: token auth (the secret from $TOKEN_ENV), the
    certificate verified through ``ca_file``; ``extra`` adds or replaces keys."""
    return {
        "type": "proxmox",
        "host": "127.0.0.1",
        "port": double.port,
        "token_id": TOKEN_ID,
        "token_secret": {"env": TOKEN_ENV},
        "ca_file": str(cert.cert),
        **extra,
    }

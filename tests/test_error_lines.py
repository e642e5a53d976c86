"""Every error line names the VM by its configuration key first (issue 25: an unreachable
hypervisor named the VM by its VMID, ``100: cannot reach``); the hypervisor's own name of it
follows in brackets, to find it in the hypervisor's task log (tests/test_cli_libvirt.py: a VM the
hypervisor does not have). Against a real closed port: since connecting asks the API (issue 25,
"ok" only after it is), the run fails at the connect step, before any VM was looked up."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.cli_helpers import json_lines, snapcoord, write_config


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there now: connection refused


def test_an_unreachable_hypervisor_is_named_by_the_vms_key(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("x")
    secret.chmod(0o600)
    config = write_config(
        tmp_path / "c.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.pve": {
                "type": "proxmox",
                "host": "127.0.0.1",
                "port": closed_port(),
                "token_id": "snap@pve!backup",
                "token_secret": {"file": str(secret)},
                "verify_tls": False,
            },
            "vms.shopdb": {"hypervisor": "pve", "vmid": 100},
        },
    )
    failed = snapcoord("-c", str(config), "snapshot", "shopdb", "--json")
    assert failed.returncode == 3, failed.stdout + failed.stderr
    [error] = [ln for ln in failed.stderr.splitlines() if ln.startswith("snapcoord: error:")]
    assert error.startswith("snapcoord: error: shopdb: cannot reach 127.0.0.1:"), error
    [summary] = json_lines(failed.stdout)
    assert summary["errors"][0].startswith("shopdb: cannot reach")
    [connect] = summary["steps"]
    assert connect["name"] == "connect to hypervisor pve" and connect["ok"] is False
    assert connect["error"].startswith("cannot reach"), "the step's line names the VM already"
    shown = snapcoord("-c", str(config), "status", "shopdb", "--offline")
    assert "shopdb:   error: cannot reach" in shown.stdout  # status names the VM once
    json.dumps(summary)

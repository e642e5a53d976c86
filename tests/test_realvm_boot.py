"""Smoke test of the real Debian 12 guest (tests/realvm_guest.py): it boots under libvirt/QEMU,
runs Debian's services with Debian's defaults, is reachable only through the loopback port
forward, cannot reach anything itself, and libvirt can talk to its guest agent."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.realvm_guest import HOST_ADDRESS, RealGuest, real_guest  # noqa: F401

pytestmark = [pytest.mark.realvm]


def out(guest: RealGuest, command: str) -> str:
    proc = guest.ssh(command, check=True)
    return proc.stdout.strip()


def test_systemd_and_debian_services(real_guest: RealGuest) -> None:
    g = real_guest
    assert out(g, "ps -p 1 -o comm=") == "systemd"
    assert g.system_state == "running", out(g, "systemctl --failed --no-legend || true")
    assert out(g, "systemctl is-active ssh apache2 cron").split() == ["active"] * 3
    assert out(g, "hostname") == "snapcoord-guest"
    assert out(g, "nproc") == "2"


def test_mariadb_socket_activation_is_debians_default(real_guest: RealGuest) -> None:
    g = real_guest
    assert out(g, "systemctl is-enabled mariadb.socket") == "enabled"
    assert out(g, "systemctl is-active mariadb.socket") == "active"
    assert out(g, "systemctl is-active mariadb") == "active"
    assert out(g, "mysqladmin ping") == "mysqld is alive"


def test_shell_and_tools(real_guest: RealGuest) -> None:
    g = real_guest
    assert out(g, "readlink -f /bin/sh") == "/usr/bin/dash"
    assert out(g, "command -v flock") == "/usr/bin/flock"
    assert out(g, "command -v sudo") == "/usr/bin/sudo"


def test_guest_reaches_nothing_outside(real_guest: RealGuest) -> None:
    g = real_guest
    assert out(g, "ip -4 -o addr show dev eth0").split()[3] == "10.0.2.15/24"
    outside = g.ssh("curl -sS -m 5 -o /dev/null http://deb.debian.org/", timeout=30)
    assert outside.returncode != 0, outside
    by_address = g.ssh("curl -sS -m 5 -o /dev/null http://151.101.2.132/", timeout=30)
    assert by_address.returncode != 0, by_address

    # restrict=on: not even the host (10.0.2.2 = the host's loopback without restrict)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        to_host = g.ssh(f"curl -sS -m 5 -o /dev/null http://{HOST_ADDRESS}:{port}/", timeout=30)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection arrived
    assert to_host.returncode != 0, to_host

    # what the running QEMU says (its monitor, through libvirt): user-mode networking with
    # restrict=on, and the one forward, from 127.0.0.1 only
    network = g.monitor("info network")
    netdev = next(line for line in network.splitlines() if " n0: " in f" {line}")
    assert "type=user" in netdev and "restrict=on" in netdev.split(","), network
    forwards = [line.split() for line in g.monitor("info usernet").splitlines()
                if "HOST_FORWARD" in line]  # fmt: skip
    assert len(forwards) == 1 and forwards[0][2:4] == ["127.0.0.1", str(g.port)], forwards
    assert forwards[0][5] == "22"


def test_port_forward_listens_on_loopback_only(real_guest: RealGuest) -> None:
    listening = subprocess.run(
        ["ss", "-ltnH", f"sport = :{real_guest.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    local = sorted({line.split()[3] for line in listening if line.strip()})
    assert local == [f"127.0.0.1:{real_guest.port}"]


def test_guest_agent_answers_libvirt(real_guest: RealGuest) -> None:
    g = real_guest
    assert out(g, "systemctl is-active qemu-guest-agent") == "active"
    assert g.agent_command({"execute": "guest-ping"}) == {"return": {}}
    info = g.agent_command({"execute": "guest-get-host-name"})
    assert info["return"]["host-name"] == "snapcoord-guest"
    virsh = subprocess.run(
        ["virsh", "-c", g.uri, "qemu-agent-command", g.domain, '{"execute":"guest-ping"}'],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert virsh.returncode == 0, virsh.stderr

"""A Proxmox API that goes away is a transient failure; a certificate that does not verify is not.

The agent transport reaches the guest only through the API, so while the API refuses or cuts
connections the guest agent does not answer either: ``ApiUnreachable`` (a HypervisorError), which
the agent link turns into ``AgentUnavailable`` (a GuestUnreachable: retried within a window's
reconnect budget). A TLS handshake cut short by the server (EOF, reset: pveproxy restarting, the
fault matrix's ``api_down``) is such a failure, not a refused certificate; a certificate signed
by another CA stays "not accepted" and is never retried. Real servers on loopback: the API
double, tests/faultproxy.py in front of it, and a listener that closes every connection it
accepts.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

from snapcoord.adapters.base import VM
from snapcoord.adapters.proxmox import ApiUnreachable, ProxmoxAdapter
from snapcoord.adapters.proxmox_agent import ProxmoxAgentLink
from snapcoord.agent_link import AgentUnavailable
from snapcoord.errors import HypervisorError
from tests.faultproxy import FaultProxy
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import Cert, make_cert, start_double, token_settings


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cert, Cert]:
    folder = tmp_path_factory.mktemp("api-away-tls")
    return make_cert(folder, "pve"), make_cert(folder, "other")


@pytest.fixture
def double(certs: tuple[Cert, Cert]) -> Iterator[PveApiDouble]:
    server = start_double(certs[0])
    yield server
    server.stop()


@pytest.fixture
def closing_port() -> Iterator[int]:
    """A listener that accepts and closes at once: the handshake ends in EOF."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    done.set()
    listener.close()
    thread.join(5)


def test_a_handshake_cut_short_is_the_api_away_not_a_refused_certificate(
    double: PveApiDouble, certs: tuple[Cert, Cert], closing_port: int
) -> None:
    settings = replace(token_settings(double, certs[0]), port=closing_port)
    with pytest.raises(ApiUnreachable) as caught:
        ProxmoxAdapter("pve", settings).connect()
    assert "cannot reach 127.0.0.1" in caught.value.message
    assert "not accepted" not in str(caught.value)


def test_a_certificate_of_another_ca_is_still_refused_and_not_retryable(
    double: PveApiDouble, certs: tuple[Cert, Cert]
) -> None:
    settings = replace(token_settings(double, certs[0]), ca_file=str(certs[1].cert))
    with pytest.raises(HypervisorError) as caught:
        ProxmoxAdapter("pve", settings).connect()
    assert not isinstance(caught.value, ApiUnreachable)
    assert "TLS certificate of 127.0.0.1" in str(caught.value)
    assert "not accepted" in str(caught.value)


def test_the_agent_link_takes_an_api_that_went_away_for_an_agent_that_does_not_answer(
    double: PveApiDouble, certs: tuple[Cert, Cert]
) -> None:
    with FaultProxy(("127.0.0.1", double.port)) as proxy:
        settings = replace(token_settings(double, certs[0]), port=proxy.port)
        with ProxmoxAdapter("pve", settings) as adapter:
            vm: VM = adapter.find_vm("db1")
            link = ProxmoxAgentLink(adapter, vm)
            proxy.refuse(60)  # the API goes away with the session open
            with pytest.raises(AgentUnavailable) as caught:
                link.ping(timeout=5)
            proxy.resume()  # and comes back: the same link answers
            link.ping(timeout=5)
    assert "cannot reach 127.0.0.1" in caught.value.message

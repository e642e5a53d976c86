"""Certificate pins and CA verification hold through an HTTP CONNECT proxy (issue 23).

cron and systemd units inherit ``https_proxy`` from /etc/environment, and requests then opens
its connections through ``HTTPAdapter.proxy_manager_for()``. These tests run the real adapter
through a real CONNECT proxy on loopback (tests/connect_proxy.py) against the Proxmox API
double; the "impostor" is a second double with another certificate, to which a hijacking proxy
sends every tunnel. It knows the same token and password, so anything that reached it would be
in its request log: the log must stay empty.

vSphere (pyVmomi over http.client) reads no proxy from the environment at all: it tunnels only
when given ``httpProxyHost``, which snapcoord never passes. The tests at the end show that with
``https_proxy`` set the adapter goes straight to the server (the proxy sees no CONNECT) and
that its pin refuses an impostor before the SOAP login (user and password) is sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord.adapters.proxmox import ProxmoxAdapter
from snapcoord.adapters.vsphere import VSphereAdapter
from snapcoord.errors import HypervisorError
from tests.cli_helpers import snapcoord, write_config
from tests.connect_proxy import ConnectProxy
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    PASSWORD,
    TOKEN_ENV,
    TOKEN_ID,
    TOKEN_SECRET,
    Cert,
    make_cert,
    start_double,
    ticket_settings,
    token_settings,
)
from tests.vcsim_fixture import (  # noqa: F401 - fixtures
    HOST_VM,
    VCSim,
    vcsim,
    vcsim_binary,
    vcsim_factory,
)

PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")
PASSWORD_ENV = "SNAPCOORD_TEST_PVE_PASSWORD"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cert, Cert]:
    folder = tmp_path_factory.mktemp("pin-proxy-tls")
    return make_cert(folder, "genuine"), make_cert(folder, "impostor")


@pytest.fixture
def genuine(certs: tuple[Cert, Cert]) -> Iterator[PveApiDouble]:
    server = start_double(certs[0])
    yield server
    server.stop()


@pytest.fixture
def impostor(certs: tuple[Cert, Cert]) -> Iterator[PveApiDouble]:
    server = start_double(certs[1])  # same token and password: it would accept them
    yield server
    server.stop()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectProxy]:
    """A CONNECT proxy that the environment names, as /etc/environment would for cron."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy() as server:
        monkeypatch.setenv("https_proxy", server.url)
        yield server


def pinned(kind: str, genuine: PveApiDouble, cert: Cert, **extra: Any) -> Any:
    settings = token_settings if kind == "token" else ticket_settings
    return settings(genuine, cert, thumbprint=cert.sha256, ca_file=None, **extra)


def hijack(proxy: ConnectProxy, impostor: PveApiDouble) -> None:
    """From now on every new tunnel ends at the impostor; open tunnels are cut."""
    proxy.hijack = ("127.0.0.1", impostor.port)
    proxy.cut()


def assert_refused_by_tls(info: pytest.ExceptionInfo[HypervisorError]) -> None:
    text = str(info.value)
    assert "TLS certificate of 127.0.0.1" in text and "not accepted" in text, text
    assert TOKEN_SECRET not in text and PASSWORD not in text


def assert_impostor_reached_but_told_nothing(proxy: ConnectProxy, impostor: PveApiDouble) -> None:
    assert proxy.upstream_bytes > 0  # the impostor's TLS handshake came back through the proxy
    assert impostor.calls() == []  # ... and not one HTTP request (token, password) followed


# -- the pin through the proxy ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token", "ticket"])
def test_pin_through_a_proxy_works_and_uses_the_proxy(
    kind: str, proxy: ConnectProxy, genuine: PveApiDouble, certs: tuple[Cert, Cert]
) -> None:
    with ProxmoxAdapter("pve", pinned(kind, genuine, certs[0])) as adapter:
        assert isinstance(adapter, ProxmoxAdapter)
        assert adapter.find_vm("db1").id == "100"
    assert proxy.connects and set(proxy.connects) == {f"127.0.0.1:{genuine.port}"}
    # connecting is one authenticated request: the login, or GET /version with a token
    first = ("POST", "/access/ticket") if kind == "ticket" else ("GET", "/version")
    expected = [first, ("GET", "/cluster/resources")]
    assert genuine.calls() == expected


@pytest.mark.parametrize("kind", ["token", "ticket"])
def test_pin_refuses_an_impostor_behind_the_proxy(
    kind: str,
    proxy: ConnectProxy,
    genuine: PveApiDouble,
    impostor: PveApiDouble,
    certs: tuple[Cert, Cert],
) -> None:
    hijack(proxy, impostor)
    adapter = ProxmoxAdapter("pve", pinned(kind, genuine, certs[0]))
    # the ticket login happens on entering, the token's first use in find_vm
    with pytest.raises(HypervisorError) as info, adapter:
        adapter.find_vm("db1")
    assert_refused_by_tls(info)
    assert proxy.connects == [f"127.0.0.1:{genuine.port}"]
    assert_impostor_reached_but_told_nothing(proxy, impostor)
    assert genuine.calls() == []


def test_pin_holds_for_ticket_renewal_through_the_proxy(
    proxy: ConnectProxy, genuine: PveApiDouble, impostor: PveApiDouble, certs: tuple[Cert, Cert]
) -> None:
    """proxmoxer renews the ticket (POSTing the current one as the password) once it is an
    hour old; the renewal must not go to an impostor either."""
    with ProxmoxAdapter("pve", pinned("ticket", genuine, certs[0])) as adapter:
        assert isinstance(adapter, ProxmoxAdapter)
        vm = adapter.find_vm("db1")
        assert adapter._ticket is not None
        adapter._ticket.birth_time = time.monotonic() - 3601  # due for renewal
        assert adapter.power_state(vm).value  # renewed through the proxy, pin checked
        logins = [c for c in genuine.calls() if c == ("POST", "/access/ticket")]
        assert len(logins) == 2
        hijack(proxy, impostor)
        adapter._ticket.birth_time = time.monotonic() - 3601
        with pytest.raises(HypervisorError) as info:
            adapter.find_vm("db1")
        assert_refused_by_tls(info)
    assert_impostor_reached_but_told_nothing(proxy, impostor)


def test_pin_holds_for_the_login_after_an_expired_ticket(
    proxy: ConnectProxy, genuine: PveApiDouble, impostor: PveApiDouble, certs: tuple[Cert, Cert]
) -> None:
    """A refused ticket makes the adapter log in again with the password: same pin."""
    with ProxmoxAdapter("pve", pinned("ticket", genuine, certs[0])) as adapter:
        assert isinstance(adapter, ProxmoxAdapter)
        adapter.find_vm("db1")
        hijack(proxy, impostor)
        with pytest.raises(HypervisorError) as info:
            adapter._relogin()
        assert_refused_by_tls(info)
    assert_impostor_reached_but_told_nothing(proxy, impostor)


# -- ca_file through the proxy ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token", "ticket"])
def test_ca_file_through_a_proxy(
    kind: str,
    proxy: ConnectProxy,
    genuine: PveApiDouble,
    impostor: PveApiDouble,
    certs: tuple[Cert, Cert],
) -> None:
    settings = token_settings if kind == "token" else ticket_settings
    with ProxmoxAdapter("pve", settings(genuine, certs[0])) as adapter:  # ca_file: genuine
        assert isinstance(adapter, ProxmoxAdapter)
        assert adapter.find_vm("db1").id == "100"
    assert proxy.connects
    hijack(proxy, impostor)
    adapter = ProxmoxAdapter("pve", settings(genuine, certs[0]))
    with pytest.raises(HypervisorError) as info, adapter:
        adapter.find_vm("db1")
    assert_refused_by_tls(info)
    assert_impostor_reached_but_told_nothing(proxy, impostor)


# -- the CLI: one line, exit 3 ------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["token", "ticket"])
def test_cli_refuses_an_impostor_behind_the_proxy(
    auth: str,
    proxy: ConnectProxy,
    genuine: PveApiDouble,
    impostor: PveApiDouble,
    certs: tuple[Cert, Cert],
    tmp_path: Path,
) -> None:
    credentials: dict[str, Any] = (
        {"token_id": TOKEN_ID, "token_secret": {"env": TOKEN_ENV}}
        if auth == "token"
        else {"user": "backup@pve", "password": {"env": PASSWORD_ENV}}
    )
    config = write_config(
        tmp_path / "snapcoord.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.pve": {
                "type": "proxmox",
                "host": "127.0.0.1",
                "port": genuine.port,
                "thumbprint": certs[0].sha256,
                **credentials,
            },
            "vms.db": {"hypervisor": "pve", "name": "db1"},
        },
    )
    env = {TOKEN_ENV: TOKEN_SECRET, PASSWORD_ENV: PASSWORD}  # https_proxy from the fixture
    ok = snapcoord("-c", str(config), "list", "db", env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert proxy.connects, "the CLI did not go through https_proxy"

    hijack(proxy, impostor)
    connects = len(proxy.connects)
    proc = snapcoord("-c", str(config), "list", "db", env=env, timeout=60)
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "TLS certificate of 127.0.0.1" in errors[0], proc.stderr
    assert "pinned thumbprint" in errors[0]
    assert "Traceback" not in proc.stderr
    assert TOKEN_SECRET not in proc.stderr + proc.stdout and PASSWORD not in proc.stderr
    assert len(proxy.connects) > connects
    assert_impostor_reached_but_told_nothing(proxy, impostor)


def test_a_pool_without_the_pin_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: should requests ever hand out a connection pool by a path that does not
    carry the pin, the pinned adapter refuses it rather than send anything unpinned."""
    import requests
    from requests.adapters import HTTPAdapter

    from snapcoord.adapters.proxmox import _PinnedAdapter

    class Unpinned:
        assert_fingerprint = None

    monkeypatch.setattr(HTTPAdapter, "get_connection_with_tls_context", lambda *a, **k: Unpinned())
    request = requests.Request("GET", "https://127.0.0.1:8006/api2/json/version").prepare()
    with pytest.raises(requests.exceptions.SSLError, match="pin not applied"):
        _PinnedAdapter("ab" * 32).get_connection_with_tls_context(request, False)


# -- vSphere: pyVmomi ignores the environment's proxies; the pin holds ----------------------------


def proxy_everywhere(monkeypatch: pytest.MonkeyPatch, proxy: ConnectProxy) -> None:
    for name in PROXY_VARS:
        if "no_proxy" not in name.lower():
            monkeypatch.setenv(name, proxy.url)


@pytest.mark.real
@pytest.mark.parametrize("trust", ["thumbprint", "ca_file"])
def test_vsphere_goes_direct_with_https_proxy_set(
    trust: str,
    proxy: ConnectProxy,
    impostor: PveApiDouble,
    vcsim: VCSim,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even a proxy that would hand the tunnel to an impostor is never asked: pyVmomi does not
    read https_proxy (and were it to start, the PinnedContext checks every socket it wraps)."""
    proxy_everywhere(monkeypatch, proxy)
    proxy.hijack = ("127.0.0.1", impostor.port)
    extra = {"ca_file": None, "thumbprint": vcsim.thumbprint} if trust == "thumbprint" else {}
    with VSphereAdapter("lab", vcsim.settings(**extra)) as opened:
        assert opened.find_vm(HOST_VM).name == HOST_VM
    assert proxy.connects == [] and proxy.upstream_bytes == 0
    assert impostor.calls() == []


@pytest.mark.real
def test_vsphere_pin_refuses_an_impostor_before_the_login(
    proxy: ConnectProxy,
    impostor: PveApiDouble,
    vcsim: VCSim,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An impostor at the configured address (another certificate) gets the TLS handshake and
    nothing else: no SOAP request, so neither the user nor the password."""
    proxy_everywhere(monkeypatch, proxy)
    settings = vcsim.settings(ca_file=None, thumbprint=vcsim.thumbprint, port=impostor.port)
    with pytest.raises(HypervisorError, match="not trusted") as info:
        VSphereAdapter("lab", settings).connect()
    assert info.value.exit_code == 3
    assert "does not match the pinned one" in str(info.value)
    assert vcsim.password not in str(info.value)
    assert impostor.calls() == []  # not even the RetrieveServiceContent before the login
    assert proxy.connects == []

"""What the Proxmox API answers is checked where it is read (issue 23, finding 14: malformed
Proxmox JSON crashed with a traceback): a body that is not JSON, and JSON of the wrong shape, are
one HypervisorError line (exit 3), never a traceback. Against a real HTTPS server on loopback
that answers like a broken proxy, and the API double with its answers replaced."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from snapcoord.adapters.base import VM, PowerState, Snapshot
from snapcoord.adapters.proxmox import ProxmoxAdapter
from snapcoord.errors import ExitCode, HypervisorError, SnapcoordError
from tests import hostile_json
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import Cert, make_cert, start_double, token_settings


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("answers-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert)
    yield server
    server.stop()


@pytest.fixture
def html_server(cert: Cert) -> Iterator[int]:
    """HTTPS on loopback that answers every request 200 with an HTML page."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _page(self) -> None:
            body = b"<html><body>Proxy says hello</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _page

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert.cert), str(cert.key))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_a_body_that_is_not_json_is_one_hypervisor_error(
    html_server: int, double: PveApiDouble, cert: Cert
) -> None:
    settings = token_settings(double, cert, port=html_server)
    adapter = ProxmoxAdapter("pve", settings)
    with pytest.raises(HypervisorError, match="does not understand in api_version") as caught:
        adapter.connect()  # its GET /version meets the HTML page
    assert caught.value.exit_code == ExitCode.HYPERVISOR
    with pytest.raises(HypervisorError, match="does not understand in api_version"):
        adapter.find_vm("db1")  # connects again (nothing half-open was kept), fails the same


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("find_vm", [{"type": "qemu", "name": "db1"}]),  # no vmid, no node
        ("find_vm", {"data": "nope"}),
        ("find_vm", [{"type": "qemu", "name": "db1", "vmid": "x", "node": "pve1"}]),
        ("list_snapshots", 5),
        ("list_snapshots", [{"name": "s1", "snaptime": "yesterday"}]),
        ("power_state", ["running"]),
        ("api_version", ["9.0.5"]),
        ("api_version", {"version": 9}),
    ],
)
def test_json_of_the_wrong_shape_is_one_hypervisor_error(
    double: PveApiDouble,
    cert: Cert,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    answer: Any,
) -> None:
    with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
        vm = adapter.find_vm("db1")
        monkeypatch.setattr(adapter, "_request", lambda *a, **k: answer)
        monkeypatch.setattr(adapter, "_version", None)  # kept from connect: read it anew
        call = {
            "find_vm": lambda: adapter.find_vm("db1"),
            "list_snapshots": lambda: adapter.list_snapshots(vm),
            "power_state": lambda: adapter.power_state(vm),
            "api_version": adapter.api_version,
        }[method]
        with pytest.raises(HypervisorError, match="does not understand") as caught:
            call()
    assert caught.value.exit_code == ExitCode.HYPERVISOR
    assert isinstance(vm, VM)


def test_the_double_still_answers_the_real_shape(double: PveApiDouble, cert: Cert) -> None:
    with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
        vm = adapter.find_vm("db1")
        assert vm.id == "100" and isinstance(adapter.list_snapshots(vm), list)


# -- answers of every shape (property-based) ---------------------------------------------------

KEYS = ("vmid", "node", "type", "name", "status", "snaptime", "description", "parent", "vmstate",
        "data", "running", "qmpstatus", "template", "lock", "hasFeature", "/vms/100",
        "VM.Audit", "VM.Snapshot")  # fmt: skip
answers = hostile_json.nested(
    hostile_json.scalars(
        "qemu", "lxc", "db1", "pve1", "running", "stopped", "100", 100, "current", "1", 1, True
    ),
    KEYS,
    max_leaves=16,
)


@pytest.fixture(scope="module")
def open_adapter(cert: Cert) -> Iterator[tuple[ProxmoxAdapter, VM]]:
    server = start_double(cert)
    with ProxmoxAdapter("pve", token_settings(server, cert)) as adapter:
        yield adapter, adapter.find_vm("db1")
    server.stop()


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    answer=answers,
    method=st.sampled_from(
        ["find_vm", "list_snapshots", "power_state", "missing_privileges", "check_support"]
    ),
)
@example(answer={"lock": "\n"}, method="check_support")  # found in CI: the lock went in as it was
def test_any_answer_is_understood_or_one_hypervisor_error(
    open_adapter: tuple[ProxmoxAdapter, VM], answer: Any, method: str
) -> None:
    adapter, vm = open_adapter
    request = adapter._request
    adapter._request = lambda *a, **k: answer  # type: ignore[method-assign]
    adapter._version = None  # the version connect read is kept: this answer is read instead
    try:
        result = {
            "find_vm": lambda: adapter.find_vm("db1"),
            "list_snapshots": lambda: adapter.list_snapshots(vm),
            "power_state": lambda: adapter.power_state(vm),
            "missing_privileges": lambda: adapter.missing_privileges(vm, ["snapshot", "quiesce"]),
            "check_support": lambda: adapter.check_snapshot_support(vm),
        }[method]()
    except HypervisorError as exc:
        assert exc.exit_code == ExitCode.HYPERVISOR and "\n" not in str(exc)
        return
    except SnapcoordError as exc:  # not found, not unique: its own one line
        assert "\n" not in str(exc)
        return
    finally:
        adapter._request = request  # type: ignore[method-assign]
    if method == "find_vm":
        assert isinstance(result, VM) and isinstance(result.id, str)
    elif method == "list_snapshots":
        assert isinstance(result, list) and all(isinstance(s, Snapshot) for s in result)
        for snap in result:
            assert isinstance(snap.name, str) and (snap.created is None or snap.created.tzinfo)
    elif method == "missing_privileges":
        assert isinstance(result, list) and all(isinstance(p, str) for p in result)
    elif method == "check_support":
        assert result is None
    else:
        assert isinstance(result, PowerState)

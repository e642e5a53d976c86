"""The Proxmox VE guest agent endpoints (exec, exec-status, file-read, file-write) of the API
double, checked against the schema (data/pve-agent-api.json), and adapters/proxmox_agent.py's
ProxmoxAgentLink through them to a real qemu-ga in the lab guest (tests/qga_fixture.py): the
agent transport's calls, their limits and their faults."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxmoxer.core import ResourceException
from urllib3.exceptions import InsecureRequestWarning

from snapcoord.adapters.base import VM
from snapcoord.adapters.permissions import proxmox_agent_transport_privileges
from snapcoord.adapters.proxmox import ProxmoxAdapter
from snapcoord.adapters.proxmox_agent import ProxmoxAgentLink
from snapcoord.agent_link import AgentCommandError, AgentUnavailable, ExecStatus
from snapcoord.check import Checker, Skip
from snapcoord.config import parse_config
from snapcoord.errors import (
    ExitCode,
    GuestError,
    HypervisorError,
    SnapcoordError,
    UnsupportedOperation,
)
from tests import hostile_json
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    TOKEN_ENV,
    TOKEN_ID,
    TOKEN_SECRET,
    Cert,
    hypervisor_table,
    make_cert,
    start_double,
    token_settings,
)
from tests.qga_fixture import LabAgent, start_agent

DB = 100  # qemu VM "db1" on pve1, agent enabled (the double's seed)
AGENT = f"/nodes/pve1/qemu/{DB}/agent"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("agent-tls"))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[LabAgent]:
    lab = start_agent(tmp_path / "qga")
    yield lab
    lab.stop()


def _double(cert: Cert, agent: LabAgent, **kwargs: Any) -> PveApiDouble:
    double = start_double(cert, **kwargs)
    double.cluster.attach_agent(DB, agent.socket)
    return double


@pytest.fixture
def double(cert: Cert, agent: LabAgent) -> Iterator[PveApiDouble]:
    server = _double(cert, agent)
    yield server
    server.stop()


@pytest.fixture
def adapter(double: PveApiDouble, cert: Cert) -> Iterator[ProxmoxAdapter]:
    with ProxmoxAdapter("pve", token_settings(double, cert)) as opened:
        yield opened


@pytest.fixture
def link(adapter: ProxmoxAdapter) -> ProxmoxAgentLink:
    made = adapter.guest_agent(adapter.find_vm("db1"))
    assert isinstance(made, ProxmoxAgentLink)
    return made


def raw(double: PveApiDouble, method: str, path: str, **kwargs: Any) -> requests.Response:
    """One request as any client sends it (form-encoded), with the token."""
    session = requests.Session()
    session.trust_env = False
    headers = {"Authorization": f"PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}"}
    with warnings.catch_warnings():  # the double's certificate is self-signed
        warnings.simplefilter("ignore", InsecureRequestWarning)
        return session.request(method, double.url + path, headers=headers, verify=False, **kwargs)


def run(link: ProxmoxAgentLink, argv: list[str], stdin: bytes | None = None) -> ExecStatus:
    pid = link.exec(argv, stdin=stdin, timeout=10)
    deadline = time.monotonic() + 30
    while True:
        status = link.exec_status(pid, timeout=10)
        if status.exited or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


# -- the endpoints as the schema defines them ----------------------------------------------------


def test_the_endpoints_refuse_parameters_as_pve_does(double: PveApiDouble) -> None:
    long_input = raw(
        double, "POST", f"{AGENT}/exec", data={"command": "cat", "input-data": "x" * 65537}
    )
    assert long_input.status_code == 400
    assert long_input.json()["errors"] == {"input-data": "value may only be 65536 characters long"}
    unknown = raw(double, "POST", f"{AGENT}/exec", data={"command": "true", "timeout": "5"})
    assert unknown.status_code == 400 and "timeout" in unknown.json()["errors"]
    too_much = raw(
        double, "GET", f"{AGENT}/file-read", params={"file": "/etc/hostname", "count": 2**24 + 1}
    )
    assert too_much.json()["errors"] == {"count": "value must have a maximum value of 16777216"}
    long_content = raw(
        double, "POST", f"{AGENT}/file-write", data={"file": "/tmp/x", "content": "A" * 61441}
    )
    assert long_content.json()["errors"] == {"content": "value may only be 61440 characters long"}
    no_command = raw(double, "POST", f"{AGENT}/exec", data={"command": ""})  # undefined in Perl
    assert no_command.json()["errors"] == {"command": "property is missing and it is not optional"}
    assert raw(double, "GET", f"{AGENT}/exec-status").json()["errors"] == {
        "pid": "property is missing and it is not optional"
    }


def test_the_endpoints_answer_in_pve_shapes(double: PveApiDouble, tmp_path: Path) -> None:
    started = raw(double, "POST", f"{AGENT}/exec", data={"command": "true"})  # one value: an array
    assert set(started.json()["data"]) == {"pid"}  # no "result" wrapper
    target = tmp_path / "shape"
    written = raw(double, "POST", f"{AGENT}/file-write", data={"file": target, "content": "hé"})
    assert written.json() == {"data": None}
    assert target.read_bytes() == b"h\xe9"  # encode=1: the characters' Latin-1 bytes
    wide = raw(double, "POST", f"{AGENT}/file-write", data={"file": target, "content": "€"})
    assert (wide.status_code, wide.reason.split(" at ")[0]) == (
        500,
        "Wide character in subroutine entry",
    )
    read = raw(double, "GET", f"{AGENT}/file-read", params={"file": target}).json()["data"]
    assert read == {"content": "h\xe9", "bytes-read": 2}  # decoded: one code point per byte
    missing = raw(double, "GET", f"{AGENT}/file-read", params={"file": tmp_path / "nope"})
    assert missing.status_code == 500
    assert missing.reason.startswith("Agent error: failed to open file")


# -- ProxmoxAgentLink through the double to a real qemu-ga -----------------------------------------


def test_exec_round_trip_with_stdin_exit_codes_and_signals(link: ProxmoxAgentLink) -> None:
    status = run(link, ["/bin/sh", "-c", "cat; echo to-stderr >&2; exit 3"], b"from stdin\n")
    assert status.exited and status.exitcode == 3 and status.signal is None
    assert (status.stdout, status.stderr) == (b"from stdin\n", b"to-stderr\n")
    assert status.returncode == 3
    killed = run(link, ["/bin/sh", "-c", "kill -TERM $$"])
    assert killed.exited and killed.signal == 15 and killed.returncode == 143
    assert run(link, ["/bin/true"]).returncode == 0
    running = link.exec_status(link.exec(["/bin/sleep", "5"], stdin=None, timeout=10), timeout=10)
    assert not running.exited and running.exitcode is None


def test_stdin_and_output_are_exact_bytes_utf8_or_not(link: ProxmoxAgentLink) -> None:
    """exec's input-data is decoded as UTF-8 characters and re-encoded one byte per character;
    exec-status writes each output byte as one code point. The link sends Latin-1 text and
    encodes the output back as Latin-1: every byte arrives and returns exactly."""
    every_byte = bytes(range(256))
    status = run(link, ["/bin/cat"], every_byte)
    assert status.stdout == every_byte
    assert run(link, ["/usr/bin/printf", "\\377\\376 h\\303\\251"]).stdout == b"\xff\xfe h\xc3\xa9"
    assert run(link, ["/bin/echo", "hé"]).stdout == "hé\n".encode()  # argv: UTF-8 text


def test_the_limits_hold_for_the_worst_case_bytes(link: ProxmoxAgentLink, tmp_path: Path) -> None:
    """0xFF is the costliest byte form-encoded: %C3%BF in input-data, '/' (%2F) in base64."""
    assert run(link, ["/usr/bin/wc", "-c"], b"\xff" * link.max_input).stdout.strip() == (
        str(link.max_input).encode()
    )
    target = tmp_path / "worst"
    link.write_file(str(target), b"\xff" * link.max_write, timeout=10)
    assert target.read_bytes() == b"\xff" * link.max_write


def test_file_write_then_read_back_with_offsets(link: ProxmoxAgentLink, tmp_path: Path) -> None:
    target = str(tmp_path / "chunks")
    data = bytes(range(256)) * 100  # 25600 bytes, every value
    link.write_file(target, data, timeout=10)
    assert Path(target).read_bytes() == data
    # qemu-ga (qga/commands-posix.c safe_open_or_create) makes a new file 0666 whatever the
    # umask; a file that exists keeps its mode (mode wb truncates it): create it 0600 first
    assert Path(target).stat().st_mode & 0o777 == 0o666
    private = tmp_path / "private"
    private.touch(mode=0o600)
    link.write_file(str(private), b"secret", timeout=10)
    assert (private.read_bytes(), private.stat().st_mode & 0o777) == (b"secret", 0o600)
    assert link.read_file(target, offset=0, count=len(data), timeout=10) == (data, False)
    assert link.read_file(target, offset=1000, count=500, timeout=10) == (data[1000:1500], False)
    assert link.read_file(target, offset=25000, count=4096, timeout=10) == (data[25000:], True)
    assert link.read_file(target, offset=len(data), count=10, timeout=10) == (b"", True)
    link.write_file(target, b"shorter", timeout=10)  # mode wb: replaced, not overwritten
    assert link.read_file(target, offset=0, count=100, timeout=10) == (b"shorter", True)


def test_a_binary_file_over_a_mib_reads_back_exactly(
    link: ProxmoxAgentLink, tmp_path: Path
) -> None:
    """file-read with decode=0 joins the 1 MiB chunks' base64, each with its own padding."""
    target = tmp_path / "big.bin"
    data = bytes(range(256)) * (5 * 4096 + 1)  # 5 MiB + 256 bytes: chunks 1 MiB, padded
    target.write_bytes(data)
    first, eof = link.read_file(str(target), offset=0, count=link.max_read, timeout=30)
    assert (first, eof) == (data[: link.max_read], False)
    rest, eof = link.read_file(str(target), offset=len(first), count=link.max_read, timeout=30)
    assert first + rest == data and eof


def test_the_link_refuses_what_the_api_cannot_carry(link: ProxmoxAgentLink, tmp_path: Path) -> None:
    for argv in ([], ["/bin/echo", ""]):
        with pytest.raises(GuestError, match="empty"):
            link.exec(argv, stdin=None, timeout=10)
    with pytest.raises(GuestError, match="empty"):
        link.write_file(str(tmp_path / "empty"), b"", timeout=10)
    with pytest.raises(GuestError, match="too long for one Proxmox VE API request"):
        link.exec(["/bin/echo", "x" * (600 * 1024)], stdin=None, timeout=10)
    assert link.max_input <= 64 * 1024 and link.max_write * 4 / 3 <= 60 * 1024


# -- faults --------------------------------------------------------------------------------------


def test_no_agent_configured_is_not_retryable_and_names_the_fix(adapter: ProxmoxAdapter) -> None:
    link = adapter.guest_agent(adapter.find_vm("noagent"))  # 202: no agent in its config
    with pytest.raises(GuestError) as caught:
        link.exec(["/bin/true"], stdin=None, timeout=10)
    assert not isinstance(caught.value, AgentUnavailable)
    assert "qm set 202 --agent 1" in (caught.value.hint or "")
    assert caught.value.exit_code == ExitCode.PREFLIGHT


def test_a_stopped_agent_is_unavailable_with_the_fix_and_comes_back(
    link: ProxmoxAgentLink, agent: LabAgent
) -> None:
    link.ping(timeout=5)
    agent.stop()
    for call in (
        lambda: link.ping(timeout=5),
        lambda: link.exec(["/bin/true"], stdin=None, timeout=5),
        lambda: link.read_file("/etc/hostname", offset=0, count=10, timeout=5),
    ):
        with pytest.raises(AgentUnavailable, match="QEMU guest agent is not running") as caught:
            call()
        assert "qm set 100 --agent 1" in (caught.value.hint or "")
        assert "qemu-guest-agent" in (caught.value.hint or "")
    agent.start()
    assert run(link, ["/bin/true"]).returncode == 0


def test_an_agent_that_stops_answering_is_unavailable(
    link: ProxmoxAgentLink, agent: LabAgent
) -> None:
    """qemu-ga alive but not answering (stopped with SIGSTOP): the API's 3 s guest-ping fails."""
    link.ping(timeout=5)
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        with pytest.raises(AgentUnavailable, match="QEMU guest agent is not running"):
            link.exec(["/bin/true"], stdin=None, timeout=5)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    assert run(link, ["/bin/true"]).returncode == 0


def test_the_api_answers_map_to_the_agent_errors(link: ProxmoxAgentLink) -> None:
    """What the API's handlers die with (data/pve-agent-api.json, _behaviour), as the link
    reports it; the double answers the first three in the tests above."""

    def mapped(status: int, reason: str, errors: dict[str, str] | None = None) -> Exception:
        exc = ResourceException(status, reason, reason, errors)
        return link._error(exc, "post", f"{link.base}/exec")

    timeout = mapped(500, "VM 100 qga command 'guest-exec' failed - got timeout")
    assert isinstance(timeout, AgentUnavailable) and "did not answer guest-exec" in str(timeout)
    assert "qm set 100 --agent 1" in (timeout.hint or "")
    assert isinstance(mapped(500, "VM 100 is not running"), AgentUnavailable)
    assert isinstance(mapped(500, "Agent error: can't execute command"), AgentCommandError)
    configured = mapped(500, "No QEMU guest agent configured")
    assert isinstance(configured, GuestError) and not isinstance(configured, AgentUnavailable)
    other = mapped(500, "Configuration file 'nodes/pve1/qemu-server/100.conf' does not exist")
    assert isinstance(other, HypervisorError)  # the adapter's own mapping (VMNotFound)
    forbidden = mapped(403, "Permission check failed (/vms/100, VM.GuestAgent.Unrestricted)")
    assert isinstance(forbidden, HypervisorError)
    assert "VM.GuestAgent.Unrestricted on /vms/100" in (forbidden.hint or "")
    unknown = mapped(400, "Parameter verification failed.", {"file": "property is missing"})
    assert isinstance(unknown, HypervisorError) and "file: property is missing" in str(unknown)


def test_a_stopped_vm_is_unavailable(link: ProxmoxAgentLink, double: PveApiDouble) -> None:
    double.cluster.set_status(DB, "stopped")
    with pytest.raises(AgentUnavailable, match="VM 100 is not running"):
        link.exec(["/bin/true"], stdin=None, timeout=5)


def test_an_agent_error_is_an_agent_command_error(link: ProxmoxAgentLink, tmp_path: Path) -> None:
    with pytest.raises(AgentCommandError, match="Agent error: failed to open file"):
        link.read_file(str(tmp_path / "missing"), offset=0, count=10, timeout=5)
    with pytest.raises(AgentCommandError, match="Agent error: ") as caught:
        link.exec(["/nonexistent/program"], stdin=None, timeout=5)
    assert "“/nonexistent/program”" in str(caught.value)  # the agent's UTF-8 quotes, intact


def test_containers_have_no_guest_agent(adapter: ProxmoxAdapter) -> None:
    with pytest.raises(UnsupportedOperation, match="container") as caught:
        adapter.guest_agent(adapter.find_vm("ct1"))
    assert "pct" in (caught.value.hint or "")


def test_pve9_token_without_unrestricted_is_refused_naming_the_privilege(
    double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    double.grant(TOKEN_ID, "/vms/100", {"VM.Audit", "VM.GuestAgent.Audit"})
    double.grant(TOKEN_ID, "/", set())
    with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
        vm = VM(name="db1", id="100", hypervisor="pve", extra=_db_extra())
        link = adapter.guest_agent(vm)
        link.ping(timeout=5)  # Audit is enough for ping
        with pytest.raises(HypervisorError) as caught:
            link.exec(["/bin/true"], stdin=None, timeout=5)
        assert "Permission check failed (/vms/100, VM.GuestAgent.Unrestricted)" in str(caught.value)
        assert "VM.GuestAgent.Unrestricted" in (caught.value.hint or "")
        assert caught.value.exit_code == ExitCode.HYPERVISOR
        assert adapter.missing_privileges(vm, ["snapshot", "guest-agent"]) == [
            "VM.GuestAgent.Unrestricted",
            "VM.Snapshot",
        ]
        double.grant(TOKEN_ID, "/vms/100", {"VM.Audit", "VM.GuestAgent.FileRead"})
        target = tmp_path / "readable"
        target.write_bytes(b"fine")
        assert link.read_file(str(target), offset=0, count=10, timeout=5) == (b"fine", True)
        double.grant(TOKEN_ID, "/vms/100", {"VM.Audit", "VM.GuestAgent.Unrestricted"})
        assert run(link, ["/bin/true"]).returncode == 0  # type: ignore[arg-type]


def test_pve8_needs_vm_monitor_and_reads_without_offset(
    cert: Cert, agent: LabAgent, tmp_path: Path
) -> None:
    double = _double(cert, agent, pve_major=8)
    try:
        double.grant(TOKEN_ID, "/vms/100", {"VM.Audit", "VM.GuestAgent.Unrestricted"})
        double.grant(TOKEN_ID, "/", set())
        with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
            vm = VM(name="db1", id="100", hypervisor="pve", extra=_db_extra())
            link = adapter.guest_agent(vm)
            assert isinstance(link, ProxmoxAgentLink) and link.max_write == 12 * 1024
            with pytest.raises(HypervisorError, match=r"\(/vms/100, VM.Monitor\)") as caught:
                link.exec(["/bin/true"], stdin=None, timeout=5)
            assert "VM.Monitor" in (caught.value.hint or "")
            assert adapter.missing_privileges(vm, ["guest-agent"]) == ["VM.Monitor"]
            double.grant(TOKEN_ID, "/vms/100", {"VM.Audit", "VM.Monitor"})
            assert run(link, ["/bin/cat"], b"eight").stdout == b"eight"  # type: ignore[arg-type]
            worst = b"\xff" * link.max_input  # fits PVE 8's 64 KiB request body
            assert run(link, ["/bin/cat"], worst).stdout == worst  # type: ignore[arg-type]
            link.write_file(str(tmp_path / "worst"), b"\xff" * link.max_write, timeout=5)
            target = str(tmp_path / "old")
            data = bytes(range(256)) * 40
            link.write_file(target, data, timeout=5)
            assert link.read_file(target, offset=100, count=50, timeout=5) == (data[100:150], False)
            assert link.read_file(target, offset=16000, count=999, timeout=5) == (
                data[16000:],
                True,
            )
        offset = raw(double, "GET", f"{AGENT}/file-read", params={"file": target, "offset": 1})
        assert offset.status_code == 400 and "offset" in offset.json()["errors"]
        big = raw(
            double, "POST", f"{AGENT}/file-write", data={"file": target, "content": "/" * 30000}
        )
        assert (big.status_code, big.reason) == (501, "for data too large")  # 90 KB form-encoded
    finally:
        double.stop()


def test_pve9_with_an_older_qemu_server_reads_without_offset(
    cert: Cert, agent: LabAgent, tmp_path: Path
) -> None:
    """A PVE 9 whose qemu-server predates 9.1.5 refuses offset/count/decode (400); the link
    then reads the whole file and keeps the slice, from then on."""
    double = _double(cert, agent, pve_major=8)
    try:
        with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
            link = adapter.guest_agent(adapter.find_vm("db1"))
            assert isinstance(link, ProxmoxAgentLink)
            link._legacy_read = False  # as on PVE 9: try the parameters first
            target = tmp_path / "old-qemu-server"
            target.write_bytes(bytes(range(256)) * 3)
            got = link.read_file(str(target), offset=300, count=10, timeout=5)
            assert got == (bytes(range(256))[44:54], False)
            assert link._legacy_read
        reads = [p for m, p in double.calls() if p.endswith("/agent/file-read")]
        assert len(reads) == 2  # the refused one, then the old form
    finally:
        double.stop()


def _db_extra() -> dict[str, Any]:
    return {"node": "pve1", "type": "qemu", "vmid": 100}


# -- hostile answers -----------------------------------------------------------------------------

KEYS = ("pid", "exited", "exitcode", "signal", "out-data", "err-data", "out-truncated",
        "err-truncated", "content", "bytes-read", "truncated", "result")  # fmt: skip
answers = hostile_json.nested(
    hostile_json.scalars("QUJD", "QUI=QUI=", "\u0100", 0, 1, "1", 5, -1, 2**40, "abc", True),
    KEYS,
    max_leaves=12,
)


@pytest.fixture(scope="module")
def open_link(cert: Cert) -> Iterator[ProxmoxAgentLink]:
    server = start_double(cert)
    with ProxmoxAdapter("pve", token_settings(server, cert)) as adapter:
        link = adapter.guest_agent(adapter.find_vm("db1"))
        assert isinstance(link, ProxmoxAgentLink)
        yield link
    server.stop()


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(answer=answers, method=st.sampled_from(["ping", "exec", "exec_status", "read_file"]))
def test_any_answer_is_understood_or_one_line(
    open_link: ProxmoxAgentLink, answer: Any, method: str
) -> None:
    link = open_link
    send = link.adapter._send
    link.adapter._send = lambda *a, **k: answer  # type: ignore[method-assign]
    try:
        result = {
            "ping": lambda: link.ping(timeout=1),
            "exec": lambda: link.exec(["/bin/true"], stdin=b"in", timeout=1),
            "exec_status": lambda: link.exec_status(7, timeout=1),
            "read_file": lambda: link.read_file("/f", offset=0, count=64, timeout=1),
        }[method]()
    except HypervisorError as exc:
        assert exc.exit_code == ExitCode.HYPERVISOR and "\n" not in str(exc)
        return
    except SnapcoordError as exc:
        assert "\n" not in str(exc)
        return
    finally:
        link.adapter._send = send  # type: ignore[method-assign]
    if method == "exec":
        assert isinstance(result, int) and result > 0
    elif method == "exec_status":
        assert isinstance(result, ExecStatus) and isinstance(result.stdout, bytes)
    elif method == "read_file":
        data, eof = result  # type: ignore[misc]
        assert isinstance(data, bytes) and len(data) <= 64 and isinstance(eof, bool)


def test_first_setup_grants_each_versions_agent_transport_privilege() -> None:
    text = (Path(__file__).parent.parent / "docs" / "first-setup.md").read_text()
    for major in (8, 9):
        (line,) = re.findall(
            rf'^pveum role add SnapcoordAgent -privs "([^"]*)"\s+# agent transport on PVE {major}$',
            text,
            re.M,
        )
        assert tuple(sorted(line.split(","))) == proxmox_agent_transport_privileges(major)


def test_check_asks_for_the_agent_transports_privilege(
    double: PveApiDouble, cert: Cert, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``snapcoord check`` on a VM with transport = "agent" (the schema's choice comes with the
    transport itself: here the parsed setting is replaced)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN_SECRET)
    config = parse_config(
        {
            "defaults": {"store": "/nonexistent/store", "label": "test"},
            "hypervisors": {"pve": hypervisor_table(double, cert)},
            "vms": {"db": {"hypervisor": "pve", "vmid": 100, "guest": {"host": "127.0.0.1"}}},
        }
    )
    checker = Checker(config, "db")
    assert checker.vm_cfg.guest is not None
    assert "guest-agent" not in checker._operations()
    guest = dataclasses.replace(checker.vm_cfg.guest, transport="agent")
    checker.vm_cfg = dataclasses.replace(checker.vm_cfg, guest=guest)
    assert checker._operations() == ["snapshot", "guest-agent"]
    double.grant(TOKEN_ID, "/", {"VM.Audit", "VM.Snapshot"})
    with ProxmoxAdapter("pve", token_settings(double, cert)) as adapter:
        checker.adapter = adapter
        checker.vm = adapter.find_vm("100")
        with pytest.raises(Skip):
            checker._privileges()
        (finding,) = checker.findings
        assert "lacks VM.GuestAgent.Unrestricted on the VM" in finding.detail
        double.grant(TOKEN_ID, "/", {"VM.Audit", "VM.Snapshot", "VM.GuestAgent.Unrestricted"})
        assert checker._privileges().startswith("enough to snapshot")

"""The guest agent transport (snapcoord/agent.py) against a real qemu-ga in the lab guest
(tests/qga_fixture.py): commands, timeouts killed in the guest, streams through files under the
agent's limits, the detached channel the pause's lock session uses, and the pause itself against
a real MariaDB. The hypervisors' own paths to the agent are tested in tests/test_pve_agent.py
(the Proxmox API double) and tests/test_realvm_agent.py (libvirt and the real Debian guest)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from snapcoord.agent import CHANNEL_DIR, AgentTransport
from snapcoord.agent_link import AgentLink, AgentUnavailable
from snapcoord.config import parse_table
from snapcoord.errors import GuestError
from snapcoord.guest import ConnectionLost, shell_transport
from snapcoord.hooks.databases import mysql_pause, pause
from snapcoord.hooks.guest import watchdog
from snapcoord.hooks.guest.services import Services
from snapcoord.run import ServiceWindow
from snapcoord.settings import DumpConfig, GuestConfig
from tests import lab
from tests.guest_fixtures import (
    lab_services,  # noqa: F401 - fixture
    wait_for,
    watchdog_pids,
)
from tests.qga_fixture import LabAgent, SocketAgentLink, start_agent
from tests.test_pause import write_commits

pytestmark = pytest.mark.usefixtures("_require_qga")


@pytest.fixture
def _require_qga() -> None:
    lab.require("qemu-ga")


def agent_guest(**overrides: object) -> GuestConfig:
    table = {"transport": "agent", "database": "mariadb", **overrides}
    return parse_table(GuestConfig, table)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[LabAgent]:
    running = start_agent(tmp_path / "qga")
    yield running
    running.stop()


def make_transport(agent: LabAgent, link: AgentLink | None = None, **overrides: object) -> Any:
    chosen = link or agent.link()
    transport = AgentTransport(agent_guest(**overrides), lambda: chosen, vm="lab")
    transport.open()
    return transport


@pytest.fixture
def transport(agent: LabAgent) -> Iterator[AgentTransport]:
    opened = make_transport(agent)
    yield opened
    opened.close()


def leftovers(folder: str | Path) -> list[str]:
    path = Path(folder)
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def processes_with(text: str) -> list[int]:
    return [pid for pid, _comm, args in lab.process_table() if text in args]


# -- commands ---------------------------------------------------------------------------------


def test_a_command_runs_as_root_with_its_stdin_output_and_status(
    transport: AgentTransport,
) -> None:
    result = transport.run(
        ["sh", "-c", 'id -u; cat; echo "to stderr" >&2; exit 3'], timeout=10, stdin=b"in\n"
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, b"0\nin\n", b"to stderr\n")
    assert not result.timed_out


def test_a_command_past_its_timeout_is_killed_in_the_guest_with_its_children(
    transport: AgentTransport,
) -> None:
    marker = "4242.5"
    started = time.monotonic()
    result = transport.run(["sh", "-c", f"sleep {marker} & sleep {marker}"], timeout=1)
    assert result.timed_out and not result.ok
    assert time.monotonic() - started < 10
    wait_for(lambda: not processes_with(f"sleep {marker}"), 5, "both sleeps killed in the guest")


def test_stdin_larger_than_one_exec_goes_through_a_root_only_file(agent: LabAgent) -> None:
    link = agent.link()
    link.max_input = 1000
    opened = make_transport(agent, link)
    data = os.urandom(5000)
    result = opened.run(["sha256sum"], timeout=10, stdin=data)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert leftovers(agent.transfer_dir) == []


def test_output_larger_than_the_agent_keeps_is_an_error_not_a_truncated_answer(
    transport: AgentTransport,
) -> None:
    with pytest.raises(GuestError, match="larger than the guest agent keeps"):
        transport.run(["head", "-c", str(17 << 20), "/dev/zero"], timeout=30)


def test_an_agent_restarted_mid_command_is_a_lost_connection_then_it_answers_again(
    agent: LabAgent,
) -> None:
    opened = make_transport(agent)
    generation = opened.generation
    with pytest.raises(ConnectionLost):
        opened.run(["sh", "-c", f"kill {agent.pid}; sleep 2"], timeout=10)  # qemu-ga dies
    with pytest.raises(AgentUnavailable):
        opened.reconnect(generation)
    agent.restart()
    opened.reconnect(generation)
    assert opened.generation == generation + 1
    assert opened.run(["true"], timeout=10).ok


# -- streams ----------------------------------------------------------------------------------


def small_reads(agent: LabAgent, size: int) -> SocketAgentLink:
    link = agent.link()
    link.max_read = link.max_write = size
    return link


def test_a_stream_out_arrives_exactly_in_chunks_and_leaves_nothing(
    agent: LabAgent, tmp_path: Path
) -> None:
    opened = make_transport(agent, small_reads(agent, 256 << 10))
    data = os.urandom(3 << 20) + b"end"
    (tmp_path / "src").write_bytes(data)
    got = bytearray()
    result = opened.run_streaming(
        ["sh", "-c", 'cat "$1"; echo done >&2', "sh", str(tmp_path / "src")],
        timeout=60,
        consume=got.extend,
    )
    assert result.ok and result.stderr == b"done\n"
    assert bytes(got) == data
    assert leftovers(agent.transfer_dir) == []


def test_a_stream_out_whose_bytes_changed_on_the_way_fails_on_the_guest_sha256(
    agent: LabAgent,
) -> None:
    class Flipping(SocketAgentLink):
        def read_file(self, path: str, **kwargs: Any) -> tuple[bytes, bool]:
            data, eof = super().read_file(path, **kwargs)
            return (bytes([data[0] ^ 1]) + data[1:] if data else data), eof

    link = Flipping(agent.socket, vm="lab")
    agent.links.append(link)
    opened = make_transport(agent, link)
    with pytest.raises(GuestError, match="sha256 differs"):
        opened.run_streaming(["head", "-c", "100000", "/dev/urandom"], timeout=30, consume=None)
    assert leftovers(agent.transfer_dir) == []


def test_a_consumer_that_fails_kills_the_guest_command_and_removes_the_file(
    agent: LabAgent,
) -> None:
    opened = make_transport(agent, small_reads(agent, 64 << 10))
    seen: list[int] = []

    def full(chunk: bytes) -> None:
        seen.append(len(chunk))
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        opened.run_streaming(
            ["sh", "-c", "while :; do head -c 65536 /dev/zero; sleep 0.01; done # 4243"],
            timeout=60,
            consume=full,
        )
    assert seen
    wait_for(lambda: not processes_with("# 4243"), 5, "the producer killed in the guest")
    assert leftovers(agent.transfer_dir) == []


def test_a_stream_in_reaches_the_command_in_order_and_leaves_nothing(agent: LabAgent) -> None:
    opened = make_transport(agent, small_reads(agent, 100 << 10))
    data = os.urandom((1 << 20) + 12345)
    result = opened.run_streaming(
        ["sha256sum"], timeout=60, stdin=b"head:", source=io.BytesIO(data)
    )
    assert result.ok
    assert result.stdout.split()[0].decode() == hashlib.sha256(b"head:" + data).hexdigest()
    assert leftovers(agent.transfer_dir) == []


def test_a_stream_in_whose_command_fails_early_stops_sending(agent: LabAgent) -> None:
    link = small_reads(agent, 10 << 10)
    writes: list[str] = []
    original = link.write_file

    def counting(path: str, data: bytes, **kwargs: Any) -> None:
        writes.append(path)
        original(path, data, **kwargs)

    link.write_file = counting  # type: ignore[method-assign]
    opened = make_transport(agent, link)
    result = opened.run_streaming(
        ["sh", "-c", "head -c 10 >/dev/null; echo refused >&2; exit 5"],
        timeout=60,
        source=io.BytesIO(os.urandom(5 << 20)),
    )
    assert result.returncode == 5 and b"refused" in result.stderr
    assert len(writes) < 100  # 512 chunks were there to send
    assert leftovers(agent.transfer_dir) == []


# -- channels ---------------------------------------------------------------------------------


def test_a_channel_is_fed_and_read_line_by_line_and_ends_on_close(
    transport: AgentTransport,
) -> None:
    script = 'while read -r l; do echo "got $l"; done; echo bye >&2; exit 4'
    channel = transport.open_channel(["sh", "-c", script])
    channel.start()
    channel.write(b"one\ntwo\n")
    assert [channel.readline(10), channel.readline(10)] == ["got one", "got two"]
    with pytest.raises(TimeoutError):
        channel.readline(0.3)
    assert channel.alive
    channel.close(wait=10)
    assert channel.exit_code() == 4
    assert not channel.alive
    assert leftovers(CHANNEL_DIR) == []


def test_a_channel_whose_command_ends_reports_its_end_status_and_stderr(
    transport: AgentTransport,
) -> None:
    channel = transport.open_channel(["sh", "-c", "echo last; echo why >&2; exit 7"])
    channel.start()
    assert channel.readline(10) == "last"
    assert channel.readline(10) is None
    assert (channel.exit_code(), channel.error_text()) == (7, "why")
    channel.write(b"ignored\n")  # an ended channel swallows writes
    channel.close()
    assert leftovers(CHANNEL_DIR) == []


# -- the watchdog and the pause through the agent -----------------------------------------------


def test_the_watchdog_armed_through_the_agent_outlives_the_call_and_disarms(
    transport: AgentTransport,
) -> None:
    dog = watchdog.arm(
        transport, vm="lab", run_id="agent-unit", init="sysv", seconds=600,
        services=["snapcoord-none"], database=None, sudo=False, timeout=10,
    )  # fmt: skip
    assert watchdog.running(transport, "agent-unit", vm="lab", sudo=False, timeout=10)
    assert dog.pid in processes_with(dog.marker)
    assert watchdog.kill_runs(transport, ["agent-unit"], vm="lab", sudo=False, timeout=10)
    assert not watchdog.running(transport, "agent-unit", vm="lab", sudo=False, timeout=10)


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "control-unguarded"])
def test_a_stop_queued_in_a_hung_agent_stops_nothing_once_the_watchdog_fired(
    agent: LabAgent, lab_services: lab.GuestServices, guarded: bool
) -> None:
    """A stop request sent to a hung agent (here SIGSTOPped) times out, but it stays in the
    agent's channel and runs when the agent wakes up, after the run gave up and the watchdog
    restored the services. With the run's guard it stops nothing. The control, a stop script
    without a guard, shows that the late request does run and would leave cron down."""
    transport = make_transport(agent, services=["cron"], database="none", stop_timeout=2)
    svc = Services(transport, agent_guest(services=["cron"], database="none"), vm="lab")
    svc.probe(warm=False)
    frozen = False
    try:
        dog = watchdog.arm(
            transport, vm="lab", run_id="agent-late", init="sysv", seconds=4,
            services=["cron"], database=None, sudo=False, timeout=10,
        )  # fmt: skip
        svc.guard = dog.marker if guarded else None
        os.kill(agent.pid, signal.SIGSTOP)
        frozen = True
        with pytest.raises(GuestError, match="stopping cron"):
            svc.stop(["cron"], ServiceWindow())
        wait_for(lambda: not watchdog_pids("agent-late"), 30, "the watchdog to fire and end")
        assert lab_services.running("cron")  # the stop has not run: it waits in the channel
        os.kill(agent.pid, signal.SIGCONT)
        frozen = False
        # qemu-ga takes its requests in order: once a later command answered, the queued stop
        # has been started; then it runs until its script ends (the script's text names it)
        assert transport.run(["true"], timeout=30).ok
        wait_for(lambda: not processes_with("guest watchdog has fired"), 30, "the late stop")
        assert lab_services.running("cron") is guarded
        if not guarded:
            lab_services.start("cron")
    finally:
        if frozen:
            os.kill(agent.pid, signal.SIGCONT)
        transport.close()


@pytest.fixture
def server(scratch_mariadb: lab.ScratchMariaDB) -> lab.ScratchMariaDB:
    scratch_mariadb.sql("CREATE DATABASE t; CREATE TABLE t.w (v INT) ENGINE=InnoDB;")
    return scratch_mariadb


def agent_pause(
    transport: AgentTransport, server: lab.ScratchMariaDB, **overrides: object
) -> mysql_pause.MySQLPause:
    g = agent_guest(consistency="pause", **overrides)
    options = parse_table(DumpConfig, {"options": [f"--socket={server.socket}", "--user=root"]})
    plan = mysql_pause.check_pause(transport, vm="lab", guest=g, options=options)
    return mysql_pause.MySQLPause(
        transport, vm="lab", guest=g, options=options, plan=plan, run_id="agent-unit"
    )


@pytest.mark.parametrize("method", ["backup_stage", "ftwrl"])
def test_the_pause_holds_commits_through_the_agent_until_release(
    transport: AgentTransport, server: lab.ScratchMariaDB, method: str
) -> None:
    held = agent_pause(transport, server, pause_method=method)
    try:
        held.hold()
        assert not write_commits(server)
        held.check_alive()
        held.verify()
    finally:
        held.release()
    assert write_commits(server)
    assert not held.session.alive
    assert leftovers(CHANNEL_DIR) == []


def test_the_guest_time_limit_ends_a_lock_held_through_the_agent(
    transport: AgentTransport, server: lab.ScratchMariaDB
) -> None:
    held = agent_pause(transport, server, pause_timeout=5.0)
    held.hold()
    try:
        assert not write_commits(server)
        time.sleep(max(0.0, held.remaining()) + 0.5)
        wait_for(lambda: write_commits(server), 10, "commits after the guest's limit")
        with pytest.raises(pause.LockLost):
            held.check_alive()
    finally:
        held.release()


def test_kill_sessions_through_the_agent_ends_the_detached_lock_session(
    transport: AgentTransport, server: lab.ScratchMariaDB
) -> None:
    held = agent_pause(transport, server)
    held.hold()
    try:
        assert not write_commits(server)
        assert pause.kill_sessions(transport, runs=["agent-unit"], vm="lab", sudo=False, timeout=30)
        wait_for(lambda: write_commits(server, wait=5), 30, "commits to flow after the kill")
    finally:
        held.release()
    assert leftovers(CHANNEL_DIR) == []


# -- what killed runs leave, and streams kept on SSH ---------------------------------------------


def test_opening_removes_what_killed_runs_of_this_coordinator_left_in_the_guest(
    agent: LabAgent,
) -> None:
    from snapcoord import agent as agent_module

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = agent_module._HOST
    transfer = agent.transfer_dir
    dead = [f"{transfer}/{host}.{gone.pid}.aa", f"{CHANNEL_DIR}/{host}.{gone.pid}.bb"]
    kept = [f"{transfer}/{host}.1.cc", f"{transfer}/other-host.{gone.pid}.dd"]
    for folder in dead + kept:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "out").write_bytes(b"partial dump")
    opened = make_transport(agent)
    opened.close()
    assert [Path(f).exists() for f in dead] == [False, False]
    assert [Path(f).exists() for f in kept] == [True, True]


def test_dump_transport_ssh_streams_over_ssh_and_runs_commands_through_the_agent(
    agent: LabAgent, ssh_guest: lab.SshGuest
) -> None:
    link = agent.link()
    reads: list[str] = []
    original = link.read_file

    def counting(path: str, **kwargs: Any) -> tuple[bytes, bool]:
        reads.append(path)
        return original(path, **kwargs)

    link.read_file = counting  # type: ignore[method-assign]
    table = ssh_guest.guest_table(transport="agent", dump_transport="ssh")
    guest = parse_table(GuestConfig, table)
    streams = shell_transport(replace(guest, transport="ssh"), vm="lab")
    opened = AgentTransport(guest, lambda: link, vm="lab", streams=streams)
    opened.open()
    try:
        assert "streams: ssh" in opened.description
        got = bytearray()
        result = opened.run_streaming(["head", "-c", "100000", "/dev/zero"], timeout=30,
                                      consume=got.extend)  # fmt: skip
        assert result.ok and bytes(got) == bytes(100000)
        assert not [path for path in reads if path.startswith(str(agent.transfer_dir))]
        assert opened.run(["id", "-u"], timeout=10).stdout == b"0\n"  # the agent: root
    finally:
        opened.close()


def test_an_agent_that_blocks_guest_exec_is_one_line_with_the_fix(tmp_path: Path) -> None:
    blocked = start_agent(tmp_path / "blocked", blocked=("guest-exec",))
    try:
        with pytest.raises(GuestError) as info:
            make_transport(blocked)
        assert "refuses to run commands" in info.value.message
        assert info.value.hint is not None and "qemu-ga.conf" in info.value.hint
    finally:
        blocked.stop()


def test_empty_arguments_reach_the_command_as_empty_arguments(transport: AgentTransport) -> None:
    result = transport.run(["sh", "-c", 'printf "[%s]" "$@"', "sh", "", "x", "", "-x"], timeout=10)
    assert result.stdout == b"[][x][][-x]"


def test_a_link_that_carries_less_output_caps_it_in_the_guest_and_keeps_the_status(
    agent: LabAgent,
) -> None:
    link = agent.link()
    link.max_output = 1000
    opened = make_transport(agent, link)
    small = opened.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (small.returncode, small.stdout, small.stderr) == (3, b"out\n", b"err\n")
    with pytest.raises(GuestError, match="larger than"):
        opened.run(["head", "-c", "5000", "/dev/zero"], timeout=10)
    with pytest.raises(GuestError, match="larger than"):
        opened.run(["sh", "-c", "head -c 5000 /dev/zero >&2"], timeout=10)
    assert opened.run(["true"], timeout=10).ok


def test_gzip_runs_in_the_guest_when_the_dump_crosses_the_agent() -> None:
    from types import SimpleNamespace

    from snapcoord.plans.fallback import compress_on

    def where(chosen: str, **guest: object) -> str:
        table = {"transport": "agent", **guest}
        if table["transport"] == "ssh" or table.get("dump_transport") == "ssh":
            table["host"] = "db1"
        ctx = SimpleNamespace(
            guest=parse_table(GuestConfig, table),
            vm_cfg=SimpleNamespace(dump=parse_table(DumpConfig, {"compress_on": chosen})),
        )
        return compress_on(ctx)  # type: ignore[arg-type]

    assert where("auto") == "guest"
    assert where("auto", dump_transport="ssh") == "coordinator"
    assert where("auto", transport="ssh") == "coordinator"
    assert where("coordinator") == "coordinator"  # an explicit choice is kept
    assert where("guest", transport="ssh") == "guest"

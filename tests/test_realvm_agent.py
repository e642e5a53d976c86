"""The QEMU guest agent of the real Debian 12 guest through libvirt (adapters/libvirt_agent.py):
what ``transport = "agent"`` is built on, and the guest-side facts its design relies on.

* :class:`LibvirtAgentLink` against qemu-guest-agent 7.2 under libvirt 9.0: exec with stdin,
  exit codes, a signal; a binary file of a few MiB read back in chunks at offsets (exact
  sha256); a read of ``max_read`` works and one whose reply is over libvirt's
  ``REMOTE_STRING_MAX`` is refused with a clear error (and the link goes on working); the agent
  stopped, frozen (SIGSTOP) or flooded: :class:`AgentUnavailable` with the fix, never a hang.
* Under systemd, a process qemu-ga started dies when qemu-guest-agent restarts (its unit's
  ``KillMode=control-group``) unless ``systemd-run --scope`` moved it out; and
  ``guest-exec-status`` says ``exited`` only once every holder of the command's stdout and
  stderr closed them: the reasons the watchdog and the lock holder are wrapped.
* ``RealGuest.ssh_logins()`` counts sshd's accepted logins without logging in.

Same guest as the other realvm modules (tests/lab/isolation.py QEMU_MODULES); each test leaves
qemu-guest-agent running and nothing of its own behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator

import pytest

from snapcoord.adapters.base import VM
from snapcoord.adapters.libvirt_adapter import LibvirtAdapter
from snapcoord.adapters.libvirt_agent import REMOTE_STRING_MAX, LibvirtAgentLink
from snapcoord.agent_link import AGENT_FIX, AgentCommandError, AgentUnavailable, ExecStatus
from snapcoord.settings import LibvirtSettings
from tests.guest_fixtures import wait_for
from tests.realvm_guest import RealGuest, real_guest  # noqa: F401 - fixture

pytestmark = [pytest.mark.real, pytest.mark.realvm]


@pytest.fixture(scope="module")
def adapter(real_guest: RealGuest) -> Iterator[LibvirtAdapter]:
    with LibvirtAdapter("qemu", LibvirtSettings("libvirt", real_guest.uri)) as opened:
        assert isinstance(opened, LibvirtAdapter)
        yield opened


@pytest.fixture(scope="module")
def vm(adapter: LibvirtAdapter, real_guest: RealGuest) -> VM:
    return adapter.find_vm(real_guest.domain)


@pytest.fixture
def link(adapter: LibvirtAdapter, vm: VM, real_guest: RealGuest) -> Iterator[LibvirtAgentLink]:
    real_guest.ensure_agent()
    made = adapter.guest_agent(vm)
    assert isinstance(made, LibvirtAgentLink)
    try:
        yield made
    finally:
        made.close()


def finish(link: LibvirtAgentLink, pid: int, timeout: float = 60) -> ExecStatus:
    """Poll ``guest-exec-status`` until the process is reported exited."""
    deadline = time.monotonic() + timeout
    while True:
        status = link.exec_status(pid, timeout=10)
        if status.exited:
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"guest PID {pid} not reported exited within {timeout:g} s")
        time.sleep(0.1)


def run(link: LibvirtAgentLink, *argv: str, stdin: bytes | None = None) -> ExecStatus:
    return finish(link, link.exec(list(argv), stdin=stdin, timeout=10))


def sh(link: LibvirtAgentLink, script: str) -> str:
    """A shell line in the guest through the link; its stdout (exit 0 required)."""
    status = run(link, "/bin/sh", "-c", script)
    assert status.returncode == 0, (script, status)
    return status.stdout.decode()


def agent_answers(link: LibvirtAgentLink) -> bool:
    try:
        link.ping(timeout=5)
    except AgentUnavailable:
        return False
    return True


def agent_pid(link: LibvirtAgentLink) -> str | None:
    """qemu-guest-agent's main PID as systemd sees it, asked through the agent itself (None
    while it does not answer: libvirt reports it "not connected" for about a second after a
    restart, even after the new agent answered once)."""
    try:
        return sh(link, "systemctl show -p MainPID --value qemu-guest-agent").strip()
    except AgentUnavailable:
        return None


def main_pid_over_ssh(guest: RealGuest) -> str:
    """qemu-guest-agent's main PID as systemd sees it, asked over SSH ("" if that failed)."""
    return guest.ssh("systemctl show -p MainPID --value qemu-guest-agent").stdout.strip()


def alive(link: LibvirtAgentLink, pid: int) -> bool:
    """Whether ``pid`` runs in the guest (a zombie does not count)."""
    state = sh(link, f"awk '{{print $3}}' /proc/{pid}/stat 2>/dev/null || true").strip()
    return state not in ("", "Z")


# -- the link ----------------------------------------------------------------------------------


def test_exec_stdin_exit_codes_and_a_signal(link: LibvirtAgentLink) -> None:
    link.ping(timeout=5)
    data = os.urandom(link.max_input)  # binary, every byte value, the most one exec carries
    status = run(link, "/bin/sh", "-c", "sha256sum | cut -d' ' -f1; echo oops >&2; exit 3",
                 stdin=data)  # fmt: skip
    assert status.exitcode == 3 and status.returncode == 3 and status.signal is None
    assert status.stdout.decode().strip() == hashlib.sha256(data).hexdigest()
    assert status.stderr == b"oops\n"
    assert not status.truncated

    echoed = run(link, "/bin/cat", stdin=b"\x00\xff\n binary \x80")
    assert echoed.returncode == 0 and echoed.stdout == b"\x00\xff\n binary \x80"

    killed = run(link, "/bin/sh", "-c", "kill -TERM $$; sleep 5")
    assert killed.signal == 15 and killed.exitcode is None and killed.returncode == 143


def test_agent_errors_are_command_errors(link: LibvirtAgentLink, vm: VM) -> None:
    with pytest.raises(AgentCommandError, match="No such file or directory") as missing:
        link.read_file("/nonexistent/file", offset=0, count=10, timeout=10)
    assert missing.value.vm == vm.name
    assert "internal error" not in str(missing.value)  # libvirt's wrapping is taken off
    with pytest.raises(AgentCommandError, match=r"guest-exec: .*nonexistent-program"):
        link.exec(["/usr/bin/nonexistent-program"], stdin=None, timeout=10)
    link.ping(timeout=5)


def test_a_binary_file_of_a_few_mib_read_back_in_chunks_at_offsets(
    link: LibvirtAgentLink,
) -> None:
    path = f"/root/agent-blob-{secrets.token_hex(4)}"
    size = 5 * (1 << 20) + 12345  # a few MiB, not a multiple of any chunk
    try:
        digest = sh(link, f"head -c {size} /dev/urandom > {path} && sha256sum {path}").split()[0]
        # Chunks that start at odd offsets: max_read, then a smaller one, until the end.
        received = hashlib.sha256()
        offset, chunks, eof = 0, 0, False
        while not eof:
            count = link.max_read if chunks % 2 == 0 else link.max_read - 4097
            data, eof = link.read_file(path, offset=offset, count=count, timeout=60)
            assert len(data) == count or eof
            received.update(data)
            offset += len(data)
            chunks += 1
        assert offset == size and chunks >= 3
        assert received.hexdigest() == digest
        # A read from the middle returns exactly those bytes.
        middle, eof = link.read_file(path, offset=size - 1000, count=600, timeout=30)
        tail = sh(link, f"tail -c 1000 {path} | head -c 600 | sha256sum").split()[0]
        assert len(middle) == 600 and not eof and hashlib.sha256(middle).hexdigest() == tail
    finally:
        sh(link, f"rm -f {path}")


def test_write_file_of_max_write_and_read_it_back(link: LibvirtAgentLink) -> None:
    path = f"/root/agent-write-{secrets.token_hex(4)}"
    data = os.urandom(link.max_write)
    try:
        for _ in range(3):  # the largest request, several times: none hangs or is cut
            link.write_file(path, data, timeout=30)
        assert sh(link, f"sha256sum {path}").split()[0] == hashlib.sha256(data).hexdigest()
        back, eof = link.read_file(path, offset=1000, count=5000, timeout=10)
        assert back == data[1000:6000] and not eof
        rest, eof = link.read_file(path, offset=len(data) - 10, count=100, timeout=10)
        assert rest == data[-10:] and eof
    finally:
        sh(link, f"rm -f {path}")


def test_a_read_of_max_read_works_and_libvirts_limit_is_refused_clearly(
    link: LibvirtAgentLink,
) -> None:
    """All 0xFF bytes: base64 of only '/', the character a JSON writer may escape."""
    path = f"/root/agent-ff-{secrets.token_hex(4)}"
    try:
        sh(link, f"head -c {4 << 20} /dev/zero | tr '\\000' '\\377' > {path}")
        data, eof = link.read_file(path, offset=0, count=link.max_read, timeout=60)
        assert data == b"\xff" * link.max_read and not eof
        assert (link.max_read + 2) // 3 * 4 < REMOTE_STRING_MAX  # its base64 fits
        # A 3 MiB read: its base64 alone is REMOTE_STRING_MAX characters.
        over = 3 << 20
        assert over // 3 * 4 >= REMOTE_STRING_MAX
        with pytest.raises(AgentCommandError, match="longer than libvirt carries"):
            link.read_file(path, offset=0, count=over, timeout=60)
        link.ping(timeout=5)  # the connection and the agent are fine afterwards
    finally:
        sh(link, f"rm -f {path}")


def test_output_over_libvirts_limit_loses_the_exit_status(link: LibvirtAgentLink) -> None:
    """qemu-ga returns a command's whole output with its status, then forgets the process: a
    status reply too long for libvirt is an error, and the exit status is gone with it. The
    transport must keep what a command prints small (and send data through files)."""
    pid = link.exec(["/bin/sh", "-c", "head -c 4194304 /dev/zero"], stdin=None, timeout=10)
    with pytest.raises(AgentCommandError, match="longer than libvirt carries"):
        deadline = time.monotonic() + 60
        while not link.exec_status(pid, timeout=30).exited and time.monotonic() < deadline:
            time.sleep(0.2)
    with pytest.raises(AgentCommandError, match="Invalid parameter 'pid'"):
        link.exec_status(pid, timeout=10)
    link.ping(timeout=5)


def test_output_over_libvirtds_read_limit_drops_the_agent_until_it_reconnects(
    link: LibvirtAgentLink, real_guest: RealGuest
) -> None:
    """Over 10 MiB of reply (``QEMU_AGENT_MAX_RESPONSE``): libvirt gives up on the agent for
    this domain until qemu-ga reconnects. Only a restart in the guest brings it back, and a
    plain ``systemctl restart`` hangs (qemu-ga is stuck writing the rest of that reply): it
    takes SIGKILL, after which systemd starts it again (``Restart=always``)."""
    pid = link.exec(["/bin/sh", "-c", "head -c 12000000 /dev/urandom"], stdin=None, timeout=10)
    try:
        with pytest.raises(AgentUnavailable, match="dropped the agent"):
            deadline = time.monotonic() + 60
            while not link.exec_status(pid, timeout=30).exited and time.monotonic() < deadline:
                time.sleep(0.2)
        with pytest.raises(AgentUnavailable, match="not available due to an error"):
            link.ping(timeout=5)
    finally:
        real_guest.ssh("systemctl kill --signal=SIGKILL qemu-guest-agent", check=True)
        wait_for(lambda: agent_answers(link), 120, "the agent to answer after its restart")


def test_a_stopped_agent_is_unavailable_with_the_fix(
    link: LibvirtAgentLink, real_guest: RealGuest, vm: VM
) -> None:
    # Stopped through the link itself: qemu-ga's own child asks systemd (--no-block: the stop
    # kills the unit's whole cgroup, this command with it).
    link.exec(["systemctl", "stop", "--no-block", "qemu-guest-agent"], stdin=None, timeout=10)
    try:
        wait_for(lambda: not agent_answers(link), 60, "the agent to stop answering")
        with pytest.raises(AgentUnavailable, match="not connected") as info:
            link.ping(timeout=5)
        assert info.value.hint == AGENT_FIX["libvirt"] and info.value.vm == vm.name
        assert "org.qemu.guest_agent.0" in str(info.value)
        with pytest.raises(AgentUnavailable):
            link.exec(["/bin/true"], stdin=None, timeout=5)
    finally:
        real_guest.ssh("systemctl start qemu-guest-agent", check=True)
    wait_for(lambda: agent_answers(link), 60, "the agent to answer again")
    assert run(link, "/bin/true").returncode == 0


def test_an_agent_that_does_not_answer_ends_the_call_at_its_timeout(
    link: LibvirtAgentLink, real_guest: RealGuest
) -> None:
    """qemu-ga stopped with SIGSTOP: the channel is connected, nothing answers. libvirt's own
    timeout ends the call (whole seconds; a timeout under 1 s is 1 s)."""
    real_guest.ssh("kill -STOP $(pidof qemu-ga)", check=True)
    try:
        for timeout in (0.2, 2.0):
            with pytest.raises(AgentUnavailable, match="not available for now") as info:
                link.ping(timeout=timeout)
            assert info.value.hint == AGENT_FIX["libvirt"]
    finally:
        real_guest.ssh("kill -CONT $(pidof qemu-ga)", check=True)
    wait_for(lambda: agent_answers(link), 30, "the agent to answer after SIGCONT")
    assert sh(link, "echo back") == "back\n"  # libvirt's guest-sync dropped the late replies


def test_a_paused_domain_is_unavailable(link: LibvirtAgentLink, adapter: LibvirtAdapter) -> None:
    dom = adapter.conn.lookupByUUIDString(link.uuid)
    dom.suspend()
    try:
        with pytest.raises(AgentUnavailable, match="not running") as info:
            link.ping(timeout=5)
        assert info.value.hint == "the VM must be running"
    finally:
        dom.resume()
    wait_for(lambda: agent_answers(link), 30, "the agent to answer after resume")


def test_files_qemu_ga_creates_are_world_writable_and_links_are_followed(
    link: LibvirtAgentLink,
) -> None:
    """``guest-file-open`` creates a new file with mode 0666 whatever the umask, and opens an
    existing path through a symbolic link: the transport must write only into a directory only
    root can write to (and make its files private itself)."""
    base = f"/tmp/agent-mode-{secrets.token_hex(4)}"
    try:
        link.write_file(f"{base}.new", b"x", timeout=10)
        assert sh(link, f"stat -c %a {base}.new").strip() == "666"
        sh(link, f"echo target > {base}.target && chmod 600 {base}.target && "
                 f"ln -s {base}.target {base}.link")  # fmt: skip
        link.write_file(f"{base}.link", b"through the link\n", timeout=10)
        assert sh(link, f"cat {base}.target") == "through the link\n"
    finally:
        sh(link, f"rm -f {base}.new {base}.target {base}.link")


# -- what the agent transport's design relies on ----------------------------------------------


def test_a_process_qemu_ga_started_dies_when_the_agent_restarts_unless_in_a_scope(
    link: LibvirtAgentLink, real_guest: RealGuest
) -> None:
    unit = f"snapcoord-agent-test-{secrets.token_hex(4)}"
    plain = int(sh(link, "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"))
    scoped = int(
        sh(
            link,
            f"systemd-run --scope --quiet --collect --unit {unit} -- sleep 601 "
            "</dev/null >/dev/null 2>&1 & echo $!",
        )
    )
    try:
        wait_for(
            lambda: f"/{unit}.scope" in sh(link, f"cat /proc/{scoped}/cgroup"),
            30,
            "systemd-run to move the process into its scope",
        )
        assert "/qemu-guest-agent.service" in sh(link, f"cat /proc/{plain}/cgroup")
        assert alive(link, plain) and alive(link, scoped)
        old_agent = agent_pid(link)
        assert old_agent not in (None, "0")

        link.exec(["systemctl", "restart", "--no-block", "qemu-guest-agent"], stdin=None,
                  timeout=10)  # fmt: skip
        # watched over SSH: an agent command that times out while the agent restarts can leave
        # libvirt saying "not available for now" until the channel closes again
        wait_for(
            lambda: main_pid_over_ssh(real_guest) not in ("", "0", old_agent),
            60,
            "qemu-guest-agent to run again under a new PID",
        )
        wait_for(lambda: agent_answers(link), 30, "libvirt to see the new agent connected")
        assert not alive(link, plain), "the agent's restart killed its cgroup"
        assert alive(link, scoped), "the scope's process survived the restart"
        program, argument = sh(link, f"cat /proc/{scoped}/cmdline").split("\0")[:2]
        assert program.rsplit("/", 1)[-1] == "sleep" and argument == "601"
    finally:  # over SSH: works whatever became of the agent, and hides no failure above
        real_guest.ssh(f"kill {plain} {scoped} 2>/dev/null; true")


def test_exec_status_says_exited_only_when_every_holder_of_its_output_closed_it(
    link: LibvirtAgentLink,
) -> None:
    marker = secrets.token_hex(4)
    holder_file = f"/run/agent-holder-{marker}"
    # The shell exits at once; its background child inherited stdout and keeps it open.
    pid = link.exec(
        ["/bin/sh", "-c", f"sleep 600 & echo $! > {holder_file}; echo started"],
        stdin=None,
        timeout=10,
    )
    try:
        wait_for(lambda: sh(link, f"cat {holder_file} 2>/dev/null || true").strip() != "", 30,
                 "the holder's PID")  # fmt: skip
        holder = int(sh(link, f"cat {holder_file}"))
        wait_for(lambda: not alive(link, pid), 30, "the shell itself to end")
        assert alive(link, holder)
        for _ in range(3):
            assert link.exec_status(pid, timeout=10).exited is False
        sh(link, f"kill {holder}")
        status = finish(link, pid)
        assert status.exitcode == 0 and status.stdout == b"started\n"
    finally:
        sh(link, f"kill $(cat {holder_file}) 2>/dev/null; rm -f {holder_file}; true")

    # Detached from the output, the same child does not hold the status back.
    quick = link.exec(
        ["/bin/sh", "-c", f"sleep 600 </dev/null >/dev/null 2>&1 & echo $! > {holder_file}"],
        stdin=None,
        timeout=10,
    )
    try:
        assert finish(link, quick).exitcode == 0
        assert alive(link, int(sh(link, f"cat {holder_file}")))
    finally:
        sh(link, f"kill $(cat {holder_file}) 2>/dev/null; rm -f {holder_file}; true")


# -- proof of "no SSH login" -------------------------------------------------------------------


def test_ssh_logins_counts_ssh_connections_and_not_agent_calls(
    real_guest: RealGuest, link: LibvirtAgentLink
) -> None:
    before = real_guest.ssh_logins()
    assert real_guest.ssh("true").returncode == 0
    wait_for(lambda: real_guest.ssh_logins() == before + 1, 30, "the login in the journal")
    assert real_guest.ssh("true").returncode == 0
    wait_for(lambda: real_guest.ssh_logins() == before + 2, 30, "the second login")
    # Agent calls, many of them: no login. A login would be in the journal by the time the
    # next SSH login is (sshd logs in order); one more SSH login proves the count exact.
    for _ in range(5):
        assert sh(link, "echo hi") == "hi\n"
    assert real_guest.agent_run(["/bin/true"])[0] == 0
    assert real_guest.ssh_logins() == before + 2
    assert real_guest.ssh("true").returncode == 0
    wait_for(lambda: real_guest.ssh_logins() >= before + 3, 30, "the third login")
    assert real_guest.ssh_logins() == before + 3

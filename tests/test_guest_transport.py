"""Guest transports against a real OpenSSH server on 127.0.0.1 (tests/lab/): strict host keys,
pinned fingerprints, first contact, sudo, ssh_config aliases, warm shells, and the exec transport.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snapcoord.config import parse_table
from snapcoord.errors import GuestError
from snapcoord.guest import ConnectionLost, ExecTransport, SshTransport, shell_transport
from snapcoord.hooks.guest.services import Services
from snapcoord.settings import GuestConfig
from snapcoord.shell import CHUNK
from tests import lab
from tests.cli_helpers import snapcoord
from tests.guest_fixtures import guest_config, lab_services, wait_for  # noqa: F401 - fixture
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture


def table(guest: lab.SshGuest, **overrides: Any) -> GuestConfig:
    """The guest's table, validated and typed with every schema default, as config.py builds it."""
    return parse_table(GuestConfig, {**guest.guest_table(), **overrides}, path="vms.lab.guest")


def connected(guest_table: GuestConfig) -> SshTransport:
    transport = SshTransport(guest_table, vm="lab")
    transport.open()
    return transport


def whoami(transport: SshTransport, *, sudo: bool = False) -> str:
    result = transport.run(["id", "-un"], sudo=sudo, timeout=30)
    assert result.ok, result.error_text()
    return result.stdout.decode().strip()


# -- host keys ------------------------------------------------------------------------------


def test_known_host_key_connects_and_commands_run(ssh_guest: lab.SshGuest) -> None:
    transport = connected(table(ssh_guest))
    try:
        assert whoami(transport) == "root"
    finally:
        transport.close()


def test_unknown_host_key_is_refused(ssh_guest: lab.SshGuest, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    transport = SshTransport(table(ssh_guest, known_hosts=str(empty)), vm="lab")
    with pytest.raises(GuestError, match="host key") as info:
        transport.open()
    transport.close()
    assert "accept_new_host_key" in str(info.value)  # the message says how to proceed
    assert empty.read_text() == ""  # nothing was silently recorded


def test_changed_host_key_is_refused(ssh_guest: lab.SshGuest) -> None:
    transport = SshTransport(table(ssh_guest, known_hosts=str(ssh_guest.wrong_known_hosts)), vm="x")
    with pytest.raises(GuestError, match="host key"):
        transport.open()
    transport.close()


def test_accept_new_host_key_records_a_first_contact(
    ssh_guest: lab.SshGuest, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    transport = connected(table(ssh_guest, known_hosts=str(known), accept_new_host_key=True))
    try:
        assert whoami(transport) == "root"
    finally:
        transport.close()
    host_key = (ssh_guest.workdir / "host_ed25519.pub").read_text().split()[1]
    assert host_key in known.read_text()


def test_accept_new_host_key_still_refuses_a_changed_key(ssh_guest: lab.SshGuest) -> None:
    wrong = str(ssh_guest.wrong_known_hosts)
    transport = SshTransport(table(ssh_guest, known_hosts=wrong, accept_new_host_key=True), vm="x")
    with pytest.raises(GuestError, match="host key"):
        transport.open()
    transport.close()


def test_pinned_fingerprint_replaces_known_hosts(ssh_guest: lab.SshGuest, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    guest = table(
        ssh_guest, known_hosts=str(empty), host_key_fingerprint=ssh_guest.host_key_fingerprint
    )
    transport = connected(guest)
    try:
        assert whoami(transport) == "root"
    finally:
        transport.close()
    assert empty.read_text() == ""


def test_wrong_pinned_fingerprint_is_refused(ssh_guest: lab.SshGuest) -> None:
    pin = "SHA256:" + "A" * 43
    transport = SshTransport(table(ssh_guest, host_key_fingerprint=pin), vm="lab")
    with pytest.raises(GuestError, match="host_key_fingerprint"):
        transport.open()
    transport.close()


def test_unreachable_guest_is_a_clear_error(ssh_guest: lab.SshGuest) -> None:
    transport = SshTransport(table(ssh_guest, port=lab.free_port(), connect_timeout=2.0), vm="x")
    with pytest.raises(GuestError, match="refused"):
        transport.open()
    transport.close()


# -- ssh_config, sudo -----------------------------------------------------------------------


def test_ssh_config_host_alias_is_honoured(ssh_guest: lab.SshGuest) -> None:
    # Only the alias and the config file: HostName, Port, User, IdentityFile, known hosts
    # all come from ssh_config, as they would from an admin's ~/.ssh/config.
    table = {"host": ssh_guest.alias, "ssh_config": str(ssh_guest.ssh_config)}
    transport = connected(parse_table(GuestConfig, table))
    try:
        assert whoami(transport) == "root"
    finally:
        transport.close()


def test_ssh_config_alias_with_pinned_fingerprint(ssh_guest: lab.SshGuest) -> None:
    table = {
        "host": ssh_guest.alias,
        "ssh_config": str(ssh_guest.ssh_config),
        "host_key_fingerprint": ssh_guest.host_key_fingerprint,
    }
    transport = connected(parse_table(GuestConfig, table))
    try:
        assert whoami(transport) == "root"
    finally:
        transport.close()


def test_sudo_user_runs_privileged_commands(sudo_guest: lab.SshGuest) -> None:
    transport = connected(table(sudo_guest))
    try:
        assert whoami(transport) == lab.SUDO_USER
        assert whoami(transport, sudo=True) == "root"
        transport.warm(1, sudo=True)  # a privileged warm shell
        assert whoami(transport, sudo=True) == "root"
        assert whoami(transport) == lab.SUDO_USER  # an unprivileged command stays unprivileged
    finally:
        transport.close()


def test_sudo_user_probes_the_guest_services(
    sudo_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    transport = connected(table(sudo_guest))
    try:
        state = Services(transport, table(sudo_guest), vm="lab").probe()
    finally:
        transport.close()
    assert state.init == "sysv" and state.database == "mariadb"
    assert state.running == {"apache2": True, "cron": True, "mariadb": True}


def test_missing_sudo_right_is_a_preflight_error_naming_sudo(
    nosudo_guest: lab.SshGuest, lab_services: lab.GuestServices
) -> None:
    transport = connected(table(nosudo_guest))
    try:
        with pytest.raises(GuestError, match="sudo -n refused to run 'sh'"):
            Services(transport, table(nosudo_guest), vm="lab").probe()
    finally:
        transport.close()


def test_missing_sudo_right_via_cli_exits_4_and_stops_nothing(
    nosudo_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    libvirt_node: str,
) -> None:
    uptime = lab_services.mariadb_uptime()
    config = guest_config(tmp_path, libvirt_node, nosudo_guest.guest_table(sudo=True))
    proc = snapcoord("-c", str(config), "snapshot", "web1")
    assert proc.returncode == 4, proc.stderr
    assert "sudo" in proc.stderr and "NOPASSWD" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert lab_services.all_running()
    assert lab_services.mariadb_uptime() >= uptime  # never restarted


# -- commands: quoting, warm shells, timeouts -----------------------------------------------


TRICKY = ["a b", "$(id)", "`id`", "'q'", '"d"', "; rm -rf /nonexistent", "\\", "*", "\n"]


@pytest.mark.parametrize("warm", [False, True], ids=["new-session", "warm-shell"])
def test_arguments_reach_the_guest_literally(ssh_guest: lab.SshGuest, warm: bool) -> None:
    transport = connected(table(ssh_guest))
    try:
        if warm:
            transport.warm(1, sudo=False)
        result = transport.run(["printf", "%s\\0", *TRICKY], timeout=30)
    finally:
        transport.close()
    assert result.ok
    assert result.stdout.split(b"\0")[:-1] == [t.encode() for t in TRICKY]


def test_warm_shell_keeps_stdout_stderr_and_status_apart(ssh_guest: lab.SshGuest) -> None:
    transport = connected(table(ssh_guest))
    try:
        transport.warm(1, sudo=False)
        script = "printf 'no newline'; echo oops >&2; printf '\\n%s 0\\n' fake-marker; exit 7"
        result = transport.run(["sh", "-c", script], timeout=30)
        again = transport.run(["sh", "-c", "cat; echo done"], timeout=30)  # stdin is /dev/null
    finally:
        transport.close()
    assert result.returncode == 7
    assert result.stdout == b"no newline\nfake-marker 0\n"
    assert result.stderr == b"oops\n"
    assert again.ok and again.stdout == b"done\n"


def test_warm_shell_timeout_breaks_only_that_shell(ssh_guest: lab.SshGuest) -> None:
    transport = connected(table(ssh_guest))
    try:
        transport.warm(1, sudo=False)
        slow = transport.run(["sleep", "30"], timeout=1)
        after = transport.run(["echo", "still here"], timeout=30)
    finally:
        transport.close()
    assert slow.timed_out and not slow.ok
    assert after.ok and after.stdout == b"still here\n"


def test_parallel_commands_use_separate_shells(ssh_guest: lab.SshGuest) -> None:
    transport = connected(table(ssh_guest))
    results: dict[int, bytes] = {}
    try:
        transport.warm(3, sudo=False)

        def work(index: int) -> None:
            result = transport.run(["sh", "-c", f"sleep 0.3; echo {index}"], timeout=30)
            results[index] = result.stdout

        threads = [threading.Thread(target=work, args=(i,)) for i in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        transport.close()
    assert results == {i: f"{i}\n".encode() for i in range(5)}


def test_lost_connection_is_reported(ssh_guest: lab.SshGuest) -> None:
    transport = connected(table(ssh_guest))
    try:
        transport.warm(1, sudo=False)
        # The master connection goes away (as when the network drops): commands fail clearly.
        control = transport._options()
        lab.run(["ssh", *control, "-O", "exit", ssh_guest.host], check=False)
        with pytest.raises(GuestError, match="lost the SSH connection"):
            transport.run(["true"], timeout=30)
    finally:
        transport.close()


# -- streaming -------------------------------------------------------------------------------


class EndlessSource(io.RawIOBase):
    """Zeros without end, for a guest's stdin; calls ``on_read`` before the ``after``-th read."""

    def __init__(self, after: int, on_read: Callable[[], object]) -> None:
        self.after, self.on_read, self.reads = after, on_read, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.reads += 1
        if self.reads == self.after:
            self.on_read()
        buffer[:] = bytes(len(buffer))
        return len(buffer)


def test_streaming_to_and_from_the_guest_over_ssh(
    ssh_guest: lab.SshGuest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="snapcoord.guest")
    data = os.urandom(3 * CHUNK + 7)
    received: list[bytes] = []
    transport = connected(table(ssh_guest))
    try:
        result = transport.run_streaming(
            ["sh", "-c", "cat; echo done >&2"],
            timeout=60,
            stdin=b"head:",
            source=io.BytesIO(data),
            consume=received.append,
        )
    finally:
        transport.close()
    assert result.ok and result.stdout == b"" and result.stderr == b"done\n"
    assert b"".join(received) == b"head:" + data
    assert f"guest {ssh_guest.host}: sh -c 'cat; echo done >&2'" in caplog.text


@pytest.mark.parametrize("direction", ["from the guest", "to the guest"])
def test_a_stream_whose_connection_dies_is_a_lost_connection(
    ssh_guest: lab.SshGuest, direction: str
) -> None:
    """The same ConnectionLost as Transport.run raises (so the callers' reconnect logic and
    messages apply), not a plain failed command with exit status 255."""
    transport = connected(table(ssh_guest))
    cut: list[int] = []

    def cut_once(_chunk: bytes = b"") -> None:
        if not cut:
            cut.extend(lab.cut_server_side(ssh_guest) or [0])

    try:
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="lost the SSH connection") as info:
            if direction == "from the guest":
                endless = "while echo x; do sleep 0.01; done"
                transport.run_streaming(
                    ["timeout", "60", "sh", "-c", endless], timeout=60, consume=cut_once
                )
            else:
                transport.run_streaming(
                    ["timeout", "60", "sh", "-c", "cat >/dev/null"],
                    timeout=60,
                    source=EndlessSource(after=4, on_read=cut_once),  # type: ignore[arg-type]
                )
        assert time.monotonic() - started < 30
        assert cut and cut != [0], "no sshd child served the connection"
        assert "timeout 60" not in str(info.value)  # the command line stays in the debug log
    finally:
        transport.close()


def test_exec_transport_streams_and_names_a_missing_command() -> None:
    transport = ExecTransport(["env", "SNAPCOORD_VIA=prefix"], vm="ct")
    received: list[bytes] = []
    result = transport.run_streaming(
        ["sh", "-c", 'printf "%s:" "$SNAPCOORD_VIA"; cat'],
        timeout=30,
        source=io.BytesIO(b"payload"),
        consume=received.append,
    )
    assert result.ok and b"".join(received) == b"prefix:payload"
    missing = ExecTransport(["snapcoord-no-such-command"], vm="ct")
    with pytest.raises(GuestError, match="snapcoord-no-such-command"):
        missing.run_streaming(["true"], timeout=30)


@pytest.mark.parametrize("method", ["run", "run_streaming"])
def test_a_shielded_command_finishes_before_an_interrupt_is_raised(
    method: str, tmp_path: Path
) -> None:
    """A command on its way is not abandoned half-done (its undo would race it): Ctrl-C waits
    for it, then is raised."""
    transport = ExecTransport([], vm="local")
    done = tmp_path / "done"
    main = threading.get_ident()
    timer = threading.Timer(0.3, signal.pthread_kill, args=(main, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        getattr(transport, method)(
            ["sh", "-c", 'sleep 1.5; echo finished >"$1"', "sh", str(done)],
            timeout=30,
            shield=True,
        )
    timer.join()
    # by state, not by time: the interrupt came while the command slept, and was raised only
    # once the command had written its last line (an abandoned command would still be asleep)
    assert done.read_text() == "finished\n"


def test_close_leaves_no_ssh_processes(ssh_guest: lab.SshGuest) -> None:
    transport = connected(table(ssh_guest))
    transport.warm(2, sudo=False)
    control_dir = transport._dir
    assert control_dir is not None
    transport.close()

    def leftovers() -> list[int]:
        return [pid for pid, _comm, args in lab.process_table() if control_dir in args]

    # the master exits on its own after `ssh -O exit`: on a loaded machine that takes a moment
    wait_for(lambda: leftovers() == [], 10, "the closed transport's ssh processes to end")
    assert not Path(control_dir).exists()


# -- exec transport -------------------------------------------------------------------------


def test_exec_transport_runs_through_the_prefix() -> None:
    transport = ExecTransport(["env", "SNAPCOORD_VIA=prefix"], vm="ct")
    transport.open()
    result = transport.run(["sh", "-c", 'echo "$SNAPCOORD_VIA" "$1"', "sh", "$(id)"], timeout=30)
    transport.close()
    assert result.ok and result.stdout == b"prefix $(id)\n"
    assert transport.command_line(["true"], sudo=True) == [
        "env",
        "SNAPCOORD_VIA=prefix",
        "sudo",
        "-n",
        "--",
        "true",
    ]


def test_exec_transport_with_a_missing_prefix_command_fails_in_preflight() -> None:
    table = {"transport": "exec", "exec_prefix": ["pct-does-not-exist", "exec", "101", "--"]}
    transport = shell_transport(parse_table(GuestConfig, table), vm="ct")
    with pytest.raises(GuestError, match="pct-does-not-exist"):
        transport.open()

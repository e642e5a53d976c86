"""Guest transports: how snapcoord runs a command inside the guest.

``SshTransport`` uses the OpenSSH client with one ControlMaster connection per run, so it honours
everything admins already configured (~/.ssh/config, Host aliases, ProxyJump, the agent,
known_hosts) and every later command reuses the open connection. ``ExecTransport`` runs commands
through an argv prefix (``pct exec 101 --``, ``lxc-attach -n web --``, or nothing for local).
Both take argument lists; the remote command line is built with :func:`shlex.join` only.

Every new SSH session makes sshd start the user's login shell, which reads its rc files (root's
``.bashrc`` with ``pyenv init`` costs 140 ms per command on the lab machine). So the transport can
*warm* shells during preflight: long-lived ``sh`` processes in the guest, each on its own channel
of the ControlMaster connection, that read one command at a time from stdin. A command sent to a
warm shell costs about a millisecond; the service window pays no connection or rc-file cost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import selectors
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from snapcoord.errors import GuestError
from snapcoord.run import finish_in_threads
from snapcoord.settings import GuestConfig
from snapcoord.shell import Completed, OutputNotEnded, display, execute, kill_group, spawn, stream

log = logging.getLogger("snapcoord.guest")

#: Called with each stdout line (without newline) as it arrives, where the transport can stream.
LineCallback = Callable[[bytes], None]
#: Called with each chunk of a streamed command's stdout, in a thread of its own.
Consumer = Callable[[bytes], None]

SSH_UNREACHABLE = 255


class Transport(Protocol):
    description: str

    def open(self) -> None: ...

    def close(self) -> None: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        timeout: float,
        stdin: bytes | None = None,
        shield: bool = False,
        on_line: LineCallback | None = None,
    ) -> Completed: ...

    def run_streaming(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        timeout: float,
        stdin: bytes = b"",
        source: BinaryIO | None = None,
        consume: Consumer | None = None,
        shield: bool = False,
    ) -> Completed:
        """Like :meth:`run` (the same errors, shielding and logging), for data too large to
        hold in memory: ``stdin`` and then the whole of ``source`` go to the command's stdin,
        its stdout goes chunk by chunk to ``consume``. If ``consume`` raises (a full store),
        the command dies of SIGPIPE and that exception is raised in preference to the
        command's own failure. Always a new process, never a warm shell."""
        ...

    def warm(self, count: int, *, sudo: bool) -> None: ...

    def open_channel(self, argv: Sequence[str], *, sudo: bool = False) -> Channel:
        """A long-lived command in the guest that snapcoord feeds on stdin and reads line by
        line (the pause's lock session). Not started yet: :meth:`Channel.start`."""
        ...

    def detached(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped so that a process it leaves running (the watchdog) outlives the
        transport's own call: unchanged over SSH and exec (``setsid`` is enough there); over the
        guest agent, in a systemd scope of its own (qemu-ga's processes die when it restarts)."""
        ...

    @property
    def generation(self) -> int:
        """Counts reconnects: a caller that saw a failure passes it to :meth:`reconnect`."""
        ...

    def reconnect(self, generation: int) -> None:
        """Drop the connection and open a new one, unless another caller already did since
        ``generation``. Raises :class:`GuestUnreachable` (retry later) or :class:`GuestError`
        (host key, authentication: never retried)."""
        ...


def _privileged(argv: Sequence[str], sudo: bool) -> list[str]:
    return ["sudo", "-n", "--", *argv] if sudo else list(argv)


class Channel(Protocol):
    """A long-lived command in the guest, fed on stdin and read line by line."""

    def start(self) -> None: ...

    def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin. A channel that ended swallows it: the next
        :meth:`readline` says so."""
        ...

    def readline(self, timeout: float) -> str | None:
        """The next stdout line (without newline); ``None`` once the command ended; raises
        :class:`TimeoutError` when no line came within ``timeout``."""
        ...

    @property
    def alive(self) -> bool: ...

    def exit_code(self) -> int | None:
        """The command's exit status once it ended (128 + N for signal N)."""
        ...

    def error_text(self) -> str:
        """Its last non-empty stderr line, or ''."""
        ...

    def close(self, *, wait: float = 5.0) -> None:
        """End it: end of input first, killed if it has not ended within ``wait``."""
        ...


class ProcessChannel:
    """A channel through a local process that carries the command (ssh, an exec prefix)."""

    def __init__(self, command: Sequence[str]) -> None:
        self._command = list(command)
        self._process: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[bytes] = []

    def start(self) -> None:
        self._process = spawn(
            self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for raw in self._process.stdout:
            self._lines.put(raw.rstrip(b"\n").decode("utf-8", errors="replace"))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for raw in self._process.stderr:
            self._stderr.append(raw)

    def write(self, data: bytes) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the command ended: the next read says so

    def readline(self, timeout: float) -> str | None:
        try:
            line = self._lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise TimeoutError from None
        if line is None:
            self._lines.put(None)  # later reads see the end too
        return line

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_code(self) -> int | None:
        code = self._process.poll() if self._process is not None else None
        return 128 - code if code is not None and code < 0 else code

    def error_text(self) -> str:
        if self.alive:
            time.sleep(0.05)  # a last line on its way
        lines = [ln.strip() for ln in b"".join(self._stderr).decode(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln]
        return lines[-1] if lines else ""

    def close(self, *, wait: float = 5.0) -> None:
        process = self._process
        if process is None:
            return
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(timeout=wait)
        except Exception:
            kill_group(process)
            process.wait()


def _shielded(call: Callable[[], Completed]) -> Completed:
    """Run ``call`` in a worker thread and wait for it even when SIGINT/SIGTERM arrives (the
    command's own timeout bounds it); the interrupt is raised afterwards. A service stop that
    is already on its way is not abandoned half-done: its undo would race it."""
    box: dict[str, Completed] = {}

    def work() -> None:
        box["result"] = call()

    (error,) = finish_in_threads([work])
    if error is not None:
        raise error
    return box["result"]


class _Streaming:
    """:meth:`Transport.run_streaming`, once for every transport: each transport runs the
    stream through its ``_checked`` (its error mapping, shielding and logging), as its ``run``
    does."""

    vm: str

    def command_line(self, argv: Sequence[str], *, sudo: bool = False) -> list[str]:
        raise NotImplementedError

    def open_channel(self, argv: Sequence[str], *, sudo: bool = False) -> Channel:
        return ProcessChannel(self.command_line(argv, sudo=sudo))

    def detached(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def _checked(
        self, argv: Sequence[str], call: Callable[[], Completed], *, shield: bool
    ) -> Completed:
        raise NotImplementedError

    def run_streaming(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        timeout: float,
        stdin: bytes = b"",
        source: BinaryIO | None = None,
        consume: Consumer | None = None,
        shield: bool = False,
    ) -> Completed:
        line = self.command_line(argv, sudo=sudo)

        def call() -> Completed:
            try:
                return stream(line, timeout=timeout, stdin=stdin, source=source, consume=consume)
            except OutputNotEnded as exc:
                raise GuestError(str(exc), vm=self.vm) from None

        return self._checked(argv, call, shield=shield)


class ExecTransport(_Streaming):
    """Commands run locally through an argv prefix (``[]`` = on this host)."""

    def __init__(self, prefix: Sequence[str], *, vm: str) -> None:
        self.prefix = list(prefix)
        self.vm = vm
        self.description = f"exec {shlex.join(self.prefix)}" if self.prefix else "local exec"

    def open(self) -> None:
        if self.prefix and shutil.which(self.prefix[0]) is None:
            raise GuestError(
                f"exec_prefix command {self.prefix[0]!r} not found on this host", vm=self.vm
            )

    def close(self) -> None:
        pass

    def command_line(self, argv: Sequence[str], *, sudo: bool = False) -> list[str]:
        return [*self.prefix, *_privileged(argv, sudo)]

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        timeout: float,
        stdin: bytes | None = None,
        shield: bool = False,
        on_line: LineCallback | None = None,
    ) -> Completed:
        """``on_line`` is ignored: output arrives all at once when the process ended."""
        line = self.command_line(argv, sudo=sudo)
        return self._checked(
            argv, lambda: execute(line, timeout=timeout, stdin=stdin), shield=shield
        )

    def _checked(
        self, argv: Sequence[str], call: Callable[[], Completed], *, shield: bool
    ) -> Completed:
        def checked() -> Completed:
            try:
                return call()
            except FileNotFoundError as exc:  # the prefix's command, or sudo, or argv[0]
                raise GuestError(f"cannot run {exc.filename!r}: not found", vm=self.vm) from None

        return _shielded(checked) if shield else checked()

    def warm(self, count: int, *, sudo: bool) -> None:
        """Nothing to warm: a local process has no connection or login shell to set up."""

    @property
    def generation(self) -> int:
        return 0

    def reconnect(self, generation: int) -> None:
        """Nothing to reconnect: every command is a new local process."""


class WarmShell:
    """A long-lived POSIX ``sh`` in the guest that runs one command at a time from its stdin.

    Each request is ``<command> </dev/null`` followed by a marker carrying a random token and the
    exit status, printed on stdout (and the token alone on stderr), so output boundaries cannot
    be forged by the command. Any failure (timeout, EOF, interrupt) breaks the shell for good:
    the caller drops it.
    """

    def __init__(self, argv: Sequence[str], *, sudo: bool) -> None:
        self.sudo = sudo
        self.broken = False
        # A session of its own: Ctrl-C on the terminal must not kill it mid-command.
        self._process = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._token = ""

    def send_handshake(self) -> None:
        self._token = secrets.token_hex(12)
        self._write(f"printf '\\n%s 0\\n' {self._token}; printf '\\n%s\\n' {self._token} >&2\n")

    def await_handshake(self, timeout: float) -> bool:
        result = self._collect(("ready",), timeout)
        return result.ok

    def run(
        self, argv: Sequence[str], *, timeout: float, on_line: LineCallback | None = None
    ) -> Completed:
        self._token = secrets.token_hex(12)
        self._write(
            f"{shlex.join(argv)} </dev/null; __rc=$?; printf '\\n%s\\n' {self._token} >&2; "
            f"printf '\\n%s %s\\n' {self._token} \"$__rc\"\n"
        )
        return self._collect(tuple(argv), timeout, on_line)

    def _write(self, text: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(text.encode())
            self._process.stdin.flush()
        except OSError:
            self.broken = True

    def _collect(
        self, argv: tuple[str, ...], timeout: float, on_line: LineCallback | None = None
    ) -> Completed:
        """Read stdout and stderr up to the markers, or until EOF or the timeout."""
        started = time.monotonic()
        if self.broken:
            return Completed(argv, SSH_UNREACHABLE, b"", b"warm shell is gone", 0.0)
        out_marker = f"\n{self._token} ".encode()
        err_marker = f"\n{self._token}\n".encode()
        assert self._process.stdout is not None and self._process.stderr is not None
        buffers = {
            self._process.stdout.fileno(): bytearray(),
            self._process.stderr.fileno(): bytearray(),
        }
        out_fd, err_fd = self._process.stdout.fileno(), self._process.stderr.fileno()
        done = {out_fd: False, err_fd: False}
        deadline = started + timeout
        scanned = 0
        try:
            with selectors.DefaultSelector() as selector:
                for fd in buffers:
                    selector.register(fd, selectors.EVENT_READ)
                while not (done[out_fd] and done[err_fd]):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.close(kill=True)
                        out, err = bytes(buffers[out_fd]), bytes(buffers[err_fd])
                        return Completed(argv, -1, out, err, timeout, timed_out=True)
                    for key, _ in selector.select(remaining):
                        fd = int(key.fd)
                        chunk = os.read(fd, 65536)
                        if not chunk:  # EOF: the shell or the connection died
                            self.close(kill=True)
                            return Completed(
                                argv,
                                SSH_UNREACHABLE,
                                bytes(buffers[out_fd]),
                                bytes(buffers[err_fd]) or b"connection closed",
                                time.monotonic() - started,
                            )
                        buffers[fd] += chunk
                        if on_line is not None and fd == out_fd:
                            scanned = _emit_lines(buffers[fd], scanned, on_line)
                        if fd == out_fd:
                            pos = buffers[fd].find(out_marker)
                            done[fd] = pos >= 0 and buffers[fd].endswith(b"\n")
                        else:
                            done[fd] = buffers[fd].endswith(err_marker)
        except BaseException:
            self.close(kill=True)  # interrupted mid-command: this shell's state is unknown
            raise
        out = bytes(buffers[out_fd])
        pos = out.find(out_marker)
        status = out[pos + len(out_marker) :].strip()
        err = bytes(buffers[err_fd])[: -len(err_marker)]
        returncode = int(status) if status.isdigit() else SSH_UNREACHABLE
        return Completed(argv, returncode, out[:pos], err, time.monotonic() - started)

    def close(self, *, kill: bool = False) -> None:
        """End the shell: politely (EOF on its stdin) or, mid-command, by killing the client."""
        self.broken = True
        if self._process.poll() is None:
            if not kill:
                with contextlib.suppress(OSError):
                    assert self._process.stdin is not None
                    self._process.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(timeout=2)
            if self._process.poll() is None:
                kill_group(self._process)
                self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout, self._process.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _emit_lines(buffer: bytearray, start: int, on_line: LineCallback) -> int:
    """Call ``on_line`` for each complete line from ``start``; return where the next one starts."""
    while (end := buffer.find(b"\n", start)) >= 0:
        on_line(bytes(buffer[start:end]))
        start = end + 1
    return start


class GuestUnreachable(GuestError):
    """The connection failed in a way that may succeed when repeated (network, not keys or
    auth): retried here a few times, by a revert while the guest boots, and by every undo
    (after a reconnect) within its budget."""


class ConnectionLost(GuestUnreachable):
    """The connection broke while a command ran (ssh exit 255, a dead ControlMaster or warm
    shell): the command may or may not have run in the guest."""


class NoAnswer(GuestUnreachable):
    """A guest command did not finish within its timeout: a stalled link or a hung command."""


_PERMANENT_SSH_ERRORS = (
    "host key verification failed",
    "remote host identification has changed",
    "permission denied",
    "no matching host key",
    "could not resolve hostname",
    "too many authentication failures",
)


class SshTransport(_Streaming):
    """One OpenSSH ControlMaster connection per run; every command reuses it.

    Commands go to a warm shell (see :meth:`warm`) when one is idle, else to a new session on the
    master connection. Host keys are verified strictly unless ``accept_new_host_key`` is set.
    """

    def __init__(self, guest: GuestConfig, *, vm: str) -> None:
        self.guest = guest
        self.vm = vm
        if guest.host is None:  # config.py requires it for transport = "ssh"
            raise ValueError("an SSH transport needs guest.host")
        self.host: str = guest.host
        target = f"{guest.user}@{self.host}" if guest.user else self.host
        port = f":{guest.port}" if guest.port else ""
        self.description = f"ssh {target}{port}"
        self._dir: str | None = None
        self._connected = False
        self._pinned_known_hosts: str | None = None
        self._pool_lock = threading.Lock()
        self._idle: dict[bool, list[WarmShell]] = {True: [], False: []}
        self._all_shells: list[WarmShell] = []
        self._generation = 0  # one ControlPath per connection: a reconnect never reuses a master
        self._reconnect_lock = threading.Lock()
        self._warm_counts: dict[bool, int] = {}

    # -- options ---------------------------------------------------------------------------
    def _options(self, *, master: bool = False) -> list[str]:
        """ssh options; only the connect makes the ControlMaster (``master``): every later
        command uses it, and never silently becomes a second master when it died.

        Every ssh command line ends the options with ``--`` before the host: the schema accepts
        no host that starts with '-', and a host that did is still never read as an option.
        After ``--`` ssh takes the next argument as the destination and the rest as the remote
        command, without parsing options again."""
        g = self.guest
        opts = ["-F", g.ssh_config] if g.ssh_config else []
        opts += [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={int(g.connect_timeout)}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "StrictHostKeyChecking=" + ("accept-new" if g.accept_new_host_key else "yes"),
        ]
        known_hosts = self._pinned_known_hosts or g.known_hosts
        if known_hosts:
            opts += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=none"]
        if g.port:
            opts += ["-p", str(g.port)]
        if g.user:
            opts += ["-l", g.user]
        if g.identity_file:
            opts += ["-i", g.identity_file, "-o", "IdentitiesOnly=yes"]
        for extra in g.ssh_options:
            opts += ["-o", extra]
        if self._dir:
            opts += [
                "-o",
                f"ControlPath={self._dir}/cm{self._generation}",
                "-o",
                "ControlMaster=" + ("auto" if master else "no"),
                "-o",
                "ControlPersist=120",
            ]
        return opts

    # -- connection ------------------------------------------------------------------------
    def open(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="snapcoord-ssh-")
        if self.guest.host_key_fingerprint:
            self._pinned_known_hosts = self._known_hosts_from_pin()
        self._connect()
        self._connected = True

    @retry(
        retry=retry_if_exception_type(GuestUnreachable),
        stop=stop_after_attempt(3),
        wait=wait_random_exponential(multiplier=0.5, max=4),
        reraise=True,
    )
    def _connect(self) -> None:
        self._connect_once()

    def _connect_once(self) -> None:
        result = execute(
            ["ssh", *self._options(master=True), "-T", "--", self.host, "true"],
            timeout=self.guest.connect_timeout + 5,
        )
        if result.ok:
            return
        text = result.error_text()
        lowered = result.stderr.decode(errors="replace").lower()
        if "host key" in lowered or "identification has changed" in lowered:
            raise GuestError(
                f"SSH host key of {self.host} could not be verified: {text}",
                vm=self.vm,
                hint="check known_hosts / host_key_fingerprint; set accept_new_host_key = true "
                "only for a first contact you trust",
            )
        if any(marker in lowered for marker in _PERMANENT_SSH_ERRORS):
            raise GuestError(f"SSH to {self.host} failed: {text}", vm=self.vm)
        raise GuestUnreachable(f"SSH to {self.host} failed: {text}", vm=self.vm)

    def _resolved(self) -> tuple[str, str]:
        """(hostname, port) after ssh_config (Host aliases), as ``ssh -G`` computes them."""
        result = execute(["ssh", *self._options(), "-G", "--", self.host], timeout=10)
        hostname, port = self.host, str(self.guest.port or 22)
        for line in result.stdout.decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname" and value:
                hostname = value
            elif key == "port" and value:
                port = value
        return hostname, port

    def _known_hosts_from_pin(self) -> str:
        """Scan the host's keys and keep only the one matching the pinned fingerprint.

        The scan itself is not trusted: ssh then verifies that the server holds that key."""
        assert self._dir is not None
        pin = self.guest.host_key_fingerprint
        hostname, port = self._resolved()
        scan = ["ssh-keyscan", "-T", str(int(self.guest.connect_timeout)), "-p", port]
        result = execute([*scan, "--", hostname], timeout=self.guest.connect_timeout + 5)
        path = Path(self._dir) / "known_hosts"
        for line in result.stdout.decode(errors="replace").splitlines():
            fields = line.split()
            if len(fields) < 3 or line.startswith("#"):
                continue
            candidate = Path(self._dir) / "candidate"
            candidate.write_text(line + "\n")
            finger = execute(["ssh-keygen", "-l", "-E", "sha256", "-f", str(candidate)], timeout=10)
            printed = finger.stdout.decode().split()
            if finger.ok and len(printed) > 1 and printed[1] == pin:
                # Recorded under the name ssh will look up (the alias as given, or host:port).
                names = {self.host, hostname, f"[{hostname}]:{port}", f"[{self.host}]:{port}"}
                path.write_text("".join(f"{n} {fields[1]} {fields[2]}\n" for n in sorted(names)))
                candidate.unlink()
                return str(path)
        raise GuestError(
            f"no host key of {self.host} matches host_key_fingerprint {pin}",
            vm=self.vm,
            hint="compare with ssh-keygen -lf on the guest's /etc/ssh/ssh_host_*_key.pub",
        )

    def warm(self, count: int, *, sudo: bool) -> None:
        """Start up to ``count`` idle warm shells (privileged with ``sudo -n`` when ``sudo``).

        An optimisation only: shells that fail to start are dropped; commands then use new
        sessions. Call it in preflight, after the connection is verified."""
        if not self._connected:
            return
        with self._pool_lock:
            missing = count - len(self._idle[sudo])
        self._warm_counts[sudo] = max(count, self._warm_counts.get(sudo, 0))
        started = []
        for _ in range(max(0, missing)):
            remote = "exec sudo -n sh" if sudo else "exec sh"
            shell = WarmShell(["ssh", *self._options(), "-T", "--", self.host, remote], sudo=sudo)
            shell.send_handshake()
            started.append(shell)
        for shell in started:
            if shell.await_handshake(self.guest.connect_timeout):
                with self._pool_lock:
                    self._idle[sudo].append(shell)
                    self._all_shells.append(shell)
            else:
                log.debug("a warm shell in %s did not start; using new sessions", self.host)
                shell.close()

    def close(self) -> None:
        self._drop_connection(kill=False)
        if self._dir is None:
            return
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def _drop_connection(self, *, kill: bool) -> None:
        """End the warm shells (politely, or ``kill`` them) and the ControlMaster."""
        with self._pool_lock:
            shells, self._all_shells = self._all_shells, []
            self._idle = {True: [], False: []}
        for shell in shells:
            shell.close(kill=kill)
        if self._dir is not None and self._connected:
            # Talks to the local master process only: quick even when the link is stalled.
            execute(["ssh", *self._options(), "-O", "exit", "--", self.host], timeout=3)
        self._connected = False

    @property
    def generation(self) -> int:
        return self._generation

    def reconnect(self, generation: int) -> None:
        with self._reconnect_lock:
            if generation != self._generation and self._connected:
                return  # another caller reconnected since that failure
            log.warning("%s: reconnecting to %s", self.vm, self.description)
            self._drop_connection(kill=True)
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="snapcoord-ssh-")
            self._generation += 1
            self._connect_once()
            self._connected = True
            for sudo, count in self._warm_counts.items():
                self.warm(count, sudo=sudo)
            log.warning("%s: reconnected to %s", self.vm, self.description)

    # -- commands --------------------------------------------------------------------------
    def command_line(self, argv: Sequence[str], *, sudo: bool = False) -> list[str]:
        return ["ssh", *self._options(), "-T", "--", self.host, shlex.join(_privileged(argv, sudo))]

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        timeout: float,
        stdin: bytes | None = None,
        shield: bool = False,
        on_line: LineCallback | None = None,
    ) -> Completed:
        """``on_line`` sees stdout lines as they arrive when a warm shell runs the command."""

        def call() -> Completed:
            shell = self._take_shell(sudo) if stdin is None else None
            if shell is None:
                line = self.command_line(argv, sudo=sudo)
                return execute(line, timeout=timeout, stdin=stdin)
            try:
                return shell.run(argv, timeout=timeout, on_line=on_line)
            finally:
                self._give_back(shell)

        return self._checked(argv, call, shield=shield)

    def _checked(
        self, argv: Sequence[str], call: Callable[[], Completed], *, shield: bool
    ) -> Completed:
        """Log, run ``call`` (shielded from interrupts if asked), and turn ssh's exit status 255
        into :class:`ConnectionLost`."""
        log.debug("guest %s: %s", self.host, display(argv))
        result = _shielded(call) if shield else call()
        if result.returncode == SSH_UNREACHABLE and not result.timed_out:
            # The command line (often a whole script) goes to the debug log, not the message.
            log.debug("lost the connection running: %s", display(argv))
            raise ConnectionLost(
                f"lost the SSH connection to {self.host} ({result.error_text(limit=120)})",
                vm=self.vm,
            )
        return result

    def _take_shell(self, sudo: bool) -> WarmShell | None:
        with self._pool_lock:
            idle = self._idle[sudo]
            return idle.pop() if idle else None

    def _give_back(self, shell: WarmShell) -> None:
        with self._pool_lock:
            if shell.broken:
                if shell in self._all_shells:
                    self._all_shells.remove(shell)
            else:
                self._idle[shell.sudo].append(shell)
        if shell.broken:
            shell.close()


def shell_transport(guest: GuestConfig, *, vm: str) -> Transport:
    """Build (not yet open) the SSH or exec transport a ``[vms.X.guest]`` table asks for; the
    factory for every transport is :func:`snapcoord.transports.open_transport`."""
    if guest.transport == "exec":
        return ExecTransport(list(guest.exec_prefix), vm=vm)
    return SshTransport(guest, vm=vm)

"""Guest transports: how snapcoord runs a command inside the guest.

``SshTransport`` uses the OpenSSH client with one ControlMaster connection per run, so it honours
everything admins already configured (~/.ssh/config, Host aliases, ProxyJump, the agent,
known_hosts) and every later command reuses the open connection. ``ExecTransport`` runs commands
through an argv prefix (``pct exec 101 --``, ``lxc-attach -n web --``, or nothing for local).
Both take argument lists; the remote command line is built with :func:`shlex.join` only.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from snapcoord.errors import GuestError
from snapcoord.shell import Completed, display, execute

log = logging.getLogger("snapcoord.guest")

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
        stdout: BinaryIO | None = None,
    ) -> Completed: ...

    def command_line(self, argv: Sequence[str], *, sudo: bool = False) -> list[str]: ...


def _privileged(argv: Sequence[str], sudo: bool) -> list[str]:
    return ["sudo", "-n", "--", *argv] if sudo else list(argv)


class ExecTransport:
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
        stdout: BinaryIO | None = None,
    ) -> Completed:
        line = self.command_line(argv, sudo=sudo)
        try:
            return execute(line, timeout=timeout, stdin=stdin, stdout=stdout)
        except FileNotFoundError:
            raise GuestError(f"cannot run {line[0]!r}: not found", vm=self.vm) from None


class _Retryable(GuestError):
    """A connection attempt that may succeed when repeated (network, not keys or auth)."""


_PERMANENT_SSH_ERRORS = (
    "host key verification failed",
    "remote host identification has changed",
    "permission denied",
    "no matching host key",
    "could not resolve hostname",
    "too many authentication failures",
)


class SshTransport:
    """One OpenSSH ControlMaster connection per run; every command reuses it."""

    def __init__(self, guest: dict[str, Any], *, vm: str) -> None:
        self.guest = guest
        self.vm = vm
        self.host = str(guest["host"])
        target = f"{guest['user']}@{self.host}" if guest.get("user") else self.host
        port = f":{guest['port']}" if guest.get("port") else ""
        self.description = f"ssh {target}{port}"
        self._dir: str | None = None
        self._connected = False

    # -- options ---------------------------------------------------------------------------
    def _options(self) -> list[str]:
        g = self.guest
        opts = [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={int(g['connect_timeout'])}",
            "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR",
            "-o", "StrictHostKeyChecking=" + ("accept-new" if g["accept_new_host_key"] else "yes"),
        ]  # fmt: skip
        known_hosts = self._pinned_known_hosts or g.get("known_hosts")
        if known_hosts:
            opts += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=none"]
        if g.get("port"):
            opts += ["-p", str(g["port"])]
        if g.get("user"):
            opts += ["-l", str(g["user"])]
        if g.get("identity_file"):
            opts += ["-i", str(g["identity_file"]), "-o", "IdentitiesOnly=yes"]
        for extra in g.get("ssh_options", []):
            opts += ["-o", extra]
        if self._dir:
            opts += ["-o", f"ControlPath={self._dir}/cm", "-o", "ControlMaster=auto",
                     "-o", "ControlPersist=120"]  # fmt: skip
        return opts

    _pinned_known_hosts: str | None = None

    # -- connection ------------------------------------------------------------------------
    def open(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="snapcoord-ssh-")
        if self.guest.get("host_key_fingerprint"):
            self._pinned_known_hosts = self._known_hosts_from_pin()
        try:
            self._connect()
        except _Retryable as exc:
            raise GuestError(str(exc.message), vm=self.vm, hint=exc.hint) from None
        self._connected = True

    @retry(
        retry=retry_if_exception_type(_Retryable),
        stop=stop_after_attempt(3),
        wait=wait_random_exponential(multiplier=0.5, max=4),
        reraise=True,
    )
    def _connect(self) -> None:
        result = execute(
            ["ssh", *self._options(), "-T", self.host, "--", "true"],
            timeout=float(self.guest["connect_timeout"]) + 5,
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
        raise _Retryable(f"SSH to {self.host} failed: {text}", vm=self.vm)

    def _known_hosts_from_pin(self) -> str:
        """Scan the host's keys and keep only the one matching the pinned fingerprint."""
        assert self._dir is not None
        pin = str(self.guest["host_key_fingerprint"])
        scan = ["ssh-keyscan", "-T", str(int(self.guest["connect_timeout"]))]
        if self.guest.get("port"):
            scan += ["-p", str(self.guest["port"])]
        result = execute([*scan, self.host], timeout=float(self.guest["connect_timeout"]) + 5)
        path = Path(self._dir) / "known_hosts"
        for line in result.stdout.decode(errors="replace").splitlines():
            if not line or line.startswith("#"):
                continue
            candidate = Path(self._dir) / "candidate"
            candidate.write_text(line + "\n")
            finger = execute(["ssh-keygen", "-l", "-f", str(candidate)], timeout=10)
            fields = finger.stdout.decode().split()
            if finger.ok and len(fields) > 1 and fields[1] == pin:
                path.write_text(line + "\n")
                return str(path)
        raise GuestError(
            f"no host key of {self.host} matches host_key_fingerprint {pin}",
            vm=self.vm,
            hint="check the fingerprint with ssh-keygen -lf on the guest",
        )

    def close(self) -> None:
        if self._dir is None:
            return
        if self._connected:
            execute(["ssh", *self._options(), "-O", "exit", self.host], timeout=10)
            self._connected = False
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    # -- commands --------------------------------------------------------------------------
    def command_line(self, argv: Sequence[str], *, sudo: bool = False) -> list[str]:
        return ["ssh", *self._options(), "-T", self.host, "--", shlex.join(_privileged(argv, sudo))]

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        timeout: float,
        stdin: bytes | None = None,
        stdout: BinaryIO | None = None,
    ) -> Completed:
        result = execute(self.command_line(argv, sudo=sudo), timeout=timeout, stdin=stdin,
                         stdout=stdout)  # fmt: skip
        if result.returncode == SSH_UNREACHABLE and not result.timed_out:
            raise GuestError(
                f"lost the SSH connection to {self.host} running "
                f"{display(argv)}: {result.error_text()}",
                vm=self.vm,
            )
        return result


def open_transport(guest: dict[str, Any], *, vm: str) -> Transport:
    """Build (not yet open) the transport a ``[vms.X.guest]`` table asks for."""
    if guest["transport"] == "exec":
        return ExecTransport(guest.get("exec_prefix", []), vm=vm)
    return SshTransport(guest, vm=vm)

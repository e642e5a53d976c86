"""The guest's front door: a private OpenSSH server on 127.0.0.1 (:func:`start_sshd` ->
:class:`SshGuest`) and the test users that log in through it."""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.lab.common import LabError, children_of, free_port, run, stop_pid, wait_for_banner, which

SSHD = "/usr/sbin/sshd"


LAB_ALIAS = "snapcoord-lab"


SUDO_USER = "snapcoord-test"


NOSUDO_USER = "snapcoord-nosudo"


SUDOERS_FILE = Path("/etc/sudoers.d/snapcoord-test")


@dataclass
class SshGuest:
    """A running private sshd and everything a client needs to reach it."""

    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    wrong_known_hosts: Path
    host_key_fingerprint: str
    ssh_config: Path
    workdir: Path
    pid: int
    log_file: Path
    alias: str = LAB_ALIAS
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def guest_table(self, **overrides: Any) -> dict[str, Any]:
        """A ``[vms.X.guest]`` table (keys of snapcoord.schema.GUEST) for this guest."""
        table: dict[str, Any] = {
            "transport": "ssh",
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.identity_file),
            "known_hosts": str(self.known_hosts),
            "sudo": self.user != "root",
            "services": ["apache2", "cron"],
            "database": "mariadb",
            "connect_timeout": 10.0,
        }
        table.update(overrides)
        return table

    def as_user(self, user: str) -> SshGuest:
        """The same guest, logging in as another user (same key, same sshd)."""
        return replace(self, user=user)

    def ssh_argv(self, *command: str, known_hosts: Path | None = None) -> list[str]:
        """argv of a strict, non-interactive ``ssh`` running ``command`` (shlex-joined)."""
        argv = [
            "ssh",
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-i",
            str(self.identity_file),
            "-p",
            str(self.port),
            "-l",
            self.user,
            self.host,
        ]
        if command:
            argv += ["--", shlex.join(command)]
        return argv

    def ssh(
        self,
        *command: str,
        known_hosts: Path | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the guest over this sshd."""
        return run(self.ssh_argv(*command, known_hosts=known_hosts), check=check, timeout=timeout)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Stop the sshd by its PID (only the one this lab started)."""
        if self._proc is not None:
            stop_pid(self.pid, self._proc)
            self._proc = None


def _keygen(path: Path, comment: str) -> None:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _sshd_config(workdir: Path, port: int, penalties: bool) -> str:
    lines = [
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {workdir / 'host_ed25519'}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "AllowTcpForwarding yes",
        "MaxSessions 64",
        "MaxStartups 64:30:128",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
    ]
    if penalties:
        # OpenSSH >= 9.8 penalises sources with failed logins; tests fail logins on purpose.
        lines.append("PerSourcePenalties no")
    return "\n".join(lines) + "\n"


def start_sshd(workdir: Path | None = None, *, user: str = "root", attempts: int = 3) -> SshGuest:
    """Start a private sshd on a free 127.0.0.1 port and return the guest handle.

    ``workdir`` must be reachable (o+x) by the test users: sshd reads the shared
    authorized_keys file as the logging-in user. By default a fresh /tmp/snapcoord-lab-* is used.
    """
    if os.geteuid() != 0:
        raise LabError("start_sshd needs root")
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="snapcoord-lab-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)

    host_key = workdir / "host_ed25519"
    client_key = workdir / "client_ed25519"
    wrong_key = workdir / "wrong_host_ed25519"
    for path, comment in (
        (host_key, "lab-host"),
        (client_key, "lab-client"),
        (wrong_key, "wrong-host"),
    ):
        if not path.exists():
            _keygen(path, comment)
    authorized = workdir / "authorized_keys"
    authorized.write_text((client_key.with_suffix(".pub")).read_text())
    authorized.chmod(0o644)
    fingerprint = run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{host_key}.pub"]).stdout.split()[
        1
    ]

    last_error: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        penalties = True
        config = workdir / "sshd_config"
        config.write_text(_sshd_config(workdir, port, penalties))
        if run([SSHD, "-t", "-f", str(config)], check=False).returncode != 0:
            penalties = False
            config.write_text(_sshd_config(workdir, port, penalties))
            run([SSHD, "-t", "-f", str(config)])
        log = workdir / "sshd.log"
        proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(config), "-E", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_banner(port, b"SSH-", 10.0, alive=lambda p=proc: p.poll() is None)
        except LabError as exc:
            stop_pid(proc.pid, proc)
            last_error = LabError(
                f"{exc}; sshd log: {log.read_text()[-500:] if log.exists() else ''}"
            )
            continue
        break
    else:
        raise LabError(f"could not start sshd: {last_error}")

    host_pub = host_key.with_suffix(".pub").read_text().split()
    wrong_pub = wrong_key.with_suffix(".pub").read_text().split()
    known = workdir / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    wrong = workdir / "known_hosts.wrong"
    wrong.write_text(f"[127.0.0.1]:{port} {wrong_pub[0]} {wrong_pub[1]}\n")
    ssh_config = workdir / "ssh_config"
    ssh_config.write_text(
        f"Host {LAB_ALIAS}\n"
        f"    HostName 127.0.0.1\n"
        f"    Port {port}\n"
        f"    User {user}\n"
        f"    IdentityFile {client_key}\n"
        f"    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known}\n"
        f"    GlobalKnownHostsFile /dev/null\n"
        f"    StrictHostKeyChecking yes\n"
        f"    BatchMode yes\n"
    )
    return SshGuest(
        host="127.0.0.1",
        port=port,
        user=user,
        identity_file=client_key,
        known_hosts=known,
        wrong_known_hosts=wrong,
        host_key_fingerprint=fingerprint,
        ssh_config=ssh_config,
        workdir=workdir,
        pid=proc.pid,
        log_file=workdir / "sshd.log",
        _proc=proc,
    )


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--create-home", "--shell", "/bin/bash", name])
    # With UsePAM no, sshd refuses accounts whose password field is locked ("!..."), even for
    # key logins. "*" means: no password login possible, but the account is not locked.
    shadow = run(["getent", "shadow", name]).stdout.split(":")
    if len(shadow) > 1 and shadow[1].startswith("!"):
        run(["usermod", "-p", "*", name])


def ensure_test_users() -> dict[str, str]:
    """Create (idempotently) the sudo and no-sudo test users; return {"sudo": ..., "nosudo": ...}.

    Both log in with the lab's client key (the lab sshd uses one shared authorized_keys file).
    Needs the ``sudo`` package (``visudo`` validates the drop-in before it is installed).
    """
    if os.geteuid() != 0:
        raise LabError("ensure_test_users needs root")
    _ensure_user(SUDO_USER)
    _ensure_user(NOSUDO_USER)
    content = f"# snapcoord test lab (tests/lab.py)\n{SUDO_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n"
    if not SUDOERS_FILE.exists() or SUDOERS_FILE.read_text() != content:
        tmp = SUDOERS_FILE.with_name(".snapcoord-test.tmp")  # sudo ignores names with a dot
        tmp.write_text(content)
        tmp.chmod(0o440)
        visudo = which("visudo")
        if visudo:
            run([visudo, "-c", "-q", "-f", str(tmp)])
        tmp.replace(SUDOERS_FILE)
    return {"sudo": SUDO_USER, "nosudo": NOSUDO_USER}


def cut_server_side(guest: SshGuest) -> list[int]:
    """Kill the sshd processes serving open connections (children of the lab sshd we started):
    the ControlMaster and its warm shells die, the guest stays reachable."""
    children = children_of(guest.pid)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return children


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


_PATHS = ("identity_file", "known_hosts", "wrong_known_hosts", "ssh_config", "workdir", "log_file")


def guest_record(guest: SshGuest, path: Callable[[Path], Path] = Path) -> dict[str, Any]:
    """The guest as JSON-able fields, each file name mapped through ``path`` (to the names
    another process sees: :func:`tests.lab.sandbox.outside`). :func:`guest_from_record` makes it
    a :class:`SshGuest` again; that one cannot stop the sshd (``pid`` is in another PID
    namespace): its owner does. The ssh_config file keeps the names the owner sees."""
    record: dict[str, Any] = {
        "host": guest.host,
        "port": guest.port,
        "user": guest.user,
        "host_key_fingerprint": guest.host_key_fingerprint,
        "pid": guest.pid,
    }
    record.update({name: str(path(getattr(guest, name))) for name in _PATHS})
    return record


def guest_from_record(record: dict[str, Any]) -> SshGuest:
    fields = {k: (Path(v) if k in _PATHS else v) for k, v in record.items()}
    return SshGuest(**fields)


def guest_toml(guest: SshGuest, vm: str = "lab", **overrides: Any) -> str:
    """The guest table as TOML text, for pasting into a config by hand."""
    lines = [f"[vms.{vm}.guest]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in guest.guest_table(**overrides).items()]
    return "\n".join(lines) + "\n"

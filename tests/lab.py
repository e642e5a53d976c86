"""The real guest lab: this machine, reached over a private OpenSSH server on 127.0.0.1.

Plain functions, usable from pytest fixtures (tests/conftest.py), from bench/ scripts and by hand
(``python3 -m tests.lab --help`` from the repository root). Everything here needs root: it starts
sshd, creates test users, and drives the real Debian services with ``service NAME start|stop``.

What it provides:

* :func:`start_sshd` -> :class:`SshGuest`: an sshd with its own ed25519 host key, a generated client
  key, a known_hosts file for ``[127.0.0.1]:PORT`` (plus one with a WRONG key), an ssh_config
  with the alias ``snapcoord-lab``. Stopped by PID with :meth:`SshGuest.stop`.
* :func:`ensure_test_users`: ``snapcoord-test`` (sudo NOPASSWD ALL) and ``snapcoord-nosudo``
  (no sudo rights); both log in with the same client key.
* :func:`service_running`, :func:`start_service`, :func:`stop_service`, :func:`ensure_running`,
  :func:`mariadb_uptime`, :func:`mysqld_running`: the guest's services, seen from outside.
* :func:`mysql_exec`, :func:`table_checksums`, :func:`row_counts`: MariaDB through the CLI client.
* :func:`start_scratch_mariadb` -> :class:`ScratchMariaDB`: a second, private MariaDB server.
* :func:`ensure_postgresql`, :func:`psql`, :func:`postmaster_pid`, :func:`pg_row_counts`:
  the guest's PostgreSQL (Debian's cluster, loopback and socket only), seen from outside.
* :func:`require`: skip (or fail when ``CI=true``) if a component is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, NoReturn

SSHD = "/usr/sbin/sshd"
LAB_ALIAS = "snapcoord-lab"
SUDO_USER = "snapcoord-test"
NOSUDO_USER = "snapcoord-nosudo"
SUDOERS_FILE = Path("/etc/sudoers.d/snapcoord-test")
LAB_SERVICES = ("mariadb", "apache2", "cron")
SYSTEM_SCHEMAS = frozenset({"mysql", "sys", "information_schema", "performance_schema"})
#: The guest database's datadir (Debian's default): :func:`mysqld_running` looks for it.
GUEST_DATADIR = "/var/lib/mysql"
#: Every scratch server's directory name contains this.
SCRATCH_MARKER = "snapcoord-scratch-"

#: command -> Debian package that provides it (for skip/fail messages and the CI setup).
APT_PACKAGES: dict[str, str] = {
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sudo": "sudo",
    "visudo": "sudo",
    "service": "init-system-helpers",
    "mysql": "mariadb-client",
    "mysqldump": "mariadb-client",
    "mysqladmin": "mariadb-client",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server-core",
    "apache2ctl": "apache2",
    "cron": "cron",
    "psql": "postgresql-client",
    "pg_dumpall": "postgresql-client",
    "pg_isready": "postgresql-client",
    "pg_lsclusters": "postgresql-common",
    "runuser": "util-linux",
}


class LabError(RuntimeError):
    """The lab itself could not be set up (not a product failure)."""


# ---------------------------------------------------------------------------------------------
# small helpers


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    input: str | bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on failure raise LabError with its stderr."""
    text_input = input.decode() if isinstance(input, bytes) else input
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=text_input, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(
            f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
        )
    return proc


def which(cmd: str) -> str | None:
    """shutil.which that also looks in the sbin directories (non-root PATHs lack them)."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(cmd, path=path)


def require(cmd: str, package: str | None = None) -> str:
    """Return the path of ``cmd``; if it is missing, fail under CI=true, else skip the test.

    The message names the apt package to install. Only for use inside tests and fixtures.
    """
    found = which(cmd)
    if found:
        return found
    import pytest  # lazy: lab.py is also used outside pytest

    pkg = package or APT_PACKAGES.get(cmd, cmd)
    msg = f"{cmd} is not installed: apt-get install -y {pkg}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{msg} (CI=true: CI must install it)", pytrace=False)
    pytest.skip(msg)
    raise AssertionError("unreachable")  # pragma: no cover


def require_root() -> None:
    """Fail under CI=true, else skip, when not running as root (the lab needs root)."""
    if os.geteuid() == 0:
        return
    import pytest

    msg = "the guest lab needs root (sshd, service, useradd)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_banner(port: int, prefix: bytes, timeout: float, alive: Any = None) -> bytes:
    """Connect to 127.0.0.1:port until the server greets with ``prefix``; return the greeting."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise LabError(f"server on port {port} exited while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                data = s.recv(256)
                if data.startswith(prefix):
                    return data
                last = LabError(f"unexpected greeting {data[:40]!r}")
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise LabError(f"nothing answered on 127.0.0.1:{port} within {timeout:.0f}s: {last}")


def stop_pid(pid: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 10.0) -> None:
    """SIGTERM a process we started, wait for it, SIGKILL if it does not go."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------------
# sshd


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


# ---------------------------------------------------------------------------------------------
# test users


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


# ---------------------------------------------------------------------------------------------
# services, seen from outside


def _service_argv(name: str, action: str) -> list[str]:
    service = which("service")
    if service is None:
        raise LabError("'service' not found (apt-get install -y init-system-helpers)")
    return [service, name, action]


def service_running(name: str) -> bool:
    """True if ``service NAME status`` exits 0."""
    return run(_service_argv(name, "status"), check=False, timeout=30).returncode == 0


def start_service(name: str) -> None:
    run(_service_argv(name, "start"), timeout=120)
    if not service_running(name):
        raise LabError(f"service {name} start returned 0 but status says it is not running")


def stop_service(name: str) -> None:
    run(_service_argv(name, "stop"), timeout=120)


def ensure_running(names: Iterable[str] = LAB_SERVICES) -> list[str]:
    """Start every service in ``names`` that is not running; return those started."""
    started = []
    for name in names:
        if not service_running(name):
            start_service(name)
            started.append(name)
    return started


#: Serialises lab users across processes (parallel pytest sessions share one MariaDB).
LOCK_PATH = Path("/tmp/snapcoord-lab.lock")
_lock_state: dict[str, int] = {"depth": 0, "fd": -1}


@contextlib.contextmanager
def lab_lock(timeout: float = 900.0) -> Iterator[None]:
    """Hold the machine-wide lab lock (flock, re-entrant within this process).

    The guest's services and database are shared by everything on this machine; tests that
    stop services or rewrite databases hold this lock so two pytest sessions do not collide.
    A process that dies releases it.
    """
    if _lock_state["depth"]:
        _lock_state["depth"] += 1
        try:
            yield
        finally:
            _lock_state["depth"] -= 1
        return
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"{LOCK_PATH} still locked after {timeout:.0f}s") from None
                time.sleep(0.1)
        _lock_state.update(depth=1, fd=fd)
        try:
            yield
        finally:
            _lock_state.update(depth=0, fd=-1)
    finally:
        os.close(fd)


def init_script_exists(name: str) -> bool:
    """True if the guest has a SysV init script for ``name`` (what ``service`` runs here)."""
    return Path("/etc/init.d", name).is_file()


@dataclass(frozen=True)
class GuestServices:
    """The guest's services as the tests see them from outside (not through snapcoord)."""

    names: tuple[str, ...] = LAB_SERVICES

    def running(self, name: str) -> bool:
        return service_running(name)

    def all_running(self) -> bool:
        return all(service_running(n) for n in self.names)

    def states(self) -> dict[str, bool]:
        return {n: service_running(n) for n in self.names}

    def start(self, name: str) -> None:
        start_service(name)

    def stop(self, name: str) -> None:
        stop_service(name)

    def ensure_running(self) -> list[str]:
        """Undo any :func:`break_service`, then start what is not running."""
        repair_all_services()
        return ensure_running(self.names)

    def break_start(self, name: str) -> None:
        """Make the next start of ``name`` fail (repaired at the fixture's teardown)."""
        break_service(name)

    def break_start_command(self, name: str) -> str:
        return break_service_command(name)

    def mariadb_uptime(self) -> int:
        return mariadb_uptime()

    def mysqld_running(self) -> bool:
        return mysqld_running()


_BROKEN_BEGIN = "# >>> snapcoord-lab-broken (tests/lab.py: repair_service removes this)"
_BROKEN_END = "# <<< snapcoord-lab-broken"

#: service -> (file, lines) appended to make ``service NAME start`` fail fast; ``stop`` still works.
BREAKAGE: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "cron": (("/etc/default/cron", ('EXTRA_OPTS="-Z"',)),),  # unknown option: cron exits 1
    "apache2": (
        ("/etc/apache2/conf-enabled/zz-snapcoord-lab-broken.conf", ("SnapcoordLabInvalid on",)),
    ),
    "mariadb": (
        (
            "/etc/mysql/mariadb.conf.d/99-snapcoord-lab-broken.cnf",
            ("[mysqld]", "snapcoord-lab-invalid-option = 1"),
        ),
        ("/etc/default/mariadb", ("MYSQLD_STARTUP_TIMEOUT=3",)),  # fail in 3 s, not 30 s
    ),
}


def break_service_command(name: str) -> str:
    """A shell command (e.g. for a ``frozen`` hook) making the next ``service NAME start`` fail.

    Stopping keeps working; :func:`repair_service` (run by the guest_services fixture at
    teardown) undoes it.
    """
    parts = []
    for path, lines in BREAKAGE[name]:
        block = [_BROKEN_BEGIN, *lines, _BROKEN_END]
        parts.append(shlex.join(["printf", "%s\\n", *block]) + " >> " + shlex.quote(path))
    return " && ".join(parts)


def break_service(name: str) -> None:
    """Make the next ``service NAME start`` fail (see :func:`break_service_command`)."""
    run(["sh", "-c", break_service_command(name)])


def repair_service(name: str) -> bool:
    """Remove what :func:`break_service` added; True if anything was removed. Idempotent."""
    repaired = False
    for path_text, _ in BREAKAGE.get(name, ()):
        path = Path(path_text)
        if not path.exists():
            continue
        kept, skipping, found = [], False, False
        for line in path.read_text().splitlines(keepends=True):
            if line.rstrip("\n") == _BROKEN_BEGIN:
                skipping, found = True, True
            elif line.rstrip("\n") == _BROKEN_END:
                skipping = False
            elif not skipping:
                kept.append(line)
        if not found:
            continue
        repaired = True
        if "".join(kept).strip():
            path.write_text("".join(kept))
        else:
            path.unlink()  # the file only held our breakage: we created it
    return repaired


def repair_all_services() -> list[str]:
    """Repair every service the lab knows how to break; return the names repaired."""
    return [name for name in BREAKAGE if repair_service(name)]


def _process_table() -> Iterator[tuple[int, str, str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), comm, args


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); [] if gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def children_of(parent: int) -> list[int]:
    return [pid for pid, _c, _a in _process_table() if stat_fields(pid)[1:2] == [str(parent)]]


def process_group(pgid: int) -> list[int]:
    return [pid for pid, _c, _a in _process_table() if stat_fields(pid)[2:3] == [str(pgid)]]


def cut_server_side(guest: SshGuest) -> list[int]:
    """Kill the sshd processes serving open connections (children of the lab sshd we started):
    the ControlMaster and its warm shells die, the guest stays reachable."""
    children = children_of(guest.pid)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return children


def mysqld_pids(datadir: str = GUEST_DATADIR) -> list[int]:
    """PIDs of the guest's MariaDB/MySQL server: mariadbd/mysqld processes on ``datadir``.

    Other servers on this machine (scratch servers, other people's) have their own --datadir
    and are ignored; a server started without --datadir counts as the guest's.
    """
    pids = []
    for pid, comm, args in _process_table():
        if comm not in ("mariadbd", "mysqld"):
            continue
        dirs = [a.split("=", 1)[1] for a in args.split() if a.startswith("--datadir=")]
        if not dirs or dirs[-1].rstrip("/") == datadir.rstrip("/"):
            pids.append(pid)
    return pids


def mysqld_running(datadir: str = GUEST_DATADIR) -> bool:
    """True while a server process of the guest's database exists (checked from outside).

    Stricter than ``mysqladmin ping``: a server that stopped answering but is still shutting
    down (flushing InnoDB) counts as running.
    """
    return bool(mysqld_pids(datadir))


def mysqladmin_ping(socket: str | Path | None = None) -> bool:
    """True if the server answers ``mysqladmin ping``."""
    argv = ["mysqladmin"]
    if socket:
        argv += ["--no-defaults", "-u", "root", f"--socket={socket}"]
    return run([*argv, "ping"], check=False, timeout=30).returncode == 0


def mysql_argv(socket_path: str | Path | None = None, *extra: str) -> list[str]:
    """argv of the mysql client as root: the guest's server, or the one behind ``socket_path``."""
    argv = ["mysql"]
    if socket_path:
        argv += ["--no-defaults", "-u", "root", f"--socket={socket_path}"]
    return [*argv, "--batch", "-N", *extra]


def mysql_exec(
    sql: str, socket_path: str | Path | None = None, *, timeout: float = 600.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run SQL (may hold many statements) as root with the mysql client; rows tab-separated.

    ``socket_path=None`` is the guest's own server (the client's defaults); a scratch server
    passes its socket.
    """
    return run(mysql_argv(socket_path), input=sql, timeout=timeout, check=check)


def mysql_rows(sql: str, socket_path: str | Path | None = None) -> list[list[str]]:
    out = mysql_exec(sql, socket_path).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def mariadb_uptime(socket_path: str | Path | None = None) -> int:
    """Seconds since the database server started (SHOW GLOBAL STATUS LIKE 'Uptime')."""
    rows = mysql_rows("SHOW GLOBAL STATUS LIKE 'Uptime'", socket_path)
    return int(rows[0][1])


def _quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("\\", "\\\\").replace("'", "''") + "'" for v in values)


def base_tables(databases: Iterable[str], socket_path: str | Path | None = None) -> list[str]:
    """``db.table`` names of the base tables (no views) in ``databases``, sorted."""
    dbs = list(databases)
    if not dbs:
        return []
    rows = mysql_rows(
        "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES "
        f"WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA IN ({_sql_list(dbs)}) "
        "ORDER BY TABLE_SCHEMA, TABLE_NAME",
        socket_path,
    )
    return [f"{db}.{table}" for db, table in rows]


def table_checksums(
    databases: Iterable[str], socket: str | Path | None = None
) -> dict[str, int | None]:
    """``{"db.table": CHECKSUM TABLE value}`` for every base table in ``databases``."""
    tables = base_tables(databases, socket)
    if not tables:
        return {}
    idents = ", ".join(".".join(_quote_ident(p) for p in t.split(".", 1)) for t in tables)
    rows = mysql_rows(f"CHECKSUM TABLE {idents} EXTENDED", socket)
    return {name: (None if value == "NULL" else int(value)) for name, value in rows}


def row_counts(databases: Iterable[str], socket: str | Path | None = None) -> dict[str, int]:
    """Exact ``{"db.table": COUNT(*)}`` for every base table in ``databases``."""
    tables = base_tables(databases, socket)
    if not tables:
        return {}
    parts = []
    for t in tables:
        db, name = t.split(".", 1)
        parts.append(f"SELECT '{t}', COUNT(*) FROM {_quote_ident(db)}.{_quote_ident(name)}")
    rows = mysql_rows(" UNION ALL ".join(parts), socket)
    return {name: int(count) for name, count in rows}


DUMP_OPTIONS = ("--single-transaction", "--routines", "--events", "--triggers", "--hex-blob")


def mysqldump_to(
    path: Path,
    databases: Sequence[str] | None = None,
    socket: str | Path | None = None,
    options: Sequence[str] = DUMP_OPTIONS,
) -> None:
    """Dump ``databases`` (default: --all-databases) into ``path`` (plain SQL) with mysqldump."""
    argv = ["mysqldump"]
    if socket:
        argv += ["--no-defaults", "-u", "root", f"--socket={socket}"]
    argv += list(options)
    argv += ["--databases", *databases] if databases else ["--all-databases"]
    with path.open("wb") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.PIPE, timeout=600, check=False)
    if proc.returncode != 0:
        raise LabError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.decode()}")


def user_databases(socket: str | Path | None = None) -> list[str]:
    """Every database except the system schemas."""
    return [r[0] for r in mysql_rows("SHOW DATABASES", socket) if r[0] not in SYSTEM_SCHEMAS]


def load_sql(
    path: Path, socket: str | Path | None = None, *, timeout: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """Feed an SQL file (``.gz`` is decompressed) to the mysql client; does not raise on error."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return _pipe_into_mysql(fh, socket, timeout)


def _pipe_into_mysql(
    fh: IO[bytes], socket: str | Path | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(mysql_argv(socket), stdin=subprocess.PIPE, stdout=out, stderr=err)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            shutil.copyfileobj(fh, proc.stdin, 1 << 20)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        rc = proc.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            proc.args, rc, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


# ---------------------------------------------------------------------------------------------
# scratch MariaDB server


@dataclass
class ScratchMariaDB:
    """A private MariaDB server: own datadir, socket and 127.0.0.1 port; stopped by PID."""

    workdir: Path
    datadir: Path
    socket: Path
    port: int
    pid: int
    log_file: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def sql(self, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return mysql_exec(sql, self.socket, check=check)

    def load(self, path: Path) -> subprocess.CompletedProcess[str]:
        """Load an SQL dump (``.gz`` ok) into this server; check the returncode yourself."""
        return load_sql(path, self.socket)

    def checksums(self, databases: Iterable[str]) -> dict[str, int | None]:
        return table_checksums(databases, self.socket)

    def databases(self) -> list[str]:
        return user_databases(self.socket)

    def reset(self) -> None:
        """Drop every non-system database: a clean server for the next test."""
        dbs = self.databases()
        if dbs:
            self.sql("".join(f"DROP DATABASE {_quote_ident(d)};" for d in dbs))

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, remove: bool = True) -> None:
        """Stop the server by its PID; remove its directory unless ``remove=False``."""
        if self._proc is not None:
            stop_pid(self.pid, self._proc, timeout=60)
            self._proc = None
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _mariadbd() -> str:
    for name in ("mariadbd", "mysqld"):
        found = which(name)
        if found:
            return found
    raise LabError("no mariadbd/mysqld binary (apt-get install -y mariadb-server)")


def start_scratch_mariadb(workdir: Path | None = None, *, attempts: int = 3) -> ScratchMariaDB:
    """Initialise a datadir with mariadb-install-db and start a private server on it.

    root@localhost authenticates through the unix socket (we are root), like Debian's default.
    """
    if os.geteuid() != 0:
        raise LabError("start_scratch_mariadb needs root (the server runs as user mysql)")
    if workdir is None:
        # Under /tmp directly: pytest's tmp dirs are 0700 root, which user mysql cannot enter.
        workdir = Path(tempfile.mkdtemp(prefix=SCRATCH_MARKER))
    elif SCRATCH_MARKER not in str(workdir):
        raise LabError(f"scratch workdir must contain {SCRATCH_MARKER!r} in its path")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    datadir = workdir / "data"
    install_db = which("mariadb-install-db") or which("mysql_install_db")
    if install_db is None:
        raise LabError("mariadb-install-db missing (apt-get install -y mariadb-server)")
    if not (datadir / "mysql").exists():
        run(
            [
                install_db,
                "--no-defaults",
                f"--datadir={datadir}",
                "--user=mysql",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            timeout=120,
        )
    shutil.chown(workdir, "mysql", "mysql")
    sock = workdir / "mysqld.sock"
    log = workdir / "error.log"
    last_error: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(
            [
                _mariadbd(),
                "--no-defaults",
                f"--datadir={datadir}",
                f"--socket={sock}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={workdir / 'mysqld.pid'}",
                f"--log-error={log}",
                "--user=mysql",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=128M",
                "--innodb-flush-log-at-trx-commit=2",
                "--max-allowed-packet=64M",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_banner(port, b"", 30.0, alive=lambda p=proc: p.poll() is None)
            deadline = time.monotonic() + 30
            while mysql_exec("SELECT 1", sock, check=False).returncode != 0:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise LabError("scratch server does not answer on its socket")
                time.sleep(0.1)
        except LabError as exc:
            stop_pid(proc.pid, proc)
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            last_error = LabError(f"{exc}; error log: {tail}")
            continue
        return ScratchMariaDB(workdir, datadir, sock, port, proc.pid, log, proc)
    raise LabError(f"could not start the scratch MariaDB: {last_error}")


# ---------------------------------------------------------------------------------------------
# by hand: python3 -m tests.lab ...


# ---------------------------------------------------------------------------------------------
# PostgreSQL (Debian's postgresql-common cluster; ``service postgresql start|stop`` runs every
# cluster through the init script). Not in LAB_SERVICES: the MariaDB tests keep their guest.

PG_SERVICE = "postgresql"
#: the lab's PostgreSQL configuration: loopback TCP and the unix socket only
PG_LAB_CONF = (
    "# snapcoord lab (tests/lab.py): loopback and socket only\nlisten_addresses = 'localhost'\n"
)
PG_LAB_CONF_NAME = "99-snapcoord-lab.conf"


def pg_clusters() -> list[dict[str, str]]:
    """``pg_lsclusters``: version, cluster, port, status, owner, data directory."""
    out = run(["pg_lsclusters", "-h"], timeout=30).stdout
    keys = ("version", "cluster", "port", "status", "owner", "datadir")
    return [dict(zip(keys, line.split(), strict=False)) for line in out.splitlines() if line]


def pg_cluster() -> dict[str, str]:
    """The cluster the lab uses: the one on port 5432 (Debian's first cluster)."""
    clusters = pg_clusters()
    if not clusters:
        raise LabError("no PostgreSQL cluster (pg_createcluster 15 main)")
    return next((c for c in clusters if c["port"] == "5432"), clusters[0])


def ensure_postgresql() -> bool:
    """Every cluster listens on loopback and its socket only (a conf.d file; restarted if that
    changed while it ran), and the server runs. True if it was started or restarted."""
    changed = False
    for cluster in pg_clusters():
        conf_d = Path("/etc/postgresql", cluster["version"], cluster["cluster"], "conf.d")
        conf_d.mkdir(parents=True, exist_ok=True)
        conf = conf_d / PG_LAB_CONF_NAME
        if not conf.is_file() or conf.read_text() != PG_LAB_CONF:
            conf.write_text(PG_LAB_CONF)
            changed = True
    if changed and service_running(PG_SERVICE):
        run(_service_argv(PG_SERVICE, "restart"), timeout=120)
        return True
    return bool(ensure_running([PG_SERVICE]))


def postmaster_pid() -> int | None:
    """The running postmaster of the lab's cluster (its data directory's postmaster.pid and
    a live ``postgres`` process), checked from outside; None when it is down."""
    pidfile = Path(pg_cluster()["datadir"], "postmaster.pid")
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return pid if comm in ("postgres", "postmaster") else None


def psql(sql: str, database: str = "postgres", *, check: bool = True) -> list[str]:
    """Run SQL as the postgres OS user (peer authentication), stopping at the first error;
    the unaligned output lines."""
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1", "-d", database]  # fmt: skip
    proc = subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=120,
                          cwd="/", check=False)  # fmt: skip
    if check and proc.returncode != 0:
        raise LabError(f"psql on {database} exited {proc.returncode}: {proc.stderr.strip()}")
    return [line for line in proc.stdout.splitlines() if line]


def pg_start_time() -> str:
    return psql("SELECT pg_postmaster_start_time();")[0]


def pg_databases() -> list[str]:
    """User databases (every connectable one but postgres and template1)."""
    rows = psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1;")
    return [d for d in rows if d not in ("postgres", "template1")]


def pg_row_counts(databases: Iterable[str]) -> dict[str, int]:
    """``{"db.schema.table": rows}`` of every table outside the system schemas."""
    counts: dict[str, int] = {}
    for database in databases:
        tables = psql(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1;",
            database,
        )
        for table in tables:
            (rows,) = psql(f"SELECT count(*) FROM {table};", database)
            name = table.replace('"', "")
            counts[f"{database}.{name}"] = int(rows)
    return counts


def pg_drop_databases(names: Iterable[str]) -> None:
    for name in names:
        psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);')


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def guest_toml(guest: SshGuest, vm: str = "lab", **overrides: Any) -> str:
    """The guest table as TOML text, for pasting into a config by hand."""
    lines = [f"[vms.{vm}.guest]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in guest.guest_table(**overrides).items()]
    return "\n".join(lines) + "\n"


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _wait_forever() -> NoReturn:
    """Sleep until SIGINT, SIGTERM or SIGHUP (all raise KeyboardInterrupt, so cleanup runs)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    while True:
        signal.pause()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.lab", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_guest = sub.add_parser("guest", help="start the loopback sshd, print the guest table, wait")
    p_guest.add_argument("--user", default="root")
    sub.add_parser("services", help="start mariadb, apache2, cron if they are not running")
    p_idoit = sub.add_parser("idoit", help="(re)create the i-doit-like dataset in the guest DB")
    p_idoit.add_argument("--scale", type=float, default=1.0, help="row multiplier (1 = 120k)")
    p_idoit.add_argument(
        "--payload",
        type=int,
        default=0,
        help="extra bytes of text per isys_obj row (to reach a GB for bench/)",
    )
    p_sum = sub.add_parser("checksums", help="print CHECKSUM TABLE of databases")
    p_sum.add_argument("databases", nargs="+")
    p_sum.add_argument("--socket")
    p_scratch = sub.add_parser("scratch", help="start a scratch MariaDB, print its socket, wait")
    p_scratch.add_argument("--keep", action="store_true", help="keep the datadir at exit")
    args = parser.parse_args(argv)

    if args.cmd == "guest":
        ensure_test_users()
        guest = start_sshd(user=args.user)
        print(f"# sshd pid {guest.pid}, workdir {guest.workdir}; Ctrl-C stops it")
        print(f"# ssh -F {guest.ssh_config} {LAB_ALIAS} true")
        print(guest_toml(guest), flush=True)
        try:
            _wait_forever()
        except KeyboardInterrupt:
            pass
        finally:
            guest.stop()
            shutil.rmtree(guest.workdir, ignore_errors=True)
    elif args.cmd == "services":
        print("started:", " ".join(ensure_running()) or "(none, all were running)")
    elif args.cmd == "idoit":
        from tests import idoit_fixture

        ensure_running(["mariadb"])
        info = idoit_fixture.create_idoit_dataset(scale=args.scale, payload=args.payload)
        print(f"{sum(info.values())} rows in {len(info)} tables")
    elif args.cmd == "checksums":
        for name, value in table_checksums(args.databases, args.socket).items():
            print(f"{name}\t{value}")
    elif args.cmd == "scratch":
        server = start_scratch_mariadb()
        print(
            f"# pid {server.pid}; mysql --no-defaults -u root --socket={server.socket}", flush=True
        )
        try:
            _wait_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop(remove=not args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A lab guest that is a sandbox: one per test worker, in its own mount and PID namespaces.

``tests/lab/sandboxed-python`` starts a Python interpreter (an xdist worker, or anything else)
through util-linux's ``unshare --mount --pid --fork --mount-proc``; this file is the namespace's
PID 1. Before it starts the interpreter it gives the namespace a world of its own:

* ``/etc`` is an overlay on the host's: the distribution's init scripts and configuration are
  used unchanged, and whatever the lab writes there (test users, sudoers, a broken Apache
  config, a binlog option) stays in the sandbox.
* ``/tmp`` is private too (servers name temporary files by PID, and PIDs repeat across
  namespaces), except pytest's ``/tmp/pytest-of-USER``, which stays shared (libvirtd and QEMU,
  outside, read the tests' images there). The sandbox's directory is ``/run/snapcoord-sandbox``
  inside; :func:`outside` turns a path inside into the path the parent sees.
* ``/run``, ``/var/log``, ``/var/spool/cron`` and ``/home`` are private; ``/var/lib/mysql`` is a
  fresh MariaDB datadir (``mariadb-install-db``) and ``/var/lib/postgresql`` an empty one (the
  lab creates its cluster on first use, :func:`tests.lab.postgresql.ensure_postgresql`).
* The network is the host's, so every server gets its own loopback port (below the kernel's
  ephemeral range, each locked by the sandbox for its life: :func:`_take_ports`), written into
  the sandbox's configuration: MariaDB (``99-snapcoord-sandbox.cnf``), Apache (``ports.conf``
  and the default site), PostgreSQL (the port of the cluster the lab creates). Cron gets an empty
  ``/etc/cron.d`` and a ``/etc/crontab`` without the host's jobs.
* ``/proc`` shows the sandbox's processes only, so ``service``, ``pidof`` and the lab's process
  checks never see (or signal) the host's services; ``/run/systemd`` is absent, so ``service``
  uses the init scripts.
* The host's ``/run/libvirt`` is bound in: libvirtd is shared by every worker
  (tests/libvirtd.py, started once by the pytest controller).

PID 1 reaps every orphan, forwards SIGINT/SIGTERM/SIGHUP to the interpreter, and when the
interpreter ends, stops every process left in the namespace (SIGTERM, then SIGKILL after a
grace period), removes the sandbox's directory and exits with the interpreter's status. If PID
1 itself is killed, the kernel kills everything in the namespace.

As a module (``from tests.lab import sandbox``), :func:`active` says whether this process runs
in a sandbox and :func:`ports` gives the sandbox's server ports. This file runs as a program
with ``python3 -I`` (nothing imported from the current directory), so it needs the standard
library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Set in the interpreter's environment: the sandbox's directory, as seen inside (INSIDE)...
ENV = "SNAPCOORD_LAB_SANDBOX"

#: ... and as the parent sees it (a directory in the parent's /tmp).
ENV_OUTSIDE = "SNAPCOORD_LAB_SANDBOX_OUTSIDE"

INSIDE = "/run/snapcoord-sandbox"

#: In the sandbox's directory: the ports of its servers (JSON).
PORTS_FILE = "ports.json"

#: Seconds the processes left in the sandbox get between SIGTERM and SIGKILL.
GRACE = 10.0

#: Private directories: mount point -> (owner, group, mode).
PRIVATE_DIRS: dict[str, tuple[str, str, int]] = {
    "/var/lib/mysql": ("mysql", "mysql", 0o755),
    "/var/lib/postgresql": ("postgres", "postgres", 0o755),
    "/var/log": ("root", "root", 0o755),
    "/var/spool/cron": ("root", "root", 0o755),
    "/home": ("root", "root", 0o755),
}

#: Directories made on the private /run and /var/log (owner, group, mode), as the packages do.
RUNTIME_DIRS: dict[str, tuple[str, str, int]] = {
    "/run/lock": ("root", "root", 0o1777),
    "/run/sshd": ("root", "root", 0o755),
    "/run/mysqld": ("mysql", "mysql", 0o755),
    "/run/postgresql": ("postgres", "postgres", 0o2775),
    "/var/log/apache2": ("root", "adm", 0o750),
    "/var/log/mysql": ("mysql", "adm", 0o2750),
    "/var/log/postgresql": ("root", "postgres", 0o1775),
    "/var/spool/cron/crontabs": ("root", "crontab", 0o1730),
}

CRONTAB = """\
# snapcoord lab sandbox (tests/lab/sandbox.py): no jobs of the host's run here
SHELL=/bin/sh
PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin
"""


def active() -> bool:
    """True if this process runs inside a lab sandbox (its PID 1 is this file's init)."""
    workdir = os.environ.get(ENV)
    if not workdir or not Path(workdir, PORTS_FILE).is_file():
        return False
    try:
        init = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"tests/lab/sandbox.py") for part in init)


def workdir() -> Path:
    return Path(os.environ[ENV])


def outside(path: str | Path) -> Path:
    """``path`` (inside this sandbox) as this sandbox's parent sees it."""
    path = Path(path)
    base = Path(os.environ[ENV_OUTSIDE])
    for inside, there in ((Path(INSIDE), base), (Path("/tmp"), base / "tmp")):
        if path == inside or inside in path.parents:
            return there / path.relative_to(inside)
    return path


def ports() -> dict[str, int]:
    """``{"mysql": ..., "http": ..., "postgresql": ...}``: the sandbox's server ports."""
    data: dict[str, int] = json.loads(Path(os.environ[ENV], PORTS_FILE).read_text())
    return data


def enter(module: str, argv: list[str]) -> None:
    """Run ``python -m module argv...`` in a fresh sandbox instead of here, unless this already
    is one (or is not root: then the lab refuses by itself). For the lab's and the benchmarks'
    command lines, which would otherwise drive the host's own services. Does not return when it
    re-executes."""
    if active() or os.geteuid() != 0:
        return
    wrapper = str(Path(__file__).resolve().with_name("sandboxed-python"))
    env = dict(os.environ, SNAPCOORD_LAB_PYTHON=sys.executable)
    os.execve(wrapper, [wrapper, "-m", module, *argv], env)


# -- the init (PID 1 of the sandbox) ------------------------------------------------------------


def _run(*argv: str, timeout: float = 120.0) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SystemExit(
            f"sandbox: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
        )


#: Where the sandboxes share out their servers' ports: one lock file per port, held by the
#: sandbox that took it for as long as its PID 1 lives (the kernel lets go of it however the
#: sandbox ends). On the host's /var/lib, which every sandbox sees, nested ones too (their
#: /run is their parent's private one).
PORT_LOCKS = Path("/var/lib/snapcoord-lab/ports")

#: How many ports below the kernel's ephemeral range the sandboxes take theirs from.
PORT_SPAN = 8000

#: The lock files of this sandbox's ports, open for its whole life.
_HELD: list[Any] = []


def _port_range() -> range:
    """Ports below the kernel's ephemeral range (net.ipv4.ip_local_port_range), so that no
    bind(0) on this machine (a scratch server, an ssh client, another test's free port) is
    given one while the sandbox's service that owns it is stopped: two sandboxes once got the
    same port from bind(0), and one's Apache could not start while the other's MariaDB held it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low - PORT_SPAN < 1024:
        raise SystemExit(f"sandbox: the ephemeral ports start at {low}: no room below for the lab")
    return range(low - PORT_SPAN, low)


def _take_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A port for each of ``names`` that no other sandbox holds and nothing listens on; the
    lock of each stays held in :data:`_HELD` until this process ends."""
    PORT_LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
    candidates = list(_port_range())
    start = int.from_bytes(os.urandom(2), "big") % len(candidates)  # sandboxes spread out
    taken: dict[str, int] = {}
    for port in candidates[start:] + candidates[:start]:
        if len(taken) == len(names):
            break
        handle = open(PORT_LOCKS / f"{port}.lock", "a")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()  # another sandbox's
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                handle.close()  # something outside the lab listens there
                continue
        _HELD.append(handle)
        taken[names[len(taken)]] = port
    if len(taken) != len(names):
        raise SystemExit(f"sandbox: no free port left in {_port_range()}")
    return taken


def _make_dir(path: str | Path, owner: str, group: str, mode: int) -> None:
    os.makedirs(path, exist_ok=True)
    os.chown(path, pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)


def _known(owner: str, group: str) -> bool:
    try:
        pwd.getpwnam(owner)
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


def _mount_world(work: Path) -> None:
    """Every mount of the sandbox (the namespace's mounts are private: none reaches the host)."""
    upper, lower_work = work / "etc-upper", work / "etc-work"
    upper.mkdir()
    lower_work.mkdir()
    _run("mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir=/etc,upperdir={upper},workdir={lower_work}", "/etc")  # fmt: skip
    host_libvirt = work / "host-run-libvirt"
    if Path("/run/libvirt").is_dir():
        host_libvirt.mkdir()
        _run("mount", "--bind", "/run/libvirt", str(host_libvirt))
    pytest_tmp = Path("/tmp", f"pytest-of-{pwd.getpwuid(os.getuid()).pw_name}")
    pytest_tmp.mkdir(mode=0o700, exist_ok=True)
    held_pytest_tmp = work / "host-pytest-tmp"
    held_pytest_tmp.mkdir()
    _run("mount", "--bind", str(pytest_tmp), str(held_pytest_tmp))
    _run("mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "sandbox-run", "/run")
    Path(INSIDE).mkdir()
    _run("mount", "--bind", str(work), INSIDE)
    if host_libvirt.is_dir():
        Path("/run/libvirt").mkdir()
        _run("mount", "--move", str(host_libvirt), "/run/libvirt")
    private_tmp = work / "tmp"
    private_tmp.mkdir()
    private_tmp.chmod(0o1777)
    (private_tmp / pytest_tmp.name).mkdir(mode=0o700)
    _run("mount", "--move", str(held_pytest_tmp), str(private_tmp / pytest_tmp.name))
    _run("mount", "--rbind", str(private_tmp), "/tmp")
    for target, (owner, group, mode) in PRIVATE_DIRS.items():
        if not Path(target).is_dir() or not _known(owner, group):
            continue
        source = Path(INSIDE, target.strip("/").replace("/", "-"))  # work, seen inside
        _make_dir(source, owner, group, mode)
        _run("mount", "--bind", str(source), target)
    for path, (owner, group, mode) in RUNTIME_DIRS.items():
        if Path(path).parent.is_dir() and _known(owner, group):
            _make_dir(path, owner, group, mode)


def _configure(ports: dict[str, int]) -> None:
    """The sandbox's own ports and no host cron jobs, written into its /etc overlay."""
    mariadb_conf = Path("/etc/mysql/mariadb.conf.d")
    if mariadb_conf.is_dir():
        (mariadb_conf / "99-snapcoord-sandbox.cnf").write_text(
            "# snapcoord lab sandbox (tests/lab/sandbox.py)\n[mysqld]\n"
            f"port = {ports['mysql']}\nbind-address = 127.0.0.1\n"
            "innodb_buffer_pool_size = 64M\n"
        )
    apache = Path("/etc/apache2")
    if apache.is_dir():
        (apache / "ports.conf").write_text(
            f"# snapcoord lab sandbox (tests/lab/sandbox.py)\nListen 127.0.0.1:{ports['http']}\n"
        )
        for site in (apache / "sites-available").glob("*.conf"):
            text = site.read_text()
            site.write_text(text.replace("<VirtualHost *:80>", f"<VirtualHost *:{ports['http']}>"))
    cron_d = Path("/etc/cron.d")
    if cron_d.is_dir():
        for entry in cron_d.iterdir():
            if entry.name != ".placeholder":
                entry.unlink()
    if Path("/etc/crontab").exists():
        Path("/etc/crontab").write_text(CRONTAB)
    postgresql = Path("/etc/postgresql")
    if postgresql.is_dir():
        for version in postgresql.iterdir():  # the lab creates its own cluster on first use
            shutil.rmtree(version)


def _install_mariadb() -> None:
    install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if install_db is None or not Path("/var/lib/mysql").is_dir() or not _known("mysql", "mysql"):
        return
    _run(install_db, "--user=mysql", "--datadir=/var/lib/mysql",
         "--auth-root-authentication-method=socket", "--skip-test-db", timeout=300)  # fmt: skip


def _prepare(work: Path) -> dict[str, int]:
    ports = _take_ports(("mysql", "http", "postgresql"))
    _mount_world(work)
    _configure(ports)
    _install_mariadb()
    Path(INSIDE, PORTS_FILE).write_text(json.dumps(ports))
    return ports


def _reap_all(deadline: float) -> bool:
    """Reap children until none is left (True) or ``deadline`` passes (False)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _end_everything() -> None:
    """Stop every process left in the namespace: SIGTERM, then SIGKILL after :data:`GRACE`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGTERM)  # in a PID namespace: everyone but PID 1
    if not _reap_all(time.monotonic() + GRACE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        _reap_all(time.monotonic() + 30)


def main(argv: list[str]) -> int:
    if os.getpid() != 1 or not argv:
        print("usage: unshare --mount --pid --fork --mount-proc -- python3 -I sandbox.py "
              "PROGRAM [ARG...]", file=sys.stderr)  # fmt: skip
        return 2
    work = Path(tempfile.mkdtemp(prefix="snapcoord-sandbox-"))
    work.chmod(0o755)  # the servers' users reach their directories below it
    try:
        _prepare(work)
        env = dict(os.environ, **{ENV: INSIDE, ENV_OUTSIDE: str(work)})
        child = subprocess.Popen(argv, env=env)
        forward: Any = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, forward)
        status: int | None = None
        while status is None:
            try:
                pid, raw = os.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            if pid == child.pid:
                status = os.waitstatus_to_exitcode(raw)
        _end_everything()
        return status if status >= 0 else 128 - status
    finally:
        _remove(work)


def _mount_points() -> list[str]:
    """Mount points of this namespace (/proc/self/mountinfo field 5, octal escapes decoded)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        points.append(raw.encode().decode("unicode_escape").encode("latin-1").decode())
    return points


def _remove(work: Path) -> None:
    """Detach every mount of the sandbox, then remove its directory, but only once no mount
    is left below it: pytest's directory and /run/libvirt are the host's, bound in, and must
    never be emptied by this."""
    ours = (f"{work}/", "/tmp", INSIDE, "/run", *PRIVATE_DIRS, "/etc")
    for _ in range(5):  # a mount shadowed by another becomes reachable once that one is gone
        points = [p for p in _mount_points() if p.startswith(ours)]
        if not points:
            break
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    left = [p for p in _mount_points() if p == str(work) or p.startswith(f"{work}/")]
    if left:
        print(f"sandbox: {work} kept: still mounted below it: {left}", file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

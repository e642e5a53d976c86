"""The guest's init services (MariaDB, Apache, cron), seen and driven from outside with
``service NAME start|stop``, and init scripts broken on purpose."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.lab.common import LabError, process_table, run, stat_fields, which
from tests.lab.mariadb import mariadb_uptime, mysqld_running

LAB_SERVICES = ("mariadb", "apache2", "cron")


def service_argv(name: str, action: str) -> list[str]:
    service = which("service")
    if service is None:
        raise LabError("'service' not found (apt-get install -y init-system-helpers)")
    return [service, name, action]


def service_running(name: str) -> bool:
    """True if ``service NAME status`` exits 0."""
    return run(service_argv(name, "status"), check=False, timeout=30).returncode == 0


def start_service(name: str) -> None:
    run(service_argv(name, "start"), timeout=120)
    if not service_running(name):
        raise LabError(f"service {name} start returned 0 but status says it is not running")


def stop_service(name: str) -> None:
    run(service_argv(name, "stop"), timeout=120)


def ensure_running(names: Iterable[str] = LAB_SERVICES) -> list[str]:
    """Start every service in ``names`` that is not running; return those started."""
    started = []
    for name in names:
        if not service_running(name):
            start_service(name)
            started.append(name)
    return started


#: Argument markers of what snapcoord leaves running on purpose, in the guest (watchdogs, lock
#: sessions, the freeze hook's units) and beside the coordinator (freeze holders). One test's
#: leftover would act inside a later test of the same sandbox: a watchdog firing there restarts
#: services that test stopped.
LEFTOVER_MARKERS = (
    "snapcoord-watchdog-",
    "snapcoord-pause:",
    "snapcoord-fsfreeze",
    "snapcoord.holder",
)


#: The guest lease (hooks/guest/lease.py) in the sandbox's /run: a run a test killed leaves it
#: until it expires, and every later test's runs are coordinators of stores of their own.
GUEST_LEASE = Path("/run/snapcoord/lease")


def clear_guest_lease() -> None:
    """Remove a guest lease an earlier test left (never follows a link: unlink)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        GUEST_LEASE.unlink()


def end_leftovers() -> list[int]:
    """SIGKILL every process of this sandbox that carries a :data:`LEFTOVER_MARKERS` marker
    (with its process group when it leads one); return their PIDs. They are all the lab's own:
    the sandbox has no other processes. A guest lease left behind goes too."""
    clear_guest_lease()
    ended = []
    for pid, _comm, args in process_table():
        if pid == os.getpid() or not any(marker in args for marker in LEFTOVER_MARKERS):
            continue
        leader = stat_fields(pid)[2:3] == [str(pid)]
        with contextlib.suppress(ProcessLookupError):
            if leader:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            ended.append(pid)
    return ended


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

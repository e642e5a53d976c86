"""What a boot verification asks the booted copy, through its QEMU guest agent
(:class:`snapcoord.agent_link.AgentLink`; ``guest-exec`` runs commands as root, never through a
shell of ours): does the agent answer, did systemd bring up each service, does the database
pass its own check (MariaDB/MySQL: ``mariadb-check --all-databases``; PostgreSQL: connect to
every database that allows connections and query it). Everything is bounded by one deadline;
commands carry the guest's own ``timeout -s KILL`` so nothing keeps running in the copy. Its
waits are :func:`snapcoord.cancel.sleep`: a cancelled run (``--parallel``) raises
:class:`~snapcoord.errors.Interrupted` there, and the caller tears down.

A failure is a :class:`BootProblem` (the snapshot's verdict, one line); the deadline passing is
a :class:`BootTimeout` naming what was awaited (``waiting for the guest agent ...``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from snapcoord import cancel
from snapcoord.agent_link import AgentCommandError, AgentLink, AgentUnavailable, ExecStatus
from snapcoord.hooks import databases
from snapcoord.text import clip

#: seconds one agent call may take (libvirt adds its own guest-sync)
CALL_SECONDS = 10.0
#: beyond a command's guest-side timeout, before the host stops waiting for it
GRACE_SECONDS = 5.0
POLL_SECONDS = 0.5

MYSQL_CHECK = r"""
tool=$(command -v mariadb-check || command -v mysqlcheck) || {
  echo "no mariadb-check or mysqlcheck in the guest"; exit 127; }
until mysqladmin ping >/dev/null 2>&1; do sleep 1; done
out=$("$tool" --all-databases 2>&1); rc=$?
printf 'ok %s\n' "$(printf '%s\n' "$out" | grep -c '[[:space:]]OK$')"
printf '%s\n' "$out" | grep -v '[[:space:]]OK$' | head -n 60
exit $rc
"""

POSTGRESQL_CHECK = r"""
cd / || exit 1  # runuser keeps the working folder, which the postgres user may not enter
command -v psql >/dev/null || { echo "no psql in the guest"; exit 127; }
until runuser -u postgres -- pg_isready -q; do sleep 1; done
q() { runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -c "$1" 2>&1; }
dbs=$(PGDATABASE=postgres q "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1") \
  || { echo "listing the databases: $dbs"; exit 3; }
n=0
while IFS= read -r db; do
  [ -n "$db" ] || continue
  out=$(PGDATABASE=$db q "SELECT count(*) FROM pg_catalog.pg_class") \
    || { echo "database $db: $out"; exit 4; }
  n=$((n + 1))
done <<EOF
$dbs
EOF
echo "ok $n"
"""


class BootProblem(Exception):
    """The booted copy failed a check (one line)."""


class BootTimeout(BootProblem):
    """The verification's deadline passed while waiting for something in the copy."""


class GuestChecks:
    """Checks of one booted copy through its agent link, within ``deadline`` (monotonic)."""

    def __init__(
        self,
        link: AgentLink,
        *,
        deadline: float,
        timeout: float,
        running: Callable[[], bool],
        console: Callable[[], str] = lambda: "",
    ) -> None:
        self.link = link
        self.deadline = deadline
        self.timeout = timeout
        self.running = running
        self.console = console

    def _left(self, waiting_for: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BootTimeout(f"waiting for {waiting_for}")
        return left

    def _still_running(self) -> None:
        if not self.running():
            last = self.console()
            seen = f" (console: {clip(last, 160)})" if last else ""
            raise BootProblem(f"the copy stopped running (powered off or crashed){seen}")

    def wait_for_agent(self) -> None:
        """Until the guest agent answers a ping (the guest booted far enough to run it)."""
        while True:
            left = self._left("the guest agent to answer (does the guest run qemu-guest-agent?)")
            self._still_running()
            try:
                self.link.ping(timeout=min(CALL_SECONDS, max(1.0, left)))
                return
            except AgentUnavailable:
                pass
            except AgentCommandError as exc:
                raise BootProblem(
                    f"the guest agent answered with an error: {exc.message}"
                ) from None
            cancel.sleep(min(1.0, max(0.0, self.deadline - time.monotonic())))

    def run(self, argv: Sequence[str], *, waiting_for: str) -> ExecStatus:
        """``argv`` in the guest, killed there at the deadline; its status once it exited."""
        left = self._left(waiting_for)
        limited = ["timeout", "-s", "KILL", str(max(1, math.ceil(left))), *argv]
        try:
            pid = self.link.exec(limited, stdin=None, timeout=CALL_SECONDS)
            while True:
                status = self.link.exec_status(pid, timeout=CALL_SECONDS)
                if status.exited:
                    break
                if time.monotonic() > self.deadline + GRACE_SECONDS:
                    self._left(waiting_for)
                self._still_running()
                cancel.sleep(POLL_SECONDS)
        except (AgentUnavailable, AgentCommandError) as exc:
            self._still_running()
            raise BootProblem(
                f"the guest agent failed while {waiting_for}: {exc.message}"
            ) from None
        if status.signal == 9 or status.exitcode == 137:
            self._left(waiting_for)  # killed by its guest-side timeout: the deadline passed
        return status

    def wait_for_boot(self) -> str:
        """Until systemd finished booting (``running``, or ``degraded`` when a unit failed)."""
        status = self.run(
            ["systemctl", "is-system-running", "--wait"], waiting_for="systemd to finish booting"
        )
        return status.stdout.decode(errors="replace").strip() or f"exit {status.returncode}"

    def services(self, names: Sequence[str]) -> dict[str, str]:
        """Each unit's state (``active``, ``failed``, ``inactive``...), once booted."""
        states: dict[str, str] = {}
        if not names:
            return states
        status = self.run(
            ["systemctl", "is-active", "--", *names], waiting_for="the services' states"
        )
        lines = status.stdout.decode(errors="replace").splitlines()
        for index, name in enumerate(names):
            states[name] = lines[index].strip() if index < len(lines) else "unknown"
        return states

    def find_database(self, database: str) -> str | None:
        """The database service to check: the configured one, or for ``auto`` the first of the
        kinds' services the guest has (None: it has none; ``none``: None)."""
        if database == "none":
            return None
        if database != "auto":
            return database
        candidates = databases.auto_candidates()
        status = self.run(
            ["systemctl", "list-unit-files", "--no-legend", "--",
             *(f"{name}.service" for name in candidates)],
            waiting_for="the database service's name",
        )  # fmt: skip
        present = {
            line.split()[0].removesuffix(".service")
            for line in status.stdout.decode(errors="replace").splitlines()
            if line.strip()
        }
        return next((name for name in candidates if name in present), None)

    def database(self, service: str) -> str:
        """The database's own check; its summary, or BootProblem naming the first problem."""
        kind = databases.for_service(service)
        if kind.NAME == "postgresql":
            return self._postgresql()
        return self._mysql()

    def _mysql(self) -> str:
        status = self.run(
            ["/bin/sh", "-c", MYSQL_CHECK], waiting_for="mariadb-check --all-databases"
        )
        ok, rest = _summary(status)
        errors = _problems(rest, "error")
        if status.returncode != 0 or errors:
            first = errors[0] if errors else (rest[-1] if rest else f"exit {status.returncode}")
            raise BootProblem(f"mariadb-check --all-databases: {clip(first, 200)}")
        warnings = _problems(rest, "warning")
        text = f"mariadb-check --all-databases: {ok} tables OK"
        if warnings:
            text += f", {len(warnings)} warning(s), first: {clip(warnings[0], 160)}"
        return text

    def _postgresql(self) -> str:
        status = self.run(["/bin/sh", "-c", POSTGRESQL_CHECK], waiting_for="PostgreSQL's check")
        ok, rest = _summary(status)
        if status.returncode != 0:
            first = rest[0] if rest else f"exit {status.returncode}"
            raise BootProblem(f"PostgreSQL: {clip(first, 200)}")
        return f"PostgreSQL: {ok} databases answered a query"


def _summary(status: ExecStatus) -> tuple[int, list[str]]:
    """The ``ok N`` count the check scripts print first, and their other output lines."""
    lines = [ln.rstrip() for ln in status.stdout.decode(errors="replace").splitlines()]
    lines += [ln.rstrip() for ln in status.stderr.decode(errors="replace").splitlines()]
    ok = 0
    rest: list[str] = []
    for line in lines:
        if line.startswith("ok ") and line[3:].isdigit() and not ok:
            ok = int(line[3:])
        elif line.strip():
            rest.append(line.strip())
    return ok, rest


def _problems(lines: list[str], level: str) -> list[str]:
    """mariadb-check's ``error    : text`` (or warning) lines, each with the table above it."""
    found: list[str] = []
    table = ""
    for line in lines:
        head, sep, text = line.partition(":")
        if sep and head.strip() in ("error", "warning", "note", "status", "Error"):
            if head.strip().lower() == level:
                found.append(f"{table}: {text.strip()}" if table else text.strip())
        else:
            table = line.split()[0] if line.split() else table
    return found

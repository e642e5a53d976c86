"""Verifying a MySQL/MariaDB dump on the coordinator: a throwaway ``mariadbd`` on a fresh
datadir, the dump loaded exactly as ``restore-dump`` loads it, its tables measured with the same
SQL that ran in the guest at dump time (hooks/databases/mysql.py ``table_sums``), and
``mariadb-check`` over everything.

Every process runs confined (snapcoord/verify/scratch.py: nobody, no network, no capabilities,
a read-only system with a /tmp of its own; only the server and ``mariadb-install-db`` may write
in the work folder): ``mariadb-install-db``, the server, the ``mysql`` client that reads the
dump (with ``--sandbox`` where the client has it, so ``\\!`` and ``system`` lines are refused;
without it they would run as nobody without network, and what they write is gone with the
verify), its decompressor and ``mariadb-check``. The server
listens on a Unix socket only (``--skip-networking``) in a folder only nobody can enter; it runs
with the event scheduler off (a dump's events are created, never run; DISABLED, as with
``--skip-grant-tables``, would refuse their CREATE EVENT), root without a password (only
nobody can reach the socket; the dump's own ``mysql`` tables are loaded as data and never
flushed into the running server's accounts), ``secure_file_priv`` limited to an empty folder
of its own, and InnoDB settings for a fast, throwaway load (no durability).

Only the fixed system paths below are used; a missing program is :class:`VerifyUnavailable`
naming the Debian package to install: ``mariadb-server-core`` (mariadbd, mariadb-install-db)
and ``mariadb-client-core`` (mysql, mariadb-check, and my_print_defaults, which
mariadb-install-db runs); no service needs to run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from snapcoord.errors import GuestError, VerifyFailed, VerifyUnavailable
from snapcoord.guest import ExecTransport
from snapcoord.hooks.databases import mysql as kind
from snapcoord.hooks.databases.dumpfile import RestoreSource, TableSum, client_error
from snapcoord.shell import Completed, execute
from snapcoord.text import clip
from snapcoord.verify import scratch

NAME = kind.NAME
CHECKSUM_METHOD = kind.CHECKSUM_METHOD
PACKAGE = "mariadb-server-core"
CLIENT_PACKAGE = "mariadb-client-core"

#: Where the programs are looked for (first present wins); tests point these elsewhere.
SERVERS: tuple[str, ...] = ("/usr/sbin/mariadbd", "/usr/sbin/mysqld")
INSTALL_DB: tuple[str, ...] = ("/usr/bin/mariadb-install-db", "/usr/bin/mysql_install_db")
#: restore-dump runs ``mysql`` by name; on the coordinator that name resolves in
#: scratch.SAFE_PATH, so this is the file it finds.
CLIENTS: tuple[str, ...] = ("/usr/bin/mysql",)
CHECKS: tuple[str, ...] = ("/usr/bin/mariadb-check", "/usr/bin/mysqlcheck")
#: mariadb-install-db runs it (from mariadb-client-core, which mariadb-server-core lacks).
PRINT_DEFAULTS: tuple[str, ...] = ("/usr/bin/my_print_defaults",)
#: Decompressors the confined load pipeline runs by name (a codec's is needed only for it).
DECOMPRESSORS = {"gzip": "/usr/bin/gzip", "zstd": "/usr/bin/zstd"}

#: The longest Unix socket path the kernel accepts (sun_path, less its NUL).
SOCKET_MAX = 107
#: Free bytes below which a "table is full" error counts as the verify folder being full.
LOW_SPACE = 64 << 20
#: Seconds between SIGTERM and SIGKILL when the server stops (it has nothing to keep).
STOP_GRACE = 30.0
#: Given to mariadb-install-db too: the server then starts without resizing its redo log (which
#: would need room for both files at once).
INNODB_FILES: tuple[str, ...] = ("--innodb-log-file-size=128M",)
#: Server settings for a throwaway load: durability off, buffers moderate.
SERVER_OPTIONS: tuple[str, ...] = (
    "--skip-networking",
    "--skip-name-resolve",
    "--skip-log-bin",
    "--event-scheduler=OFF",
    "--performance-schema=OFF",
    "--innodb-buffer-pool-size=256M",
    *INNODB_FILES,
    "--max-heap-table-size=1G",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--innodb-fast-shutdown=2",
    "--max-allowed-packet=1G",
)
_NO_SPACE = re.compile(r"No space left|errno: 28|Errcode: 28|Disk full|\(errno 28\)", re.I)


def _first(paths: Sequence[str]) -> str | None:
    return next((p for p in paths if os.access(p, os.X_OK)), None)


def _program(paths: Sequence[str], package: str, *, vm: str, what: str) -> str:
    found = _first(paths)
    if found is None:
        raise VerifyUnavailable(
            f"cannot verify the {NAME} dump: {what} ({' or '.join(paths)}) not found on this "
            "coordinator",
            vm=vm,
            hint=f"install the package {package} (no service needs to run)",
        )
    return found


def require(*, vm: str) -> None:
    """The server, mariadb-install-db, the client, mariadb-check and my_print_defaults are
    installed here (and the confinement's own programs)."""
    scratch.require_tools(vm=vm)
    _program(SERVERS, PACKAGE, vm=vm, what="the MariaDB server")
    _program(INSTALL_DB, PACKAGE, vm=vm, what="mariadb-install-db")
    _program(CLIENTS, CLIENT_PACKAGE, vm=vm, what="the mysql client")
    _program(CHECKS, CLIENT_PACKAGE, vm=vm, what="mariadb-check")
    _program(PRINT_DEFAULTS, CLIENT_PACKAGE, vm=vm, what="my_print_defaults")


@dataclass
class Server:
    """A running throwaway server and how to talk to it."""

    vm: str
    work: Path
    socket: Path
    log: Path
    process: subprocess.Popen[bytes]
    client: kind.Client
    transport: ExecTransport

    def alive(self) -> bool:
        return self.process.poll() is None


def _sandbox_option(client: str) -> tuple[str, ...]:
    """``--sandbox`` when this mysql client knows it (MariaDB 10.5.25, 10.6.18, 10.11.8+)."""
    result = subprocess.run(
        scratch.confined([client, "--no-defaults", "--help", "--verbose"]),
        capture_output=True,
        timeout=60,
        check=False,
    )
    return ("--sandbox",) if re.search(rb"^\s*--sandbox\b", result.stdout, re.M) else ()


def _unavailable(message: str, *, vm: str, log: Path | None = None) -> VerifyUnavailable:
    """VerifyUnavailable with the log's first error line (else its last line)."""
    if log is not None and log.is_file():
        lines = log.read_text(errors="replace").strip().splitlines()
        errors = [ln for ln in lines if "ERROR" in ln] or lines[-1:]
        message += f": {clip(errors[0].strip(), 300)}" if errors else ""
    return VerifyUnavailable(message, vm=vm, hint="the dump was not judged")


def _install(datadir: Path, log: Path, *, vm: str, timeout: float) -> None:
    """``mariadb-install-db`` as nobody (its whole session is killed on a timeout)."""
    install = _program(INSTALL_DB, PACKAGE, vm=vm, what="mariadb-install-db")
    argv = [install, "--no-defaults", f"--datadir={datadir}", "--skip-test-db",
            "--auth-root-authentication-method=normal", "--skip-name-resolve",
            *INNODB_FILES]  # fmt: skip
    result = execute(
        scratch.confined(argv, work=datadir.parent, writable=True),
        timeout=timeout,
        env={"PATH": scratch.SAFE_PATH},
    )
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "wb") as out:
        out.write(result.stdout + result.stderr)
    if result.timed_out:
        raise _unavailable(f"mariadb-install-db did not finish within {timeout:.0f} s", vm=vm)
    if result.returncode != 0:
        what = "mariadb-install-db failed"
        if _NO_SPACE.search(_read(log)):
            what += f": out of disk space in {datadir.parent.parent}"
        raise _unavailable(what, vm=vm, log=log)


@contextlib.contextmanager
def server(work: Path, *, vm: str, timeout: float) -> Iterator[Server]:
    """A throwaway server on a fresh datadir in ``work``, ready to accept connections; stopped
    (SIGTERM, SIGKILL after STOP_GRACE) when the block ends, whatever ended it. Its files stay
    in ``work`` for the caller's scratch.workspace to remove."""
    require(vm=vm)
    binary = _program(SERVERS, PACKAGE, vm=vm, what="the MariaDB server")
    datadir = scratch.nobody_folder(work, "data")
    run = scratch.nobody_folder(work, "run")
    files = scratch.nobody_folder(work, "files")
    socket = run / "mysqld.sock"
    if len(str(socket).encode()) > SOCKET_MAX:
        raise VerifyUnavailable(
            f"the verify folder's path is too long for a Unix socket: {socket}",
            vm=vm,
            hint="set a shorter verify_dir",
        )
    deadline = time.monotonic() + timeout
    _install(datadir, work / "install.log", vm=vm, timeout=timeout)
    log = run / "error.log"
    argv = [binary, "--no-defaults", f"--datadir={datadir}", f"--socket={socket}",
            f"--pid-file={run / 'mysqld.pid'}", f"--log-error={log}",
            f"--secure-file-priv={files}", f"--tmpdir={run}", *SERVER_OPTIONS]  # fmt: skip
    client_path = _program(CLIENTS, CLIENT_PACKAGE, vm=vm, what="the mysql client")
    connection = (f"--socket={socket}", *_sandbox_option(client_path))
    client = kind.Client(vm=vm, sudo=False, user="root", connection=connection)
    process = scratch.start(argv, work=work, log_file=work / "server.out")
    started = Server(vm, work, socket, log, process, client, scratch.transport(work, vm=vm))
    try:
        _wait_ready(started, deadline=deadline)
        yield started
    finally:
        scratch.stop(process, grace=STOP_GRACE)


def _wait_ready(server: Server, *, deadline: float) -> None:
    while True:
        if not server.alive():
            raise _unavailable(
                "the throwaway MariaDB server would not start", vm=server.vm, log=server.log
            )
        if server.socket.exists():
            with contextlib.suppress(GuestError):
                server.client.query(server.transport, "SELECT 1;", timeout=30)
                return
        if time.monotonic() > deadline:
            raise _unavailable(
                "the throwaway MariaDB server did not accept connections in time",
                vm=server.vm,
                log=server.log,
            )
        time.sleep(0.1)


def load(server: Server, source: RestoreSource, *, vm: str, timeout: float) -> float:
    """Load the dump with restore-dump's own ``load`` (the same mysql invocation, decompressed
    in the confined pipeline); returns seconds. VerifyFailed with the client's error line, or
    VerifyUnavailable when the failure is this coordinator's (the server died, disk full)."""
    decompressor = DECOMPRESSORS.get(source.compression)
    if decompressor is not None and not os.access(decompressor, os.X_OK):
        raise VerifyUnavailable(
            f"cannot verify the {NAME} dump: {decompressor} not found on this coordinator",
            vm=vm,
            hint=f"install {os.path.basename(decompressor)}",
        )
    started = time.monotonic()
    try:
        loaded = kind.load(server.transport, server.client, source, timeout=timeout)
        problem = None if loaded.ok else _first_error(loaded)
    except GuestError as exc:
        problem = exc.message
    else:
        if loaded.timed_out:
            raise VerifyUnavailable(
                f"loading the dump did not finish within {timeout:.0f} s",
                vm=vm,
                hint="the dump was not judged; allow the verify more time",
            )
    seconds = time.monotonic() - started
    if problem is None:
        return seconds
    if not server.alive():
        raise _unavailable(
            f"the throwaway MariaDB server died while the dump loaded ({problem})",
            vm=vm,
            log=server.log,
        )
    if _out_of_space(problem, server):
        raise VerifyUnavailable(
            f"out of disk space in {server.work.parent} while the dump loaded: {problem}",
            vm=vm,
            hint="free space there or set verify_dir elsewhere; the dump was not judged",
        )
    raise VerifyFailed(
        f"the dump {source.file.name} does not load: {problem}",
        vm=vm,
        hint="the dump is kept, marked unverified",
    )


def _out_of_space(problem: str, server: Server) -> bool:
    """Did the load fail because the verify folder's file system is full? The server says so
    in many ways: errno 28, "The table ... is full" (ERROR 1114), or an InnoDB commit that
    failed with "Operation not permitted" (ERROR 1180, seen on a full tmpfs). Whatever the
    error, a load that failed with less than LOW_SPACE free there is taken as out of space:
    the dump is then not judged (a verify elsewhere can still judge it)."""
    if _NO_SPACE.search(problem) or _NO_SPACE.search(_read(server.log)):
        return True
    try:
        info = os.statvfs(server.work)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < LOW_SPACE


def _first_error(result: Completed) -> str:
    """The client's first ``ERROR`` line (a syntax error's message spans lines: its first
    names the statement's line), else restore-dump's summary of what went wrong."""
    for line in result.stderr.decode(errors="replace").splitlines():
        if line.startswith("ERROR"):
            return clip(line.strip(), 300)
    return client_error(result)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


#: Connections the measure uses at most (it reads every row: the coordinator's cores help).
MEASURE_WORKERS = 4
#: A table with more rows than this (information_schema's estimate) is measured in key ranges.
SPLIT_ROWS = 200_000


def measure(
    server: Server, databases: Sequence[str], *, vm: str, timeout: float
) -> dict[str, TableSum]:
    """Rows and checksums of every base table of ``databases``: the SQL the dump recorded
    (``table_sums``), spread over up to MEASURE_WORKERS connections. A big table whose primary
    key is one integer column is read in key ranges whose counts and sums add up to its
    one-pass figures (sums do not depend on how the rows are grouped). The guest's figures
    were taken in one pass per table, beside the dump; here the coordinator has idle cores."""
    try:
        plans = kind.sum_plans(server.client, server.transport, databases, timeout=timeout)
        workers = max(1, min(MEASURE_WORKERS, os.cpu_count() or 1))
        units = [u for plan in plans for u in _units(server, plan, workers, timeout=timeout)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify-measure") as pool:
            parts = list(pool.map(lambda unit: _sum(server, unit, timeout=timeout), units))
    except GuestError as exc:
        raise _failure(server, f"measuring the loaded tables failed: {exc.message}") from None
    totals: dict[str, list[int | None]] = {}
    for name, rows, checksum in parts:
        total = totals.setdefault(name, [0, None if checksum is None else 0])
        total[0] = int(total[0] or 0) + rows
        if checksum is not None:
            total[1] = int(total[1] or 0) + checksum
    return {
        name: TableSum(int(rows or 0), None if checksum is None else str(checksum))
        for name, (rows, checksum) in totals.items()
    }


def _units(
    server: Server, plan: kind.SumPlan, workers: int, *, timeout: float
) -> list[tuple[kind.SumPlan, str]]:
    """(plan, WHERE clause) pieces of one table: the whole table, or key ranges covering it."""
    if plan.key is None or plan.estimated_rows <= SPLIT_ROWS or workers == 1:
        return [(plan, "")]
    key = kind.quote_ident(plan.key)
    table = f"{kind.quote_ident(plan.db)}.{kind.quote_ident(plan.table)}"
    edges = f"SELECT MIN({key}), MAX({key}) FROM {table};"  # noqa: S608 - quoted identifiers
    ((low, high),) = server.client.query(server.transport, edges, timeout=timeout)
    if low == "NULL" or high == "NULL":
        return [(plan, "")]
    first, last = int(low), int(high)
    pieces = min(workers * 2, max(1, plan.estimated_rows // (SPLIT_ROWS // 2)))
    bounds = sorted({first + (last - first) * i // pieces for i in range(1, pieces)})
    if not bounds:
        return [(plan, "")]
    # no lower bound on the first piece, none above the last: every row is in exactly one
    wheres = [f" WHERE {key} < {bounds[0]}"]
    wheres += [f" WHERE {key} >= {a} AND {key} < {b}" for a, b in itertools.pairwise(bounds)]
    wheres.append(f" WHERE {key} >= {bounds[-1]}")
    return [(plan, where) for where in wheres]


def _sum(
    server: Server, unit: tuple[kind.SumPlan, str], *, timeout: float
) -> tuple[str, int, int | None]:
    plan, where = unit
    ((_, _, count, checksum),) = server.client.query(
        server.transport, f"{kind.SUMS_SESSION} {plan.select(where)};", timeout=timeout
    )
    return plan.name, int(count), None if checksum == "NULL" else int(checksum)


def check(server: Server, *, vm: str, timeout: float) -> None:
    """``mariadb-check --all-databases --quick`` on the loaded data; VerifyFailed naming the
    first table (or view) it reports. QUICK (CHECK TABLE ... QUICK) checks every table's and
    index's structure and every view's definition, without reading every row once more: the
    comparison has just read every row, and a full CHECK TABLE on a server that built its
    indexes from the dump seconds ago judges this server more than the dump, at 7 s per GB of
    SQL, 11 % of a verify (docs/benchmarks.md "Verify"). ``snapcoord verify --boot`` runs the
    full check inside the booted copy."""
    program = _program(CHECKS, CLIENT_PACKAGE, vm=vm, what="mariadb-check")
    argv = [program, f"--socket={server.socket}", "--user=root", "--all-databases", "--quick",
            "--silent"]  # fmt: skip
    try:
        result = server.transport.run(argv, timeout=timeout)
    except GuestError as exc:
        raise _failure(server, f"mariadb-check failed: {exc.message}") from None
    if result.timed_out:
        raise VerifyUnavailable(f"mariadb-check timed out after {timeout:.0f} s", vm=vm)
    output = (result.stdout + result.stderr).decode(errors="replace")
    problem = _first_problem(output)
    if problem is None and result.returncode != 0:
        problem = clip(output.strip().splitlines()[-1], 300) if output.strip() else (
            f"exit status {result.returncode}"
        )  # fmt: skip
    if problem is not None:
        raise _failure(server, f"mariadb-check reports: {problem}")


def _first_problem(output: str) -> str | None:
    """The first table mariadb-check reports an error for, with the error."""
    table = None
    for line in output.splitlines():
        text = line.strip()
        if not text:
            continue
        if ":" not in text.split()[0] and not text.lower().startswith(("error", "warning")):
            table = text.split()[0]
            continue
        if text.lower().startswith("error"):
            detail = text.split(":", 1)[1].strip() if ":" in text else text
            return clip(f"{table}: {detail}" if table else detail, 300)
    return None


def _failure(server: Server, message: str) -> VerifyFailed | VerifyUnavailable:
    if not server.alive():
        return _unavailable(
            f"the throwaway MariaDB server died ({message})", vm=server.vm, log=server.log
        )
    return VerifyFailed(message, vm=server.vm, hint="the dump is kept, marked unverified")

"""``snapcoord verify`` for PostgreSQL: a throwaway cluster on the coordinator, the dump loaded
into it exactly as ``restore-dump`` loads it, its tables measured and checked.

The binaries are the newest ``/usr/lib/postgresql/<major>/bin/{initdb,postgres,psql,
pg_isready}`` (Debian's ``postgresql-<major>``; no service needs to run). A dump needs a server
of its own major or a newer one: from a newer server than the binaries, the verify is
unavailable (the dump is not judged).

Every process runs confined (snapcoord/verify/scratch.py: nobody, no network, no capabilities,
no environment, a read-only system with a /tmp and /dev/shm of its own; only ``initdb`` and the
server may write in the work folder). ``initdb`` makes a fresh cluster in the work folder
(``--auth=trust``, the superuser ``postgres``, encoding UTF8 in the locale C.UTF-8; the
databases of the dump are made by its own ``CREATE DATABASE`` with their encoding and locale,
which the coordinator must have: when it lacks one, the verify is unavailable and says which).
The server listens on a Unix socket in a folder of its own and on no TCP address
(``listen_addresses=''``), with ``fsync``, ``full_page_writes`` and ``synchronous_commit`` off
and no autovacuum: a throwaway that is removed after the verify needs no crash safety, and a
load without them is faster.

The load is hooks/databases/postgresql.py's: the same ``psql -X -q`` of the whole script as
the superuser without ``ON_ERROR_STOP``, the dump decompressed by the same pipeline (inside the
confinement), and the same tolerated errors (``role/tablespace ... already exists``: on a fresh
cluster the dump's ``CREATE ROLE postgres``). Its ``\\!`` lines run as nobody without network,
and write nowhere that outlives the verify; its ``COPY ... TO PROGRAM`` alike (as the server).
Measuring gives the kind's :func:`~snapcoord.hooks.databases.postgresql.table_sums` figures,
from the same SQL that ran in the guest when the dump was taken
(:func:`~snapcoord.hooks.databases.postgresql.sum_statement`), on several connections at once:
the tables are dealt to them, and a big table is split into ranges of heap blocks when there are
more connections than PostgreSQL's own parallel scan of one query has processes; counts and sums
are additive, so the pieces add up to the one-pass figures (:func:`plan`, :func:`measure`).

The check connects to every database and queries its catalog (``pg_class``) and finds invalid
indexes. ``pg_amcheck`` is not run: it needs the ``amcheck`` extension created in every
database (it does not work without extensions), and on a cluster that was built from SQL
seconds before, by this very server, a physical check of heap and B-tree pages judges the
coordinator's server and disk rather than the dump, while reading every table and index again.

The server stops with PostgreSQL's fast shutdown (SIGINT; SIGTERM is its *smart* shutdown,
which waits for sessions to end), then scratch.stop's SIGTERM and SIGKILL after a bound; its
backends, which make themselves session leaders and so leave the postmaster's process group,
are killed by PID if they outlive it: every process in the server's own network namespace.
If snapcoord itself is SIGKILLed, the postmaster dies with it (``--pdeathsig``) and idle
backends follow at once, but a backend busy in one statement runs on (as nobody, without
network, its working folder the deleted data folder) until that statement ends: it looks for
its postmaster only when it waits.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import json
import logging
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snapcoord.errors import GuestError, VerifyFailed, VerifyUnavailable
from snapcoord.guest import ExecTransport
from snapcoord.hooks.databases import postgresql as kind
from snapcoord.hooks.databases.dumpfile import RestoreSource, TableSum, client_error
from snapcoord.shell import execute
from snapcoord.text import clip
from snapcoord.verify import scratch

log = logging.getLogger("snapcoord.verify")

NAME = kind.NAME
CHECKSUM_METHOD = kind.CHECKSUM_METHOD
PACKAGE = "postgresql-15"
#: Where Debian installs each major's server binaries (``<major>/bin``).
BIN_ROOT = Path("/usr/lib/postgresql")
PROGRAMS = ("initdb", "postgres", "psql", "pg_isready")
SUPERUSER = "postgres"
#: The socket's port number (only its file name, ``.s.PGSQL.<port>``: there is no TCP).
PORT = 5432
#: Settings of the throwaway server (see the module's docstring).
SETTINGS = (
    "listen_addresses=",
    "fsync=off",
    "full_page_writes=off",
    "synchronous_commit=off",
    "autovacuum=off",
    "unix_socket_permissions=0700",
)
#: At most this many connections measure at once (:func:`workers`).
MAX_WORKERS = 4
#: A table is split into ranges of heap blocks when bigger (with TOAST) than this and than a
#: share of about two pieces per connection.
SPLIT_BYTES = 32 * 1024 * 1024
#: The first major with TID range scans (``WHERE ctid >= ... AND ctid < ...``).
TID_RANGE_MAJOR = 14
#: Seconds between two readiness probes while the server starts.
POLL = 0.1
#: Seconds the server gets to end after its fast shutdown before it is killed.
GRACE = 30.0

_MAJOR_RE = re.compile(r"(\d+)")
_HEADER_VERSION_RE = re.compile(
    rb"^-- Dumped (?:from database|by pg_dump(?:all)?) version (\d+)", re.MULTILINE
)
_HEADER_BYTES = 65536
_NO_SPACE = "No space left on device"
_SERIOUS_RE = re.compile(r"\b(?:PANIC|FATAL|ERROR):\s")
_LOCALE_RE = re.compile(r'invalid (?:locale name|LC_\w+ locale name):? "?([^"]*)"?')
_EXTENSION_RE = re.compile(r'extension "([^"]+)" is not available|could not open extension control')
_TABLESPACE_RE = re.compile(rb'^CREATE TABLESPACE ("(?:[^"]|"")+"|\S+) ', re.MULTILINE)


@dataclass(frozen=True)
class Binaries:
    bindir: Path
    major: int


@dataclass
class Server:
    """A running throwaway cluster: how to reach it and how to stop it."""

    vm: str
    binaries: Binaries
    socket_dir: Path
    data_dir: Path
    log_file: Path
    process: subprocess.Popen[bytes]
    transport: ExecTransport = field(repr=False)
    #: the server's network namespace, held open once the server answered (see _stop)
    netns_fd: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def client(self) -> kind.Client:
        """hooks/databases/postgresql.py's client, aimed at this server's socket as the
        superuser, run through the confined transport."""
        return kind.Client(
            vm=self.vm,
            sudo=False,
            os_user=SUPERUSER,
            connection=(f"--host={self.socket_dir}", f"--port={PORT}", f"--username={SUPERUSER}"),
            bindir=str(self.binaries.bindir),
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def last_log_line(self) -> str:
        """The server log's last error line (else its last line)."""
        return _last_line(self.log_file)


# --------------------------------------------------------------------------------------------
# require


def _trusted(path: Path, kind_of: int) -> bool:
    """A file of that kind (a link is judged by its target) owned by root that no one else
    may change."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (
        stat.S_IFMT(info.st_mode) == kind_of
        and info.st_uid == 0
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _untrusted(bindir: Path) -> str | None:
    """The first part of ``bindir`` that is missing or could be changed by others."""
    for folder in (bindir.parent, bindir):
        if not _trusted(folder, stat.S_IFDIR):
            return str(folder)
    for program in PROGRAMS:
        path = bindir / program
        if not _trusted(path, stat.S_IFREG) or not os.stat(path).st_mode & stat.S_IXOTH:
            return str(path)
    return None


def binaries(*, vm: str) -> Binaries:
    """The newest major under :data:`BIN_ROOT` that has every program of :data:`PROGRAMS`
    (Debian's client package of a newer major brings psql without the server: the newest
    complete set is used)."""
    majors: list[int] = []
    with contextlib.suppress(OSError):
        majors = sorted((int(p.name) for p in BIN_ROOT.iterdir() if p.name.isdigit()), reverse=True)
    first_problem = f"{BIN_ROOT}/<major>/bin/initdb"
    for major in majors:
        bindir = BIN_ROOT / str(major) / "bin"
        problem = _untrusted(bindir)
        if problem is None:
            return Binaries(bindir, major)
        if major == majors[0]:
            first_problem = problem
    raise VerifyUnavailable(
        f"cannot verify a PostgreSQL dump: {first_problem} not found (or not a root-owned "
        "program others cannot change)",
        vm=vm,
        hint=f"install the server binaries on this coordinator: apt-get install {PACKAGE} "
        "(or postgresql-<major> of the dump's server, no service needs to run)",
    )


def require(*, vm: str) -> None:
    """The server binaries and the confinement's programs are there."""
    scratch.require_tools(vm=vm)
    binaries(vm=vm)


# --------------------------------------------------------------------------------------------
# server


def _last_line(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with open(fd, "rb") as handle:
        handle.seek(max(0, os.fstat(fd).st_size - 4096))
        lines = [ln.strip() for ln in handle.read().decode(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    serious = [ln for ln in lines if _SERIOUS_RE.search(ln)]
    return clip((serious or lines or [""])[-1], 300)


def _initdb(bins: Binaries, data_dir: Path, *, vm: str, timeout: float) -> None:
    argv = [str(bins.bindir / "initdb"), f"--pgdata={data_dir}", "--auth=trust",
            f"--username={SUPERUSER}", "--encoding=UTF8", "--locale=C.UTF-8",
            "--no-sync"]  # fmt: skip
    result = execute(scratch.confined(argv, work=data_dir.parent, writable=True), timeout=timeout)
    if not result.ok:
        error = "timed out" if result.timed_out else result.error_text()
        raise VerifyUnavailable(
            f"cannot verify: initdb of the throwaway PostgreSQL cluster failed: {error}",
            vm=vm,
            hint="check free space in verify_dir and that the C.UTF-8 locale exists",
        )


def _ready(server: Server, *, timeout: float) -> bool:
    argv = [str(server.binaries.bindir / "pg_isready"), "-q", f"--host={server.socket_dir}",
            f"--port={PORT}", f"--username={SUPERUSER}", "--dbname=postgres"]  # fmt: skip
    return execute(scratch.confined(argv, work=server.socket_dir.parent), timeout=timeout).ok


def _wait_ready(server: Server, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            raise VerifyUnavailable(
                f"the throwaway PostgreSQL server did not start: {server.last_log_line()}",
                vm=server.vm,
                hint="the dump was not judged; fix the coordinator and verify again",
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise VerifyUnavailable(
                f"the throwaway PostgreSQL server was not ready within {timeout:g} s",
                vm=server.vm,
                hint="the dump was not judged",
            )
        if _ready(server, timeout=max(1.0, min(left, 30.0))):
            _note_netns(server)
            return
        time.sleep(POLL)


def _netns(pid: int) -> tuple[int, int] | None:
    try:
        info = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _note_netns(server: Server) -> None:
    """Remember the server's network namespace (its own, made by the confinement: every
    process the server forks lives in it, and nothing else does). Read once the server
    answers, so it is surely past ``unshare``; never this process's own. The namespace is held
    open until the server stopped, so its inode cannot be given to another one meanwhile."""
    if server.netns_fd is not None or not server.alive():
        return
    try:
        fd = os.open(f"/proc/{server.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    info = os.fstat(fd)
    if (info.st_dev, info.st_ino) == _netns(os.getpid()) or not server.alive():
        os.close(fd)
        return
    server.netns_fd = fd


def _kill_namespace(netns: tuple[int, int]) -> None:
    """SIGKILL every process left in the server's network namespace (its backends make
    themselves session leaders, so the postmaster's process group does not hold them), until
    none is left (bounded)."""
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline:
        left = [
            int(e)
            for e in os.listdir("/proc")
            if e.isdigit() and _netns(int(e)) == netns and _owner(int(e)) == scratch.NOBODY
        ]
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    log.warning("processes of the throwaway PostgreSQL server outlived SIGKILL")


def _stop(server: Server) -> None:
    _note_netns(server)
    try:
        if server.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGINT)  # fast shutdown
        scratch.stop(server.process, grace=GRACE)
        if server.netns_fd is not None:
            info = os.fstat(server.netns_fd)
            _kill_namespace((info.st_dev, info.st_ino))
    finally:
        if server.netns_fd is not None:
            os.close(server.netns_fd)
            server.netns_fd = None


def _prepare(work: Path, bins: Binaries, folders: list[Path], *, vm: str, timeout: float) -> Server:
    """Make the cluster (its folders appended to ``folders`` for removal) and start it."""
    try:
        data_dir = scratch.nobody_folder(work, "data")
        folders.append(data_dir)
        socket_dir = scratch.nobody_folder(work, "socket")
        folders.append(socket_dir)
    except OSError as exc:
        raise VerifyUnavailable(
            f"cannot verify: making the throwaway server's folders in {work} failed: "
            f"{exc.strerror or exc}",
            vm=vm,
        ) from None
    _initdb(bins, data_dir, vm=vm, timeout=timeout)
    log_file = work / "postgres.log"
    argv = [str(bins.bindir / "postgres"), "-D", str(data_dir), "-k", str(socket_dir),
            "-p", str(PORT)] + [a for s in SETTINGS for a in ("-c", s)]  # fmt: skip
    try:
        process = scratch.start(argv, work=work, log_file=log_file)
    except OSError as exc:
        raise VerifyUnavailable(
            "cannot verify: starting the throwaway PostgreSQL server failed: "
            f"{exc.strerror or exc}",
            vm=vm,
        ) from None
    return Server(vm, bins, socket_dir, data_dir, log_file, process, scratch.transport(work, vm=vm))


@contextlib.contextmanager
def server(work: Path, *, vm: str, timeout: float) -> Iterator[Server]:
    """A throwaway cluster in ``work``, confined, accepting connections on its socket; stopped
    and its files removed when the block ends, whatever ended it."""
    bins = binaries(vm=vm)
    folders: list[Path] = []
    try:
        running = _prepare(work, bins, folders, vm=vm, timeout=timeout)
        try:
            _wait_ready(running, timeout=timeout)
            yield running
        finally:
            _stop(running)
    finally:
        for folder in folders:
            scratch.remove(folder)


# --------------------------------------------------------------------------------------------
# load


def _major(text: object) -> int | None:
    match = _MAJOR_RE.match(str(text)) if text is not None else None
    return int(match.group(1)) if match else None


def _header(source: RestoreSource) -> bytes:
    """The first bytes of the SQL (gzip or plain; b"" for zstd, which only the CLI reads)."""
    try:
        if source.compression == "gzip":
            with gzip.open(source.file, "rb") as handle:
                return handle.read(_HEADER_BYTES)
        if source.compression == "none":
            with open(source.file, "rb") as handle:
                return handle.read(_HEADER_BYTES)
    except (OSError, EOFError):
        return b""
    return b""


def dump_major(source: RestoreSource) -> int | None:
    """The newest PostgreSQL major that made the dump: its server's (manifest) and what the
    SQL's header names (server and pg_dumpall); None when nothing tells."""
    majors: list[int] = []
    section = (source.manifest or {}).get(source.section)
    if isinstance(section, dict):
        found = _major(section.get("server_version"))
        if found is not None:
            majors.append(found)
    majors += [int(m) for m in _HEADER_VERSION_RE.findall(_header(source))]
    return max(majors) if majors else None


def _check_header(server: Server, source: RestoreSource, *, vm: str) -> None:
    """What the coordinator cannot give this dump, seen in its header before anything loads:
    a newer server major; tablespaces (pg_dumpall's globals, before the first database, name
    folders of the guest that a throwaway server cannot make)."""
    tablespace = _TABLESPACE_RE.search(_header(source))
    if tablespace is not None:
        raise VerifyUnavailable(
            f"cannot verify {source.file.name}: it creates the tablespace "
            f"{tablespace.group(1).decode(errors='replace')} (a folder in the guest), which the "
            "throwaway server cannot make",
            vm=vm,
            hint="dump without tablespaces (pg_dumpall --no-tablespaces in [vms.X.dump] "
            "options) to verify",
        )
    major = dump_major(source)
    if major is not None and major > server.binaries.major:
        raise VerifyUnavailable(
            f"cannot verify {source.file.name}: it comes from PostgreSQL {major}, newer than "
            f"this coordinator's server binaries ({server.binaries.major}, "
            f"{server.binaries.bindir})",
            vm=vm,
            hint=f"install postgresql-{major} on the coordinator (no service needs to run)",
        )


def _unavailable_cause(errors: Sequence[str]) -> str | None:
    """An error that is the coordinator's, not the dump's: its message for the line."""
    for line in errors:
        if _NO_SPACE in line:
            return "out of disk space in verify_dir"
        locale = _LOCALE_RE.search(line)
        if locale:
            return (f"this coordinator lacks the locale {locale.group(1)!r} a database of the "
                    "dump needs (install it: locales, /etc/locale.gen)")  # fmt: skip
        if _EXTENSION_RE.search(line):
            return ("an extension the dump creates is not installed on this coordinator "
                    f"({clip(line, 200)}): install its package")  # fmt: skip
    return None


def _server_gone(server: Server, what: str, *, vm: str) -> VerifyUnavailable:
    last = server.last_log_line()
    full = " (out of disk space in verify_dir)" if _NO_SPACE in last else ""
    return VerifyUnavailable(
        f"the throwaway PostgreSQL server stopped during the {what}{full}: {last}",
        vm=vm,
        hint="the dump was not judged; verify again",
    )


def load(server: Server, source: RestoreSource, *, vm: str, timeout: float) -> float:
    """Load the dump as restore-dump does; the seconds it took."""
    _check_header(server, source, vm=vm)
    started = time.monotonic()
    try:
        loaded = kind.load(server.transport, server.client, source, timeout=timeout)
    except OSError as exc:  # reading the dump file
        raise VerifyUnavailable(
            f"cannot read {source.file}: {exc.strerror or exc}", vm=vm
        ) from None
    seconds = time.monotonic() - started
    real, _harmless = kind.load_errors(loaded.stderr)
    if not server.alive():
        raise _server_gone(server, "load", vm=vm)
    lines = [*real, client_error(loaded)]
    cause = _unavailable_cause(lines)
    if cause is not None:
        raise VerifyUnavailable(f"cannot verify {source.file.name}: {cause}", vm=vm)
    if loaded.timed_out:
        raise VerifyUnavailable(
            f"loading {source.file.name} into the throwaway server timed out after {timeout:g} s",
            vm=vm,
            hint="the dump was not judged; raise the timeout",
        )
    if real or not loaded.ok:
        more = f" (+{len(real) - 1} more errors)" if len(real) > 1 else ""
        first = real[0] if real else client_error(loaded)
        raise VerifyFailed(
            f"{source.file.name} does not load: {clip(first, 300)}{more}",
            vm=vm,
            hint="restore-dump of this dump would fail the same way; the dump is kept",
        )
    return seconds


# --------------------------------------------------------------------------------------------
# measure and check


def _query_failed(server: Server, exc: GuestError, what: str, *, vm: str) -> Exception:
    if not server.alive():
        return _server_gone(server, what, vm=vm)
    detail = exc.message.removeprefix("psql in the guest failed: ")
    if detail == "timed out":  # client_error's word for a call past its timeout
        return VerifyUnavailable(
            f"the {what} of the loaded dump did not finish in time",
            vm=vm,
            hint="the dump was not judged; raise the timeout",
        )
    cause = _unavailable_cause([detail])
    if cause is not None:
        return VerifyUnavailable(f"cannot verify: {cause}", vm=vm)
    return VerifyFailed(f"the {what} of the loaded dump failed: {detail}", vm=vm)


@dataclass(frozen=True)
class Unit:
    """One piece of the measurement: a table of a database, whole or the rows in the heap
    blocks ``[first, end)`` (None: from the table's start / to its end)."""

    database: str
    oid: int
    cost: int
    first: int | None = None
    end: int | None = None

    def condition(self) -> str:
        """The ``WHERE`` clause on ``t`` appended to the table's checksum query, as an SQL
        string literal (built from integers only)."""
        parts = []
        if self.first is not None:
            parts.append(f"t.ctid >= ''({self.first},0)''::tid")
        if self.end is not None:
            parts.append(f"t.ctid < ''({self.end},0)''::tid")
        return "'" + (" WHERE " + " AND ".join(parts) if parts else "") + "'"


def workers() -> int:
    """How many connections measure at once."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


# Each table of a database (the tables table_sums measures): its oid, kind, heap blocks and
# size with TOAST (the cost of reading it); and how many parallel workers one query may use.
_PLAN_SQL = f"""
SET search_path = pg_catalog;
SELECT json_build_array(c.oid, c.relkind,
         pg_relation_size(c.oid) / current_setting('block_size')::int, pg_table_size(c.oid),
         current_setting('max_parallel_workers_per_gather')::int)::text
{kind.SUM_FROM}{kind.SUM_WHERE} ORDER BY n.nspname, c.relname;
"""  # fmt: skip


def _ranges(database: str, oid: int, blocks: int, cost: int, pieces: int) -> list[Unit]:
    """``pieces`` ranges of the heap's blocks, the first open at its start and the last open
    at its end: every row is in exactly one, whatever the heap holds (the boundaries only
    balance the work)."""
    pieces = max(1, min(pieces, blocks))
    if pieces == 1:
        return [Unit(database, oid, cost)]
    bounds = [None, *(blocks * i // pieces for i in range(1, pieces)), None]
    return [Unit(database, oid, cost // pieces, bounds[i], bounds[i + 1]) for i in range(pieces)]


def plan(server: Server, databases: Sequence[str], *, count: int, timeout: float) -> list[Unit]:
    """The measurement's pieces for ``count`` connections: every table, whole; a big ordinary
    table (more than :data:`SPLIT_BYTES` and than a share of about two pieces per connection)
    split into ranges of heap blocks only when the connections outnumber the processes
    PostgreSQL gives one query of a whole table by itself (a parallel sequential scan: the
    leader and ``max_parallel_workers_per_gather``), and only on PostgreSQL 14 or newer, which
    reads such a range by a TID range scan (older ones would read the whole table each time).
    A TID range scan is not parallel: on fewer connections, the ranges would be read by fewer
    processes than the whole table is (docs/benchmarks.md, "Verify", "PostgreSQL")."""
    tables: list[tuple[str, int, str, int, int]] = []
    gather = 0
    for database in databases:
        for line in server.client.query(server.transport, _PLAN_SQL, timeout=timeout,
                                        database=database):  # fmt: skip
            oid, relkind, blocks, cost, gather = json.loads(line)
            tables.append((database, int(oid), str(relkind), int(blocks), int(cost)))
    split = count > 1 + int(gather) and server.binaries.major >= TID_RANGE_MAJOR
    total = sum(t[4] for t in tables)
    piece = max(SPLIT_BYTES, -(-total // (2 * count)))
    units: list[Unit] = []
    for database, oid, relkind, blocks, cost in tables:
        if split and relkind == "r" and cost > piece:
            units += _ranges(database, oid, blocks, cost, -(-cost // piece))
        else:
            units.append(Unit(database, oid, cost))
    return units


def _share(units: Sequence[Unit], count: int) -> list[list[Unit]]:
    """The units dealt to ``count`` connections, the biggest first, each to the least loaded
    (empty shares dropped)."""
    shares: list[list[Unit]] = [[] for _ in range(count)]
    loads = [0] * count
    for unit in sorted(units, key=lambda u: u.cost, reverse=True):
        least = loads.index(min(loads))
        shares[least].append(unit)
        loads[least] += unit.cost + 1
    return [s for s in shares if s]


def _sum_units(
    server: Server, units: Sequence[Unit], *, timeout: float
) -> list[tuple[str, int, int]]:
    """One connection's work: per database, one psql call that writes each unit's checksum
    query from kind.sum_statement and runs it (``\\gexec``); ``(table, rows, sum)`` per unit."""
    found: list[tuple[str, int, int]] = []
    for database in dict.fromkeys(u.database for u in units):
        mine = [u for u in units if u.database == database]
        values = ", ".join(f"({u.oid}::oid, {i}, {u.condition()})" for i, u in enumerate(mine))
        sql = (f"{kind.SUM_SETTINGS}SELECT {kind.sum_statement('u.cond')}{kind.SUM_FROM}"
               f"  JOIN (VALUES {values}) u(oid, ord, cond) ON u.oid = c.oid\n"
               f"{kind.SUM_WHERE} ORDER BY u.ord\n\\gexec\n")  # fmt: skip
        for line in server.client.query(server.transport, sql, timeout=timeout, database=database):
            schema_name, table, rows, checksum = json.loads(line)
            found.append((f"{database}.{schema_name}.{table}", int(rows), int(checksum)))
    return found


def _measure_units(
    server: Server, shares: Sequence[Sequence[Unit]], *, timeout: float
) -> list[tuple[str, int, int]]:
    """Every share on a connection of its own (a thread waiting for its psql: the process's
    ``--pdeathsig`` follows the thread that started it). When one fails or the caller is
    interrupted, the others are not waited for: stopping the server ends them."""
    if len(shares) <= 1:
        return [f for share in shares for f in _sum_units(server, share, timeout=timeout)]
    pool = concurrent.futures.ThreadPoolExecutor(len(shares), thread_name_prefix="pg-measure")
    try:
        futures = [pool.submit(_sum_units, server, share, timeout=timeout) for share in shares]
        found = [f for future in futures for f in future.result()]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return found


def measure(
    server: Server, databases: Sequence[str], *, vm: str, timeout: float
) -> dict[str, TableSum]:
    """:func:`~snapcoord.hooks.databases.postgresql.table_sums` on the loaded cluster, on
    :func:`workers` connections at once: the tables, and ranges of the big ones, dealt to
    them; counts and sums are additive, so a table's pieces add up to its one-pass figures
    (the same SQL, :func:`~snapcoord.hooks.databases.postgresql.sum_statement`, with a
    ``WHERE`` on ``ctid``). A database of ``databases`` that the load did not create fails
    the verify."""
    try:
        present = set(_databases(server, timeout=timeout))
    except GuestError as exc:
        raise _query_failed(server, exc, "measurement", vm=vm) from None
    missing = [d for d in databases if d not in present]
    if missing:
        raise VerifyFailed(
            f"the database {missing[0]!r} is missing after loading the dump",
            vm=vm,
            hint="the dump does not create every database recorded when it was taken",
        )
    count = workers()
    try:
        units = plan(server, databases, count=count, timeout=timeout)
        found = _measure_units(server, _share(units, count), timeout=timeout)
    except GuestError as exc:
        raise _query_failed(server, exc, "measurement", vm=vm) from None
    totals: dict[str, tuple[int, int]] = {}
    for table, rows, checksum in found:
        before = totals.get(table, (0, 0))
        totals[table] = (before[0] + rows, before[1] + checksum)
    return {t: TableSum(rows, str(checksum)) for t, (rows, checksum) in sorted(totals.items())}


def _databases(server: Server, *, timeout: float) -> list[str]:
    return server.client.query(
        server.transport,
        "SELECT datname FROM pg_catalog.pg_database WHERE datallowconn ORDER BY datname;",
        timeout=timeout,
    )


# In each database: its catalog answers, and no index is left invalid (a CREATE INDEX that
# failed half-way); one line per invalid index.
_CHECK_SQL = """
SET search_path = pg_catalog;
SELECT count(*) >= 0 FROM pg_class;
SELECT 'invalid index ' || indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid;
"""


def check(server: Server, *, vm: str, timeout: float) -> None:
    """Connect to every database of the loaded cluster and query it."""
    try:
        names = _databases(server, timeout=timeout)
    except GuestError as exc:
        raise _query_failed(server, exc, "check", vm=vm) from None
    for name in names:
        try:
            lines = server.client.query(server.transport, _CHECK_SQL, timeout=timeout,
                                        database=name)  # fmt: skip
        except GuestError as exc:
            raise _query_failed(server, exc, f"check of database {name!r}", vm=vm) from None
        problems = [ln for ln in lines if ln != "t"]
        if problems:
            raise VerifyFailed(
                f"the check of database {name!r} found an {problems[0]}", vm=vm,
                hint="the dump loaded with errors psql did not report",
            )  # fmt: skip

"""A parallel, consistent logical dump of MySQL/MariaDB, and its parallel load.

Several ``mysqldump --single-transaction`` sessions dump disjoint sets of tables at once, all
from one consistent view (no mydumper: Debian 12's 0.10.1 cannot stream, and the parts must
stream off the guest, never to its disk):

1. a control session (:class:`LockSession`: a ``mysql`` client fed SQL on stdin, credentials in
   the option file on stdin, killed by the guest's ``timeout`` at the latest) counts the base
   tables, and N part sessions (N = threads, at most one per table) and one objects session
   start, each a ``run_streaming`` in a thread of its own. Each waits in the guest for its
   option file (:class:`Gate`) and says so (:data:`dumpfile.READY`); the lock is taken once
   all do, so their SSH sessions and login shells are set up before it, not while it blocks
   every write;
2. the control session takes ``FLUSH TABLES WITH READ LOCK``, bounded by
   ``lock_wait_timeout`` as the pause mode's ftwrl is; while it holds the lock, it lists the
   dumped databases' tables, splits them by size (information_schema data + index length) into
   the N parts and hands each waiting session its option file: mysqldump starts;
3. the control session holds the lock until every part has ended, then ``UNLOCK TABLES``.
   Nothing commits while the parts run, so every session sees the same data.

Why not only until every part has opened its snapshot (a lock of well under a second): the
server cannot tell this dump's sessions from another session of the same user. A connection
of the dump's user, opened after the lock, with a REPEATABLE READ transaction (InnoDB's default)
looks like a part in information_schema.INNODB_TRX, and counting it would end the lock before a
part had its snapshot: an inconsistent dump. Until the parts can be told apart exactly, writes
wait for the whole parallel dump (in stop mode the applications are stopped anyway).

Each part is a complete mysqldump output with its own ``-- Dump completed`` line, checked like
a single-stream dump (:func:`dumpfile.stream_file`). The table names reach mysqldump through
the option file on stdin (``ignore-table=`` lines of a ``[mysqldump]`` group), never argv: a
name can never become an option, and no command line grows with the number of tables.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from snapcoord import store
from snapcoord.errors import SnapcoordError
from snapcoord.guest import Transport
from snapcoord.hooks.databases import mysql
from snapcoord.hooks.databases.dumpfile import (
    SUFFIXES,
    Counter,
    DumpFailed,
    DumpPlan,
    DumpResult,
    RestoreSource,
    Stopped,
    Streamed,
    stream_file,
)
from snapcoord.hooks.databases.pause import LockLost, LockSession
from snapcoord.settings import DumpConfig, GuestConfig
from snapcoord.shell import Completed
from snapcoord.store import RunDir

#: mysqldump options of a tables part (after the user's: they win), and of the objects part.
#: ``--skip-add-locks``: the parts load at once, and a ``LOCK TABLES t WRITE`` around one part's
#: INSERTs fails them when another part re-creates a table that t's foreign keys name (MariaDB
#: locks those too: "Table ... was not locked with LOCK TABLES")
TABLE_PART_OPTIONS = (
    "--single-transaction", "--skip-lock-tables", "--skip-add-locks", "--skip-routines",
    "--skip-events", "--triggers",
)  # fmt: skip
OBJECTS_PART_OPTIONS = (
    "--single-transaction", "--skip-lock-tables", "--no-data", "--routines", "--events",
    "--skip-triggers",
)  # fmt: skip
#: seconds between two looks at the parts (ready, ended) while they start and run
POLL = 0.15


def part_name(index: int, compression: str) -> str:
    return f"{mysql.FORMAT.stem}.part{index:02d}{SUFFIXES[compression]}"


def objects_name(compression: str) -> str:
    return f"{mysql.FORMAT.stem}.objects{SUFFIXES[compression]}"


def split(tables: Sequence[tuple[str, int]], parts: int) -> list[list[str]]:
    """``tables`` ("db.table", bytes) bin-packed into at most ``parts`` lists of similar size:
    the largest first, each into the lightest list so far. Never an empty list, except one when
    there is no table at all."""
    count = max(1, min(parts, len(tables)))
    bins: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for name, size in sorted(tables, key=lambda t: (-t[1], t[0])):
        lightest = loads.index(min(loads))
        bins[lightest].append(name)
        loads[lightest] += max(size, 1)
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class Table:
    db: str
    name: str
    base: bool  # a base table (else a view)
    size: int

    @property
    def full(self) -> str:
        return f"{self.db}.{self.name}"


def list_tables(session: LockSession, databases: Sequence[str], *, timeout: float) -> list[Table]:
    """Every table and view of ``databases``, with its size; run while the lock is held, so
    the list is the one every part sees."""
    if not databases:
        return []
    names = ", ".join(mysql._sql_str(d) for d in databases)
    rows = session.execute(
        "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_TYPE = 'BASE TABLE',"  # noqa: S608 (quoted)
        " COALESCE(DATA_LENGTH, 0) + COALESCE(INDEX_LENGTH, 0) FROM information_schema.TABLES"
        f" WHERE TABLE_SCHEMA IN ({names}) ORDER BY TABLE_SCHEMA, TABLE_NAME",
        timeout=timeout,
    )
    found = []
    for row in rows:
        if len(row) == 4:
            db, name = mysql._unescape(row[0]), mysql._unescape(row[1])
            found.append(Table(db, name, row[2] == "1", int(row[3]) if row[3].isdigit() else 0))
    return found


def part_option_file(client: mysql.Client, ignored: Sequence[str]) -> bytes:
    """The client's option file plus a ``[mysqldump]`` group that ignores ``ignored``."""
    lines = [f"ignore-table={mysql._option_value(name)}" for name in ignored]
    return client.option_file() + ("[mysqldump]\n" + "\n".join(lines) + "\n").encode()


@dataclass
class Part:
    file: str
    role: str  # tables | objects
    tables: list[str]  # the base tables it dumps ("db.table")
    ignored: list[str]  # everything else: mysqldump's ignore-table
    streamed: Streamed | None = None
    error: BaseException | None = None
    done: threading.Event | None = None
    ready: threading.Event | None = None  # its guest script waits for its option file

    @property
    def ok(self) -> bool:
        return self.streamed is not None and self.streamed.problem is None

    @property
    def problem(self) -> str | None:
        if self.error is not None:
            return str(getattr(self.error, "message", self.error))
        return self.streamed.problem if self.streamed is not None else "did not run"


def plan_parts(tables: Sequence[Table], threads: int, compression: str) -> list[Part]:
    """``threads`` table parts (the sessions already started; one without tables, if some
    were dropped since they were counted, dumps none) and the objects part."""
    base = [t for t in tables if t.base]
    everything = [t.full for t in tables]
    bins = split([(t.full, t.size) for t in base], threads)
    bins += [[] for _ in range(threads - len(bins))]
    parts = []
    for index, chosen in enumerate(bins, 1):
        keep = set(chosen)
        parts.append(Part(part_name(index, compression), "tables", chosen,
                          [n for n in everything if n not in keep]))  # fmt: skip
    parts.append(Part(objects_name(compression), "objects", [], [t.full for t in base]))
    return parts


class Gate(io.RawIOBase):
    """The stdin of a part started before the lock: a read waits until :meth:`open` hands it
    the part's option file (:func:`mysql.deferred_stdin`), or :meth:`end` ends it unused."""

    def __init__(self) -> None:
        super().__init__()
        self._given = threading.Event()
        self._data = b""

    def readable(self) -> bool:
        return True

    def open(self, data: bytes) -> None:
        if not self._given.is_set():
            self._data = data
            self._given.set()

    def end(self) -> None:
        """No more to give: a waiting read returns what was given (nothing: end of input)."""
        self._given.set()

    def readinto(self, buffer: Any) -> int:
        self._given.wait()
        size = min(len(buffer), len(self._data))
        buffer[:size] = self._data[:size]
        self._data = self._data[size:]
        return size


class ParallelDump:
    """One parallel dump into a run folder: :meth:`run` returns the :class:`DumpResult` or
    raises :class:`DumpFailed` after the folder was renamed ``.failed``."""

    def __init__(
        self,
        transport: Transport,
        *,
        vm: str,
        guest: GuestConfig,
        options: DumpConfig,
        run_dir: RunDir,
        plan: DumpPlan,
        compress_here: bool,
        counts: Callable[[], dict[str, Any]],
    ) -> None:
        self.transport = transport
        self.vm = vm
        self.guest = guest
        self.options = options
        self.run_dir = run_dir
        self.plan = plan
        self.compress_here = compress_here
        self.counts = counts
        self.client = mysql.Client.from_config(options, guest, vm=vm)
        self.wait = max(1, min(10, int(guest.pause_timeout / 3)))  # mysql_pause.lock_wait
        self.stop = threading.Event()
        self.parts: list[Part] = []
        self.lock: dict[str, Any] = {}
        self.locking = False  # the read lock was asked for (and is released by now)

    # -- the user's options, then ours (later options win), then the database selection
    def _argv(self, extra: Sequence[str]) -> list[str]:
        own = mysql.dump_options_of(self.options)
        args = list(self.plan.argv)
        return [*args[: len(own)], *extra, *args[len(own) :]]

    def _databases(self, session: LockSession) -> list[str]:
        if not self.plan.all_databases:
            return list(self.plan.databases)
        rows = session.execute(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY SCHEMA_NAME",
            timeout=self.guest.command_timeout,
        )
        return [mysql._unescape(r[0]) for r in rows if r and r[0] not in mysql.NOT_DUMPED]

    def _start(self, part: Part, gate: Gate) -> None:
        """Start ``part``'s session; its mysqldump runs once ``gate`` has its option file."""
        extra = TABLE_PART_OPTIONS if part.role == "tables" else OBJECTS_PART_OPTIONS
        mode = (
            "none"
            if self.compress_here or self.plan.compression == "none"
            else (self.plan.compression)
        )
        argv = self.client.deferred_argv(mode, "mysqldump", self._argv(extra))
        part.done, part.ready = threading.Event(), threading.Event()

        def consume(_chunk: bytes) -> None:
            if self.stop.is_set():
                raise Stopped("stopped: another part of the dump failed")

        def work() -> None:
            try:
                part.streamed = stream_file(
                    self.transport, vm=self.vm, fmt=mysql.FORMAT, argv=argv, stdin=b"",
                    source=cast(BinaryIO, gate), sudo=self.client.sudo,
                    timeout=self.guest.dump_timeout, run_dir=self.run_dir, name=part.file,
                    compression=self.plan.compression, compress_here=self.compress_here,
                    consume=consume, ready=part.ready,
                )  # fmt: skip
            except BaseException as exc:  # handed to run()
                part.error = exc
            finally:
                assert part.done is not None
                part.done.set()

        threading.Thread(target=work, name=f"snapcoord-{part.file}", daemon=True).start()

    def _failed_part(self) -> Part | None:
        for part in self.parts:
            if part.done is not None and part.done.is_set() and not part.ok:
                return part
        return None

    def _await_ready(self) -> None:
        """Until every part's guest script waits for its option file (its SSH session and
        login shell are set up), bounded by command_timeout; a part that ended instead failed.
        Nothing is locked yet."""
        deadline = time.monotonic() + self.guest.command_timeout
        for part in self.parts:
            assert part.ready is not None and part.done is not None
            while not part.ready.wait(POLL):
                if part.done.is_set():
                    raise _PartFailed(part)
                if time.monotonic() > deadline:
                    raise DumpFailed(
                        f"{part.file}: its session in the guest did not start within "
                        f"{self.guest.command_timeout:g} s",
                        vm=self.vm,
                        hint="raise [vms.X.guest] command_timeout or set [vms.X.dump] threads = 1",
                    )

    def _await_parts(self) -> None:
        """Until every part has ended, the read lock held all along; a failing part ends the
        wait. (Not until their snapshots are open: the server cannot tell this dump's sessions
        from another session of the same user, see the module docstring.)"""
        while True:
            failed = self._failed_part()
            if failed is not None:
                raise _PartFailed(failed)
            if all(p.done is not None and p.done.is_set() for p in self.parts):
                self.lock["until"] = "every part ended"
                return
            time.sleep(POLL)

    def _sessions(self, session: LockSession) -> int:
        """How many table parts to start: ``threads``, at most one per base table (counted
        before the lock; the split under it fills exactly these)."""
        databases = self._databases(session)
        if not databases:
            return 1
        names = ", ".join(mysql._sql_str(d) for d in databases)
        rows = session.execute(
            "SELECT COUNT(*) FROM information_schema.TABLES"  # noqa: S608 (quoted)
            f" WHERE TABLE_SCHEMA IN ({names}) AND TABLE_TYPE = 'BASE TABLE'",
            timeout=self.guest.command_timeout,
        )
        counted = rows[0][0] if rows and rows[0] else ""
        return max(1, min(self.plan.threads, int(counted) if counted.isdigit() else 1))

    def _locked_start(self) -> None:
        """Start every part (waiting for its option file), take the read lock, list and split
        the tables, hand the parts their option files, wait for them to end, release the lock.
        The lock session always ends here, and so does every part's wait."""
        session = LockSession(
            self.transport,
            ["mysql", *self.client.session_args("--batch", "--unbuffered", "--skip-reconnect",
                                                "--skip-column-names")],
            vm=self.vm,
            sudo=self.client.sudo,
            limit=self.guest.command_timeout + self.guest.dump_timeout + 2 * self.wait + 30,
            option_file=self.client.option_file(),
        )  # fmt: skip
        timeout = self.guest.command_timeout
        gates: list[Gate] = []
        session.start()
        try:
            try:
                session.execute("SELECT CONNECTION_ID()", timeout=timeout)
            except LockLost as exc:
                raise DumpFailed(f"cannot open the lock session: {exc.message}",
                                 vm=self.vm) from None  # fmt: skip
            session.execute(f"SET SESSION lock_wait_timeout = {self.wait}", timeout=timeout)
            sessions = self._sessions(session)
            self.parts = plan_parts([], sessions, self.plan.compression)  # names only, yet
            for part in self.parts:
                gates.append(Gate())
                self._start(part, gates[-1])
            self._await_ready()
            self.locking = True
            for statement in mysql.PAUSE_METHODS["ftwrl"]:
                session.execute(statement, timeout=self.wait + 5)
            held = time.monotonic()
            databases = self._databases(session)
            tables = list_tables(session, databases, timeout=timeout)
            planned = plan_parts(tables, sessions, self.plan.compression)
            for part, plan, gate in zip(self.parts, planned, gates, strict=True):
                part.tables, part.ignored = plan.tables, plan.ignored
                gate.open(mysql.deferred_stdin(part_option_file(self.client, part.ignored)))
            self._await_parts()
            session.execute("UNLOCK TABLES", timeout=timeout)
            self.lock["held_seconds"] = round(time.monotonic() - held, 3)
        except LockLost as exc:
            raise DumpFailed(
                f"the read lock for a consistent parallel dump failed: {exc.message}",
                vm=self.vm,
                hint="long statements block FLUSH TABLES WITH READ LOCK; run again, or set "
                "[vms.X.dump] threads = 1",
            ) from None
        finally:
            for gate in gates:
                gate.end()  # a part not handed its option file ends (exit 96)
            session.close()  # ending the session releases its lock, whatever happened

    def run(self) -> DumpResult:
        started_iso = store.now_iso()
        started = time.monotonic()
        counter = Counter(self.counts)
        problem: str | None = None
        advice: str | None = None  # the failure's own hint, carried into the run's
        try:
            self._locked_start()
        except _PartFailed as exc:
            problem = f"{exc.part.file}: {exc.part.problem}"
        except SnapcoordError as exc:  # DumpFailed, GuestError, a table name no file can hold
            problem, advice = exc.message, exc.hint
        except BaseException as exc:  # interrupted: no part outlives the run, which failed
            self.stop.set()
            self._join()
            if self.run_dir.state == "partial":
                self.run_dir.fail(f"mysqldump: interrupted ({type(exc).__name__})")
            raise
        if problem is not None:
            self.stop.set()
        self._join()
        counted = counter.join()
        seconds = time.monotonic() - started
        if problem is None:
            failed = next((p for p in self.parts if not p.ok), None)
            if failed is not None:
                problem = f"{failed.file}: {failed.problem}"
        if problem is None and "error" in counted:
            error = counted["error"]
            problem = f"counting rows failed: {getattr(error, 'message', error)}"
        sql_bytes = sum(p.streamed.inspector.sql_bytes for p in self.parts if p.streamed)
        sums: dict[str, Any] = {
            k: counted[k] for k in ("checksums", "checksum_method") if k in counted
        }
        exits = [code for code in (_exit(p) for p in self.parts) if code is not None]
        record = {
            "started": started_iso,
            "finished": store.now_iso(),
            "seconds": round(seconds, 3),
            "format": "parallel",
            "threads": self.plan.threads,
            "parts": [{"file": p.file, "role": p.role, "tables": p.tables} for p in self.parts],
            "compression": self.plan.compression,
            "compressed_on": "coordinator" if self.compress_here else "guest",
            "options": list(self.plan.argv),
            "lock": self.lock,
            "server_version": counted.get("version", self.plan.server_version),
            "databases": counted.get("databases", list(self.plan.databases)),
            "tables": counted.get("rows", {}),
            **sums,
            "sql_bytes": sql_bytes,
            "mysqldump_exit": max(exits) if exits else None,
            "valid": problem is None,
        }
        self.run_dir.sections[mysql.SECTION] = record
        if problem is not None:
            for part in self.parts:
                if part.streamed is not None and not part.streamed.sink.closed:
                    part.streamed.sink.keep_as(f"{part.file}.incomplete")
            failed_dir = self.run_dir.fail(f"mysqldump: {problem}")
            lock = "the lock was released" if self.locking else "nothing was locked"
            raise DumpFailed(
                f"parallel mysqldump failed: {problem}",
                vm=self.vm,
                hint=f"nothing valid was stored; {lock}; what arrived is kept in {failed_dir}"
                + (f"; {advice}" if advice else ""),
                failed_dir=failed_dir,
            )
        entries = [p.streamed.entry for p in self.parts if p.streamed is not None]
        objects = self.parts[-1].file
        return DumpResult(
            run_dir=self.run_dir,
            file=objects,
            sha256=str(self.run_dir.files[objects]["sha256"]),
            size=sum(int(e["size"]) for e in entries),
            sql_bytes=sql_bytes,
            rows=sum(record["tables"].values()),
            tables=len(record["tables"]),
            seconds=seconds,
            compression=self.plan.compression,
            databases=list(record["databases"]),
            parts=[p.file for p in self.parts],
        )

    def _join(self) -> None:
        for part in self.parts:
            if part.done is not None:
                part.done.wait()


class _PartFailed(Exception):
    def __init__(self, part: Part) -> None:
        super().__init__(part.file)
        self.part = part


def _exit(part: Part) -> int | None:
    from snapcoord.hooks.databases.dumpfile import _exit_of

    return _exit_of(part.streamed.result) if part.streamed is not None else None


# --------------------------------------------------------------------------------------------
# Loading a parallel dump


def load(
    transport: Transport,
    client: mysql.Client,
    source: RestoreSource,
    *,
    timeout: float,
    charset: str = mysql.CLIENT_CHARSET,
) -> Completed:
    """The table parts at once (one ``mysql`` client each, at most MAX_DUMP_THREADS), then the
    objects part; the first failure's result, else the objects part's."""
    from snapcoord import schema

    tables = [p for p in source.parts if p.role == "tables"]
    objects = [p for p in source.parts if p.role == "objects"]
    results: list[Completed | None] = [None] * len(tables)
    errors: list[BaseException | None] = [None] * len(tables)
    pending = list(range(len(tables)))
    guard = threading.Lock()

    def worker() -> None:
        while True:
            with guard:
                if not pending:
                    return
                index = pending.pop(0)
            try:
                results[index] = mysql.load_file(
                    transport, client, tables[index].file, tables[index].compression,
                    timeout=timeout, charset=charset,
                )  # fmt: skip
            except BaseException as exc:  # raised below, in the caller's thread
                errors[index] = exc

    workers = [
        threading.Thread(target=worker, name="snapcoord-load", daemon=True)
        for _ in range(min(len(tables), schema.MAX_DUMP_THREADS))
    ]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    for result in results:
        if result is not None and not result.ok:
            return result
    last: Completed | None = None
    for part in objects:
        last = mysql.load_file(
            transport, client, part.file, part.compression, timeout=timeout, charset=charset
        )
        if not last.ok:
            return last
    assert last is not None
    return last

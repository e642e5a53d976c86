"""MySQL and MariaDB: the server in the guest, and its logical dump with ``mysqldump``.

The guest scripts find the server by its PID file (``my_print_defaults``, else the Debian paths)
and ask ``mysqladmin ping`` whether it answers. Every client call goes through the shared guest
pipeline (hooks/databases/dumpfile.py); credentials, when configured, travel in a 0600 option
file (``--defaults-extra-file``) sent on stdin, never in argv.

A dump counts as valid only if mysqldump exited 0, the SQL ends with mysqldump's
``-- Dump completed`` line, the gzip stream is intact (CRC checked while streaming), and the
sha256 of the file re-read from disk equals the sha256 of the received stream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapcoord import schema, store
from snapcoord.errors import GuestError, PreflightError
from snapcoord.guest import Transport
from snapcoord.hooks.databases import options as options_parser
from snapcoord.hooks.databases.dumpfile import (
    GUEST_SCRIPT,
    SPACE_FACTOR,
    ZSTD_PROBE,
    DumpFormat,
    DumpPlan,
    DumpResult,
    RestoreFailed,
    RestoreResult,
    RestoreSource,
    TableSum,
    checksums_comparable,
    client_error,
    compare_checksums,
    compare_rows,
    compress_where,
    dump_compression,
    read_parallel,
    read_verified,
    receive,
    required_tools,
    resolve_compression,
    zstd_found,
)
from snapcoord.hooks.databases.pause import PausePlan, WritePause
from snapcoord.secrets import Secret
from snapcoord.settings import DumpConfig, GuestConfig
from snapcoord.shell import Completed
from snapcoord.store import RunDir

NAME = "mysql"
SERVICES: tuple[str, ...] = ("mariadb", "mysql")
TOOL = "mysqladmin"
SECTION = "mysqldump"
FORMAT = DumpFormat(
    program="mysqldump",
    section=SECTION,
    stem="mysql",
    marker=re.compile(rb"\n-- Dump completed(?: on [^\n]*)?\n*$"),
    marker_text="'-- Dump completed' line",
)

# The server's PID file: the configured one (my_print_defaults), else Debian's default paths.
PROBE = r"""
f=$(my_print_defaults mysqld mariadbd 2>/dev/null | sed -n 's/^--pid-file=//p' | tail -n 1)
[ -n "$f" ] || f="/run/mysqld/mysqld.pid /var/run/mysqld/mysqld.pid"
for p in $f; do case $p in /*) [ -r "$p" ] && { echo "pidfile $p"; break; };; esac; done
"""
SHELL = r"""
db_pid() {  # sets $pid: from $PIDFILE (found in preflight) without forking, else look it up
  pid=
  if [ -n "${PIDFILE:-}" ] && [ -r "$PIDFILE" ]; then read -r pid < "$PIDFILE"; return; fi
  f=$(my_print_defaults mysqld mariadbd 2>/dev/null | sed -n 's/^--pid-file=//p' | tail -n 1)
  [ -n "$f" ] || f="/run/mysqld/mysqld.pid /var/run/mysqld/mysqld.pid"  # the configured one only
  for p in $f; do [ -r "$p" ] && { read -r pid < "$p"; return; }; done
}
db_alive() { mysqladmin ping >/dev/null 2>&1; }
"""

SYSTEM_SCHEMAS = frozenset({"mysql", "sys", "information_schema", "performance_schema"})
NOT_DUMPED = frozenset({"information_schema", "performance_schema", "sys"})
DUMP_NAMES = {c: FORMAT.file_name(c) for c in ("gzip", "zstd", "none")}
MARKER_RE = FORMAT.marker
# Options that would send the dump somewhere else, drop the completion marker, or put a
# password on the command line: blocked in every spelling mysqldump accepts (any unambiguous
# prefix, '_' for '-', behind --loose-/--skip-/--enable-..., in a cluster of short options;
# hooks/databases/options.py).
_BLOCKED = (
    "result-file", "tab", "compact", "xml", "password", "password1", "password2", "password3",
)  # fmt: skip
_BLOCKED_SHORT = {"r": "result-file", "T": "tab", "X": "xml", "p": "password"}
#: turned off (--skip-comments, --comments=0), mysqldump leaves out the completion comment
_NEGATABLE = "comments"
#: mysqldump's short options that take a value: the rest of their cluster is that value
_SHORT_WITH_VALUE = frozenset("hPSuw#")
# Options of mysqldump that also tell the mysql client where the server is.
_CONNECTION = ("--host=", "--port=", "--socket=", "--protocol=", "--ssl", "--default-auth=",
               "--plugin-dir=", "--defaults-group-suffix=", "--user=")  # fmt: skip
#: The character set of every ``mysql`` client session snapcoord opens (queries, lock
#: sessions): the SQL it sends and the output it reads are UTF-8. Without it the client takes
#: the guest's locale ("auto"), which is latin1 under ``C``/``POSIX`` (an SSH session without
#: LANG, sudo's reset environment): a non-ASCII name in a literal then matched nothing in
#: information_schema, and names read back as '?' or invalid UTF-8 named tables that do not
#: exist. Given on the command line, it wins over the guest's option files. mysqldump's own
#: default is utf8mb4 already.
CLIENT_CHARSET = "utf8mb4"


def dump_options_of(options: DumpConfig) -> list[str]:
    """``[vms.X.dump] options``, or mysqldump's defaults when it is not set."""
    return list(schema.DEFAULT_DUMP_OPTIONS[NAME] if options.options is None else options.options)


def owns(service: str) -> bool:
    return service in SERVICES or service.startswith(("mysql", "mariadb"))


# --------------------------------------------------------------------------------------------
# The client


def _option_value(value: str) -> str:
    """A value for a MySQL option file: double-quoted, with backslash escapes."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise PreflightError("the MySQL user or password contains a line break or NUL")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Client:
    """How to reach the guest's MySQL server: credentials and connection options."""

    vm: str
    sudo: bool
    user: str | None = None
    password: Secret | None = None
    connection: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, options: DumpConfig, guest: GuestConfig, *, vm: str) -> Client:
        dump_options = dump_options_of(options)
        return cls(
            vm=vm,
            sudo=guest.sudo,
            user=options.user,
            password=options.password,
            connection=tuple(o for o in dump_options if o.startswith(_CONNECTION)),
        )

    def option_file(self) -> bytes:
        """The [client] option file sent on stdin; empty when the guest's own config is used."""
        if self.user is None and self.password is None:
            return b""
        lines = ["[client]"]
        if self.user is not None:
            lines.append(f"user={_option_value(self.user)}")
        if self.password is not None:
            lines.append(f"password={_option_value(self.password.reveal())}")
        return ("\n".join(lines) + "\n").encode()

    def session_args(self, *extra: str) -> list[str]:
        """The ``mysql`` client's arguments for a session of snapcoord's SQL: the connection
        options, the UTF-8 character set (:data:`CLIENT_CHARSET`), then ``extra``."""
        return [*self.connection, f"--default-character-set={CLIENT_CHARSET}", *extra]

    def argv(
        self, mode: str, program: str, args: Sequence[str], *, option_file: bytes | None = None
    ) -> tuple[list[str], bytes]:
        """GUEST_SCRIPT's argv and the option file it reads first from stdin: the client's
        (:meth:`option_file`), or ``option_file`` (which then holds it and more)."""
        cnf = self.option_file() if option_file is None else option_file
        return ["sh", "-c", GUEST_SCRIPT, "sh", str(len(cnf)), mode, program, *args], cnf

    def deferred_argv(self, mode: str, program: str, args: Sequence[str]) -> list[str]:
        """GUEST_SCRIPT's argv for a command started before its option file is known: it
        waits for :func:`deferred_stdin` of it, its first input (end of input: exit 96)."""
        return ["sh", "-c", GUEST_SCRIPT, "sh", "-", mode, program, *args]

    def query(self, transport: Transport, sql: str, *, timeout: float) -> list[list[str]]:
        """Run SQL with the mysql client in the guest; rows of batch output (unescaped)."""
        argv, cnf = self.argv("plain", "mysql", self.session_args("--batch", "--skip-column-names"))
        result = transport.run(argv, sudo=self.sudo, timeout=timeout, stdin=cnf + sql.encode())
        if not result.ok:
            raise GuestError(
                f"mysql in the guest failed: {client_error(result)}",
                vm=self.vm,
                hint=_credentials_hint(self),
            )
        text = result.stdout.decode("utf-8", errors="replace")
        return [[_unescape(f) for f in line.split("\t")] for line in text.splitlines() if line]


def deferred_stdin(option_file: bytes) -> bytes:
    """What a :meth:`Client.deferred_argv` command reads first: the length line, the file."""
    return f"{len(option_file)}\n".encode() + option_file


def _unescape(field_text: str) -> str:
    if "\\" not in field_text:
        return field_text
    table = {"n": "\n", "t": "\t", "\\": "\\", "0": "\0"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), m.group(1)), field_text)


def _credentials_hint(client: Client) -> str:
    if client.user is None and client.password is None:
        return "snapcoord uses the guest's client config or socket auth (root via sudo = true); " \
            "or set [vms.X.mysqldump] user/password"  # fmt: skip
    return "check [vms.X.mysqldump] user and password"


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_str(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------
# Preflight


def _blocked(option: str) -> tuple[str, str] | None:
    """(what was written, the blocked option it stands for) when ``option`` is blocked."""
    if option.startswith("--"):
        read = options_parser.mysql_long(option)
        shown = option.partition("=")[0]
        hit = options_parser.abbreviates(read.name, _BLOCKED)
        if hit is not None:
            return shown, "--" + hit
        if _NEGATABLE.startswith(read.name) and read.negated:
            return shown, "--skip-" + _NEGATABLE
        return None
    cluster = options_parser.short_cluster(option, _BLOCKED_SHORT, _SHORT_WITH_VALUE)
    if cluster is not None:
        return cluster, "--" + _BLOCKED_SHORT[cluster[-1]]
    return None


def check_options(options: DumpConfig, *, vm: str) -> list[str]:
    """Validate ``[vms.X.mysqldump]`` beyond the schema; returns the mysqldump arguments."""
    args = dump_options_of(options)
    for option in args:
        if not option.startswith("-") or option in ("-", "--"):
            raise PreflightError(
                f"mysqldump option {option!r} must start with '-' and name an option", vm=vm
            )
        blocked = _blocked(option)
        if blocked is not None:
            shown, meaning = blocked
            what = repr(shown) if shown == meaning else f"{shown!r} ({meaning})"
            raise PreflightError(
                f"mysqldump option {what} cannot be used by snapcoord",
                vm=vm,
                hint="the dump must stream to stdout with its '-- Dump completed' comment; "
                "a password belongs in [vms.X.mysqldump] password",
            )
    databases = list(options.databases)
    for name in databases:
        if not schema.database_name_ok(name):  # the schema checks it too
            raise PreflightError(f"database name {name!r} is not supported", vm=vm)
    if databases:
        return [*args, "--databases", *databases]
    return [*args, "--all-databases"]


# The tools check: every tool named must be there; says whether zstd is (compression = "auto").
_TOOLS_CHECK = (
    r"""
for t; do command -v "$t" >/dev/null 2>&1 || { echo "$t not found" >&2; exit 127; }; done
echo "snapcoord-nproc $(nproc 2>/dev/null || echo 1)"
"""
    + ZSTD_PROBE
)
_NPROC = re.compile(rb"^snapcoord-nproc (\d+)$", re.MULTILINE)
#: threads = "auto" dumps in one stream below this much data (information_schema data + index
#: length of the dumped databases): one stream is as fast there, and the readable single file
#: is kept
PARALLEL_MIN_BYTES = 256 << 20


def cores_of(probe_stdout: bytes) -> int:
    """The guest's cores, as the tools probe's ``nproc`` line says (1 when it says nothing)."""
    match = _NPROC.search(probe_stdout)
    return max(1, int(match.group(1))) if match else 1


def resolve_threads(
    configured: int | str, *, cores: int, data_bytes: int, guest: GuestConfig, vm: str
) -> tuple[int, str | None]:
    """(mysqldump sessions, the run's note when a configured number above 1 cannot be used).
    "auto": the guest's cores, at most MAX_DUMP_THREADS, and 1 below PARALLEL_MIN_BYTES."""
    if configured == "auto":
        wanted = 1 if data_bytes < PARALLEL_MIN_BYTES else min(cores, schema.MAX_DUMP_THREADS)
    else:
        wanted = int(configured)
    if wanted <= 1:
        return 1, None
    streams_over = guest.dump_transport if guest.transport == "agent" else guest.transport
    if streams_over == "agent":
        note = (
            None
            if configured == "auto"
            else f"dumped in one stream: threads = {configured} needs the dump to stream over "
            f"SSH, and the guest agent carries one stream at a time (set [vms.{vm}.guest] "
            "dump_transport = 'ssh')"
        )
        return 1, note
    return wanted, None


def preflight(
    transport: Transport,
    *,
    vm: str,
    guest: GuestConfig,
    options: DumpConfig,
    store_root: Path | None = None,
) -> DumpPlan:
    """Before anything stops: mysqldump present, server reachable with the configured
    credentials, databases known, size estimated (and, with ``store_root``, the store checked
    for that much free space)."""
    args = check_options(options, vm=vm)
    client = Client.from_config(options, guest, vm=vm)
    timeout = guest.command_timeout
    tools = ["mysqldump", "mysql", *required_tools(options.compression)]
    result = transport.run(
        ["sh", "-c", _TOOLS_CHECK, "sh", *tools], sudo=client.sudo, timeout=timeout
    )
    if not result.ok:
        raise PreflightError(
            f"cannot dump: {client_error(result)} in the guest",
            vm=vm,
            hint="install the MariaDB/MySQL client (and zstd for compression = zstd)",
        )
    compression, reason = resolve_compression(
        options.compression, zstd=zstd_found(result.stdout), vm=vm
    )
    cores = cores_of(result.stdout)
    rows = client.query(
        transport,
        "SELECT VERSION();"
        "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY SCHEMA_NAME;"
        "SELECT TABLE_SCHEMA, COALESCE(SUM(DATA_LENGTH + INDEX_LENGTH), 0)"
        " FROM information_schema.TABLES GROUP BY TABLE_SCHEMA;",
        timeout=timeout,
    )
    version = rows[0][0]
    sizes = {r[0]: int(r[1]) for r in rows[1:] if len(r) == 2}
    present = [r[0] for r in rows[1:] if len(r) == 1]
    wanted = list(options.databases)
    missing = [d for d in wanted if d not in present]
    if missing:
        raise PreflightError(
            f"database(s) {', '.join(missing)} not found on the guest's server",
            vm=vm,
            hint="fix [vms.X.mysqldump] databases",
        )
    databases = tuple(wanted) if wanted else tuple(d for d in present if d not in NOT_DUMPED)
    data_bytes = sum(sizes.get(d, 0) for d in databases)
    needed = int(data_bytes * SPACE_FACTOR[compression])
    if store_root is not None:
        store.check_writable(store_root, vm, needed)
    threads, threads_note = resolve_threads(
        options.threads, cores=cores, data_bytes=data_bytes, guest=guest, vm=vm
    )
    return DumpPlan(
        vm=vm,
        server_version=version,
        databases=databases,
        all_databases=not wanted,
        data_bytes=data_bytes,
        needed_bytes=needed,
        compression=compression,
        file_name=DUMP_NAMES[compression],
        argv=tuple(args),
        compression_reason=reason,
        threads=threads,
        threads_note=threads_note,
    )


# --------------------------------------------------------------------------------------------
# Row counts (exact, per base table)


def list_tables(client: Client, transport: Transport, databases: Iterable[str], *,
                timeout: float) -> list[tuple[str, str]]:  # fmt: skip
    names = [d for d in databases if d not in SYSTEM_SCHEMAS]
    if not names:
        return []
    rows = client.query(  # names are quoted with _sql_str
        transport,
        "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES"  # noqa: S608
        " WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA IN ("
        + ", ".join(_sql_str(n) for n in names)
        + ") ORDER BY TABLE_SCHEMA, TABLE_NAME;",
        timeout=timeout,
    )
    return [(r[0], r[1]) for r in rows]


def row_counts(
    client: Client, transport: Transport, databases: Iterable[str], *, timeout: float
) -> dict[str, int]:
    """``{"db.table": COUNT(*)}`` for every base table of the (non-system) ``databases``."""
    tables = list_tables(client, transport, databases, timeout=timeout)
    if not tables:
        return {}
    selects = [
        f"SELECT {_sql_str(db)}, {_sql_str(t)}, COUNT(*) FROM {quote_ident(db)}.{quote_ident(t)}"  # noqa: S608
        for db, t in tables
    ]
    counts: dict[str, int] = {}
    for start in range(0, len(selects), 500):
        rows = client.query(
            transport, " UNION ALL ".join(selects[start : start + 500]) + ";", timeout=timeout
        )
        counts.update({f"{r[0]}.{r[1]}": int(r[2]) for r in rows})
    return counts


# --------------------------------------------------------------------------------------------
# Row counts and checksums (what a verify compares)

#: The manifest's ``checksum_method`` for :func:`table_sums`; a change to the SQL below that
#: changes its values gets a new number.
CHECKSUM_METHOD = "mysql-crc32-sum/1"
#: Tables per client call (one UNION ALL of SELECTs); bounds the statement's length.
SUMS_PER_QUERY = 100
#: ``information_schema.COLUMNS.EXTRA`` of a generated column (MySQL 5.7+, MariaDB 10.2+;
#: MariaDB 10.1 says VIRTUAL / PERSISTENT).
_GENERATED = ("VIRTUAL GENERATED", "STORED GENERATED", "VIRTUAL", "PERSISTENT")


def _row_checksum(columns: Sequence[str]) -> str:
    """The SQL of one row's CRC32 over ``columns`` (pt-table-checksum's idea)."""
    parts = []
    for column in columns:
        ident = quote_ident(column)
        parts += [f"CAST({ident} AS BINARY)", f"ISNULL({ident})"]
    return f"CRC32(CONCAT_WS('#', {', '.join(parts)}))"


def table_sums(
    client: Client, transport: Transport, databases: Iterable[str], *, timeout: float
) -> dict[str, TableSum]:
    """``{"db.table": TableSum(rows, checksum)}`` for every base table of the (non-system)
    ``databases``: ``COUNT(*)`` and the sum over all rows of a CRC32 of the row, in one pass
    over each table. A sum does not depend on the order of the rows, so the guest's server at
    dump time and a throwaway server after loading the dump agree when the data are the same.

    What a row's CRC32 reads (method ``mysql-crc32-sum/1``): ``CONCAT_WS('#', c1, ISNULL(c1),
    c2, ISNULL(c2), ...)`` over the columns in ordinal order, each ``CAST(c AS BINARY)``:
    - text columns give their stored bytes in the column's own character set: no conversion
      to the connection's character set, and no "illegal mix of collations" between columns;
    - BLOB, BINARY, VARBINARY and BIT give their bytes as they are (no HEX: that would double
      what CRC32 reads and add nothing, since no character set conversion touches them);
    - numbers, DECIMAL, dates, ENUM/SET, JSON give the text the server prints for them, which
      is what mysqldump writes: FLOAT/DOUBLE as their shortest printed form, so the text a dump
      carries reloads into the same printed value (a raw binary form would flag mysqldump's
      FLOAT rounding as a difference on every run);
    - TIMESTAMP is printed in UTC (the session's ``time_zone`` is set to +00:00 as mysqldump
      does), so the guest's and the coordinator's time zones do not matter;
    - generated columns (VIRTUAL and STORED) are left out: a dump does not carry them, the
      server recomputes them from the other columns, which are summed;
    - ``ISNULL(c)`` tells NULL from an empty value (CONCAT_WS skips NULLs).
    A table without any other column has checksum None (its row count is still compared).

    Where it runs matters only through the server family's printing of values: MySQL and
    MariaDB print FLOAT/DOUBLE differently, so compare sums of one family only."""
    plans = sum_plans(client, transport, databases, timeout=timeout)
    selects = [plan.select() for plan in plans]
    sums: dict[str, TableSum] = {}
    for start in range(0, len(selects), SUMS_PER_QUERY):
        batch = " UNION ALL ".join(selects[start : start + SUMS_PER_QUERY])
        for db, table, count, checksum in client.query(
            transport, f"{SUMS_SESSION} {batch};", timeout=timeout
        ):
            sums[f"{db}.{table}"] = TableSum(int(count), None if checksum == "NULL" else checksum)
    return sums


#: what every table_sums query sets first: TIMESTAMP values printed in UTC, as mysqldump does
SUMS_SESSION = "SET time_zone = '+00:00';"
_INTEGER_TYPES = frozenset({"tinyint", "smallint", "mediumint", "int", "bigint"})


@dataclass(frozen=True)
class SumPlan:
    """One table's :func:`table_sums` query, and what a split of it into key ranges needs."""

    db: str
    table: str
    columns: tuple[str, ...]  # the summed columns, in ordinal order
    key: str | None  # the primary key's column when it is one integer column
    estimated_rows: int  # information_schema's estimate (InnoDB: approximate)

    @property
    def name(self) -> str:
        return f"{self.db}.{self.table}"

    def select(self, where: str = "") -> str:
        """``SELECT db, table, COUNT(*), <checksum>`` over the table (or the rows ``where``
        picks): sums and counts of disjoint ranges add up to the whole table's."""
        checksum = f"COALESCE(SUM({_row_checksum(self.columns)}), 0)" if self.columns else "NULL"
        return (
            f"SELECT {_sql_str(self.db)}, {_sql_str(self.table)}, COUNT(*), {checksum}"  # noqa: S608
            f" FROM {quote_ident(self.db)}.{quote_ident(self.table)}{where}"
        )


def sum_plans(
    client: Client, transport: Transport, databases: Iterable[str], *, timeout: float
) -> list[SumPlan]:
    """Every base table of the (non-system) ``databases`` with its summed columns."""
    names = [d for d in databases if d not in SYSTEM_SCHEMAS]
    if not names:
        return []
    listed = ", ".join(_sql_str(n) for n in names)  # names are quoted with _sql_str
    rows = client.query(
        transport,
        "SELECT c.TABLE_SCHEMA, c.TABLE_NAME, c.COLUMN_NAME, c.EXTRA, c.DATA_TYPE,"  # noqa: S608
        " c.COLUMN_KEY, COALESCE(t.TABLE_ROWS, 0)"
        " FROM information_schema.COLUMNS c JOIN information_schema.TABLES t"
        " ON t.TABLE_SCHEMA = c.TABLE_SCHEMA AND t.TABLE_NAME = c.TABLE_NAME"
        f" WHERE t.TABLE_TYPE = 'BASE TABLE' AND c.TABLE_SCHEMA IN ({listed})"
        " ORDER BY c.TABLE_SCHEMA, c.TABLE_NAME, c.ORDINAL_POSITION;",
        timeout=timeout,
    )
    columns: dict[tuple[str, str], list[str]] = {}
    keys: dict[tuple[str, str], list[tuple[str, str]]] = {}
    estimates: dict[tuple[str, str], int] = {}
    for db, table, column, extra, data_type, column_key, estimate in rows:
        summed = columns.setdefault((db, table), [])
        if extra.strip().upper() not in _GENERATED:
            summed.append(column)
        if column_key == "PRI":
            keys.setdefault((db, table), []).append((column, data_type.lower()))
        estimates[(db, table)] = int(estimate) if estimate.isdigit() else 0
    plans = []
    for (db, table), summed in columns.items():
        key = keys.get((db, table), [])
        single = key[0][0] if len(key) == 1 and key[0][1] in _INTEGER_TYPES else None
        plans.append(SumPlan(db, table, tuple(summed), single, estimates[(db, table)]))
    return plans


# --------------------------------------------------------------------------------------------
# Dump


def dump(
    transport: Transport,
    *,
    vm: str,
    guest: GuestConfig,
    options: DumpConfig,
    run_dir: RunDir,
    plan: DumpPlan | None = None,
    compress_on: str | None = None,
) -> DumpResult:
    """Stream the dump into ``run_dir`` and record it in the manifest (section ``mysqldump``).

    Raises :class:`DumpFailed` after the run folder was renamed ``.failed``. The caller commits
    ``run_dir`` when the run's other files are in."""
    args = list(plan.argv) if plan else check_options(options, vm=vm)
    compression = dump_compression(options.compression, plan)
    compress_here = compress_where(compression, compress_on)
    client = Client.from_config(options, guest, vm=vm)
    query_timeout = guest.command_timeout

    def counts() -> dict[str, object]:  # exact row counts and checksums, while nothing writes
        info = client.query(
            transport,
            "SELECT VERSION();"
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY SCHEMA_NAME;",
            timeout=query_timeout,
        )
        present = [r[0] for r in info[1:]]
        dbs = list(options.databases) or [d for d in present if d not in NOT_DUMPED]
        sums = table_sums(client, transport, dbs, timeout=guest.dump_timeout)
        return {
            "version": info[0][0],
            "databases": dbs,
            "rows": {name: s.rows for name, s in sums.items()},
            "checksums": {n: s.checksum for n, s in sums.items() if s.checksum is not None},
            "checksum_method": CHECKSUM_METHOD,
        }

    if plan is not None and plan.threads > 1:
        from snapcoord.hooks.databases.mysql_parallel import ParallelDump

        parallel = ParallelDump(transport, vm=vm, guest=guest, options=options, run_dir=run_dir,
                                plan=plan, compress_here=compress_here, counts=counts)  # fmt: skip
        return parallel.run()
    mode = "none" if compress_here or compression == "none" else compression
    argv, cnf = client.argv(mode, "mysqldump", args)
    return receive(
        transport,
        vm=vm,
        fmt=FORMAT,
        argv=argv,
        stdin=cnf,
        sudo=client.sudo,
        timeout=guest.dump_timeout,
        run_dir=run_dir,
        compression=compression,
        compress_here=compress_here,
        counts=counts,
        section={
            "options": args,
            "server_version": plan.server_version if plan else None,
            "databases": list(plan.databases) if plan else [],
        },
    )


# --------------------------------------------------------------------------------------------
# Restore

_CREATE_DB_RE = re.compile(rb"^CREATE DATABASE (?:/\*!32312 IF NOT EXISTS\*/ )?`((?:[^`]|``)+)`")


def _created_database(line: bytes) -> str | None:
    match = _CREATE_DB_RE.match(line)
    if match is None:
        return None
    return match.group(1).replace(b"``", b"`").decode("utf-8", errors="replace")


def prepare_restore(source: Path, *, vm: str) -> RestoreSource:
    """Verify a run folder (manifest checksums) or a dump file, and find what it would drop.

    A run folder, or a file inside one, is checked against its manifest's sha256; a bare file
    is checked for an intact compressed stream. Both must end with the completion marker."""
    parallel = read_parallel(source, FORMAT, _created_database, vm=vm)
    if parallel is not None:
        parallel.to_drop = [d for d in parallel.databases if d not in SYSTEM_SCHEMAS]
        return parallel
    file, compression, manifest, databases = read_verified(source, FORMAT, _created_database, vm=vm)
    to_drop = [d for d in databases if d not in SYSTEM_SCHEMAS]
    return RestoreSource(file, compression, manifest, databases, to_drop, SECTION)


def check_ready(transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig) -> None:
    Client.from_config(options, guest, vm=vm).query(
        transport, "SELECT 1;", timeout=guest.command_timeout
    )


def drop_databases(
    transport: Transport, client: Client, databases: Iterable[str], *, timeout: float
) -> None:
    names = [d for d in databases if d not in SYSTEM_SCHEMAS]
    if not names:
        return
    sql = "".join(f"DROP DATABASE IF EXISTS {quote_ident(d)};" for d in names)
    client.query(transport, sql, timeout=timeout)


_CHARSET_OPTION = "default-character-set"
_CHARSET_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")


def dump_charset(options: Sequence[str]) -> str:
    """The character set a dump's SQL is written in: the last ``--default-character-set`` of
    the mysqldump ``options`` it was taken with (any spelling my_getopt reads: an abbreviation,
    ``_`` for ``-``, ``--loose-``, the value as the next argument), else mysqldump's default,
    :data:`CLIENT_CHARSET`."""
    charset = CLIENT_CHARSET
    for index, option in enumerate(options):
        if not option.startswith("--"):
            continue
        read = options_parser.mysql_long(option)
        if (
            set(read.prefixes) <= {"loose"}
            and len(read.name) > len("default-")
            and _CHARSET_OPTION.startswith(read.name)
        ):
            value = read.value
            if value is None and index + 1 < len(options):
                value = options[index + 1]
            if value is not None and _CHARSET_NAME.fullmatch(value):
                charset = value
    return charset


def source_charset(source: RestoreSource) -> str:
    """:func:`dump_charset` of the options the manifest records for ``source`` (a bare file:
    mysqldump's default)."""
    section = (source.manifest or {}).get(SECTION)
    recorded = section.get("options") if isinstance(section, dict) else None
    if not isinstance(recorded, list):
        return CLIENT_CHARSET
    return dump_charset([o for o in recorded if isinstance(o, str)])


def load(
    transport: Transport, client: Client, source: RestoreSource, *, timeout: float
) -> Completed:
    """Stream the compressed file into ``mysql`` in the guest (decompressed there); a parallel
    dump's parts at once, then its objects part (hooks/databases/mysql_parallel.py). The client
    reads the SQL in the character set mysqldump wrote it in (:func:`source_charset`), not in
    the guest locale's."""
    charset = source_charset(source)
    if source.parts:
        from snapcoord.hooks.databases import mysql_parallel

        return mysql_parallel.load(transport, client, source, timeout=timeout, charset=charset)
    return load_file(
        transport, client, source.file, source.compression, timeout=timeout, charset=charset
    )


def load_file(
    transport: Transport,
    client: Client,
    path: Path,
    compression: str,
    *,
    timeout: float,
    charset: str = CLIENT_CHARSET,
) -> Completed:
    """One dump file into ``mysql`` in the guest, decompressed there, read in chunks, in the
    character set ``charset`` (the dump's)."""
    mode = {"gzip": "gunzip", "zstd": "unzstd", "none": "plain"}[compression]
    args = [*client.connection, f"--default-character-set={charset}", "--batch"]
    argv, cnf = client.argv(mode, "mysql", args)
    with open(path, "rb") as handle:
        return transport.run_streaming(
            argv, sudo=client.sudo, timeout=timeout, stdin=cnf, source=handle
        )


def restore(
    transport: Transport,
    *,
    vm: str,
    guest: GuestConfig,
    options: DumpConfig,
    source: Path | RestoreSource,
    dry_run: bool = False,
) -> RestoreResult:
    """Verify, drop every (non-system) database the dump contains, load, compare row counts
    and, where the manifest has comparable ones, every table's checksum (a parallel dump's
    always: its comparison says so when it cannot).

    A corrupted or truncated dump raises :class:`CorruptDump` before the database is touched.
    A load error, a row-count or a checksum mismatch raises :class:`RestoreFailed`."""
    prepared = source if isinstance(source, RestoreSource) else prepare_restore(source, vm=vm)
    result = RestoreResult(prepared.file, prepared.to_drop, dry_run)
    if dry_run:
        return result
    client = Client.from_config(options, guest, vm=vm)
    timeout = guest.dump_timeout
    started = time.monotonic()
    drop_databases(transport, client, prepared.to_drop, timeout=timeout)
    try:
        loaded = load(transport, client, prepared, timeout=timeout)
        problem = None if loaded.ok else client_error(loaded)
    except GuestError as exc:  # the connection broke while the dump streamed in
        problem = exc.message
    result.seconds = time.monotonic() - started
    if problem is not None:
        raise RestoreFailed(
            f"loading {prepared.file.name} failed: {problem}",
            vm=vm,
            hint=f"the databases {', '.join(prepared.to_drop)} may be incomplete: "
            "fix the cause and run restore-dump again",
        )
    expected = prepared.expected_rows
    actual: dict[str, int] = {}
    sums: dict[str, TableSum] = {}
    # every table's checksum too: a parallel dump's, and a single stream's that recorded them
    # (older single-stream manifests have row counts only, and stay counted as before)
    summed = bool(prepared.parts) or (
        expected is not None and checksums_comparable(prepared, CHECKSUM_METHOD)
    )
    if expected is not None:
        dbs = sorted({name.split(".", 1)[0] for name in expected} | set(prepared.to_drop))
        if summed:
            sums = table_sums(client, transport, dbs, timeout=timeout)
            actual = {name: s.rows for name, s in sums.items()}
        else:
            actual = row_counts(client, transport, dbs, timeout=timeout)
    compare_rows(result, expected, actual, vm=vm, unchecked=prepared.unchecked_reason)
    if summed:
        compare_checksums(result, prepared, sums, method=CHECKSUM_METHOD, vm=vm)
    return result


# --------------------------------------------------------------------------------------------
# Pausing writes (hooks/databases/mysql_pause.py)

#: method -> the statements that hold commits (each waits at most lock_wait_timeout), released
#: by RELEASE[method]
PAUSE_METHODS: dict[str, tuple[str, ...]] = {
    "backup_stage": (
        "BACKUP STAGE START",
        "BACKUP STAGE FLUSH",
        "BACKUP STAGE BLOCK_DDL",
        "BACKUP STAGE BLOCK_COMMIT",
    ),
    "ftwrl": ("FLUSH NO_WRITE_TO_BINLOG TABLES", "FLUSH TABLES WITH READ LOCK"),
}
RELEASE: dict[str, tuple[str, ...]] = {
    "backup_stage": ("BACKUP STAGE END",),
    "ftwrl": ("UNLOCK TABLES",),
}
#: the dump in pause mode runs while the application writes: one consistent InnoDB snapshot
ONLINE_DUMP_OPTIONS: tuple[str, ...] = ("--single-transaction",)


def check_pause(
    transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
) -> PausePlan:
    from snapcoord.hooks.databases import mysql_pause

    return mysql_pause.check_pause(transport, vm=vm, guest=guest, options=options)


def pause(
    transport: Transport,
    *,
    vm: str,
    guest: GuestConfig,
    options: DumpConfig,
    plan: PausePlan,
    run_id: str,
) -> WritePause:
    from snapcoord.hooks.databases import mysql_pause

    return mysql_pause.MySQLPause(
        transport, vm=vm, guest=guest, options=options, plan=plan, run_id=run_id
    )


def position(
    transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
) -> dict[str, str] | None:
    from snapcoord.hooks.databases import mysql_pause

    return mysql_pause.position(transport, vm=vm, guest=guest, options=options)


def prove_writes(
    transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig, run_id: str
) -> None:
    from snapcoord.hooks.databases import mysql_pause

    mysql_pause.prove_writes(transport, vm=vm, guest=guest, options=options, run_id=run_id)

"""PostgreSQL: the server in the guest, and its logical dump with ``pg_dumpall``.

The guest scripts find the cluster by its PID file (the probe asks postgresql-common's
``pg_lsclusters`` for the online cluster, preferring the one on port 5432, and takes its
``external_pid_file`` ``/run/postgresql/VERSION-CLUSTER.pid`` or its data directory's
``postmaster.pid``) and ask ``pg_isready`` on that cluster's port whether it answers. The port
is learned from the PID file's *name* (through ``pg_lsclusters``), so the watchdog and the
start check still ask the right cluster while the server is down and the file is gone.

Every client call (``pg_dumpall``, ``psql``) runs as the PostgreSQL OS user (``[vms.X.dump]
user``, default ``postgres``) through ``runuser`` inside the shared guest pipeline
(hooks/databases/dumpfile.py) and logs in by peer authentication over the server's socket: no
password exists anywhere, so ``password`` is refused, and so is ``databases`` (pg_dumpall dumps
roles, tablespaces and every database). ``runuser`` needs root in the guest (``[guest] sudo``).

A dump counts as valid only if pg_dumpall exited 0, the SQL ends with its "PostgreSQL database
cluster dump complete" comment, the compressed stream is intact, and the sha256 of the file
re-read from disk equals that of the received stream (the shared ``receive``).

Restore follows pg_dumpall's documentation: drop the databases the dump creates (never
``postgres``, ``template0``, ``template1``; ``DROP DATABASE ... WITH (FORCE)`` ends their
sessions), then run the script with ``psql`` as the superuser. The script issues ``CREATE ROLE``
(and ``CREATE TABLESPACE``) for every role the source cluster had, so on the same server those
fail with "already exists"; the documentation calls that harmless (the ``ALTER ROLE`` that
follows still sets the dumped attributes and password). Exactly those errors are tolerated and
reported as warnings; any other error fails the restore, and the row counts are compared.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    read_verified,
    receive,
    required_tools,
    resolve_compression,
    zstd_found,
)
from snapcoord.hooks.databases.pause import PausePlan, WritePause, refuse
from snapcoord.settings import DumpConfig, GuestConfig
from snapcoord.shell import Completed
from snapcoord.store import RunDir

NAME = "postgresql"
SERVICES: tuple[str, ...] = ("postgresql",)
TOOL = "pg_isready"
SECTION = "pg_dumpall"
FORMAT = DumpFormat(
    program="pg_dumpall",
    section=SECTION,
    stem="postgresql",
    marker=re.compile(rb"\n--\n-- PostgreSQL database cluster dump complete\n--\n*$"),
    marker_text="'PostgreSQL database cluster dump complete' comment",
)

# The online cluster's PID file: the one on port 5432 first (what psql reaches by default).
PROBE = r"""
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | awk '$4 ~ /^online/ { print ($3 == 5432 ? 0 : 1), $1, $2, $6 }' |
    sort -n | while read -r _ v c dir; do
      for p in "/run/postgresql/$v-$c.pid" "/var/run/postgresql/$v-$c.pid" "$dir/postmaster.pid"; do
        [ -r "$p" ] && { echo "pidfile $p"; exit 0; }
      done
    done
else
  for d in ${PGDATA:-} /var/lib/pgsql/data /var/lib/postgresql/data; do
    [ -r "$d/postmaster.pid" ] && { echo "pidfile $d/postmaster.pid"; break; }
  done
fi
"""
SHELL = r"""
pg_port() {  # sets $pgport once: the port of the cluster $PIDFILE names ('' = the default)
  [ -n "${pgport+set}" ] && return 0; pgport=  # own variable names: callers use n, p, s
  _pgf=${PIDFILE:-}; [ -n "$_pgf" ] || return 0
  if command -v pg_lsclusters >/dev/null 2>&1; then  # by name: works while the file is gone
    _pgn=${_pgf##*/}; _pgn=${_pgn%.pid}; _pgd=${_pgf%/postmaster.pid}
    pgport=$(pg_lsclusters -h 2>/dev/null | while read -r v c port _ _ dir _; do
      if [ "$_pgn" = "$v-$c" ] || [ "$_pgd" = "$dir" ]; then echo "$port"; break; fi; done)
  elif [ -r "$_pgf" ]; then  # postmaster.pid: line 4 is the port
    { read -r _; read -r _; read -r _; read -r pgport; } < "$_pgf"
  fi
}
db_pid() {  # sets $pid: the postmaster's, from $PIDFILE (found in preflight), else any cluster's
  pid=; pg_port
  if [ -n "${PIDFILE:-}" ] && [ -r "$PIDFILE" ]; then read -r pid < "$PIDFILE"; return; fi
  for _pgf in /run/postgresql/*.pid; do [ -r "$_pgf" ] && { read -r pid < "$_pgf"; return; }; done
}
db_alive() { pg_port; pg_isready -q ${pgport:+-p "$pgport"} >/dev/null 2>&1; }
"""

#: never dropped by a restore (the server needs them; pg_dumpall does not create them)
SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})
DUMP_NAMES = {c: FORMAT.file_name(c) for c in ("gzip", "zstd", "none")}
DEFAULT_USER = "postgres"
#: the oldest server whose databases a restore can drop (``DROP DATABASE ... WITH (FORCE)``)
RESTORE_MIN_VERSION = 130000
# pg_dumpall options that would send the dump elsewhere, leave out data or the completion
# comment, dump only part of the cluster, or ask for a password or another login; blocked in
# every spelling getopt_long accepts (any unambiguous prefix: --fil=, --user=;
# hooks/databases/options.py). --filter, --no-data, --no-schema and --statistics-only are
# PostgreSQL 17/18's.
_FORBIDDEN = (
    "file", "globals-only", "roles-only", "tablespaces-only", "schema-only", "data-only",
    "clean", "no-comments", "exclude-database", "binary-upgrade", "password", "username",
    "dbname", "help", "version", "filter", "no-data", "no-schema", "statistics-only",
)  # fmt: skip
#: pg_dumpall options whose whole name abbreviates a forbidden one (--roles-only,
#: --statistics-only): an exact match is that option
_ALLOWED_PREFIXES = ("role", "statistics")
#: options that also tell psql where the server is
_CONNECTION = ("--host=", "--port=")
_OS_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")  # fullmatch: "$" accepts "postgres\n"
#: psql's error lines that a restore onto the same server expects (pg_dumpall's documentation)
_HARMLESS = re.compile(r'ERROR:\s+(?:role|tablespace) "(?:[^"]|"")+" already exists$')
_ERROR_LINE = re.compile(r"\b(?:ERROR|FATAL|PANIC):\s")


def owns(service: str) -> bool:
    return service.startswith(("postgresql", "postgres"))


def _os_user(options: DumpConfig) -> str:
    return options.user or DEFAULT_USER


# --------------------------------------------------------------------------------------------
# The client


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _conninfo_dbname(name: str) -> str:
    """``--dbname=`` for psql: a connection string, so no name is taken as one."""
    return "--dbname=dbname='" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Client:
    """How the guest's PostgreSQL is reached: as ``os_user`` (peer authentication) through
    ``runuser``, with ``--host=``/``--port=`` from ``[vms.X.dump] options``.

    With ``bindir`` (``snapcoord verify``'s throwaway server on the coordinator) the programs
    are that folder's, run as whoever the transport runs them as (its confinement: nobody), not
    through ``runuser``; ``connection`` then names the server's socket folder and the role."""

    vm: str
    sudo: bool
    os_user: str = DEFAULT_USER
    connection: tuple[str, ...] = ()
    bindir: str | None = None

    @classmethod
    def from_config(cls, options: DumpConfig, guest: GuestConfig, *, vm: str) -> Client:
        args = _options_of(options)
        return cls(vm=vm, sudo=guest.sudo, os_user=_os_user(options),
                   connection=tuple(o for o in args if o.startswith(_CONNECTION)))  # fmt: skip

    def argv(self, mode: str, program: str, args: Sequence[str]) -> list[str]:
        """The guest pipeline running ``program`` as the OS user (no option file: NBYTES 0)."""
        if self.bindir is not None:
            return ["sh", "-c", GUEST_SCRIPT, "sh", "0", mode, f"{self.bindir}/{program}", *args]
        return ["sh", "-c", GUEST_SCRIPT, "sh", "0", mode,
                "runuser", "-u", self.os_user, "--", program, *args]  # fmt: skip

    def psql(self, mode: str, database: str, *extra: str) -> list[str]:
        return self.argv(
            mode, "psql", ["-X", "-q", _conninfo_dbname(database), *self.connection, *extra]
        )

    def query(
        self, transport: Transport, sql: str, *, timeout: float, database: str = "postgres"
    ) -> list[str]:
        """Run SQL (stopping at the first error) in ``database``; the unaligned output lines."""
        argv = self.psql("plain", database, "-A", "-t", "-v", "ON_ERROR_STOP=1")
        result = transport.run(argv, sudo=self.sudo, timeout=timeout, stdin=sql.encode())
        if not result.ok:
            raise GuestError(
                f"psql in the guest failed: {client_error(result)}",
                vm=self.vm,
                hint=f"snapcoord runs psql as the OS user {self.os_user!r} (peer "
                "authentication, [vms.X.dump] user) through runuser: root in the guest",
            )
        return [ln for ln in result.stdout.decode("utf-8", errors="replace").splitlines() if ln]

    def server(self, transport: Transport, *, timeout: float) -> dict[str, Any]:
        """Version, superuser flag and every connectable database with its size."""
        (line,) = self.query(
            transport,
            "SELECT json_build_object("
            "'version', current_setting('server_version'),"
            "'version_num', current_setting('server_version_num')::int,"
            "'superuser', (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),"
            "'databases', (SELECT json_object_agg(datname, pg_database_size(datname)"
            " ORDER BY datname) FROM pg_database WHERE datallowconn))::text;",
            timeout=timeout,
        )
        info: dict[str, Any] = json.loads(line)
        return info


# --------------------------------------------------------------------------------------------
# Preflight


def _options_of(options: DumpConfig) -> list[str]:
    default = schema.DEFAULT_DUMP_OPTIONS[NAME]
    return list(default if options.options is None else options.options)


def check_options(options: DumpConfig, *, vm: str) -> list[str]:
    """Validate ``[vms.X.dump]`` for PostgreSQL; returns the pg_dumpall arguments."""
    if options.password is not None:
        raise PreflightError(
            "[vms.X.dump] password cannot be used with PostgreSQL",
            vm=vm,
            hint="pg_dumpall and psql log in by peer authentication as the OS user "
            "[vms.X.dump] user (default postgres): remove password",
        )
    if options.databases:
        raise PreflightError(
            "[vms.X.dump] databases cannot be used with PostgreSQL",
            vm=vm,
            hint="pg_dumpall dumps roles, tablespaces and every database: remove databases",
        )
    if not _OS_USER_RE.fullmatch(_os_user(options)):
        raise PreflightError(f"[vms.X.dump] user {_os_user(options)!r} is no OS user name", vm=vm)
    args = _options_of(options)
    for option in args:
        name = option.split("=", 1)[0]
        if not option.startswith("--") or name == "--":
            raise PreflightError(
                f"[vms.X.dump] options: {option!r} is not a long pg_dumpall option",
                vm=vm,
                hint="write pg_dumpall options in their long form, values after '=' (--port=5433)",
            )
        read = options_parser.getopt_long(option)
        hit = options_parser.abbreviates(read.name, _FORBIDDEN, _ALLOWED_PREFIXES)
        if hit is not None:
            what = repr(name) if name == f"--{hit}" else f"{name!r} (--{hit})"
            raise PreflightError(
                f"[vms.X.dump] options: pg_dumpall option {what} cannot be used by snapcoord",
                vm=vm,
                hint="the dump must stream the whole cluster to stdout with its closing "
                "comment, logging in as [vms.X.dump] user",
            )
    return args


# Exit statuses of the tools check, and what they mean.
_TOOLS_CHECK = (
    r"""
[ "$(id -u)" = 0 ] || exit 126
id -u -- "$1" >/dev/null 2>&1 || exit 125
shift
for t; do command -v "$t" >/dev/null 2>&1 || { echo "$t not found" >&2; exit 127; }; done
"""
    + ZSTD_PROBE
)


def _check_tools(transport: Transport, client: Client, compression: str, *,
                 timeout: float) -> tuple[str, str | None]:  # fmt: skip
    """The tools check; returns the compression to use and why it is not the first choice
    (:func:`resolve_compression`: the same probe says whether the guest has zstd)."""
    tools = ["runuser", "pg_dumpall", "psql", *required_tools(compression)]
    result = transport.run(["sh", "-c", _TOOLS_CHECK, "sh", client.os_user, *tools],
                           sudo=client.sudo, timeout=timeout)  # fmt: skip
    vm = client.vm
    if result.ok:
        return resolve_compression(compression, zstd=zstd_found(result.stdout), vm=vm)
    if result.returncode == 126:
        raise PreflightError(
            "cannot dump PostgreSQL: pg_dumpall runs as the postgres OS user through runuser, "
            "which needs root in the guest",
            vm=vm,
            hint="set [vms.X.guest] sudo = true (or log in as root)",
        )
    if result.returncode == 125:
        raise PreflightError(
            f"cannot dump PostgreSQL: no OS user {client.os_user!r} in the guest",
            vm=vm,
            hint="fix [vms.X.dump] user (the PostgreSQL superuser's OS account)",
        )
    raise PreflightError(
        f"cannot dump: {client_error(result)} in the guest",
        vm=vm,
        hint="install the PostgreSQL client (and zstd for compression = zstd)",
    )


def preflight(
    transport: Transport,
    *,
    vm: str,
    guest: GuestConfig,
    options: DumpConfig,
    store_root: Path | None = None,
) -> DumpPlan:
    """Before anything stops: root, the OS user and the tools in the guest, the server
    answering that user as a superuser, its databases and their size (and, with
    ``store_root``, the store checked for that much free space)."""
    args = check_options(options, vm=vm)
    client = Client.from_config(options, guest, vm=vm)
    compression, reason = _check_tools(
        transport, client, options.compression, timeout=guest.command_timeout
    )
    info = client.server(transport, timeout=guest.command_timeout)
    if not info.get("superuser"):
        raise PreflightError(
            f"the PostgreSQL role {client.os_user!r} is not a superuser: pg_dumpall cannot "
            "read every role and database",
            vm=vm,
            hint="set [vms.X.dump] user to the superuser's OS account (default postgres)",
        )
    sizes = {str(k): int(v) for k, v in (info.get("databases") or {}).items()}
    data_bytes = sum(sizes.values())
    needed = int(data_bytes * SPACE_FACTOR[compression])
    if store_root is not None:
        store.check_writable(store_root, vm, needed)
    return DumpPlan(vm=vm, server_version=str(info["version"]), databases=tuple(sizes),
                    all_databases=True, data_bytes=data_bytes, needed_bytes=needed,
                    compression=compression, file_name=DUMP_NAMES[compression],
                    argv=tuple(args), compression_reason=reason,
                    threads_note=threads_note(options.threads, vm=vm))  # fmt: skip


def threads_note(configured: int | str, *, vm: str) -> str | None:
    """The run's note when ``[vms.X.dump] threads`` asks a PostgreSQL dump for more than one
    stream: pg_dumpall is one stream (docs/dump.md says why pg_dump --jobs is not used)."""
    if configured == "auto" or int(configured) <= 1:
        return None
    return (
        f"dumped in one stream: threads = {configured} applies to MySQL/MariaDB; a PostgreSQL "
        f"dump is one pg_dumpall stream (docs/dump.md; set [vms.{vm}.dump] threads = 1 or "
        '"auto" to silence this)'
    )


# --------------------------------------------------------------------------------------------
# Row counts (exact, per table)

# Generates one COUNT(*) per ordinary or partitioned table outside the system schemas and runs
# them (\gexec): one JSON line [schema, table, rows] each.
_COUNT_SQL = r"""
SELECT format('SELECT json_build_array(%L, %L, count(*))::text FROM %I.%I',
              n.nspname, c.relname, n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema'
   AND n.nspname !~ '^pg_(catalog|toast|temp_)'
 ORDER BY n.nspname, c.relname
\gexec
"""


def row_counts(
    client: Client, transport: Transport, databases: Iterable[str], *, timeout: float
) -> dict[str, int]:
    """``{"db.schema.table": COUNT(*)}`` for every table of ``databases`` (one call each)."""
    counts: dict[str, int] = {}
    for database in databases:
        for line in client.query(transport, _COUNT_SQL, timeout=timeout, database=database):
            schema_name, table, rows = json.loads(line)
            counts[f"{database}.{schema_name}.{table}"] = int(rows)
    return counts


# --------------------------------------------------------------------------------------------
# Rows and checksums (per table, order-independent)

CHECKSUM_METHOD = "postgresql-md5-sum/1"

# One pass per table: COUNT(*) and the sum, as a bigint, of the first 8 hex digits of the md5
# of each row's text. The row is built as ROW(columns) in the order of the column *names*
# (not their position): a restored table inheriting from a parent that gained columns after
# the child was made gets them in another position, and pg_dump restores the data by name.
# The text of a value depends on session settings, which are fixed here, so the guest at dump
# time and the throwaway server at verify time write the same text: dates ISO, time zone UTC,
# intervals and bytea in one style, floats shortest-exact (PostgreSQL 12 and newer; an older
# server writes floats with fewer digits, and its float columns then differ), money in the C
# locale. search_path is pg_catalog only, so no function or operator of a database's own
# schemas (which a database owner could plant, and ALTER DATABASE ... SET search_path, which
# pg_dumpall carries, could put first) is called by the superuser instead of pg_catalog's.
# statement_timeout is lifted for this session: a large table takes as long as it takes (the
# client's own timeout bounds the call).
#: The session settings of every checksum query (see above).
SUM_SETTINGS = """
SET search_path = pg_catalog;
SET statement_timeout = 0;
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
SET TimeZone = 'UTC';
SET bytea_output = 'hex';
SET extra_float_digits = 1;
SET lc_monetary = 'C';
"""

#: The tables measured: ``c`` (pg_class) and ``n`` (pg_namespace) of each, ``cols.list`` its
#: columns in the order of their names; :data:`SUM_FROM`, then (a caller may join more here)
#: :data:`SUM_WHERE`.
SUM_FROM = """
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN LATERAL (
    SELECT string_agg(format('t.%I', a.attname), ', ' ORDER BY a.attname) AS list
      FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  ) cols ON true
"""
SUM_WHERE = """ WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema'
   AND n.nspname !~ '^pg_(catalog|toast|temp_)'
"""


def sum_statement(condition: str = "''") -> str:
    """The SQL expression (over :data:`SUM_FROM`) that writes one table's checksum query:
    ``SELECT json_build_array(schema, table, count(*), sum)`` of ``t``, the table, followed by
    ``condition``, an SQL text expression (``''``: every row; else a ``WHERE`` clause on
    ``t``). The one place the checksum of :data:`CHECKSUM_METHOD` is spelt."""
    # adjacent SQL string literals separated by a newline are one literal
    return (
        "format('SELECT json_build_array(%L, %L, count(*), coalesce(sum('\n"  # noqa: S608
        "       '((''x'' || left(md5(ROW(%s)::text), 8))::bit(32))::bigint), 0)::text)::text'\n"
        "       ' FROM %I.%I AS t%s', n.nspname, c.relname, coalesce(cols.list, ''),\n"
        f"       n.nspname, c.relname, {condition})"
    )


_SUM_SQL = f"""{SUM_SETTINGS}SELECT {sum_statement()}{SUM_FROM}{SUM_WHERE}\
 ORDER BY n.nspname, c.relname
\\gexec
"""


def table_sums(
    client: Client, transport: Transport, databases: Iterable[str], *, timeout: float
) -> dict[str, TableSum]:
    """``{"db.schema.table": TableSum(rows, checksum)}`` for every ordinary or partitioned
    table of ``databases`` (the tables :func:`row_counts` counts), one psql call per database
    and one pass per table (:data:`CHECKSUM_METHOD`). The checksum is the sum as a decimal
    string: it does not depend on the order of the rows. As in :func:`row_counts`, a parent
    table's figures include its children's rows (no ``ONLY``), and a partitioned table is
    read again for each partition."""
    sums: dict[str, TableSum] = {}
    for database in databases:
        for line in client.query(transport, _SUM_SQL, timeout=timeout, database=database):
            schema_name, table, rows, checksum = json.loads(line)
            sums[f"{database}.{schema_name}.{table}"] = TableSum(int(rows), str(checksum))
    return sums


def _connectable(info: dict[str, Any]) -> list[str]:
    return [str(d) for d in (info.get("databases") or {})]


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
    """Stream ``pg_dumpall`` into ``run_dir`` and record it in the manifest (section
    ``pg_dumpall``: server version, databases, exact row counts and checksums
    per ``db.schema.table``, :func:`table_sums`).

    Raises :class:`DumpFailed` after the run folder was renamed ``.failed``."""
    args = list(plan.argv) if plan else check_options(options, vm=vm)
    compression = dump_compression(options.compression, plan)
    compress_here = compress_where(compression, compress_on)
    client = Client.from_config(options, guest, vm=vm)

    def counts() -> dict[str, object]:  # exact rows and checksums, while nothing writes
        info = client.server(transport, timeout=guest.command_timeout)
        dbs = _connectable(info)
        sums = table_sums(client, transport, dbs, timeout=guest.dump_timeout)
        return {
            "version": info["version"],
            "databases": dbs,
            "rows": {table: s.rows for table, s in sums.items()},
            "checksums": {table: s.checksum for table, s in sums.items()},
            "checksum_method": CHECKSUM_METHOD,
        }

    mode = "none" if compress_here or compression == "none" else compression
    return receive(
        transport,
        vm=vm,
        fmt=FORMAT,
        argv=client.argv(mode, "pg_dumpall", args),
        stdin=b"",
        sudo=client.sudo,
        timeout=guest.dump_timeout,
        run_dir=run_dir,
        compression=compression,
        compress_here=compress_here,
        counts=counts,
        section={
            "options": args,
            "os_user": client.os_user,
            "server_version": plan.server_version if plan else None,
            "databases": list(plan.databases) if plan else [],
        },
    )


# --------------------------------------------------------------------------------------------
# Restore

_CREATE_DB_RE = re.compile(rb'^CREATE DATABASE ("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*) ')
_COPY_RE = re.compile(rb"^COPY .* FROM stdin;$")


def _database_finder() -> Callable[[bytes], str | None]:
    """A line reader that names the databases the script creates. Lines of ``COPY`` data
    (table contents, which could hold any text) are skipped."""
    in_copy = False

    def find(line: bytes) -> str | None:
        nonlocal in_copy
        if in_copy:
            in_copy = line != b"\\."
            return None
        if _COPY_RE.match(line):
            in_copy = True
            return None
        match = _CREATE_DB_RE.match(line)
        if match is None:
            return None
        name = match.group(1)
        if name.startswith(b'"'):
            name = name[1:-1].replace(b'""', b'"')
        return name.decode("utf-8", errors="replace")

    return find


def prepare_restore(source: Path, *, vm: str) -> RestoreSource:
    """Verify a run folder (manifest checksums) or a dump file (intact stream), both ending
    with pg_dumpall's completion comment, and find the databases it would drop. A dump with
    tables in ``postgres`` or ``template1`` (never dropped, so they would collide) is refused
    before anything changes."""
    file, compression, manifest, databases = read_verified(
        source, FORMAT, _database_finder(), vm=vm
    )
    to_drop = [d for d in databases if d not in SYSTEM_DATABASES]
    prepared = RestoreSource(file, compression, manifest, databases, to_drop, SECTION)
    kept = sorted({t.split(".", 1)[0] for t in prepared.expected_rows or {}} & SYSTEM_DATABASES)
    if kept:
        raise PreflightError(
            f"{file.name} holds tables in the {', '.join(kept)} database, which restore-dump "
            "never drops: loading it would collide with them",
            vm=vm,
            hint="nothing was changed; restore that database by hand (psql), or keep "
            "application tables in databases of their own",
        )
    return prepared


def check_ready(transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig) -> None:
    """The server answers the OS user as a superuser, and is new enough for a restore."""
    check_options(options, vm=vm)
    info = Client.from_config(options, guest, vm=vm).server(
        transport, timeout=guest.command_timeout
    )
    if not info.get("superuser"):
        raise PreflightError(f"the PostgreSQL role {_os_user(options)!r} is no superuser", vm=vm)
    if int(info.get("version_num", 0)) < RESTORE_MIN_VERSION:
        raise PreflightError(
            f"PostgreSQL {info.get('version')} is too old for restore-dump (needs 13 or newer:"
            " DROP DATABASE ... WITH (FORCE))",
            vm=vm,
        )


def drop_databases(
    transport: Transport, client: Client, databases: Iterable[str], *, timeout: float
) -> None:
    """``DROP DATABASE ... WITH (FORCE)`` (ends their sessions), one statement at a time."""
    names = [d for d in databases if d not in SYSTEM_DATABASES]
    if names:
        sql = "".join(f"DROP DATABASE IF EXISTS {quote_ident(d)} WITH (FORCE);\n" for d in names)
        client.query(transport, sql, timeout=timeout)


def load(
    transport: Transport, client: Client, source: RestoreSource, *, timeout: float
) -> Completed:
    """Stream the file into ``psql`` as the superuser (decompressed in the guest). No
    ON_ERROR_STOP: the script's expected errors are sorted out by :func:`load_errors`."""
    mode = {"gzip": "gunzip", "zstd": "unzstd", "none": "plain"}[source.compression]
    with open(source.file, "rb") as handle:
        return transport.run_streaming(
            client.psql(mode, "postgres"), sudo=client.sudo, timeout=timeout, source=handle
        )


def load_errors(stderr: bytes) -> tuple[list[str], list[str]]:
    """(real errors, harmless "already exists" errors of roles/tablespaces) in psql's output."""
    real: list[str] = []
    harmless: list[str] = []
    for line in stderr.decode("utf-8", errors="replace").splitlines():
        if _ERROR_LINE.search(line):
            (harmless if _HARMLESS.search(line.rstrip()) else real).append(line.strip())
    return real, harmless


def restore(
    transport: Transport,
    *,
    vm: str,
    guest: GuestConfig,
    options: DumpConfig,
    source: Path | RestoreSource,
    dry_run: bool = False,
) -> RestoreResult:
    """Verify, drop every database the dump creates, load the script, compare row counts and,
    where the manifest has comparable ones, every table's checksum.

    A corrupted or truncated dump raises :class:`CorruptDump` before the server is touched.
    A load error (other than an existing role or tablespace), a row-count or a checksum
    mismatch raises :class:`RestoreFailed`."""
    prepared = source if isinstance(source, RestoreSource) else prepare_restore(source, vm=vm)
    result = RestoreResult(prepared.file, prepared.to_drop, dry_run)
    if dry_run:
        return result
    client = Client.from_config(options, guest, vm=vm)
    timeout = guest.dump_timeout
    started = time.monotonic()
    drop_databases(transport, client, prepared.to_drop, timeout=timeout)
    loaded = load(transport, client, prepared, timeout=timeout)
    result.seconds = time.monotonic() - started
    real, harmless = load_errors(loaded.stderr)
    if not loaded.ok or real:
        more = f" (+{len(real) - 1} more errors)" if len(real) > 1 else ""
        raise RestoreFailed(
            f"loading {prepared.file.name} failed: {real[0] if real else client_error(loaded)}"
            f"{more}",
            vm=vm,
            hint=f"the databases {', '.join(prepared.to_drop) or '(none)'} may be incomplete: "
            "fix the cause and run restore-dump again",
        )
    if harmless:
        result.warnings.append(
            f"{len(harmless)} role/tablespace(s) already existed and were kept (their dumped "
            "attributes were applied): " + "; ".join(h.split("ERROR:", 1)[-1].strip()
                                                     for h in harmless[:5])
        )  # fmt: skip
    expected = prepared.expected_rows
    actual: dict[str, int] = {}
    sums: dict[str, TableSum] = {}
    # every table's checksum too where the manifest recorded comparable ones (older manifests
    # have row counts only, and stay counted as before)
    summed = expected is not None and checksums_comparable(prepared, CHECKSUM_METHOD)
    if expected is not None:
        databases = _dumped_databases(prepared)
        if summed:
            sums = table_sums(client, transport, databases, timeout=timeout)
            actual = {name: s.rows for name, s in sums.items()}
        else:
            actual = row_counts(client, transport, databases, timeout=timeout)
    compare_rows(result, expected, actual, vm=vm, unchecked=prepared.unchecked_reason)
    if summed:
        compare_checksums(result, prepared, sums, method=CHECKSUM_METHOD, vm=vm)
    return result


def _dumped_databases(prepared: RestoreSource) -> list[str]:
    """The databases whose tables the manifest counted (its list, else the dropped ones)."""
    section = (prepared.manifest or {}).get(SECTION, {})
    listed = section.get("databases") if isinstance(section, dict) else None
    names = [str(d) for d in listed] if isinstance(listed, list) else []
    return names or list(prepared.to_drop)


# --------------------------------------------------------------------------------------------
# Pausing writes: PostgreSQL has no statement that holds every commit while the server keeps
# running (no BACKUP STAGE, no global read lock), so consistency = "pause" is refused in
# preflight, before anything is touched. Its dump (pg_dumpall) is consistent per database
# while the application writes, so it needs no extra options.

PAUSE_METHODS: dict[str, tuple[str, ...]] = {}
ONLINE_DUMP_OPTIONS: tuple[str, ...] = ()


def check_pause(
    transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
) -> PausePlan:
    raise refuse("PostgreSQL", vm=vm)


def pause(
    transport: Transport,
    *,
    vm: str,
    guest: GuestConfig,
    options: DumpConfig,
    plan: PausePlan,
    run_id: str,
) -> WritePause:
    raise refuse("PostgreSQL", vm=vm)


def position(
    transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
) -> dict[str, str] | None:
    return None  # only recorded for pauses, which PostgreSQL refuses


def prove_writes(
    transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig, run_id: str
) -> None:
    raise refuse("PostgreSQL", vm=vm)  # only called for kinds with PAUSE_METHODS

"""The logical fallback: ``mysqldump`` streamed off the guest into the store, and its restore.

Nothing is written to the guest's disk except, when a user/password is configured, a 0600 MySQL
option file that lives only as long as the client (created with umask 077 by the guest shell
from bytes sent on stdin, removed by an EXIT trap). The password never appears in argv, the
environment or a log line.

A dump counts as valid only if mysqldump exited 0, the SQL ends with mysqldump's
``-- Dump completed`` marker, the gzip stream is intact (CRC checked while streaming), and the
sha256 of the file re-read from disk equals the sha256 of the received stream. Otherwise the
run folder is renamed ``<snapshot>.failed`` and :class:`DumpFailed` is raised.

Where compression runs was chosen by measurement (bench/dump.py, docs/dump.md): gzip -9 runs on
the coordinator (zlib level 9 in the thread that receives the stream), which was faster than
``mysqldump | gzip -9`` in the guest and takes the compression CPU off the database server during
the service window. zstd runs in the guest (``zstd`` CLI; no Python zstd module is required).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from snapcoord import store
from snapcoord.errors import GuestError, PreflightError, SnapshotFailed
from snapcoord.guest import Transport
from snapcoord.secrets import Secret
from snapcoord.settings import DumpConfig, GuestConfig
from snapcoord.shell import Completed
from snapcoord.store import CorruptDump, RunDir

SYSTEM_SCHEMAS = frozenset({"mysql", "sys", "information_schema", "performance_schema"})
NOT_DUMPED = frozenset({"information_schema", "performance_schema", "sys"})
DUMP_NAMES = {"gzip": "mysql.sql.gz", "zstd": "mysql.sql.zst", "none": "mysql.sql"}
# Where each codec compresses ("guest" | "coordinator"); chosen by bench/dump.py, see docs/dump.md.
COMPRESS_ON = {"gzip": "coordinator", "zstd": "guest", "none": "guest"}
MARKER_RE = re.compile(rb"\n-- Dump completed(?: on [^\n]*)?\n*$")
CHUNK = 1 << 20
TAIL = 512
# Options that would send the dump somewhere else, drop the completion marker, or put a
# password on the command line.
_FORBIDDEN = ("--result-file", "--tab", "--compact", "--skip-comments", "--password", "--xml")
_FORBIDDEN_SHORT = re.compile(r"^-(?:r|T|p|X|[A-Za-z]*p).*")
# Options of mysqldump that also tell the mysql client where the server is.
_CONNECTION = ("--host=", "--port=", "--socket=", "--protocol=", "--ssl", "--default-auth=",
               "--plugin-dir=", "--defaults-group-suffix=", "--user=")  # fmt: skip
_DB_NAME_RE = re.compile(r"^[A-Za-z0-9_$][A-Za-z0-9_$.@-]{0,63}$")


class DumpFailed(GuestError):
    """The dump could not be taken; the run folder (if any) was kept as ``.failed``."""

    def __init__(self, message: str, *, vm: str | None = None, hint: str | None = None,
                 failed_dir: Path | None = None) -> None:  # fmt: skip
        super().__init__(message, vm=vm, hint=hint)
        self.failed_dir = failed_dir


class RestoreFailed(SnapshotFailed):
    """Loading the dump failed, or the restored row counts differ from the manifest."""


# --------------------------------------------------------------------------------------------
# The guest side: one POSIX sh script for every MySQL client call.
#
#   sh -c GUEST sh NBYTES MODE PROGRAM ARGS...
#
# The first NBYTES of stdin are the option file (user/password), read with dd so nothing more
# is consumed; the rest of stdin belongs to the program. MODE: plain | gzip | zstd | none
# (compress stdout) | gunzip | unzstd (decompress stdin). Exit statuses of both ends of a
# pipeline are kept; the script reports them on stderr and exits with the first non-zero one.
GUEST_SCRIPT = r"""
umask 077
n=$1; mode=$2; prog=$3; shift 3
cnf=
trap 'rm -f "$cnf"' EXIT
trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
if [ "$n" -gt 0 ]; then
  cnf=$(mktemp "${TMPDIR:-/tmp}/snapcoord-my.XXXXXXXX") || exit 96
  dd bs=1 count="$n" of="$cnf" 2>/dev/null || exit 96
  set -- "--defaults-extra-file=$cnf" "$@"
fi
need() {
  command -v "$1" >/dev/null 2>&1 || { echo "snapcoord: $1 not found in the guest" >&2; exit 127; }
}
need "$prog"
case $mode in
  gzip) filter="gzip -9 -c";; zstd) filter="zstd -q -c";;
  gunzip) filter="gzip -d -c";; unzstd) filter="zstd -q -d -c";;
  *) filter=;;
esac
[ -z "$filter" ] || need "${filter%% *}"
rc=0; frc=0
exec 3>&1
case $mode in
  gzip|zstd)
    rc=$( { { "$prog" "$@" 3>&- 4>&-; echo $? >&4; } | $filter >&3 3>&- 4>&-; } 4>&1 ); frc=$? ;;
  gunzip|unzstd)
    rc=$( { $filter 3>&- 4>&- | { "$prog" "$@" >&3 3>&- 4>&-; echo $? >&4; }; } 4>&1 ); frc=$? ;;
  *) "$prog" "$@"; rc=$? ;;
esac
[ -n "$rc" ] || rc=255
echo "snapcoord-status $prog=$rc filter=$frc" >&2
[ "$rc" -ne 0 ] && exit "$rc"
exit "$frc"
"""
_STATUS_RE = re.compile(rb"snapcoord-status (\S+)=(\d+) filter=(\d+)")


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
        dump_options = list(options.options)
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

    def argv(self, mode: str, program: str, args: Sequence[str]) -> tuple[list[str], bytes]:
        cnf = self.option_file()
        return ["sh", "-c", GUEST_SCRIPT, "sh", str(len(cnf)), mode, program, *args], cnf

    def query(self, transport: Transport, sql: str, *, timeout: float) -> list[list[str]]:
        """Run SQL with the mysql client in the guest; rows of batch output (unescaped)."""
        argv, cnf = self.argv(
            "plain", "mysql", [*self.connection, "--batch", "--skip-column-names"]
        )
        result = transport.run(argv, sudo=self.sudo, timeout=timeout, stdin=cnf + sql.encode())
        if not result.ok:
            raise GuestError(
                f"mysql in the guest failed: {_client_error(result)}",
                vm=self.vm,
                hint=_credentials_hint(self),
            )
        text = result.stdout.decode("utf-8", errors="replace")
        return [[_unescape(f) for f in line.split("\t")] for line in text.splitlines() if line]


def _unescape(field_text: str) -> str:
    if "\\" not in field_text:
        return field_text
    table = {"n": "\n", "t": "\t", "\\": "\\", "0": "\0"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), m.group(1)), field_text)


def _client_error(result: Completed) -> str:
    if result.timed_out:
        return "timed out"
    lines = [
        ln.strip()
        for ln in result.stderr.decode(errors="replace").splitlines()
        if ln.strip() and not ln.startswith("snapcoord-status")
    ]
    return lines[-1][:300] if lines else f"exit status {result.returncode}"


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
# Streams from and to the guest.


def stream_from_guest(
    transport: Transport,
    argv: Sequence[str],
    *,
    sudo: bool,
    timeout: float,
    stdin: bytes | None,
    consume: Callable[[bytes], None],
) -> Completed:
    """Run a guest command whose stdout is fed, chunk by chunk, to ``consume`` in a thread.
    If ``consume`` raises (store full), the pipe is closed so the guest side dies of SIGPIPE
    instead of streaming on; that exception is re-raised in preference to the command's."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            while chunk := os.read(read_fd, CHUNK):
                consume(chunk)
        except BaseException as exc:
            failure.append(exc)
        finally:
            os.close(read_fd)

    thread = threading.Thread(target=pump, name="snapcoord-stream", daemon=True)
    thread.start()
    writer = os.fdopen(write_fd, "wb", buffering=0)
    try:
        result = transport.run(argv, sudo=sudo, timeout=timeout, stdin=stdin, stdout=writer)
    except GuestError:
        writer.close()
        thread.join(timeout=60)
        if failure:
            raise failure[0] from None
        raise
    writer.close()
    thread.join(timeout=60)
    if thread.is_alive():
        raise GuestError("the guest stream did not end after the command exited")
    if failure:
        raise failure[0]
    return result


def stream_to_guest(
    transport: Transport,
    argv: Sequence[str],
    *,
    sudo: bool,
    timeout: float,
    prefix: bytes,
    source: BinaryIO,
) -> Completed:
    """Run a guest command with ``prefix`` then the whole of ``source`` on its stdin.

    ``Transport.run`` takes stdin as bytes; a dump can be large, so this builds the same
    command line (``Transport.command_line``) and streams the file from a thread."""
    line = transport.command_line(argv, sudo=sudo)
    started = time.monotonic()
    process = subprocess.Popen(
        line,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdin is not None

    def feed(pipe: IO[bytes]) -> None:
        try:
            pipe.write(prefix)
            while chunk := source.read(CHUNK):
                pipe.write(chunk)
        except (BrokenPipeError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                pipe.close()

    feeder = threading.Thread(target=feed, args=(process.stdin,), daemon=True)
    feeder.start()
    timed_out = False
    try:
        out, err = _communicate_without_stdin(process, timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(process)
        out, err = _communicate_without_stdin(process, None)
    except BaseException:
        _kill(process)
        process.wait()
        raise
    feeder.join(timeout=10)
    return Completed(tuple(line), process.returncode, out, err, time.monotonic() - started,
                     timed_out)  # fmt: skip


def _communicate_without_stdin(
    process: subprocess.Popen[bytes], timeout: float | None
) -> tuple[bytes, bytes]:
    """Collect stdout/stderr while another thread owns stdin."""
    assert process.stdout is not None and process.stderr is not None
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def drain(name: str, pipe: IO[bytes]) -> None:
        while data := pipe.read(65536):
            chunks[name].append(data)

    readers = [
        threading.Thread(target=drain, args=("out", process.stdout), daemon=True),
        threading.Thread(target=drain, args=("err", process.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    process.wait(timeout=timeout)
    for reader in readers:
        reader.join(timeout=30)
    return b"".join(chunks["out"]), b"".join(chunks["err"])


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)


# --------------------------------------------------------------------------------------------
# Preflight


@dataclass(frozen=True)
class DumpPlan:
    vm: str
    server_version: str
    databases: tuple[str, ...]  # what will be dumped (user databases and mysql)
    all_databases: bool
    data_bytes: int  # information_schema data + index length of those databases
    needed_bytes: int  # conservative store space for the compressed dump
    compression: str
    file_name: str
    argv: tuple[str, ...]  # the mysqldump arguments (no secrets in them)


def check_options(options: DumpConfig, *, vm: str) -> list[str]:
    """Validate ``[vms.X.mysqldump]`` beyond the schema; returns the mysqldump arguments."""
    args = list(options.options)
    for option in args:
        name = option.split("=", 1)[0]
        if name in _FORBIDDEN or (not option.startswith("--") and _FORBIDDEN_SHORT.match(option)):
            raise PreflightError(
                f"mysqldump option {name!r} cannot be used by snapcoord",
                vm=vm,
                hint="the dump must stream to stdout with its '-- Dump completed' comment; "
                "a password belongs in [vms.X.mysqldump] password",
            )
        if not option.startswith("-"):
            raise PreflightError(f"mysqldump option {option!r} must start with '-'", vm=vm)
    databases = list(options.databases)
    for name in databases:
        if not _DB_NAME_RE.match(name):
            raise PreflightError(f"database name {name!r} is not supported", vm=vm)
    if databases:
        return [*args, "--databases", *databases]
    return [*args, "--all-databases"]


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
    compression = options.compression
    timeout = guest.command_timeout
    tools = ["mysqldump", "mysql"] + (["zstd"] if compression == "zstd" else [])
    probe = (
        'for t; do command -v "$t" >/dev/null 2>&1 || { echo "$t not found" >&2; exit 127; }; done'
    )
    result = transport.run(["sh", "-c", probe, "sh", *tools], sudo=client.sudo, timeout=timeout)
    if not result.ok:
        raise PreflightError(
            f"cannot dump: {_client_error(result)} in the guest",
            vm=vm,
            hint="install the MariaDB/MySQL client (and zstd for compression = zstd)",
        )
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
    factor = {"gzip": 0.5, "zstd": 0.5, "none": 2.0}[compression]
    needed = int(data_bytes * factor)
    if store_root is not None:
        store.check_writable(store_root, vm, needed)
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
# Dump


class _Inspector:
    """Consumes the received stream: writes it to the store and inspects the SQL inside
    (size, last bytes for the completion marker, gzip integrity)."""

    def __init__(self, sink: store.FileSink, codec: str, compress_here: bool) -> None:
        self.sink = sink
        self.codec = codec
        self.tail = b""
        self.sql_bytes = 0
        self.stream_error: str | None = None
        self._inflate = zlib.decompressobj(31) if codec == "gzip" and not compress_here else None
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 31) if compress_here else None
        self._member_fed = False

    def _sql(self, data: bytes) -> None:
        if data:
            self.sql_bytes += len(data)
            self.tail = (self.tail + data[-TAIL:])[-TAIL:]

    def __call__(self, chunk: bytes) -> None:
        if self._deflate is not None:
            self._sql(chunk)
            self.sink.write(self._deflate.compress(chunk))
            return
        self.sink.write(chunk)
        if self._inflate is not None and self.stream_error is None:
            self._feed_inflate(chunk)
        elif self.codec == "none":
            self._sql(chunk)

    def _feed_inflate(self, chunk: bytes) -> None:
        assert self._inflate is not None
        data = chunk
        try:
            while data:
                self._member_fed = True
                self._sql(self._inflate.decompress(data))
                if not self._inflate.eof:
                    return
                data = self._inflate.unused_data  # a further gzip member may follow
                self._inflate, self._member_fed = zlib.decompressobj(31), False
        except zlib.error as exc:
            self.stream_error = f"the gzip stream is corrupt: {exc}"

    def finish(self) -> None:
        if self._deflate is not None:
            self.sink.write(self._deflate.flush())
        elif self._inflate is not None and self.stream_error is None:
            if not self.sql_bytes:
                self.stream_error = "the dump is empty"
            elif self._member_fed:
                self.stream_error = "the gzip stream is truncated"


def _zstd_inspect(path: Path) -> tuple[int, bytes, str | None]:
    """(sql bytes, tail, error) of a .zst file, decompressed locally."""
    tail = b""
    total = 0
    with subprocess.Popen(["zstd", "-q", "-d", "-c", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        while chunk := proc.stdout.read(CHUNK):
            total += len(chunk)
            tail = (tail + chunk[-TAIL:])[-TAIL:]
        err = proc.stderr.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        return total, tail, f"zstd -d failed: {err or proc.returncode}"
    return total, tail, None


@dataclass
class DumpResult:
    run_dir: RunDir
    file: str  # name of the dump inside the run folder
    sha256: str
    size: int
    sql_bytes: int
    rows: int
    tables: int
    seconds: float
    databases: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The stored dump (follows the run folder when it is committed or failed)."""
        return self.run_dir.path / self.file

    @property
    def sql_mb_per_s(self) -> float:
        return self.sql_bytes / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def dump(
    transport: Transport,
    *,
    vm: str,
    guest: GuestConfig,
    options: DumpConfig,
    run_dir: RunDir,
    snapshot: str | None = None,
    plan: DumpPlan | None = None,
    compress_on: str | None = None,
) -> DumpResult:
    """Stream the dump into ``run_dir`` and record it in the manifest (section ``mysqldump``).

    Raises :class:`DumpFailed` after the run folder was renamed ``.failed``. The caller commits
    ``run_dir`` when the run's other files are in."""
    args = list(plan.argv) if plan else check_options(options, vm=vm)
    compression = options.compression
    where = compress_on or COMPRESS_ON[compression]
    if compression == "zstd":
        where = "guest"
    compress_here = where == "coordinator" and compression == "gzip"
    client = Client.from_config(options, guest, vm=vm)
    timeout = guest.dump_timeout
    query_timeout = guest.command_timeout
    name = DUMP_NAMES[compression]
    started_iso = store.now_iso()
    started = time.monotonic()

    # Exact row counts, concurrently with the dump: services are stopped, nothing writes.
    counts: dict[str, Any] = {}

    def count() -> None:
        try:
            info = client.query(
                transport,
                "SELECT VERSION();"
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY SCHEMA_NAME;",
                timeout=query_timeout,
            )
            wanted = list(options.databases)
            present = [r[0] for r in info[1:]]
            dbs = wanted or [d for d in present if d not in NOT_DUMPED]
            counts["version"] = info[0][0]
            counts["databases"] = dbs
            counts["rows"] = row_counts(client, transport, dbs, timeout=timeout)
        except BaseException as exc:
            counts["error"] = exc

    counter = threading.Thread(target=count, name="snapcoord-rowcount", daemon=True)
    counter.start()

    mode = "none" if compress_here or compression == "none" else compression
    argv, cnf = client.argv(mode, "mysqldump", args)
    sink = run_dir.sink(name)
    inspector = _Inspector(sink, compression, compress_here)
    problem: str | None = None
    result: Completed | None = None
    try:
        result = stream_from_guest(
            transport, argv, sudo=client.sudo, timeout=timeout, stdin=cnf, consume=inspector
        )
        inspector.finish()
    except OSError as exc:
        problem = f"writing {sink.final} failed: {exc.strerror or exc}"
        sink.discard()  # a full store: free the space the partial file took
    except GuestError as exc:
        problem = exc.message
    counter.join()
    seconds = time.monotonic() - started

    if problem is None and result is not None:
        problem = _dump_problem(result, inspector)
    entry: dict[str, Any] = {}
    if problem is None:
        try:
            entry = sink.finish({"kind": "mysqldump", "compression": compression,
                                 "sql_bytes": inspector.sql_bytes})  # fmt: skip
        except OSError as exc:
            problem = f"storing the dump failed: {exc}"
    if problem is None and compression == "zstd":
        sql_bytes, tail, error = _zstd_inspect(sink.final)
        inspector.sql_bytes, inspector.tail = sql_bytes, tail
        entry["sql_bytes"] = sql_bytes
        problem = error or (None if MARKER_RE.search(tail) else _NO_MARKER)
    if problem is None and "error" in counts:
        error = counts["error"]
        problem = f"counting rows failed: {getattr(error, 'message', error)}"

    section = {
        "started": started_iso,
        "finished": store.now_iso(),
        "seconds": round(seconds, 3),
        "file": name,
        "compression": compression,
        "compressed_on": "coordinator" if compress_here else "guest",
        "options": args,
        "server_version": counts.get("version", plan.server_version if plan else None),
        "databases": counts.get("databases", list(plan.databases) if plan else []),
        "tables": counts.get("rows", {}),
        "sql_bytes": inspector.sql_bytes,
        "mysqldump_exit": _exit_of(result),
        "valid": problem is None,
    }
    run_dir.sections["mysqldump"] = section
    if problem is not None:
        if not sink.closed:
            sink.keep_as(f"{name}.incomplete")  # for inspection, never as the dump
        failed = run_dir.fail(f"mysqldump: {problem}")
        raise DumpFailed(
            f"mysqldump failed: {problem}",
            vm=vm,
            hint=f"nothing valid was stored; what arrived is kept in {failed}",
            failed_dir=failed,
        )
    rows = sum(section["tables"].values())
    return DumpResult(
        run_dir=run_dir,
        file=name,
        sha256=str(entry["sha256"]),
        size=int(entry["size"]),
        sql_bytes=inspector.sql_bytes,
        rows=rows,
        tables=len(section["tables"]),
        seconds=seconds,
        databases=list(section["databases"]),
    )


_NO_MARKER = "the SQL does not end with mysqldump's '-- Dump completed' line (truncated dump)"


def _exit_of(result: Completed | None) -> int | None:
    if result is None:
        return None
    match = _STATUS_RE.search(result.stderr)
    return int(match.group(2)) if match else result.returncode


def _dump_problem(result: Completed, inspector: _Inspector) -> str | None:
    if result.timed_out:
        return "timed out (raise [vms.X.guest] dump_timeout)"
    match = _STATUS_RE.search(result.stderr)
    if match is None:
        return f"the guest command ended without a status: {_client_error(result)}"
    dump_rc, filter_rc = int(match.group(2)), int(match.group(3))
    if dump_rc != 0:
        return f"mysqldump exited {dump_rc}: {_client_error(result)}"
    if filter_rc != 0:
        return f"the compressor exited {filter_rc}: {_client_error(result)}"
    if inspector.stream_error:
        return inspector.stream_error
    if inspector.codec != "zstd" and not MARKER_RE.search(inspector.tail):
        return _NO_MARKER
    return None


# --------------------------------------------------------------------------------------------
# Restore


@dataclass
class RestoreSource:
    """A verified dump ready to load: the file, its codec, and what it holds."""

    file: Path
    compression: str
    manifest: dict[str, Any] | None
    databases: list[str]  # every database the dump creates (from the SQL itself)

    @property
    def to_drop(self) -> list[str]:
        return [d for d in self.databases if d not in SYSTEM_SCHEMAS]

    @property
    def expected_rows(self) -> dict[str, int] | None:
        if self.manifest is None:
            return None
        section = self.manifest.get("mysqldump", {})
        tables = section.get("tables")
        return {str(k): int(v) for k, v in tables.items()} if isinstance(tables, dict) else None


_CREATE_DB_RE = re.compile(rb"^CREATE DATABASE (?:/\*!32312 IF NOT EXISTS\*/ )?`((?:[^`]|``)+)`")


def _open_sql(path: Path, compression: str) -> Iterator[bytes]:
    """The SQL of a dump file, chunk by chunk; raises CorruptDump on a broken stream."""
    if compression == "gzip":
        inflate = zlib.decompressobj(31)
        fed = False  # has the current gzip member received any bytes?
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                try:
                    while chunk:
                        fed = True
                        yield inflate.decompress(chunk)
                        if not inflate.eof:
                            break
                        chunk = inflate.unused_data
                        inflate, fed = zlib.decompressobj(31), False
                except zlib.error as exc:
                    raise CorruptDump(f"{path} is not a valid gzip file: {exc}") from None
        if fed and not inflate.eof:
            raise CorruptDump(f"{path} is truncated (incomplete gzip stream)")
    elif compression == "zstd":
        with subprocess.Popen(["zstd", "-q", "-d", "-c", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as proc:  # fmt: skip
            assert proc.stdout is not None
            while chunk := proc.stdout.read(CHUNK):
                yield chunk
        if proc.returncode != 0:
            raise CorruptDump(f"{path} is not a valid zstd file")
    else:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk


def scan_dump(path: Path, compression: str) -> tuple[list[str], bytes]:
    """Databases created by the dump and its last bytes; one pass over the SQL."""
    databases: list[str] = []
    carry = b""
    tail = b""
    total = 0
    for chunk in _open_sql(path, compression):
        if not chunk:
            continue
        total += len(chunk)
        tail = (tail + chunk[-TAIL:])[-TAIL:]
        text = carry + chunk
        start = 0
        while (found := text.find(b"\nCREATE DATABASE ", start)) != -1:
            end = text.find(b"\n", found + 1)
            if end == -1:
                break
            match = _CREATE_DB_RE.match(text[found + 1 : end])
            if match:
                name = match.group(1).replace(b"``", b"`").decode("utf-8", errors="replace")
                if name not in databases:
                    databases.append(name)
            start = end
        cut = text.rfind(b"\n")
        carry = text[cut:] if cut != -1 else text[-65536:]
        if len(carry) > 65536:
            carry = carry[-65536:]
    if total == 0:
        raise CorruptDump(f"{path} holds no SQL")
    return databases, tail


def codec_of(path: Path) -> str:
    if path.name.endswith(".gz"):
        return "gzip"
    if path.name.endswith(".zst"):
        return "zstd"
    return "none"


def prepare_restore(source: Path, *, vm: str) -> RestoreSource:
    """Verify a run folder (manifest checksums) or a dump file, and find what it would drop.

    A run folder, or a file inside one, is checked against its manifest's sha256; a bare file
    is checked for an intact compressed stream. Both must end with the completion marker."""
    source = Path(source)
    manifest: dict[str, Any] | None = None
    if source.is_dir():
        manifest = store.verify(source, vm=vm)
        section = manifest.get("mysqldump")
        if not isinstance(section, dict) or section.get("file") not in manifest["files"]:
            raise CorruptDump(f"{source} holds no mysqldump", vm=vm)
        file = source / str(section["file"])
    else:
        file = source
        if not file.is_file():
            raise PreflightError(f"dump file {file} not found", vm=vm)
        sibling = file.parent / store.MANIFEST
        if sibling.is_file():
            candidate = store.read_manifest(file.parent)
            entry = candidate.get("files", {}).get(file.name)
            if entry is not None:
                store.verify_file(file, entry, vm=vm)
                manifest = candidate
    compression = codec_of(file)
    try:
        databases, tail = scan_dump(file, compression)
    except CorruptDump as exc:
        raise CorruptDump(exc.message, vm=vm, hint="nothing was changed") from None
    if not MARKER_RE.search(tail):
        raise CorruptDump(
            f"{file} does not end with mysqldump's '-- Dump completed' line: refusing a "
            "truncated dump",
            vm=vm,
            hint="nothing was changed",
        )
    return RestoreSource(file, compression, manifest, databases)


@dataclass
class RestoreResult:
    file: Path
    dropped: list[str]
    dry_run: bool
    seconds: float = 0.0
    rows_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "dropped": self.dropped,
            "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3),
            "rows_checked": self.rows_checked,
            "mismatches": self.mismatches,
            "warnings": self.warnings,
        }


def drop_databases(
    transport: Transport, client: Client, databases: Iterable[str], *, timeout: float
) -> None:
    names = [d for d in databases if d not in SYSTEM_SCHEMAS]
    if not names:
        return
    sql = "".join(f"DROP DATABASE IF EXISTS {quote_ident(d)};" for d in names)
    client.query(transport, sql, timeout=timeout)


def load(
    transport: Transport, client: Client, source: RestoreSource, *, timeout: float
) -> Completed:
    """Stream the compressed file into ``mysql`` in the guest (decompressed there)."""
    mode = {"gzip": "gunzip", "zstd": "unzstd", "none": "plain"}[source.compression]
    argv, cnf = client.argv(mode, "mysql", [*client.connection, "--batch"])
    with open(source.file, "rb") as handle:
        return stream_to_guest(
            transport, argv, sudo=client.sudo, timeout=timeout, prefix=cnf, source=handle
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
    """Verify, drop every (non-system) database the dump contains, load, compare row counts.

    A corrupted or truncated dump raises :class:`CorruptDump` before the database is touched.
    A load error or a row-count mismatch raises :class:`RestoreFailed`."""
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
    if not loaded.ok:
        raise RestoreFailed(
            f"loading {prepared.file.name} failed: {_client_error(loaded)}",
            vm=vm,
            hint=f"the databases {', '.join(prepared.to_drop)} may be incomplete: "
            "fix the cause and run restore-dump again",
        )
    expected = prepared.expected_rows
    if expected is None:
        result.warnings.append("no manifest next to the dump: row counts were not compared")
        return result
    dbs = sorted({name.split(".", 1)[0] for name in expected} | set(prepared.to_drop))
    actual = row_counts(client, transport, dbs, timeout=timeout)
    result.rows_checked = sum(actual.values())
    for table in sorted(set(expected) | set(actual)):
        want, got = expected.get(table), actual.get(table)
        if want != got:
            result.mismatches.append(f"{table}: expected {want}, found {got}")
    if result.mismatches:
        shown = "; ".join(result.mismatches[:5])
        more = f" (+{len(result.mismatches) - 5} more)" if len(result.mismatches) > 5 else ""
        raise RestoreFailed(f"restored row counts differ from the manifest: {shown}{more}", vm=vm)
    return result

"""What every database kind's logical dump shares: the guest pipeline script, receiving a dump
into the store (compression, completion line, gzip integrity, sha256 manifest, ``.failed`` on
any problem), reading a stored dump back, and the comparison of row counts after a restore. The
streams to and from the guest are :meth:`Transport.run_streaming`'s.

Nothing is written to the guest's disk except, when credentials are configured, a 0600 option
file that lives only as long as the client (created with umask 077 by the guest shell from bytes
sent on stdin, removed by an EXIT trap). Secrets never appear in argv, the environment or a log.

Where compression runs was chosen by measurement (bench/dump.py, docs/dump.md): gzip -9 runs on
the coordinator (zlib level 9 in the thread that receives the stream), which was faster than
``dump | gzip -9`` in the guest and takes the compression CPU off the database server during
the service window. zstd runs in the guest (``zstd`` CLI; no Python zstd module is required).

``compression = "auto"`` (the default) is resolved in each kind's preflight, by the tools probe
it already runs (:data:`ZSTD_PROBE`, no extra round trip): zstd when the guest has it, else gzip
with a reason the run shows (:func:`resolve_compression`, :func:`fallback_note`).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from snapcoord import shell, store
from snapcoord.errors import GuestError, PreflightError, SnapshotFailed
from snapcoord.guest import Transport
from snapcoord.shell import Completed
from snapcoord.store import CorruptDump, RunDir
from snapcoord.text import clip
from snapcoord.values import integer

# Where each codec compresses ("guest" | "coordinator"); chosen by bench/dump.py, see docs/dump.md.
COMPRESS_ON = {"gzip": "coordinator", "zstd": "guest", "none": "guest"}
SUFFIXES = {"gzip": ".sql.gz", "zstd": ".sql.zst", "none": ".sql"}
# Store space a dump needs, as a share of the data it holds (information_schema's figures).
SPACE_FACTOR = {"gzip": 0.5, "zstd": 0.5, "none": 2.0}
CHUNK = 1 << 20
TAIL = 512
# zstd decompresses locally, to check a dump: the command, and a bound for scanning one that
# nothing else bounds (at hundreds of MB/s, an hour is far more than any dump needs).
_UNZSTD = ["zstd", "-q", "-d", "-c"]
SCAN_TIMEOUT = 3600.0


@dataclass(frozen=True)
class TableSum:
    """One base table's figures, taken at dump time and again after a verify's load: its
    exact row count and a checksum of its rows (``None`` where the kind cannot compute one).
    How the checksum is computed is the kind's ``table_sums()`` docstring; the manifest names
    it (``checksum_method``)."""

    rows: int
    checksum: str | None


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
# is consumed; the rest of stdin belongs to the program. NBYTES "-": the script prints READY
# ("R", before anything else on stdout) and waits for a line with the length first on stdin (a
# part of a parallel dump, started before its option file is known; end of input instead: it
# was not needed, exit 96). MODE: plain | gzip | zstd | none
# (compress stdout) | gunzip | unzstd (decompress stdin). Exit statuses of both ends of a
# pipeline are kept; the script reports them on stderr and exits with the first non-zero one.
GUEST_SCRIPT = r"""
umask 077
n=$1; mode=$2; prog=$3; shift 3
trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
if [ "$n" = - ]; then
  printf R
  IFS= read -r n || exit 96
  case $n in ''|*[!0-9]*) exit 96;; esac
fi
if [ "$n" -gt 0 ]; then
  cnf=$(dd bs=1 count="$n" 2>/dev/null) || exit 96
  exec 9<<EOF || exit 96
$cnf
EOF
  set -- "--defaults-extra-file=/dev/fd/9" "$@"
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
#: what GUEST_SCRIPT prints first when it waits for its option file (NBYTES "-")
READY = b"R"


# --------------------------------------------------------------------------------------------
# compression = "auto": zstd when the guest has it, gzip otherwise

#: Appended to a kind's tools probe (sh): prints the line below when the guest has ``zstd`` on
#: the PATH its dump runs with (same login, same sudo). It never fails the probe.
ZSTD_PROBE = 'if command -v zstd >/dev/null 2>&1; then echo "snapcoord-has zstd"; fi'
_ZSTD_FOUND = re.compile(rb"^snapcoord-has zstd$", re.MULTILINE)
ZSTD_MISSING = "zstd not found in the guest"
#: the coordinator decompresses every zstd dump once stored (completion line), and restore-dump
#: and verify read it with the same command: without it here, "auto" takes gzip
ZSTD_MISSING_HERE = "zstd not found on the coordinator"


def required_tools(compression: str) -> list[str]:
    """The guest tools a configured compression needs beyond the kind's own (the probe fails
    without them): zstd when it is asked for explicitly; "auto" falls back instead."""
    return ["zstd"] if compression == "zstd" else []


def zstd_found(probe_stdout: bytes) -> bool:
    """Whether the tools probe (ending with :data:`ZSTD_PROBE`) found zstd in the guest."""
    return _ZSTD_FOUND.search(probe_stdout) is not None


def coordinator_has_zstd() -> bool:
    """Whether this host finds the ``zstd`` command the way :func:`shell.stream` runs it."""
    return shutil.which(_UNZSTD[0]) is not None


def resolve_compression(
    configured: str, *, zstd: bool, vm: str | None = None
) -> tuple[str, str | None]:
    """(the compression a dump uses, why it is not the default's first choice): ``configured``
    as it is unless it is "auto", which is zstd when the guest has it (``zstd``) and so does
    this host (it checks the stored file with it), else gzip with the reason
    (:data:`ZSTD_MISSING`, :data:`ZSTD_MISSING_HERE`). An explicit "zstd" on a host without
    zstd is refused here, before anything stops: the dump could never be checked or restored."""
    if configured == "zstd" and not coordinator_has_zstd():
        raise PreflightError(
            f'cannot dump: compression = "zstd" but {ZSTD_MISSING_HERE} (it checks every '
            "stored dump, and restore-dump and verify read it, with zstd)",
            vm=vm,
            hint=f"install zstd on the coordinator, or set [vms.{vm or 'X'}.dump] compression "
            '= "auto" (gzip where zstd is missing)',
        )
    if configured != "auto":
        return configured, None
    if not zstd:
        return "gzip", ZSTD_MISSING
    if not coordinator_has_zstd():
        return "gzip", ZSTD_MISSING_HERE
    return "zstd", None


def fallback_fix(vm: str, reason: str) -> str:
    """What to do about a gzip fallback of ``compression = "auto"`` for ``reason``."""
    where = "on the coordinator" if reason == ZSTD_MISSING_HERE else "in the guest"
    return f"install zstd {where}, or set [vms.{vm}.dump] compression"


def fallback_note(vm: str, reason: str) -> str:
    """The run's note when ``compression = "auto"`` could not use zstd: what happened, what
    to do."""
    return f"dump compressed with gzip: {reason} ({fallback_fix(vm, reason)})"


def dump_compression(configured: str, plan: DumpPlan | None) -> str:
    """The compression a kind's ``dump()`` uses: the plan's (resolved in preflight) when there
    is one; without a plan, ``configured`` with "auto" taken as gzip (nothing was probed)."""
    if plan is not None:
        return plan.compression
    return "gzip" if configured == "auto" else configured


def client_error(result: Completed) -> str:
    """The guest client's last error line (status lines left out), for one-line messages."""
    if result.timed_out:
        return "timed out"
    lines = [
        ln.strip()
        for ln in result.stderr.decode(errors="replace").splitlines()
        if ln.strip() and not ln.startswith("snapcoord-status")
    ]
    return clip(lines[-1], 300) if lines else f"exit status {result.returncode}"


# --------------------------------------------------------------------------------------------
# Receiving a dump into the store


@dataclass(frozen=True)
class DumpPlan:
    vm: str
    server_version: str
    databases: tuple[str, ...]  # what will be dumped (user databases and mysql)
    all_databases: bool
    data_bytes: int  # information_schema data + index length of those databases
    needed_bytes: int  # conservative store space for the compressed dump
    compression: str  # resolved: gzip | zstd | none (never "auto")
    file_name: str
    argv: tuple[str, ...]  # the mysqldump arguments (no secrets in them)
    #: why ``compression = "auto"`` did not choose zstd (``ZSTD_MISSING``, ``ZSTD_MISSING_HERE``)
    compression_reason: str | None = None
    #: mysqldump sessions (``[vms.X.dump] threads`` resolved): 1 is the single-stream dump
    threads: int = 1
    #: why a configured ``threads`` above 1 was not used (the run's note)
    threads_note: str | None = None


class Inspector:
    """Consumes the received stream: writes it to the store and inspects the SQL inside
    (size, last bytes for the completion marker, gzip integrity)."""

    def __init__(
        self, sink: store.FileSink, codec: str, compress_here: bool, marker: re.Pattern[bytes]
    ) -> None:
        self.marker = marker
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


def zstd_inspect(path: Path, *, timeout: float) -> tuple[int, bytes, str | None]:
    """(sql bytes, tail, error) of a .zst file, decompressed locally."""
    tail = b""
    total = 0

    def consume(chunk: bytes) -> None:
        nonlocal tail, total
        total += len(chunk)
        tail = (tail + chunk[-TAIL:])[-TAIL:]

    result = shell.stream([*_UNZSTD, str(path)], timeout=timeout, consume=consume)
    if not result.ok:
        error = "timed out" if result.timed_out else result.error_text()
        return total, tail, f"zstd -d failed: {error}"
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
    compression: str  # gzip | zstd | none, as the file is stored
    databases: list[str] = field(default_factory=list)
    #: a parallel dump's files, table parts first (``file`` is its objects part); else empty
    parts: list[str] = field(default_factory=list)

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


@dataclass(frozen=True)
class DumpFormat:
    """How a kind's dump looks in the store and how its end is recognised."""

    program: str  # the dump program, for messages: mysqldump, pg_dumpall
    section: str  # the manifest section: mysqldump, pg_dumpall
    stem: str  # file name without suffix: mysql -> mysql.sql.gz
    marker: re.Pattern[bytes]  # matches the SQL's last bytes when the dump completed
    marker_text: str  # the completion line, for messages

    def file_name(self, compression: str) -> str:
        return self.stem + SUFFIXES[compression]

    @property
    def no_marker(self) -> str:
        return f"the SQL does not end with {self.program}'s {self.marker_text} (truncated dump)"


def compress_where(compression: str, compress_on: str | None) -> bool:
    """Does gzip run here, on the coordinator (else in the guest, or not at all)?"""
    where = compress_on or COMPRESS_ON[compression]
    return where == "coordinator" and compression == "gzip"


class Counter:
    """A kind's ``counts()`` (row counts and checksums) in a thread of its own, beside the
    dump's stream(s); :meth:`join` gives its figures, or ``{"error": exc}``."""

    def __init__(self, counts: Callable[[], dict[str, Any]]) -> None:
        self.counted: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._count, args=(counts,),
                                        name="snapcoord-rowcount", daemon=True)  # fmt: skip
        self._thread.start()

    def _count(self, counts: Callable[[], dict[str, Any]]) -> None:
        try:
            self.counted.update(counts())
        except BaseException as exc:
            self.counted["error"] = exc

    def join(self) -> dict[str, Any]:
        self._thread.join()
        return self.counted


@dataclass
class Streamed:
    """One stored dump stream (a single-stream dump, or one part of a parallel one) after every
    check: ``problem`` is None when the file is complete, intact and in the manifest."""

    name: str
    sink: store.FileSink
    inspector: Inspector
    result: Completed | None
    problem: str | None
    entry: dict[str, Any]


def stream_file(
    transport: Transport,
    *,
    vm: str,
    fmt: DumpFormat,
    argv: Sequence[str],
    stdin: bytes,
    sudo: bool,
    timeout: float,
    run_dir: RunDir,
    name: str,
    compression: str,
    compress_here: bool,
    consume: Callable[[bytes], None] | None = None,
    source: BinaryIO | None = None,
    ready: threading.Event | None = None,
) -> Streamed:
    """Run the guest pipeline ``argv`` (GUEST_SCRIPT), store its stream as ``name`` and check
    it: the dump program's and the compressor's exit status, the stream's integrity, the
    completion line, the sha256 re-read from disk (:meth:`store.FileSink.finish`). ``consume``
    sees each chunk first (a parallel dump stops a part by raising there); ``source`` follows
    ``stdin`` on the pipeline's stdin. ``ready``: the pipeline waits for its option file
    (NBYTES "-"); its :data:`READY` byte is taken off the stream and sets ``ready``."""
    sink = run_dir.sink(name)
    inspector = Inspector(sink, compression, compress_here, fmt.marker)
    problem: str | None = None
    result: Completed | None = None

    def take(chunk: bytes) -> None:
        if ready is not None and not ready.is_set():
            if not chunk.startswith(READY):
                raise GuestError("the dump's guest script did not say it was ready", vm=vm)
            chunk = chunk[len(READY) :]
            ready.set()
            if not chunk:
                return
        if consume is not None:
            consume(chunk)
        inspector(chunk)

    try:
        result = transport.run_streaming(
            argv, sudo=sudo, timeout=timeout, stdin=stdin, source=source, consume=take
        )
        inspector.finish()
    except OSError as exc:
        problem = f"writing {sink.final} failed: {exc.strerror or exc}"
        sink.discard()  # a full store: free the space the partial file took
    except GuestError as exc:
        problem = exc.message
    except Stopped as exc:
        problem = str(exc)

    if problem is None and result is not None:
        problem = _dump_problem(result, inspector, fmt)
    entry: dict[str, Any] = {}
    if problem is None:
        try:
            entry = sink.finish({"kind": fmt.section, "compression": compression,
                                 "sql_bytes": inspector.sql_bytes})  # fmt: skip
        except OSError as exc:
            problem = f"storing the dump failed: {exc}"
    if problem is None and compression == "zstd":
        sql_bytes, tail, error = zstd_inspect(sink.final, timeout=timeout)
        inspector.sql_bytes, inspector.tail = sql_bytes, tail
        entry["sql_bytes"] = sql_bytes
        problem = error or (None if fmt.marker.search(tail) else fmt.no_marker)
    return Streamed(name, sink, inspector, result, problem, entry)


class Stopped(Exception):
    """Raised in a part's consumer to stop its stream (another part failed)."""


def receive(
    transport: Transport,
    *,
    vm: str,
    fmt: DumpFormat,
    argv: Sequence[str],
    stdin: bytes,
    sudo: bool,
    timeout: float,
    run_dir: RunDir,
    compression: str,
    compress_here: bool,
    counts: Callable[[], dict[str, Any]],
    section: dict[str, Any],
) -> DumpResult:
    """Run the guest pipeline ``argv`` (GUEST_SCRIPT) and store what it streams as the dump.

    ``counts`` runs concurrently (services are stopped, nothing writes) and returns
    ``{"version", "databases", "rows"}`` and, where the kind computes them, ``"checksums"``
    (``{"db.table": str}``) and ``"checksum_method"``, recorded as they are; ``section`` holds
    the kind's own manifest fields (``options``, defaults for ``server_version`` and
    ``databases``). Raises
    :class:`DumpFailed` after the run folder was renamed ``.failed``."""
    name = fmt.file_name(compression)
    started_iso = store.now_iso()
    started = time.monotonic()
    counter = Counter(counts)
    streamed = stream_file(transport, vm=vm, fmt=fmt, argv=argv, stdin=stdin, sudo=sudo,
                           timeout=timeout, run_dir=run_dir, name=name,
                           compression=compression, compress_here=compress_here)  # fmt: skip
    counted = counter.join()
    seconds = time.monotonic() - started
    problem = streamed.problem
    inspector, result, sink = streamed.inspector, streamed.result, streamed.sink
    entry = streamed.entry
    if problem is None and "error" in counted:
        error = counted["error"]
        problem = f"counting rows failed: {getattr(error, 'message', error)}"

    sums: dict[str, Any] = {k: counted[k] for k in ("checksums", "checksum_method") if k in counted}
    record = {
        "started": started_iso,
        "finished": store.now_iso(),
        "seconds": round(seconds, 3),
        "file": name,
        "format": "single",
        "compression": compression,
        "compressed_on": "coordinator" if compress_here else "guest",
        **section,
        "server_version": counted.get("version", section.get("server_version")),
        "databases": counted.get("databases", section.get("databases", [])),
        "tables": counted.get("rows", {}),
        **sums,
        "sql_bytes": inspector.sql_bytes,
        f"{fmt.program}_exit": _exit_of(result),
        "valid": problem is None,
    }
    run_dir.sections[fmt.section] = record
    if problem is not None:
        if not sink.closed:
            sink.keep_as(f"{name}.incomplete")  # for inspection, never as the dump
        failed = run_dir.fail(f"{fmt.program}: {problem}")
        raise DumpFailed(
            f"{fmt.program} failed: {problem}",
            vm=vm,
            hint=f"nothing valid was stored; what arrived is kept in {failed}",
            failed_dir=failed,
        )
    return DumpResult(
        run_dir=run_dir,
        file=name,
        sha256=str(entry["sha256"]),
        size=int(entry["size"]),
        sql_bytes=inspector.sql_bytes,
        rows=sum(record["tables"].values()),
        tables=len(record["tables"]),
        seconds=seconds,
        compression=compression,
        databases=list(record["databases"]),
    )


def _exit_of(result: Completed | None) -> int | None:
    if result is None:
        return None
    match = _STATUS_RE.search(result.stderr)
    return int(match.group(2)) if match else result.returncode


def _dump_problem(result: Completed, inspector: Inspector, fmt: DumpFormat) -> str | None:
    if result.timed_out:
        return "timed out (raise [vms.X.guest] dump_timeout)"
    match = _STATUS_RE.search(result.stderr)
    if match is None:
        return f"the guest command ended without a status: {client_error(result)}"
    dump_rc, filter_rc = int(match.group(2)), int(match.group(3))
    if dump_rc != 0:
        return f"{fmt.program} exited {dump_rc}: {client_error(result)}"
    if filter_rc != 0:
        return f"the compressor exited {filter_rc}: {client_error(result)}"
    if inspector.stream_error:
        return inspector.stream_error
    if inspector.codec != "zstd" and not fmt.marker.search(inspector.tail):
        return fmt.no_marker
    return None


# --------------------------------------------------------------------------------------------
# Reading a stored dump back


@dataclass(frozen=True)
class DumpPart:
    """One file of a parallel dump, as its manifest lists it (read by :func:`parallel_parts`)."""

    file: Path
    role: str  # "tables": base tables with their data and triggers; "objects": views, routines
    tables: tuple[str, ...]  # "db.table" of every base table in a tables part
    compression: str

    @property
    def name(self) -> str:
        return self.file.name


#: a parallel dump's part files, in a manifest's ``parts`` list
PART_ROLES = ("tables", "objects")


def parallel_parts(
    folder: Path, manifest: dict[str, Any], fmt: DumpFormat, *, vm: str
) -> tuple[DumpPart, ...] | None:
    """The parts of a parallel dump from its run folder's manifest (section ``format =
    "parallel"``), None for a single-stream dump (``"single"``, or no ``format``: dumps before
    parallel dumps existed). Anything else (a hand-edited or corrupt list) is one CorruptDump
    line. The files' sha256 are checked by :func:`store.verify`, not here."""
    section = manifest.get(fmt.section)
    if not isinstance(section, dict):
        return None
    kind = section.get("format", "single")
    if kind == "single":
        return None

    def corrupt(why: str) -> CorruptDump:
        return CorruptDump(
            f"{folder}: the manifest's {fmt.section} section {why}: refusing to use it",
            vm=vm,
            hint="nothing was changed; the manifest was edited or damaged",
        )

    if kind != "parallel":
        raise corrupt(f"names an unknown format {clip(str(kind), 40)!r}")
    listed = section.get("parts")
    files = manifest.get("files")
    if not isinstance(listed, list) or not listed or not isinstance(files, dict):
        raise corrupt("has no list of parts")
    parts: list[DumpPart] = []
    seen: set[str] = set()
    for index, item in enumerate(listed, 1):
        if not isinstance(item, dict):
            raise corrupt(f"lists part {index} as something other than a table")
        name, role, tables = item.get("file"), item.get("role"), item.get("tables", [])
        if not isinstance(name, str) or name not in files or name in seen:
            shown = clip(str(name), 60)
            raise corrupt(f"lists part {index} ({shown!r}) that is not one of its files")
        if role not in PART_ROLES:
            raise corrupt(f"gives part {name} the unknown role {clip(str(role), 40)!r}")
        if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
            raise corrupt(f"lists the tables of part {name} unreadably")
        seen.add(name)
        parts.append(DumpPart(folder / name, role, tuple(tables), codec_of(Path(name))))
    roles = [p.role for p in parts]
    if roles.count("objects") != 1 or "tables" not in roles:
        raise corrupt("needs one objects part and at least one tables part")
    return tuple(p for p in parts if p.role == "tables") + tuple(
        p for p in parts if p.role == "objects"
    )


@dataclass
class RestoreSource:
    """A verified dump ready to load: the file, its codec, and what it holds."""

    file: Path
    compression: str
    manifest: dict[str, Any] | None
    databases: list[str]  # every database the dump creates (from the SQL itself)
    to_drop: list[str]  # those a restore drops first (never the kind's system databases)
    section: str  # the manifest section with the row counts
    #: a parallel dump's files (``file`` is then its run folder): the table parts, loaded
    #: concurrently, then the objects part; empty for a single-stream dump
    parts: tuple[DumpPart, ...] = ()

    @property
    def format(self) -> str:
        """``"parallel"`` (several part files) or ``"single"`` (one file)."""
        return "parallel" if self.parts else "single"

    @property
    def figures_comparable(self) -> bool:
        """Whether the manifest's per-table figures describe the dump's own view: not when the
        dump ran beside an application that wrote (``consistency = "pause"``: the figures come
        from another session than the dump's transaction, at another moment)."""
        consistency = (self.manifest or {}).get("consistency")
        return not (isinstance(consistency, dict) and consistency.get("mode") == "pause")

    @property
    def expected_rows(self) -> dict[str, int] | None:
        """``{"db.table": rows}`` recorded at dump time; None without a manifest, or when its
        figures cannot describe the dump (:attr:`figures_comparable`). A count that is not a
        non-negative integer makes the whole record unusable (a hand-edited manifest): None."""
        if self.manifest is None or not self.figures_comparable:
            return None
        section = self.manifest.get(self.section, {})
        tables = section.get("tables") if isinstance(section, dict) else None
        if not isinstance(tables, dict):
            return None
        counts = {str(k): integer(v, 0, 10**15) for k, v in tables.items()}
        if any(v is None for v in counts.values()):
            return None
        return {k: v for k, v in counts.items() if v is not None}

    @property
    def unchecked_reason(self) -> str:
        """Why :attr:`expected_rows` is None, for the run's warning."""
        if self.manifest is None:
            return "no manifest next to the dump: row counts were not compared"
        if not self.figures_comparable:
            return (
                "the dump was taken while the application wrote (consistency = pause): its "
                "recorded row counts were not compared"
            )
        return "the manifest's row counts are unreadable: they were not compared"

    @property
    def expected_checksums(self) -> dict[str, str] | None:
        """``{"db.table": checksum}`` recorded at dump time; None for a dump without them."""
        if self.manifest is None:
            return None
        section = self.manifest.get(self.section, {})
        sums = section.get("checksums") if isinstance(section, dict) else None
        if not isinstance(sums, dict):
            return None
        return {str(k): str(v) for k, v in sums.items() if isinstance(v, str)}

    @property
    def checksum_method(self) -> str | None:
        """How the recorded checksums were computed (``"mysql-crc32-sum/1"``), if recorded."""
        if self.manifest is None:
            return None
        section = self.manifest.get(self.section, {})
        method = section.get("checksum_method") if isinstance(section, dict) else None
        return method if isinstance(method, str) else None


def read_sql(
    path: Path, compression: str, consume: Callable[[bytes], None], *, timeout: float
) -> None:
    """Hand the SQL of a dump file to ``consume``, chunk by chunk; raises CorruptDump on a
    broken stream."""
    if compression == "gzip":
        inflate = zlib.decompressobj(31)
        fed = False  # has the current gzip member received any bytes?
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                try:
                    while chunk:
                        fed = True
                        consume(inflate.decompress(chunk))
                        if not inflate.eof:
                            break
                        chunk = inflate.unused_data
                        inflate, fed = zlib.decompressobj(31), False
                except zlib.error as exc:
                    raise CorruptDump(f"{path} is not a valid gzip file: {exc}") from None
        if fed and not inflate.eof:
            raise CorruptDump(f"{path} is truncated (incomplete gzip stream)")
    elif compression == "zstd":
        if not shell.stream([*_UNZSTD, str(path)], timeout=timeout, consume=consume).ok:
            raise CorruptDump(f"{path} is not a valid zstd file")
    else:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                consume(chunk)


def scan(
    path: Path,
    compression: str,
    find: Callable[[bytes], str | None],
    *,
    timeout: float = SCAN_TIMEOUT,
) -> tuple[list[str], bytes]:
    """The database names ``find`` recognises in the dump's lines, and its last bytes; one
    pass over the SQL. ``find`` sees every whole line (without its newline)."""
    databases: list[str] = []
    carry = b""
    tail = b""
    total = 0

    def take(chunk: bytes) -> None:
        nonlocal carry, tail, total
        if not chunk:
            return
        total += len(chunk)
        tail = (tail + chunk[-TAIL:])[-TAIL:]
        text = carry + chunk
        lines = text.split(b"\n")
        carry = lines.pop()[-65536:]  # an unfinished line waits for the next chunk
        for line in lines:
            name = find(line)
            if name is not None and name not in databases:
                databases.append(name)

    read_sql(path, compression, take, timeout=timeout)
    if total == 0:
        raise CorruptDump(f"{path} holds no SQL")
    return databases, tail


def codec_of(path: Path) -> str:
    if path.name.endswith(".gz"):
        return "gzip"
    if path.name.endswith(".zst"):
        return "zstd"
    return "none"


def locate(source: Path, fmt: DumpFormat, *, vm: str) -> tuple[Path, dict[str, Any] | None]:
    """The dump file of a run folder (checked against its manifest's sha256) or a file (checked
    against the manifest next to it, if it is listed there), with that manifest."""
    source = Path(source)
    manifest: dict[str, Any] | None = None
    if source.is_dir():
        manifest = store.verify(source, vm=vm)
        if parallel_parts(source, manifest, fmt, vm=vm) is not None:
            raise CorruptDump(f"{source} holds a parallel dump: it has no single file", vm=vm)
        section = manifest.get(fmt.section)
        named = section.get("file") if isinstance(section, dict) else None
        if not isinstance(named, str) or named not in manifest["files"]:
            raise CorruptDump(f"{source} holds no {fmt.program} dump", vm=vm)
        return source / named, manifest
    if not source.is_file():
        raise PreflightError(f"dump file {source} not found", vm=vm)
    sibling = source.parent / store.MANIFEST
    if sibling.is_file():
        candidate = store.read_manifest(source.parent)
        files = candidate.get("files")
        entry = files.get(source.name) if isinstance(files, dict) else None
        if entry is not None:
            section = candidate.get(fmt.section)
            if isinstance(section, dict) and section.get("format", "single") != "single":
                raise PreflightError(
                    f"{source.name} is one part of a parallel dump",
                    vm=vm,
                    hint=f"restore its run folder ({source.parent}): its parts load together",
                )
            if not isinstance(entry, dict):
                raise CorruptDump(f"{sibling} does not describe {source.name} as a file", vm=vm)
            store.verify_file(source, entry, vm=vm)
            manifest = candidate
    return source, manifest


def read_recorded(source: Path, fmt: DumpFormat, *, vm: str) -> RestoreSource:
    """A run folder's dump as its manifest records it, for ``verify``: every file checked
    against the manifest's sha256 and size, the databases from the manifest, the SQL not
    scanned. The sha256 proves the file is the one that passed the completion-line and stream
    checks when it was stored; a file changed with its sha256 recomputed is what verify's load
    and comparison are for (a second decompression here cost 8 % of a verify:
    docs/benchmarks.md). ``to_drop`` is every recorded database (nothing is dropped: the
    server is new)."""
    parallel = read_parallel(source, fmt, None, vm=vm)
    if parallel is not None:
        return parallel
    file, manifest = locate(source, fmt, vm=vm)
    section = (manifest or {}).get(fmt.section)
    if manifest is None or not isinstance(section, dict):
        raise CorruptDump(f"{source} has no manifest that records a {fmt.program} dump", vm=vm)
    listed = section.get("databases")
    names = [d for d in listed if isinstance(d, str)] if isinstance(listed, list) else []
    return RestoreSource(file, codec_of(file), manifest, names, names, fmt.section)


def read_parallel(
    source: Path, fmt: DumpFormat, find: Callable[[bytes], str | None] | None, *, vm: str
) -> RestoreSource | None:
    """A run folder's parallel dump, every part checked against the manifest's sha256; with
    ``find``, every part's SQL read too (an intact stream, the completion line, the databases
    it creates), as :func:`read_verified` does for a single file. None when ``source`` is not
    the run folder of a parallel dump. Raises CorruptDump before anything is changed."""
    source = Path(source)
    if not source.is_dir() or not (source / store.MANIFEST).is_file():
        return None
    manifest = store.read_manifest(source)
    if parallel_parts(source, manifest, fmt, vm=vm) is None:
        return None
    manifest = store.verify(source, vm=vm)
    parts = parallel_parts(source, manifest, fmt, vm=vm) or ()
    section = manifest.get(fmt.section)
    listed = section.get("databases") if isinstance(section, dict) else None
    databases = [d for d in listed if isinstance(d, str)] if isinstance(listed, list) else []
    if find is not None:
        databases = []
        for part in parts:
            try:
                found, tail = scan(part.file, part.compression, find)
            except CorruptDump as exc:
                raise CorruptDump(exc.message, vm=vm, hint="nothing was changed") from None
            if not fmt.marker.search(tail):
                raise CorruptDump(
                    f"{part.file} does not end with {fmt.program}'s {fmt.marker_text}: "
                    "refusing a truncated dump",
                    vm=vm,
                    hint="nothing was changed",
                )
            databases += [d for d in found if d not in databases]
    codec = parts[0].compression
    return RestoreSource(source, codec, manifest, databases, databases, fmt.section, parts)


def read_verified(
    source: Path, fmt: DumpFormat, find: Callable[[bytes], str | None], *, vm: str
) -> tuple[Path, str, dict[str, Any] | None, list[str]]:
    """(file, codec, manifest, databases) of a dump that passed every check: checksums, an
    intact stream, the completion line. Raises CorruptDump before anything is changed."""
    file, manifest = locate(source, fmt, vm=vm)
    compression = codec_of(file)
    try:
        databases, tail = scan(file, compression, find)
    except CorruptDump as exc:
        raise CorruptDump(exc.message, vm=vm, hint="nothing was changed") from None
    if not fmt.marker.search(tail):
        raise CorruptDump(
            f"{file} does not end with {fmt.program}'s {fmt.marker_text}: refusing a "
            "truncated dump",
            vm=vm,
            hint="nothing was changed",
        )
    return file, compression, manifest, databases


@dataclass
class RestoreResult:
    file: Path
    dropped: list[str]
    dry_run: bool
    seconds: float = 0.0
    rows_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checksums_checked: int = 0  # tables whose checksum was compared with the manifest's

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "dropped": self.dropped,
            "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3),
            "rows_checked": self.rows_checked,
            "checksums_checked": self.checksums_checked,
            "mismatches": self.mismatches,
            "warnings": self.warnings,
        }


def compare_rows(
    result: RestoreResult,
    expected: dict[str, int] | None,
    actual: dict[str, int],
    *,
    vm: str,
    unchecked: str = "no manifest next to the dump: row counts were not compared",
) -> None:
    """Record the restored row counts in ``result``; raise RestoreFailed on any difference.
    Without ``expected``, ``unchecked`` (why) becomes the result's warning."""
    if expected is None:
        result.warnings.append(unchecked)
        return
    result.rows_checked = sum(actual.values())
    for table in sorted(set(expected) | set(actual)):
        want, got = expected.get(table), actual.get(table)
        if want != got:
            result.mismatches.append(f"{table}: expected {want}, found {got}")
    if result.mismatches:
        shown = "; ".join(result.mismatches[:5])
        more = f" (+{len(result.mismatches) - 5} more)" if len(result.mismatches) > 5 else ""
        raise RestoreFailed(f"restored row counts differ from the manifest: {shown}{more}", vm=vm)


def checksums_comparable(prepared: RestoreSource, method: str) -> bool:
    """The manifest has checksums by ``method`` (the kind's), and its figures describe the
    dump's view."""
    return (
        prepared.expected_checksums is not None
        and prepared.checksum_method == method
        and prepared.figures_comparable
    )


def compare_checksums(
    result: RestoreResult,
    prepared: RestoreSource,
    sums: dict[str, TableSum],
    *,
    method: str,
    vm: str,
) -> None:
    """The restored tables' checksums (the kind's ``table_sums()``, by ``method``) against the
    manifest's, when it has comparable ones (else a warning says rows were counted only);
    RestoreFailed on any difference."""
    expected = prepared.expected_checksums
    if expected is None or not checksums_comparable(prepared, method):
        result.warnings.append("the manifest has no comparable checksums: rows were counted only")
        return
    got = {name: s.checksum for name, s in sums.items() if s.checksum is not None}
    differ = sorted(t for t in set(expected) | set(got) if expected.get(t) != got.get(t))
    if differ:
        shown = ", ".join(differ[:5]) + (f" (+{len(differ) - 5} more)" if len(differ) > 5 else "")
        result.mismatches += [f"{t}: checksum differs" for t in differ]
        raise RestoreFailed(f"restored checksums differ from the manifest: {shown}", vm=vm)
    result.checksums_checked = len(got)

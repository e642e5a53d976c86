"""The guest's MariaDB seen from outside (server processes, the CLI client, checksums and row
counts) and :func:`start_scratch_mariadb`, a second, private server."""

from __future__ import annotations

import contextlib
import gzip
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.lab.common import (
    LabError,
    free_port,
    process_table,
    run,
    stat_fields,
    stop_pid,
    wait_for_banner,
    which,
)

SYSTEM_SCHEMAS = frozenset({"mysql", "sys", "information_schema", "performance_schema"})


#: The guest database's datadir (Debian's default): :func:`mysqld_running` looks for it.
GUEST_DATADIR = "/var/lib/mysql"


#: Every scratch server's directory name contains this.
SCRATCH_MARKER = "snapcoord-scratch-"


def mysqld_pids(datadir: str = GUEST_DATADIR) -> list[int]:
    """PIDs of the guest's MariaDB/MySQL server: mariadbd/mysqld processes on ``datadir``.

    Other servers on this machine (scratch servers, other people's) have their own --datadir
    and are ignored; a server started without --datadir counts as the guest's. A zombie (a
    server that exited, not yet reaped by its parent) is no server: it has no arguments left.
    """
    pids = []
    for pid, comm, args in process_table():
        if comm not in ("mariadbd", "mysqld"):
            continue
        if stat_fields(pid)[:1] in (["Z"], []):  # a zombie (or gone): no server, no datadir
            continue
        dirs = [a.split("=", 1)[1] for a in args.split() if a.startswith("--datadir=")]
        if not dirs or dirs[-1].rstrip("/") == datadir.rstrip("/"):
            pids.append(pid)
    return pids


def mysqld_running(datadir: str = GUEST_DATADIR) -> bool:
    """True while a server process of the guest's database exists (checked from outside).

    Stricter than ``mysqladmin ping``: a server that stopped answering but is still shutting
    down (flushing InnoDB) counts as running.
    """
    return bool(mysqld_pids(datadir))


def mysqladmin_ping(socket: str | Path | None = None) -> bool:
    """True if the server answers ``mysqladmin ping``."""
    argv = ["mysqladmin"]
    if socket:
        argv += ["--no-defaults", "-u", "root", f"--socket={socket}"]
    return run([*argv, "ping"], check=False, timeout=30).returncode == 0


def mysql_argv(socket_path: str | Path | None = None, *extra: str) -> list[str]:
    """argv of the mysql client as root: the guest's server, or the one behind ``socket_path``."""
    argv = ["mysql"]
    if socket_path:
        argv += ["--no-defaults", "-u", "root", f"--socket={socket_path}"]
    return [*argv, "--batch", "-N", *extra]


def mysql_exec(
    sql: str, socket_path: str | Path | None = None, *, timeout: float = 600.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run SQL (may hold many statements) as root with the mysql client; rows tab-separated.

    ``socket_path=None`` is the guest's own server (the client's defaults); a scratch server
    passes its socket.
    """
    return run(mysql_argv(socket_path), input=sql, timeout=timeout, check=check)


def mysql_rows(sql: str, socket_path: str | Path | None = None) -> list[list[str]]:
    out = mysql_exec(sql, socket_path).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def mariadb_uptime(socket_path: str | Path | None = None) -> int:
    """Seconds since the database server started (SHOW GLOBAL STATUS LIKE 'Uptime')."""
    rows = mysql_rows("SHOW GLOBAL STATUS LIKE 'Uptime'", socket_path)
    return int(rows[0][1])


def _quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("\\", "\\\\").replace("'", "''") + "'" for v in values)


def base_tables(databases: Iterable[str], socket_path: str | Path | None = None) -> list[str]:
    """``db.table`` names of the base tables (no views) in ``databases``, sorted."""
    dbs = list(databases)
    if not dbs:
        return []
    rows = mysql_rows(
        "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES "
        f"WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA IN ({_sql_list(dbs)}) "
        "ORDER BY TABLE_SCHEMA, TABLE_NAME",
        socket_path,
    )
    return [f"{db}.{table}" for db, table in rows]


def table_checksums(
    databases: Iterable[str], socket: str | Path | None = None
) -> dict[str, int | None]:
    """``{"db.table": CHECKSUM TABLE value}`` for every base table in ``databases``."""
    tables = base_tables(databases, socket)
    if not tables:
        return {}
    idents = ", ".join(".".join(_quote_ident(p) for p in t.split(".", 1)) for t in tables)
    rows = mysql_rows(f"CHECKSUM TABLE {idents} EXTENDED", socket)
    return {name: (None if value == "NULL" else int(value)) for name, value in rows}


def row_counts(databases: Iterable[str], socket: str | Path | None = None) -> dict[str, int]:
    """Exact ``{"db.table": COUNT(*)}`` for every base table in ``databases``."""
    tables = base_tables(databases, socket)
    if not tables:
        return {}
    parts = []
    for t in tables:
        db, name = t.split(".", 1)
        parts.append(f"SELECT '{t}', COUNT(*) FROM {_quote_ident(db)}.{_quote_ident(name)}")
    rows = mysql_rows(" UNION ALL ".join(parts), socket)
    return {name: int(count) for name, count in rows}


DUMP_OPTIONS = ("--single-transaction", "--routines", "--events", "--triggers", "--hex-blob")


def mysqldump_to(
    path: Path,
    databases: Sequence[str] | None = None,
    socket: str | Path | None = None,
    options: Sequence[str] = DUMP_OPTIONS,
) -> None:
    """Dump ``databases`` (default: --all-databases) into ``path`` (plain SQL) with mysqldump."""
    argv = ["mysqldump"]
    if socket:
        argv += ["--no-defaults", "-u", "root", f"--socket={socket}"]
    argv += list(options)
    argv += ["--databases", *databases] if databases else ["--all-databases"]
    with path.open("wb") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.PIPE, timeout=600, check=False)
    if proc.returncode != 0:
        raise LabError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.decode()}")


def user_databases(socket: str | Path | None = None) -> list[str]:
    """Every database except the system schemas."""
    return [r[0] for r in mysql_rows("SHOW DATABASES", socket) if r[0] not in SYSTEM_SCHEMAS]


def load_sql(
    path: Path, socket: str | Path | None = None, *, timeout: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """Feed an SQL file (``.gz`` is decompressed) to the mysql client; does not raise on error."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return _pipe_into_mysql(fh, socket, timeout)


def _pipe_into_mysql(
    fh: IO[bytes], socket: str | Path | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(mysql_argv(socket), stdin=subprocess.PIPE, stdout=out, stderr=err)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            shutil.copyfileobj(fh, proc.stdin, 1 << 20)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        rc = proc.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            proc.args, rc, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


@dataclass
class ScratchMariaDB:
    """A private MariaDB server: own datadir, socket and 127.0.0.1 port; stopped by PID."""

    workdir: Path
    datadir: Path
    socket: Path
    port: int
    pid: int
    log_file: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def sql(self, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return mysql_exec(sql, self.socket, check=check)

    def load(self, path: Path) -> subprocess.CompletedProcess[str]:
        """Load an SQL dump (``.gz`` ok) into this server; check the returncode yourself."""
        return load_sql(path, self.socket)

    def checksums(self, databases: Iterable[str]) -> dict[str, int | None]:
        return table_checksums(databases, self.socket)

    def databases(self) -> list[str]:
        return user_databases(self.socket)

    def reset(self) -> None:
        """Drop every non-system database: a clean server for the next test."""
        dbs = self.databases()
        if dbs:
            self.sql("".join(f"DROP DATABASE {_quote_ident(d)};" for d in dbs))

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, remove: bool = True) -> None:
        """Stop the server by its PID; remove its directory unless ``remove=False``."""
        if self._proc is not None:
            stop_pid(self.pid, self._proc, timeout=60)
            self._proc = None
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _mariadbd() -> str:
    for name in ("mariadbd", "mysqld"):
        found = which(name)
        if found:
            return found
    raise LabError("no mariadbd/mysqld binary (apt-get install -y mariadb-server)")


def start_scratch_mariadb(workdir: Path | None = None, *, attempts: int = 3) -> ScratchMariaDB:
    """Initialise a datadir with mariadb-install-db and start a private server on it.

    root@localhost authenticates through the unix socket (we are root), like Debian's default.
    """
    if os.geteuid() != 0:
        raise LabError("start_scratch_mariadb needs root (the server runs as user mysql)")
    if workdir is None:
        # Under /tmp directly: pytest's tmp dirs are 0700 root, which user mysql cannot enter.
        workdir = Path(tempfile.mkdtemp(prefix=SCRATCH_MARKER))
    elif SCRATCH_MARKER not in str(workdir):
        raise LabError(f"scratch workdir must contain {SCRATCH_MARKER!r} in its path")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    datadir = workdir / "data"
    install_db = which("mariadb-install-db") or which("mysql_install_db")
    if install_db is None:
        raise LabError("mariadb-install-db missing (apt-get install -y mariadb-server)")
    if not (datadir / "mysql").exists():
        run(
            [
                install_db,
                "--no-defaults",
                f"--datadir={datadir}",
                "--user=mysql",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            timeout=120,
        )
    shutil.chown(workdir, "mysql", "mysql")
    sock = workdir / "mysqld.sock"
    log = workdir / "error.log"
    last_error: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(
            [
                _mariadbd(),
                "--no-defaults",
                f"--datadir={datadir}",
                f"--socket={sock}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={workdir / 'mysqld.pid'}",
                f"--log-error={log}",
                "--user=mysql",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=128M",
                "--innodb-flush-log-at-trx-commit=2",
                "--max-allowed-packet=64M",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_banner(port, b"", 30.0, alive=lambda p=proc: p.poll() is None)
            deadline = time.monotonic() + 30
            while mysql_exec("SELECT 1", sock, check=False).returncode != 0:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise LabError("scratch server does not answer on its socket")
                time.sleep(0.1)
        except LabError as exc:
            stop_pid(proc.pid, proc)
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            last_error = LabError(f"{exc}; error log: {tail}")
            continue
        return ScratchMariaDB(workdir, datadir, sock, port, proc.pid, log, proc)
    raise LabError(f"could not start the scratch MariaDB: {last_error}")

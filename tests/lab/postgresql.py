"""The guest's PostgreSQL (Debian's postgresql-common cluster, loopback and socket only), seen
and driven from outside."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from tests.lab import sandbox
from tests.lab.common import LabError, run
from tests.lab.services import ensure_running, service_argv, service_running

PG_SERVICE = "postgresql"


#: the lab's PostgreSQL configuration: loopback TCP and the unix socket only
PG_LAB_CONF = (
    "# snapcoord lab (tests/lab.py): loopback and socket only\nlisten_addresses = 'localhost'\n"
)


PG_LAB_CONF_NAME = "99-snapcoord-lab.conf"


def pg_clusters() -> list[dict[str, str]]:
    """``pg_lsclusters``: version, cluster, port, status, owner, data directory."""
    out = run(["pg_lsclusters", "-h"], timeout=30).stdout
    keys = ("version", "cluster", "port", "status", "owner", "datadir")
    return [dict(zip(keys, line.split(), strict=False)) for line in out.splitlines() if line]


def pg_cluster() -> dict[str, str]:
    """The cluster the lab uses: the one on the sandbox's PostgreSQL port (tests/lab/sandbox.py),
    created by :func:`ensure_postgresql`."""
    port = str(sandbox.ports()["postgresql"])
    clusters = pg_clusters()
    found = next((c for c in clusters if c["port"] == port), None)
    if found is None:
        raise LabError(f"no PostgreSQL cluster on port {port} (ensure_postgresql creates it)")
    return found


def _create_cluster() -> None:
    """The sandbox's cluster: Debian's ``pg_createcluster`` for the newest installed server,
    on the sandbox's port (its /etc/postgresql and /var/lib/postgresql are private)."""
    versions = sorted(
        (p.name for p in Path("/usr/lib/postgresql").glob("*") if (p / "bin/postgres").exists()),
        key=int,
    )
    if not versions:
        raise LabError("no PostgreSQL server installed (apt-get install -y postgresql)")
    port = str(sandbox.ports()["postgresql"])
    run(["pg_createcluster", "--port", port, versions[-1], "main"], timeout=300)


def ensure_postgresql() -> bool:
    """The sandbox's cluster exists, listens on loopback and its socket only (a conf.d file;
    restarted if that changed while it ran), and the server runs. True if it was started or
    restarted."""
    if not pg_clusters():
        _create_cluster()
    changed = False
    for cluster in pg_clusters():
        conf_d = Path("/etc/postgresql", cluster["version"], cluster["cluster"], "conf.d")
        conf_d.mkdir(parents=True, exist_ok=True)
        conf = conf_d / PG_LAB_CONF_NAME
        if not conf.is_file() or conf.read_text() != PG_LAB_CONF:
            conf.write_text(PG_LAB_CONF)
            changed = True
    if changed and service_running(PG_SERVICE):
        run(service_argv(PG_SERVICE, "restart"), timeout=120)
        return True
    return bool(ensure_running([PG_SERVICE]))


def postmaster_pid() -> int | None:
    """The running postmaster of the lab's cluster (its data directory's postmaster.pid and
    a live ``postgres`` process), checked from outside; None when it is down."""
    try:
        pidfile = Path(pg_cluster()["datadir"], "postmaster.pid")
    except LabError:  # no cluster yet (the sandbox creates it on first use): nothing runs
        return None
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return pid if comm in ("postgres", "postmaster") else None


def psql(sql: str, database: str = "postgres", *, check: bool = True) -> list[str]:
    """Run SQL as the postgres OS user (peer authentication), stopping at the first error;
    the unaligned output lines."""
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1", "-d", database]  # fmt: skip
    proc = subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=120,
                          cwd="/", check=False)  # fmt: skip
    if check and proc.returncode != 0:
        raise LabError(f"psql on {database} exited {proc.returncode}: {proc.stderr.strip()}")
    return [line for line in proc.stdout.splitlines() if line]


def pg_start_time() -> str:
    return psql("SELECT pg_postmaster_start_time();")[0]


def pg_databases() -> list[str]:
    """User databases (every connectable one but postgres and template1)."""
    rows = psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1;")
    return [d for d in rows if d not in ("postgres", "template1")]


def pg_row_counts(databases: Iterable[str]) -> dict[str, int]:
    """``{"db.schema.table": rows}`` of every table outside the system schemas."""
    counts: dict[str, int] = {}
    for database in databases:
        tables = psql(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1;",
            database,
        )
        for table in tables:
            (rows,) = psql(f"SELECT count(*) FROM {table};", database)
            name = table.replace('"', "")
            counts[f"{database}.{name}"] = int(rows)
    return counts


def pg_drop_databases(names: Iterable[str]) -> None:
    for name in names:
        psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);')

"""The real guest lab: this machine, reached over a private OpenSSH server on 127.0.0.1. One
module per component (common, sshd, services, mariadb, postgresql); this face hands their names
on, so tests write ``lab.NAME``.

Plain functions, usable from pytest fixtures (tests/conftest.py), from bench/ scripts and by hand
(``python3 -m tests.lab --help`` from the repository root). Everything here needs root: it starts
sshd, creates test users, and drives the real Debian services with ``service NAME start|stop``.

What it provides:

* :func:`start_sshd` -> :class:`SshGuest`: an sshd with its own ed25519 host key, a generated client
  key, a known_hosts file for ``[127.0.0.1]:PORT`` (plus one with a WRONG key), an ssh_config
  with the alias ``snapcoord-lab``. Stopped by PID with :meth:`SshGuest.stop`.
* :func:`ensure_test_users`: ``snapcoord-test`` (sudo NOPASSWD ALL) and ``snapcoord-nosudo``
  (no sudo rights); both log in with the same client key.
* :func:`service_running`, :func:`start_service`, :func:`stop_service`, :func:`ensure_running`,
  :func:`mariadb_uptime`, :func:`mysqld_running`: the guest's services, seen from outside.
* :func:`mysql_exec`, :func:`table_checksums`, :func:`row_counts`: MariaDB through the CLI client.
* :func:`start_scratch_mariadb` -> :class:`ScratchMariaDB`: a second, private MariaDB server.
* :func:`ensure_postgresql`, :func:`psql`, :func:`postmaster_pid`, :func:`pg_row_counts`:
  the guest's PostgreSQL (Debian's cluster, loopback and socket only), seen from outside.
* :func:`require`: skip (or fail when ``CI=true``) if a component is missing.
"""

from __future__ import annotations

from tests.lab.common import (
    APT_PACKAGES,
    LOCK_PATH,
    LabError,
    children_of,
    free_port,
    lab_lock,
    process_group,
    process_table,
    require,
    require_root,
    run,
    stat_fields,
    stop_pid,
    wait_for_banner,
    which,
)
from tests.lab.mariadb import (
    DUMP_OPTIONS,
    GUEST_DATADIR,
    SCRATCH_MARKER,
    SYSTEM_SCHEMAS,
    ScratchMariaDB,
    base_tables,
    load_sql,
    mariadb_uptime,
    mysql_argv,
    mysql_exec,
    mysql_rows,
    mysqladmin_ping,
    mysqld_pids,
    mysqld_running,
    mysqldump_to,
    row_counts,
    start_scratch_mariadb,
    table_checksums,
    user_databases,
)
from tests.lab.postgresql import (
    PG_LAB_CONF,
    PG_LAB_CONF_NAME,
    PG_SERVICE,
    ensure_postgresql,
    pg_cluster,
    pg_clusters,
    pg_databases,
    pg_drop_databases,
    pg_row_counts,
    pg_start_time,
    postmaster_pid,
    psql,
)
from tests.lab.services import (
    BREAKAGE,
    LAB_SERVICES,
    GuestServices,
    break_service,
    break_service_command,
    clear_guest_lease,
    end_leftovers,
    ensure_running,
    init_script_exists,
    repair_all_services,
    repair_service,
    service_argv,
    service_running,
    start_service,
    stop_service,
)
from tests.lab.sshd import (
    LAB_ALIAS,
    NOSUDO_USER,
    SSHD,
    SUDO_USER,
    SUDOERS_FILE,
    SshGuest,
    cut_server_side,
    ensure_test_users,
    guest_toml,
    start_sshd,
)

__all__ = [
    "APT_PACKAGES",
    "BREAKAGE",
    "DUMP_OPTIONS",
    "GUEST_DATADIR",
    "LAB_ALIAS",
    "LAB_SERVICES",
    "LOCK_PATH",
    "NOSUDO_USER",
    "PG_LAB_CONF",
    "PG_LAB_CONF_NAME",
    "PG_SERVICE",
    "SCRATCH_MARKER",
    "SSHD",
    "SUDOERS_FILE",
    "SUDO_USER",
    "SYSTEM_SCHEMAS",
    "GuestServices",
    "LabError",
    "ScratchMariaDB",
    "SshGuest",
    "base_tables",
    "break_service",
    "break_service_command",
    "children_of",
    "clear_guest_lease",
    "cut_server_side",
    "end_leftovers",
    "ensure_postgresql",
    "ensure_running",
    "ensure_test_users",
    "free_port",
    "guest_toml",
    "init_script_exists",
    "lab_lock",
    "load_sql",
    "mariadb_uptime",
    "mysql_argv",
    "mysql_exec",
    "mysql_rows",
    "mysqladmin_ping",
    "mysqld_pids",
    "mysqld_running",
    "mysqldump_to",
    "pg_cluster",
    "pg_clusters",
    "pg_databases",
    "pg_drop_databases",
    "pg_row_counts",
    "pg_start_time",
    "postmaster_pid",
    "process_group",
    "process_table",
    "psql",
    "repair_all_services",
    "repair_service",
    "require",
    "require_root",
    "row_counts",
    "run",
    "service_argv",
    "service_running",
    "start_scratch_mariadb",
    "start_service",
    "start_sshd",
    "stat_fields",
    "stop_pid",
    "stop_service",
    "table_checksums",
    "user_databases",
    "wait_for_banner",
    "which",
]

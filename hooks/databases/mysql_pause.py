"""MySQL and MariaDB: hold commits across the snapshot call instead of stopping the server.

MariaDB >= 10.4: ``BACKUP STAGE START, FLUSH, BLOCK_DDL, BLOCK_COMMIT`` (its documented recipe
for storage snapshots), released by ``BACKUP STAGE END``. MySQL and older MariaDB:
``FLUSH TABLES WITH READ LOCK`` (the manual's file-system snapshot recipe), released by
``UNLOCK TABLES``. Reads go on; commits wait. Every wait is bounded by ``lock_wait_timeout``.
"""

from __future__ import annotations

import re
import time

from snapcoord.errors import GuestError, PreflightError, SnapshotFailed
from snapcoord.guest import Transport
from snapcoord.hooks.databases.mysql import PAUSE_METHODS as HOLD
from snapcoord.hooks.databases.mysql import RELEASE, Client
from snapcoord.hooks.databases.pause import (
    MARKER_PREFIX,
    LockLost,
    LockSession,
    PausePlan,
    PauseResult,
)
from snapcoord.settings import DumpConfig, GuestConfig

#: a statement running at least this long when the pause starts is "long"
LONG_STATEMENT_SECONDS = 1
SYSTEM_SCHEMAS = ("mysql", "sys", "information_schema", "performance_schema")
#: engines whose writes are not covered by InnoDB's redo log: the datadir is synced first
NON_TRANSACTIONAL = ("MyISAM", "Aria", "CSV", "ARCHIVE", "MRG_MyISAM", "MRG_MYISAM")
_DDL = re.compile(r"^\s*(ALTER|CREATE|DROP|RENAME|TRUNCATE|OPTIMIZE|REPAIR)\b", re.IGNORECASE)
_WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE|REPLACE|LOAD)\b", re.IGNORECASE)
_MARIADB_VERSION = re.compile(r"^(\d+)\.(\d+)")


def lock_wait(guest: GuestConfig) -> int:
    """Bound of every wait for a lock in the session: a third of pause_timeout, at most 10 s."""
    return max(1, min(10, int(guest.pause_timeout / 3)))


def _is_mariadb(version: str) -> bool:
    return "mariadb" in version.lower()


def _supports_backup_stage(version: str) -> bool:
    match = _MARIADB_VERSION.match(version)
    return (
        _is_mariadb(version) and match is not None and ((int(match[1]), int(match[2])) >= (10, 4))
    )


def position_sql(version: str) -> str:
    """The query for the binary log's position: file, offset, and the GTID state."""
    if _is_mariadb(version):
        return "SELECT 'binlog', @@gtid_binlog_pos; SHOW MASTER STATUS"
    match = _MARIADB_VERSION.match(version)
    newer = match is not None and (int(match[1]), int(match[2])) >= (8, 2)
    status = "SHOW BINARY LOG STATUS" if newer else "SHOW MASTER STATUS"
    return f"SELECT 'binlog', @@global.gtid_executed; {status}"


def _position(rows: list[list[str]]) -> dict[str, str]:
    position: dict[str, str] = {}
    for row in rows:
        if row and row[0] == "binlog":
            position["gtid"] = row[1] if len(row) > 1 else ""
        elif len(row) >= 2:
            position["file"], position["offset"] = row[0], row[1]
    return position


def check_pause(
    transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
) -> PausePlan:
    """Before anything is held: the method, the binary log, whether the datadir needs a sync."""
    client = Client.from_config(options, guest, vm=vm)
    tools = transport.run(
        ["sh", "-c", "for t in timeout sync mysql; do command -v $t >/dev/null || echo $t; done"],
        sudo=guest.sudo,
        timeout=guest.command_timeout,
    )
    missing = tools.stdout.decode().split()
    if not tools.ok or missing:
        raise PreflightError(
            f"consistency = 'pause' needs {', '.join(missing) or 'timeout, sync, mysql'} in the "
            "guest",
            vm=vm,
            hint="install coreutils and the MariaDB/MySQL client",
        )
    names = ", ".join(f"'{s}'" for s in SYSTEM_SCHEMAS)
    engines = ", ".join(f"'{e}'" for e in NON_TRANSACTIONAL)
    rows = client.query(
        transport,
        "SELECT VERSION(), @@log_bin, @@innodb_flush_log_at_trx_commit, @@datadir;"  # noqa: S608
        "SELECT ENGINE, COUNT(*) FROM information_schema.TABLES"
        f" WHERE TABLE_SCHEMA NOT IN ({names}) AND TABLE_TYPE = 'BASE TABLE'"
        f" AND ENGINE IN ({engines}) GROUP BY ENGINE;",
        timeout=guest.command_timeout,
    )
    version, log_bin, flush, datadir = rows[0][:4]
    method = guest.pause_method
    if method == "auto":
        method = "backup_stage" if _supports_backup_stage(version) else "ftwrl"
    elif method == "backup_stage" and not _supports_backup_stage(version):
        raise PreflightError(
            f"pause_method = 'backup_stage' needs MariaDB 10.4 or later; the guest runs {version}",
            vm=vm,
            hint="set pause_method = 'ftwrl' or 'auto'",
        )
    sync = []
    if flush != "1":
        sync.append(f"innodb_flush_log_at_trx_commit = {flush}")
    engines_found = {r[0]: int(r[1]) for r in rows[1:] if len(r) >= 2}
    sync += [f"{count} {engine} table(s)" for engine, count in engines_found.items()]
    return PausePlan(
        method=method,
        server_version=version,
        binlog=log_bin == "1",
        sync=sync,
        datadir=datadir,
        statements=list(HOLD[method]),
        release=list(RELEASE[method]),
        extra={"non_transactional_tables": engines_found},
    )


def long_statements(session: LockSession, *, method: str, non_transactional: bool,
                    timeout: float) -> list[str]:  # fmt: skip
    """Statements that would make the pause wait (or block readers) if it started now."""
    rows = session.execute(
        "SELECT ID, TIME, COMMAND, LEFT(REPLACE(REPLACE(COALESCE(INFO, ''), '\\n', ' '),"  # noqa: S608
        " '\\t', ' '), 120), USER FROM information_schema.PROCESSLIST"
        " WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Sleep', 'Daemon', 'Binlog Dump',"
        " 'Binlog Dump GTID', 'Killed', 'Connect') AND USER NOT IN ('system user',"
        f" 'event_scheduler') AND TIME >= {LONG_STATEMENT_SECONDS}",
        timeout=timeout,
    )
    found = []
    for row in rows:
        if len(row) < 4:
            continue
        info = row[3]
        if method == "ftwrl" or _DDL.match(info) or (non_transactional and _WRITE.match(info)):
            found.append(f"id {row[0]} running {row[1]} s: {_kind_of(info, row)}")
    return found


_SAFE_WORD = re.compile(r"[A-Za-z_]{1,20}")


def _kind_of(info: str, row: list[str]) -> str:
    """What a session runs, never its text: another session's SQL may carry a password
    (``ALTER USER … IDENTIFIED BY``) and ends up in error lines, last-run.json and webhooks."""
    words = info.split()
    verb = words[0].upper() if words and _SAFE_WORD.fullmatch(words[0]) else ""
    user = row[4] if len(row) > 4 and _SAFE_WORD.fullmatch(row[4].replace("-", "_")) else "?"
    what = f"a {verb} statement" if verb else f"command {row[2]}"
    return f"{what} of user {user}"


class MySQLPause:
    """One pause: hold, verify after the snapshot, release (always, idempotent)."""

    def __init__(
        self,
        transport: Transport,
        *,
        vm: str,
        guest: GuestConfig,
        options: DumpConfig,
        plan: PausePlan,
        run_id: str,
    ) -> None:
        self.transport = transport
        self.vm = vm
        self.guest = guest
        self.plan = plan
        self.client = Client.from_config(options, guest, vm=vm)
        self.wait = lock_wait(guest)
        self.result = PauseResult(plan.method)
        self.session = LockSession(
            transport,
            [
                "mysql",
                *self.client.session_args(
                    "--batch", "--unbuffered", "--skip-reconnect", "--skip-column-names"
                ),
                f"--init-command=SET @snapcoord_session = '{MARKER_PREFIX}{run_id}'",
            ],
            vm=vm,
            sudo=guest.sudo,
            limit=guest.pause_timeout,
            option_file=self.client.option_file(),
        )
        self._held = False

    def _q(self, sql: str, timeout: float | None = None) -> list[list[str]]:
        return self.session.execute(sql, timeout=timeout or self.guest.command_timeout)

    def remaining(self) -> float:
        return self.session.remaining()

    def hold(self) -> None:
        plan = self.plan
        self.session.start()
        try:
            rows = self._q("SELECT CONNECTION_ID()")
        except LockLost as exc:  # nothing is held yet: a preflight failure
            raise GuestError(f"cannot open the lock session: {exc.message}", vm=self.vm) from exc
        self.result.connection_id = int(rows[0][0])
        self._q(f"SET SESSION lock_wait_timeout = {self.wait}")
        busy = long_statements(
            self.session,
            method=plan.method,
            non_transactional=bool(plan.extra.get("non_transactional_tables")),
            timeout=self.guest.command_timeout,
        )
        if busy:
            raise PreflightError(
                f"not pausing writes: {'; '.join(busy[:3])}"
                + (f" (and {len(busy) - 3} more)" if len(busy) > 3 else ""),
                vm=self.vm,
                hint="the pause would wait behind it (and with FLUSH TABLES WITH READ LOCK "
                "block readers too); run again when it has finished, or use consistency = 'stop'",
            )
        self._held = True  # from the first stage on, something may be held
        for statement in plan.statements:
            self._q(statement, timeout=self.wait + 5)
        self.result.held_from = time.time()
        if plan.binlog:
            self.result.position = _position(self._q(position_sql(plan.server_version)))
        if plan.sync and plan.datadir:
            synced = self.transport.run(
                ["sh", "-c", 'exec sync -f "$1"', "sh", plan.datadir],  # one sudo rule: sh
                sudo=self.guest.sudo,
                timeout=max(1.0, min(self.guest.command_timeout, self.remaining() - 2)),
            )
            if not synced.ok:
                raise SnapshotFailed(
                    f"sync -f {plan.datadir} failed: {synced.error_text()}", vm=self.vm
                )
            self.result.synced = list(plan.sync)

    def check_alive(self) -> None:
        """Right before the hypervisor call: the session still holds, with time to spare."""
        if not self.session.alive:
            raise LockLost(
                f"the lock session ended before the snapshot: {self.session.error_text()}",
                vm=self.vm,
            )
        if self.remaining() < 2:
            raise LockLost(
                f"pause_timeout ({self.guest.pause_timeout:g} s) is spent before the snapshot",
                vm=self.vm,
                hint="raise pause_timeout, or shorten the frozen hooks",
            )

    def verify(self) -> None:
        """After the snapshot: the same session still holds and no commit slipped through."""
        # One round trip while commits are still held: the session's id, then the position.
        sql = "SELECT 'connection', CONNECTION_ID()"
        if self.plan.binlog:
            sql += "; " + position_sql(self.plan.server_version)
        try:
            rows = self._q(sql, timeout=max(1.0, self.remaining()))
        except LockLost as exc:
            raise LockLost(
                f"{exc.message}; the lock may have been released during the snapshot, which is "
                "then crash-consistent only",
                vm=self.vm,
                hint="raise pause_timeout above the snapshot call's duration",
            ) from exc
        if int(rows[0][1]) != self.result.connection_id:
            raise LockLost("the lock session reconnected: the lock was lost", vm=self.vm)
        if self.plan.binlog:
            after = _position(rows[1:])
            if after != self.result.position:
                raise SnapshotFailed(
                    f"the commit position moved while writes were held ({self.result.position} "
                    f"-> {after}): the snapshot is crash-consistent only",
                    vm=self.vm,
                )

    def release(self) -> None:
        """Release the lock (END / UNLOCK TABLES), then end the session; ending it releases
        too, and the guest's time limit is the last resort."""
        if self.session.alive and self._held:
            self.result.release_sent = time.time()
            # Past the guest's time limit the session is gone: do not wait for its answer.
            timeout = max(1.0, min(self.guest.command_timeout, self.remaining() + 2))
            for statement in self.plan.release:
                try:
                    self._q(statement, timeout=timeout)
                except LockLost:
                    break  # the session is gone: so is its lock
        if self._held and self.result.held_from is not None and self.result.released_at is None:
            self.result.released_at = time.time()
        self._held = False
        self.session.close()


def prove_writes(transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig,
                 run_id: str) -> None:  # fmt: skip
    """Commit one row (in a scratch database, dropped again): no lock from a snapshot's
    lock session survives. Bounded by lock_wait_timeout."""
    client = Client.from_config(options, guest, vm=vm)
    wait = lock_wait(guest)
    scratch = "snapcoord_probe"
    try:
        client.query(
            transport,
            f"SET SESSION lock_wait_timeout = {wait};"  # noqa: S608 (constants and a run id)
            f"CREATE DATABASE IF NOT EXISTS {scratch};"
            f"CREATE TABLE IF NOT EXISTS {scratch}.probe (run VARCHAR(64)) ENGINE=InnoDB;"
            f"INSERT INTO {scratch}.probe VALUES ('{run_id}');"
            f"DROP DATABASE {scratch};",
            timeout=wait * 4 + guest.command_timeout,
        )
    except GuestError as exc:
        raise SnapshotFailed(
            f"a test write did not commit after the revert: {exc.message}",
            vm=vm,
            hint="a lock from the snapshot may still be held: look at SHOW PROCESSLIST",
        ) from exc


def position(
    transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
) -> dict[str, str] | None:
    """The binary log's position now (None when the binary log is off)."""
    client = Client.from_config(options, guest, vm=vm)
    rows = client.query(transport, "SELECT VERSION(), @@log_bin;", timeout=guest.command_timeout)
    if rows[0][1] != "1":
        return None
    return _position(client.query(transport, position_sql(rows[0][0]) + ";",
                                  timeout=guest.command_timeout))  # fmt: skip

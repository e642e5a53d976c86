"""Database kinds: one module per kind behind one protocol, and the registry that picks one.

A kind knows its server in the guest: which services run it, how the guest scripts find its
process and ask whether it answers (shell functions sourced into every service, still-stopped
and watchdog script), and its logical dump: preflight, dump streamed off the guest, restore
(drop first) with row counts compared. The core (services, watchdog, plans, fallback, restore)
calls only this protocol. A new kind is one module here plus its tests (docs/architecture.md).
A kind may also pause writes instead of stopping the server (``consistency = "pause"``: hold
commits across the snapshot call, hooks/databases/pause.py); a kind that cannot refuses it in
``check_pause``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from snapcoord.errors import UsageError

if TYPE_CHECKING:
    from snapcoord.guest import Transport
    from snapcoord.hooks.databases.dumpfile import (
        DumpFormat,
        DumpPlan,
        DumpResult,
        RestoreResult,
        RestoreSource,
    )
    from snapcoord.hooks.databases.pause import PausePlan, WritePause
    from snapcoord.settings import DumpConfig, GuestConfig
    from snapcoord.store import RunDir


class DatabaseKind(Protocol):
    """What a database kind module provides (``hooks/databases/<kind>.py``)."""

    #: the kind's name: ``[vms.X.guest] database = "<name>"`` picks it, the journal records it
    NAME: str
    #: service names that run it, in the order ``database = "auto"`` looks for them
    SERVICES: tuple[str, ...]
    #: the guest tool the verification needs (preflight refuses a guest without it)
    TOOL: str
    #: sh functions for the guest scripts: ``db_pid`` (sets $pid from $PIDFILE, else finds it)
    #: and ``db_alive`` (true when the server answers)
    SHELL: str
    #: sh run by the services probe: prints ``pidfile PATH`` for the server's PID file
    PROBE: str
    #: the manifest section of its dump (``mysqldump``, ``pg_dumpall``)
    SECTION: str
    #: its dump's program, file name and completion line
    FORMAT: DumpFormat
    #: how it can hold commits for ``consistency = "pause"``: method -> its SQL (empty: it cannot)
    PAUSE_METHODS: dict[str, tuple[str, ...]]
    #: dump options a dump taken while the application writes needs (pause mode adds them)
    ONLINE_DUMP_OPTIONS: tuple[str, ...]

    def owns(self, service: str) -> bool:
        """Does ``service`` (a unit or init script name) run this kind of server?"""
        ...

    def check_options(self, options: DumpConfig, *, vm: str) -> list[str]:
        """The dump program's arguments from ``[vms.X.dump]``, or a PreflightError."""
        ...

    def preflight(
        self,
        transport: Transport,
        *,
        vm: str,
        guest: GuestConfig,
        options: DumpConfig,
        store_root: Path | None = None,
    ) -> DumpPlan:
        """Before anything stops: tools, credentials, databases, size (and store space), and
        the compression resolved (``compression = "auto"``: zstd when the tools probe finds
        it in the guest and this host has it, else gzip with the plan's ``compression_reason``)."""
        ...

    def dump(
        self,
        transport: Transport,
        *,
        vm: str,
        guest: GuestConfig,
        options: DumpConfig,
        run_dir: RunDir,
        plan: DumpPlan | None = None,
        compress_on: str | None = None,
    ) -> DumpResult:
        """Stream the dump into ``run_dir`` with the manifest section; DumpFailed otherwise.
        The compression is the plan's; without a plan, ``options``' ("auto" is gzip)."""
        ...

    def check_ready(
        self, transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
    ) -> None:
        """The server answers a query with the configured credentials (restore preflight)."""
        ...

    def prepare_restore(self, source: Path, *, vm: str) -> RestoreSource:
        """Verify a run folder or dump file (checksums, stream, completion line) before any
        change, and find the databases it would drop."""
        ...

    def restore(
        self,
        transport: Transport,
        *,
        vm: str,
        guest: GuestConfig,
        options: DumpConfig,
        source: Path | RestoreSource,
        dry_run: bool = False,
    ) -> RestoreResult:
        """Drop the databases the dump holds, load it, compare row counts with the manifest."""
        ...

    def check_pause(
        self, transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
    ) -> PausePlan:
        """Preflight of ``consistency = "pause"``: the method, what is recorded and synced;
        a PreflightError when the kind (or this server) cannot hold commits."""
        ...

    def pause(
        self,
        transport: Transport,
        *,
        vm: str,
        guest: GuestConfig,
        options: DumpConfig,
        plan: PausePlan,
        run_id: str,
    ) -> WritePause:
        """The pause of one run (not yet holding): ``hold``, ``verify``, ``release``."""
        ...

    def position(
        self, transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig
    ) -> dict[str, str] | None:
        """The commit position now (binary log / GTID), None when there is none."""
        ...

    def prove_writes(
        self, transport: Transport, *, vm: str, guest: GuestConfig, options: DumpConfig, run_id: str
    ) -> None:
        """Commit a test write (after a revert: no lock from the snapshot survives)."""
        ...


def _registry() -> dict[str, DatabaseKind]:
    """Every kind, in the order ``database = "auto"`` tries their services: MySQL/MariaDB
    first, so a guest running both is taken as the MySQL guest it was before PostgreSQL
    support (name the service to choose PostgreSQL there)."""
    from snapcoord.hooks.databases import mysql, postgresql

    kinds: list[DatabaseKind] = [mysql, postgresql]
    return {kind.NAME: kind for kind in kinds}


def names() -> list[str]:
    return list(_registry())


def get(name: str) -> DatabaseKind:
    """The kind called ``name`` (a journal's or a manifest's record)."""
    kinds = _registry()
    if name not in kinds:
        raise UsageError(f"unknown database kind {name!r} (known: {', '.join(kinds)})")
    return kinds[name]


def auto_candidates() -> list[str]:
    """Every service ``database = "auto"`` looks for, kind by kind in registry order."""
    return [service for kind in _registry().values() for service in kind.SERVICES]


def for_service(service: str) -> DatabaseKind:
    """The kind whose server ``service`` runs. A name no kind claims is taken as MySQL, as
    every release before PostgreSQL support did."""
    kinds = _registry()
    for kind in kinds.values():
        if kind.owns(service):
            return kind
    return kinds["mysql"]


def configured(database: str) -> DatabaseKind | None:
    """The kind ``[vms.X.guest] database`` names, None for "auto" (known after the probe) and
    "none"."""
    if database in ("auto", "none"):
        return None
    return _registry().get(database) or for_service(database)


def holds_dump(manifest: dict[str, Any]) -> bool:
    """Whether a run folder's manifest records a database dump (of any kind)."""
    return any(isinstance(manifest.get(kind.SECTION), dict) for kind in _registry().values())


def for_dump(source: Path) -> DatabaseKind:
    """The kind whose dump ``source`` is: a run folder by its manifest's section, a file by
    the manifest next to it or by its name (``mysql.sql.gz``, ``postgresql.sql.gz``)."""
    from snapcoord import store

    kinds = list(_registry().values())
    folder = source if source.is_dir() else source.parent
    if (folder / store.MANIFEST).is_file():
        try:
            manifest = store.read_manifest(folder)
        except Exception:
            manifest = {}
        for kind in kinds:
            section = manifest.get(kind.SECTION)
            if isinstance(section, dict) and (
                source.is_dir() or section.get("file") == source.name
            ):
                return kind
    for kind in kinds:
        if source.name.startswith(kind.FORMAT.stem + "."):
            return kind
    return _registry()["mysql"]

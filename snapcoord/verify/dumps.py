"""Verifying a stored dump: restore it into a throwaway database server on the coordinator and
compare every table with what was recorded when it was taken (docs/verify.md).

The steps run on the step engine, so the throwaway server is stopped and its files removed
whatever happens (a failed load, an exception, SIGINT/SIGTERM/SIGHUP): its start is pushed as an
undo before it runs. The kind's module under ``snapcoord/verify/`` (``mysql``, ``postgresql``:
the same function names) knows its server; this module only strings them together and judges:

1. the run folder's files against the manifest's sha256 (``dumpfile.read_recorded``: the
   completion line and the stream were checked when the dump was stored);
2. a throwaway server of the dump's kind, confined (``snapcoord/verify/scratch.py``);
3. the load, with the client and options ``restore-dump`` uses;
4. per table, the row count and checksum against the manifest's ``tables``/``checksums`` (the
   first difference is named);
5. the database's own consistency check.

A dump that does not load, fails the check or differs is **not verified** (exit 5), and is kept
and marked so (``verify.json`` in its run folder). A verify that cannot run here (binaries
missing, out of disk in ``verify_dir``) judges nothing (exit 4).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from snapcoord import store
from snapcoord.errors import (
    Interrupted,
    SnapcoordError,
    VerifyFailed,
    VerifyUnavailable,
)
from snapcoord.hooks import databases
from snapcoord.hooks.databases import dumpfile
from snapcoord.plans.restore import newest_dump
from snapcoord.run import Engine, Reporter, RunResult, Step
from snapcoord.settings import Config
from snapcoord.store import CorruptDump
from snapcoord.verify import record, scratch
from snapcoord.verify.record import VerifyRecord

if TYPE_CHECKING:
    from snapcoord.hooks.databases.dumpfile import RestoreSource, TableSum

#: how many differences a failed verify lists in its message (all are counted)
SHOWN = 3


class VerifyKind(Protocol):
    """What ``snapcoord/verify/<kind>.py`` provides (docs/architecture.md)."""

    NAME: str
    PACKAGE: str
    #: the kind's table_sums method (hooks/databases/<kind>.CHECKSUM_METHOD)
    CHECKSUM_METHOD: str

    def require(self, *, vm: str) -> None: ...

    def server(
        self, work: Path, *, vm: str, timeout: float
    ) -> contextlib.AbstractContextManager[Any]: ...

    def load(self, server: Any, source: RestoreSource, *, vm: str, timeout: float) -> float: ...

    def measure(
        self, server: Any, databases: Sequence[str], *, vm: str, timeout: float
    ) -> dict[str, TableSum]: ...

    def check(self, server: Any, *, vm: str, timeout: float) -> None: ...


def kind_module(name: str) -> VerifyKind:
    """The verify module of the database kind ``name`` (``snapcoord.verify.<name>``)."""
    if name not in databases.names():
        raise VerifyUnavailable(f"no verify for database kind {name!r}")
    module: Any = importlib.import_module(f"snapcoord.verify.{name}")
    return module  # type: ignore[no-any-return]


def find_run(config: Config, key: str, snapshot: str | None) -> Path:
    """The run folder to verify: ``--from SNAPSHOT``'s, else the VM's newest dump."""
    if snapshot:
        return store.find_dump(config.store, key, snapshot)
    return newest_dump(config, key)


# -- comparing ------------------------------------------------------------------------------


def differences(
    expected_rows: dict[str, int],
    expected_sums: dict[str, str] | None,
    found: dict[str, TableSum],
) -> list[str]:
    """Every table that differs between the record and the restored server, by table name."""
    problems = []
    for table in sorted(set(expected_rows) | set(found)):
        want, got = expected_rows.get(table), found.get(table)
        if got is None:
            problems.append(f"table {table}: recorded with {want} rows, missing after the load")
        elif want is None:
            problems.append(f"table {table}: loaded ({got.rows} rows) but not in the record")
        elif want != got.rows:
            problems.append(f"table {table}: {want} rows recorded, {got.rows} loaded")
        elif expected_sums is not None and expected_sums.get(table) != got.checksum:
            problems.append(
                f"table {table}: {got.rows} rows as recorded, but the checksum differs "
                f"(recorded {expected_sums.get(table)}, loaded {got.checksum}): the data changed"
            )
    return problems


def _measured_databases(prepared: RestoreSource, expected: dict[str, int]) -> list[str]:
    return sorted({name.split(".", 1)[0] for name in expected} | set(prepared.to_drop))


# -- the run -------------------------------------------------------------------------------


class DumpVerify:
    """One verify of one run folder; :meth:`run` returns its record (also saved)."""

    def __init__(self, config: Config, key: str, run_dir: Path) -> None:
        self.config = config
        self.key = key
        self.run_dir = run_dir
        self.timeout = config.vm(key).dump.verify_timeout
        self.kind = databases.for_dump(run_dir)
        self.prepared: RestoreSource | None = None
        self.verifier: VerifyKind | None = None
        self.server: Any = None
        self._stack = contextlib.ExitStack()
        self.split: dict[str, float] = {}
        self.tables = 0
        self.rows = 0
        self.compared = "none"
        self.mismatches: list[str] = []
        self.notes: list[str] = []

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.split[phase] = self.split.get(phase, 0.0) + time.monotonic() - started

    def steps(self) -> list[Step]:
        program = self.kind.FORMAT.program
        return [
            Step("check the stored dump", self._prepare, describe=f"sha256 of {self.run_dir}"),
            Step(
                "start a throwaway database server",
                self._start,
                self._stop,
                undo_name="stop the throwaway server and remove its files",
                undo_first=True,
                describe=f"a {self.kind.NAME} server on a private socket in "
                f"{self.config.defaults.verify_dir}",
            ),
            Step("load the dump", self._load, describe=f"the {program} dump, as restore-dump"),
            Step("compare every table", self._compare, describe="rows and checksums"),
            Step("check the database", self._check, describe="the database's own check"),
        ]

    def _prepare(self) -> None:
        with self._timed("prepare"):
            try:
                self.prepared = dumpfile.read_recorded(self.run_dir, self.kind.FORMAT, vm=self.key)
            except CorruptDump as exc:  # a changed or truncated file is a failed verify
                raise VerifyFailed(exc.message, vm=self.key) from None
            self.verifier = kind_module(self.kind.NAME)
            self.verifier.require(vm=self.key)

    def _start(self) -> None:
        assert self.verifier is not None
        with self._timed("start"):
            work = self._stack.enter_context(
                scratch.workspace(Path(self.config.defaults.verify_dir), vm=self.key)
            )
            self.server = self._stack.enter_context(
                self.verifier.server(work, vm=self.key, timeout=self.timeout)
            )

    def _stop(self) -> None:
        with self._timed("teardown"):
            self._stack.close()

    def _load(self) -> None:
        assert self.verifier is not None and self.prepared is not None
        with self._timed("load"):
            self.verifier.load(self.server, self.prepared, vm=self.key, timeout=self.timeout)

    def _compare(self) -> None:
        assert self.verifier is not None and self.prepared is not None
        prepared = self.prepared
        expected = prepared.expected_rows
        sums = prepared.expected_checksums
        with self._timed("compare"):
            found = self.verifier.measure(
                self.server,
                _measured_databases(prepared, expected or {}),
                vm=self.key,
                timeout=self.timeout,
            )
        self.tables = len(found)
        self.rows = sum(t.rows for t in found.values())
        if not prepared.figures_comparable:
            self.notes.append(
                "consistency = pause: the figures were recorded while the application wrote, "
                "so they were not compared (the load and the check were)"
            )
            return
        if expected is None:
            self.notes.append("the manifest records no tables: only the load and check were run")
            return
        method = prepared.checksum_method
        if sums is not None and method != self.verifier.CHECKSUM_METHOD:
            self.notes.append(
                f"the dump's checksums were made by {method}, this snapcoord makes "
                f"{self.verifier.CHECKSUM_METHOD}: only row counts were compared"
            )
            sums = None
        self.compared = "checksums" if sums is not None else "rows"
        if sums is None and method is None:
            self.notes.append("the dump records no checksums (taken by an older snapcoord)")
        self.mismatches = differences(expected, sums, found)
        if self.mismatches:
            shown = "; ".join(self.mismatches[:SHOWN])
            more = len(self.mismatches) - SHOWN
            raise VerifyFailed(
                shown + (f" (+{more} more)" if more > 0 else ""),
                vm=self.key,
                hint="the dump is kept and marked unverified: take a new one",
            )

    def _check(self) -> None:
        assert self.verifier is not None
        with self._timed("check"):
            self.verifier.check(self.server, vm=self.key, timeout=self.timeout)

    def run(self, reporter: Reporter | None = None) -> tuple[VerifyRecord, RunResult]:
        started = time.monotonic()
        result = Engine(reporter).execute(self.steps())
        verified, problem = judge(result)
        found = record.VerifyRecord(
            vm=self.key,
            what="dump",
            snapshot=self.run_dir.name,
            verified=verified,
            finished=time.time(),
            seconds=time.monotonic() - started,
            kind=self.kind.NAME,
            tables=self.tables,
            rows=self.rows,
            compared=self.compared,
            problem=problem,
            mismatches=len(self.mismatches),
            split=self.split,
        )
        try:
            record.save(self.config.store, found, self.run_dir)
        except (OSError, SnapcoordError) as exc:
            self.notes.append(f"the verify result could not be saved: {exc}")
        return found, result


def judge(result: RunResult) -> tuple[bool | None, str | None]:
    """(verified, the first problem) of a verify run: False for a dump that failed, None for a
    verify that could not run or was interrupted."""
    if result.ok:
        return True, None
    first = result.failures[0]
    text = first.text() if isinstance(first, SnapcoordError) else repr(first)
    if isinstance(first, VerifyFailed):
        return False, text
    if isinstance(first, Interrupted | KeyboardInterrupt):
        return None, "interrupted"
    return None, text

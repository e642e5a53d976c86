"""One command's hold on one VM: its lock, its run journal, and the step engine whose progress
the journal records. Every command that changes a VM goes through it (snapshot, revert, delete,
restore-dump, recover), so no two of them run on a VM at once and a crash always leaves a
journal that ``recover`` can act on.

The journal is written (with fsync) only when what ``recover`` needs changed: once the watchdog
is armed it names every service to stop, so the service window itself writes nothing.
"""

from __future__ import annotations

import os
from typing import Any

from snapcoord.config import Config
from snapcoord.journal import Journal
from snapcoord.leftovers import DISARM, check_unfinished_run, read_record, unfinished
from snapcoord.lock import VMLock
from snapcoord.plans import RunContext
from snapcoord.run import Engine, Reporter, RunResult, Step


class Session:
    """``with Session(config, key, run_id) as session:`` holds the VM's lock (exit 75 when
    another run has it); :meth:`execute` runs a plan with the journal kept current."""

    def __init__(self, config: Config, key: str, run_id: str) -> None:
        self.config = config
        self.key = key
        self.journal = Journal(config.store, key)
        self.lock = VMLock(config.store, key, run_id)
        #: only a run that started may write or remove the journal
        self.owns_journal = False

    def __enter__(self) -> Session:
        self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    def execute(self, ctx: RunContext, steps: list[Step], reporter: Reporter) -> RunResult:
        """Check what an unfinished earlier run left (refuse, or clear it with a note), then
        run ``steps``, saving the journal whenever what ``recover`` reads changes."""
        previous = read_record(self.config, self.key)
        if previous is not None and unfinished(previous):
            ctx.notes.append(check_unfinished_run(self.config, self.key, previous))
        if previous is not None and ctx.lease is not None:
            # a run of ours that did not finish (killed): it is gone (we hold the VM lock), so
            # is its hold on the guest (docs/lease.md)
            ctx.lease.inherit = (previous.run,)
        self.journal.clear()
        self.owns_journal = True
        written: list[dict[str, Any]] = []

        def save(engine: Engine) -> None:
            pending = [s.undo_name or s.name for s in engine.pending_undos]
            data = ctx.journal_data()
            key = {**data, DISARM: DISARM in pending}  # recover reads only that of pending
            if written and written[-1] == key:
                return
            written.append(key)
            self.journal.write({**data, "pending": pending, "pid": os.getpid()})

        result = Engine(reporter, window=ctx.window, on_change=save).execute(steps)
        result.failures.extend(ctx.soft_failures)
        return result

    def finish(self, ctx: RunContext, result: RunResult, summary: dict[str, Any]) -> None:
        """Record the run's summary. A service left down (or a watchdog left armed) keeps the
        journal: the next run checks the guest before it goes on; ``recover`` starts what is
        down."""
        if not self.owns_journal:
            return
        keep = bool(result.window.still_down) or ctx.watchdog is not None
        self.journal.finish(summary, keep_journal=keep)

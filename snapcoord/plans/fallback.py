"""The logical fallback inside a snapshot run: the database's dump (its kind's, e.g. mysqldump or
pg_dumpall) and file archives streamed off the guest into ``<store>/<vm>/<snapshot>/``.

Preflight checks the client tools, credentials, databases and free space, and opens the run
folder; inside the window (services stopped, database still up) the dump and the archive are
streamed; after the services are back the folder is committed (or kept as ``.failed``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from snapcoord import schema, store
from snapcoord.errors import PreflightError
from snapcoord.hooks import archive, databases
from snapcoord.hooks.databases.dumpfile import DumpFailed, DumpPlan, fallback_note
from snapcoord.run import Step
from snapcoord.settings import DumpConfig, VMConfig

if TYPE_CHECKING:
    from snapcoord.plans.context import RunContext


class Fallback:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        guest = ctx.guest
        self.want_dump = guest.dump
        self.paths: list[str] = list(ctx.vm_cfg.archive.paths)
        self.plan: DumpPlan | None = None
        #: the database kind, when [guest] database names one; else known after the probe
        self.kind = databases.configured(guest.database)
        self.run_dir: store.RunDir | None = None
        self.pausing = guest.consistency == "pause"
        self._dump_record: dict[str, Any] = {}  # pause mode: when and at what position

    def options(self) -> DumpConfig:
        """``[vms.X.dump]``; in pause mode with the options a dump taken while the application
        writes needs (``--single-transaction`` for MySQL), added when missing."""
        options = self.ctx.vm_cfg.dump
        if not self.pausing or self.kind is None or not self.kind.ONLINE_DUMP_OPTIONS:
            return options
        base = options.options
        if base is None:
            base = schema.DEFAULT_DUMP_OPTIONS[self.kind.NAME]
        missing = tuple(o for o in self.kind.ONLINE_DUMP_OPTIONS if o not in base)
        return dataclasses.replace(options, options=(*base, *missing)) if missing else options

    @property
    def enabled(self) -> bool:
        return self.wanted(self.ctx.vm_cfg)

    @staticmethod
    def wanted(vm_cfg: VMConfig) -> bool:
        """Whether a run of ``vm_cfg`` stores anything: a dump or file archives."""
        return vm_cfg.guest is not None and (vm_cfg.guest.dump or bool(vm_cfg.archive.paths))

    def preflight_steps(self) -> list[Step]:
        if not self.enabled:
            return []
        what = " and ".join(
            w for w, on in (("dump", self.want_dump), ("archive", self.paths)) if on
        )
        return [
            Step(
                f"check {what} and store",
                self._preflight,
                self._finish,
                undo_name="commit dump to store",
                describe=f"client tools, credentials, free space in {self.ctx.config.store}",
            )
        ]

    def window_steps(self) -> list[Step]:
        steps = []
        if self.want_dump:
            options = self.options()
            if self.kind:
                args = " ".join(self.kind.check_options(options, vm=self.ctx.key))
                what = f"{self.kind.FORMAT.program} {args}"
            else:  # database = "auto": the probe picks the kind
                what = "the dump program of the database found (mysqldump, pg_dumpall)"
            codec = options.compression
            if codec == "auto":
                codec = "zstd (gzip where zstd is missing)"
            steps.append(
                Step(
                    "dump to store",
                    self._dump,
                    describe=f"{what} | {codec} > store"
                    + (", before the pause, while the application runs" if self.pausing else ""),
                )
            )
        if self.paths:
            steps.append(
                Step("archive files to store", self._archive, describe=" ".join(self.paths))
            )
        return steps

    # -- actions ---------------------------------------------------------------------------
    def _preflight(self) -> None:
        ctx = self.ctx
        assert ctx.transport is not None and ctx.services is not None
        root = ctx.config.store
        if self.want_dump:
            state = ctx.services.state
            if state is None or state.kind is None:
                raise PreflightError(
                    "dump = true, but the guest has no database service",
                    vm=ctx.key,
                    hint="set [vms.X.guest] database, or dump = false",
                )
            self.kind = databases.get(state.kind)
            self.plan = self.kind.preflight(
                ctx.transport,
                vm=ctx.key,
                guest=ctx.guest,
                options=self.options(),
                store_root=root,
            )
            if self.plan.compression_reason:
                ctx.notes.append(fallback_note(ctx.key, self.plan.compression_reason))
            if self.plan.threads_note:
                ctx.notes.append(self.plan.threads_note)
        if self.paths:
            archive.preflight(
                ctx.transport,
                vm=ctx.key,
                paths=self.paths,
                sudo=ctx.guest.sudo,
                timeout=ctx.guest.command_timeout,
                store_root=root,
            )
        self.run_dir = store.RunDir.begin(root, ctx.key, ctx.run_folder or ctx.snapshot_name)

    def _dump(self) -> None:
        ctx = self.ctx
        assert ctx.transport is not None and self.run_dir is not None and self.kind is not None
        if self.pausing:
            self._dump_record["position_at_dump"] = self.kind.position(
                ctx.transport, vm=ctx.key, guest=ctx.guest, options=ctx.vm_cfg.dump
            )
        options = self.options()
        if self.plan is not None:  # the compression preflight resolved ("auto": zstd or gzip)
            options = dataclasses.replace(options, compression=self.plan.compression)
        try:
            result = self.kind.dump(
                ctx.transport,
                vm=ctx.key,
                guest=ctx.guest,
                options=options,
                run_dir=self.run_dir,
                plan=self.plan,
                compress_on=compress_on(ctx),
            )
        except DumpFailed as exc:
            if ctx.vm_cfg.dump.on_dump_failure == "continue":
                ctx.soft_failures.append(exc)
                ctx.notes.append("the dump failed; snapshot taken anyway (on_dump_failure)")
                return
            raise
        self._dump_record["dump_ended"] = time.time()
        ctx.outputs["dump"] = {
            "file": result.path.name,
            "format": "parallel" if result.parts else "single",
            **({"parts": result.parts} if result.parts else {}),
            "compression": result.compression,
            "sha256": result.sha256,
            "bytes": result.size,
            "sql_bytes": result.sql_bytes,
            "rows": result.rows,
            "seconds": round(result.seconds, 3),
        }

    def _archive(self) -> None:
        ctx = self.ctx
        assert ctx.transport is not None and self.run_dir is not None
        result = archive.dump(
            ctx.transport,
            vm=ctx.key,
            paths=self.paths,
            run_dir=self.run_dir,
            sudo=ctx.guest.sudo,
            timeout=ctx.guest.dump_timeout,
        )
        ctx.outputs["archive"] = {"sha256": result.sha256, "bytes": result.size}
        ctx.notes += result.warnings

    def _finish(self) -> None:
        """After the services are back: keep what was stored, say whether a snapshot exists."""
        run = self.run_dir
        if run is None:
            return
        if not run.files and not run.failed:
            run.discard()
            return
        run.sections["snapshot_taken"] = self.ctx.snapshot is not None
        if self.ctx.snapshot_by:  # the snapshot is another tool's
            run.sections["snapshot_by"] = self.ctx.snapshot_by
        if self.pausing:
            run.sections["consistency"] = self._pause_record()
        self.ctx.outputs["store_folder"] = str(run.commit())

    def _pause_record(self) -> dict[str, Any]:
        """In pause mode the dump precedes the snapshot: by how long, at which position."""
        record: dict[str, Any] = {"mode": "pause", **self._dump_record}
        pause = self.ctx.pause
        held_from = pause.result.held_from if pause is not None else None
        ended = self._dump_record.get("dump_ended")
        if held_from is not None and ended is not None:
            record["dump_precedes_snapshot_seconds"] = round(held_from - ended, 3)
            record["snapshot_position"] = pause.result.position if pause else None
        return record


def compress_on(ctx: RunContext) -> str:
    """``[vms.X.dump] compress_on`` with ``auto`` resolved: gzip runs in the guest when the
    dump crosses the guest agent (its data path, not gzip, is the bottleneck: 1.5-2.2 x the
    time over SSH with gzip on the coordinator, 1.0 x with gzip in the guest;
    docs/benchmarks.md), else on the coordinator."""
    chosen = ctx.vm_cfg.dump.compress_on
    if chosen != "auto":
        return chosen
    guest = ctx.guest
    through_agent = guest.transport == "agent" and guest.dump_transport == "agent"
    return "guest" if through_agent else "coordinator"

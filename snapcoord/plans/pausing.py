"""``consistency = "pause"``: instead of stopping anything, hold the database's commits for the
hypervisor's snapshot call (hooks/databases/pause.py); the undo releases them, always."""

from __future__ import annotations

from snapcoord.errors import PreflightError
from snapcoord.hooks import databases
from snapcoord.hooks.databases.pause import PausePlan, WritePause
from snapcoord.plans.context import RunContext
from snapcoord.run import Step


class Pause:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.plan: PausePlan | None = None
        self.pause: WritePause | None = None

    def _kind(self) -> databases.DatabaseKind:
        state = self.ctx.services.state if self.ctx.services else None
        if state is None or state.kind is None:
            raise PreflightError(
                "consistency = 'pause' needs a database, but the guest has none",
                vm=self.ctx.key,
                hint="set [vms.X.guest] consistency = 'stop' (or name the database)",
            )
        if not state.database_running:
            raise PreflightError(
                f"consistency = 'pause': {state.database} is not running",
                vm=self.ctx.key,
                hint="start it, or use consistency = 'stop'",
            )
        return databases.get(state.kind)

    def preflight_step(self) -> Step:
        return Step(
            "check write pause",
            self._check,
            describe=f"method {self.ctx.guest.pause_method}, at most "
            f"{self.ctx.guest.pause_timeout:g} s; binary log position; sync needed?",
        )

    def hold_step(self) -> Step:
        guest = self.ctx.guest
        return Step(
            "pause writes",
            self._hold,
            self._release,
            undo_first=True,  # a statement may hold before the step fails
            undo_name="resume writes",
            describe=f"one lock session, ended by the guest after {guest.pause_timeout:g} s at "
            f"the latest: {_sql_plan(guest.database, guest.pause_method)}",
        )

    def verify_step(self) -> Step:
        return Step(
            "check writes still held",
            lambda: self._require().verify(),
            describe="same session (CONNECTION_ID), commit position unchanged",
        )

    def _require(self) -> WritePause:
        assert self.pause is not None, "pause writes must run first"
        return self.pause

    # -- actions ---------------------------------------------------------------------------
    def _check(self) -> None:
        ctx = self.ctx
        assert ctx.transport is not None
        kind = self._kind()
        self.plan = kind.check_pause(
            ctx.transport, vm=ctx.key, guest=ctx.guest, options=ctx.vm_cfg.dump
        )
        if self.plan.sync:
            ctx.notes.append(
                f"the datadir is synced while writes are held ({', '.join(self.plan.sync)})"
            )
        if not self.plan.binlog:
            ctx.notes.append("the binary log is off: no commit position is recorded")

    def _hold(self) -> None:
        ctx = self.ctx
        assert ctx.transport is not None and self.plan is not None
        kind = self._kind()
        if ctx.lease is not None:  # ends no later than the guest ends the lock session
            ctx.lease.renew(ctx.guest.pause_timeout)
        self.pause = kind.pause(
            ctx.transport,
            vm=ctx.key,
            guest=ctx.guest,
            options=ctx.vm_cfg.dump,
            plan=self.plan,
            run_id=ctx.run_id,
        )
        ctx.pause = self.pause
        self.pause.hold()

    def _release(self) -> None:
        pause = self.pause
        if pause is None:
            return
        pause.release()
        result = pause.result
        seconds = result.seconds
        self.ctx.outputs["write_pause_seconds"] = None if seconds is None else round(seconds, 3)
        self.ctx.outputs["position"] = result.position
        self.ctx.outputs["pause"] = result.as_dict()


def _sql_plan(database: str, method: str) -> str:
    """The statements a pause would send (for --dry-run), per method the kind may pick."""
    configured = databases.configured(database)
    kinds = [configured] if configured else [databases.get(n) for n in databases.names()]
    plans = [
        f"{name}: {'; '.join(sql)}"
        for kind in kinds
        for name, sql in kind.PAUSE_METHODS.items()
        if method in ("auto", name)
    ]
    return " | ".join(plans) or "none (this database kind cannot pause writes)"

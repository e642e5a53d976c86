"""The freeze holder (``python -m snapcoord.holder``, started by ``snapcoord freeze``; see
snapcoord/freeze.py): runs the freeze plan for one VM, says "frozen" on its stdout, then waits on
its Unix socket for ``thaw`` or the limit, and unwinds. Its own session, no terminal; stderr
goes to ``<store>/freeze/<vm>.log``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from snapcoord.config import Config, load_config
from snapcoord.errors import Interrupted, SnapcoordError
from snapcoord.freeze import (
    ThawTimeout,
    outcome_dict,
    private_dir,
    socket_path,
    write_line,
)
from snapcoord.outcome import Outcome
from snapcoord.plans.context import RunContext
from snapcoord.plans.freeze import freeze_steps, frozen_config
from snapcoord.run import Step, StepRecord

log = logging.getLogger("snapcoord.holder")

#: the holder restores this long before the limit, so the guest's own limit never has to act
_MARGIN = 2.0
#: a client has this long to say what it wants
_REQUEST_TIMEOUT = 5.0


class Channel:
    """Where events go: ``freeze``'s pipe until frozen, then nowhere, then the thaw's socket.
    A reader that went away is remembered, never an error in the middle of a step."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self.stream = stream
        self.lost = False
        self._lock = threading.Lock()
        self._ids: dict[int, int] = {}

    def send(self, event: dict[str, Any]) -> bool:
        with self._lock:
            if self.stream is None:
                return False
            try:
                write_line(self.stream, event)
                return True
            except OSError:
                self.stream, self.lost = None, True
                return False

    def switch(self, stream: IO[bytes] | None) -> None:
        """Send to ``stream`` from now on; the old one is closed (our stdout: pointed at
        /dev/null, so ``freeze`` sees the end of it)."""
        with self._lock:
            old, self.stream = self.stream, stream
        if old is None or old is stream:
            return
        if old is sys.stdout.buffer:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
            return
        with contextlib.suppress(OSError):
            old.close()

    # the engine's Reporter
    def step_started(self, record: StepRecord) -> None:
        self._step("step_started", record)

    def step_ended(self, record: StepRecord) -> None:
        self._step("step_ended", record)

    def note(self, text: str) -> None:
        self.send({"event": "note", "text": text})

    def _step(self, event: str, record: StepRecord) -> None:
        number = self._ids.setdefault(id(record), len(self._ids))
        self.send({"event": event, "id": number, "record": record.as_dict()})


class ThawWaiter:
    """The socket ``thaw`` connects to, and the wait step of the plan."""

    def __init__(self, config: Config, key: str, channel: Channel, max_seconds: int) -> None:
        self.path = socket_path(config, key)
        self.channel = channel
        self.max_seconds = max_seconds
        self.ctx: RunContext | None = None
        self._server: socket.socket | None = None
        self.ended_by = ""
        # the limit counts from the start: the watchdog and the lock session are started later,
        # with the same limit, so the holder always acts first
        self.started = time.monotonic()
        self.until = round(time.time() + max_seconds, 3)

    def listen(self) -> None:
        private_dir(self.path.parent)
        self.path.unlink(missing_ok=True)  # we hold the VM's lock: any socket here is stale
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        server.listen(8)
        self._server = server

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.path.unlink(missing_ok=True)

    def wait(self) -> None:
        """Frozen: tell ``freeze``, then serve status requests until a thaw or the limit."""
        ctx = self.ctx
        assert ctx is not None and ctx.freeze is not None and self._server is not None
        state = ctx.freeze
        state["until"] = self.until
        if not self.channel.send({"event": "frozen", **state}):
            raise Interrupted(
                "freeze ended before it heard that the guest is quiesced: putting it back",
                vm=ctx.key,
            )
        self.channel.switch(None)
        deadline = self.started + self.max_seconds - _MARGIN
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._ended("limit")
                    raise ThawTimeout(
                        f"no thaw within {self.max_seconds} s: putting the guest back",
                        vm=ctx.key,
                        hint="a snapshot taken from now on is not consistent",
                    )
                self._server.settimeout(min(left, 1.0))
                try:
                    conn, _ = self._server.accept()
                except TimeoutError:
                    continue
                if self._serve(conn, state):
                    self._ended("thaw")
                    return
        finally:
            self.close()  # nobody else may ask now

    def _ended(self, how: str) -> None:
        assert self.ctx is not None
        self.ended_by = how
        self.ctx.outputs.update(ended_by=how, ended_at=round(time.time(), 3))

    def _serve(self, conn: socket.socket, state: dict[str, Any]) -> bool:
        """Answer one client; True when it asked to thaw (it then gets every event)."""
        conn.settimeout(_REQUEST_TIMEOUT)
        try:
            request = conn.makefile("rb").readline().strip()
        except OSError:
            conn.close()
            return False
        if request == b"thaw":
            conn.settimeout(None)
            self.channel.switch(conn.makefile("wb"))
            conn.close()  # the file object keeps the connection open
            return True
        if request == b"status":
            with contextlib.suppress(OSError), conn.makefile("wb") as out:
                write_line(out, {"event": "frozen", **state})
        conn.close()
        return False


def hold(
    config: Config,
    key: str,
    *,
    max_seconds: int,
    source: str,
    vmid: int | None,
    channel: Channel,
) -> Outcome:
    from snapcoord.commands import _run_plan

    config = frozen_config(config, key, max_seconds)
    waiter = ThawWaiter(config, key, channel, max_seconds)

    def build(ctx: RunContext) -> list[Step]:
        ctx.freeze = {
            "pid": os.getpid(),
            "run": ctx.run_id,
            "source": source,
            "vmid": vmid,
            "since": round(time.time(), 3),
            "until": None,
            "max_seconds": max_seconds,
            "consistency": ctx.guest.consistency,
        }
        ctx.outputs["freeze"] = ctx.freeze  # the last run keeps it (vzdump-hook reads it)
        waiter.ctx = ctx
        label = "vzdump" if source == "vzdump" else "freeze"
        return [
            Step("listen for thaw", waiter.listen, waiter.close, undo_name="stop listening"),
            *freeze_steps(ctx, wait=waiter.wait, label=label),
        ]

    outcome = _run_plan(
        argparse.Namespace(dry_run=False),
        config,
        key,
        build,
        title="freeze",
        reporter=channel,
    )
    if waiter.ended_by == "thaw":
        outcome.summary["command"] = "thaw"
        outcome.lines = [_as_thaw(key, line) for line in outcome.lines]
    return outcome


def _as_thaw(key: str, line: str) -> str:
    prefix = f"{key}: freeze "
    return f"{key}: thaw " + line[len(prefix) :] if line.startswith(prefix) else line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="snapcoord-holder")
    parser.add_argument("--config", required=True)
    parser.add_argument("--max-seconds", type=int, required=True)
    parser.add_argument("--source", default="freeze")
    parser.add_argument("--vmid", type=int)
    parser.add_argument("vm")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s snapcoord holder %(process)d: %(message)s"
    )
    channel = Channel(sys.stdout.buffer)
    log.info("freezing %s for at most %s s", args.vm, args.max_seconds)
    try:
        config = load_config(args.config)
        outcome = hold(
            config,
            args.vm,
            max_seconds=args.max_seconds,
            source=args.source,
            vmid=args.vmid,
            channel=channel,
        )
    except SnapcoordError as exc:
        outcome = Outcome.refused(args.vm, "freeze", exc)
    for line in [*outcome.lines, *outcome.errors]:
        log.info("%s", line)
    if not channel.send({"event": "outcome", **outcome_dict(outcome)}):
        log.info("nobody was listening for the outcome")
    channel.switch(None)
    return int(outcome.exit_code)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

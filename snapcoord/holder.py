"""The freeze holder (``python -m snapcoord.holder``, started by ``snapcoord freeze``; see
snapcoord/freeze.py): runs the freeze plan for one VM, says "frozen" on its stdout, then waits on
its Unix socket for ``thaw`` or the limit, and unwinds. Its own session, no terminal; stderr
goes to ``<store>/freeze/<vm>.log``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

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
from snapcoord.runner import run_plan

log = logging.getLogger("snapcoord.holder")

#: the holder restores this long before the limit, so the guest's own limit never has to act
_MARGIN = 2.0
#: a client has this long in all to say what it wants (one line), however it trickles
_REQUEST_TIMEOUT = 5.0
#: the longest request line, and how many clients may be waiting to be heard at once
_MAX_REQUEST = 64
_MAX_CLIENTS = 16
#: each event to thaw is written within this, or thaw is let go (the unwind goes on)
_SEND_TIMEOUT = 10.0


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
        if event == "step_started":
            log.info("step: %s", record.name)
        else:
            log.info("step: %s: %s", record.name, "ok" if record.ok else f"failed: {record.error}")
        number = self._ids.setdefault(id(record), len(self._ids))
        self.send({"event": event, "id": number, "record": record.as_dict()})


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None when there is none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class ThawWaiter:
    """The socket ``thaw`` connects to, and the wait step of the plan."""

    def __init__(self, config: Config, key: str, channel: Channel, max_seconds: int) -> None:
        self.path = socket_path(config, key)
        self.channel = channel
        self.max_seconds = max_seconds
        self.ctx: RunContext | None = None
        self._server: socket.socket | None = None
        self._bound: tuple[int, int] | None = None
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
        self._bound = _identity(self.path)

    def close(self) -> None:
        """Stop listening and remove the socket, but only if it is still this holder's: once the
        VM's lock is free, the next freeze of the VM may already listen at the same path (a
        holder that finished late once removed a new holder's socket, and ``thaw`` then found
        no holder)."""
        if self._server is not None:
            self._server.close()
            self._server = None
            if _identity(self.path) == self._bound:
                self.path.unlink(missing_ok=True)

    def wait(self) -> None:
        """Frozen: tell ``freeze``, then serve status requests until a thaw or the limit.

        The limit is absolute (a monotonic deadline for the whole wait, counted from the
        start): no client, however slow, keeps the guest quiesced past it. Clients are served
        side by side, each within a total deadline for its request line: one that stalls or
        trickles is dropped at its deadline and never stops a thaw from another one."""
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
        server = self._server
        server.setblocking(False)
        clients: dict[socket.socket, _Request] = {}
        selector = selectors.DefaultSelector()
        selector.register(server, selectors.EVENT_READ)
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    self._ended("limit")
                    raise ThawTimeout(
                        f"no thaw within {self.max_seconds} s: putting the guest back",
                        vm=ctx.key,
                        hint="a snapshot taken from now on is not consistent",
                    )
                for conn in [c for c, r in clients.items() if r.deadline <= now]:
                    self._drop(selector, clients, conn)  # its time for a request is up
                ends = [deadline, *(r.deadline for r in clients.values())]
                ready = selector.select(max(min(ends) - now, 0.0))
                # the select may have waited minutes: a client's time counts from its accept
                # (counted from before the select, a thaw long after freeze was dropped unread)
                now = time.monotonic()
                for key, _ in ready:
                    if key.fileobj is server:
                        self._accept(selector, clients, min(now + _REQUEST_TIMEOUT, deadline))
                        continue
                    conn = cast(socket.socket, key.fileobj)
                    request = self._read(clients[conn], conn)
                    if request is None:
                        continue  # not a whole line yet
                    self._drop(selector, clients, conn, close=False)
                    if self._serve(conn, request, state):
                        self._ended("thaw")
                        return
        finally:
            for conn in list(clients):
                self._drop(selector, clients, conn)
            selector.close()
            self.close()  # nobody else may ask now

    def _ended(self, how: str) -> None:
        assert self.ctx is not None
        self.ended_by = how
        self.ctx.outputs.update(ended_by=how, ended_at=round(time.time(), 3))

    def _accept(
        self,
        selector: selectors.BaseSelector,
        clients: dict[socket.socket, _Request],
        deadline: float,
    ) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the waiting clients still count
                log.info("cannot accept a client: %s", exc)
                return
            conn.setblocking(False)
            if len(clients) >= _MAX_CLIENTS:  # the longest waiting gives way to the newest
                self._drop(selector, clients, next(iter(clients)))
            clients[conn] = _Request(deadline)
            selector.register(conn, selectors.EVENT_READ)

    @staticmethod
    def _drop(
        selector: selectors.BaseSelector,
        clients: dict[socket.socket, _Request],
        conn: socket.socket,
        *,
        close: bool = True,
    ) -> None:
        clients.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn)
        if close:
            conn.close()

    @staticmethod
    def _read(request: _Request, conn: socket.socket) -> bytes | None:
        """What ``conn`` asked once its line is whole; b"" when it went away or said too much
        without a newline (dropped like a wrong request); None while the line is incomplete."""
        try:
            data = conn.recv(_MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""
        if not data:
            return b""
        request.data += data
        line, newline, _ = request.data.partition(b"\n")
        if newline:
            return line.strip()
        return b"" if len(request.data) > _MAX_REQUEST else None

    def _serve(self, conn: socket.socket, request: bytes, state: dict[str, Any]) -> bool:
        """Answer one client's request; True when it asked to thaw (it then gets every event,
        each write within ``_SEND_TIMEOUT``: a thaw that stops reading is let go, the unwind
        goes on)."""
        conn.settimeout(_SEND_TIMEOUT)
        known = request.decode() if request in (b"thaw", b"status") else "something else"
        log.info("a client asked for %s", known)
        if request == b"thaw":
            self.channel.switch(conn.makefile("wb"))
            conn.close()  # the file object keeps the connection open
            self.channel.send({"event": "thawing"})
            return True
        if request == b"status":
            with contextlib.suppress(OSError), conn.makefile("wb") as out:
                write_line(out, {"event": "frozen", **state})
        conn.close()
        return False


@dataclass
class _Request:
    """A client that has not said what it wants yet: what it sent so far, and until when."""

    deadline: float
    data: bytes = b""


def hold(
    config: Config,
    key: str,
    *,
    max_seconds: int,
    source: str,
    vmid: int | None,
    channel: Channel,
) -> Outcome:
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

    outcome = run_plan(
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

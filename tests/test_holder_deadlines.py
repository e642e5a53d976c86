"""The freeze holder's limit is absolute, each request has a total deadline, thaw has its own
(issue 23, finding 6).

A client that sent one byte every few seconds used to keep the holder past its limit (the
request timeout was per ``recv``) and, served one at a time, blocked a real ``thaw``; ``thaw``
itself waited forever and died with a traceback when the holder reset the connection at its
limit. Here the waiter runs in-process on its real socket (as in test_freeze.py) against
trickling, silent and real clients, and ``thaw`` against small stand-in holders that reset,
close, garble, stall or trickle. The limits are shortened; the checks are on behaviour (who was
served, who was dropped, which exit code), with generous slack on any time bound.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord import freeze as freeze_module
from snapcoord import holder as holder_module
from snapcoord.cli import main
from snapcoord.errors import ExitCode
from snapcoord.freeze import (
    HolderUnanswered,
    ThawTimeout,
    holder_state,
    private_dir,
    socket_path,
    thaw_deadline,
    thaw_vm,
)
from snapcoord.holder import ThawWaiter
from snapcoord.journal import Journal
from snapcoord.run import SilentReporter
from tests.cli_helpers import write_config
from tests.test_freeze import GUEST, Recorder, _waiter, config


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNUSED_TOKEN", "never-sent")


class Trickler:
    """A client that sends one byte every ``every`` seconds and never a newline; notes when
    the holder dropped it."""

    def __init__(self, path: Path, every: float = 1.0, data: bytes = b"s") -> None:
        self.conn = socket.socket(socket.AF_UNIX)
        self.conn.connect(str(path))
        self.every, self.data = every, data
        self.dropped_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60  # the old holder would keep it forever: not the test
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.conn.sendall(self.data)
            except OSError:
                self.dropped_at = time.monotonic()
                return
            self.stop.wait(self.every)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.conn.close()


class Waiting:
    """``waiter.wait()`` in a thread: when it ended, and how."""

    def __init__(self, waiter: ThawWaiter, parent: Any) -> None:
        self.waiter = waiter
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started_at = time.monotonic()
        self.thread.start()
        assert json.loads(parent.readline())["event"] == "frozen"
        parent.close()

    def _run(self) -> None:
        try:
            self.waiter.wait()
        except BaseException as exc:  # handed to the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def join(self, seconds: float) -> bool:
        self.thread.join(seconds)
        return not self.thread.is_alive()


def thaw_request(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(10)
    conn.connect(str(path))
    conn.sendall(b"thaw\n")
    return conn


# -- the holder: the limit is absolute, each request has a total deadline -----------------------


def test_a_trickling_client_never_keeps_the_holder_past_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte a second, never a newline, and a request deadline longer than the limit: only
    the absolute limit can end it, at the limit (3 s from now), not whenever the client stops."""
    monkeypatch.setattr(holder_module, "_REQUEST_TIMEOUT", 600.0)
    waiter, parent = _waiter(tmp_path, 10)
    waiter.started -= 5  # 10 s limit less the 2 s margin: 3 s are left
    limit_at = waiter.started + 10 - holder_module._MARGIN
    waiting = Waiting(waiter, parent)
    trickler = Trickler(waiter.path, every=1.0)
    try:
        assert waiting.join(limit_at - time.monotonic() + 5), "the client kept the holder"
        assert isinstance(waiting.error, ThawTimeout) and waiter.ended_by == "limit"
        assert waiting.ended_at is not None and waiting.ended_at >= limit_at - 0.5
        trickler.thread.join(5)
        assert trickler.dropped_at is not None, "the trickling client was dropped"
        assert not waiter.path.exists()
    finally:
        trickler.close()


def test_each_request_has_a_total_deadline_however_it_trickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.3 s with a 1.5 s request deadline: dropped at its deadline while the
    holder still waits; a thaw then ends the wait."""
    monkeypatch.setattr(holder_module, "_REQUEST_TIMEOUT", 1.5)
    waiter, parent = _waiter(tmp_path, 120)
    waiting = Waiting(waiter, parent)
    trickler = Trickler(waiter.path, every=0.3, data=b"st")
    conn: socket.socket | None = None
    try:
        trickler.thread.join(10)
        assert trickler.dropped_at is not None, "the trickling client was never dropped"
        assert waiting.thread.is_alive(), "dropping a client does not end the freeze"
        conn = thaw_request(waiter.path)
        assert waiting.join(10) and waiting.error is None and waiter.ended_by == "thaw"
    finally:
        trickler.close()
        if conn is not None:
            conn.close()
        if waiting.thread.is_alive():
            thaw_request(waiter.path).close()
            waiting.join(10)


def test_a_thaw_long_after_freeze_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder idles in its wait far longer than a request's deadline (here 0.5 s; 5 s in
    production, where a backup takes minutes), then a thaw comes: it is heard. Its deadline
    once counted from before the idle wait, so it was dropped unread, and thaw, finding no
    holder, waited for the lock the holder kept."""
    monkeypatch.setattr(holder_module, "_REQUEST_TIMEOUT", 0.5)
    waiter, parent = _waiter(tmp_path, 120)
    waiting = Waiting(waiter, parent)
    conn: socket.socket | None = None
    try:
        time.sleep(2.0)  # the behaviour under test: a thaw well after the request deadline
        assert waiting.thread.is_alive()
        conn = thaw_request(waiter.path)
        assert json.loads(conn.makefile("rb").readline()) == {"event": "thawing"}
        assert waiting.join(10) and waiting.error is None and waiter.ended_by == "thaw"
    finally:
        if conn is not None:
            conn.close()
        if waiting.thread.is_alive():
            thaw_request(waiter.path).close()
            waiting.join(10)


def test_a_stalled_client_connected_first_does_not_block_a_real_thaw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silent and trickling clients (more than the holder keeps waiting) connect first, with a
    request deadline of a minute: a status request and then a thaw are served at once."""
    monkeypatch.setattr(holder_module, "_REQUEST_TIMEOUT", 60.0)
    waiter, parent = _waiter(tmp_path, 300)
    cfg = config(tmp_path / "store", db={"hypervisor": "lab", "guest": GUEST})
    waiting = Waiting(waiter, parent)
    silent = []
    for _ in range(holder_module._MAX_CLIENTS + 4):
        mute = socket.socket(socket.AF_UNIX)
        mute.connect(str(waiter.path))
        silent.append(mute)
    tricklers = [Trickler(waiter.path, every=0.2) for _ in range(2)]
    conn: socket.socket | None = None
    try:
        time.sleep(0.5)
        state = holder_state(cfg, "db")
        assert state is not None and state.vmid == 7, "status is answered meanwhile"
        asked = time.monotonic()
        conn = thaw_request(waiter.path)
        assert waiting.join(10), "the thaw waited behind a stalled client"
        assert waiting.error is None and waiter.ended_by == "thaw"
        assert waiting.ended_at is not None and waiting.ended_at - asked < 10
        assert json.loads(conn.makefile("rb").readline()) == {"event": "thawing"}
    finally:
        for trickler in tricklers:
            trickler.close()
        for mute in silent:
            mute.close()
        if conn is not None:
            conn.close()
        if waiting.thread.is_alive():
            thaw_request(waiter.path).close()
            waiting.join(70)


def test_a_client_that_says_too_much_without_a_newline_is_dropped_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(holder_module, "_REQUEST_TIMEOUT", 60.0)
    waiter, parent = _waiter(tmp_path, 300)
    waiting = Waiting(waiter, parent)
    chatty = socket.socket(socket.AF_UNIX)
    chatty.settimeout(10)
    try:
        chatty.connect(str(waiter.path))
        chatty.sendall(b"x" * (holder_module._MAX_REQUEST + 10))
        assert chatty.recv(10) == b"", "dropped without an answer"
        assert waiting.thread.is_alive()
        thaw_request(waiter.path).close()
        assert waiting.join(10) and waiter.ended_by == "thaw"
    finally:
        chatty.close()


# -- thaw: its own deadlines; a reset, closed or garbled connection is a clean outcome ----------


def thaw_config(tmp_path: Path) -> tuple[Any, Path]:
    path = write_config(
        tmp_path / "c.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
            "vms.db": {"hypervisor": "lab"},
            "vms.db.guest": {"transport": "exec", "exec_prefix": []},
        },
    )
    cfg = config(tmp_path / "store", db={"hypervisor": "lab", "guest": GUEST})
    return cfg, path


def ended_at_its_limit(store: Path) -> None:
    """What the holder leaves when it restored at its limit: no journal, and that last run."""
    Journal(store, "db").finish(
        {"vm": "db", "command": "freeze", "ended_by": "limit", "ended_at": time.time()}
    )


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], None]]:
    """A stand-in holder on db's socket that handles one connection with ``behave``."""
    cfg = config(tmp_path / "store", db={"hypervisor": "lab", "guest": GUEST})
    path = socket_path(cfg, "db")
    private_dir(path.parent)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(4)
    threads: list[threading.Thread] = []

    def start(behave: Callable[[socket.socket], None]) -> None:
        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                behave(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    for thread in threads:
        thread.join(15)
    server.close()


def reset(conn: socket.socket) -> None:
    """Close with the request unread: the kernel resets thaw's side (ECONNRESET)."""
    time.sleep(0.3)


def close_after_reading(conn: socket.socket) -> None:
    conn.makefile("rb").readline()


def garble(conn: socket.socket) -> None:
    conn.makefile("rb").readline()
    conn.sendall(
        b"\x00\xff garbage\n{not json\n[1, 2]\n"
        b'{"event": "step_started", "id": "x", "record": null}\n'
        b'{"event": "note"}\n{"event": "outcome", "vm": "db"}\n'
        b'{"event": "outcome", "vm": "db", "exit_code": "zero", "summary": {}}\n'
    )


def garble_then_reset(conn: socket.socket) -> None:
    conn.sendall(b'{"event": "thawing"}\n{"event": "step_st')
    time.sleep(0.3)


@pytest.mark.parametrize("behave", [reset, close_after_reading, garble, garble_then_reset])
def test_a_holder_that_went_away_at_its_limit_is_exit_5_in_one_line(
    tmp_path: Path,
    stand_in: Callable[[Callable[[socket.socket], None]], None],
    capsys: pytest.CaptureFixture[str],
    behave: Callable[[socket.socket], None],
) -> None:
    cfg, path = thaw_config(tmp_path)
    ended_at_its_limit(tmp_path / "store")
    stand_in(behave)
    code = main(["-c", str(path), "thaw", "db"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == ExitCode.SNAPSHOT_FAILED, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert "reached its limit before thaw" in lines[0]
    assert Journal(cfg.store, "db").read_last().get("thaw_reported") is True


def test_a_holder_that_went_away_without_a_freeze_left_is_nothing_to_thaw(
    tmp_path: Path, stand_in: Callable[[Callable[[socket.socket], None]], None]
) -> None:
    cfg, _ = thaw_config(tmp_path)
    stand_in(reset)
    outcome = thaw_vm(cfg, "db", reporter=SilentReporter())
    assert outcome.exit_code == 0 and "nothing was frozen" in outcome.lines[0]


def test_a_holder_that_never_answers_is_exit_6_within_thaws_answer_deadline(
    tmp_path: Path,
    stand_in: Callable[[Callable[[socket.socket], None]], None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(freeze_module, "_THAW_ANSWER", 1.0)
    _, path = thaw_config(tmp_path)
    gone = threading.Event()
    stand_in(lambda conn: gone.wait(15))  # accepts, reads nothing, says nothing
    asked = time.monotonic()
    code = main(["-c", str(path), "thaw", "db"])
    gone.set()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == ExitCode.SERVICE_NOT_RESTORED and len(lines) == 1, err
    assert "did not answer the thaw within 1 s" in lines[0] and "Traceback" not in err
    assert time.monotonic() - asked < 10


def test_a_holder_that_answers_but_never_finishes_meets_thaws_total_deadline(
    tmp_path: Path,
    stand_in: Callable[[Callable[[socket.socket], None]], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It keeps talking (a note every 0.2 s), so no idle timeout would ever fire."""
    monkeypatch.setattr(freeze_module, "thaw_deadline", lambda vm: 2.0)
    cfg, _ = thaw_config(tmp_path)
    gone = threading.Event()

    def chatter(conn: socket.socket) -> None:
        conn.makefile("rb").readline()
        conn.sendall(b'{"event": "thawing"}\n')
        stop_at = time.monotonic() + 15  # a thaw without deadline would wait forever
        while not gone.wait(0.2) and time.monotonic() < stop_at:
            try:
                conn.sendall(b'{"event": "note", "text": "still busy"}\n')
            except OSError:
                return

    stand_in(chatter)
    asked = time.monotonic()
    with pytest.raises(HolderUnanswered, match="did not finish putting the guest back") as err:
        thaw_vm(cfg, "db", reporter=SilentReporter())
    gone.set()
    assert err.value.exit_code == ExitCode.SERVICE_NOT_RESTORED
    assert time.monotonic() - asked < 10


def test_a_holders_events_are_relayed_across_reads_and_its_outcome_returned(
    tmp_path: Path, stand_in: Callable[[Callable[[socket.socket], None]], None]
) -> None:
    cfg, _ = thaw_config(tmp_path)
    outcome = {
        "event": "outcome",
        "vm": "db",
        "exit_code": 0,
        "summary": {"vm": "db", "ok": True},
        "lines": ["db: thaw ok"],
    }
    record = {"name": "start services", "started": 1.0, "ended": None, "ok": None, "error": None}
    step = {"event": "step_started", "id": 0, "record": record}
    wire = b"".join(json.dumps(e).encode() + b"\n" for e in ({"event": "thawing"}, step, outcome))

    def answer(conn: socket.socket) -> None:
        assert conn.makefile("rb").readline() == b"thaw\n"
        for i in range(0, len(wire), 7):  # in pieces that split lines
            conn.sendall(wire[i : i + 7])
            time.sleep(0.002)

    stand_in(answer)
    recorder = Recorder()
    result = thaw_vm(cfg, "db", reporter=recorder)
    assert result.exit_code == 0 and result.lines == ["db: thaw ok"]
    assert [(kind, r.name) for kind, r in recorder.seen] == [("started", "start services")]


def test_thaws_total_deadline_covers_the_unwinds_own_bounds(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        db={"hypervisor": "lab", "guest": {**GUEST, "services": ["a", "b"], "start_timeout": 100}},
    )
    assert thaw_deadline(cfg.vm("db")) >= 3 * 100 + 60

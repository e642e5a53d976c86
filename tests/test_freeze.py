"""The logic of freeze/thaw and the vzdump hook without a guest: the holder's socket and channel,
the event relay, the phase table, vmid mapping, ``--select``. End to end: test_freeze_e2e.py and
test_vzdump_hook.py."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from snapcoord.cli import build_parser
from snapcoord.config import parse_config
from snapcoord.errors import Interrupted, SnapcoordError, UsageError
from snapcoord.freeze import (
    Relay,
    ThawTimeout,
    holder_state,
    private_dir,
    runtime_dir,
    socket_path,
    write_line,
)
from snapcoord.holder import Channel, ThawWaiter
from snapcoord.outcome import Outcome
from snapcoord.plans.context import RunContext
from snapcoord.plans.freeze import WATCHDOG_GRACE, frozen_config
from snapcoord.run import StepRecord
from snapcoord.selection import Selection, select
from snapcoord.settings import Config
from snapcoord.vzdump import (
    Actions,
    HookCall,
    armed_by_vzdump,
    frozen_by_vzdump,
    run_hook,
    vm_for_vmid,
)


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNUSED_TOKEN", "never-sent")


def config(store: Path, **vms: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "defaults": {"store": str(store)},
        "hypervisors": {
            "pve": {
                "type": "proxmox",
                "host": "127.0.0.1",
                "token_id": "a@pve!b",
                "token_secret": {"env": "UNUSED_TOKEN"},
            },
            "lab": {"type": "libvirt", "uri": "test:///default"},
        },
        "vms": vms,
    }
    return parse_config(raw, source="test.toml")


GUEST = {"transport": "exec", "exec_prefix": []}


# -- the holder's socket and channel ----------------------------------------------------------


def test_socket_path_is_in_the_store_or_the_runtime_dir_when_too_long(tmp_path: Path) -> None:
    short = config(tmp_path / "s", db={"hypervisor": "lab", "guest": GUEST})
    assert socket_path(short, "db") == tmp_path / "s" / "freeze" / "db.sock"
    deep = tmp_path / ("x" * 120)
    long = config(deep, db={"hypervisor": "lab", "guest": GUEST})
    path = socket_path(long, "db")
    assert len(str(path)) < 100 and path.parent == runtime_dir()
    assert socket_path(long, "db") == path and socket_path(long, "other") != path


def test_private_dir_refuses_a_directory_others_can_use(tmp_path: Path) -> None:
    private_dir(tmp_path / "p")
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(SnapcoordError, match="only this user"):
        private_dir(open_dir)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def step_started(self, record: StepRecord) -> None:
        self.seen.append(("started", record))

    def step_ended(self, record: StepRecord) -> None:
        self.seen.append(("ended", record))

    def note(self, text: str) -> None:
        self.seen.append(("note", text))


def test_channel_events_replay_on_a_reporter_with_the_same_records(tmp_path: Path) -> None:
    read, write = os.pipe()
    channel = Channel(os.fdopen(write, "wb"))
    record = StepRecord("stop services", 1.0)
    channel.step_started(record)
    record.ended, record.ok = 2.0, True
    channel.step_ended(record)
    channel.note("a note")
    channel.switch(None)
    recorder = Recorder()
    relay = Relay(recorder)
    with os.fdopen(read, "rb") as stream:
        for line in stream:
            relay.handle(json.loads(line))
    kinds = [kind for kind, _ in recorder.seen]
    assert kinds == ["started", "ended", "note"]
    started, ended = recorder.seen[0][1], recorder.seen[1][1]
    assert started is ended and ended.ok and ended.name == "stop services"


def test_channel_remembers_a_reader_that_went_away() -> None:
    read, write = os.pipe()
    os.close(read)
    channel = Channel(os.fdopen(write, "wb"))
    assert channel.send({"event": "note", "text": "x"}) is False
    assert channel.lost and channel.stream is None
    assert channel.send({"event": "note", "text": "y"}) is False


def freeze_state(**fields: Any) -> dict[str, Any]:
    """A freeze state as a holder writes it (FreezeState's fields), with ``fields`` changed."""
    return {"pid": 4321, "run": "20261206T120000Z-abcdef", "source": "freeze", "vmid": None,
            "since": 1796500000.0, "until": None, "max_seconds": 300, "consistency": "stop",
            **fields}  # fmt: skip


def _waiter(tmp_path: Path, max_seconds: int) -> tuple[ThawWaiter, Any]:
    cfg = config(tmp_path / "store", db={"hypervisor": "lab", "guest": GUEST})
    read, write = os.pipe()
    channel = Channel(os.fdopen(write, "wb"))
    waiter = ThawWaiter(cfg, "db", channel, max_seconds)
    waiter.ctx = cast(
        RunContext, SimpleNamespace(key="db", freeze=freeze_state(vmid=7), outputs={})
    )
    waiter.listen()
    return waiter, os.fdopen(read, "rb")


def test_waiter_answers_status_then_returns_on_thaw(tmp_path: Path) -> None:
    waiter, parent = _waiter(tmp_path, 60)
    cfg = config(tmp_path / "store", db={"hypervisor": "lab", "guest": GUEST})
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(done=waiter.wait()))
    thread.start()
    frozen = json.loads(parent.readline())
    assert frozen["event"] == "frozen" and frozen["until"] == waiter.until
    assert parent.readline() == b"", "freeze's pipe is closed once frozen"
    state = holder_state(cfg, "db")
    assert state is not None and state.source == "freeze" and state.vmid == 7
    mute = socket.socket(socket.AF_UNIX)  # a client that says nothing is dropped
    mute.connect(str(socket_path(cfg, "db")))
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(socket_path(cfg, "db")))
    conn.sendall(b"thaw\n")
    thread.join(10)
    assert not thread.is_alive() and "done" in box
    assert waiter.ended_by == "thaw"
    assert not socket_path(cfg, "db").exists(), "no one else can ask once thaw came"
    waiter.channel.note("restoring")
    waiter.channel.switch(None)
    answer = conn.makefile("rb")
    assert json.loads(answer.readline()) == {"event": "thawing"}, "thaw hears at once"
    assert json.loads(answer.readline()) == {"event": "note", "text": "restoring"}
    mute.close()
    conn.close()


def test_waiter_raises_at_the_limit_counted_from_the_start(tmp_path: Path) -> None:
    """Started 100 s ago with a 60 s limit: the wait ends at once (counted from the wait it
    would block for a minute, and the join below would give up)."""
    waiter, parent = _waiter(tmp_path, 60)
    waiter.started -= 100
    box: dict[str, BaseException] = {}

    def wait() -> None:
        try:
            waiter.wait()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the limit was counted from the wait, not from the start"
    assert isinstance(box.get("error"), ThawTimeout)
    assert "no thaw within 60 s" in str(box["error"])
    assert waiter.ended_by == "limit"
    assert waiter.ctx is not None and waiter.ctx.outputs["ended_by"] == "limit"
    parent.close()


def test_waiter_gives_up_when_freeze_is_gone_before_frozen(tmp_path: Path) -> None:
    waiter, parent = _waiter(tmp_path, 60)
    parent.close()
    with pytest.raises(Interrupted, match="putting it back"):
        waiter.wait()


def test_write_line_is_one_json_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "events"
    with path.open("wb") as out:
        write_line(out, {"event": "x", "when": Path("/p")})
    assert json.loads(path.read_text()) == {"event": "x", "when": "/p"}


def test_frozen_config_fits_the_limits_and_refuses_a_vm_without_guest(tmp_path: Path) -> None:
    cfg = config(tmp_path, db={"hypervisor": "lab", "guest": GUEST}, bare={"hypervisor": "lab"})
    fitted = frozen_config(cfg, "db", 42).vm("db").guest
    assert fitted is not None
    assert fitted.pause_timeout == 42 and fitted.watchdog_seconds == 42 + WATCHDOG_GRACE
    assert cfg.vm("db").guest != fitted, "the loaded configuration is unchanged"
    with pytest.raises(UsageError, match=r"freeze needs a \[vms.bare.guest\] table"):
        frozen_config(cfg, "bare", 42)


def test_max_seconds_is_bounded() -> None:
    parser = build_parser()
    assert parser.parse_args(["freeze", "db", "--max-seconds", "10"]).max_seconds == 10
    for bad in ("9", "86401", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["freeze", "db", "--max-seconds", bad])


# -- the vzdump hook --------------------------------------------------------------------------


def test_hook_call_parses_what_vzdump_passes() -> None:
    env = {"VMTYPE": "qemu"}
    assert HookCall.parse(["job-start"], env) == HookCall("job-start")
    assert HookCall.parse(["pre-stop", "snapshot", "101"], env) == HookCall(
        "pre-stop", "snapshot", 101, "qemu"
    )
    assert HookCall.parse(["some-future-phase"], env).phase == "some-future-phase"
    for argv in (
        [],
        ["pre-stop"],
        ["pre-stop", "fast", "101"],
        ["pre-stop", "stop", "x1"],
        ["pre-stop", "stop", "\u0661\u0660\u0661"],  # Arabic-Indic digits: never VMID 101
        ["pre-stop", "stop", "\udcff"],  # a byte that is not UTF-8 (surrogateescape)
    ):
        with pytest.raises(UsageError):
            HookCall.parse(argv, env)


class Calls:
    def __init__(self) -> None:
        self.made: list[tuple[str, str]] = []

    def outcome(self, key: str, code: int = 0) -> Outcome:
        return Outcome(key, code, {"vm": key})

    def actions(self, code: int = 0) -> Actions:
        def record(action: str, key: str) -> Outcome:
            self.made.append((action, key))
            return self.outcome(key, code)

        return Actions(
            freeze=lambda key, vmid: record("freeze", key),
            thaw=lambda key: record("thaw", key),
            dump=lambda key: record("dump", key),
            prepare=lambda key, vmid: record("prepare", key),
            verify=lambda key: record("verify", key),
            restore=lambda key: record("restore", key),
        )


def _journal(store: Path, key: str, name: str, **data: Any) -> None:
    (store / "journal").mkdir(parents=True, exist_ok=True)
    (store / "journal" / name).write_text(json.dumps({"vm": key, **data}))


@pytest.mark.parametrize(
    ("phase", "mode", "vmtype", "expected"),
    [
        ("backup-start", "snapshot", "qemu", []),
        # QEMU, snapshot mode: the point in time is the agent's freeze inside archive()
        ("pre-stop", "snapshot", "qemu", [("prepare", "db")]),
        ("pre-restart", "snapshot", "qemu", []),
        ("post-restart", "snapshot", "qemu", [("thaw", "db")]),  # a holder left: idempotent
        ("backup-end", "snapshot", "qemu", [("verify", "db")]),
        ("backup-abort", "snapshot", "qemu", [("thaw", "db")]),
        # containers and suspend mode: snapcoord's own bracket
        ("pre-stop", "snapshot", "lxc", [("freeze", "db")]),
        ("pre-restart", "snapshot", "lxc", []),
        ("post-restart", "snapshot", "lxc", [("thaw", "db")]),
        ("backup-end", "snapshot", "lxc", []),
        ("pre-stop", "suspend", "qemu", [("freeze", "db")]),
        ("pre-restart", "suspend", "qemu", []),
        ("post-restart", "suspend", "qemu", [("thaw", "db")]),
        ("backup-abort", "snapshot", "lxc", [("thaw", "db")]),
        ("pre-stop", "stop", "qemu", [("dump", "db")]),
        ("log-end", "snapshot", "qemu", []),
    ],
)
def test_each_guest_phase_does_what_the_table_says(
    tmp_path: Path, phase: str, mode: str, vmtype: str, expected: list[tuple[str, str]]
) -> None:
    cfg = config(tmp_path, db={"hypervisor": "pve", "vmid": 101, "guest": GUEST})
    _journal(tmp_path, "db", "db.json", freeze=freeze_state(source="vzdump", vmid=101))
    calls = Calls()
    code, outcomes, line = run_hook(cfg, HookCall(phase, mode, 101, vmtype), calls.actions())
    assert (code, calls.made, line) == (0, expected, "")
    assert [o.vm for o in outcomes] == [key for _, key in expected]


def test_job_phases_thaw_only_what_a_vzdump_hook_froze(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        db={"hypervisor": "pve", "vmid": 101, "guest": GUEST},
        mine={"hypervisor": "pve", "vmid": 102, "guest": GUEST},
        late={"hypervisor": "pve", "vmid": 103, "guest": GUEST},
        told={"hypervisor": "pve", "vmid": 104, "guest": GUEST},
    )
    _journal(tmp_path, "db", "db.json", freeze=freeze_state(source="vzdump", vmid=101))
    _journal(tmp_path, "mine", "mine.json", freeze=freeze_state())
    vz = freeze_state(source="vzdump", vmid=103)
    _journal(tmp_path, "late", "late.last-run.json", freeze=vz, ended_by="limit")
    told = {"freeze": {**vz, "vmid": 104}, "ended_by": "limit", "thaw_reported": True}
    _journal(tmp_path, "told", "told.last-run.json", **told)
    (tmp_path / "journal" / "broken.json").write_text("{")
    assert frozen_by_vzdump(cfg) == ["db", "late"]
    assert frozen_by_vzdump(cfg, 103) == ["late"]
    for phase in ("job-end", "job-abort"):
        calls = Calls()
        code, _, _ = run_hook(cfg, HookCall(phase), calls.actions(code=6))
        assert calls.made == [("thaw", "db"), ("thaw", "late")] and code == 6
    for phase in ("job-init", "job-start", "a-new-phase"):
        calls = Calls()
        assert run_hook(cfg, HookCall(phase), calls.actions())[0] == 0 and calls.made == []


def test_armed_freeze_hooks_are_restored_after_an_abort(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        db={"hypervisor": "pve", "vmid": 101, "guest": GUEST},
        other={"hypervisor": "pve", "vmid": 102, "guest": GUEST},
        broken={"hypervisor": "pve", "vmid": 103, "guest": GUEST},
    )
    (tmp_path / "vzdump").mkdir()
    for key, vmid in (("db", 101), ("other", 102)):
        record = {"vm": key, "vmid": vmid, "token": f"vzdump-{vmid}-00aa11bb22cc", "armed_at": 1}
        (tmp_path / "vzdump" / f"{key}.json").write_text(json.dumps(record))
    (tmp_path / "vzdump" / "broken.json").write_text("[1, 2")
    assert armed_by_vzdump(cfg) == ["db", "other"]
    assert armed_by_vzdump(cfg, 102) == ["other"]
    calls = Calls()
    run_hook(cfg, HookCall("backup-abort", "snapshot", 102, "qemu"), calls.actions())
    assert calls.made == [("restore", "other")]
    calls = Calls()
    code, _, _ = run_hook(cfg, HookCall("job-abort"), calls.actions(code=6))
    assert calls.made == [("restore", "db"), ("restore", "other")] and code == 6


def test_backup_end_of_a_guest_not_configured_or_without_guest_is_left_alone(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, web={"hypervisor": "pve", "vmid": 101})
    for vmid in (101, 999):
        calls = Calls()
        result = run_hook(cfg, HookCall("backup-end", "snapshot", vmid, "qemu"), calls.actions())
        assert result == (0, [], "") and calls.made == []


def test_pre_stop_of_a_guest_not_configured_is_left_alone_in_one_line(tmp_path: Path) -> None:
    cfg = config(tmp_path, db={"hypervisor": "pve", "vmid": 101, "guest": GUEST})
    calls = Calls()
    code, outcomes, line = run_hook(cfg, HookCall("pre-stop", "snapshot", 999), calls.actions())
    assert code == 0 and outcomes == [] and calls.made == []
    assert line == "vmid 999 is not in test.toml: left alone"


def test_a_failed_freeze_is_the_hooks_exit_code(tmp_path: Path) -> None:
    cfg = config(tmp_path, db={"hypervisor": "pve", "vmid": 101, "guest": GUEST})
    code, _, _ = run_hook(cfg, HookCall("pre-stop", "snapshot", 101), Calls().actions(code=4))
    assert code == 4


def test_vmid_mapping_explicit_first_then_vmid_and_never_ambiguous(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        a={"hypervisor": "pve", "vmid": 101},
        b={"hypervisor": "pve", "vmid": 102, "vzdump_vmid": 101},
        c={"hypervisor": "lab", "name": "c"},
    )
    assert vm_for_vmid(cfg, 101) == "b"
    assert vm_for_vmid(cfg, 102) is None, "b's vzdump_vmid replaces its vmid for the hook"
    assert vm_for_vmid(cfg, 105) is None, "a libvirt VM is never looked up in Proxmox"
    twice = config(
        tmp_path,
        a={"hypervisor": "pve", "vzdump_vmid": 300},
        b={"hypervisor": "lab", "vzdump_vmid": 300},
    )
    with pytest.raises(UsageError, match="vmid 300 matches several configured VMs: a, b"):
        vm_for_vmid(twice, 300)


# -- --select ---------------------------------------------------------------------------------


def test_select_names_a_vm_or_a_tag_never_both_never_neither(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        db1={"hypervisor": "lab", "tags": ["nightly"]},
        db2={"hypervisor": "lab", "tags": ["nightly", "db1x"]},
        web={"hypervisor": "lab"},
    )
    assert select(cfg, Selection(either=("web",))) == ["web"]
    assert select(cfg, Selection(either=("nightly",))) == ["db1", "db2"]
    assert select(cfg, Selection(either=("nightly",), exclude=("db2",))) == ["db1"]
    with pytest.raises(UsageError, match="no VM and no tag 'nope'"):
        select(cfg, Selection(either=("nope",)))
    clash = config(tmp_path, db1={"hypervisor": "lab", "tags": ["db1"]})
    with pytest.raises(UsageError, match="'db1' is both a VM and a tag"):
        select(clash, Selection(either=("db1",)))


def test_a_holder_that_ends_late_leaves_the_next_holders_socket(tmp_path: Path) -> None:
    """Two freezes of one VM in a row: the first holder finishes (closes) only after the second
    listens at the same path. The second one's socket stays, so ``thaw`` finds its holder."""
    first, first_parent = _waiter(tmp_path, 60)
    second, second_parent = _waiter(tmp_path, 60)  # the lock is free: it takes the path over
    try:
        first.close()
        assert second.path.exists(), "the first holder removed the second one's socket"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(second.path))  # the second holder still listens there
    finally:
        second.close()
        first_parent.close()
        second_parent.close()
    assert not second.path.exists()

"""A freeze's state (the holder's ``frozen`` answer, the run journal's and the last run's
``freeze`` entry) is parsed into a typed record at one place (snapcoord/freeze_state.py):
``thaw``, ``status``, ``freeze`` and the vzdump hook act on the record only (issue 23: the
records snapcoord reads back). Property-based over states of every shape, and the cases that
would once have been acted on: a PID of 1, a VMID given as text, a limit of 1e20."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapcoord.freeze_hook import Armed, armed_path, read_armed
from snapcoord.freeze_state import MAX_SECONDS, PID_MAX, FreezeState
from snapcoord.journal import CorruptJournal, RunRecord
from snapcoord.naming import RUN_ID
from snapcoord.status import status_vm
from snapcoord.vzdump import frozen_by_vzdump
from tests import hostile_json
from tests.test_freeze import _journal, config, freeze_state


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNUSED_TOKEN", "never-sent")  # tests.test_freeze.config's hypervisor


FIELDS = ("pid", "run", "source", "vmid", "since", "until", "max_seconds", "consistency")

scalars = hostile_json.scalars("freeze", "vzdump", "stop", "pause", "20261206T120000Z-abcdef")
states = hostile_json.records(FIELDS, scalars)
# a valid state with one field replaced: the checks one at a time
one_off = st.tuples(st.sampled_from(FIELDS), scalars).map(
    lambda change: freeze_state(**{change[0]: change[1]})
)


def valid(state: FreezeState) -> None:
    assert 1 < state.pid <= PID_MAX and RUN_ID.fullmatch(state.run)
    assert state.source in ("freeze", "vzdump") and state.consistency in ("stop", "pause")
    assert state.vmid is None or (isinstance(state.vmid, int) and state.vmid > 0)
    assert math.isfinite(state.since) and (state.until is None or math.isfinite(state.until))
    assert 1 <= state.max_seconds <= MAX_SECONDS
    json.dumps(state.as_dict(), allow_nan=False)


@settings(max_examples=600, deadline=None)
@given(data=st.one_of(states, one_off, scalars, st.lists(scalars, max_size=3)))
def test_any_state_is_a_valid_record_or_none_never_an_exception(data: Any) -> None:
    state = FreezeState.parse(data)
    if state is not None:
        valid(state)
        assert FreezeState.parse(state.as_dict()) == state


@pytest.mark.parametrize(
    "change",
    [
        {"pid": 1},
        {"pid": True},
        {"pid": "4321"},
        {"run": "../../etc"},
        {"run": "20261206T120000Z-abcdef\n"},
        {"source": "cron"},
        {"vmid": "101"},
        {"vmid": 0},
        {"since": float("nan")},
        {"since": 1e20},
        {"until": "later"},
        {"max_seconds": 1e20},
        {"max_seconds": 0},
        {"consistency": "auto"},
    ],
)
def test_what_would_have_been_acted_on_is_not_a_freeze(change: dict[str, Any]) -> None:
    assert FreezeState.parse(freeze_state(**change)) is None


def test_a_journal_with_a_corrupt_freeze_is_refused_not_acted_on(tmp_path: Path) -> None:
    data = {"run": "20261206T120000Z-abcdef", "stopped": [], "freeze": freeze_state(pid=1)}
    with pytest.raises(CorruptJournal, match="freeze"):
        RunRecord.parse(data, services=frozenset(), vm="db", path=tmp_path / "db.json")
    fine = RunRecord.parse(
        {**data, "freeze": freeze_state()}, services=frozenset(), vm="db", path=tmp_path
    )
    assert fine.freeze == FreezeState.parse(freeze_state())


def test_the_vzdump_hook_thaws_only_what_a_valid_state_names(tmp_path: Path) -> None:
    guest = {"transport": "exec", "exec_prefix": []}
    cfg = config(
        tmp_path,
        good={"hypervisor": "pve", "vmid": 101, "guest": guest},
        text={"hypervisor": "pve", "vmid": 102, "guest": guest},
    )
    _journal(tmp_path, "good", "good.json", freeze=freeze_state(source="vzdump", vmid=101))
    _journal(tmp_path, "text", "text.json", freeze=freeze_state(source="vzdump", vmid="102"))
    assert frozen_by_vzdump(cfg) == ["good"]
    assert frozen_by_vzdump(cfg, 102) == []


def test_status_shows_a_corrupt_freeze_as_no_freeze(tmp_path: Path) -> None:
    guest = {"transport": "exec", "exec_prefix": []}
    cfg = config(tmp_path, db={"hypervisor": "lab", "guest": guest})
    run = "20261206T120000Z-abcdef"
    _journal(tmp_path, "db", "db.json", run=run, pid=999999, freeze=freeze_state(until=1e300))
    outcome = status_vm(cfg, "db", offline=True, now=1_800_000_000)
    assert outcome.summary["unfinished_run"]["freeze"] is None
    assert "frozen by freeze" not in " ".join(outcome.lines)
    json.dumps(outcome.summary, allow_nan=False)


ARMED = {"token": "a1b2c3d4e5", "vm": "db", "vmid": 101, "armed_at": 1796500000.0}


@pytest.mark.parametrize(
    "change",
    [{"armed_at": float("nan")}, {"armed_at": 1e300}, {"vmid": True}, {"vmid": 0}, {"vmid": "101"}],
)
def test_an_arm_record_with_an_impossible_value_is_not_an_arm(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    """The vzdump arm record (freeze hook prepared at pre-stop) is read through the same value
    checks: a NaN time once passed, and backup-end took it for a prepared freeze."""
    path = armed_path(tmp_path, "db")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(ARMED))
    assert read_armed(tmp_path, "db") == Armed("db", 101, ARMED["token"], ARMED["armed_at"])
    path.write_text(json.dumps({**ARMED, **change}))
    assert read_armed(tmp_path, "db") is None

"""Snapshot names: at most 40 characters, valid on every hypervisor, parseable, labelled."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from snapcoord.adapters.base import Snapshot
from snapcoord.errors import UsageError
from snapcoord.naming import (
    MAX_LENGTH,
    PROXMOX_NAME_RE,
    description,
    new_run_id,
    parse_name,
    snapshot_name,
)

WHEN = datetime(2026, 11, 26, 5, 4, 3, tzinfo=UTC)


def test_name_format_and_roundtrip() -> None:
    name = snapshot_name("nightly", WHEN)
    assert name == "snapcoord-nightly-20261126T050403Z"
    assert parse_name(name) == ("nightly", WHEN)


def test_longest_label_fits_40_characters_and_proxmox_rules() -> None:
    name = snapshot_name("a" * 13, WHEN)
    assert len(name) == MAX_LENGTH
    assert PROXMOX_NAME_RE.fullmatch(name)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name)  # vSphere and libvirt accept this too


def test_local_times_are_converted_to_utc() -> None:
    local = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert snapshot_name("x", local) == snapshot_name("x", WHEN)


@pytest.mark.parametrize("label", ["", "a" * 14, "has space", "dash-ed", "dot.ted", "_lead"])
def test_bad_labels_are_refused(label: str) -> None:
    with pytest.raises(UsageError):
        snapshot_name(label, WHEN)


@pytest.mark.parametrize(
    "name", ["before-upgrade", "snapcoord-x-2026", "snapcoord-x-20261126T050403"]
)
def test_foreign_names_do_not_parse(name: str) -> None:
    assert parse_name(name) is None


def test_description_marks_snapcoord_snapshots() -> None:
    run = new_run_id()
    text = description("nightly", run)
    assert Snapshot("n", "1", None, description=text).is_snapcoord
    assert not Snapshot("n", "1", None, description="by hand: snapcoord: no").is_snapcoord
    assert run in text and new_run_id() != run


def test_an_impossible_date_is_not_a_snapcoord_name() -> None:
    """issue 23, finding 14: snapcoord-x-20241301T000000Z once broke prune with a traceback."""
    for name in ("snapcoord-x-20241301T000000Z", "snapcoord-x-20240230T000000Z",
                 "snapcoord-x-20240101T256000Z"):  # fmt: skip
        assert parse_name(name) is None

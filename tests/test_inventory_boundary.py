"""An inventory file (what snapcoord last saw of a VM's snapshots) is parsed into a typed
record in one place (snapcoord/inventory.py), and no content of it makes ``status --offline``
or the metrics file fail or show a wrong number (issue 23: the records snapcoord reads back).
Property-based: corrupt files of every shape, and the documented examples. ``status``, the
metrics and the CLI all run on each file as they do for users."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapcoord import inventory, metrics
from snapcoord.adapters.base import MARKER, Snapshot
from snapcoord.config import load_config
from snapcoord.status import status_vm
from tests import hostile_json
from tests.cli_helpers import snapcoord, write_config

FIELDS = ("seen_at", "count", "oldest", "newest")
NOW = 1_800_000_000

times = st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
records = hostile_json.records(
    FIELDS, hostile_json.nested(st.one_of(hostile_json.scalars(), times), FIELDS, max_leaves=8)
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    tmp = tmp_path_factory.mktemp("inventory")
    config_path = write_config(
        tmp / "snapcoord.toml",
        {
            "defaults": {"store": str(tmp / "store"), "metrics_file": str(tmp / "m.prom")},
            "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
            "vms.db": {"hypervisor": "lab"},
        },
    )
    config = load_config(config_path)
    inventory.record(config.store, "db", [])  # the store's folders, as a real run makes them
    return config, config_path, config.store / "journal" / "db.inventory.json"


def check(config: Any, path: Path, text: str) -> None:
    path.write_text(text)
    seen = inventory.read(config.store, "db")
    if seen is not None:
        assert seen.count is None or 0 <= seen.count <= inventory.MAX_COUNT
        for moment in (seen.seen_at, seen.oldest, seen.newest):
            assert moment is None or (
                moment.tzinfo is not None and math.isfinite(moment.timestamp())
            )
        json.dumps(seen.as_dict(), allow_nan=False)
    for line in metrics.render(config, now=NOW).split("\n"):
        if line and not line.startswith("#"):
            assert math.isfinite(float(line.rsplit(" ", 1)[1])), line
    outcome = status_vm(config, "db", offline=True, now=NOW)
    assert outcome.exit_code == 0
    json.dumps(outcome.summary, allow_nan=False)


@pytest.mark.parametrize(
    "text",
    [
        '{"seen_at": "2026-12-01T03:00:00+00:00", "count": true}',
        '{"seen_at": "yesterday", "count": 1e20, "oldest": 5, "newest": null}',
        '{"seen_at": "2026-12-01T03:00:00", "count": -3, "oldest": "9999-12-31T23:59:59+00:00"}',
        '{"count": NaN, "oldest": "0001-01-01T00:00:00+14:00", "newest": ["x"]}',
        '{"count": 99999999999999999999999, "seen_at": {"count": 1}}',
        "[1, 2, 3]",
        "null",
        "{",
    ],
)
def test_the_documented_corrupt_files(setup: tuple[Any, Path, Path], text: str) -> None:
    config, _, path = setup
    check(config, path, text)


def test_a_count_that_is_not_a_plain_number_is_unknown_not_a_metric(
    setup: tuple[Any, Path, Path],
) -> None:
    config, _, path = setup
    path.write_text('{"seen_at": "2026-12-01T03:00:00+00:00", "count": true}')
    seen = inventory.read(config.store, "db")
    assert seen is not None and seen.count is None
    assert seen.seen_at == datetime(2026, 12, 1, 3, tzinfo=UTC)
    assert "snapcoord_snapshots{" not in metrics.render(config, now=NOW)


def test_what_record_writes_reads_back_the_same(setup: tuple[Any, Path, Path]) -> None:
    config, _, _ = setup
    times = [datetime(2026, 11, day, 3, tzinfo=UTC) for day in (1, 20)]
    snaps = [
        Snapshot(f"snapcoord-test-{t:%Y%m%dT%H%M%SZ}", str(i), t, description=f"{MARKER} test")
        for i, t in enumerate(times)
    ]
    written = inventory.record(config.store, "db", snaps, now=datetime(2026, 12, 1, tzinfo=UTC))
    assert inventory.read(config.store, "db") == written
    assert written.count == 2 and written.oldest == times[0] and written.newest == times[1]


def test_the_cli_shows_a_corrupt_inventory_as_unknown_in_one_piece(
    setup: tuple[Any, Path, Path],
) -> None:
    _, config_path, path = setup
    path.write_text('{"seen_at": "2026-12-01T03:00:00+00:00", "count": "many", "oldest": 7}')
    shown = snapcoord("-c", str(config_path), "status", "db", "--offline", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "Traceback" not in shown.stderr
    [summary] = [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    assert summary["snapshots"]["count"] is None and summary["snapshots"]["oldest"] is None


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(record=records)
def test_any_corrupt_inventory_gives_a_record_or_none_never_an_exception(
    setup: tuple[Any, Path, Path], record: dict[str, Any]
) -> None:
    config, _, path = setup
    check(config, path, json.dumps(record))

"""A last-run file is parsed into a typed record in one place (snapcoord/status.py), and no
content of it makes status or the metrics file fail (issue 23, finding 7: ``"errors": 5``,
``NaN`` or ``1e20`` once turned every command's exit code into a traceback while the metrics
were rewritten). Property-based: corrupt files of every shape, and the documented examples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from snapcoord import metrics
from snapcoord.config import load_config
from snapcoord.status import read_last_run, status_vm
from tests import hostile_json
from tests.cli_helpers import write_config

FIELDS = ("run", "command", "ok", "exit_code", "started", "ended", "window_seconds", "dump",
          "snapshot", "errors", "steps", "application_consistent")  # fmt: skip

records = hostile_json.records(
    FIELDS, hostile_json.nested(hostile_json.scalars(), (*FIELDS, "bytes"))
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    tmp = tmp_path_factory.mktemp("last-run")
    config = load_config(
        write_config(
            tmp / "snapcoord.toml",
            {
                "defaults": {"store": str(tmp / "store"), "metrics_file": str(tmp / "m.prom")},
                "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
                "vms.db": {"hypervisor": "lab"},
            },
        )
    )
    (tmp / "store" / "journal").mkdir(parents=True)
    return config, tmp / "store" / "journal" / "db.last-run.json"


def check(config: Any, path: Path, text: str) -> None:
    path.write_text(text)
    last = read_last_run(config.store, "db")
    if last is not None:
        assert 0 <= last.exit_code <= 255
        for value in (last.started, last.ended, last.window_seconds, last.dump_bytes):
            assert value is None or math.isfinite(value)
        assert all(isinstance(e, str) for e in last.errors)
        json.dumps(last.as_dict(), allow_nan=False)
    text_file = metrics.render(config, now=1_800_000_000)
    for line in text_file.split("\n"):
        if line and not line.startswith("#"):
            assert math.isfinite(float(line.rsplit(" ", 1)[1])), line
    outcome = status_vm(config, "db", offline=True, now=1_800_000_000)
    json.dumps(outcome.summary, default=str, allow_nan=False)


@pytest.mark.parametrize(
    "text",
    [
        '{"command": "snapshot", "ok": false, "exit_code": 3, "errors": 5}',
        '{"command": "snapshot", "ok": true, "exit_code": 0, "window_seconds": NaN}',
        '{"command": "snapshot", "ok": true, "exit_code": 1e20, "ended": 1e20}',
        '{"command": "snapshot", "started": -Infinity, "steps": 7, "dump": {"bytes": "x"}}',
        '{"ok": "yes", "exit_code": true, "steps": [{"started": NaN, "ended": 1e300}]}',
        "[1, 2, 3]",
        "{",
    ],
)
def test_the_documented_corrupt_files(setup: tuple[Any, Path], text: str) -> None:
    config, path = setup
    check(config, path, text)


def test_a_command_name_with_control_characters_is_unknown(setup: tuple[Any, Path]) -> None:
    config, path = setup
    path.write_text('{"command": "snap\\rshot\\u001b[31m", "ok": true, "exit_code": 0}')
    last = read_last_run(config.store, "db")
    assert last is not None and last.command == "unknown"


def test_a_corrupt_exit_code_is_not_taken_for_success(setup: tuple[Any, Path]) -> None:
    config, path = setup
    path.write_text('{"command": "snapshot", "ok": "true", "exit_code": 1e20}')
    last = read_last_run(config.store, "db")
    assert last is not None and last.ok is False and last.exit_code == 1


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(record=records)
def test_any_corrupt_last_run_gives_a_record_or_none_never_an_exception(
    setup: tuple[Any, Path], record: dict[str, Any]
) -> None:
    config, path = setup
    check(config, path, json.dumps(record))

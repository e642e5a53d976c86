"""The run journal is parsed into a checked record before anything acts on it (issue 23,
finding 8: ``watchdog.pid = 1`` with an empty marker made recover send ``kill -TERM -- -1`` in
the guest; ``stopped = ["reboot.target"]`` would make it start that; finding 14: one corrupt
journal stopped a whole ``--parallel 1`` fleet run). Property-based, and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapcoord.journal import CorruptJournal, RunRecord
from tests import lab
from tests.cli_helpers import snapcoord, write_config

SERVICES = frozenset({"apache2", "cron", "mariadb"})
RUN = "20261206T152236Z-9fb132"
GOOD: dict[str, Any] = {
    "run": RUN,
    "vm": "db1",
    "snapshot": "snapcoord-x",
    "stopped": ["apache2", "mariadb"],
    "database": "mariadb",
    "init": "systemd",
    "watchdog": {
        "pid": 4242,
        "marker": f"snapcoord-watchdog-{RUN}",
        "seconds": 300,
        "services": ["mariadb", "apache2"],
        "database": "mariadb",
        "armed_at": 1796568555.8,
    },
    "pending": ["disarm guest watchdog", "start apache2"],
    "pid": 999,
}


def parse(data: Any) -> RunRecord:
    return RunRecord.parse(data, services=SERVICES, vm="db1", path=Path("/store/journal/db1.json"))


def test_a_journal_snapcoord_wrote_parses() -> None:
    record = parse(GOOD)
    assert record.stopped == ("apache2", "mariadb") and record.database == "mariadb"
    assert record.watchdog is not None and record.watchdog.pid == 4242
    assert record.watchdog.services == ("mariadb", "apache2")


def _with(path: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("watchdog.pid", 1),  # kill -TERM -- -1: every process of the user
        ("watchdog.pid", 0),
        ("watchdog.pid", -1),
        ("watchdog.pid", "4242"),
        ("watchdog.pid", True),
        ("watchdog.pid", 2**40),
        ("watchdog.marker", ""),
        ("watchdog.marker", "snapcoord-watchdog-"),
        ("watchdog.marker", f"snapcoord-watchdog-{RUN}\n"),
        ("watchdog.marker", "sshd"),
        ("watchdog.seconds", "300"),
        ("watchdog.services", ["reboot.target"]),
        ("watchdog.database", "postgresql"),
        ("watchdog.armed_at", float("nan")),
        ("stopped", ["reboot.target"]),
        ("stopped", ["apache2", 5]),
        ("stopped", "apache2"),
        ("database", "reboot.target"),
        ("run", "r1"),
        ("run", f"{RUN}\n"),
        ("pending", "start apache2"),
        ("freeze", [1]),
    ],
)
def test_a_foreign_value_makes_the_whole_journal_corrupt(path: str, value: Any) -> None:
    with pytest.raises(CorruptJournal, match="is corrupt") as caught:
        parse(_with(path, value))
    assert caught.value.exit_code == 4


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner)
    ),
    max_leaves=10,
)


@settings(max_examples=600, deadline=None)
@given(
    field=st.sampled_from(sorted(GOOD)),
    sub=st.sampled_from(sorted(GOOD["watchdog"])),
    value=json_values,
    nested=st.booleans(),
)
def test_any_corrupt_journal_is_a_record_or_one_error(
    field: str, sub: str, value: Any, nested: bool
) -> None:
    data = _with(f"watchdog.{sub}" if nested else field, value)
    try:
        record = parse(data)
    except CorruptJournal:
        return
    assert set(record.stopped) <= SERVICES
    if record.watchdog is not None:
        assert record.watchdog.pid > 1
        assert record.watchdog.marker == f"snapcoord-watchdog-{RUN}"


def test_a_corrupt_journal_is_one_vms_error_and_the_fleet_goes_on(tmp_path: Path) -> None:
    closed = lab.free_port()  # nothing listens: the other VM's run fails at its guest
    guest = {"host": "127.0.0.1", "port": closed, "user": "root", "connect_timeout": 2.0}
    config = write_config(
        tmp_path / "snapcoord.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
            "vms.db1": {"hypervisor": "lab", "name": "test"},
            "vms.db1.guest": guest,
            "vms.db2": {"hypervisor": "lab", "name": "test"},
            "vms.db2.guest": guest,
        },
    )
    (tmp_path / "store" / "journal").mkdir(parents=True)
    (tmp_path / "store" / "journal" / "db1.json").write_text(json.dumps(_with("watchdog.pid", 1)))
    ran = snapcoord("-c", str(config), "snapshot", "db1", "db2", "--parallel", "1", timeout=120)
    assert "Traceback" not in ran.stderr, ran.stderr
    errors = [ln for ln in ran.stderr.splitlines() if ln.startswith("snapcoord: error:")]
    assert any(ln.startswith("snapcoord: error: db1: the run journal") for ln in errors), errors
    assert any(ln.startswith("snapcoord: error: db2: ") for ln in errors), "db2 was never tried"
    assert ran.returncode == 4
    recovered = snapcoord("-c", str(config), "recover", "db1", timeout=60)
    assert recovered.returncode == 4 and "is corrupt (watchdog pid)" in recovered.stderr
    assert "Traceback" not in recovered.stderr

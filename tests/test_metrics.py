"""The Prometheus textfile: written by the CLI after real ``snapcoord snapshot`` runs against the
Proxmox API double, checked by ``promtool check metrics`` (Debian: prometheus), its values
compared with the runs' --json; atomic, mode 0644, label values escaped."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord import metrics
from snapcoord.config import Config, load_config
from snapcoord.metrics import Family, escape_label, write_metrics
from tests import lab
from tests.cli_helpers import REPO, json_lines, write_config
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import Cert, make_cert, start_double
from tests.test_status import DAY, add_snapshot, cli, pve_tables, realistic_run, write_last_run

SAMPLE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>.*)\} (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def promtool_check(path: Path) -> None:
    promtool = lab.require("promtool", "prometheus")
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=path.read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode() + path.read_text()


def parse(text: str) -> Samples:
    """``{(name, labels): value}``; checks that every sample's family has HELP and TYPE gauge."""
    samples: Samples = {}
    typed = set(re.findall(r"^# TYPE (\S+) gauge$", text, re.M))
    helped = set(re.findall(r"^# HELP (\S+) .+$", text, re.M))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        assert match["name"] in typed and match["name"] in helped
        labels = frozenset(LABEL.findall(match["labels"]))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((f"snapcoord_{name}", frozenset(labels.items())))


def vms_in(samples: Samples) -> set[str]:
    return {dict(labels)["vm"] for _, labels in samples}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("metrics-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert, task_seconds=0.05)
    yield server
    server.stop()


def test_the_cli_writes_the_textfile_after_a_snapshot(
    double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    prom = tmp_path / "textfile" / "snapcoord.prom"
    prom.parent.mkdir()
    path = write_config(
        tmp_path / "c.toml", pve_tables(tmp_path, double.port, cert, metrics_file=str(prom))
    )
    old = int(time.time() - 6 * DAY)
    add_snapshot(double, 100, "snapcoord-nightly-old", 6 * DAY, own=True)
    add_snapshot(double, 100, "before-upgrade", 30 * DAY, own=False)  # not counted
    proc = cli(path, "snapshot", "db", "--json")
    assert proc.returncode == 0, proc.stderr
    run = json_lines(proc.stdout)[0]
    assert prom.exists(), proc.stderr
    double.cluster.lock_guest(201, "backup")
    assert cli(path, "snapshot", "remote").returncode == 3  # a failed run

    promtool_check(prom)
    assert prom.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in prom.parent.iterdir()] == ["snapcoord.prom"]  # no temporary left
    samples = parse(prom.read_text())
    assert vms_in(samples) == {"db", "remote"}  # ct has no data: no samples
    db = {"vm": "db", "command": "snapshot"}
    steps = run["steps"]
    assert value(samples, "last_run_success", **db) == 1
    assert value(samples, "last_run_exit_code", **db) == 0
    assert value(samples, "last_run_timestamp_seconds", **db) == pytest.approx(steps[-1]["ended"])
    duration = steps[-1]["ended"] - steps[0]["started"]
    assert value(samples, "last_run_duration_seconds", **db) == pytest.approx(duration, abs=0.01)
    window = run["window_seconds"]
    assert value(samples, "last_run_service_window_seconds", **db) == window
    assert value(samples, "last_run_dump_bytes", **db) is None  # no dump configured
    assert value(samples, "snapshots", vm="db") == 2
    assert value(samples, "oldest_snapshot_timestamp_seconds", vm="db") == old
    age = value(samples, "oldest_snapshot_age_seconds", vm="db")
    assert age is not None and 6 * DAY - 60 < age < 6 * DAY + 60
    newest = value(samples, "newest_snapshot_timestamp_seconds", vm="db")
    assert newest is not None and abs(newest - steps[-1]["ended"]) < 60
    remote = {"vm": "remote", "command": "snapshot"}
    assert value(samples, "last_run_success", **remote) == 0
    assert value(samples, "last_run_exit_code", **remote) == 3


@pytest.fixture
def offline_config(tmp_path: Path) -> Config:
    tables = {
        "defaults": {"store": str(tmp_path / "store"), "metrics_file": str(tmp_path / "s.prom")},
        "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
        "vms.db1": {"hypervisor": "lab", "name": "test"},
        "vms.db2": {"hypervisor": "lab", "name": "test"},
    }
    return load_config(str(write_config(tmp_path / "c.toml", tables)))


def test_window_and_dump_bytes_from_a_dump_run(offline_config: Config) -> None:
    ended = time.time() - 3600
    write_last_run(offline_config, "db1", realistic_run(ended))
    write_last_run(offline_config, "db2", realistic_run(ended, ok=False, window_seconds=None))
    write_metrics(offline_config)
    prom = Path(str(offline_config.defaults.metrics_file))
    promtool_check(prom)
    samples = parse(prom.read_text())
    db1 = {"vm": "db1", "command": "snapshot"}
    assert value(samples, "last_run_service_window_seconds", **db1) == 4.412
    assert value(samples, "last_run_dump_bytes", **db1) == int(12.3 * 1024 * 1024)
    assert value(samples, "last_run_duration_seconds", **db1) == pytest.approx(12.5)
    assert value(samples, "last_run_timestamp_seconds", **db1) == pytest.approx(ended)
    db2 = {"vm": "db2", "command": "snapshot"}
    assert value(samples, "last_run_success", **db2) == 0
    assert value(samples, "last_run_exit_code", **db2) == 5
    assert value(samples, "last_run_service_window_seconds", **db2) is None  # still down


def test_label_values_are_escaped(tmp_path: Path) -> None:
    assert escape_label("plain") == "plain"
    assert escape_label('a"b') == 'a\\"b'
    assert escape_label("back\\slash") == "back\\\\slash"
    assert escape_label("two\nlines") == "two\\nlines"
    family = Family("snapcoord_test_seconds", 'help with "quotes" and \\ and\nnewline')
    family.add({"vm": 'we"ird\\vm\nname', "command": "snapshot"}, 1.5)
    family.add({"vm": "plain", "command": "snapshot"}, None)  # no value: no sample
    text = metrics._format(family)
    assert text.splitlines()[2] == (
        'snapcoord_test_seconds{vm="we\\"ird\\\\vm\\nname",command="snapshot"} 1.5'
    )
    (tmp_path / "t.prom").write_text(text)
    promtool_check(tmp_path / "t.prom")
    ((_, labels),) = parse(text)
    assert dict(labels)["vm"] == 'we\\"ird\\\\vm\\nname'  # as written; promtool parsed it


def test_promtool_would_catch_a_bad_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.prom"
    bad.write_text('# HELP x_total a\n# TYPE x_total gauge\nx_total{vm="a"} 1\n')
    with pytest.raises(AssertionError):
        promtool_check(bad)


def test_no_metrics_file_no_write(tmp_path: Path) -> None:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store")},
        "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
        "vms.db1": {"hypervisor": "lab", "name": "test"},
    }
    config = load_config(str(write_config(tmp_path / "c.toml", tables)))
    write_last_run(config, "db1", realistic_run(time.time()))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    write_metrics(config)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_mode_0644_whatever_the_umask_and_replaced_atomically(offline_config: Config) -> None:
    prom = Path(str(offline_config.defaults.metrics_file))
    prom.write_text("old\n")
    inode = prom.stat().st_ino
    write_last_run(offline_config, "db1", realistic_run(time.time()))
    old = os.umask(0o077)
    try:
        write_metrics(offline_config)
    finally:
        os.umask(old)
    assert prom.stat().st_mode & 0o777 == 0o644
    assert prom.stat().st_ino != inode  # a new file moved into place, never rewritten in place
    assert "snapcoord_last_run_success" in prom.read_text()


def test_a_file_that_cannot_be_written_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tables = {
        "defaults": {
            "store": str(tmp_path / "store"),
            "metrics_file": str(tmp_path / "missing-dir" / "s.prom"),
        },
        "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
        "vms.db1": {"hypervisor": "lab", "name": "test"},
    }
    config = load_config(str(write_config(tmp_path / "c.toml", tables)))
    with caplog.at_level(logging.WARNING, logger="snapcoord"):
        write_metrics(config)  # never raises
    assert "cannot write metrics file" in caplog.text
    assert not (tmp_path / "missing-dir").exists()


def test_nothing_known_gives_an_empty_file(offline_config: Config) -> None:
    write_metrics(offline_config)
    prom = Path(str(offline_config.defaults.metrics_file))
    assert prom.read_text() == ""
    promtool_check(prom)


def test_values_are_written_exactly(offline_config: Config) -> None:
    write_last_run(offline_config, "db1", realistic_run(1_800_000_000.25))
    text = metrics.render(offline_config, now=1_800_000_100.0)
    assert 'snapcoord_last_run_timestamp_seconds{vm="db1",command="snapshot"} 1800000000.25' in text
    assert 'snapcoord_last_run_exit_code{vm="db1",command="snapshot"} 0\n' in text


def test_docs_list_every_metric() -> None:
    text = (REPO / "docs" / "monitoring.md").read_text()
    documented = set(re.findall(r"^\| `(snapcoord_\w+)` \|", text, re.M))
    assert documented == {family.name for family in metrics._families().values()}

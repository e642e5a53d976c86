"""Plain output that is not a terminal (cron mail, a log file, journald): every line starts with
the time in ISO 8601 with its offset, to be read against the hypervisor's task log (issue 25).
On a terminal nothing changes; ``--json`` and ``config example`` stay what programs read.

The one place that checks the stamp against the clock; every other CLI test takes the stamps
off through tests.cli_helpers.unstamped, which checks that each line has one."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.cli_helpers import REPO, STAMP, snapcoord, write_config
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture


@pytest.fixture
def config(tmp_path: Path, libvirt_node: str) -> Path:
    return write_config(
        tmp_path / "snapcoord.toml",
        {
            "defaults": {"store": str(tmp_path / "store"), "label": "test"},
            "hypervisors.lab": {"type": "libvirt", "uri": libvirt_node},
            "vms.db1": {"hypervisor": "lab"},
            "vms.ghost": {"hypervisor": "lab", "name": "no-such-domain"},
        },
    )


def stamps(text: str) -> list[datetime]:
    """The stamp of every line (each line must start with exactly one)."""
    found = []
    for line in text.splitlines():
        match = STAMP.match(line)
        assert match, f"no stamp: {line!r}"
        assert not STAMP.search(line, match.end()), f"two stamps: {line!r}"
        found.append(datetime.fromisoformat(match.group().strip()))
    return found


def test_every_plain_line_starts_with_the_local_time_and_its_offset(config: Path) -> None:
    before = datetime.now().astimezone().replace(microsecond=0)
    # the step lines are written in pieces (`db1: -> step ...`, later ` ok (0.01 s)`): one stamp
    proc = snapcoord("-c", str(config), "snapshot", "db1", "ghost", "--parallel", "1", raw=True)
    after = datetime.now().astimezone()
    assert proc.returncode == 3
    out, err = stamps(proc.stdout), stamps(proc.stderr)
    assert len(out) > 5 and err, "step lines on stdout, the error line on stderr"
    for stamp in out + err:
        assert stamp.utcoffset() == before.utcoffset()
        assert before <= stamp <= after
    assert out == sorted(out), "stamped as written"
    assert "snapcoord: error: ghost (hypervisor VM no-such-domain): " in proc.stderr


def test_the_offset_is_the_hosts_time_zone(config: Path) -> None:
    proc = snapcoord("-c", str(config), "list", "db1", env={"TZ": "XYZ-5:30"}, raw=True)
    assert proc.returncode == 0
    assert {s.isoformat()[-6:] for s in stamps(proc.stdout)} == {"+05:30"}


def test_json_and_the_example_stay_unstamped_stderr_does_not(config: Path) -> None:
    proc = snapcoord("-c", str(config), "list", "db1", "ghost", "--json", raw=True)
    assert proc.returncode == 3
    assert set(json.loads(proc.stdout)["vms"]) == {"db1", "ghost"}  # one document, as is
    assert stamps(proc.stderr), "the error line goes to the log or mail: stamped"
    example = snapcoord("config", "example", raw=True)
    assert example.stdout.startswith("# snapcoord configuration") and not STAMP.search(
        example.stdout
    )
    helped = snapcoord("list", "--help", raw=True)
    assert helped.stdout.startswith("usage: snapcoord list") and not STAMP.search(helped.stdout)


def test_a_terminal_gets_no_stamps(config: Path) -> None:
    primary, secondary = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "snapcoord", "-c", str(config), "list", "db1", "ghost"],
        stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, cwd=REPO,
    )  # fmt: skip
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert child.wait(timeout=60) == 3
    text = shown.decode()
    assert "before-upgrade" in text and "snapcoord: error: ghost" in text
    assert not STAMP.search(text), text

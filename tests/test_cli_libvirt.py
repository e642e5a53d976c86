"""The CLI end to end on libvirt's test driver: snapshot, list, revert, delete, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from snapcoord import cli
from snapcoord.listing import LIST_LEGEND
from snapcoord.lock import VMLock
from tests.cli_helpers import json_lines, snapcoord, write_config
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
            "vms.byuuid": {"hypervisor": "lab", "name": "5e6ab1d2-0000-4000-8000-000000000002"},
        },
    )


def test_hypervisor_only_snapshot_json(config: Path) -> None:
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json")
    assert proc.returncode == 0, proc.stderr
    (run,) = json_lines(proc.stdout)
    assert run["vm"] == "db1" and run["ok"] is True and run["exit_code"] == 0
    assert run["snapshot"].startswith("snapcoord-test-") and len(run["snapshot"]) <= 40
    assert run["window_seconds"] is None  # nothing was stopped: no guest table
    names = [s["name"] for s in run["steps"]]
    assert "hypervisor snapshot" in names
    for step in run["steps"]:
        assert step["ok"] is True and step["ended"] >= step["started"]
    assert run["notes"] == ["no [guest] table: the snapshot is crash-consistent only"]


def test_several_vms_one_json_line_each_then_a_summary(config: Path) -> None:
    proc = snapcoord("-c", str(config), "snapshot", "db1", "ghost", "byuuid", "--json")
    *runs, last = json_lines(proc.stdout)
    assert sorted(r["vm"] for r in runs) == ["byuuid", "db1", "ghost"]  # in the order they end
    runs.sort(key=lambda r: ["db1", "ghost", "byuuid"].index(r["vm"]))
    assert last["summary"]["outcomes"] == {"hypervisor_error": 1, "ok": 2}
    assert [r["ok"] for r in runs] == [True, False, True]
    assert runs[1]["exit_code"] == 3
    assert proc.returncode == 3
    assert "no-such-domain" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_the_plan_and_touches_nothing(config: Path, tmp_path: Path) -> None:
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "plan (dry run" in proc.stdout and "create_snapshot(" in proc.stdout
    assert not (tmp_path / "store").exists()


def test_list_json_shows_preloaded_snapshots(config: Path) -> None:
    proc = snapcoord("-c", str(config), "list", "db1", "--json")
    assert proc.returncode == 0, proc.stderr
    (out,) = json_lines(proc.stdout)
    by_name = {s["name"]: s for s in out["snapshots"]}
    assert by_name["snapcoord-manual-20260101T020000Z"]["snapcoord"] is True
    assert by_name["before-upgrade"]["snapcoord"] is False
    assert by_name["before-upgrade"]["current"] is True
    assert by_name["before-upgrade"]["parent"] == "snapcoord-manual-20260101T020000Z"
    human = snapcoord("-c", str(config), "list", "db1")
    assert "before-upgrade" in human.stdout


def test_list_over_a_selection_in_config_order_one_error_line_for_the_failing_vm(
    config: Path,
) -> None:
    """``list`` takes a selection like status: every VM listed, in the selection's order, each
    row prefixed with its VM; the VM whose hypervisor cannot find it gives its one error line
    and does not stop the others; the exit code is the most severe (docs/exit-codes.md)."""
    for _ in range(2):  # the same lines in the same order every run
        proc = snapcoord("-c", str(config), "list", "--all")
        assert proc.returncode == 3, proc.stderr
        lines = proc.stdout.splitlines()
        db1 = [line for line in lines if line.startswith("db1: ")]
        assert lines[: len(db1)] == db1, "db1 (first in the configuration) comes first"
        assert any(line.endswith("  before-upgrade") for line in db1)
        assert lines[len(db1)] == "byuuid: no snapshots"
        assert lines[-2] == LIST_LEGEND
        assert lines[-1] == "list: 3 VMs: 1 hypervisor_error, 2 ok (exit 3)"
        (error,) = proc.stderr.splitlines()
        assert error.startswith("snapcoord: error: ghost (hypervisor VM no-such-domain): ")
    # --exclude, --tag-like rules and names work as for status; one named VM keeps bare rows
    proc = snapcoord("-c", str(config), "list", "--all", "--exclude", "ghost")
    assert proc.returncode == 0 and "ghost" not in proc.stdout + proc.stderr
    single = snapcoord("-c", str(config), "list", "db1")
    assert single.returncode == 0
    rows = single.stdout.splitlines()
    assert rows[-1] == LIST_LEGEND and not any(r.startswith("db1:") for r in rows)
    assert [r[1:] for r in rows[:-1]] == [line.removeprefix("db1: ")[1:] for line in db1]


def test_list_json_over_several_vms_is_one_document(config: Path) -> None:
    proc = snapcoord("-c", str(config), "list", "db1", "ghost", "byuuid", "--json")
    assert proc.returncode == 3
    document = json.loads(proc.stdout)  # one document, not one line per VM
    assert list(document["vms"]) == ["db1", "ghost", "byuuid"]
    assert document["summary"]["outcomes"] == {"hypervisor_error": 1, "ok": 2}
    assert document["summary"]["exit_code"] == 3 and document["summary"]["command"] == "list"
    db1, ghost, byuuid = document["vms"].values()
    assert db1["ok"] is True and "before-upgrade" in [s["name"] for s in db1["snapshots"]]
    assert ghost["ok"] is False and ghost["exit_code"] == 3 and ghost["snapshots"] is None
    assert ghost["errors"][0].startswith("ghost (hypervisor VM no-such-domain): ")
    assert byuuid["snapshots"] == [] and byuuid["errors"] == []
    assert proc.stderr.count("snapcoord: error: ") == 1


def test_list_of_an_unknown_vm_or_none_is_a_usage_error(config: Path) -> None:
    unknown = snapcoord("-c", str(config), "list", "nosuch")
    assert unknown.returncode == 2 and "nosuch" in unknown.stderr and unknown.stdout == ""
    nothing = snapcoord("-c", str(config), "list")
    assert nothing.returncode == 2 and "no VM given" in nothing.stderr


def test_revert_needs_yes_without_a_terminal(config: Path) -> None:
    proc = snapcoord("-c", str(config), "revert", "db1", stdin="")
    assert proc.returncode == 2
    assert "refusing without --yes" in proc.stderr


@pytest.mark.parametrize("safety", [True, False])
def test_revert_to_named_snapshot(config: Path, safety: bool) -> None:
    extra = [] if safety else ["--no-safety-snapshot"]
    proc = snapcoord(
        "-c",
        str(config),
        "revert",
        "db1",
        "--to",
        "snapcoord-manual-20260101T020000Z",
        "--yes",
        "--json",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = json_lines(proc.stdout)
    names = [s["name"] for s in run["steps"]]
    assert ("safety snapshot" in names) is safety
    assert "revert" in names and run["snapshot"] == "snapcoord-manual-20260101T020000Z"


def test_revert_defaults_to_newest_snapcoord_snapshot(config: Path) -> None:
    proc = snapcoord("-c", str(config), "revert", "db1", "--yes", "--json", "--no-safety-snapshot")
    assert proc.returncode == 0, proc.stderr
    assert json_lines(proc.stdout)[0]["snapshot"] == "snapcoord-manual-20260101T020000Z"


def test_delete_and_delete_missing(config: Path) -> None:
    ok = snapcoord("-c", str(config), "delete", "db1", "before-upgrade", "--yes")
    assert ok.returncode == 0, ok.stderr
    missing = snapcoord("-c", str(config), "delete", "db1", "nope", "--yes")
    assert missing.returncode == 3
    assert "nope" in missing.stderr and "Traceback" not in missing.stderr


def test_second_run_on_a_locked_vm_exits_75(config: Path, tmp_path: Path) -> None:
    with VMLock(tmp_path / "store", "db1", "test-holder"):
        proc = snapcoord("-c", str(config), "snapshot", "db1")
    assert proc.returncode == 75
    assert "locked by run test-holder" in proc.stderr


def test_unknown_vm_is_a_usage_error(config: Path) -> None:
    proc = snapcoord("-c", str(config), "snapshot", "db9")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"snapcoord: error: no VM 'db9' in {config} (configured: byuuid, db1, ghost)"
    ]


def test_bad_label_is_a_usage_error(config: Path) -> None:
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--label", "no spaces")
    assert proc.returncode == 2 and "label 'no spaces' is invalid" in proc.stderr


def test_missing_sdk_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VS_PW", "secret-value")
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.vc": {
                "type": "vsphere",
                "host": "127.0.0.1",
                "user": "u",
                "password": {"env": "VS_PW"},
            },
            "vms.db1": {"hypervisor": "vc"},
        },
    )
    monkeypatch.setitem(sys.modules, "pyVmomi", None)  # import pyVmomi now raises ImportError
    monkeypatch.delitem(sys.modules, "snapcoord.adapters.vsphere", raising=False)
    code = cli.main(["-c", str(cfg), "list", "db1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install 'snapcoord[vsphere]'" in err
    assert "secret-value" not in err


def test_agent_transport_on_a_domain_without_the_agent_channel_is_one_line_with_the_fix(
    tmp_path: Path, libvirt_node: str
) -> None:
    """``transport = "agent"`` needs the domain's org.qemu.guest_agent.0 channel: refused in
    preflight, before anything in the guest is touched, and ``check`` says the same."""
    config = write_config(
        tmp_path / "agent.toml",
        {
            "defaults": {"store": str(tmp_path / "store"), "label": "test"},
            "hypervisors.lab": {"type": "libvirt", "uri": libvirt_node},
            "vms.db1": {"hypervisor": "lab"},
            "vms.db1.guest": {"transport": "agent", "services": ["cron"]},
        },
    )
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json")
    assert proc.returncode == 4, proc.stderr
    (run,) = json_lines(proc.stdout)
    assert "stop services" not in [s["name"] for s in run["steps"]]
    errors = [line for line in proc.stderr.splitlines() if "org.qemu.guest_agent.0" in line]
    assert len(errors) == 1, proc.stderr
    assert "db1: the domain has no" in errors[0] and "qemu-guest-agent" in errors[0]
    assert "Traceback" not in proc.stderr
    checked = snapcoord("-c", str(config), "check", "db1")
    assert checked.returncode != 0
    assert "org.qemu.guest_agent.0" in checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr

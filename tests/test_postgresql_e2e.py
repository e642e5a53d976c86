"""`snapcoord snapshot` of a PostgreSQL VM with `dump = true` over the real loopback SSH guest
(libvirt test driver): apache2 and cron stopped, pg_dumpall taken inside the window, PostgreSQL
stopped for the snapshot and really restarted; then `snapcoord restore-dump` brings back the
exact data. A failing pg_dumpall follows on_dump_failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import lab, pg_fixture
from tests.cli_helpers import json_lines, snapcoord
from tests.guest_fixtures import VM_NAME, guest_config, observed, run_observed
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

pytestmark = pytest.mark.real


def _config(tmp_path: Path, uri: str, guest: lab.SshGuest, **dump: Any) -> Path:
    config = guest_config(tmp_path, uri, guest.guest_table(database="postgresql", dump=True))
    if dump:
        lines = [f"\n[vms.{VM_NAME}.dump]"] + [f"{k} = {json.dumps(v)}" for k, v in dump.items()]
        config.write_text(config.read_text() + "\n".join(lines) + "\n")
    return config


def test_snapshot_brackets_postgresql_and_restore_dump_is_exact(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    pg_shop: pg_fixture.PgShop,
    pg_services: lab.GuestServices,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest)
    before = lab.postmaster_pid()
    observe = tmp_path / "observe.jsonl"
    proc = run_observed("-c", str(config), "snapshot", VM_NAME, "--json", observe=observe,
                        timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = json_lines(proc.stdout)
    names = [s["name"] for s in run["steps"] if not s["undo"]]
    assert names.index("stop services") < names.index("dump to store")
    assert names.index("dump to store") < names.index("stop database")
    (seen,) = [e for e in observed(observe) if e["event"] == "create_snapshot"]
    assert seen["postmaster"] is None  # PostgreSQL was down for the snapshot ...
    assert not seen["apache2"] and not seen["cron"]
    after = lab.postmaster_pid()
    assert after is not None and after != before  # ... and really started again
    assert pg_services.all_running()

    folder = Path(run["store_folder"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["snapshot_taken"] is True and manifest["pg_dumpall"]["valid"] is True
    dump_file = folder / run["dump"]["file"]
    # the default compression = "auto" on a guest with zstd (the lab's): a .sql.zst, no note
    assert dump_file.name == "postgresql.sql.zst" and run["dump"]["compression"] == "zstd"
    assert manifest["pg_dumpall"]["compression"] == "zstd"
    assert not any("compressed with gzip" in n for n in run["notes"]), run["notes"]
    assert "note: dump compressed" not in proc.stderr + proc.stdout
    assert oct(dump_file.stat().st_mode & 0o777) == "0o600"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"

    pg_fixture.mutate()
    assert pg_shop.current() != pg_shop
    plan = snapcoord("-c", str(config), "restore-dump", VM_NAME, "--from", run["snapshot"],
                     "--dry-run")  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert pg_shop.current() != pg_shop  # a dry run changes nothing
    done = snapcoord("-c", str(config), "restore-dump", VM_NAME, "--from", run["snapshot"],
                     "--yes", "--json", timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert pg_shop.current() == pg_shop
    assert pg_services.all_running()


def test_a_failing_pg_dumpall_aborts_and_continue_snapshots_anyway(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    pg_shop: pg_fixture.PgShop,
    pg_services: lab.GuestServices,
) -> None:
    # pg_dumpall cannot lock sales.orders in time: it fails mid-stream.
    config = _config(tmp_path, libvirt_node, ssh_guest, options=["--lock-wait-timeout=500"])
    for attempt in ("abort", "continue"):
        if attempt == "continue":
            config.write_text(config.read_text() + 'on_dump_failure = "continue"\n')
        with pg_fixture.orders_locked(15):
            proc = run_observed("-c", str(config), "snapshot", VM_NAME, "--json",
                                observe=tmp_path / f"{attempt}.jsonl", timeout=600)  # fmt: skip
        (run,) = json_lines(proc.stdout)
        assert proc.returncode == 4, proc.stderr
        steps = [s["name"] for s in run["steps"] if s["ok"]]
        assert ("hypervisor snapshot" in steps) == (attempt == "continue")
        assert pg_services.all_running() and lab.postmaster_pid() is not None
    store = tmp_path / "store" / VM_NAME
    assert sorted(p.name.endswith(".failed") for p in store.iterdir()) == [True, True]


def test_pause_is_refused_for_postgresql_before_anything_is_touched(
    tmp_path: Path, libvirt_node: str, ssh_guest: lab.SshGuest, pg_services: lab.GuestServices
) -> None:
    guest = ssh_guest.guest_table(database="postgresql", consistency="pause")
    config = guest_config(tmp_path, libvirt_node, guest)
    before = lab.postmaster_pid()

    proc = run_observed("-c", str(config), "snapshot", VM_NAME, "--json",
                        observe=tmp_path / "o.jsonl")  # fmt: skip

    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not possible with PostgreSQL" in lines[0], lines
    assert "consistency = 'stop'" in lines[0]
    (run,) = json_lines(proc.stdout)
    assert "hypervisor snapshot" not in [s["name"] for s in run["steps"]]
    assert lab.postmaster_pid() == before and pg_services.all_running()

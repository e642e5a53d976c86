"""``snapcoord verify`` end to end: real dumps of the i-doit-like dataset (foreign keys, > 100k
rows) taken from the lab guest's MariaDB over SSH, verified by the CLI in throwaway MariaDB
servers on this host. A good dump passes, also right after a snapshot run (verify = true, after
the window); each bad dump fails with its own cause and exit 5 and is kept, marked; a verify that
cannot run (out of disk) is exit 4 and judges nothing; SIGTERM in the middle leaves no server
and no file. After every test the guest's services run."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import idoit_fixture, lab
from tests.cli_helpers import REPO, json_lines, snapcoord, write_config
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

NOBODY = 65534


@pytest.fixture
def verify_dir() -> Iterator[Path]:
    """A verify_dir of this test's own (root's, 0755, reachable by nobody): /tmp's pytest
    folders are 0700, which the throwaway server (nobody) cannot traverse."""
    path = Path("/var/tmp") / f"snapcoord-verify-test.{secrets.token_hex(4)}"
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


def _config(tmp_path: Path, uri: str, guest: dict[str, Any], verify_dir: Path, **dump: Any) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {
            "store": str(tmp_path / "store"),
            "label": "verify",
            "verify_dir": str(verify_dir),
            "metrics_file": str(tmp_path / "snapcoord.prom"),
        },
        "hypervisors.lab": {"type": "libvirt", "uri": uri},
        "vms.db1": {"hypervisor": "lab"},
        "vms.db1.guest": {**guest, "dump": True},
    }
    if dump:
        tables["vms.db1.dump"] = dump
    return write_config(tmp_path / "c.toml", tables)


def _snapshot(config: Path) -> dict[str, Any]:
    proc = snapcoord("-c", str(config), "snapshot", "db1", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr
    (run,) = json_lines(proc.stdout)
    return run


def _verify(config: Path, *args: str, timeout: float = 900) -> tuple[int, dict[str, Any], str]:
    proc = snapcoord("-c", str(config), "verify", "db1", "--json", *args, timeout=timeout)
    (out,) = json_lines(proc.stdout)
    return proc.returncode, out, proc.stderr


def _confined_processes(verify_dir: Path) -> list[str]:
    """Command lines of nobody's processes that use ``verify_dir`` (the throwaway servers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != NOBODY:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(verify_dir) in cmdline:
            found.append(cmdline)
    return found


def _nothing_left(verify_dir: Path) -> None:
    assert list(verify_dir.iterdir()) == []
    assert _confined_processes(verify_dir) == []


# -- changing a stored dump -----------------------------------------------------------------


def _copy_run(run_dir: Path, name: str) -> Path:
    copy = run_dir.parent / name
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["snapshot"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "verify.json").unlink(missing_ok=True)
    return copy


def _rewrite_sql(run_dir: Path, change: Any, *, rehash: bool = True) -> None:
    """Change the SQL of the run's gzip dump with ``change(sql) -> sql``; with ``rehash`` the
    manifest's sha256 and size are recomputed to match (the file passes its checksum)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    name = manifest["mysqldump"]["file"]
    path = run_dir / name
    sql = gzip.decompress(path.read_bytes())
    changed = change(sql)
    assert changed != sql
    path.write_bytes(gzip.compress(changed))
    if rehash:
        data = path.read_bytes()
        manifest["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        (run_dir / "manifest.json").write_text(json.dumps(manifest))


def _change_a_title(sql: bytes) -> bytes:
    """One character of the first object's title, same length: same rows, other data."""
    match = re.search(rb"INSERT INTO `isys_obj` VALUES\s*\(1,'(.)", sql)
    assert match is not None
    other = b"Z" if match.group(1) != b"Z" else b"Y"
    return sql[: match.start(1)] + other + sql[match.end(1) :]


def _drop_a_row(sql: bytes) -> bytes:
    """The last row of the first INSERT into isys_catg_memory_list (nothing references it)."""
    start = sql.index(b"INSERT INTO `isys_catg_memory_list` VALUES")
    end = sql.index(b");\n", start)
    *_, last = re.finditer(rb"\),\s*\(", sql[start:end])  # between the last two rows
    return sql[: start + last.start() + 1] + sql[end + 1 :]


# -- the tests ------------------------------------------------------------------------------


def test_verify_true_proves_the_dump_after_the_window(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
    verify_dir: Path,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table(), verify_dir, verify=True)
    run = _snapshot(config)
    verified = run["verify"]
    assert verified["verified"] is True, run
    assert verified["compared"] == "checksums"
    expected = json.loads((Path(run["store_folder"]) / "manifest.json").read_text())["mysqldump"]
    assert verified["tables"] == len(expected["tables"]) == len(expected["checksums"])
    assert verified["rows"] == sum(expected["tables"].values()) >= 100_000
    # after the window: it began once the last service was confirmed running again
    ended = max(s["ended"] for s in run["steps"] if s["name"] == "start services")
    assert verified["finished"] - verified["seconds"] >= ended
    assert all(guest_services.states().values())
    marked = json.loads((Path(run["store_folder"]) / "verify.json").read_text())
    assert marked["verified"] is True and marked["snapshot"] == run["snapshot"]
    last = json.loads((tmp_path / "store" / "journal" / "db1.last-run.json").read_text())
    assert last["verify"]["verified"] is True
    prom = (tmp_path / "snapcoord.prom").read_text()
    assert 'snapcoord_last_verify_success{vm="db1",what="dump"} 1\n' in prom
    status = snapcoord("-c", str(config), "status", "db1", "--offline")
    assert "last verify (dump) ok " in status.stdout and run["snapshot"] in status.stdout
    _nothing_left(verify_dir)

    # the same dump again by the command, by name: the same figures
    code, out, err = _verify(config, "--from", run["snapshot"])
    assert code == 0, err
    again = out["verify"]
    assert (again["tables"], again["rows"]) == (verified["tables"], verified["rows"])
    _nothing_left(verify_dir)


def test_a_pause_mode_dump_is_loaded_and_checked_but_its_figures_not_compared(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
    verify_dir: Path,
) -> None:
    guest = {**ssh_guest.guest_table(), "consistency": "pause"}
    config = _config(tmp_path, libvirt_node, guest, verify_dir, verify=True)
    run = _snapshot(config)
    assert run["consistency"] == "pause"
    assert run["verify"]["verified"] is True and run["verify"]["compared"] == "none"
    assert run["verify"]["rows"] >= 100_000
    assert any("the figures were recorded while the application wrote" in n for n in run["notes"])
    assert all(guest_services.states().values())
    _nothing_left(verify_dir)


def test_each_bad_dump_fails_with_its_cause_and_is_kept(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
    verify_dir: Path,
) -> None:
    # _rewrite_sql edits a gzip dump
    guest = ssh_guest.guest_table()
    config = _config(tmp_path, libvirt_node, guest, verify_dir, compression="gzip")
    run_dir = Path(_snapshot(config)["store_folder"])
    assert all(guest_services.states().values())

    changed = _copy_run(run_dir, "snapcoord-verify-20261207T000001Z")
    _rewrite_sql(changed, _change_a_title)  # sha256 recomputed: the file passes its checksum
    lost = _copy_run(run_dir, "snapcoord-verify-20261207T000002Z")
    _rewrite_sql(lost, _drop_a_row)
    edited = _copy_run(run_dir, "snapcoord-verify-20261207T000003Z")
    _rewrite_sql(edited, _change_a_title, rehash=False)

    cases = [
        (changed, "table idoit_data.isys_obj: 20000 rows as recorded, but the checksum differs"),
        (lost, "rows recorded, "),
        (edited, "refusing to use it"),  # its size or sha256 differs from the manifest
    ]
    for folder, cause in cases:
        code, out, err = _verify(config, "--from", folder.name)
        assert code == 5, err
        assert out["verify"]["verified"] is False
        assert cause in out["verify"]["first_mismatch"], out
        assert f"snapcoord: error: db1: verify of {folder.name} failed: " in err
        assert cause in err and "Traceback" not in err
        marked = json.loads((folder / "verify.json").read_text())
        assert marked["verified"] is False and cause in marked["problem"]
        assert (folder / "manifest.json").is_file()  # kept, never deleted
        _nothing_left(verify_dir)
    lost_line = json.loads((lost / "verify.json").read_text())["problem"]
    assert re.search(r"table idoit_data\.isys_catg_memory_list: (\d+) rows recorded, \d+ loaded",
                     lost_line)  # fmt: skip
    prom = (tmp_path / "snapcoord.prom").read_text()
    assert 'snapcoord_last_verify_success{vm="db1",what="dump"} 0\n' in prom

    # the original is still good: what failed was each copy's own change
    code, out, err = _verify(config, "--from", run_dir.name)
    assert code == 0, err


def test_out_of_disk_is_exit_4_judges_nothing_and_leaves_nothing(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
    verify_dir: Path,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table(), verify_dir)
    run_dir = Path(_snapshot(config)["store_folder"])
    # room for a fresh server, not for the restored dataset (tests run in a mount namespace
    # of their own: the mount is this test's)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_MIB}m,mode=0755", "verify", str(verify_dir)],
        check=True,
    )
    code, out, err = _verify(config)
    assert code == 4, err
    assert out["verify"]["verified"] is None
    assert "space" in out["verify"]["problem"], out
    assert "Traceback" not in err
    assert json.loads((run_dir / "verify.json").read_text())["verified"] is None
    _nothing_left(verify_dir)


#: MiB of the tmpfs in the out-of-disk test: a fresh server fits (157 MiB here, 128 of them its
#: redo log), the restored dataset does not
SMALL_MIB = 165


def test_sigterm_during_the_load_stops_the_server_and_removes_its_files(
    tmp_path: Path,
    libvirt_node: str,
    ssh_guest: lab.SshGuest,
    guest_services: lab.GuestServices,
    idoit_db: idoit_fixture.IdoitDB,
    verify_dir: Path,
) -> None:
    config = _config(tmp_path, libvirt_node, ssh_guest.guest_table(), verify_dir)
    _snapshot(config)
    argv = [sys.executable, "-m", "snapcoord", "-c", str(config), "verify", "db1", "--json"]
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 300
        # the load has begun: the confined client runs beside the throwaway server
        while not _clients(verify_dir):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the load never started"
            time.sleep(0.05)
        assert _confined_processes(verify_dir)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, err
    (result,) = json_lines(out)
    assert result["verify"]["verified"] is None and result["verify"]["problem"] == "interrupted"
    _nothing_left(verify_dir)


def _clients(verify_dir: Path) -> list[str]:
    """The confined mysql clients: the load runs."""
    return [
        c
        for c in _confined_processes(verify_dir)
        if Path(c.split()[0]).name in ("mysql", "mariadb")
    ]


assert os.sep == "/"

"""The off-guest store: atomic run folders, sha256 manifests, failed runs, space checks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcoord import store
from snapcoord.errors import ExitCode, PreflightError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_run(root: Path, snapshot: str = "snap-1", payload: bytes = b"-- sql\n") -> Path:
    run = store.RunDir.begin(root, "db1", snapshot)
    sink = run.sink("mysql.sql.gz")
    sink.write(payload)
    sink.finish({"kind": "mysqldump"})
    run.sections["mysqldump"] = {"file": "mysql.sql.gz", "databases": ["app"]}
    return run.commit()


def test_run_folder_is_atomic_private_and_verified(tmp_path: Path) -> None:
    root = tmp_path / "store"
    run = store.RunDir.begin(root, "db1", "snap-1")
    assert run.path.name == ".snap-1.partial"
    sink = run.sink("mysql.sql.gz")
    sink.write(b"hello ")
    sink.write(b"world\n")
    assert not (run.path / "mysql.sql.gz").exists()  # only the .part name until finished
    entry = sink.finish({"kind": "mysqldump"})
    assert entry["size"] == 12
    assert store.list_dumps(root, "db1") == []  # not listed before commit
    final = run.commit()

    assert final == root / "db1" / "snap-1"
    assert not (root / "db1" / ".snap-1.partial").exists()
    for directory in (root, root / "db1", final):
        assert _mode(directory) == 0o700
    for file in final.iterdir():
        assert _mode(file) == 0o600
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "mysql.sql.gz"]
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["snapshot"] == "snap-1"
    assert manifest["files"]["mysql.sql.gz"]["sha256"] == store.sha256_file(final / "mysql.sql.gz")
    assert store.verify(final)["vm"] == "db1"
    assert [d.snapshot for d in store.list_dumps(root, "db1")] == ["snap-1"]
    assert store.find_dump(root, "db1", "snap-1") == final


def test_corruption_and_truncation_are_refused(tmp_path: Path) -> None:
    final = _write_run(tmp_path, payload=b"x" * 1000)
    data = bytearray((final / "mysql.sql.gz").read_bytes())
    data[500] ^= 0xFF
    (final / "mysql.sql.gz").write_bytes(bytes(data))
    with pytest.raises(store.CorruptDump, match="sha256"):
        store.verify(final)
    (final / "mysql.sql.gz").write_bytes(bytes(data[:900]))
    with pytest.raises(store.CorruptDump, match="900 bytes"):
        store.verify(final)
    (final / "mysql.sql.gz").unlink()
    with pytest.raises(store.CorruptDump, match="missing") as info:
        store.verify(final)
    assert info.value.exit_code == ExitCode.PREFLIGHT


def test_failed_run_is_kept_apart_and_never_presented_as_good(tmp_path: Path) -> None:
    run = store.RunDir.begin(tmp_path, "db1", "snap-2")
    sink = run.sink("mysql.sql.gz")
    sink.write(b"partial")
    sink.keep_as("mysql.sql.gz.incomplete")
    failed = run.fail("mysqldump exited 2")
    assert failed == tmp_path / "db1" / "snap-2.failed"
    assert run.commit() == failed  # committing a failed run keeps it failed
    assert not (tmp_path / "db1" / "snap-2").exists()
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["errors"] == ["mysqldump exited 2"]
    assert store.list_dumps(tmp_path, "db1") == []
    assert [d.status for d in store.list_dumps(tmp_path, "db1", include_failed=True)] == ["failed"]
    with pytest.raises(store.CorruptDump, match="failed"):
        store.find_dump(tmp_path, "db1", "snap-2")
    with pytest.raises(store.CorruptDump):
        store.verify(failed)


def test_listing_orders_runs_and_ignores_partial_ones(tmp_path: Path) -> None:
    _write_run(tmp_path, "snap-a")
    _write_run(tmp_path, "snap-b")
    store.RunDir.begin(tmp_path, "db1", "snap-c")  # crashed run: stays partial
    (tmp_path / "db1" / "stray").mkdir()  # no manifest
    assert [d.snapshot for d in store.list_dumps(tmp_path, "db1")] == ["snap-a", "snap-b"]
    with pytest.raises(PreflightError, match="snap-a, snap-b"):
        store.find_dump(tmp_path, "db1", "snap-x")
    assert store.remove_run(tmp_path, "db1", "snap-a")
    assert [d.snapshot for d in store.list_dumps(tmp_path, "db1")] == ["snap-b"]
    with pytest.raises(store.StoreError, match="already holds"):
        store.RunDir.begin(tmp_path, "db1", "snap-b")
    # a crashed partial run of the same name is replaced by a new attempt
    again = store.RunDir.begin(tmp_path, "db1", "snap-c")
    assert again.path.is_dir()


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "snap.failed", ""])
def test_names_cannot_escape_the_store(tmp_path: Path, name: str) -> None:
    with pytest.raises(store.StoreError):
        store.RunDir.begin(tmp_path, "db1", name)
    with pytest.raises(store.StoreError):
        store.vm_dir(tmp_path, name)


def test_opened_run_commits_or_fails(tmp_path: Path) -> None:
    with store.opened_run(tmp_path, "db1", "ok") as run:
        run.sink("f").finish()
    assert store.verify(tmp_path / "db1" / "ok")
    with pytest.raises(RuntimeError), store.opened_run(tmp_path, "db1", "bad"):
        raise RuntimeError("boom")
    assert (tmp_path / "db1" / "bad.failed").is_dir()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a store that fills up (root may mount; CI runs as root)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_check_writable_creates_private_folder(tmp_path: Path) -> None:
    folder = store.check_writable(tmp_path / "new" / "store", "db1", 1000)
    assert folder == tmp_path / "new" / "store" / "db1"
    assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700
    assert list(folder.iterdir()) == []  # the probe file is gone


def test_check_writable_reports_a_full_store(tiny_tmpfs: Path) -> None:
    with pytest.raises(store.StoreError, match="free, the dump needs about") as info:
        store.check_writable(tiny_tmpfs, "db1", 10 << 20)
    assert info.value.exit_code == ExitCode.PREFLIGHT
    assert "db1" in str(info.value)


def test_check_writable_reports_a_read_only_store(tiny_tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(store.StoreError, match="not writable: Read-only file system"):
        store.check_writable(tiny_tmpfs, "db1", 0)


def test_sink_on_full_disk_raises_and_fail_still_works(tiny_tmpfs: Path) -> None:
    run = store.RunDir.begin(tiny_tmpfs, "db1", "snap-full")
    sink = run.sink("mysql.sql.gz")
    with pytest.raises(OSError) as info:
        for _ in range(100):
            sink.write(os.urandom(64 << 10))
    assert info.value.errno == 28  # ENOSPC
    sink.discard()
    failed = run.fail("store full")
    assert failed.name == "snap-full.failed"
    assert store.list_dumps(tiny_tmpfs, "db1") == []

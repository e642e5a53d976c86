"""The store's permissions and the links planted in it (issue 23, finding 5).

Root writes the store: with a store others can write, a link planted at ``locks/<vm>.lock``
made root truncate a root-only file, and so did links at the journal's temporary name, a
``.part`` dump, a manifest's temporary name and the freeze log. Now the store (and every
directory above it) is checked before anything is written, what is created is 0700, and files
are opened with ``O_NOFOLLOW`` / ``O_EXCL``. Each test fails on the code before the fix; no lab.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from snapcoord import freeze, freeze_hook, inventory, store
from snapcoord.errors import PreflightError
from snapcoord.journal import CorruptJournal, Journal
from snapcoord.lock import VMLock
from snapcoord.status import read_last_run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attack is on root")

SECRET = b"root's secret\n"
NOBODY = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-only file outside the store, the target of every planted link."""
    path = tmp_path / "root-only"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def _unchanged(secret: Path) -> None:
    assert secret.read_bytes() == SECRET
    assert _mode(secret) == 0o600


def _plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    link.symlink_to(target)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# -- links planted in the store ---------------------------------------------------------------


def test_a_link_at_the_lock_file_is_refused_not_truncated(tmp_path: Path, secret: Path) -> None:
    root = tmp_path / "store"
    _plant(root / "locks" / "db1.lock", secret)
    with pytest.raises(PreflightError) as exc:
        VMLock(root, "db1", "20260101T000000Z-abcdef").acquire()
    assert "symbolic link" in _one_line(exc) and str(root / "locks" / "db1.lock") in str(exc.value)
    _unchanged(secret)


def test_a_hard_link_at_the_lock_file_is_refused_not_truncated(
    tmp_path: Path, secret: Path
) -> None:
    root = tmp_path / "store"
    (root / "locks").mkdir(parents=True, mode=0o700)
    os.link(secret, root / "locks" / "db1.lock")
    with pytest.raises(PreflightError) as exc:
        VMLock(root, "db1", "20260101T000000Z-abcdef").acquire()
    assert "not a plain file" in _one_line(exc)
    _unchanged(secret)


def test_the_lock_still_works(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with VMLock(root, "db1", "20260101T000000Z-abcdef") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert _mode(root / "locks" / "db1.lock") == 0o600


@pytest.mark.parametrize("which", ["journal", "last-run"])
def test_a_link_at_the_journals_temporary_name_is_not_written_through(
    tmp_path: Path, secret: Path, which: str
) -> None:
    root = tmp_path / "store"
    journal = Journal(root, "db1")
    target = journal.path if which == "journal" else journal.last
    # the name the old code used for its temporary file
    _plant(target.with_name(f".{target.name}.{os.getpid()}.tmp"), secret)
    if which == "journal":
        journal.write({"run": "20260101T000000Z-abcdef"})
        assert journal.read() == {"run": "20260101T000000Z-abcdef"}
    else:
        journal.finish({"command": "snapshot", "ok": True})
        assert journal.read_last() == {"command": "snapshot", "ok": True}
    _unchanged(secret)
    assert not target.is_symlink() and _mode(target) == 0o600
    leftovers = [p for p in journal.dir.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
    assert leftovers == []


def test_a_link_at_the_journal_itself_is_replaced_and_never_read(
    tmp_path: Path, secret: Path
) -> None:
    root = tmp_path / "store"
    journal = Journal(root, "db1")
    _plant(journal.path, secret)
    _plant(journal.last, secret)
    with pytest.raises(CorruptJournal) as exc:
        journal.read()
    assert "symbolic link" in _one_line(exc)
    assert journal.read_last() == {}
    assert read_last_run(root, "db1") is None
    journal.write({"run": "20260101T000000Z-abcdef"})
    _unchanged(secret)
    assert not journal.path.is_symlink()


def test_a_link_at_a_part_name_is_not_written_through(tmp_path: Path, secret: Path) -> None:
    root = tmp_path / "store"
    run = store.RunDir.begin(root, "db1", "snap-1")
    _plant(run.path / ".mysql.sql.gz.part", secret)
    sink = run.sink("mysql.sql.gz")
    sink.write(b"-- sql\n")
    sink.finish({"kind": "mysqldump"})
    final = run.commit()
    _unchanged(secret)
    assert (final / "mysql.sql.gz").read_bytes() == b"-- sql\n"
    assert _mode(final / "mysql.sql.gz") == 0o600
    assert store.verify(final)["status"] == "complete"


def test_a_link_at_the_manifests_temporary_name_is_not_written_through(
    tmp_path: Path, secret: Path
) -> None:
    root = tmp_path / "store"
    run = store.RunDir.begin(root, "db1", "snap-1")
    _plant(run.path / ".manifest.json.tmp", secret)  # the old code's temporary name
    sink = run.sink("mysql.sql.gz")
    sink.write(b"-- sql\n")
    sink.finish()
    final = run.commit()
    _unchanged(secret)
    assert store.read_manifest(final)["status"] == "complete"


def test_a_stored_file_that_is_a_link_is_not_a_dump(tmp_path: Path, secret: Path) -> None:
    root = tmp_path / "store"
    run = store.RunDir.begin(root, "db1", "snap-1")
    sink = run.sink("mysql.sql.gz")
    sink.write(SECRET)
    sink.finish()
    final = run.commit()
    (final / "mysql.sql.gz").unlink()
    (final / "mysql.sql.gz").symlink_to(secret)  # same size and sha256 as the recorded file
    with pytest.raises(store.CorruptDump, match="not a regular file"):
        store.verify(final)
    (final / "manifest.json").rename(final / "manifest.real")
    (final / "manifest.json").symlink_to(final / "manifest.real")
    with pytest.raises(store.CorruptDump, match="symbolic link"):
        store.read_manifest(final)


def test_a_link_at_the_freeze_log_is_replaced_not_written_through(
    tmp_path: Path, secret: Path
) -> None:
    root = tmp_path / "store"
    _plant(root / "freeze" / "db1.log", secret)
    path, log = freeze.open_log(root, "db1")
    with log:
        log.write(b"holder says hello\n")
    _unchanged(secret)
    assert path == root / "freeze" / "db1.log"
    assert not path.is_symlink() and path.read_bytes() == b"holder says hello\n"
    assert _mode(path) == 0o600


def test_links_at_the_armed_record_and_inventory_are_not_written_through(
    tmp_path: Path, secret: Path
) -> None:
    root = tmp_path / "store"
    armed = freeze_hook.armed_path(root, "db1")
    _plant(armed.with_name(f".{armed.name}.tmp"), secret)  # the old temporary name
    _plant(armed, secret)
    assert freeze_hook.read_armed(root, "db1") is None  # a link is not read
    store.ensure_private(root, "vzdump")
    store.write_json_atomic(armed, {"vm": "db1", "vmid": 100, "token": "t" * 12, "armed_at": 1})
    assert freeze_hook.read_armed(root, "db1") is not None
    seen = Journal(root, "db1").dir / "db1.inventory.json"
    _plant(seen.with_name(f".{seen.name}.tmp"), secret)
    inventory.record(root, "db1", [])
    assert inventory.read(root, "db1") is not None
    _unchanged(secret)


# -- the store's own permissions ---------------------------------------------------------------


def _lock(root: Path) -> None:
    VMLock(root, "db1", "20260101T000000Z-abcdef").acquire()


def _journal(root: Path) -> None:
    Journal(root, "db1").write({"run": "20260101T000000Z-abcdef"})


def _last_run(root: Path) -> None:
    Journal(root, "db1").finish({"ok": True})


def _run_dir(root: Path) -> None:
    store.RunDir.begin(root, "db1", "snap-1")


def _check_writable(root: Path) -> None:
    store.check_writable(root, "db1", 0)


def _freeze_log(root: Path) -> None:
    freeze.open_log(root, "db1")[1].close()


def _inventory(root: Path) -> None:
    inventory.record(root, "db1", [])


WRITERS: list[Callable[[Path], None]] = [
    _lock,
    _journal,
    _last_run,
    _run_dir,
    _check_writable,
    _freeze_log,
    _inventory,
]


def _nothing_written(root: Path) -> None:
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("write", WRITERS, ids=lambda f: f.__name__.strip("_"))
def test_a_store_others_can_write_is_refused(tmp_path: Path, write: Callable[[Path], None]) -> None:
    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(store.StoreError) as exc:
        write(root)
    text = _one_line(exc)
    assert f"store {root} is writable by group and others (mode 0777)" in text
    assert f"chmod 700 {root}" in text
    _nothing_written(root)


@pytest.mark.parametrize("write", WRITERS, ids=lambda f: f.__name__.strip("_"))
def test_a_store_of_another_user_is_refused(tmp_path: Path, write: Callable[[Path], None]) -> None:
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(store.StoreError) as exc:
        write(root)
    text = _one_line(exc)
    assert f"store {root} is owned by uid {NOBODY}" in text and f"chown root {root}" in text
    _nothing_written(root)


@pytest.mark.parametrize("folder", ["locks", "journal", "freeze", "vzdump", "db1"])
def test_a_store_folder_others_can_write_is_refused(tmp_path: Path, folder: str) -> None:
    root = tmp_path / "store"
    (root / folder).mkdir(parents=True)
    (root / folder).chmod(0o757)
    with pytest.raises(store.StoreError) as exc:
        store.ensure_private(root, folder)
    assert f"{root / folder} is writable by others (mode 0757)" in _one_line(exc)


@pytest.mark.parametrize("write", WRITERS, ids=lambda f: f.__name__.strip("_"))
def test_a_parent_others_can_write_is_refused(
    tmp_path: Path, write: Callable[[Path], None]
) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    root = parent / "store"
    with pytest.raises(store.StoreError) as exc:
        write(root)
    text = _one_line(exc)
    assert f"store {root}: {parent} is writable by group and others (mode 0777, no sticky bit)" in (
        text
    )
    assert f"chmod go-w {parent}" in text
    assert not root.exists()


def test_a_parent_of_another_user_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir()
    os.chown(parent, NOBODY, NOBODY)  # they can chmod it, or rename the store away
    with pytest.raises(store.StoreError) as exc:
        _lock(parent / "store")
    assert f"{parent} is owned by uid {NOBODY}" in _one_line(exc)


def test_a_sticky_parent_is_fine_like_tmp(tmp_path: Path) -> None:
    parent = tmp_path / "tmp"
    parent.mkdir()
    parent.chmod(0o1777)
    _lock(parent / "store")
    assert _mode(parent / "store") == 0o700


def test_a_store_link_of_another_user_is_refused_ones_of_root_are_followed(
    tmp_path: Path,
) -> None:
    real = tmp_path / "disk" / "store"
    real.mkdir(parents=True, mode=0o700)
    link = tmp_path / "store"
    link.symlink_to(real)
    _journal(link)
    assert (real / "journal" / "db1.json").is_file()
    theirs = tmp_path / "their-link"
    theirs.symlink_to(real)
    os.lchown(theirs, NOBODY, NOBODY)
    with pytest.raises(store.StoreError) as exc:
        _journal(theirs)
    assert f"{theirs} is a symbolic link owned by uid {NOBODY}" in _one_line(exc)
    open_target = tmp_path / "open"
    open_target.mkdir()
    open_target.chmod(0o777)
    to_open = tmp_path / "to-open"
    to_open.symlink_to(open_target)
    with pytest.raises(store.StoreError, match=f"{open_target} is writable by group and others"):
        _journal(to_open)


@pytest.mark.parametrize("write", WRITERS, ids=lambda f: f.__name__.strip("_"))
def test_a_fresh_store_is_0700_at_every_level_it_creates(
    tmp_path: Path, write: Callable[[Path], None]
) -> None:
    root = tmp_path / "a" / "b" / "store"
    old = os.umask(0o022)
    try:
        write(root)
    finally:
        os.umask(old)
    created = [tmp_path / "a", tmp_path / "a" / "b", root, *root.iterdir()]
    assert {str(p): _mode(p) for p in created} == {str(p): 0o700 for p in created}


def test_existing_stores_stay_accepted(tmp_path: Path) -> None:
    """A store made by hand (0755, root's umask) under a pytest or /work-like tree is used."""
    root = tmp_path / "store"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    for write in WRITERS:
        write(root)
    assert _mode(root) == 0o755  # left as it is

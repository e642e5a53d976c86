"""A stream into the store never fills its file system (issue 23, finding 16).

Preflight checks the dump's estimate against the free space; a dump larger than its estimate,
or another writer meanwhile, used to write on until the disk of a root-run host was full. The
store's sink now stops with ``SPACE_MARGIN`` still free (ENOSPC, handled like a full store: the
partial file is removed). Checked on a real small tmpfs, mounted in this worker's lab sandbox
(its own mount namespace: the host never sees it), fed by a real command's stream."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcoord import shell
from snapcoord.store import SPACE_MARGIN, RunDir, free_bytes
from tests import lab

SIZE_MIB = 96


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    lab.require_root()  # root in a lab sandbox: the mount stays in its namespace
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MIB}m,mode=0700", "tmpfs", str(mount)],
        check=True,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--", str(mount)], check=True)


def test_a_stream_larger_than_the_room_stops_with_the_margin_left(small_fs: Path) -> None:
    run = RunDir.begin(small_fs / "store", "db1", "snapcoord-test-20260101T000000Z")
    sink = run.sink("db1.sql")
    room = free_bytes(small_fs) - SPACE_MARGIN
    with pytest.raises(OSError) as raised:
        shell.stream(
            ["head", "-c", str(SIZE_MIB << 20), "/dev/zero"], timeout=60, consume=sink.write
        )
    assert raised.value.errno == errno.ENOSPC
    assert "stopped before it would leave less than 64 MiB" in str(raised.value)
    assert free_bytes(small_fs) >= SPACE_MARGIN, "the margin is still free"
    assert room - (1 << 20) <= sink.size <= room, "it wrote up to the margin, not less"
    sink.discard()
    assert free_bytes(small_fs) > SPACE_MARGIN + room - (1 << 20), "the partial file is gone"


def test_a_stream_that_fits_is_written_whole(small_fs: Path) -> None:
    run = RunDir.begin(small_fs / "store", "db1", "snapcoord-test-20260101T000000Z")
    sink = run.sink("db1.sql")
    size = (SIZE_MIB << 20) - SPACE_MARGIN - (4 << 20)
    done = shell.stream(["head", "-c", str(size), "/dev/zero"], timeout=60, consume=sink.write)
    assert done.ok and sink.size == size
    assert sink.finish()["size"] == size

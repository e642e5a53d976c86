"""Files another user or a corrupt disk hands snapcoord (issue 23): a manifest that names files
outside its run folder (finding 13), and a link planted where the metrics file's temporary
file used to be predictable (finding 4). Each test fails on the code before the fix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from snapcoord import metrics, store
from snapcoord.store import CorruptDump
from tests.test_store import _write_run


@pytest.mark.parametrize(
    "name", ["/etc/shadow", "../../outside.sql.gz", "sub/dir.sql.gz", ".hidden", "..", ""]
)
def test_a_manifest_names_only_files_of_its_run_folder(tmp_path: Path, name: str) -> None:
    run = _write_run(tmp_path / "store")
    outside = tmp_path / "outside.sql.gz"
    shutil.copy(run / "mysql.sql.gz", outside)
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["files"].pop("mysql.sql.gz")
    manifest["files"][name] = entry
    manifest["mysqldump"]["file"] = name
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptDump, match="not a file of its run folder"):
        store.verify(run, vm="db1")


def test_the_metrics_file_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    folder = tmp_path / "node-exporter"  # writable by another user on a real host
    folder.mkdir()
    secret = tmp_path / "root-only"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    target = folder / "snapcoord.prom"
    # the name the old code would have used for its temporary file
    (folder / f".{target.name}.{os.getpid()}.tmp").symlink_to(secret)
    metrics.write_atomic(target, "snapcoord_x 1\n")
    assert secret.read_text() == "root's secret\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert target.read_text() == "snapcoord_x 1\n" and not target.is_symlink()
    assert target.stat().st_mode & 0o777 == 0o644
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
    assert leftovers == []

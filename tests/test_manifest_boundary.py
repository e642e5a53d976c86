"""Manifests of every shape (issue 23: hostile inputs): what ``list``, ``prune``, ``verify``
and ``restore-dump`` read from a run folder's manifest.json is either used or refused as a
corrupt dump (one line, exit 4), never a traceback. Property-based over manifests of every
shape, next to a real dump file, through the store's and the restore's own functions."""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapcoord import store
from snapcoord.errors import SnapcoordError
from snapcoord.hooks import databases
from snapcoord.hooks.databases.dumpfile import locate
from snapcoord.hooks.databases.mysql import FORMAT as MYSQL
from tests import hostile_json

KEYS = ("format", "vm", "snapshot", "status", "finished", "files", "errors", "mysql",
        "size", "sha256", "file")  # fmt: skip
SNAPSHOT = "snapcoord-test-20261201T030000Z"
DUMP = "mysql.sql.gz"

values = hostile_json.nested(
    hostile_json.scalars(1, "complete", "failed", DUMP, "../x", "/etc/passwd", SNAPSHOT, nan=False),
    KEYS,
    max_leaves=10,
)
manifests = st.one_of(
    values,
    st.dictionaries(st.sampled_from(KEYS), values, max_size=6).map(lambda d: {"format": 1, **d}),
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifests") / "store"
    folder = root / "db" / SNAPSHOT
    folder.mkdir(parents=True)
    (folder / DUMP).write_bytes(gzip.compress(b"-- Dump completed on 2026-12-01\n"))
    return folder


def exercise(folder: Path, manifest: Any) -> None:
    (folder / store.MANIFEST).write_text(json.dumps(manifest))
    root = folder.parent.parent
    for info in store.list_dumps(root, "db", include_failed=True):
        json.dumps(info.manifest, allow_nan=False)
    for call in (
        lambda: store.verify(folder, vm="db"),
        lambda: locate(folder, MYSQL, vm="db"),
        lambda: locate(folder / DUMP, MYSQL, vm="db"),
    ):
        with contextlib.suppress(SnapcoordError):  # refused in one line, as it must be
            call()
    databases.for_dump(folder)
    databases.for_dump(folder / DUMP)


@pytest.mark.parametrize(
    "manifest",
    [
        {"format": 1, "files": ["mysql.sql.gz"]},
        {"format": 1, "files": {DUMP: "abc"}},
        {"format": 1, "files": {DUMP: {"size": "12", "sha256": 5}}},
        {"format": 1, "status": "complete", "files": {"../../etc/shadow": {"size": 1}}},
        {"format": 1, "status": "complete", "mysql": "yes", "files": {DUMP: {"size": 0}}},
        [1, 2],
        None,
    ],
)
def test_the_documented_corrupt_manifests(run_dir: Path, manifest: Any) -> None:
    exercise(run_dir, manifest)


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(manifest=manifests)
def test_any_manifest_is_used_or_refused_never_a_traceback(run_dir: Path, manifest: Any) -> None:
    exercise(run_dir, manifest)

"""Issue 28, item 5: ``[vms.X.dump] compression = "auto"`` (the default) resolves in each kind's
preflight, inside the tools probe it already runs: zstd when the guest has it, gzip otherwise
(with the reason the run shows); explicit values behave as they always did.

The guest here is a fake for the logic only: the kinds' real tools probe runs in a local ``sh``
whose PATH holds stand-ins for the guest's tools (so "the guest has zstd" is a file that is there
or not); the SQL the preflight sends is answered with canned rows. The real guests are
tests/test_compression_lab.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from snapcoord import schema
from snapcoord.config import parse_table
from snapcoord.errors import PreflightError
from snapcoord.hooks.databases import dumpfile, mysql, postgresql
from snapcoord.settings import DumpConfig, GuestConfig
from snapcoord.shell import Completed

TOOLS = {
    "mysql": ["mysqldump", "mysql"],
    "postgresql": ["runuser", "pg_dumpall", "psql"],
}


class FakeGuest:
    """A transport whose guest is a folder of stand-in tools: the tools probe runs for real in
    ``sh`` with only that folder on PATH; the client's queries get canned answers."""

    def __init__(self, bindir: Path, kind: str) -> None:
        self.bindir = bindir
        self.kind = kind
        self.description = "fake guest"
        self.probes: list[list[str]] = []
        self.runs = 0

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def command_line(self, argv: Sequence[str], *, sudo: bool = False) -> list[str]:
        return list(argv)

    def run(self, argv: Sequence[str], **kwargs: Any) -> Completed:
        self.runs += 1
        started = time.monotonic()
        if argv[:2] == ["sh", "-c"] and argv[2] != dumpfile.GUEST_SCRIPT:  # the tools probe
            self.probes.append(list(argv))
            done = subprocess.run(["/bin/sh", *argv[1:]], capture_output=True, check=False,
                                  env={"PATH": str(self.bindir)}, timeout=30)  # fmt: skip
            return Completed(tuple(argv), done.returncode, done.stdout, done.stderr,
                             time.monotonic() - started)  # fmt: skip
        return Completed(tuple(argv), 0, self._answer(), b"", time.monotonic() - started)

    def _answer(self) -> bytes:
        if self.kind == "mysql":  # VERSION(); the schemata; their sizes
            return b"10.11.6-MariaDB\napp\nmysql\napp\t4000\nmysql\t1000\n"
        info = {"version": "15.5", "version_num": 150005, "superuser": True,
                "databases": {"postgres": 7000, "shop": 9000}}  # fmt: skip
        return (json.dumps(info) + "\n").encode()

    def run_streaming(self, argv: Sequence[str], **kwargs: Any) -> Completed:
        raise AssertionError("preflight streams nothing")


def guest_with(tmp_path: Path, kind: str, *, zstd: bool) -> FakeGuest:
    """A fake guest with the kind's client tools, and zstd when ``zstd``."""
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True)
    tools = [*TOOLS[kind], "id"] + (["zstd"] if zstd else [])
    for tool in tools:
        real = "/usr/bin/id" if tool == "id" else "/bin/true"
        os.symlink(real, bindir / tool)
    return FakeGuest(bindir, kind)


def options(kind: str, **raw: Any) -> DumpConfig:
    if kind == "postgresql":
        raw.setdefault("user", "root")  # an OS user the probe's `id -u` finds on any machine
    return parse_table(DumpConfig, raw)


GUEST = parse_table(GuestConfig, {"host": "db1.example.net", "dump": True})
KINDS = {"mysql": mysql, "postgresql": postgresql}


def preflight(guest: FakeGuest, dump: DumpConfig) -> dumpfile.DumpPlan:
    kind: Any = KINDS[guest.kind]
    plan: dumpfile.DumpPlan = kind.preflight(guest, vm="db1", guest=GUEST, options=dump)
    return plan


def test_auto_is_the_default() -> None:
    assert schema.DUMP["compression"].default == "auto"
    assert parse_table(DumpConfig, {}).compression == "auto"


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_auto_takes_zstd_when_the_guest_has_it(tmp_path: Path, kind: str) -> None:
    guest = guest_with(tmp_path, kind, zstd=True)
    plan = preflight(guest, options(kind))
    assert plan.compression == "zstd"
    assert plan.compression_reason is None
    assert plan.file_name == KINDS[kind].FORMAT.stem + ".sql.zst"
    assert plan.needed_bytes == int(plan.data_bytes * 0.5)
    # one probe, as before: it names only the client tools (zstd is optional for "auto")
    assert len(guest.probes) == 1 and "zstd" not in guest.probes[0][4:]


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_auto_falls_back_to_gzip_with_the_reason(tmp_path: Path, kind: str) -> None:
    guest = guest_with(tmp_path, kind, zstd=False)
    plan = preflight(guest, options(kind))
    assert plan.compression == "gzip"
    assert plan.compression_reason == "zstd not found in the guest"
    assert plan.file_name == KINDS[kind].FORMAT.stem + ".sql.gz"
    assert len(guest.probes) == 1
    note = dumpfile.fallback_note("db1", plan.compression_reason)
    assert note == (
        "dump compressed with gzip: zstd not found in the guest (install zstd in the guest, "
        "or set [vms.db1.dump] compression)"
    )


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
@pytest.mark.parametrize("zstd", [True, False])
@pytest.mark.parametrize(("configured", "suffix", "factor"),
                         [("gzip", ".sql.gz", 0.5), ("none", ".sql", 2.0)])  # fmt: skip
def test_explicit_gzip_and_none_are_kept(
    tmp_path: Path, kind: str, zstd: bool, configured: str, suffix: str, factor: float
) -> None:
    plan = preflight(guest_with(tmp_path, kind, zstd=zstd), options(kind, compression=configured))
    assert plan.compression == configured
    assert plan.compression_reason is None
    assert plan.file_name == KINDS[kind].FORMAT.stem + suffix
    assert plan.needed_bytes == int(plan.data_bytes * factor)


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_explicit_zstd_needs_zstd_in_the_guest(tmp_path: Path, kind: str) -> None:
    plan = preflight(guest_with(tmp_path, kind, zstd=True), options(kind, compression="zstd"))
    assert (plan.compression, plan.compression_reason) == ("zstd", None)

    missing = guest_with(tmp_path / "without", kind, zstd=False)
    with pytest.raises(PreflightError) as caught:
        preflight(missing, options(kind, compression="zstd"))
    assert caught.value.message == "cannot dump: zstd not found in the guest"
    assert caught.value.vm == "db1"
    assert "zstd for compression = zstd" in (caught.value.hint or "")
    assert missing.runs == 1  # refused at the probe, before any query


def test_resolution_and_the_dump_without_a_plan() -> None:
    assert dumpfile.resolve_compression("auto", zstd=True) == ("zstd", None)
    assert dumpfile.resolve_compression("auto", zstd=False) == ("gzip", dumpfile.ZSTD_MISSING)
    for configured in ("zstd", "gzip", "none"):
        for found in (True, False):
            assert dumpfile.resolve_compression(configured, zstd=found) == (configured, None)
    # dump() takes the plan's; with no plan nothing was probed: "auto" is gzip
    assert dumpfile.dump_compression("auto", None) == "gzip"
    assert dumpfile.dump_compression("zstd", None) == "zstd"
    plan = dumpfile.DumpPlan(vm="db1", server_version="10", databases=(), all_databases=True,
                             data_bytes=0, needed_bytes=0, compression="zstd",
                             file_name="mysql.sql.zst", argv=())  # fmt: skip
    assert dumpfile.dump_compression("auto", plan) == "zstd"


def test_the_probe_line_is_read_exactly() -> None:
    assert dumpfile.zstd_found(b"snapcoord-has zstd\n")
    assert dumpfile.zstd_found(b"motd\nsnapcoord-has zstd\n")
    assert not dumpfile.zstd_found(b"")
    assert not dumpfile.zstd_found(b"snapcoord-has zstdmt\n")


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_auto_takes_gzip_when_this_host_has_no_zstd(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator checks every zstd dump with its own zstd (and restore-dump and verify
    read it with it): "auto" does not choose a codec this host cannot read."""
    monkeypatch.setattr(dumpfile.shutil, "which", lambda name: None)
    plan = preflight(guest_with(tmp_path, kind, zstd=True), options(kind))
    assert (plan.compression, plan.compression_reason) == ("gzip", dumpfile.ZSTD_MISSING_HERE)
    assert plan.file_name == KINDS[kind].FORMAT.stem + ".sql.gz"
    assert dumpfile.fallback_note("db1", plan.compression_reason) == (
        "dump compressed with gzip: zstd not found on the coordinator (install zstd on the "
        "coordinator, or set [vms.db1.dump] compression)"
    )
    # an explicit zstd is refused before anything stops: this host could never check the dump
    # it would store (it used to be taken, then kept as .failed)
    guest = guest_with(tmp_path / "x", kind, zstd=True)
    with pytest.raises(PreflightError) as caught:
        preflight(guest, options(kind, compression="zstd"))
    assert caught.value.vm == "db1"
    assert caught.value.message == (
        'cannot dump: compression = "zstd" but zstd not found on the coordinator (it checks '
        "every stored dump, and restore-dump and verify read it, with zstd)"
    )
    assert caught.value.hint == (
        'install zstd on the coordinator, or set [vms.db1.dump] compression = "auto" (gzip '
        "where zstd is missing)"
    )
    assert guest.runs == 1, "refused at the tools probe, before any query"


def test_threads_above_one_on_postgresql_is_one_stream_with_a_note(tmp_path: Path) -> None:
    """pg_dumpall is one stream (docs/dump.md: pg_dump --jobs writes to the guest's disk): a
    configured ``threads`` above 1 is said on the run's line, never silently dropped."""
    plan = preflight(
        guest_with(tmp_path, "postgresql", zstd=True), options("postgresql", threads=4)
    )
    assert plan.threads == 1
    assert plan.threads_note == (
        "dumped in one stream: threads = 4 applies to MySQL/MariaDB; a PostgreSQL dump is one "
        'pg_dumpall stream (docs/dump.md; set [vms.db1.dump] threads = 1 or "auto" to silence '
        "this)"
    )
    for quiet in ("auto", 1):
        plan = preflight(
            guest_with(tmp_path / str(quiet), "postgresql", zstd=True),
            options("postgresql", threads=quiet),
        )
        assert plan.threads_note is None

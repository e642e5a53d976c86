"""Benchmark: the verify of a PostgreSQL dump vs a plain ``psql <`` into a fresh server.

A pg_dumpall-like SQL script is generated (one big table of ROWS rows, about 110 bytes of SQL
each, with a primary key, and SMALL tables of SMALL_ROWS rows of the same kind: about 240 MB of
SQL for the default; ``--rows 0 --small 40 --small-rows 50000`` gives many mid-sized tables),
uncompressed, without a manifest (what ``restore-dump`` accepts as a file). Then RUNS
times each, alternating the order, in a root 0755 folder of its own in /var/tmp:

* ``snapcoord``: the steps of ``snapcoord verify`` for this kind (snapcoord/verify/postgresql.py):
  ``prepare_restore`` (the scan of the dump), the work folder, a throwaway server confined as
  nobody without network, ``load`` (restore-dump's psql), ``measure`` (on :func:`workers`
  connections), ``check``, teardown.
* ``snapcoord, one connection``: the same with the measure of before this change:
  ``table_sums`` on one connection.
* ``plain``: :data:`PLAIN_SCRIPT`, confined the same way (PostgreSQL does not run as root):
  ``initdb``, ``postgres`` with the SAME settings (verify's SETTINGS), ``psql -X -q < dump``,
  fast shutdown, ``rm -rf``. It checks nothing.

Prints medians, the ratio to plain (goal <= 1.1) and the phases. Usage (root):
``python3 -m bench.verify_postgresql [--rows 2000000] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from snapcoord.hooks.databases import postgresql as pg
from snapcoord.verify import postgresql as verify
from snapcoord.verify import scratch

DEFAULT_ROWS = 2_000_000
SMALL = 30
SMALL_ROWS = 5000
TIMEOUT = 3600.0

PLAIN_SCRIPT = """\
set -eu
bin=$1 work=$2 dump=$3; shift 3
"$bin/initdb" --pgdata="$work/data" --auth=trust --username=postgres --encoding=UTF8 \\
  --locale=C.UTF-8 --no-sync >/dev/null
"$bin/postgres" -D "$work/data" -k "$work" -p 5432 "$@" >"$work/log" 2>&1 &
pid=$!
until "$bin/pg_isready" -q -h "$work" -p 5432 -U postgres; do sleep 0.1; done
"$bin/psql" -X -q -h "$work" -p 5432 -U postgres -d postgres <"$dump" >/dev/null
kill -INT "$pid"; wait "$pid" || true
rm -rf "$work/data" "$work/log"
"""


def _table(out: TextIO, name: str, rows: int) -> None:
    out.write(f"CREATE TABLE public.{name} (id bigint NOT NULL, name text, descr text,"
              " amount numeric(12,2), created timestamp with time zone, flag boolean);\n"
              f"COPY public.{name} (id, name, descr, amount, created, flag)"
              " FROM stdin;\n")  # fmt: skip
    for i in range(1, rows + 1):
        out.write(f"{i}\titem {i:09d}\tdescription of item {i} in the bench set, "
                  f"group {i % 97}\t{i % 100000}.{i % 100:02d}\t2026-01-{1 + i % 28:02d} "
                  f"{i % 24:02d}:{i % 60:02d}:00+00\t{'t' if i % 3 else 'f'}\n")  # fmt: skip
    out.write(f"\\.\n\nALTER TABLE ONLY public.{name} ADD CONSTRAINT {name}_pkey"
              " PRIMARY KEY (id);\n\n")  # fmt: skip


def generate(path: Path, rows: int, small: int, small_rows: int) -> int:
    """Write the dump; its size in bytes."""
    with open(path, "w", encoding="utf-8") as out:
        out.write("-- Dumped from database version 15.0\n\nCREATE DATABASE benchdb;\n"
                  "\\connect benchdb\n\n")  # fmt: skip
        if rows:
            _table(out, "items", rows)
        for n in range(small):
            _table(out, f"small_{n}", small_rows)
        out.write("\n--\n-- PostgreSQL database cluster dump complete\n--\n\n")
    return path.stat().st_size


def snapcoord_verify(dump: Path, verify_dir: Path, *, parallel: bool) -> dict[str, float]:
    marks = {"start": time.monotonic()}
    source = pg.prepare_restore(dump, vm="bench")
    marks["prepare"] = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(scratch.workspace(verify_dir))
        server = stack.enter_context(verify.server(work, vm="bench", timeout=TIMEOUT))
        marks["server"] = time.monotonic()
        verify.load(server, source, vm="bench", timeout=TIMEOUT)
        marks["load"] = time.monotonic()
        if parallel:
            verify.measure(server, ["benchdb"], vm="bench", timeout=TIMEOUT)
        else:
            pg.table_sums(server.client, server.transport, ["benchdb"], timeout=TIMEOUT)
        marks["measure"] = time.monotonic()
        verify.check(server, vm="bench", timeout=TIMEOUT)
        marks["check"] = time.monotonic()
    marks["teardown"] = time.monotonic()
    names = list(marks)
    phases = {b: marks[b] - marks[a] for a, b in itertools.pairwise(names)}
    phases["total"] = marks["teardown"] - marks["start"]
    return phases


def plain(dump: Path, verify_dir: Path) -> dict[str, float]:
    started = time.monotonic()
    with scratch.workspace(verify_dir) as work:
        folder = scratch.nobody_folder(work, "plain")
        bindir = str(verify.binaries(vm="bench").bindir)
        settings = [a for s in verify.SETTINGS for a in ("-c", s)]
        argv = ["sh", "-c", PLAIN_SCRIPT, "sh", bindir, str(folder), str(dump), *settings]
        subprocess.run(scratch.confined(argv, work=work, writable=True), check=True)
        scratch.remove(folder)
    return {"total": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--small", type=int, default=SMALL)
    parser.add_argument("--small-rows", type=int, default=SMALL_ROWS)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    verify.require(vm="bench")
    base = Path(tempfile.mkdtemp(prefix="bench-verify-pg-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        dump = base / "dump.sql"
        size = generate(dump, args.rows, args.small, args.small_rows)
        dump.chmod(0o644)
        verify_dir = base / "verify"
        verify_dir.mkdir(mode=0o755)
        print(f"{size / 1e6:.0f} MB of SQL, {args.rows} + {args.small} x {args.small_rows} rows, "
              f"{verify.workers()} measure connections, load {os.getloadavg()[0]:.2f}")  # fmt: skip
        variants: dict[str, Callable[[], dict[str, float]]] = {
            "snapcoord": lambda: snapcoord_verify(dump, verify_dir, parallel=True),
            "snapcoord, one connection": lambda: snapcoord_verify(dump, verify_dir,
                                                                  parallel=False),
            "plain": lambda: plain(dump, verify_dir),
        }  # fmt: skip
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        names = list(variants)
        for run in range(args.runs):
            for name in names[run % len(names) :] + names[: run % len(names)]:
                sample = variants[name]()
                samples[name].append(sample)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in sample.items())
                print(f"run {run + 1} {name}: {shown}", flush=True)
        base_median = statistics.median(s["total"] for s in samples["plain"])
        for name, runs in samples.items():
            median = statistics.median(s["total"] for s in runs)
            phases = {k: statistics.median(s[k] for s in runs) for k in runs[0]}
            print(f"{name}: median {median:.2f} s, {median / base_median:.3f} x plain; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))  # fmt: skip
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

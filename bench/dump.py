"""Benchmark: snapcoord's streamed, verified dump vs ``ssh guest 'mysqldump … | gzip -9' > file``.

Runs against a private MariaDB server (the scratch server of tests/lab/mariadb.py, so other work
is not disturbed) reached over the loopback lab sshd. Generates ROWS rows of i-doit-like data
(about 128 bytes of SQL per row), then times, RUNS times each, alternating:

* ``hand``: ``ssh -o ControlPath=<open master> guest 'mysqldump … | gzip -9' > file``
* ``guest``: snapcoord, gzip -9 in the guest (the default), the coordinator inflates to verify
* ``coordinator``: snapcoord, plain SQL over SSH, gzip level 9 (zlib) on the coordinator

Every variant reuses an already open SSH connection, as a snapcoord run does (opened in
preflight). Usage: ``python3 bench/dump.py [--rows 8000000] [--runs 3]`` (root; PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from snapcoord import store
from snapcoord.config import parse_config
from snapcoord.guest import SshTransport
from snapcoord.hooks.databases import mysql
from tests import lab
from tests.lab import sandbox

OPTIONS = ["--single-transaction", "--routines", "--events", "--triggers", "--hex-blob"]


def generate(server: lab.ScratchMariaDB, rows: int) -> None:
    server.sql(
        "DROP DATABASE IF EXISTS benchdb; CREATE DATABASE benchdb;"
        "CREATE TABLE benchdb.isys_obj (id INT UNSIGNED PRIMARY KEY, title VARCHAR(255),"
        " sysid VARCHAR(64), created DATETIME, status TINYINT, descr TEXT) ENGINE=InnoDB;"
    )
    step = 500_000
    for start in range(1, rows + 1, step):
        end = min(rows, start + step - 1)
        server.sql(
            "USE benchdb; INSERT INTO isys_obj"
            " SELECT seq, CONCAT('Server ', seq, ' rack ', seq % 40),"
            " CONCAT('SYSID_', LPAD(seq, 12, '0')), '2020-01-01' + INTERVAL seq SECOND,"
            " seq % 3, IF(seq % 5 = 0, NULL, CONCAT('note ', MD5(seq)))"
            f" FROM seq_{start}_to_{end};"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # never the host's own services: the lab runs in a sandbox of its own
    sandbox.enter("bench.dump", sys.argv[1:])

    work = Path(tempfile.mkdtemp(prefix="snapcoord-bench-dump-"))
    guest = lab.start_sshd()
    server = lab.start_scratch_mariadb()
    transport: SshTransport | None = None
    try:
        t0 = time.monotonic()
        generate(server, args.rows)
        print(f"generated {args.rows} rows in {time.monotonic() - t0:.1f} s")
        options = [*OPTIONS, f"--socket={server.socket}"]
        config = parse_config(
            {
                "defaults": {"store": str(work / "store")},
                "hypervisors": {"lab": {"type": "libvirt", "uri": "test:///default"}},
                "vms": {
                    "lab": {
                        "hypervisor": "lab",
                        "guest": guest.guest_table(dump=True),
                        "dump": {"options": options, "databases": ["benchdb"]},
                    }
                },
            }
        )
        vm = config.vm("lab")
        assert vm.guest is not None
        transport = SshTransport(vm.guest, vm="lab")
        transport.open()
        remote = shlex.join(["mysqldump", *options, "--databases", "benchdb"]) + " | gzip -9"
        hand_argv = transport.command_line(["sh", "-c", remote])
        times: dict[str, list[float]] = {"hand": [], "guest": [], "coordinator": []}
        sizes: dict[str, int] = {}
        sql_bytes = 0
        for run in range(args.runs):
            for variant in ("hand", "guest", "coordinator"):
                if variant == "hand":
                    out = work / f"hand-{run}.sql.gz"
                    started = time.monotonic()
                    with out.open("wb") as handle:
                        subprocess.run(hand_argv, stdout=handle, check=True)
                    times[variant].append(time.monotonic() - started)
                    sizes[variant] = out.stat().st_size
                    out.unlink()
                    continue
                run_dir = store.RunDir.begin(config.store, "lab", f"{variant}-{run}")
                started = time.monotonic()
                result = mysql.dump(
                    transport,
                    vm="lab",
                    guest=vm.guest,
                    options=vm.dump,
                    run_dir=run_dir,
                    compress_on=variant,
                )
                folder = run_dir.commit()
                times[variant].append(time.monotonic() - started)
                sizes[variant] = result.size
                sql_bytes = result.sql_bytes
                shutil.rmtree(folder)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        report(times, sizes, sql_bytes, args.rows)
    finally:
        if transport is not None:
            transport.close()
        server.stop()
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(times: dict[str, list[float]], sizes: dict[str, int], sql: int, rows: int) -> None:
    hand = statistics.median(times["hand"])
    print(f"\nSQL {sql / 1e6:.0f} MB, {rows} rows; medians of {len(times['hand'])} runs")
    print("| variant | median s | SQL MB/s | rows/s | stored MB | vs hand |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        median: Any = statistics.median(values)
        print(
            f"| {name} | {median:.2f} | {sql / 1e6 / median:.1f} | {rows / median:,.0f} | "
            f"{sizes[name] / 1e6:.1f} | {median / hand:.3f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())

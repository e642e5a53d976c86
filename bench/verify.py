"""Benchmark: ``snapcoord verify`` of a MySQL dump vs a plain restore into a fresh server.

Runs in a lab sandbox of its own (the host's services are never touched). A private MariaDB
(tests/lab/mariadb.py's scratch server) reached over the loopback lab sshd is the guest: ROWS rows
of i-doit-like data (bench/dump.py's generator, about 115 bytes of SQL per row; the default is
about 1 GB of SQL) are dumped once through snapcoord's own dump (hooks/databases/mysql.dump into a
store run folder, gzip in the guest). The guest's server and sshd are then stopped, and RUNS times
each, alternating which goes first, the coordinator restores that one dump:

* ``snapcoord``: ``DumpVerify(config, key, run_dir).run()`` (snapcoord/verify/dumps.py) with
  ``[defaults] verify_dir`` on disk (a root 0755 folder of its own in /var/tmp): sha256 of the
  stored dump, a throwaway ``mariadbd`` confined as nobody without network, the load through
  restore-dump's client, the table checksums compared with the manifest, ``mariadb-check``,
  teardown. Its ``split_seconds`` are reported.
* ``plain``: what an admin would script, as root and unconfined (:data:`PLAIN_SCRIPT`):
  ``mariadb-install-db`` into a fresh datadir, ``mariadbd`` on a socket, ``gunzip < dump |
  mysql``, ``mysqladmin shutdown``, ``rm -rf``; with the SAME server options as
  snapcoord/verify/mysql.py (SERVER_OPTIONS, INNODB_FILES), so the ratio shows snapcoord's own
  work (sha256, confinement, comparison, check), not a tuning difference.

Then one ``plain`` run with Debian's default server options (compiled-in defaults plus
Debian's 50-server.cnf) for context. Prints medians, the ratio snapcoord / plain (goal <= 1.1),
seconds per GB of SQL, CPU seconds (user + sys of every process each variant started) and the
load average. Usage (root): ``python3 -m bench.verify [--rows 8800000] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.dumpdata import rows_table
from snapcoord import store
from snapcoord.config import parse_config
from snapcoord.guest import SshTransport
from snapcoord.hooks.databases import mysql
from snapcoord.schema import DEFAULT_DUMP_OPTIONS
from snapcoord.settings import Config
from snapcoord.verify import mysql as verify_mysql
from snapcoord.verify.dumps import DumpVerify
from tests import lab
from tests.lab import sandbox

#: About 1 GB of SQL with bench/dump.py's rows (908 MB for 8 M rows).
DEFAULT_ROWS = 8_800_000

#: The plain restore: a fresh server, the load, shutdown, removal. Phase marks go to stdout.
PLAIN_SCRIPT = """\
set -eu
dir={dir}
mark() {{ echo "$1 $(date +%s.%N)"; }}
mark begin
mariadb-install-db --no-defaults --user=root --datadir="$dir/data" --skip-test-db \\
    --auth-root-authentication-method=normal {install} >"$dir/install.log" 2>&1
mariadbd --no-defaults --user=root --datadir="$dir/data" --socket="$dir/mysqld.sock" \\
    --pid-file="$dir/mysqld.pid" --log-error="$dir/error.log" --tmpdir="$dir" \\
    {server} </dev/null >/dev/null 2>&1 &
pid=$!
until mysqladmin --no-defaults --user=root --socket="$dir/mysqld.sock" ping >/dev/null 2>&1; do
    kill -0 "$pid"
    sleep 0.1
done
mark start
gunzip < {dump} | mysql --no-defaults --user=root --socket="$dir/mysqld.sock" --batch
mark load
mysqladmin --no-defaults --user=root --socket="$dir/mysqld.sock" shutdown
wait "$pid"
rm -rf "$dir"
mark teardown
"""

#: Debian 12's mariadb-server: compiled-in defaults plus /etc/mysql/mariadb.conf.d/50-server.cnf
#: (its character set; no binary log, buffer pool 128M, redo log 96M, durable commits and the
#: doublewrite buffer on). No TCP either, like the variants above.
DEBIAN_SERVER = (
    "--skip-networking",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
    "--expire-logs-days=10",
)


@dataclass
class Sample:
    """One restore: wall seconds, CPU seconds of its processes, seconds per phase."""

    wall: float
    cpu: float
    split: dict[str, float] = field(default_factory=dict)
    load_average: float = 0.0


def children_cpu() -> float:
    """CPU seconds (user + sys) of this process (snapcoord's sha256 and streaming) and of every
    process it started and reaped (the servers, clients, decompressors, the plain script's)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def plain_restore(dump: Path, verify_dir: Path, *, install: tuple[str, ...],
                  server: tuple[str, ...]) -> Sample:  # fmt: skip
    """Run :data:`PLAIN_SCRIPT` as root on ``dump``; its processes are killed if it fails."""
    work = Path(tempfile.mkdtemp(prefix="plain.", dir=verify_dir))
    script = PLAIN_SCRIPT.format(
        dir=shlex.quote(str(work)),
        dump=shlex.quote(str(dump)),
        install=shlex.join(install),
        server=shlex.join(server),
    )
    cpu = children_cpu()
    started = time.monotonic()
    process = subprocess.Popen(
        ["sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd="/",
    )
    try:
        out, err = process.communicate()
    finally:
        if process.poll() is None or process.returncode != 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the script's own group (its mariadbd)
            process.wait()
        shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"plain restore failed ({process.returncode}): {err.decode()[-2000:]}")
    marks = [line.split() for line in out.decode().splitlines()]
    split, previous = {}, float(marks[0][1])
    for name, stamp in marks[1:]:
        split[name] = float(stamp) - previous
        previous = float(stamp)
    return Sample(wall, children_cpu() - cpu, split, load_average())


def snapcoord_verify(config: Config, folder: Path) -> Sample:
    cpu = children_cpu()
    started = time.monotonic()
    found, _result = DumpVerify(config, "lab", folder).run()
    wall = time.monotonic() - started
    if found.verified is not True:
        raise SystemExit(f"snapcoord verify did not pass: {found.problem}")
    return Sample(wall, children_cpu() - cpu, dict(found.split), load_average())


def make_dump(work: Path, rows: int, verify_dir: Path) -> tuple[Config, Path, int]:
    """Generate ``rows`` rows in a scratch guest and dump them with snapcoord; returns the
    config, the committed run folder and the dump's bytes of SQL."""
    guest = lab.start_sshd()
    server = lab.start_scratch_mariadb()
    transport: SshTransport | None = None
    try:
        t0 = time.monotonic()
        rows_table(server, rows)
        print(f"generated {rows} rows in {time.monotonic() - t0:.1f} s", flush=True)
        options = [*DEFAULT_DUMP_OPTIONS["mysql"], f"--socket={server.socket}"]
        config = parse_config(
            {
                "defaults": {"store": str(work / "store"), "verify_dir": str(verify_dir)},
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
        run_dir = store.RunDir.begin(config.store, "lab", "bench-verify")
        t0 = time.monotonic()
        result = mysql.dump(transport, vm="lab", guest=vm.guest, options=vm.dump, run_dir=run_dir)
        folder = run_dir.commit()
        print(
            f"dumped {result.sql_bytes / 1e6:.0f} MB of SQL ({result.size / 1e6:.0f} MB gzip) "
            f"in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        return config, folder, result.sql_bytes
    finally:
        if transport is not None:
            transport.close()
        server.stop()
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # never the host's own services: the lab runs in a sandbox of its own
    sandbox.enter("bench.verify", sys.argv[1:])

    work = Path(tempfile.mkdtemp(prefix="snapcoord-bench-verify-"))
    # on disk, reachable by nobody, and a folder of its own: another verify's leftovers
    # cleanup (by PID, and PIDs differ between sandboxes) never sees this one's work folders
    verify_dir = Path(tempfile.mkdtemp(prefix="snapcoord-bench-verify.", dir="/var/tmp"))
    verify_dir.chmod(0o755)
    try:
        print(f"load average at start: {Path('/proc/loadavg').read_text().strip()}", flush=True)
        config, folder, sql_bytes = make_dump(work, args.rows, verify_dir)
        dump = mysql.prepare_restore(folder, vm="lab").file
        samples: dict[str, list[Sample]] = {"snapcoord": [], "plain": []}
        tuned = verify_mysql.INNODB_FILES
        for run in range(args.runs):
            order = ("snapcoord", "plain") if run % 2 == 0 else ("plain", "snapcoord")
            for variant in order:
                if variant == "snapcoord":
                    sample = snapcoord_verify(config, folder)
                else:
                    sample = plain_restore(
                        dump, verify_dir, install=tuned, server=verify_mysql.SERVER_OPTIONS
                    )
                samples[variant].append(sample)
                print(f"run {run + 1} {variant}: {describe(sample)}", flush=True)
        debian = plain_restore(dump, verify_dir, install=(), server=DEBIAN_SERVER)
        print(f"plain, Debian's default options: {describe(debian)}", flush=True)
        report(samples, debian, sql_bytes, args.rows)
        print(f"load average at end: {Path('/proc/loadavg').read_text().strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(verify_dir, ignore_errors=True)
    return 0


def describe(sample: Sample) -> str:
    phases = ", ".join(f"{k} {v:.2f}" for k, v in sample.split.items())
    return (
        f"{sample.wall:.2f} s (cpu {sample.cpu:.1f} s; {phases}; "
        f"load average {sample.load_average:.2f})"
    )


def report(samples: dict[str, list[Sample]], debian: Sample, sql: int, rows: int) -> None:
    gb = sql / 1e9
    runs = len(samples["plain"])
    plain = statistics.median(s.wall for s in samples["plain"])
    print(f"\nSQL {sql / 1e6:.0f} MB, {rows} rows; medians of {runs} runs")
    print("| variant | median s | s per GB of SQL | CPU s | vs plain | per run |")
    print("|---|---|---|---|---|---|")
    rows_out = [(name, values) for name, values in samples.items()]
    rows_out.append(("plain, Debian's default options (1 run)", [debian]))
    for name, values in rows_out:
        median = statistics.median(s.wall for s in values)
        cpu = statistics.median(s.cpu for s in values)
        per_run = ", ".join(f"{s.wall:.1f}" for s in values)
        print(
            f"| {name} | {median:.1f} | {median / gb:.1f} | {cpu:.1f} | "
            f"{median / plain:.3f} | {per_run} |"
        )
    print("\nsplit (median s per phase)")
    for name, values in samples.items():
        phases = list(values[0].split)
        medians = {p: statistics.median(s.split.get(p, 0.0) for s in values) for p in phases}
        print(f"{name}: " + ", ".join(f"{p} {v:.2f}" for p, v in medians.items()))
    print("debian plain: " + ", ".join(f"{p} {v:.2f}" for p, v in debian.split.items()))


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: snapcoord's dump and restore-dump vs the hand pipelines and mydumper/myloader.

Issue 28's "Figures" for the logical dump, per fixture (bench/dumpdata.py: the 1 M-row table,
or the ~5 GB i-doit-like databases), against the lab guest's MariaDB service (restore-dump
loads into the guest's running database service, so not a scratch server; in the bench's own
lab sandbox, with the scratch server's settings and a 256 MB buffer pool: :data:`BENCH_CNF`)
behind the loopback lab sshd. RUNS runs, the variants' order
rotated run by run; medians. Dumps:

* ``hand``: ``ssh guest 'mysqldump --all-databases --single-transaction | gzip -9' > file``
* ``snapcoord t=1``: snapcoord's dump with its default compression (``auto``: zstd here), one
  stream; run as a child process (preflight as a run does it, then the timed dump step:
  ``mysql.dump`` + commit, which includes the row counts/checksums, fsync and the sha256)
* ``mysqldump alone``: ``ssh guest 'mysqldump OPTIONS --all-databases > /dev/null'`` with
  snapcoord's default options: what the single-threaded client costs by itself, no compression,
  no transfer, no checks; the floor of any one-stream dump that is made by mysqldump
* ``snapcoord t=N``: the same with ``[vms.X.dump] threads = N``; skipped,
  with a line saying so, where this snapcoord does not know the key yet
* ``mydumper``, ``mydumper -c``: ``ssh guest 'mydumper --threads N --trx-consistency-only
  --routines --events --triggers -o DIR'`` by hand (``-c``: mydumper 0.10's own compression,
  gzip per file at zlib's default level). mydumper writes into a directory **on the guest**: it
  cannot stream, so its figure has no transfer to the coordinator in it (in the lab, guest and
  coordinator are the same disk).

Restores (after the dumps, the same rotation; each replaces the fixture's databases with
identical contents):

* ``snapcoord t=1`` / ``t=N``: ``snapcoord restore-dump lab --file RUN-FOLDER --yes --json``
  (the CLI: verify the sha256, drop, load through ssh, compare row counts and checksums)
* ``hand``: ``ssh guest 'gunzip | mysql' < hand.sql.gz`` (``gunzip < f | mysql``, the file on the
  coordinator as snapcoord's is)
* ``myloader``: ``ssh guest 'myloader -d DIR --threads N --overwrite-tables'``

**Machine CPU** of each variant: the busy time of all cores (user, nice, system, irq, softirq
from /proc/stat; not steal, not idle or iowait) over the timed part, so the server, the
clients, ssh, the compressors and the coordinator alike. Divided by the cores it is a lower
bound on the variant's time on this machine ("CPU bound"): a variant whose work takes C CPU
seconds cannot take less than C / cores, however it is split.

Peak RSS of the coordinator's snapcoord process tree (the child; the guest's mysqldump, zstd
and mysql run under the lab sshd, not under it): the largest process from ``wait4``'s rusage,
and the sum over the tree sampled every 50 ms from /proc.

mydumper/myloader are a benchmark-only dependency (``apt-get install -y mydumper``; Debian 12
has 0.10); without them their variants are skipped with a line saying so. The dumps are stored
under the bench's temp dir and deleted after each run (the last of each kind is kept for the
restores, then deleted).

Usage (root; PYTHONPATH=.): ``python3 bench/dump.py [--fixture rows|idoit] [--rows 1000000]
[--gigabytes 5] [--runs 3] [--threads N] [--skip VARIANT,…] [--no-restore] [--json FILE]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import dumpdata
from snapcoord import store
from snapcoord.config import load_config, parse_config
from snapcoord.errors import ConfigError
from snapcoord.guest import SshTransport
from snapcoord.hooks.databases import mysql
from snapcoord.schema import DEFAULT_DUMP_OPTIONS
from tests import lab
from tests.cli_helpers import write_config
from tests.lab import sandbox

VM = "lab"
HAND_DUMP = ["mysqldump", "--all-databases", "--single-transaction"]
DUMPS = ("hand", "mysqldump alone", "snapcoord t=1", "snapcoord t=N", "mydumper", "mydumper -c")
RESTORES = ("hand", "snapcoord t=1", "snapcoord t=N", "myloader")


#: the guest server's settings for the bench, in the sandbox's private /etc overlay (after the
#: sandbox's own 99-snapcoord-sandbox.cnf, whose 64 MB pool it raises)
BENCH_CNF = Path("/etc/mysql/mariadb.conf.d/99-zz-snapcoord-bench.cnf")
BENCH_SETTINGS = """# bench/dump.py (this lab sandbox only)
[mysqld]
innodb_buffer_pool_size = 256M
innodb_flush_log_at_trx_commit = 2
max_allowed_packet = 64M
"""


@dataclasses.dataclass
class GuestServer:
    """The lab guest's MariaDB (``service mariadb``), reached on its socket."""

    socket: str

    def sql(self, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return lab.mysql_exec(sql, self.socket, timeout=3600, check=check)


def start_guest_server() -> GuestServer:
    if not sandbox.active():
        raise SystemExit("bench/dump.py configures the guest's MariaDB: only in a lab sandbox")
    BENCH_CNF.write_text(BENCH_SETTINGS)
    if lab.service_running("mariadb"):
        lab.stop_service("mariadb")
    lab.start_service("mariadb")
    return GuestServer(lab.mysql_rows("SELECT @@socket")[0][0])


@dataclasses.dataclass
class Sample:
    seconds: float
    stored: int = 0  # bytes of the dump as stored
    rss_max: float = 0.0  # MB, the largest process of snapcoord's tree (wait4)
    rss_tree: float = 0.0  # MB, the tree's sampled sum
    wall: float = 0.0  # the whole child process (start-up, ssh, preflight), snapcoord only
    inner: float = 0.0  # restore-dump: its own figure for drop + load (its "restored" note)
    load: float = 0.0  # 1-minute load average when the variant ended
    cpu: float = 0.0  # seconds of CPU time of the whole machine (all cores) while it ran


def machine_busy() -> float:
    """Seconds of CPU time all cores spent busy since boot: user, nice, system, irq and softirq
    of /proc/stat's ``cpu`` line (not idle, iowait, or steal: another guest's time)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    assert fields[0] == "cpu", fields
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Results:
    fixture: str
    threads: int
    sql_bytes: int = 0
    data_bytes: int = 0
    dumps: dict[str, list[Sample]] = dataclasses.field(default_factory=dict)
    restores: dict[str, list[Sample]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


# -- snapcoord's process tree -----------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """The peak of the summed RSS of ``pid`` and its descendants, every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            tree, todo = [], [self.pid]
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo += _children(pid)
            self.peak_kb = max(self.peak_kb, sum(_rss_kb(p) for p in tree))


def run_child_rusage(argv: list[str]) -> tuple[str, Sample]:
    """Run a snapcoord child: its stdout and a Sample (wall; peak RSS of the largest process of
    its tree from its own rusage: a small ``python -c`` runs it and reports RUSAGE_CHILDREN,
    which covers that child alone; the tree's sampled sum)."""
    probe = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(f'\\nMAXRSS_KB {r}', file=sys.stderr)\n"
        "sys.exit(p.returncode)\n"
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", probe, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    wall = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    text = err.decode()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {proc.returncode}: {text[-2000:]}")
    maxrss = int(text.rsplit("MAXRSS_KB ", 1)[1].split()[0])
    # the tree's sum includes the small python -c wrapper (≈ 10 MB): taken off
    wrapper_kb = _wrapper_rss_kb()
    return out.decode(), Sample(
        wall,
        rss_max=maxrss / 1024,
        rss_tree=max(0, sampler.peak_kb - wrapper_kb) / 1024,
        wall=wall,
    )


_WRAPPER_KB: list[int] = []


def _wrapper_rss_kb() -> int:
    """The RSS of an idle ``python -c`` (the wrapper of run_child_rusage), measured once."""
    if not _WRAPPER_KB:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import resource, subprocess, sys, time; time.sleep(1)"]
        )
        time.sleep(0.5)
        _WRAPPER_KB.append(_rss_kb(proc.pid))
        proc.wait()
    return _WRAPPER_KB[0]


# -- the child: snapcoord's dump step ---------------------------------------------------------


def child_dump(config_path: str, name: str) -> int:
    """One dump as a snapshot run takes it: preflight (untimed), then the dump step (timed:
    ``mysql.dump`` + commit). Prints a JSON object."""
    config = load_config(config_path)
    vm = config.vm(VM)
    assert vm.guest is not None
    transport = SshTransport(vm.guest, vm=VM)
    transport.open()
    try:
        plan = mysql.preflight(
            transport, vm=VM, guest=vm.guest, options=vm.dump, store_root=config.store
        )
        options = dataclasses.replace(vm.dump, compression=plan.compression)
        run_dir = store.RunDir.begin(config.store, VM, name)
        busy = machine_busy()
        started = time.monotonic()
        result = mysql.dump(
            transport,
            vm=VM,
            guest=vm.guest,
            options=options,
            run_dir=run_dir,
            plan=plan,
            compress_on="coordinator" if vm.dump.compress_on == "auto" else vm.dump.compress_on,
        )
        folder = run_dir.commit()
        seconds = time.monotonic() - started
        cpu = machine_busy() - busy
    finally:
        transport.close()
    stored = sum(f.stat().st_size for f in folder.iterdir() if ".sql" in f.name)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "folder": str(folder),
                "stored": stored,
                "sql_bytes": result.sql_bytes,
                "compression": result.compression,
                "files": sorted(f.name for f in folder.iterdir() if ".sql" in f.name),
            }
        )
    )
    return 0


# -- the bench --------------------------------------------------------------------------------


def threads_known() -> bool:
    """Does this snapcoord know ``[vms.X.dump] threads`` (issue 28)?"""
    try:
        parse_config(
            {
                "defaults": {"store": "/nonexistent"},
                "hypervisors": {"h": {"type": "libvirt", "uri": "test:///default"}},
                "vms": {"v": {"hypervisor": "h", "dump": {"threads": 2}}},
            }
        )
    except ConfigError:
        return False
    return True


def write_lab_config(
    path: Path, guest: lab.SshGuest, server: GuestServer, work: Path, threads: int | None
) -> Path:
    dump: dict[str, Any] = {
        "options": [*DEFAULT_DUMP_OPTIONS["mysql"], f"--socket={server.socket}"],
    }
    if threads is not None:
        dump["threads"] = threads
    guest_table = guest.guest_table(
        dump=True,
        services=[],
        database="mariadb",
        watchdog_seconds=120,
        stop_timeout=30.0,
        dump_timeout=14400.0,
    )
    write_config(
        path,
        {
            "defaults": {"store": str(work / "store")},
            "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
            f"vms.{VM}": {"hypervisor": "lab"},
            f"vms.{VM}.guest": guest_table,
            f"vms.{VM}.dump": dump,
        },
    )
    path.chmod(0o600)
    return path


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gzip_level(directory: Path) -> str:
    """What gzip's header says of the level (XFL byte) of the first .gz file in ``directory``."""
    for file in sorted(directory.glob("*.gz")):
        xfl = file.read_bytes()[8]
        return {0: "default (6)", 2: "9 (best)", 4: "1 (fastest)"}.get(xfl, f"XFL {xfl}")
    return "no .gz file"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child-dump", nargs=2, metavar=("CONFIG", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--fixture", choices=("rows", "idoit"), default="rows")
    parser.add_argument("--rows", type=int, default=1_000_000, help="--fixture rows")
    parser.add_argument("--gigabytes", type=float, default=5.0, help="--fixture idoit")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip", default="", help="comma-separated variants to leave out")
    parser.add_argument("--no-restore", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    if args.child_dump:
        return child_dump(*args.child_dump)
    if args.json and (
        args.json.resolve() == Path("/tmp") or Path("/tmp") in args.json.resolve().parents
    ):
        parser.error("--json: a path outside /tmp (the lab sandbox has a /tmp of its own)")
    # never the host's own services: the lab runs in a sandbox of its own
    sandbox.enter("bench.dump", sys.argv[1:])

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    fixture = (
        f"{args.rows:,} rows (one table)"
        if args.fixture == "rows"
        else f"i-doit-like, {args.gigabytes:g} GB data + index"
    )
    results = Results(fixture, args.threads)
    if not threads_known():
        again, argv = [], iter(sys.argv[1:])
        for arg in argv:
            if arg == "--threads":
                next(argv, None)  # and its value
            elif not arg.startswith("--threads="):
                again.append(arg)
        results.skipped["snapcoord t=N"] = (
            "this snapcoord has no [vms.X.dump] threads: rerun on one that has: "
            + shlex.join(["python3", "bench/dump.py", *again, f"--threads={args.threads}"])
        )
    if shutil.which("mydumper") is None or shutil.which("myloader") is None:
        for name in ("mydumper", "mydumper -c", "myloader"):
            results.skipped[name] = "mydumper/myloader not installed (apt-get install -y mydumper)"
    for name in skip:
        results.skipped.setdefault(name, "--skip")

    work = Path(tempfile.mkdtemp(prefix="snapcoord-bench-dump-"))
    work.chmod(0o755)  # mydumper's directories are written by the guest's user
    guest = lab.start_sshd()
    server = start_guest_server()
    transport: SshTransport | None = None
    try:
        started = time.monotonic()
        if args.fixture == "rows":
            dumpdata.rows_table(server, args.rows)
            sizes = dumpdata.table_sizes(server, ("benchdb",))
        else:
            sizes = dumpdata.idoit_large(server, args.gigabytes)
        results.data_bytes = sum(sizes.values())
        print(
            f"fixture {fixture}: {results.data_bytes / 1e6:.0f} MB data + index, "
            f"generated in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        configs = {
            "snapcoord t=1": write_lab_config(work / "t1.toml", guest, server, work, None),
        }
        if "snapcoord t=N" not in results.skipped:
            configs["snapcoord t=N"] = write_lab_config(
                work / "tN.toml", guest, server, work, args.threads
            )
        vm = load_config(str(configs["snapcoord t=1"])).vm(VM)
        assert vm.guest is not None
        transport = SshTransport(vm.guest, vm=VM)
        transport.open()
        bench = Bench(args, results, transport, server, work, configs)
        bench.dumps()
        if not args.no_restore:
            bench.restores()
        bench.cleanup()
        report(results)
        if args.json:
            args.json.write_text(json.dumps(dataclasses.asdict(results), indent=1))
    finally:
        if transport is not None:
            transport.close()
        lab.stop_service("mariadb")
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        results: Results,
        transport: SshTransport,
        server: GuestServer,
        work: Path,
        configs: dict[str, Path],
    ) -> None:
        self.args, self.results, self.transport = args, results, transport
        self.server, self.work, self.configs = server, work, configs
        self.socket = f"--socket={server.socket}"
        self.kept: dict[str, Path] = {}  # the last dump of each kind, for the restores
        self.told: set[str] = set()

    def guest_argv(self, argv: list[str], shell: str | None = None) -> list[str]:
        """``ssh`` over the open master, running ``argv`` (or the shell line) in the guest."""
        command = ["sh", "-c", shell] if shell is not None else argv
        return self.transport.command_line(command)

    def _keep(self, name: str, path: Path) -> None:
        old = self.kept.get(name)
        if old is not None and old != path:
            remove(old)
        self.kept[name] = path

    def _rounds(
        self, variants: tuple[str, ...], table: dict[str, list[Sample]], one: Callable[..., Sample]
    ) -> None:
        active = [v for v in variants if v not in self.results.skipped]
        for v in variants:
            if v in self.results.skipped and v not in self.told:
                self.told.add(v)
                print(f"skipped {v}: {self.results.skipped[v]}", flush=True)
        for run in range(self.args.runs):
            order = active[run % len(active) :] + active[: run % len(active)]
            line = []
            for variant in order:
                sample = one(variant, run)
                sample.load = os.getloadavg()[0]
                table.setdefault(variant, []).append(sample)
                line.append(f"{variant} {sample.seconds:.2f} s")
            print(f"run {run + 1}: " + ", ".join(line), flush=True)

    # -- dumps
    def dumps(self) -> None:
        print(f"dumps, {self.args.runs} runs, threads N = {self.args.threads}", flush=True)
        self._rounds(DUMPS, self.results.dumps, self.dump)

    def dump(self, variant: str, run: int) -> Sample:
        if variant == "hand":
            out = self.work / f"hand-{run}.sql.gz"
            remote = shlex.join([*HAND_DUMP, self.socket]) + " | gzip -9"
            busy, started = machine_busy(), time.monotonic()
            with out.open("wb") as handle:
                subprocess.run(self.guest_argv([], remote), stdout=handle, check=True)
            sample = Sample(time.monotonic() - started, stored=du(out), cpu=machine_busy() - busy)
            self._keep(variant, out)
            return sample
        if variant == "mysqldump alone":
            argv = ["mysqldump", *DEFAULT_DUMP_OPTIONS["mysql"], "--all-databases", self.socket]
            busy, started = machine_busy(), time.monotonic()
            guest_run(self.guest_argv([], shlex.join(argv) + " > /dev/null"))
            return Sample(time.monotonic() - started, cpu=machine_busy() - busy)
        if variant.startswith("mydumper"):
            out = self.work / f"mydumper-{run}{'-c' if variant.endswith('-c') else ''}"
            argv = [
                "mydumper",
                "--threads",
                str(self.args.threads),
                "--trx-consistency-only",
                "--routines",
                "--events",
                "--triggers",
                "-o",
                str(out),
                self.socket,
            ]
            if variant.endswith("-c"):
                argv.append("--compress")
            busy, started = machine_busy(), time.monotonic()
            guest_run(self.guest_argv(argv))
            sample = Sample(time.monotonic() - started, stored=du(out), cpu=machine_busy() - busy)
            if variant.endswith("-c"):
                note = f"mydumper -c: gzip per file, level {gzip_level(out)}"
                if note not in self.results.notes:
                    self.results.notes.append(note)
            # myloader loads the compressed directory when there is one
            if variant.endswith("-c") or "mydumper -c" in self.results.skipped:
                self._keep("mydumper", out)
            else:
                remove(out)
            return sample
        name = f"{'t1' if variant.endswith('=1') else 'tN'}-{run}"
        out_text, sample = run_child_rusage(
            [sys.executable, "-m", "bench.dump", "--child-dump", str(self.configs[variant]), name]
        )
        done = json.loads(out_text.strip().splitlines()[-1])
        sample.seconds, sample.stored, sample.cpu = done["seconds"], done["stored"], done["cpu"]
        note = f"{variant} stored: {', '.join(done['files'])}"
        if note not in self.results.notes:
            self.results.notes.append(note)
        if variant.endswith("=1"):
            self.results.sql_bytes = done["sql_bytes"]
            note = f"snapcoord's compression: {done['compression']}"
            if note not in self.results.notes:
                self.results.notes.append(note)
        self._keep(variant, Path(done["folder"]))
        return sample

    # -- restores
    def restores(self) -> None:
        for variant, kept in (
            ("hand", "hand"),
            ("snapcoord t=1", "snapcoord t=1"),
            ("snapcoord t=N", "snapcoord t=N"),
            ("myloader", "mydumper"),
        ):
            if variant not in self.results.skipped and kept not in self.kept:
                self.results.skipped[variant] = f"no {kept} dump to restore"
        print(f"restores, {self.args.runs} runs", flush=True)
        self._rounds(RESTORES, self.results.restores, self.restore)

    def restore(self, variant: str, run: int) -> Sample:
        if variant == "hand":
            busy, started = machine_busy(), time.monotonic()
            with self.kept["hand"].open("rb") as handle:
                remote = "gunzip | " + shlex.join(["mysql", self.socket])
                subprocess.run(self.guest_argv([], remote), stdin=handle, check=True)
            return Sample(time.monotonic() - started, cpu=machine_busy() - busy)
        if variant == "myloader":
            argv = [
                "myloader",
                "-d",
                str(self.kept["mydumper"]),
                "--threads",
                str(self.args.threads),
                "--overwrite-tables",
                self.socket,
            ]
            busy, started = machine_busy(), time.monotonic()
            guest_run(self.guest_argv(argv))
            return Sample(time.monotonic() - started, cpu=machine_busy() - busy)
        argv = [sys.executable, "-m", "snapcoord", "-c", str(self.configs[variant])]
        argv += ["restore-dump", VM, "--file", str(self.kept[variant]), "--yes", "--json"]
        busy = machine_busy()
        out_text, sample = run_child_rusage(argv)
        sample.cpu = machine_busy() - busy  # the whole command, as its time is
        done = json.loads(out_text.strip().splitlines()[-1])
        if done.get("ok") is not True:
            raise SystemExit(f"restore-dump failed: {out_text}")
        # the whole command as a user runs it: start-up, ssh, sha256, drop, load, compare
        sample.seconds = sample.wall
        for note in done.get("notes", []):
            found = re.search(r"^restored .* in ([0-9.]+) s;", str(note))
            if found:
                sample.inner = float(found.group(1))
        return sample

    def cleanup(self) -> None:
        for path in self.kept.values():
            remove(path)
        self.kept.clear()


def guest_run(argv: list[str]) -> None:
    """mydumper/myloader: their warnings (trx-consistency-only's) only when they fail."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _median(samples: list[Sample], field: str) -> float:
    return float(statistics.median(getattr(s, field) for s in samples))


def report(results: Results) -> None:
    sql = results.sql_bytes
    n = {len(v) for v in [*results.dumps.values(), *results.restores.values()]}
    print(
        f"\n{results.fixture}: {results.data_bytes / 1e6:.0f} MB data + index, SQL "
        f"{sql / 1e6:.1f} MB; threads N = {results.threads}; medians of {sorted(n)} runs"
    )
    for note in results.notes:
        print(f"note: {note}")
    for name, why in results.skipped.items():
        print(f"skipped {name}: {why}")
    cores = os.cpu_count() or 1
    print(
        "\n| dump | median s | SQL MB/s | stored MB | vs hand (x) | machine CPU s |"
        f" CPU bound s (/ {cores} cores) | best possible vs hand (x) |"
        " peak RSS MB (largest / tree) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    hand = results.dumps.get("hand")
    for name, samples in results.dumps.items():
        median = _median(samples, "seconds")
        cpu = _median(samples, "cpu")
        ratio = f"{_median(hand, 'seconds') / median:.2f}" if hand else "-"
        best = f"{_median(hand, 'seconds') / (cpu / cores):.2f}" if hand and cpu else "-"
        rss = (
            f"{max(s.rss_max for s in samples):.0f} / {max(s.rss_tree for s in samples):.0f}"
            if name.startswith("snapcoord")
            else "-"
        )
        stored = f"{_median(samples, 'stored') / 1e6:.1f}" if name != "mysqldump alone" else "-"
        print(
            f"| {name} | {median:.2f} | {sql / 1e6 / median:.1f} | {stored} | {ratio} |"
            f" {cpu:.2f} | {cpu / cores:.2f} | {best} | {rss} |"
        )
    print(
        "\n| restore | median s | vs hand (x) | of which drop + load s | machine CPU s |"
        " peak RSS MB (largest / tree) |"
    )
    print("|---|---|---|---|---|---|")
    hand = results.restores.get("hand")
    for name, samples in results.restores.items():
        median = _median(samples, "seconds")
        ratio = f"{median / _median(hand, 'seconds'):.2f}" if hand else "-"
        rss = (
            f"{max(s.rss_max for s in samples):.0f} / {max(s.rss_tree for s in samples):.0f}"
            if name.startswith("snapcoord")
            else "-"
        )
        inner = f"{_median(samples, 'inner'):.2f}" if name.startswith("snapcoord") else "-"
        cpu = _median(samples, "cpu")
        print(f"| {name} | {median:.2f} | {ratio} | {inner} | {cpu:.2f} | {rss} |")
    print("\nsingle runs (s):")
    for kind, table in (("dump", results.dumps), ("restore", results.restores)):
        for name, samples in table.items():
            runs = " / ".join(f"{s.seconds:.2f}" for s in samples)
            cpus = " / ".join(f"{s.cpu:.2f}" for s in samples)
            loads = " / ".join(f"{s.load:.1f}" for s in samples)
            print(f"  {kind} {name}: {runs} (machine CPU {cpus}; load {loads})")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(the bench's own process: {own:.0f} MB peak)")


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: the guest agent transport (``transport = "agent"``) against SSH (issue 26).

One lab guest reached both ways: the lab sandbox's real Apache, cron and MariaDB, a private
sshd on 127.0.0.1 (tests/lab/sshd.py) and Debian's real ``qemu-ga`` on a Unix socket
(tests/qga_fixture.py) behind the Proxmox VE API double's agent endpoints (tests/pve_api: every
agent call is an HTTPS request, which the double answers with qemu-server's guest-ping and then
the command, as the real API does). Both configurations name the same VM on the same double,
so the hypervisor's part of a run is the same; only ``[vms.db.guest] transport`` differs.

Three parts, each alternating its variants run by run (drift hits all alike), medians:

* **per command**: in this process, one guest command (``true``, and ``sleep 0.1`` whose lag
  past 0.1 s is the polling granularity) through a warm SSH shell, through the agent transport
  over the double, and through the agent transport on qemu-ga's socket directly (the libvirt
  path minus libvirt); one agent round trip (``ping``) over the double and on the socket; and
  the same commands with other poll cadences (``FIRST_POLL``/``LONGEST_POLL`` of
  snapcoord/agent.py, set on the module here: the product's code is not changed);
* **service window** (stop mode, apache2 + cron + MariaDB, no dump): ``snapcoord snapshot db
  --json``'s ``window_seconds``, SSH vs agent (its default cadence and the variants given with
  ``--poll``), the window's steps, and how many agent API requests a run made;
* **dump throughput**: ``snapcoord snapshot db --json`` with a dump of ROWS rows of i-doit-like
  data (bench/dump.py's generator, about 128 bytes of SQL per row, in the lab's MariaDB), the
  ``dump to store`` step's duration, SSH vs agent with the chunk sizes given with ``--chunks``
  (the link's ``max_read``; file-read allows 16 MiB).

``--real-guest`` instead boots the real Debian 12 guest (tests/realvm_guest.py, QEMU under TCG)
and takes the window and the dump there, SSH vs libvirt's agent link (adapters/libvirt_agent.py).

Needs root. Run from the repository root (it re-executes itself in a lab sandbox)::

    python3 -m bench.agent [--runs 5] [--rows 1000000] [--commands 100] [--json]
                           [--poll FIRST,LONGEST | --poll none] [--chunks 1,12] [--guest-gzip]
                           [--stream-mb 128] [--skip commands|window|dump|stream ...]
    python3 -m bench.agent --real-guest [--runs 3] [--rows 200000] [--skip window|dump]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.window import stop_figures
from snapcoord import agent as agent_module
from snapcoord.agent import AgentTransport
from snapcoord.config import load_config
from snapcoord.guest import Transport
from snapcoord.transports import open_transport
from tests import lab
from tests.cli_helpers import write_config
from tests.lab import sandbox
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    TOKEN_ENV,
    TOKEN_SECRET,
    Cert,
    hypervisor_table,
    make_cert,
    start_double,
)
from tests.qga_fixture import LabAgent, start_agent

REPO = Path(__file__).resolve().parent.parent
VMID = 100  # "db1", a qemu VM on pve1 in the double
SERVICES = ["apache2", "cron"]
DATABASE = "benchdb"
MiB = 1 << 20
#: the tuning the bench's snapcoord child applies before it runs (read by :func:`tuned_cli`)
TUNE_ENV = "SNAPCOORD_BENCH_AGENT_TUNE"
TUNED_CLI = "import sys; from bench.agent import tuned_cli; sys.exit(tuned_cli())"
#: the steps of a stop-mode window, in order (the start steps are the undos' names)
WINDOW_STEPS = (
    "stop services",
    "stop database",
    "check services still stopped",
    "hypervisor snapshot",
)


def apply_tune(tune: dict[str, float]) -> None:
    """Poll cadence (``first``, ``longest`` seconds) and chunk size (``read`` bytes) of the
    agent transport, set on the module and the link class of this process."""
    if "first" in tune:
        agent_module.FIRST_POLL = tune["first"]
    if "longest" in tune:
        agent_module.LONGEST_POLL = tune["longest"]
    if "read" in tune:
        from snapcoord.adapters.proxmox_agent import ProxmoxAgentLink

        init = ProxmoxAgentLink.__init__
        size = int(tune["read"])

        def sized(self: ProxmoxAgentLink, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            self.max_read = size

        ProxmoxAgentLink.__init__ = sized  # type: ignore[method-assign,unused-ignore]


def tuned_cli() -> int:
    """snapcoord's CLI (``sys.argv[1:]``) with ``$TUNE_ENV``'s tuning applied."""
    from snapcoord import cli

    apply_tune(json.loads(os.environ.get(TUNE_ENV) or "{}"))
    return cli.main(sys.argv[1:])


@dataclass
class Lab:
    work: Path
    guest: lab.SshGuest
    qga: LabAgent
    double: PveApiDouble
    cert: Cert

    def config(
        self, name: str, transport: str, *, dump: bool = False, compress_on: str = "coordinator"
    ) -> Path:
        table: dict[str, Any]
        if transport == "ssh":
            table = self.guest.guest_table(services=SERVICES, database="mariadb")
        else:
            table = {"transport": "agent", "services": SERVICES, "database": "mariadb"}
        tables: dict[str, dict[str, Any]] = {
            "defaults": {"store": str(self.work / "store"), "label": "bench"},
            "hypervisors.pve": hypervisor_table(self.double, self.cert),
            "vms.db": {"hypervisor": "pve", "name": "db1"},
            "vms.db.guest": {**table, "dump": dump},
        }
        if dump:
            tables["vms.db.dump"] = {"databases": [DATABASE], "compress_on": compress_on}
        path = write_config(self.work / f"{name}.toml", tables)
        path.chmod(0o600)
        return path

    def agent_requests(self) -> int:
        return sum(1 for _method, path in self.double.calls() if "/agent/" in path)


@contextlib.contextmanager
def started_lab() -> Iterator[Lab]:
    work = Path(tempfile.mkdtemp(prefix="snapcoord-bench-agent-"))
    guest = lab.start_sshd()
    qga: LabAgent | None = None
    double: PveApiDouble | None = None
    try:
        qga = start_agent(work / "qga")
        cert = make_cert(work)
        double = start_double(cert, task_seconds=0.1)
        double.cluster.attach_agent(VMID, qga.socket)
        os.environ[TOKEN_ENV] = TOKEN_SECRET
        yield Lab(work, guest, qga, double, cert)
    finally:
        if double is not None:
            double.stop()
        if qga is not None:
            qga.stop()
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- per command ------------------------------------------------------------------------------


def timed(call: Callable[[], Any], count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


class PollCounter:
    """Counts a link's exec-status calls (wraps the instance's method)."""

    def __init__(self, link: Any) -> None:
        self.count = 0
        original = link.exec_status

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

        link.exec_status = counted


def per_command(bench: Lab, count: int, polls: list[tuple[float, float]]) -> dict[str, Any]:
    """Median seconds of one guest command and one agent round trip, each way."""
    ssh_config = load_config(str(bench.config("cmd-ssh", "ssh")))
    agent_config = load_config(str(bench.config("cmd-agent", "agent")))
    ssh: Transport = open_transport(ssh_config, "db")
    via_api = open_transport(agent_config, "db")
    assert isinstance(via_api, AgentTransport)
    guest = agent_config.vm("db").guest
    assert guest is not None
    # qemu-ga serves one client at a time and the double holds its agent's: a second qemu-ga
    second = start_agent(bench.work / "qga-direct")
    direct = AgentTransport(guest, lambda: second.link("db"), vm="db")
    ways: dict[str, Transport] = {
        "ssh": ssh,
        "agent (API double)": via_api,
        "agent (qga socket)": direct,
    }
    for transport in ways.values():
        transport.open()
    ssh.warm(1, sudo=False)
    counters = {
        name: PollCounter(t.link) for name, t in ways.items() if isinstance(t, AgentTransport)
    }
    default = (agent_module.FIRST_POLL, agent_module.LONGEST_POLL)
    cadences = [default, *[p for p in polls if p != default]]
    samples: dict[str, list[float]] = {}
    poll_counts: dict[str, int] = {}
    try:
        for _ in range(3):  # warm-up: connections, caches
            for transport in ways.values():
                transport.run(["true"], timeout=10)
        pings = {
            "API double": lambda: via_api.link.ping(timeout=10),
            "qga socket": lambda: direct.link.ping(timeout=10),
        }
        for _ in range(count):  # alternating, one call each in turn
            for name, ping in pings.items():
                samples.setdefault(f"ping {name}", []).extend(timed(ping, 1))
            for name, transport in ways.items():
                for first, longest in cadences if name != "ssh" else [default]:
                    agent_module.FIRST_POLL, agent_module.LONGEST_POLL = first, longest
                    tag = "" if (first, longest) == default else f" poll {first:g}/{longest:g}"
                    for label, argv, expected in (
                        ("true", ["true"], 0.0),
                        ("sleep 0.1", ["sleep", "0.1"], 0.1),
                    ):
                        key = f"{label} {name}{tag}"
                        counter = counters.get(name)
                        before = counter.count if counter else 0
                        got = timed(functools.partial(transport.run, argv, timeout=10), 1)[0]
                        samples.setdefault(key, []).append(got - expected)
                        if counter:
                            poll_counts[key] = poll_counts.get(key, 0) + counter.count - before
        agent_module.FIRST_POLL, agent_module.LONGEST_POLL = default
    finally:
        agent_module.FIRST_POLL, agent_module.LONGEST_POLL = default
        for transport in ways.values():
            transport.close()
        second.stop()
    return {
        "count": count,
        "median": {k: round(median(v), 5) for k, v in samples.items()},
        "polls_per_command": {k: round(v / count, 2) for k, v in poll_counts.items()},
    }


# -- CLI runs ---------------------------------------------------------------------------------


def run_snapshot(bench: Lab, config: Path, tune: dict[str, float]) -> dict[str, Any]:
    """One ``snapcoord snapshot db --json``: its summary, the steps' durations, its agent API
    requests and its wall time."""
    before = bench.agent_requests()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", TUNED_CLI, "-c", str(config), "snapshot", "db", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, TUNE_ENV: json.dumps(tune)},
        timeout=900,
        check=False,
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"snapcoord failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    steps: dict[str, float] = {}
    for step in summary["steps"]:
        if step.get("started") is not None and step.get("ended") is not None:
            steps[step["name"]] = steps.get(step["name"], 0.0) + step["ended"] - step["started"]
    return {
        "window": summary.get("window_seconds"),
        "steps": steps,
        "requests": bench.agent_requests() - before,
        "wall": wall,
        "dump": summary.get("dump"),
    }


def settle() -> None:
    lab.ensure_running()
    time.sleep(1)


def variant_name(tune: dict[str, float]) -> str:
    if not tune:
        return "agent"
    parts = []
    if "first" in tune:
        parts.append(f"poll {tune['first']:g}/{tune['longest']:g} s")
    if "read" in tune:
        parts.append(f"chunk {tune['read'] / MiB:g} MiB")
    return f"agent, {', '.join(parts)}"


def windows(bench: Lab, runs: int, polls: list[tuple[float, float]]) -> dict[str, Any]:
    configs = {
        "ssh": bench.config("window-ssh", "ssh"),
        "agent": bench.config("window-agent", "agent"),
    }
    variants: dict[str, tuple[Path, dict[str, float]]] = {
        "ssh": (configs["ssh"], {}),
        "agent": (configs["agent"], {}),
    }
    for first, longest in polls:
        tune = {"first": first, "longest": longest}
        variants[variant_name(tune)] = (configs["agent"], tune)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for index in range(runs):
        for name, (config, tune) in variants.items():
            results[name].append(run_snapshot(bench, config, tune))
            settle()
        print(
            f"window run {index + 1}: "
            + ", ".join(f"{name} {r[-1]['window']:.3f} s" for name, r in results.items()),
            flush=True,
        )
    return summarize(results, "window", baseline="ssh")


def summarize(
    results: dict[str, list[dict[str, Any]]], figure: str, baseline: str
) -> dict[str, Any]:
    def figure_of(run: dict[str, Any]) -> float:
        value = run[figure] if figure in run and run[figure] is not None else run["steps"][figure]
        return float(value)

    base = median([figure_of(r) for r in results[baseline]])
    out: dict[str, Any] = {}
    for name, runs in results.items():
        values = [figure_of(r) for r in runs]
        step_names = {s for r in runs for s in r["steps"]}
        out[name] = {
            "per_run": [round(v, 3) for v in values],
            "median": round(median(values), 4),
            "ratio": round(median(values) / base, 3),
            "median_wall": round(median([r["wall"] for r in runs]), 3),
            "median_requests": median([r["requests"] for r in runs]),
            "median_steps": {
                s: round(median([r["steps"].get(s, 0.0) for r in runs]), 4)
                for s in sorted(step_names)
            },
        }
        dumps = [r["dump"] for r in runs if r.get("dump")]
        if dumps:
            out[name]["dump"] = dumps[-1]
    return out


# -- dumps ------------------------------------------------------------------------------------


def generate(rows: int) -> None:
    """bench/dump.py's i-doit-like table, in the lab's MariaDB (sequence engine)."""
    lab.mysql_exec(
        f"DROP DATABASE IF EXISTS {DATABASE}; CREATE DATABASE {DATABASE};"
        f"CREATE TABLE {DATABASE}.isys_obj (id INT UNSIGNED PRIMARY KEY, title VARCHAR(255),"
        " sysid VARCHAR(64), created DATETIME, status TINYINT, descr TEXT) ENGINE=InnoDB;"
    )
    step = 500_000
    for start in range(1, rows + 1, step):
        end = min(rows, start + step - 1)
        lab.mysql_exec(
            f"USE {DATABASE}; INSERT INTO isys_obj"
            " SELECT seq, CONCAT('Server ', seq, ' rack ', seq % 40),"
            " CONCAT('SYSID_', LPAD(seq, 12, '0')), '2020-01-01' + INTERVAL seq SECOND,"
            " seq % 3, IF(seq % 5 = 0, NULL, CONCAT('note ', MD5(seq)))"
            f" FROM seq_{start}_to_{end};"
        )


def dumps(
    bench: Lab, runs: int, rows: int, chunks: list[float], *, guest_gzip: bool
) -> dict[str, Any]:
    started = time.monotonic()
    generate(rows)
    print(f"generated {rows} rows in {time.monotonic() - started:.1f} s", flush=True)
    ssh = bench.config("dump-ssh", "ssh", dump=True)
    agent = bench.config("dump-agent", "agent", dump=True)
    variants: dict[str, tuple[Path, dict[str, float]]] = {"ssh": (ssh, {}), "agent": (agent, {})}
    for size in chunks:
        tune = {"read": size * MiB}
        variants[variant_name(tune)] = (agent, tune)
    if guest_gzip:
        variants["agent, gzip in the guest"] = (
            bench.config("dump-agent-guest", "agent", dump=True, compress_on="guest"),
            {},
        )
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    try:
        for index in range(runs):
            for name, (config, tune) in variants.items():
                results[name].append(run_snapshot(bench, config, tune))
                settle()
                for store in (bench.work / "store").glob("*"):
                    shutil.rmtree(store, ignore_errors=True)  # a run's dump: not kept
            print(
                f"dump run {index + 1}: "
                + ", ".join(
                    f"{name} {r[-1]['steps']['dump to store']:.2f} s" for name, r in results.items()
                ),
                flush=True,
            )
    finally:
        with contextlib.suppress(lab.LabError, subprocess.SubprocessError):
            lab.mysql_exec(f"DROP DATABASE IF EXISTS {DATABASE}")
    out = summarize(results, "dump to store", baseline="ssh")
    sql_bytes = next((r["dump"] or {}).get("sql_bytes") for r in results["ssh"])
    for figures in out.values():
        figures["sql_mb_per_s"] = (
            round(sql_bytes / 1e6 / figures["median"], 1) if sql_bytes else None
        )
    return {"rows": rows, "sql_bytes": sql_bytes, "variants": out}


# -- streams ----------------------------------------------------------------------------------


def sql_file(path: Path, megabytes: int) -> int:
    """A file of SQL text like the dump's (compressible as it is), ``megabytes`` MB."""
    line = (
        "(12345,'Server 12345 rack 25','SYSID_000000012345','2020-01-01 03:25:45',0,"
        "'note 827ccb0eea8a706c4c34a16891f84e7b'),"
    )
    block = ("INSERT INTO `isys_obj` VALUES " + line * 200 + "\n").encode()
    with path.open("wb") as handle:
        for _ in range(megabytes * 1_000_000 // len(block) + 1):
            handle.write(block)
    return path.stat().st_size


def streams(bench: Lab, runs: int, megabytes: int, chunks: list[float]) -> dict[str, Any]:
    """``run_streaming(["cat", FILE])`` of a file of SQL text in the guest, consumed and
    dropped: each transport's own throughput (for the agent: the guest-side copy, the reads
    in chunks, the sha256 check), without mysqldump or gzip; and ``sha256sum`` of the file in
    the guest (the agent's check after the last chunk)."""
    source = bench.work / "stream.sql"
    size = sql_file(source, megabytes)
    ssh: Transport = open_transport(load_config(str(bench.config("cmd-ssh", "ssh"))), "db")
    agent_config = load_config(str(bench.config("cmd-agent", "agent")))
    via_api = open_transport(agent_config, "db")
    assert isinstance(via_api, AgentTransport)
    guest = agent_config.vm("db").guest
    assert guest is not None
    second = start_agent(bench.work / "qga-stream")
    direct = AgentTransport(guest, lambda: second.link("db"), vm="db")
    variants: dict[str, tuple[Transport, int | None]] = {"ssh": (ssh, None)}
    variants["agent (API double)"] = (via_api, None)
    for chunk in chunks:
        variants[f"agent (API double), chunk {chunk:g} MiB"] = (via_api, int(chunk * MiB))
    variants["agent (qga socket)"] = (direct, None)
    for transport in (ssh, via_api, direct):
        transport.open()
    ssh.warm(1, sudo=False)
    times: dict[str, list[float]] = {name: [] for name in variants}
    requests: dict[str, list[int]] = {name: [] for name in variants}
    checks: list[float] = []
    try:
        for index in range(runs):
            for name, (transport, read_size) in variants.items():
                link = transport.link if isinstance(transport, AgentTransport) else None
                default = link.max_read if link is not None else 0  # restored after the run
                if link is not None and read_size is not None:
                    link.max_read = read_size
                got = [0]

                def consume(data: bytes, got: list[int] = got) -> None:
                    got[0] += len(data)

                before = bench.agent_requests()
                started = time.perf_counter()
                result = transport.run_streaming(["cat", str(source)], timeout=600, consume=consume)
                times[name].append(time.perf_counter() - started)
                requests[name].append(bench.agent_requests() - before)
                if link is not None:
                    link.max_read = default
                if not result.ok or got[0] != size:
                    raise SystemExit(f"{name}: {got[0]} of {size} bytes, {result.error_text()}")
            started = time.perf_counter()
            ssh.run(["sha256sum", str(source)], timeout=60)
            checks.append(time.perf_counter() - started)
            print(
                f"stream run {index + 1}: "
                + ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items()),
                flush=True,
            )
    finally:
        for transport in (ssh, via_api, direct):
            transport.close()
        second.stop()
        source.unlink(missing_ok=True)
    base = median(times["ssh"])
    return {
        "megabytes": round(size / 1e6, 1),
        "sha256sum_in_guest": round(median(checks), 3),
        "variants": {
            name: {
                "per_run": [round(v, 3) for v in values],
                "median": round(median(values), 3),
                "mb_per_s": round(size / 1e6 / median(values), 1),
                "ratio": round(median(values) / base, 3),
                "median_requests": statistics.median(requests[name]),
            }
            for name, values in times.items()
        },
    }


# -- the real Debian guest (libvirt) ------------------------------------------------------------


def real_guest(runs: int, rows: int, skip: list[str]) -> dict[str, Any]:
    """The service window and the dump on the real Debian 12 guest under QEMU (TCG) through
    libvirt: SSH vs the libvirt agent link (adapters/libvirt_agent.py), alternating. The SSH
    window runs also give snapcoord's own time in the window on a systemd guest."""

    from tests.libvirtd import running_libvirtd
    from tests.realvm_guest import booted_guest, ensure_image, reap_stale_domains

    # libvirtd and QEMU see the sandbox's /tmp only under pytest's folder (tests/lab/sandbox.py)
    shared = Path("/tmp", f"pytest-of-{pwd.getpwuid(os.getuid()).pw_name}")
    shared.mkdir(mode=0o700, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="snapcoord-bench-agent-realvm-", dir=shared))
    try:
        with contextlib.ExitStack() as stack:
            uri = stack.enter_context(running_libvirtd())
            reap_stale_domains(uri)
            guest = stack.enter_context(booted_guest(ensure_image(), work / "vm", uri))
            print(f"real guest booted in {guest.boot_seconds:.0f} s", flush=True)
            code, _out, err = guest.agent_run(
                ["mysql", "-e",
                 f"DROP DATABASE IF EXISTS {DATABASE}; CREATE DATABASE {DATABASE};"
                 f"CREATE TABLE {DATABASE}.isys_obj (id INT UNSIGNED PRIMARY KEY,"
                 " title VARCHAR(255), sysid VARCHAR(64), created DATETIME, status TINYINT,"
                 " descr TEXT) ENGINE=InnoDB;"
                 f"USE {DATABASE}; INSERT INTO isys_obj SELECT seq,"
                 " CONCAT('Server ', seq, ' rack ', seq % 40),"
                 " CONCAT('SYSID_', LPAD(seq, 12, '0')),"
                 " '2020-01-01' + INTERVAL seq SECOND, seq % 3,"
                 " IF(seq % 5 = 0, NULL, CONCAT('note ', MD5(seq)))"
                 f" FROM seq_1_to_{rows};"],
                timeout=600,
            )  # fmt: skip
            if code != 0:
                raise SystemExit(f"generating rows in the real guest failed: {err}")

            def config(name: str, transport: str, dump: bool, compress_on: str) -> Path:
                table: dict[str, Any] = {"services": SERVICES, "database": "mariadb",
                                         "stop_timeout": 60.0, "dump": dump}  # fmt: skip
                if transport == "ssh":
                    table = guest.guest_table(**table)
                else:
                    table["transport"] = "agent"
                tables: dict[str, dict[str, Any]] = {
                    "defaults": {"store": str(work / "store"), "label": "bench"},
                    "hypervisors.qemu": {"type": "libvirt", "uri": guest.uri},
                    "vms.db": {"hypervisor": "qemu", "name": guest.domain},
                    "vms.db.guest": table,
                }
                if dump:
                    tables["vms.db.dump"] = {"databases": [DATABASE], "compress_on": compress_on}
                return write_config(work / f"{name}.toml", tables)

            variants = {
                "window": {
                    "ssh": config("w-ssh", "ssh", False, "coordinator"),
                    "agent": config("w-agent", "agent", False, "coordinator"),
                },
                "dump": {
                    "ssh": config("d-ssh", "ssh", True, "coordinator"),
                    "agent": config("d-agent", "agent", True, "coordinator"),
                    "agent, gzip in the guest": config("d-agent-g", "agent", True, "guest"),
                },
            }
            out: dict[str, Any] = {"boot_seconds": round(guest.boot_seconds, 1), "rows": rows}
            for part, configs in variants.items():
                if part in skip:
                    continue
                results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
                for index in range(runs):
                    for name, path in configs.items():
                        results[name].append(
                            real_run(path, guest.uri, guest.domain, work, figures=name == "ssh")
                        )
                    print(f"real guest {part} run {index + 1}: " + ", ".join(
                        f"{n} {r[-1]['window']:.2f} s window, "
                        f"{r[-1]['steps'].get('dump to store', 0):.2f} s dump"
                        for n, r in results.items()), flush=True)  # fmt: skip
                out[part] = summarize(
                    results, "window" if part == "window" else "dump to store", baseline="ssh"
                )
                if part == "window":
                    out[part]["ssh"]["overhead"] = overhead_summary(results["ssh"])
            return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def overhead_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """snapcoord's own time in the window (bench/window.py's figure) over SSH runs: medians."""
    figures = [r["figures"] for r in runs if r.get("figures")]
    steps = sorted({s for f in figures for s in f["by_step"]})
    return {
        "per_run_ms": [round(f["overhead"] * 1000, 1) for f in figures],
        "median_ms": round(median([f["overhead"] for f in figures]) * 1000, 1),
        "median_commands": round(median([f["commands"] for f in figures]), 4),
        "median_timings": {
            c: round(median([f["timings"][c] for f in figures]), 4)
            for c in sorted({c for f in figures for c in f["timings"]})
        },
        "median_by_step_ms": {
            s: round(median([f["by_step"].get(s, 0.0) for f in figures]) * 1000, 1) for s in steps
        },
    }


def real_run(
    config: Path, uri: str, domain: str, work: Path, *, figures: bool = False
) -> dict[str, Any]:
    """One ``snapcoord snapshot db --json`` on the real guest; its snapshot deleted after.
    ``figures``: run with ``-v`` and take the window's overhead (bench/window.py)."""
    import libvirt

    started = time.monotonic()
    verbose = ["-v"] if figures else []
    proc = subprocess.run(
        [sys.executable, "-m", "snapcoord", *verbose, "-c", str(config), "snapshot", "db",
         "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=900, check=False,
    )  # fmt: skip
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"snapcoord failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    steps: dict[str, float] = {}
    for step in summary["steps"]:
        if step.get("started") is not None and step.get("ended") is not None:
            steps[step["name"]] = steps.get(step["name"], 0.0) + step["ended"] - step["started"]
    conn = libvirt.open(uri)
    try:
        conn.lookupByName(domain).snapshotLookupByName(summary["snapshot"]).delete()
    finally:
        conn.close()
    for folder in (work / "store").glob("*"):
        if folder.is_dir() and folder.name not in ("journal", "locks"):
            shutil.rmtree(folder, ignore_errors=True)
    return {"window": summary.get("window_seconds"), "steps": steps, "requests": 0,
            "wall": wall, "dump": summary.get("dump"),
            "figures": stop_figures(summary, proc.stderr) if figures else None}  # fmt: skip


# -- main -------------------------------------------------------------------------------------


def poll_pair(text: str) -> tuple[float, float] | None:
    if text == "none":
        return None
    first, _, longest = text.partition(",")
    return float(first), float(longest or first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each variant (default 5)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows dumped (default 1 M)")
    parser.add_argument(
        "--commands", type=int, default=100, help="per-command samples of each (default 100)"
    )
    parser.add_argument(
        "--poll",
        type=poll_pair,
        action="append",
        default=None,
        metavar="FIRST,LONGEST",
        help="an extra poll cadence in seconds for the agent (repeatable; "
        "default 0.001,0.005 and 0.005,0.05)",
    )
    parser.add_argument(
        "--chunks",
        default="1,12",
        help="extra chunk sizes in MiB for the agent's dump (default 1,12; the product's is 4)",
    )
    parser.add_argument(
        "--real-guest",
        action="store_true",
        help="only the window and the dump on the real Debian guest through libvirt "
        "(tests/realvm_guest.py), SSH vs the libvirt agent link",
    )
    parser.add_argument(
        "--guest-gzip",
        action="store_true",
        help="one more dump variant: the agent with compress_on = guest",
    )
    parser.add_argument(
        "--stream-mb", type=int, default=128, help="MB of the stream part's file (default 128)"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["commands", "window", "dump", "stream"],
        help="leave a part out",
    )
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)
    sandbox.enter("bench.agent", sys.argv[1:] if argv is None else list(argv))
    lab.require("qemu-ga")
    polls = [p for p in args.poll if p] if args.poll else [(0.001, 0.005), (0.005, 0.05)]
    chunks = [float(c) for c in args.chunks.split(",") if c]
    result: dict[str, Any] = {"runs": args.runs}
    if args.real_guest:
        result["real_guest"] = real_guest(args.runs, args.rows, args.skip)
        print(json.dumps(result, indent=1))
        return 0
    with started_lab() as bench, lab.lab_lock():
        lab.ensure_running()
        try:
            if "commands" not in args.skip:
                result["commands"] = per_command(bench, args.commands, polls)
                print(json.dumps(result["commands"], indent=1), flush=True)
            if "window" not in args.skip:
                result["window"] = windows(bench, args.runs, polls)
            if "dump" not in args.skip:
                result["dump"] = dumps(
                    bench, args.runs, args.rows, chunks, guest_gzip=args.guest_gzip
                )
            if "stream" not in args.skip:
                result["stream"] = streams(bench, args.runs, args.stream_mb, chunks)
        finally:
            lab.ensure_running()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_report(result)
    return 0


def print_report(result: dict[str, Any]) -> None:
    lines = [f"runs of each: {result['runs']} (medians)"]
    if "commands" in result:
        c = result["commands"]
        lines.append(f"per command ({c['count']} samples each; sleep 0.1: its lag past 0.1 s)")
        for key, value in c["median"].items():
            polls = c["polls_per_command"].get(key)
            lines.append(f"  {key:<48} {ms(value):>10}" + (f"  {polls} polls" if polls else ""))
    if "window" in result:
        lines.append("service window (stop mode, apache2 + cron + MariaDB)")
        for name, f in result["window"].items():
            lines.append(
                f"  {name:<32} {f['median']:.3f} s  ratio {f['ratio']:.3f}  "
                f"{f['median_requests']:g} agent requests  wall {f['median_wall']:.2f} s"
            )
            lines += [f"      {s:<36} {ms(v)}" for s, v in f["median_steps"].items()]
    if "dump" in result:
        d = result["dump"]
        lines.append(f"dump ({d['rows']} rows, {(d['sql_bytes'] or 0) / 1e6:.0f} MB of SQL)")
        for name, f in d["variants"].items():
            lines.append(
                f"  {name:<32} {f['median']:.2f} s  {f['sql_mb_per_s']} MB/s  "
                f"ratio {f['ratio']:.3f}  {f['median_requests']:g} agent requests"
            )
    if "stream" in result:
        st = result["stream"]
        lines.append(f"stream of {st['megabytes']} MB (cat FILE, consumed and dropped)")
        for name, f in st["variants"].items():
            lines.append(
                f"  {name:<40} {f['median']:.2f} s  {f['mb_per_s']} MB/s  ratio {f['ratio']:.3f}"
                f"  {f['median_requests']:g} agent requests"
            )
        lines.append(f"  sha256sum of the file in the guest: {st['sha256sum_in_guest']:.3f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())

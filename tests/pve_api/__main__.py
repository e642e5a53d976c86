"""Run the double standalone: python -m tests.pve_api --listen 127.0.0.1:PORT [...].

Beyond the API (schema-checked, under /api2/json) the standalone double answers one test-only
``GET /_double/stats`` (no authentication, not part of the PVE API): per task type the number
of tasks started and the most that ran at the same time, as the double's clock saw them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .cluster import Cluster, Snap
from .server import PveApiDouble

DEFAULT_TOKEN = ("root@pam!snapcoord", "3f5b2c9e-6a1d-4e8f-9b7c-0d2e4f6a8b1c")
STATS_PATH = "/_double/stats"
FIRST_EXTRA_VMID = 1000
NODES = ("pve1", "pve2", "pve3")


class TaskTimeline:
    """When each task ran ([start, end) on the monotonic clock), per task type."""

    def __init__(self, cluster: Cluster) -> None:
        self._lock = threading.Lock()
        self._spans: dict[str, list[tuple[float, float]]] = {}
        original = cluster.start_task

        def start_task(node: str, type_: str, *args: Any, **kwargs: Any) -> str:
            started = time.monotonic()
            upid = original(node, type_, *args, **kwargs)
            with self._lock:
                self._spans.setdefault(type_, []).append((started, cluster.tasks[upid].ends_at))
            return upid

        cluster.start_task = start_task  # type: ignore[method-assign]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            spans = {type_: list(items) for type_, items in self._spans.items()}
        return {
            "tasks": {
                type_: {"count": len(items), "max_running": max_overlap(items)}
                for type_, items in sorted(spans.items())
            }
        }


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most half-open intervals [start, end) covering one instant."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start (+1)
        running += step
        peak = max(peak, running)
    return peak


class StandaloneDouble(PveApiDouble):
    """The double plus the test-only stats endpoint (outside /api2, so the API stays as PVE's)."""

    def __init__(self, *, backlog: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeline = TaskTimeline(self.cluster)
        self.backlog = backlog

    def bind(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().bind(host, port)
        assert self._httpd is not None
        if self.backlog is not None:  # Linux takes a second listen() as the new backlog
            self._httpd.socket.listen(self.backlog)
        api_handler: Any = self._httpd.RequestHandlerClass
        timeline = self.timeline

        class Handler(api_handler):  # type: ignore[misc,valid-type]
            def do_GET(self) -> None:
                if urlsplit(self.path).path == STATS_PATH:
                    self._send(200, timeline.stats())
                else:
                    super().do_GET()

        self._httpd.RequestHandlerClass = Handler


def add_guests(cluster: Cluster, count: int, prefix: str) -> None:
    """``count`` running qemu VMs PREFIX0001... (vmid 1000...), spread over the three nodes."""
    for index in range(count):
        vmid = FIRST_EXTRA_VMID + index
        cluster.add_guest(vmid, "qemu", NODES[index % len(NODES)], f"{prefix}{index + 1:04d}")


def add_snapshot(cluster: Cluster, spec: str) -> None:
    """VMID:NAME[:DESCRIPTION], a finished snapshot the guest now runs from. Its snaptime is the
    time in a snapcoord-style name (...-YYYYMMDDTHHMMSSZ), else now. Seed them oldest first."""
    vmid_text, _, rest = spec.partition(":")
    name, _, description = rest.partition(":")
    vmid = int(vmid_text)
    snaptime = int(time.time())
    with contextlib.suppress(ValueError):
        stamp = name.rsplit("-", 1)[-1]
        snaptime = int(datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp())
    with cluster.lock:
        guest = cluster.guests[vmid]
        guest.snapshots[name] = Snap(name, snaptime, description, parent=guest.parent)
        guest.parent = name


def read_tokens(path: str) -> dict[str, str]:
    """ID=SECRET lines (blank lines and # comments skipped)."""
    tokens: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            token_id, sep, secret = line.rpartition("=")
            if not sep:
                raise ValueError(f"{path}: expected ID=SECRET lines")
            tokens[token_id] = secret
    return tokens


def write_atomically(path: str, text: str) -> None:
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pve_api", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8006", help="HOST:PORT (port 0: any)")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument(
        "--backlog",
        type=int,
        help="listen backlog (default: socketserver's 5; more concurrent connects than this "
        "overflow it and wait for the client's SYN retransmission, about 1 s)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--task-seconds", type=float, default=0.5, help="duration of a task")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="ID=SECRET",
        help="accept API token USER@REALM!NAME=SECRET (repeatable)",
    )
    parser.add_argument("--token-file", help="accept the API tokens in this file (ID=SECRET lines)")
    parser.add_argument("--user", help="USER@REALM for ticket login")
    parser.add_argument("--password", help="password of --user")
    parser.add_argument(
        "--auth-delay", type=float, default=0.0, help="delay of 401 answers (real PVE: 3 s)"
    )
    parser.add_argument(
        "--guests",
        type=int,
        default=0,
        metavar="N",
        help="add N running qemu VMs (vmid 1000..., named PREFIX0001...) across the nodes",
    )
    parser.add_argument("--guest-prefix", default="fleet", help="name prefix of --guests")
    parser.add_argument(
        "--snapshot",
        action="append",
        default=[],
        metavar="VMID:NAME[:DESCRIPTION]",
        help="a finished snapshot, snaptime from a snapcoord-style name (repeatable, oldest first)",
    )
    args = parser.parse_args(argv)

    host, _, port = args.listen.rpartition(":")
    tokens: dict[str, str] = {}
    for spec in args.token:
        token_id, sep, secret = spec.rpartition("=")
        if not sep:
            parser.error(f"--token must be ID=SECRET, got {spec!r}")
        tokens[token_id] = secret
    if args.token_file:
        try:
            tokens.update(read_tokens(args.token_file))
        except (OSError, ValueError) as exc:
            parser.error(f"--token-file: {exc}")
    users = {args.user: args.password} if args.user and args.password else {}
    if not tokens and not users:
        tokens[DEFAULT_TOKEN[0]] = DEFAULT_TOKEN[1]
        print(f"no credentials given: accepting token {DEFAULT_TOKEN[0]}={DEFAULT_TOKEN[1]}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")

    double = StandaloneDouble(
        task_seconds=args.task_seconds,
        tokens=tokens,
        users=users,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_fail_delay=args.auth_delay,
        backlog=args.backlog,
    )
    add_guests(double.cluster, args.guests, args.guest_prefix)
    for spec in args.snapshot:
        try:
            add_snapshot(double.cluster, spec)
        except (ValueError, KeyError) as exc:
            parser.error(f"--snapshot {spec!r}: {exc}")
    double.bind(host or "127.0.0.1", int(port))
    print(f"listening on {double.url}", flush=True)
    guests = sorted(double.cluster.guests.values(), key=lambda g: g.vmid)
    for guest in guests[:12]:
        snaps = f", {len(guest.snapshots)} snapshots" if guest.snapshots else ""
        print(
            f"  {guest.type:4} {guest.vmid} {guest.name:12} on {guest.node} ({guest.status}{snaps})"
        )
    if len(guests) > 12:
        print(f"  ... {len(guests) - 12} more guests")
    sys.stdout.flush()
    if args.port_file:
        write_atomically(args.port_file, f"{double.port}\n")
    with contextlib.suppress(KeyboardInterrupt):
        double.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run the double standalone: python -m tests.pve_api --listen 127.0.0.1:PORT [...]."""

from __future__ import annotations

import argparse
import contextlib
import sys

from .server import PveApiDouble

DEFAULT_TOKEN = ("root@pam!snapcoord", "3f5b2c9e-6a1d-4e8f-9b7c-0d2e4f6a8b1c")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pve_api", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8006", help="HOST:PORT (port 0: any)")
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
    parser.add_argument("--user", help="USER@REALM for ticket login")
    parser.add_argument("--password", help="password of --user")
    parser.add_argument(
        "--auth-delay", type=float, default=0.0, help="delay of 401 answers (real PVE: 3 s)"
    )
    args = parser.parse_args(argv)

    host, _, port = args.listen.rpartition(":")
    tokens: dict[str, str] = {}
    for spec in args.token:
        token_id, sep, secret = spec.rpartition("=")
        if not sep:
            parser.error(f"--token must be ID=SECRET, got {spec!r}")
        tokens[token_id] = secret
    users = {args.user: args.password} if args.user and args.password else {}
    if not tokens and not users:
        tokens[DEFAULT_TOKEN[0]] = DEFAULT_TOKEN[1]
        print(f"no credentials given: accepting token {DEFAULT_TOKEN[0]}={DEFAULT_TOKEN[1]}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")

    double = PveApiDouble(
        task_seconds=args.task_seconds,
        tokens=tokens,
        users=users,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_fail_delay=args.auth_delay,
    )
    double.bind(host or "127.0.0.1", int(port))
    print(f"listening on {double.url}", flush=True)
    for guest in double.cluster.guests.values():
        print(f"  {guest.type:4} {guest.vmid} {guest.name:12} on {guest.node} ({guest.status})")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        double.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

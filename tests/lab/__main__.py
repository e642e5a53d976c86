"""``python3 -m tests.lab ...``: the lab by hand (start sshd, start services, ...)."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from tests.lab import sandbox
from tests.lab.mariadb import start_scratch_mariadb, table_checksums
from tests.lab.services import ensure_running
from tests.lab.sshd import LAB_ALIAS, ensure_test_users, guest_record, guest_toml, start_sshd


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _wait_forever() -> NoReturn:
    """Sleep until SIGINT, SIGTERM or SIGHUP (all raise KeyboardInterrupt, so cleanup runs)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    while True:
        signal.pause()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.lab", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_guest = sub.add_parser("guest", help="start the loopback sshd, print the guest table, wait")
    p_guest.add_argument("--user", default="root")
    p_guest.add_argument(
        "--json",
        action="store_true",
        help="start mariadb, apache2 and cron too, print the guest as one JSON line, and run "
        "until stdin ends (tests/lab/guests.py starts more lab guests this way)",
    )
    sub.add_parser("services", help="start mariadb, apache2, cron if they are not running")
    p_idoit = sub.add_parser("idoit", help="(re)create the i-doit-like dataset in the guest DB")
    p_idoit.add_argument("--scale", type=float, default=1.0, help="row multiplier (1 = 120k)")
    p_idoit.add_argument(
        "--payload",
        type=int,
        default=0,
        help="extra bytes of text per isys_obj row (to reach a GB for bench/)",
    )
    p_sum = sub.add_parser("checksums", help="print CHECKSUM TABLE of databases")
    p_sum.add_argument("databases", nargs="+")
    p_sum.add_argument("--socket")
    p_scratch = sub.add_parser("scratch", help="start a scratch MariaDB, print its socket, wait")
    p_scratch.add_argument("--keep", action="store_true", help="keep the datadir at exit")
    args = parser.parse_args(argv)
    # never the host's own services: the lab runs in a sandbox of its own
    sandbox.enter("tests.lab", sys.argv[1:] if argv is None else list(argv))

    if args.cmd == "guest":
        ensure_test_users()
        if args.json:  # a guest for a test in the parent sandbox: paths as the parent sees them
            guest = start_sshd(Path(sandbox.INSIDE, "sshd"), user=args.user)
            ensure_running()
            print(json.dumps(guest_record(guest, sandbox.outside)), flush=True)
        else:
            guest = start_sshd(user=args.user)
            print(f"# sshd pid {guest.pid}, workdir {guest.workdir}; Ctrl-C stops it")
            print(f"# ssh -F {guest.ssh_config} {LAB_ALIAS} true")
            print(guest_toml(guest), flush=True)
        try:
            if args.json:
                sys.stdin.read()  # until the test closes the pipe
            else:
                _wait_forever()
        except KeyboardInterrupt:
            pass
        finally:
            guest.stop()
            shutil.rmtree(guest.workdir, ignore_errors=True)
    elif args.cmd == "services":
        print("started:", " ".join(ensure_running()) or "(none, all were running)")
    elif args.cmd == "idoit":
        from tests import idoit_fixture

        ensure_running(["mariadb"])
        info = idoit_fixture.create_idoit_dataset(scale=args.scale, payload=args.payload)
        print(f"{sum(info.values())} rows in {len(info)} tables")
    elif args.cmd == "checksums":
        for name, value in table_checksums(args.databases, args.socket).items():
            print(f"{name}\t{value}")
    elif args.cmd == "scratch":
        server = start_scratch_mariadb()
        print(
            f"# pid {server.pid}; mysql --no-defaults -u root --socket={server.socket}", flush=True
        )
        try:
            _wait_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop(remove=not args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: argument parsing and dispatch. The only place that prints errors and picks exit
codes (docs/exit-codes.md)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, cast

from snapcoord import __version__
from snapcoord.errors import ConfigError, ExitCode, SnapcoordError
from snapcoord.output import LogHandler, PrintableStream, StampedStream, is_terminal

log = logging.getLogger("snapcoord")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapcoord",
        description="Consistent VM snapshots of database servers.",
        epilog="Exit codes: docs/exit-codes.md (0 ok, 2 usage/config, 3 hypervisor, "
        "4 preflight/guest, 5 snapshot failed, 6 service not restored, 75 locked, 130 interrupted)",
    )
    parser.add_argument("--version", action="version", version=f"snapcoord {__version__}")
    _add_global_options(parser, default=None)
    # the same options after the command (`snapcoord list db1 -c FILE`); given there, they win
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = functools.partial(sub.add_parser, parents=[common])

    p = add_parser("snapshot", help="stop services, snapshot, restart: for each VM")
    _add_selection(p)
    p.add_argument("--label", help="label in the snapshot name (default: from the config)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, touch nothing")
    _add_json(p)

    p = add_parser(
        "freeze", help="quiesce each VM for another tool's snapshot, until thaw (or the limit)"
    )
    _add_selection(p)
    p.add_argument(
        "--max-seconds",
        type=_seconds,
        metavar="N",
        help="put everything back after N s if no thaw comes (default: freeze_max_seconds)",
    )
    _add_json(p)

    p = add_parser("thaw", help="put frozen VMs back and check that everything runs")
    _add_selection(p)
    _add_json(p)

    p = add_parser(
        "vzdump-hook",
        help="hook script for Proxmox vzdump (--script): quiesce at pre-stop, thaw after",
        description="Called by vzdump as '<phase>' or '<phase> <mode> <vmid>'; the "
        "configuration comes from $SNAPCOORD_CONFIG or the default paths (docs/scheduling.md).",
    )
    p.add_argument("phase", help="the vzdump phase: job-start, backup-start, pre-stop, ...")
    p.add_argument(
        "rest", nargs="*", metavar="MODE VMID", help="the backup mode and the guest's VMID"
    )
    p.set_defaults(dry_run=False)

    p = add_parser(
        "freeze-hook",
        help="install, check or remove the guest-side freeze hook (QEMU guest agent, VMware Tools)",
        description="The hook quiesces the guest at its agent's fs-freeze: what Proxmox backups "
        "of QEMU VMs need (docs/fsfreeze-hook.md).",
    )
    p.add_argument(
        "action",
        choices=("install", "status", "uninstall"),
        help="install or update the hook, show its state, or remove it",
    )
    _add_selection(p)
    _add_json(p)
    p.set_defaults(dry_run=False)

    p = add_parser("prune", help="delete old snapcoord snapshots by the retention policy")
    _add_selection(p)
    p.add_argument("--dry-run", action="store_true", help="show what would go, delete nothing")
    _add_json(p)

    p = add_parser("status", help="last run, unfinished runs and snapshots of each VM")
    _add_selection(p, default_all=True)
    p.add_argument(
        "--offline", action="store_true", help="from the store only, do not ask the hypervisor"
    )
    _add_json(p)

    p = add_parser(
        "check",
        help="check everything a snapshot run needs; stop and change nothing",
        description="Hypervisor login and privileges, the VM and whether it can take a snapshot "
        "now, the guest's connection, host key, sudo rule, services and database credentials, "
        "the store, the watchdog and the guest clock: one line per problem with its fix; exit 0 "
        "when nothing stands in a run's way, else 4. All VMs unless some are selected.",
    )
    _add_selection(p, default_all=True)
    _add_json(p)

    p = add_parser("list", help="list the snapshots of each VM")
    _add_selection(p)
    _add_json(p, document=True)

    p = add_parser("revert", help="revert a VM to a snapshot")
    p.add_argument("vm", metavar="VM", help="the VM (its [vms.NAME] key)")
    p.add_argument("--to", metavar="NAME", help="snapshot name (default: newest snapcoord one)")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.add_argument(
        "--no-safety-snapshot", action="store_true", help="do not snapshot the current state first"
    )
    p.add_argument("--dry-run", action="store_true", help="show the plan, touch nothing")
    _add_json(p)

    p = add_parser("delete", help="delete a snapshot")
    p.add_argument("vm", metavar="VM", help="the VM (its [vms.NAME] key)")
    p.add_argument("name", metavar="NAME", help="the snapshot's name (see list)")
    p.add_argument("--yes", action="store_true", help="do not ask")
    _add_json(p)

    p = add_parser(
        "restore-dump", help="replay a stored dump into the guest (drops its databases first)"
    )
    p.add_argument("vm", metavar="VM", help="the VM (its [vms.NAME] key)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--from",
        dest="from_snapshot",
        metavar="SNAPSHOT-NAME",
        help="the dump taken with this snapshot (default: the newest good one)",
    )
    source.add_argument(
        "--file", type=Path, metavar="PATH", help="a dump file (.sql.zst/.sql.gz/.sql)"
    )
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.add_argument("--dry-run", action="store_true", help="verify, show what would be dropped")
    _add_json(p)

    p = add_parser(
        "verify",
        help="prove each VM's newest dump restorable: load it into a throwaway server and compare",
        description="Restore the dump into a throwaway database server on this host (no TCP, "
        "its own private folder, removed after) and compare every table's rows and checksum "
        "with what was recorded when it was taken; or, with --boot (libvirt), boot a copy of a "
        "snapshot with no network and check its services and database (docs/verify.md). "
        "Exit 0 verified, 5 not verified (the dump is kept, marked unverified), 4 the verify "
        "could not run here.",
    )
    _add_selection(p)
    p.add_argument(
        "--from",
        "--snapshot",
        dest="from_snapshot",
        metavar="SNAPSHOT-NAME",
        help="the dump taken with this snapshot (default: the newest good one); with --boot, "
        "the snapshot to boot (default: the newest snapcoord one)",
    )
    p.add_argument(
        "--boot",
        action="store_true",
        help="boot a throwaway copy of the snapshot (libvirt) instead of restoring the dump",
    )
    _add_json(p)

    p = add_parser("recover", help="restart services a crashed run left stopped, on each VM")
    _add_selection(p)
    _add_json(p, document=True)

    p = add_parser("config", help="check the configuration or print an example")
    p.add_argument(
        "action",
        choices=("check", "example"),
        help="check: read and validate the file; example: print a commented one",
    )
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=default,
        help="configuration file (default: $SNAPCOORD_CONFIG, ~/.config/snapcoord/config.toml, "
        "/etc/snapcoord/config.toml; never the current directory). Used only if no one but "
        "root and you can change it (docs/configuration.md)",
    )
    flag = False if default is None else default
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=flag, help="log every command"
    )
    parser.add_argument("--debug", action="store_true", default=flag, help="show tracebacks")


def _add_json(parser: argparse.ArgumentParser, *, document: bool = False) -> None:
    what = (
        'one JSON document on stdout (several VMs: {"vms": {VM: object}, "summary": ...})'
        if document
        else "one JSON object per VM on stdout (after several VMs, a summary object too)"
    )
    parser.add_argument("--json", action="store_true", help=what)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be a number 1-1000, got {text!r}")
    return value


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 10 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be a number of seconds 10-86400, got {text!r}")
    return value


def _add_selection(p: argparse.ArgumentParser, *, default_all: bool = False) -> None:
    what = "VMs (default: all)" if default_all else "VMs"
    p.add_argument("vms", nargs="*", metavar="VM", help=f"configured {what}")
    p.add_argument("--all", action="store_true", help="every configured VM")
    p.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="VMs with this tag (repeatable)"
    )
    p.add_argument(
        "--hypervisor",
        action="append",
        default=[],
        metavar="NAME",
        help="VMs on this [hypervisors.NAME] (repeatable)",
    )
    p.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="NAME",
        help="the VM NAME, or every VM with tag NAME (repeatable; for systemd's %%i)",
    )
    p.add_argument("--exclude", action="append", default=[], metavar="VM", help="leave this VM out")
    p.add_argument(
        "--parallel",
        type=_positive,
        default=4,
        metavar="N",
        help="work on up to N VMs at once (default 4; [hypervisors.X] max_parallel applies too)",
    )
    p.set_defaults(default_all=default_all)


def main(argv: Sequence[str] | None = None) -> int:
    """Every line snapcoord prints shows control characters as escapes (names come from
    hypervisors, guests and files: a terminal escape sequence in one is never executed). On a
    stream that is not a terminal every line starts with the time (docs/fleet.md, Output):
    stderr's always, stdout's unless it is for a program (``--json``, ``config example``)."""
    out, err = sys.stdout, sys.stderr
    stamped_out = StampedStream(out, on=False)  # on once the arguments say what it is for
    stamped_err = StampedStream(err, on=not is_terminal(err))
    # a StampedStream is a text stream by its methods
    sys.stdout = PrintableStream(cast(TextIO, stamped_out))
    sys.stderr = PrintableStream(cast(TextIO, stamped_err))
    try:
        return _main(argv, stamped_out)
    finally:
        sys.stdout, sys.stderr = out, err


def _for_programs(args: argparse.Namespace) -> bool:
    """Whether stdout is read by a program: JSON, or the example configuration."""
    return bool(getattr(args, "json", False)) or (
        args.command == "config" and args.action == "example"
    )


def _main(argv: Sequence[str] | None, stamped_out: StampedStream) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help, --version: printed unstamped, exit here
    stamped_out.on = not is_terminal(stamped_out.raw) and not _for_programs(args)
    handler = LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("snapcoord: %(levelname)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose or args.debug else logging.WARNING,
        handlers=[handler],
    )
    from snapcoord import commands

    try:
        code = int(commands.COMMANDS[args.command](args))
        commands.write_metrics_file(args)
        return code
    except SnapcoordError as exc:
        commands.write_metrics_file(args)
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, ConfigError):
            lines = [f"{exc.source}: {p}" if exc.source else p for p in exc.problems]
        else:
            lines = [str(exc)]
        for line in lines:
            print(f"snapcoord: error: {line}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("snapcoord: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

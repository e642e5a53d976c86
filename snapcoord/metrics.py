"""The Prometheus textfile (``[defaults] metrics_file``) for node_exporter's textfile collector:
every configured VM's last run (from ``last-run.json``) and snapcoord's own snapshots as last
seen (the inventory), rewritten atomically after every command. docs/monitoring.md lists the
metrics.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from snapcoord import inventory
from snapcoord.config import Config
from snapcoord.inventory import Inventory
from snapcoord.status import LastRun, read_last_run
from snapcoord.verify import record as verify_record
from snapcoord.verify.record import VerifyRecord

log = logging.getLogger("snapcoord")

PREFIX = "snapcoord_"


@dataclass
class Family:
    name: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, labels: dict[str, str], value: float | None) -> None:
        if value is not None:
            self.samples.append((labels, float(value)))


def _families() -> dict[str, Family]:
    specs = [
        ("last_run_timestamp_seconds", "Unix time the VM's last run ended."),
        ("last_run_success", "1 if the VM's last run succeeded, else 0."),
        ("last_run_exit_code", "Exit code of the VM's last run (docs/exit-codes.md)."),
        ("last_run_duration_seconds", "Duration of the VM's last run."),
        (
            "last_run_service_window_seconds",
            "Service window of the VM's last run: first service stopped to last one running "
            "again (absent when no service was stopped or one may still be down).",
        ),
        ("last_run_dump_bytes", "Size of the database dump the VM's last run stored."),
        (
            "last_backup_application_consistent",
            "vzdump backup-end of a QEMU VM: 1 if its services were stopped (or commits held) "
            "across the guest agent's freeze, else 0 (docs/fsfreeze-hook.md).",
        ),
        (
            "last_verify_success",
            "1 if the VM's last verify proved its dump (or, what=boot, its snapshot) good, else 0 "
            "(also when it could not run: see the exit code; docs/verify.md).",
        ),
        ("last_verify_timestamp_seconds", "Unix time the VM's last verify ended."),
        ("verify_seconds", "Duration of the VM's last verify."),
        ("snapshots", "Number of snapcoord's own snapshots of the VM, as last seen."),
        (
            "snapshots_seen_timestamp_seconds",
            "Unix time snapcoord last listed the VM's snapshots on the hypervisor.",
        ),
        (
            "oldest_snapshot_timestamp_seconds",
            "Creation time of the VM's oldest snapcoord snapshot.",
        ),
        (
            "newest_snapshot_timestamp_seconds",
            "Creation time of the VM's newest snapcoord snapshot.",
        ),
        (
            "oldest_snapshot_age_seconds",
            "Age of the VM's oldest snapcoord snapshot when this file was written.",
        ),
    ]
    return {name: Family(PREFIX + name, text) for name, text in specs}


def render(config: Config, *, now: float | None = None) -> str:
    """The textfile's content: samples for every configured VM that has data."""
    now = time.time() if now is None else now
    families = _families()
    for key in config.vms:
        vm = {"vm": key}
        last = read_last_run(config.store, key)
        if last is not None:
            _add_last_run(families, vm, last)
        verified = verify_record.read_last(config.store, key)
        if verified is not None:
            _add_verify(families, vm, verified)
        seen = inventory.read(config.store, key)
        if seen is not None:
            _add_inventory(families, vm, seen, now)
    return "".join(_format(f) for f in families.values() if f.samples)


def _add_last_run(families: dict[str, Family], vm: dict[str, str], last: LastRun) -> None:
    labels = {**vm, "command": last.command}
    families["last_run_timestamp_seconds"].add(labels, last.ended)
    families["last_run_success"].add(labels, 1 if last.ok else 0)
    families["last_run_exit_code"].add(labels, last.exit_code)
    families["last_run_duration_seconds"].add(labels, last.duration_seconds)
    families["last_run_service_window_seconds"].add(labels, last.window_seconds)
    families["last_run_dump_bytes"].add(labels, last.dump_bytes)
    if last.application_consistent is not None:
        families["last_backup_application_consistent"].add(
            vm, 1 if last.application_consistent else 0
        )


def _add_verify(families: dict[str, Family], vm: dict[str, str], found: VerifyRecord) -> None:
    labels = {**vm, "what": found.what}
    families["last_verify_success"].add(labels, 1 if found.verified else 0)
    families["last_verify_timestamp_seconds"].add(labels, found.finished)
    families["verify_seconds"].add(labels, found.seconds)


def _add_inventory(
    families: dict[str, Family], vm: dict[str, str], seen: Inventory, now: float
) -> None:
    families["snapshots"].add(vm, seen.count)
    families["snapshots_seen_timestamp_seconds"].add(vm, _epoch(seen.seen_at))
    oldest = _epoch(seen.oldest)
    families["oldest_snapshot_timestamp_seconds"].add(vm, oldest)
    families["newest_snapshot_timestamp_seconds"].add(vm, _epoch(seen.newest))
    families["oldest_snapshot_age_seconds"].add(vm, None if oldest is None else now - oldest)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _format(family: Family) -> str:
    lines = [f"# HELP {family.name} {escape_help(family.help)}", f"# TYPE {family.name} gauge"]
    for labels, value in family.samples:
        lines.append(f"{family.name}{{{_labels(labels.items())}}} {_value(value)}")
    return "\n".join(lines) + "\n"


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{escape_label(value)}"' for name, value in pairs)


def escape_label(value: str) -> str:
    """A label value in the text exposition format: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(value: float) -> str:
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(round(value, 6))


def write_metrics(config: Config, *, now: float | None = None) -> None:
    """Rewrite ``[defaults] metrics_file`` (no-op when unset): a temporary file in the same
    folder, then ``os.replace``, so the collector never reads half a file. A failure to write is
    a warning (logged), never a failed command."""
    target = config.defaults.metrics_file
    if target is None:
        return
    try:
        write_atomic(Path(target), render(config, now=now))
    except OSError as exc:
        log.warning("cannot write metrics file %s: %s", target, exc.strerror or exc)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through an unpredictable temporary file created exclusively
    in the same folder (``mkstemp``: ``O_EXCL``, so it never opens a link someone planted in a
    folder others may write, such as node_exporter's), then rename it into place (a rename
    replaces a link at ``path`` instead of writing through it)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o644)  # readable by node_exporter whatever the umask
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

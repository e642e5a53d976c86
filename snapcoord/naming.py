"""Snapshot names and descriptions.

Names are ``snapcoord-<label>-<UTC YYYYMMDDTHHMMSSZ>``: at most 40 characters and valid on every
hypervisor (Proxmox: ``^[A-Za-z][A-Za-z0-9_-]+$``, max 40). Descriptions start with the marker;
only snapshots carrying it are ever pruned.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

from snapcoord.adapters.base import MARKER
from snapcoord.errors import UsageError
from snapcoord.schema import LABEL_RE

PREFIX = "snapcoord"
# fullmatch, never "$": that also matches before a trailing newline
NAME_RE = re.compile(r"snapcoord-(?P<label>[A-Za-z0-9_]{1,13})-(?P<stamp>\d{8}T\d{6}Z)")
PROXMOX_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]+")
MAX_LENGTH = 40
#: what :func:`new_run_id` makes: 20261206T152236Z-9fb132
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


def snapshot_name(label: str, when: datetime | None = None) -> str:
    if not LABEL_RE.fullmatch(label):
        raise UsageError(
            f"label {label!r} is invalid",
            hint="use 1-13 letters, digits or '_', starting with a letter or digit",
        )
    stamp = (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{PREFIX}-{label}-{stamp}"
    assert len(name) <= MAX_LENGTH and PROXMOX_NAME_RE.fullmatch(name), name
    return name


def parse_name(name: str) -> tuple[str, datetime] | None:
    """``(label, time)`` of a snapcoord snapshot name, None for any other name."""
    match = NAME_RE.fullmatch(name)
    if not match:
        return None
    try:
        when = datetime.strptime(match["stamp"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:  # an impossible date (month 13): not a name snapcoord wrote
        return None
    return match["label"], when


def description(label: str, run_id: str, *, extra: str = "") -> str:
    text = f"{MARKER} label={label} run={run_id}"
    return f"{text} {extra}".strip()


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)

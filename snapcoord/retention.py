"""Which of a VM's own snapshots a retention policy keeps, and why (docs/retention.md).

Pure functions, no I/O. :func:`decide` takes the snapshots of one VM and one label; the rules
work like sanoid's and borg's ``prune``: ``keep_last`` keeps the N newest, each calendar rule
(hourly, daily, ISO-weekly, monthly) keeps the newest snapshot of each of the N most recent
buckets that hold a snapshot. Rules apply independently; a snapshot kept by any rule is kept.
The newest snapshot and the one the VM runs from are always kept. Whatever it keeps, pruning
the kept set again keeps all of it (the decision is idempotent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo

from snapcoord.adapters.base import Snapshot
from snapcoord.naming import parse_name
from snapcoord.settings import RetentionPolicy

#: calendar rule -> the bucket a local time falls in (also its name in the reasons)
BUCKETS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%dT%H"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2]),
    "monthly": lambda t: t.strftime("%Y-%m"),
}


@dataclass(frozen=True)
class Item:
    """One restore point of a VM and label: a snapshot or a run folder in the store."""

    name: str
    time: datetime  # timezone-aware
    current: bool = False  # the VM runs from it


@dataclass(frozen=True)
class Decision:
    name: str
    time: datetime
    keep: bool
    reasons: tuple[str, ...]  # every rule that keeps it ("newest", "last 1", "daily 2026-11-30")


def _newest_first(items: Iterable[Item]) -> list[Item]:
    return sorted(items, key=lambda item: (item.time, item.name), reverse=True)


def _calendar(ordered: list[Item], rule: str, count: int, tz: tzinfo | None) -> dict[str, str]:
    """name -> reason: the newest item of each of the ``count`` most recent non-empty buckets."""
    bucket_of = BUCKETS[rule]
    kept: dict[str, str] = {}
    seen: set[str] = set()
    for item in ordered:
        if len(seen) == count:
            break
        bucket = bucket_of(item.time.astimezone(tz))
        if bucket not in seen:  # newest first: the first one met is the bucket's newest
            seen.add(bucket)
            kept[item.name] = f"{rule} {bucket}"
    return kept


def decide(
    items: Iterable[Item], policy: RetentionPolicy, *, tz: tzinfo | None = None
) -> list[Decision]:
    """Keep or delete each item (one VM, one label), newest first. ``tz``: the zone calendar
    buckets are counted in (None: the local zone). Only call it with a configured policy: with
    every rule off it would keep nothing but the newest."""
    assert policy.configured, "a policy with every rule off prunes nothing"
    ordered = _newest_first(items)
    reasons: dict[str, list[str]] = {item.name: [] for item in ordered}
    if ordered:
        reasons[ordered[0].name].append("newest")
    for item in ordered:
        if item.current:
            reasons[item.name].append("current")
    for rank, item in enumerate(ordered[: policy.keep_last], start=1):
        reasons[item.name].append(f"last {rank}")
    for rule in BUCKETS:
        count: int = getattr(policy, f"keep_{rule}")
        for name, reason in _calendar(ordered, rule, count, tz).items():
            reasons[name].append(reason)
    return [
        Decision(item.name, item.time, bool(reasons[item.name]), tuple(reasons[item.name]))
        for item in ordered
    ]


def own_snapshots(snapshots: Iterable[Snapshot]) -> dict[str, list[Item]]:
    """snapcoord's own snapshots (the description marker and the name pattern) by label; the
    time is the name's stamp. Everything else is foreign and never appears here."""
    groups: dict[str, list[Item]] = {}
    for snapshot in snapshots:
        parsed = parse_name(snapshot.name)
        if parsed is None or not snapshot.is_snapcoord:
            continue
        label, when = parsed
        groups.setdefault(label, []).append(Item(snapshot.name, when, snapshot.current))
    return groups


def decide_groups(
    groups: dict[str, list[Item]], policy: RetentionPolicy, *, tz: tzinfo | None = None
) -> list[Decision]:
    """:func:`decide` per label; all decisions, oldest first."""
    decisions = [d for items in groups.values() for d in decide(items, policy, tz=tz)]
    return sorted(decisions, key=lambda d: (d.time, d.name))


def decide_snapshots(
    snapshots: Iterable[Snapshot], policy: RetentionPolicy, *, tz: tzinfo | None = None
) -> list[Decision]:
    """The decisions on a VM's own snapshots, oldest first (foreign ones are never in it)."""
    return decide_groups(own_snapshots(snapshots), policy, tz=tz)

"""The retention policy function: property-based against a straightforward reference, and crafted
timelines with exact expected names (UTC, a DST zone, several labels, foreign snapshots)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapcoord.adapters.base import MARKER, Snapshot
from snapcoord.naming import snapshot_name
from snapcoord.retention import Decision, Item, decide, decide_snapshots, own_snapshots
from snapcoord.settings import RetentionPolicy

BERLIN = ZoneInfo("Europe/Berlin")
ZONES: list[tzinfo] = [
    UTC,
    BERLIN,
    ZoneInfo("America/New_York"),
    ZoneInfo("Australia/Lord_Howe"),  # half-hour DST shift
    ZoneInfo("Asia/Kathmandu"),  # +05:45
]
START = datetime(2025, 1, 1, tzinfo=UTC)
RULES = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly")


# -- the reference: group by bucket, take each bucket's newest, the N buckets newest first ---------


def _order(item: Item) -> tuple[datetime, str]:
    return item.time, item.name


def _reference_bucket(rule: str, when: datetime, zone: tzinfo) -> Hashable:
    local = when.astimezone(zone)
    return {
        "keep_hourly": (local.year, local.month, local.day, local.hour),
        "keep_daily": (local.year, local.month, local.day),
        "keep_weekly": tuple(local.isocalendar())[:2],
        "keep_monthly": (local.year, local.month),
    }[rule]


def reference_kept(items: list[Item], rule: str, count: int, zone: tzinfo) -> set[str]:
    """What ``rule = count`` alone keeps, besides the newest and the current one."""
    if rule == "keep_last":
        return {i.name for i in sorted(items, key=_order, reverse=True)[:count]}
    buckets: dict[Hashable, list[Item]] = defaultdict(list)
    for item in items:
        buckets[_reference_bucket(rule, item.time, zone)].append(item)
    newest_each = sorted((max(group, key=_order) for group in buckets.values()), key=_order)
    return {i.name for i in newest_each[::-1][:count]}


def always_kept(items: list[Item]) -> set[str]:
    if not items:
        return set()
    return {max(items, key=_order).name} | {i.name for i in items if i.current}


def kept(decisions: list[Decision]) -> set[str]:
    return {d.name for d in decisions if d.keep}


# -- strategies ------------------------------------------------------------------------------------


@st.composite
def timelines(draw: st.DrawFn) -> list[Item]:
    """Up to 60 items within ~3 years, dense or sparse, ties allowed, at most one current."""
    scale = draw(st.sampled_from([600, 3600, 86400, 7 * 86400]))  # seconds per step
    offsets = draw(st.lists(st.integers(0, 160), max_size=60))
    jitter = draw(st.lists(st.integers(0, scale - 1), min_size=len(offsets), max_size=len(offsets)))
    times = [START + timedelta(seconds=o * scale + j) for o, j in zip(offsets, jitter, strict=True)]
    current = draw(st.one_of(st.none(), st.integers(0, max(len(times) - 1, 0))))
    return [Item(f"s{i:03d}", t, current == i) for i, t in enumerate(times)]


def policies(rules: tuple[str, ...] = RULES) -> st.SearchStrategy[RetentionPolicy]:
    values = {rule: st.integers(0, 8) if rule in rules else st.just(0) for rule in RULES}
    return st.builds(RetentionPolicy, **values).filter(lambda p: p.configured)


zones = st.sampled_from(ZONES)


# -- properties ------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(timelines(), policies(), zones)
def test_never_deletes_the_newest_nor_the_current_one(
    items: list[Item], policy: RetentionPolicy, zone: tzinfo
) -> None:
    decisions = decide(items, policy, tz=zone)
    assert {d.name for d in decisions} == {i.name for i in items}
    assert always_kept(items) <= kept(decisions)
    for d in decisions:
        assert d.keep == bool(d.reasons)
    if items:
        newest = max(items, key=_order)
        assert decisions[0].name == newest.name and decisions[0].reasons[0] == "newest"


@settings(max_examples=300)
@given(timelines(), policies(), zones)
def test_idempotent_pruning_the_kept_set_keeps_all_of_it(
    items: list[Item], policy: RetentionPolicy, zone: tzinfo
) -> None:
    first = decide(items, policy, tz=zone)
    remaining = [i for i in items if i.name in kept(first)]
    second = decide(remaining, policy, tz=zone)
    assert all(d.keep for d in second)
    assert {d.name: d.reasons for d in second} == {d.name: d.reasons for d in first if d.keep}


@settings(max_examples=200)
@given(timelines(), policies(), zones, st.data())
def test_any_set_between_kept_and_all_gives_the_same_decision(
    items: list[Item], policy: RetentionPolicy, zone: tzinfo, data: st.DataObject
) -> None:
    """A delete that failed (the snapshot stays) never changes what the others get."""
    first = kept(decide(items, policy, tz=zone))
    extra = data.draw(st.sets(st.sampled_from([i.name for i in items]))) if items else set()
    subset = [i for i in items if i.name in first | extra]
    assert kept(decide(subset, policy, tz=zone)) == first


@settings(max_examples=300)
@given(timelines(), st.integers(1, 12), zones)
def test_keep_last_alone_keeps_exactly_the_n_newest(
    items: list[Item], count: int, zone: tzinfo
) -> None:
    decisions = decide(items, RetentionPolicy(keep_last=count), tz=zone)
    newest = sorted(items, key=_order, reverse=True)[:count]
    assert kept(decisions) == {i.name for i in newest} | always_kept(items)
    assert len([d for d in decisions if any(r.startswith("last ") for r in d.reasons)]) == min(
        count, len(items)
    )


@pytest.mark.parametrize("rule", RULES[1:])
@settings(max_examples=200)
@given(items=timelines(), count=st.integers(1, 12), zone=zones)
def test_each_calendar_rule_alone_keeps_the_newest_of_the_last_n_buckets(
    rule: str, items: list[Item], count: int, zone: tzinfo
) -> None:
    decisions = decide(items, RetentionPolicy(**{rule: count}), tz=zone)
    expected = reference_kept(items, rule, count, zone)
    assert kept(decisions) == expected | always_kept(items)
    word = rule.removeprefix("keep_")
    by_rule = {d.name for d in decisions if any(r.startswith(word + " ") for r in d.reasons)}
    assert by_rule == expected


@settings(max_examples=300)
@given(timelines(), policies(), zones)
def test_combined_rules_keep_the_union_of_each_rule_alone(
    items: list[Item], policy: RetentionPolicy, zone: tzinfo
) -> None:
    combined = decide(items, policy, tz=zone)
    union = always_kept(items)
    for rule in RULES:
        count = getattr(policy, rule)
        if count:
            union |= reference_kept(items, rule, count, zone)
            alone = decide(items, RetentionPolicy(**{rule: count}), tz=zone)
            union |= kept(alone)
    assert kept(combined) == union


# -- crafted timelines -----------------------------------------------------------------------------


def hourly(start: datetime, hours: int, label: str = "nightly") -> list[Item]:
    return [
        Item(snapshot_name(label, start + timedelta(hours=h)), start + timedelta(hours=h))
        for h in range(hours)
    ]


def stamp(text: str, label: str = "nightly") -> str:
    return snapshot_name(label, datetime.fromisoformat(text).replace(tzinfo=UTC))


def test_hourly_snapshots_over_40_days_daily_7_weekly_4_monthly_2() -> None:
    items = hourly(datetime(2026, 10, 25, tzinfo=UTC), 40 * 24)  # to 2026-12-03 23:00 UTC
    policy = RetentionPolicy(keep_daily=7, keep_weekly=4, keep_monthly=2)
    decisions = decide(items, policy, tz=UTC)
    got = {d.name: d.reasons for d in decisions if d.keep}
    assert got == {
        stamp("2026-12-03T23:00"): (
            "newest",
            "daily 2026-12-03",
            "weekly 2026-W49",
            "monthly 2026-12",
        ),
        stamp("2026-12-02T23:00"): ("daily 2026-12-02",),
        stamp("2026-12-01T23:00"): ("daily 2026-12-01",),
        stamp("2026-11-30T23:00"): ("daily 2026-11-30", "monthly 2026-11"),
        stamp("2026-11-29T23:00"): ("daily 2026-11-29", "weekly 2026-W48"),
        stamp("2026-11-28T23:00"): ("daily 2026-11-28",),
        stamp("2026-11-27T23:00"): ("daily 2026-11-27",),
        stamp("2026-11-22T23:00"): ("weekly 2026-W47",),
        stamp("2026-11-15T23:00"): ("weekly 2026-W46",),
    }
    assert len(decisions) == 960
    assert all(d.keep for d in decide([i for i in items if i.name in got], policy, tz=UTC))


def test_keep_last_and_hourly_reasons() -> None:
    items = hourly(datetime(2026, 11, 30, 10, tzinfo=UTC), 4)  # 10:00 .. 13:00
    items += [Item(stamp("2026-11-30T13:30"), datetime(2026, 11, 30, 13, 30, tzinfo=UTC))]
    decisions = decide(items, RetentionPolicy(keep_last=2, keep_hourly=3), tz=UTC)
    assert [(d.name[-16:], d.reasons) for d in decisions] == [
        ("20261130T133000Z", ("newest", "last 1", "hourly 2026-11-30T13")),
        ("20261130T130000Z", ("last 2",)),
        ("20261130T120000Z", ("hourly 2026-11-30T12",)),
        ("20261130T110000Z", ("hourly 2026-11-30T11",)),
        ("20261130T100000Z", ()),
    ]


def test_buckets_are_counted_in_the_given_zone() -> None:
    """22:30 and 23:30 UTC are one UTC day but two days in Berlin (UTC+1 in winter)."""
    times = ["2026-11-29T12:00", "2026-11-30T22:30", "2026-11-30T23:30"]
    items = [Item(stamp(t), datetime.fromisoformat(t).replace(tzinfo=UTC)) for t in times]
    policy = RetentionPolicy(keep_daily=2)
    utc = {d.name: d.reasons for d in decide(items, policy, tz=UTC) if d.keep}
    berlin = {d.name: d.reasons for d in decide(items, policy, tz=BERLIN) if d.keep}
    assert utc == {
        stamp(times[2]): ("newest", "daily 2026-11-30"),
        stamp(times[0]): ("daily 2026-11-29",),
    }
    assert berlin == {
        stamp(times[2]): ("newest", "daily 2026-12-01"),
        stamp(times[1]): ("daily 2026-11-30",),
    }


def test_dst_fall_back_the_repeated_hour_is_one_bucket() -> None:
    """Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC). The wall-clock hour 02 is
    two real hours long and counts once; hour 01 is the next bucket back."""
    times = ["2026-10-24T23:50", "2026-10-25T00:10", "2026-10-25T00:50", "2026-10-25T01:50"]
    items = [Item(stamp(t), datetime.fromisoformat(t).replace(tzinfo=UTC)) for t in times]
    policy = RetentionPolicy(keep_hourly=2)
    berlin = {d.name: d.reasons for d in decide(items, policy, tz=BERLIN) if d.keep}
    assert berlin == {
        stamp(times[3]): ("newest", "hourly 2026-10-25T02"),
        stamp(times[0]): ("hourly 2026-10-25T01",),
    }
    utc = {d.name: d.reasons for d in decide(items, policy, tz=UTC) if d.keep}
    assert utc == {
        stamp(times[3]): ("newest", "hourly 2026-10-25T01"),
        stamp(times[2]): ("hourly 2026-10-25T00",),
    }


def test_iso_weeks_across_a_year_boundary() -> None:
    """2026-12-31 (Thursday) and 2027-01-03 (Sunday) are both ISO week 2026-W53."""
    times = ["2026-12-27T12:00", "2026-12-31T12:00", "2027-01-03T12:00", "2027-01-04T12:00"]
    items = [Item(stamp(t), datetime.fromisoformat(t).replace(tzinfo=UTC)) for t in times]
    got = {d.name: d.reasons for d in decide(items, RetentionPolicy(keep_weekly=3), tz=UTC)}
    assert got[stamp(times[3])] == ("newest", "weekly 2027-W01")
    assert got[stamp(times[2])] == ("weekly 2026-W53",)
    assert got[stamp(times[1])] == ()
    assert got[stamp(times[0])] == ("weekly 2026-W52",)


def test_current_snapshot_is_kept_whatever_the_rules() -> None:
    items = hourly(datetime(2026, 11, 1, tzinfo=UTC), 10)
    items[2] = Item(items[2].name, items[2].time, current=True)
    decisions = {d.name: d for d in decide(items, RetentionPolicy(keep_last=1), tz=UTC)}
    assert decisions[items[2].name].reasons == ("current",)
    assert kept(list(decisions.values())) == {items[2].name, items[9].name}


def test_empty_and_unconfigured() -> None:
    assert decide([], RetentionPolicy(keep_last=1)) == []
    with pytest.raises(AssertionError):
        decide([], RetentionPolicy())


def test_default_zone_is_the_local_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9: 20:00 UTC is the next day
    time.tzset()
    try:
        when = datetime(2026, 11, 30, 20, tzinfo=UTC)
        (decision,) = decide([Item("a", when)], RetentionPolicy(keep_daily=1))
        assert decision.reasons == ("newest", "daily 2026-12-01")
    finally:
        monkeypatch.undo()
        time.tzset()


# -- the group helper: own snapshots only, per label ----------------------------------------------


def snap(name: str, description: str = f"{MARKER} label=x run=1") -> Snapshot:
    return Snapshot(name=name, id=name, created=None, description=description)


def test_group_helper_counts_per_label_and_never_lists_foreign_snapshots() -> None:
    nightly = [stamp(f"2026-11-{d:02d}T01:00") for d in range(1, 6)]
    weekly = [stamp(f"2026-11-{d:02d}T02:00", "weekly") for d in (1, 8)]
    foreign = [
        snap("before-upgrade", description="manual"),  # no marker, foreign name
        snap("before-upgrade2"),  # marker, foreign name
        snap(stamp("2026-10-01T00:00"), description="copied by hand"),  # pattern, no marker
        snap("snapcoord-nightly-2026", description=f"{MARKER} x"),  # almost the pattern
    ]
    snapshots = [*foreign, *(snap(n) for n in nightly + weekly)]
    groups = own_snapshots(snapshots)
    assert {label: [i.name for i in items] for label, items in groups.items()} == {
        "nightly": nightly,
        "weekly": weekly,
    }
    decisions = decide_snapshots(snapshots, RetentionPolicy(keep_last=2), tz=UTC)
    assert [d.name for d in decisions] == sorted(nightly + weekly, key=lambda n: n[-16:])
    assert kept(decisions) == {nightly[3], nightly[4], *weekly}
    assert {s.name for s in foreign}.isdisjoint(d.name for d in decisions)


def test_group_helper_takes_the_time_from_the_name_and_the_current_flag() -> None:
    names = [stamp(f"2026-11-{d:02d}T01:00") for d in range(1, 4)]
    created = datetime(2030, 1, 1, tzinfo=UTC)  # the hypervisor's clock is not what counts
    snapshots = [
        Snapshot(n, n, created, f"{MARKER} run", current=(i == 0)) for i, n in enumerate(names)
    ]
    decisions = decide_snapshots(snapshots, RetentionPolicy(keep_last=1), tz=UTC)
    assert [(d.name, d.reasons) for d in decisions] == [
        (names[0], ("current",)),
        (names[1], ()),
        (names[2], ("newest", "last 1")),
    ]

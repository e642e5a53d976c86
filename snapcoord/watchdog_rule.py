"""How long the guest watchdog must wait at least: it must not fire before the stops can end.

The watchdog is armed right before the first stop. If it fired while a stop was still allowed to
run, it would start the services in the middle of the run. So ``watchdog_seconds`` must outlast
the longest the stops may take, by their timeouts:

- the services: one ``stop_timeout`` when ``parallel_services`` (they stop together), else one
  per service in ``services``;
- then the database: one ``stop_timeout``, when ``consistency = "stop"`` and ``database`` is not
  ``"none"`` (``restore-dump``, and ``"pause"`` mode, stop no database).

``watchdog_seconds`` must be more than their sum.

The dump, ``frozen`` hooks, the snapshot call and the starts are not counted: their timeouts are
generous caps (``dump_timeout`` 1 h, ``snapshot_timeout`` 10 min by default) and a watchdog that
long would leave services down that long after a crash. A watchdog that fires during them is
still caught: the run checks that nothing it stopped runs again before the snapshot (exit 4, no
snapshot) and finds the watchdog gone when disarming it (docs/configuration.md).
"""

from __future__ import annotations

import math

from snapcoord.settings import GuestConfig


def stops_seconds(guest: GuestConfig) -> float:
    """The longest the stops of one run may take, by their timeouts."""
    services = guest.services
    count = (1 if services else 0) if guest.parallel_services else len(services)
    if guest.consistency == "stop" and guest.database != "none":
        count += 1
    return count * guest.stop_timeout


def minimum_watchdog(guest: GuestConfig) -> int:
    """The shortest ``watchdog_seconds`` the rule accepts (a whole number of seconds more
    than the stops can take)."""
    return math.floor(stops_seconds(guest)) + 1


def watchdog_problem(guest: GuestConfig, path: str) -> str | None:
    """One line when ``watchdog_seconds`` fires before the stops can end (``path``: the guest
    table's key path, ``vms.db1.guest``), else None."""
    need = minimum_watchdog(guest)
    if guest.watchdog_seconds >= need:
        return None
    stops = stops_seconds(guest)
    parts = []
    if guest.services:
        names = ", ".join(guest.services)
        how = "together" if guest.parallel_services else "in turn"
        parts.append(names if len(guest.services) == 1 else f"{names} ({how})")
    if guest.consistency == "stop" and guest.database != "none":
        parts.append("the database")
    return (
        f"{path}.watchdog_seconds: {guest.watchdog_seconds} s fires before the stops can end "
        f"(stop_timeout {guest.stop_timeout:g} s for {' then '.join(parts)}: {stops:g} s); "
        f"set watchdog_seconds to at least {need} or lower stop_timeout"
    )

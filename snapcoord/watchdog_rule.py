"""TEMPORARY (lead): replaced by the edges helper's rule at merge."""

from __future__ import annotations

from snapcoord.settings import VMConfig


def watchdog_problem(vm_cfg: VMConfig) -> tuple[str, str] | None:
    guest = vm_cfg.guest
    if guest is None:
        return None
    rounds = 1 if guest.parallel_services else max(1, len(guest.services))
    stops = guest.stop_timeout * rounds + (guest.stop_timeout if guest.database != "none" else 0)
    if guest.watchdog_seconds > stops:
        return None
    return (
        f"watchdog_seconds ({guest.watchdog_seconds} s) fires before the stops can end "
        f"({stops:g} s of stop_timeout)",
        f"set watchdog_seconds above {stops:g}, or lower stop_timeout",
    )

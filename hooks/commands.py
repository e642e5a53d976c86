"""The admin's own guest commands: ``[vms.X.hooks] before / frozen / after``.

They come from the configuration file (trusted, written by the admin), so each runs as one
``sh -c`` command line in the guest, with a timeout; the first failure stops the phase.
"""

from __future__ import annotations

from collections.abc import Sequence

from snapcoord.errors import GuestError
from snapcoord.guest import GuestUnreachable, Transport


def run_hooks(
    transport: Transport, hooks: Sequence[str], *, phase: str, vm: str, sudo: bool, timeout: float
) -> None:
    for index, command in enumerate(hooks, 1):
        try:
            result = transport.run(["sh", "-c", command], sudo=sudo, timeout=timeout)
        except GuestUnreachable as exc:
            raise type(exc)(f"{phase} hook #{index}: {exc.message}", vm=vm) from exc
        if result.timed_out:
            raise GuestError(f"{phase} hook #{index} timed out after {timeout:g} s", vm=vm)
        if not result.ok:
            raise GuestError(
                f"{phase} hook #{index} failed (exit {result.returncode}): {result.error_text()}",
                vm=vm,
            )

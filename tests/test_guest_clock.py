"""snapcoord/guest_clock.py: the guest clock after a revert, with a fake guest whose clock is
off (the real one: tests/test_realvm.py, after a RAM revert of a real Debian guest)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from snapcoord import guest_clock
from snapcoord.adapters.base import VM
from snapcoord.errors import GuestError
from snapcoord.shell import Completed

VM_ = VM(name="db1", id="1", hypervisor="lab")


class FakeGuest:
    """A guest whose clock is ``skew`` s off; ``date -s`` works only with sudo (or not at all)."""

    def __init__(self, skew: float, *, settable: bool = True) -> None:
        self.skew = skew
        self.settable = settable
        self.commands: list[tuple[tuple[str, ...], bool]] = []

    def run(
        self, argv: Sequence[str], *, sudo: bool = False, timeout: float, **_: Any
    ) -> Completed:
        argv = tuple(argv)
        self.commands.append((argv, sudo))
        if argv == ("date", "+%s.%N"):
            return Completed(argv, 0, f"{time.time() + self.skew:.9f}\n".encode(), b"", 0.001)
        if argv[:4] == ("sh", "-c", guest_clock.SET_CLOCK, "sh") and len(argv) == 5:
            if not (sudo and self.settable):
                return Completed(argv, 1, b"", b"date: cannot set date: Operation not permitted", 0)
            self.skew = time.time() - float(argv[4].removeprefix("@"))
            return Completed(argv, 0, b"", b"", 0.001)
        return Completed(argv, 127, b"", b"sh: not found", 0.001)


class FakeAdapter:
    def __init__(self, guest: FakeGuest | None) -> None:
        self.guest = guest  # None: this hypervisor cannot set the guest time
        self.calls = 0

    def set_guest_time(self, vm: VM, epoch: float) -> bool:
        self.calls += 1
        if self.guest is None:
            return False
        self.guest.skew = time.time() - epoch
        return True


def sync(adapter: FakeAdapter, guest: FakeGuest, sudo: bool = True) -> str | None:
    return guest_clock.sync_after_revert(
        adapter,  # type: ignore[arg-type]
        VM_,
        guest,  # type: ignore[arg-type]
        vm_key="db1",
        sudo=sudo,
        timeout=5,
    )


def test_a_right_clock_is_left_alone() -> None:
    guest = FakeGuest(0.3)
    adapter = FakeAdapter(guest)
    assert sync(adapter, guest) is None
    assert adapter.calls == 0
    assert [argv for argv, _ in guest.commands] == [("date", "+%s.%N")]


def test_the_hypervisor_sets_it_when_it_can() -> None:
    guest = FakeGuest(-43.0)
    adapter = FakeAdapter(guest)
    note = sync(adapter, guest)
    assert note == "the guest clock was -43.0 s off after the revert: set through the " \
        "hypervisor's guest agent"  # fmt: skip
    assert abs(guest.skew) < 1
    assert not any(argv[:3] == ("sh", "-c", guest_clock.SET_CLOCK) for argv, _ in guest.commands)


def test_a_hypervisor_call_without_effect_falls_back_to_date_in_the_guest() -> None:
    """libvirt's setTime can return without an agent having set anything."""

    class NoEffect(FakeAdapter):
        def set_guest_time(self, vm: VM, epoch: float) -> bool:
            self.calls += 1
            return True

    guest = FakeGuest(-43.0)
    adapter = NoEffect(guest)
    note = sync(adapter, guest)
    assert adapter.calls == 1
    assert note is not None and "set with date in the guest" in note
    assert abs(guest.skew) < 1


def test_otherwise_date_in_the_guest_with_sudo() -> None:
    guest = FakeGuest(-43.0)
    note = sync(FakeAdapter(None), guest)
    assert note is not None and "set with date in the guest" in note
    assert abs(guest.skew) < 1
    assert any(
        argv[:3] == ("sh", "-c", guest_clock.SET_CLOCK) and sudo for argv, sudo in guest.commands
    )


def test_a_clock_that_cannot_be_set_is_reported_with_its_offset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guest = FakeGuest(-43.0, settable=False)
    note = sync(FakeAdapter(None), guest)
    assert note is not None
    assert note.startswith("the guest clock is -43.0 s off after the revert and could not be set")
    assert "Operation not permitted" in caplog.text


def test_an_unreadable_clock_is_a_guest_error() -> None:
    class Broken(FakeGuest):
        def run(self, argv: Sequence[str], **kw: Any) -> Completed:
            return Completed(tuple(argv), 0, b"no clock here\n", b"", 0.001)

    with pytest.raises(GuestError, match="cannot read the guest clock"):
        sync(FakeAdapter(None), Broken(0))


def test_the_clock_script_passes_the_time_to_date_as_one_argument(tmp_path: Path) -> None:
    """The script the fake guest trusts, run by a real sh with a stand-in ``date`` that
    prints its arguments (the machine's clock is never set)."""
    stand_in = tmp_path / "date"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stand_in.chmod(0o755)
    done = subprocess.run(
        ["sh", "-c", guest_clock.SET_CLOCK, "sh", "@1700000000.250"],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        check=True,
    )
    assert done.stdout.splitlines() == ["-u", "-s", "@1700000000.250"]

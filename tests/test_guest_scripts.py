"""The guest-side shell library (``hooks/guest/services.py`` ``_LIB``) under dash, Debian's
``/bin/sh``, and bash: what its functions do, independent of any service."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from snapcoord.hooks.guest.services import _LIB

SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]


def run_lib(shell: str, script: str) -> str:
    proc = subprocess.run(
        [shell, "-c", _LIB + script], capture_output=True, text=True, timeout=60, check=True
    )
    return proc.stdout.strip()


def test_dash_is_there_to_test_with() -> None:
    """Debian's /bin/sh: without it every test here would silently run under bash only."""
    assert "dash" in SHELLS


@pytest.mark.parametrize("shell", SHELLS)
def test_wait_until_counts_elapsed_time_not_polls(shell: str) -> None:
    """On a slow guest one check takes longer than the 0.05 s poll: a 1 s wait must still end
    after about 1 s (3 checks of 0.3 s), not after 20 checks."""
    out = run_lib(
        shell,
        "calls=0\n"
        "slow() { calls=$((calls + 1)); sleep 0.3; return 1; }\n"
        'wait_until 1 slow; echo "$? $calls"\n',
    )
    rc, calls = out.split()
    assert rc == "1"
    assert 2 <= int(calls) <= 4


@pytest.mark.parametrize("shell", SHELLS)
def test_wait_until_returns_as_soon_as_the_condition_holds(shell: str) -> None:
    out = run_lib(
        shell,
        "calls=0\n"
        "third() { calls=$((calls + 1)); [ $calls -ge 3 ]; }\n"
        'wait_until 5 third; echo "$? $calls"\n',
    )
    assert out.split() == ["0", "3"]


@pytest.mark.parametrize("shell", SHELLS)
def test_uptime_is_read_in_centiseconds(shell: str) -> None:
    out = run_lib(shell, 'uptime_cs; a=$up; sleep 0.3; uptime_cs; echo "$a $up"\n')
    first, second = map(int, out.split())
    with open("/proc/uptime") as f:
        now = float(f.read().split()[0])
    assert abs(first / 100 - now) < 5
    assert 25 <= second - first <= 200


@pytest.mark.parametrize("shell", SHELLS)
def test_svc_stops_and_starts_a_service_with_its_triggers_in_one_systemctl_call(
    shell: str,
) -> None:
    """Socket activation: ``mariadb.socket`` goes with ``mariadb`` in the same transaction; a
    service without triggers is called alone; sysv ignores them."""
    fake = 'systemctl() { echo "systemctl $*"; }\nservice() { echo "service $*"; }\n'
    out = run_lib(
        shell,
        fake + "TRIGGERS='mariadb mariadb.socket\napache2 a.socket b.path'\n"
        "INIT=systemd\n"
        "svc mariadb stop; svc apache2 start; svc cron stop\n"
        "INIT=sysv\nsvc mariadb stop\n"
        "INIT=systemd; TRIGGERS=\nsvc mariadb start\n",
    )
    assert out.splitlines() == [
        "systemctl stop -- mariadb.socket mariadb",
        "systemctl start -- a.socket b.path apache2",
        "systemctl stop -- cron",
        "service mariadb stop",
        "systemctl start -- mariadb",
    ]


def test_probe_triggers_keep_only_plain_unit_names() -> None:
    from snapcoord.hooks.guest.services import _probe_triggers

    text = (
        "init systemd\nsvc mariadb 1 1\ntrigger mariadb mariadb.socket\n"
        "trigger apache2 apache2@x.path\ntrigger cron $(reboot)\ntrigger cron a;b.timer\n"
    )
    assert _probe_triggers(text) == {"mariadb": ["mariadb.socket"], "apache2": ["apache2@x.path"]}

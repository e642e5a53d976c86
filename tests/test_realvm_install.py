"""The install route, the systemd units and `make demo` in the real Debian 12 guest (systemd as
PID 1, no network; tests/realvm_guest.py), as a new user on a Debian 12 host would run them:

1. a wheelhouse built here (snapcoord's wheel and its dependencies for the guest's Python),
   copied into the guest with the checkout; ``scripts/install --wheelhouse DIR`` as documented
   (docs/install.md): the command, its man page and its bash completion where they belong, the
   libvirt extra from Debian's python3-libvirt;
2. the Proxmox VE API double in the guest on loopback (HTTPS with a CA the configuration
   trusts), a VM tagged ``nightly`` bracketed over the guest's own Apache, cron and MariaDB;
   examples/systemd/snapcoord@.service and .timer installed as their header says;
   ``systemctl start snapcoord@nightly.service`` under the units' hardening: its result, its
   journal, the snapshot in the double; the timer enabled and listed;
3. ``make demo`` (offline: pip reads the wheelhouse) with Apache, cron and MariaDB running: it
   reaches the listings, and none of the three was stopped or started (same PID, same start).

The guest is shared with the other realvm modules: everything made here is removed at the end
(``scripts/install --uninstall`` included) and the services are left running.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realvm_guest import RealGuest, real_guest  # noqa: F401 - fixture
from tests.test_demo import VMS, listing, sections
from tests.test_install import checkout_files, copy_checkout

pytestmark = [pytest.mark.real, pytest.mark.realvm]

REPO = Path(__file__).resolve().parent.parent
SRC = "/root/snapcoord-install-test"  # the checkout and the wheelhouse, in the guest
WHEELHOUSE = f"{SRC}/wheelhouse"
COMPLETION = "/usr/share/bash-completion/completions/snapcoord"
SERVICES = ("apache2", "cron", "mariadb")
DOUBLE_UNIT = "snapcoord-test-pve-double"
#: the guest's Python (Debian 12): the wheelhouse is made for it, whatever runs the tests
GUEST_PYTHON = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")
PLATFORMS = ("--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64")


def build_wheelhouse(folder: Path, checkout: Path) -> list[str]:
    """snapcoord's wheel, its dependencies with the proxmox and vsphere extras, and pip,
    setuptools and wheel (`make demo` upgrades pip and builds an editable install)."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), str(checkout)], check=True)
    (wheel,) = folder.glob("snapcoord-*.whl")
    subprocess.run(
        [
            *pip,
            "download",
            "-d",
            str(folder),
            "--only-binary=:all:",
            *GUEST_PYTHON,
            *PLATFORMS,
            f"{wheel}[proxmox,vsphere]",
            *("pip", "setuptools", "wheel"),
        ],
        check=True,
    )
    return sorted(path.name for path in folder.iterdir())


def guest_sh(guest: RealGuest, script: str, timeout: float = 120) -> str:
    """Run a bash script in the guest (one connection); it must succeed; returns its stdout."""
    proc = guest.ssh("bash -euo pipefail -s", input=script, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def service_starts(guest: RealGuest) -> str:
    units = " ".join(f"{name}.service" for name in SERVICES)
    return guest_sh(guest, f"systemctl show -p Id,MainPID,ExecMainStartTimestampMonotonic {units}")


CLEANUP = f"""
systemctl disable --now snapcoord@nightly.timer 2>/dev/null || true
systemctl stop {DOUBLE_UNIT}.service 2>/dev/null || true
systemctl reset-failed snapcoord@nightly.service {DOUBLE_UNIT}.service 2>/dev/null || true
rm -f /etc/systemd/system/snapcoord@.service /etc/systemd/system/snapcoord@.timer
systemctl daemon-reload
if [ -f /etc/snapcoord/authorized_keys.orig ]; then
    cat /etc/snapcoord/authorized_keys.orig >/root/.ssh/authorized_keys
fi
if [ -x {SRC}/scripts/install ]; then {SRC}/scripts/install --uninstall; fi
rm -rf /etc/snapcoord /var/lib/snapcoord {SRC}
systemctl start {" ".join(SERVICES)}
"""


@pytest.fixture(scope="module")
def copied(real_guest: RealGuest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The checkout and a wheelhouse in the guest at SRC; everything goes again afterwards.
    Yields the wheelhouse's file names."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    wheels = build_wheelhouse(folder, copy_checkout(tmp_path_factory.mktemp("checkout")))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in checkout_files():
            tar.add(REPO / name, arcname=name)
        for wheel in wheels:
            tar.add(folder / wheel, arcname=f"wheelhouse/{wheel}")
    proc = subprocess.run(
        real_guest.ssh_argv(f"rm -rf {SRC} && mkdir {SRC} && tar -x -C {SRC}"),
        input=buffer.getvalue(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        yield wheels
    finally:
        real_guest.ssh("bash -s", input=CLEANUP, timeout=300)


def test_1_install_from_a_wheelhouse(real_guest: RealGuest, copied: list[str]) -> None:
    """The documented command, offline; then the command, its man page and completion."""
    assert any(name.startswith("snapcoord-") for name in copied)
    out = guest_sh(real_guest, f"{SRC}/scripts/install --wheelhouse {WHEELHOUSE}", timeout=900)
    assert "installed in /opt/snapcoord" in out, out
    checks = guest_sh(
        real_guest,
        """
        command -v snapcoord
        readlink /usr/local/bin/snapcoord
        snapcoord --version
        man -w snapcoord
        stat -c '%U:%G %a' /opt/snapcoord
        echo "writable by others: $(find /opt/snapcoord ! -type l -perm /022 | wc -l)"
        /opt/snapcoord/bin/python -I -c 'import libvirt, proxmoxer, pyVmomi; print("sdks ok")'
        /opt/snapcoord/bin/python -I -c 'import requests; print(requests.__file__)'
        # the completion as bash-completion loads it on the first TAB
        bash -c 'source /usr/share/bash-completion/bash_completion
                 _completion_loader snapcoord
                 complete -p snapcoord
                 t() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _snapcoord
                       echo "$* -> ${COMPREPLY[*]}"; }
                 t snapcoord sn
                 t snapcoord snapshot --t'
        """,
    ).splitlines()
    assert checks[:5] == [
        "/usr/local/bin/snapcoord",
        "/opt/snapcoord/bin/snapcoord",
        "snapcoord 0.1.0",
        "/usr/local/man/man1/snapcoord.1",  # Debian: /usr/local/man -> share/man
        "root:root 755",
    ], checks
    assert checks[5:8] == [
        "writable by others: 0",
        "sdks ok",
        "/opt/snapcoord/lib/python3.11/site-packages/requests/__init__.py",  # not Debian's
    ], checks
    assert checks[8:] == [
        "complete -F _snapcoord snapcoord",
        "snapcoord sn -> snapshot",
        "snapcoord snapshot --t -> --tag",
    ], checks


SETUP = f"""
install -d -m 700 /etc/snapcoord
cd /etc/snapcoord
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 1 -subj /CN=127.0.0.1 \\
    -addext subjectAltName=IP:127.0.0.1 -keyout pve.key -out pve.crt 2>/dev/null
secret=$(openssl rand -hex 16)
(umask 077; echo "$secret" >pve-token; echo "snapcoord@pve!realvm=$secret" >double-tokens)
# the guest bracket: root over SSH to this very machine, with a key and host key of its own
ssh-keygen -q -t ed25519 -N '' -C snapcoord-install-test -f id_ed25519
cp /root/.ssh/authorized_keys authorized_keys.orig
cat id_ed25519.pub >>/root/.ssh/authorized_keys
echo "127.0.0.1 $(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)" >known_hosts
cat >config.toml <<'TOML'
[defaults]
label = "nightly"

[hypervisors.pve]
type = "proxmox"
host = "127.0.0.1"
port = 8006
token_id = "snapcoord@pve!realvm"
token_secret = {{ file = "/etc/snapcoord/pve-token" }}
ca_file = "/etc/snapcoord/pve.crt"

[vms.guestdb]
hypervisor = "pve"
name = "db1"
tags = ["nightly"]

[vms.guestdb.guest]
transport = "ssh"
host = "127.0.0.1"
user = "root"
identity_file = "/etc/snapcoord/id_ed25519"
known_hosts = "/etc/snapcoord/known_hosts"
services = ["apache2", "cron"]
database = "mariadb"
dump = true
watchdog_seconds = 600
TOML
chmod 600 config.toml
systemd-run --quiet --unit={DOUBLE_UNIT} --working-directory={SRC} \\
    /opt/snapcoord/bin/python -m tests.pve_api --listen 127.0.0.1:8006 \\
    --tls-cert /etc/snapcoord/pve.crt --tls-key /etc/snapcoord/pve.key \\
    --token-file /etc/snapcoord/double-tokens --task-seconds 0.5
# as the units' header says
cd {SRC}/examples/systemd
install -m 644 snapcoord@.service snapcoord@.timer /etc/systemd/system/
systemctl daemon-reload
for _ in $(seq 120); do
    curl -s --cacert /etc/snapcoord/pve.crt https://127.0.0.1:8006/ >/dev/null && break
    sleep 0.5
done
snapcoord config check
"""

SNAPSHOTS = (
    'curl -sf --cacert /etc/snapcoord/pve.crt -H "Authorization: PVEAPIToken='
    'snapcoord@pve!realvm=$(cat /etc/snapcoord/pve-token)" '
    "https://127.0.0.1:8006/api2/json/nodes/pve1/qemu/100/snapshot"
)


def test_2_service_and_timer_under_systemd(real_guest: RealGuest, copied: list[str]) -> None:
    """snapcoord@nightly.service snapshots the VM tagged nightly, hardening and all."""
    out = guest_sh(real_guest, SETUP)
    assert "/etc/snapcoord/config.toml: ok" in out, out
    # the completion knows the configuration's VM keys and tags (/etc/snapcoord/config.toml)
    offered = guest_sh(
        real_guest,
        """
        bash -c 'source /usr/share/bash-completion/bash_completion
                 _completion_loader snapcoord
                 COMP_WORDS=(snapcoord snapshot gu); COMP_CWORD=2; _snapcoord
                 echo "${COMPREPLY[*]}"
                 COMP_WORDS=(snapcoord snapshot --tag ""); COMP_CWORD=3; _snapcoord
                 echo "${COMPREPLY[*]}"'
        """,
    )
    assert offered.splitlines() == ["guestdb", "nightly"], offered
    run = guest_sh(
        real_guest,
        f"""
        systemctl start snapcoord@nightly.service || true
        systemctl show -p Result,ExecMainStatus snapcoord@nightly.service
        echo '--- journal'
        journalctl -u snapcoord@nightly.service --no-pager -o cat
        echo '--- snapshots'
        {SNAPSHOTS}
        echo
        echo '--- services'
        systemctl is-active {" ".join(SERVICES)} mariadb.socket
        """,
        timeout=600,
    )
    head, rest = run.split("--- journal\n")
    journal, rest = rest.split("--- snapshots\n")
    snapshots, services = rest.split("--- services\n")
    assert head.split() == ["Result=success", "ExecMainStatus=0"], run
    result = re.search(r"guestdb: snapshot ok, snapshot (snapcoord-nightly-\d{8}T\d{6}Z)", journal)
    assert result, journal
    assert "stop services" in journal and "start services" in journal, journal
    assert f'"name": "{result[1]}"' in snapshots, snapshots
    assert services.split() == ["active"] * 4, services

    timer = guest_sh(
        real_guest,
        """
        systemctl enable --now snapcoord@nightly.timer 2>/dev/null
        systemctl list-timers --all --no-pager 'snapcoord@*'
        systemctl is-active snapcoord@nightly.timer
        systemctl disable --now snapcoord@nightly.timer 2>/dev/null
        systemctl is-enabled snapcoord@nightly.timer || true
        """,
    ).splitlines()
    (listed,) = [line for line in timer if "snapcoord@nightly.timer" in line]
    assert listed.split()[-1] == "snapcoord@nightly.service", timer
    assert re.match(r"\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", listed), listed  # NEXT
    assert timer[-2:] == ["active", "disabled"], timer


def test_3_make_demo_leaves_the_services_alone(real_guest: RealGuest, copied: list[str]) -> None:
    """`make demo` from a fresh checkout, offline, on a systemd host with Apache, cron and
    MariaDB running: it reaches the listings and no service was stopped or started."""
    before = service_starts(real_guest)
    assert "MainPID=0" not in before, before
    proc = real_guest.ssh(
        f"cd {SRC} && rm -rf .venv .demo && PIP_NO_INDEX=1 PIP_FIND_LINKS={WHEELHOUSE} make demo",
        timeout=900,
    )
    after = service_starts(real_guest)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = sections(proc.stdout)
    assert [command for command, _ in found[-3:]] == [f"list {vm}" for vm in VMS], proc.stdout
    (run,) = [lines for command, lines in found if command.startswith("snapshot --all")]
    taken = dict(
        re.findall(r"([\w-]+): snapshot ok, snapshot (snapcoord-nightly-\w+)", "\n".join(run))
    )
    assert set(taken) == set(VMS), run
    for vm, (_, lines) in zip(VMS, found[-3:], strict=True):
        assert listing(lines)[taken[vm]] is True, f"{vm}: the new snapshot is listed and current"
    assert after == before


def test_4_uninstall_removes_what_install_made(real_guest: RealGuest, copied: list[str]) -> None:
    """Everything the install made goes; the configuration and the store stay."""
    made = "/opt/snapcoord /usr/local/bin/snapcoord /usr/local/share/man/man1/snapcoord.1 " + (
        COMPLETION
    )
    out = guest_sh(
        real_guest,
        f"""
        test -d /opt/snapcoord
        {SRC}/scripts/install --uninstall
        for f in {made}; do
            if [ -e "$f" ] || [ -L "$f" ]; then echo "left: $f"; fi
        done
        command -v snapcoord || echo "no snapcoord on PATH"
        if [ -f /etc/snapcoord/config.toml ]; then echo "config kept"; fi
        echo "snapshots in the store: $(ls /var/lib/snapcoord/guestdb | grep -c ^snapcoord-)"
        """,
    )
    lines = out.splitlines()
    assert "left:" not in out, out
    assert lines[-3:] == ["no snapcoord on PATH", "config kept", "snapshots in the store: 1"], out

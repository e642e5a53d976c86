"""The sudo rule of docs/first-setup.md runs everything snapcoord does in a guest.

A user made for this test, whose only sudo right is the one line the docs give (read out of the
page, not copied), logs in to the loopback guest through an sshd of its own with the docs'
``authorized_keys`` options, and runs a snapshot with a dump, restore-dump, a revert, a snapshot
in pause mode, and freeze + thaw (libvirt's test driver as the hypervisor). Each must succeed with
every service running afterwards; sudo's own log (a test-only ``Defaults`` line: it grants
nothing) must show that each privileged command went through ``sh`` and none was refused.

The rule allows ``sh``, so it is root in effect (the docs say so and why); what the test can still
prove is that the rule is in force and nothing else is: ``sudo -l`` lists only it, and a command
outside it is refused."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord.hooks.guest import fsfreeze
from tests import lab
from tests.cli_helpers import json_lines, snapcoord, write_config
from tests.guest_fixtures import guest_config, lab_services  # noqa: F401 - fixture
from tests.idoit_fixture import IdoitDB
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture
from tests.test_first_setup import authorized_keys_options, sudoers_rule

pytestmark = pytest.mark.real

SUDOERS = Path("/etc/sudoers.d/snapcoord-first-setup")
SUDO_LOG_DEFAULTS = Path("/etc/sudoers.d/snapcoord-first-setup-log")
SUDO_LOG = Path("/var/log/snapcoord-first-setup-sudo.log")  # /var/log is the sandbox's own
PAUSE_DB = "snapcoord_least_sudo"
REVERT_TARGET = "snapcoord-manual-20260101T020000Z"  # a running-state snapshot of db1 in the node


def _install_sudoers(path: Path, content: str) -> None:
    """Write a sudoers drop-in the way an admin would: checked by visudo before it is used."""
    tmp = path.with_name("." + path.name)  # sudo ignores names with a dot
    tmp.write_text(content)
    tmp.chmod(0o440)
    lab.run([lab.require("visudo"), "-c", "-q", "-f", str(tmp)])
    tmp.replace(path)


@pytest.fixture(scope="module")
def least_guest() -> Iterator[lab.SshGuest]:
    """The loopback guest, logging in as the docs' user with only the docs' sudo rule."""
    lab.require_root()
    lab.require("sudo")
    rule = sudoers_rule()
    user = rule.split()[0]
    try:
        lab.run(["id", "-u", user])
    except lab.LabError:
        lab.run(["useradd", "--create-home", "--shell", "/bin/sh", user])
    lab.run(["usermod", "-p", "*", user])  # the lab's sshd has UsePAM no: "!" would be refused
    _install_sudoers(SUDOERS, f"{rule}\n")
    _install_sudoers(
        SUDO_LOG_DEFAULTS, f"Defaults:{user} logfile={SUDO_LOG}, loglinelen=0, !log_year\n"
    )
    guest = lab.start_sshd(user=user)
    try:
        options = authorized_keys_options().replace('from="192.0.2.10"', 'from="127.0.0.1"')
        assert 'from="127.0.0.1"' in options
        key = guest.identity_file.with_suffix(".pub").read_text().strip()
        (guest.workdir / "authorized_keys").write_text(f"{options} {key}\n")
        yield guest
    finally:
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)
        SUDOERS.unlink(missing_ok=True)
        SUDO_LOG_DEFAULTS.unlink(missing_ok=True)


@pytest.fixture
def sudo_log(least_guest: lab.SshGuest) -> Iterator[Path]:
    """sudo's log of this test's commands, checked afterwards: every one went through sh, none
    was refused."""
    SUDO_LOG.unlink(missing_ok=True)
    yield SUDO_LOG
    text = SUDO_LOG.read_text() if SUDO_LOG.exists() else ""
    commands = re.findall(r"COMMAND=(\S+)", text)
    assert commands, "sudo ran nothing: the test did not go through the rule"
    assert set(commands) <= {"/bin/sh", "/usr/bin/sh"}, sorted(set(commands))
    for refusal in ("command not allowed", "password is required", "incorrect password"):
        assert refusal not in text, text[-2000:]


def config(tmp_path: Path, uri: str, guest: lab.SshGuest, vm: str, **table: Any) -> Path:
    assert guest.guest_table()["sudo"] is True
    return guest_config(tmp_path, uri, guest.guest_table(**table), vm=vm)


def cli(*args: str, timeout: float = 300) -> dict[str, Any]:
    proc = snapcoord(*args, "--json", timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    (summary,) = json_lines(proc.stdout)
    return summary


def test_the_rule_is_in_force_and_nothing_else(least_guest: lab.SshGuest) -> None:
    listed = least_guest.ssh("sudo", "-n", "-l").stdout
    rights = [ln.strip() for ln in listed.splitlines() if ln.startswith(" ") and "(" in ln]
    assert rights == ["(root) NOPASSWD: /bin/sh"], listed
    assert least_guest.ssh("sudo", "-n", "sh", "-c", "id -u").stdout.strip() == "0"
    refused = least_guest.ssh("sudo", "-n", "id", "-u", check=False)
    assert refused.returncode != 0 and refused.stdout == ""
    assert "password is required" in refused.stderr or "not allowed" in refused.stderr
    as_other = least_guest.ssh("sudo", "-n", "-u", "nobody", "sh", "-c", "id -u", check=False)
    assert as_other.returncode != 0 and as_other.stdout == ""


def test_snapshot_with_a_dump_then_restore_dump(
    least_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    idoit_db: IdoitDB,
    libvirt_node: str,
    tmp_path: Path,
    sudo_log: Path,
) -> None:
    conf = config(tmp_path, libvirt_node, least_guest, "db1", dump=True)
    run = cli("-c", str(conf), "snapshot", "db1", timeout=600)
    assert run["dump"]["sha256"], run
    assert lab_services.all_running()

    idoit_db.mutate_data()
    assert not idoit_db.is_pristine()
    restored = cli("-c", str(conf), "restore-dump", "db1", "--from", run["snapshot"], "--yes")
    assert restored["exit_code"] == 0
    assert idoit_db.is_pristine()
    assert lab_services.all_running()


def test_revert(
    least_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    libvirt_node: str,
    tmp_path: Path,
    sudo_log: Path,
) -> None:
    lab_services.stop("apache2")  # a RAM snapshot resumes with services as they were then
    conf = config(tmp_path, libvirt_node, least_guest, "db1")
    cli("-c", str(conf), "revert", "db1", "--to", REVERT_TARGET, "--yes")
    assert lab_services.states() == {"mariadb": True, "apache2": True, "cron": True}


def test_snapshot_in_pause_mode(
    least_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    libvirt_node: str,
    tmp_path: Path,
    sudo_log: Path,
) -> None:
    """With a MyISAM table the datadir is also synced (``sync -f``) while commits are held."""
    before = lab.mysqld_pids()
    lab.mysql_exec(
        f"CREATE DATABASE IF NOT EXISTS {PAUSE_DB};"
        f"CREATE TABLE IF NOT EXISTS {PAUSE_DB}.t (i INT) ENGINE=MyISAM;"
    )
    try:
        conf = config(tmp_path, libvirt_node, least_guest, "db1", consistency="pause")
        run = cli("-c", str(conf), "snapshot", "db1")
    finally:
        lab.mysql_exec(f"DROP DATABASE IF EXISTS {PAUSE_DB};")
    assert run["exit_code"] == 0
    # the sync ran (through sudo; a warm shell's commands are logged as plain sh): a failed
    # one fails the snapshot
    assert any("the datadir is synced" in note for note in run["notes"]), run["notes"]
    assert lab_services.all_running()
    assert lab.mysqld_pids() == before  # paused, never restarted


def test_freeze_and_thaw(
    least_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    sudo_log: Path,
) -> None:
    conf = config(tmp_path, "test:///default", least_guest, "web1")  # never calls the hypervisor
    frozen = snapcoord("-c", str(conf), "freeze", "web1", "--max-seconds", "300")
    assert frozen.returncode == 0, frozen.stderr
    assert not any(lab_services.states().values())
    thawed = snapcoord("-c", str(conf), "thaw", "web1")
    assert thawed.returncode == 0, thawed.stderr
    assert lab_services.all_running()


def test_freeze_hook_install_status_uninstall(
    least_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    sudo_log: Path,
) -> None:
    """The guest-side freeze hook (VMware Tools' convention here: the vSphere table is never
    contacted) is written into the guest through the same rule; in pause mode install asks the
    server which pause method it supports."""
    conf = write_config(
        tmp_path / "vmware.toml",
        {
            "defaults": {"store": str(tmp_path / "store")},
            "hypervisors.vc": {
                "type": "vsphere",
                "host": "127.0.0.1",
                "user": "u",
                "password": {"env": "SNAPCOORD_TEST_UNUSED"},
            },
            "vms.db": {"hypervisor": "vc", "name": "db"},
            "vms.db.guest": least_guest.guest_table(consistency="pause"),
        },
    )
    env = {"SNAPCOORD_TEST_UNUSED": "x"}
    hook = Path(fsfreeze.VMWARE_DIR) / fsfreeze.SCRIPT_NAME
    try:
        for action, says in (("install", ""), ("status", "current and enabled")):
            done = snapcoord("-c", str(conf), "freeze-hook", action, "db", env=env)
            assert done.returncode == 0, done.stdout + done.stderr
            assert says in done.stdout
        assert hook.stat().st_uid == 0 and hook.stat().st_mode & 0o777 == 0o700
        removed = snapcoord("-c", str(conf), "freeze-hook", "uninstall", "db", env=env)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert not hook.exists()
    finally:  # as tests/test_fsfreeze_hook.py leaves the guest
        hook.unlink(missing_ok=True)
        for folder in (hook.parent, hook.parent.parent):
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        shutil.rmtree(fsfreeze.RUN_DIR, ignore_errors=True)
    assert lab_services.all_running()

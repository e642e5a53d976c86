"""Issue 23, finding 3: the configuration is code for root (hooks, exec_prefix, ssh_options), so
it is never taken from the current directory, and a configuration or secret file that someone
other than root (or the running user) can change is refused with one line naming it and the fix.

These tests run as root (CI does): they chown files to nobody (uid 65534) to play the other user.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapcoord import trust
from snapcoord.trust import UnsafeFile, read_trusted
from tests.cli_helpers import REPO, snapcoord, unstamped, write_config

NOBODY = 65534
VSPHERE = {"type": "vsphere", "host": "h", "user": "u"}


@pytest.fixture(autouse=True)
def _as_root() -> None:
    assert os.geteuid() == 0, "these tests chown files: they run as root (CI does)"


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("snapcoord: error: ")]


def good_config(folder: Path) -> Path:
    return write_config(folder / "c.toml", {"defaults": {"store": str(folder / "store")}})


def secret_config(folder: Path, secret: Path) -> Path:
    return write_config(
        folder / "c.toml",
        {"hypervisors.vc": {**VSPHERE, "password": {"file": str(secret)}}},
    )


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return snapcoord("-c", str(config), "config", "check", timeout=60)


def test_a_config_in_the_current_directory_is_not_used(tmp_path: Path) -> None:
    """Before: root in a directory where nobody left a world-writable snapcoord.toml used it."""
    assert not Path("/etc/snapcoord/config.toml").exists(), "this host has a configuration"
    work = tmp_path / "cwd"
    work.mkdir()
    planted = write_config(work / "snapcoord.toml", {"planted": {}})
    planted.chmod(0o666)
    os.chown(planted, NOBODY, NOBODY)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SNAPCOORD_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "snapcoord", "config", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
        env={**env, "HOME": str(home), "PYTHONPATH": str(REPO)},
        check=False,
    )
    proc.stderr = unstamped(proc.stderr)  # into a pipe: every line starts with the time
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc) == [
        "snapcoord: error: no configuration found (the current directory is not searched: "
        "pass --config ./snapcoord.toml to use it)"
    ]
    assert "planted" not in proc.stderr


def test_a_good_config_is_used(tmp_path: Path) -> None:
    config = good_config(tmp_path)
    assert config.stat().st_mode & 0o777 == 0o644  # what root's default umask writes
    for mode in (0o644, 0o600, 0o400):
        config.chmod(mode)
        proc = check(config)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"{config}: ok (0 hypervisors, 0 VMs)\n"


@pytest.mark.parametrize(
    ("mode", "who"),
    [
        (0o666, "writable by group and others (mode 0666)"),
        (0o646, "writable by others (mode 0646)"),
        (0o664, "writable by group (mode 0664)"),
    ],
    ids=["0666", "0646", "0664"],
)
def test_a_config_others_can_change_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    config = good_config(tmp_path)
    config.chmod(mode)
    proc = check(config)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"snapcoord: error: {config}: not used: this file is {who} (fix: chmod go-w {config})"
    ]
    assert proc.stdout == ""


def test_a_config_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    config = good_config(tmp_path)
    config.chmod(0o600)
    os.chown(config, NOBODY, NOBODY)
    proc = check(config)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"snapcoord: error: {config}: not used: this file is owned by uid {NOBODY} (nobody), "
        f"not root (fix: chown root {config})"
    ]


def test_a_config_in_a_directory_others_can_change_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    config = good_config(folder)
    folder.chmod(0o775)  # the group could rename c.toml away and put its own file there
    proc = check(config)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"snapcoord: error: {config}: not used: this file is in directory {folder}, writable by "
        f"group (mode 0775) (fix: chmod go-w {folder}, or move {config} to a directory only "
        "root can change, such as /etc/snapcoord)"
    ]
    folder.chmod(0o755)
    os.chown(folder, NOBODY, NOBODY)  # its owner could do the same
    proc = check(config)
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1
    assert f"is in directory {folder}, owned by uid {NOBODY} (nobody), not root" in proc.stderr


def test_every_directory_up_to_the_root_is_checked(tmp_path: Path) -> None:
    top = tmp_path / "a"
    deep = top / "b" / "c"
    deep.mkdir(parents=True)
    config = good_config(deep)
    top.chmod(0o757)
    proc = check(config)
    assert proc.returncode == 2
    assert f"is in directory {top}, writable by others (mode 0757)" in proc.stderr


def test_a_sticky_directory_like_tmp_is_fine(tmp_path: Path) -> None:
    """Others may create files in a sticky directory but not replace root's entries in it."""
    folder = tmp_path / "sticky"
    folder.mkdir()
    config = good_config(folder)
    folder.chmod(0o1777)
    proc = check(config)
    assert proc.returncode == 0, proc.stderr


def test_a_symlink_is_checked_where_it_leads(tmp_path: Path) -> None:
    config = good_config(tmp_path)
    link = tmp_path / "link.toml"
    link.symlink_to(config)
    assert check(link).returncode == 0
    config.chmod(0o666)
    proc = check(link)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"snapcoord: error: {link}: not used: this file is writable by group and others "
        f"(mode 0666) (fix: chmod go-w {config})"
    ]


def test_a_fifo_as_config_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo, 0o600)
    proc = check(fifo)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"snapcoord: error: {fifo}: not used: this file is not a regular file"
    ]


def test_a_good_secret_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    proc = check(secret_config(tmp_path, secret))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize(
    ("mode", "who"),
    [
        (0o644, "readable by group and others (mode 0644)"),
        (0o640, "readable by group (mode 0640)"),
        (0o604, "readable by others (mode 0604)"),
        (0o620, "writable by group (mode 0620)"),
    ],
    ids=["0644", "0640", "0604", "0620"],
)
def test_a_secret_file_others_can_read_or_change_is_refused(
    tmp_path: Path, mode: int, who: str
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(mode)
    config = secret_config(tmp_path, secret)
    proc = check(config)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"snapcoord: error: {config}: hypervisors.vc.password: secret file {str(secret)!r} "
        f"not used: it is {who} (fix: chmod go-rwx {secret})"
    ]
    assert "s3cret" not in proc.stderr + proc.stdout


def test_a_secret_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    os.chown(secret, NOBODY, NOBODY)
    config = secret_config(tmp_path, secret)
    proc = check(config)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"snapcoord: error: {config}: hypervisors.vc.password: secret file {str(secret)!r} "
        f"not used: it is owned by uid {NOBODY} (nobody), not root (fix: chown root {secret})"
    ]


def test_a_secret_file_in_a_directory_others_can_change_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir()
    secret = folder / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    folder.chmod(0o777)
    proc = check(secret_config(tmp_path, secret))
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1
    assert f"it is in directory {folder}, writable by group and others (mode 0777)" in proc.stderr


def test_config_check_lists_a_secret_problem_with_the_others(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    config = write_config(
        tmp_path / "c.toml",
        {
            "hypervisors.vc": {**VSPHERE, "password": {"file": str(secret)}},
            "vms.db1": {"hypervisor": "nope"},
        },
    )
    proc = check(config)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 2, lines
    assert any("hypervisors.vc.password: secret file" in line for line in lines)
    assert any("vms.db1.hypervisor: no hypervisor" in line for line in lines)


def test_a_user_may_use_their_own_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root: files of root or of the running user are fine, anyone else's are not."""
    mine = tmp_path / "mine"
    mine.write_text("x")
    os.chown(mine, NOBODY, NOBODY)
    theirs = tmp_path / "theirs"
    theirs.write_text("x")
    os.chown(theirs, 1234, 1234)
    monkeypatch.setattr(trust.os, "geteuid", lambda: NOBODY)
    assert read_trusted(str(mine)) == b"x"
    with pytest.raises(UnsafeFile) as refused:
        read_trusted(str(theirs))
    assert refused.value.problem == f"is owned by uid 1234, not root or uid {NOBODY} (nobody) (you)"
    assert refused.value.fix == f"use a file of your own, or chown root {theirs}"


def test_the_checks_are_on_the_file_that_is_read(tmp_path: Path) -> None:
    """The descriptor that is read is the one checked: a link planted as the last component
    between resolving and opening is not followed (O_NOFOLLOW)."""
    target = tmp_path / "target"
    target.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    real = os.path.realpath

    def stale(path: str) -> str:  # as if the link appeared after the path was resolved
        return str(link) if path == str(link) else real(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trust.os.path, "realpath", stale)
        with pytest.raises(OSError):
            read_trusted(str(link))

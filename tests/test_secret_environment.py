"""Secrets given as environment variables never reach a child process (issue 23, finding 16).

A configuration that takes a secret from ``{ env = "NAME" }`` used to hand ``NAME`` to every
child: ssh, the guest's commands through the exec transport, the hooks, the database clients.
Here the real CLI runs a snapshot and a freeze of a stand-in guest (exec transport, so the
guest's commands are this machine's processes) whose ``before`` hook writes its environment to
a file; the hypervisor password comes from a variable. The freeze holder, snapcoord's own child
that loads the same configuration, keeps it (the freeze would fail without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapcoord.config import parse_config
from snapcoord.secrets import child_environment
from snapcoord.settings import VsphereSettings
from snapcoord.shell import execute
from tests.cli_helpers import snapcoord, stand_in_guest
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

SECRET_VARIABLE = "SNAPCOORD_TEST_VC_PASSWORD"
SECRET = "s3cret-never-in-a-child"
PLAIN = {"SNAPCOORD_TEST_PLAIN": "everyone-may-see-this"}


def _config(tmp_path: Path, uri: str) -> tuple[Path, Path]:
    seen = tmp_path / "hook-env"
    config, _state = stand_in_guest(
        tmp_path,
        uri,
        tables={
            # a hypervisor the VM does not use: its secret is resolved all the same
            "hypervisors.vc": {
                "type": "vsphere",
                "host": "vc.invalid",
                "user": "backup",
                "password": {"env": SECRET_VARIABLE},
            },
            "vms.db1.hooks": {"before": [f"env > {seen}"]},
        },
    )
    return config, seen


def test_a_secret_variable_is_resolved_but_left_out_of_childrens_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)
    monkeypatch.setenv("SNAPCOORD_TEST_PLAIN", PLAIN["SNAPCOORD_TEST_PLAIN"])
    raw = {
        "hypervisors": {
            "vc": {
                "type": "vsphere",
                "host": "vc.invalid",
                "user": "backup",
                "password": {"env": SECRET_VARIABLE},
            }
        },
        "vms": {"db1": {"hypervisor": "vc"}},
    }
    config = parse_config(raw, source="test.toml")
    settings = config.hypervisors["vc"]
    assert isinstance(settings, VsphereSettings) and settings.password.reveal() == SECRET
    shown = execute(["env"], timeout=30).stdout.decode()
    assert SECRET_VARIABLE not in shown and SECRET not in shown
    assert "SNAPCOORD_TEST_PLAIN=everyone-may-see-this" in shown, "only the secrets go"
    assert child_environment(with_secrets=True)[SECRET_VARIABLE] == SECRET


def test_the_guests_commands_of_a_snapshot_never_see_the_secret(
    tmp_path: Path, libvirt_node: str
) -> None:
    config, seen = _config(tmp_path, libvirt_node)
    env = {SECRET_VARIABLE: SECRET, **PLAIN}
    done = snapcoord("-c", str(config), "snapshot", "db1", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    hook_env = seen.read_text()
    assert "SNAPCOORD_TEST_PLAIN=everyone-may-see-this" in hook_env
    assert SECRET_VARIABLE not in hook_env and SECRET not in hook_env


def test_the_freeze_holder_keeps_the_secret_its_children_do_not(
    tmp_path: Path, libvirt_node: str
) -> None:
    config, seen = _config(tmp_path, libvirt_node)
    env = {SECRET_VARIABLE: SECRET, **PLAIN}
    frozen = snapcoord("-c", str(config), "freeze", "db1", "--max-seconds", "60", env=env)
    assert frozen.returncode == 0, frozen.stdout + frozen.stderr  # the holder loaded it
    thawed = snapcoord("-c", str(config), "thaw", "db1", env=env)
    assert thawed.returncode == 0, thawed.stdout + thawed.stderr
    hook_env = seen.read_text()
    assert "SNAPCOORD_TEST_PLAIN=everyone-may-see-this" in hook_env
    assert SECRET_VARIABLE not in hook_env and SECRET not in hook_env

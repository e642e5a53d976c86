"""``snapcoord vzdump-hook`` driven as vzdump drives it: each phase a separate process, with
vzdump's arguments and environment and no options (the configuration from $SNAPCOORD_CONFIG),
against the Proxmox API double (which resolves a VM configured by name to its vmid) and the
loopback guest (real sshd, MariaDB, Apache, cron). Checked by the guest's state between the
phases. The sequences are pve-manager's PVE/VZDump.pm (docs/scheduling.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import lab, pause_load
from tests.cli_helpers import REPO, unstamped, write_config
from tests.guest_fixtures import (
    lab_services,  # noqa: F401 - fixture
    wait_for,
)
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import (
    TOKEN_ENV,
    TOKEN_SECRET,
    Cert,
    hypervisor_table,
    make_cert,
    start_double,
)
from tests.test_freeze_e2e import _commit_blocked, _insert, holder_pids, lock_sessions
from tests.test_notify import Recorder, server  # noqa: F401 - fixture

DB_VMID = 100  # "db1" on the double's pve1: configured by name, resolved through the API


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("vzdump-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert)
    yield server
    server.stop()


def hook_config(
    tmp_path: Path,
    double: PveApiDouble,
    cert: Cert,
    guest: dict[str, Any],
    *,
    vm: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    notify: dict[str, Any] | None = None,
) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store"), "label": "test", **(defaults or {})},
        **({"notify": notify} if notify else {}),
        "hypervisors.pve": hypervisor_table(double, cert),
        "vms.db": {"hypervisor": "pve", **(vm if vm is not None else {"name": "db1"})},
        "vms.db.guest": guest,
        "vms.web": {"hypervisor": "pve", "vmid": 102},  # no guest: nothing to quiesce
    }
    return write_config(tmp_path / "snapcoord.toml", tables)


class Vzdump:
    """Calls the hook as PVE/VZDump.pm's run_hook_script does."""

    def __init__(self, config: Path, *, vmtype: str = "qemu") -> None:
        self.config = config
        self.vmtype = vmtype
        self.calls: list[tuple[str, int]] = []

    def __call__(self, phase: str, mode: str | None = None, vmid: int | None = None,
                 **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
        environ = {
            key: value
            for key, value in os.environ.items()
            if key not in ("VMTYPE", "HOSTNAME", "TARGET", "LOGFILE", "DUMPDIR", "STOREID")
        }
        environ.update(
            SNAPCOORD_CONFIG=str(self.config),
            **{TOKEN_ENV: TOKEN_SECRET},
            DUMPDIR="/var/lib/vz/dump",
            STOREID="local",
            **env,
        )
        args = [phase]
        if mode is not None:
            args += [mode, str(vmid)]
            environ.update(VMTYPE=self.vmtype, HOSTNAME="db1")
        result = subprocess.run(
            [sys.executable, "-m", "snapcoord", "vzdump-hook", *args],
            capture_output=True,
            text=True,
            timeout=180,
            env=environ,
            cwd=REPO,
        )
        self.calls.append((phase, result.returncode))
        # into a pipe: every line starts with the time (checked, then taken off)
        return subprocess.CompletedProcess(
            result.args, result.returncode, unstamped(result.stdout), unstamped(result.stderr)
        )

    def ok(self, phase: str, mode: str | None = None, vmid: int | None = None,
           **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
        result = self(phase, mode, vmid, **env)
        assert result.returncode == 0, f"{phase}: {result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr
        return result


def all_down(services: lab.GuestServices) -> bool:
    return not any(services.states().values())


@pytest.fixture
def stop_guest(ssh_guest: lab.SshGuest) -> dict[str, Any]:
    return ssh_guest.guest_table()


CT_VMID = 101  # the double's container "ct1" on pve1


def ct_config(tmp_path: Path, double: PveApiDouble, cert: Cert, guest: dict[str, Any]) -> Path:
    return hook_config(tmp_path, double, cert, guest, vm={"vmid": CT_VMID})


def test_qemu_snapshot_mode_without_the_freeze_hook_fails_pre_stop_and_touches_nothing(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    """A QEMU VM's backup takes its point in time at the guest agent's freeze, after
    pre-restart and post-restart (qemu-server src/PVE/VZDump/QemuServer.pm, e6352be): no
    bracket of phases covers it. Without the guest-side hook pre-stop refuses, so vzdump
    aborts this guest's backup instead of reporting a consistent one."""
    vzdump = Vzdump(hook_config(tmp_path, double, cert, stop_guest))
    mysqld = min(lab.mysqld_pids())
    vzdump.ok("job-init")
    vzdump.ok("job-start")
    vzdump.ok("backup-start", "snapshot", DB_VMID)
    refused = vzdump("pre-stop", "snapshot", DB_VMID)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("snapcoord: error:")]
    assert errors == [
        "snapcoord: error: db: the freeze hook is not installed "
        "(run: snapcoord freeze-hook install db)"
    ], refused.stderr
    assert lab_services.all_running() and min(lab.mysqld_pids()) == mysqld
    assert holder_pids("db") == []
    # vzdump's error path: backup-abort, log-end, job-end; nothing was prepared, nothing to do
    vzdump.ok("backup-abort", "snapshot", DB_VMID)
    vzdump.ok("log-end", "snapshot", DB_VMID, LOGFILE="/var/lib/vz/dump/vzdump-qemu-100.log")
    vzdump.ok("job-end")
    assert lab_services.all_running() and min(lab.mysqld_pids()) == mysqld


@pytest.mark.parametrize(
    ("agent", "says"),
    [
        ("0", "guest agent is not enabled"),
        ("enabled=1,freeze-fs-on-backup=0", "set not to freeze on backup"),
        ("1,freeze-fs=0", "set not to freeze on backup"),
    ],
)
def test_qemu_snapshot_mode_with_the_agent_freeze_off_fails_pre_stop(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
    agent: str,
    says: str,
) -> None:
    double.cluster.guests[DB_VMID].agent = agent
    vzdump = Vzdump(hook_config(tmp_path, double, cert, stop_guest))
    refused = vzdump("pre-stop", "snapshot", DB_VMID)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("snapcoord: error:")]
    assert len(errors) == 1 and says in errors[0], refused.stderr
    assert "qm set 100 --agent enabled=1,freeze-fs-on-backup=1" in errors[0]
    assert lab_services.all_running()


def test_qemu_agent_not_answering_fails_pre_stop(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    double.cluster.guests[DB_VMID].agent_running = False
    vzdump = Vzdump(hook_config(tmp_path, double, cert, stop_guest))
    refused = vzdump("pre-stop", "snapshot", DB_VMID)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "the guest agent does not answer" in refused.stderr
    assert lab_services.all_running()


def test_backup_end_without_a_prepared_freeze_fails(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    server: Recorder,
    tmp_path: Path,
) -> None:
    """A backup-end with nothing prepared (a hook added to vzdump.conf mid-job, a corrupt
    record) or nothing to read: the backup is not known to be consistent, so vzdump must mark
    it failed (exit 5)."""
    metrics = tmp_path / "snapcoord.prom"
    config = hook_config(
        tmp_path,
        double,
        cert,
        stop_guest,
        defaults={"metrics_file": str(metrics)},
        notify={"webhook_url": f"{server.base}/hook"},
    )
    vzdump = Vzdump(config)
    (tmp_path / "store" / "vzdump").mkdir(parents=True)
    (tmp_path / "store" / "vzdump" / "db.json").write_text(
        json.dumps({"vm": "db", "vmid": DB_VMID, "token": "not a token!", "armed_at": 1})
    )
    ended = vzdump("backup-end", "snapshot", DB_VMID)  # a corrupt record is no record
    assert ended.returncode == 5, ended.stdout + ended.stderr
    assert "Traceback" not in ended.stderr
    assert "not application-consistent: no freeze was prepared" in ended.stderr
    (tmp_path / "store" / "vzdump" / "db.json").write_text(
        json.dumps({"vm": "db", "vmid": DB_VMID, "token": "vzdump-100-0123456789ab", "armed_at": 1})
    )
    ended = vzdump("backup-end", "snapshot", DB_VMID)  # armed, but the guest has no hook
    assert ended.returncode == 5, ended.stdout + ended.stderr
    assert "not application-consistent: the freeze hook's log cannot be read" in ended.stderr
    assert not (tmp_path / "store" / "vzdump" / "db.json").exists(), "judged once"
    assert lab_services.all_running()
    last = json.loads((tmp_path / "store" / "journal" / "db.last-run.json").read_text())
    assert last["application_consistent"] is False and last["exit_code"] == 5
    assert 'snapcoord_last_backup_application_consistent{vm="db"} 0' in metrics.read_text()
    [*_, hit] = [h for h in server.hits if h.path == "/hook"]
    body = json.loads(hit.body)
    assert body["command"] == "vzdump backup-end"
    assert body["vms"][0]["application_consistent"] is False


def test_container_snapshot_mode_down_across_the_storage_snapshot(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    """Containers: pve-container src/PVE/VZDump/LXC.pm (94f5585) creates the storage snapshot
    in snapshot(), which pve-manager calls between pre-stop and pre-restart: the bracket from
    pre-stop to post-restart covers it."""
    vzdump = Vzdump(ct_config(tmp_path, double, cert, stop_guest), vmtype="lxc")
    vzdump.ok("job-init")
    vzdump.ok("job-start")
    vzdump.ok("backup-start", "snapshot", CT_VMID)
    assert lab_services.all_running(), "backup-start changes nothing"
    frozen = vzdump.ok("pre-stop", "snapshot", CT_VMID)
    assert "db: frozen (services stopped)" in frozen.stdout
    assert all_down(lab_services), lab_services.states()
    # LXC.pm's snapshot(): the storage snapshot 'vzdump' is created here
    vzdump.ok("pre-restart", "snapshot", CT_VMID)
    assert all_down(lab_services), "still down: the container may still be suspended"
    thawed = vzdump.ok("post-restart", "snapshot", CT_VMID)
    assert lab_services.all_running(), lab_services.states()
    assert "db: thaw ok" in thawed.stdout
    mysqld = min(lab.mysqld_pids())
    vzdump.ok("backup-end", "snapshot", CT_VMID, TARGET="/var/lib/vz/dump/vzdump-lxc-101.tar")
    vzdump.ok("log-end", "snapshot", CT_VMID, LOGFILE="/var/lib/vz/dump/vzdump-lxc-101.log")
    vzdump.ok("job-end")
    assert lab_services.all_running() and min(lab.mysqld_pids()) == mysqld
    assert holder_pids("db") == []
    assert not (tmp_path / "store" / "journal" / "db.json").exists()


def test_backup_abort_restores_and_the_cleanup_phases_are_idempotent(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    vzdump = Vzdump(ct_config(tmp_path, double, cert, stop_guest), vmtype="lxc")
    vzdump.ok("job-start")
    vzdump.ok("backup-start", "snapshot", CT_VMID)
    vzdump.ok("pre-stop", "snapshot", CT_VMID)
    assert all_down(lab_services)
    # the snapshot failed: vzdump's error path runs backup-abort (no pre-restart first)
    vzdump.ok("backup-abort", "snapshot", CT_VMID)
    assert lab_services.all_running(), lab_services.states()
    mysqld = min(lab.mysqld_pids())
    # a cleanup path that runs pre-restart/post-restart again, then backup-abort once more
    for phase in ("pre-restart", "post-restart", "backup-abort"):
        vzdump.ok(phase, "snapshot", CT_VMID)
    vzdump.ok("log-end", "snapshot", CT_VMID)
    vzdump.ok("job-end")
    assert lab_services.all_running() and min(lab.mysqld_pids()) == mysqld, "nothing restarted"


def test_job_abort_restores_what_is_still_frozen(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    vzdump = Vzdump(ct_config(tmp_path, double, cert, stop_guest), vmtype="lxc")
    vzdump.ok("job-start")
    vzdump.ok("backup-start", "snapshot", CT_VMID)
    vzdump.ok("pre-stop", "snapshot", CT_VMID)
    assert all_down(lab_services)
    aborted = vzdump.ok("job-abort")
    assert lab_services.all_running(), lab_services.states()
    assert "db: thaw ok" in aborted.stdout
    # the holder answers the thaw, then exits: not necessarily before the thaw has returned
    wait_for(lambda: holder_pids("db") == [], 15, "the holder to exit")


def test_suspend_mode_thaws_after_the_guest_is_resumed(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    vzdump = Vzdump(hook_config(tmp_path, double, cert, stop_guest))
    vzdump.ok("backup-start", "suspend", DB_VMID)
    vzdump.ok("pre-stop", "suspend", DB_VMID)
    assert all_down(lab_services)
    # pre-restart runs while the guest is still suspended: no guest command then
    vzdump.ok("pre-restart", "suspend", DB_VMID)
    assert all_down(lab_services)
    vzdump.ok("post-restart", "suspend", DB_VMID)
    assert lab_services.all_running(), lab_services.states()


def test_stop_mode_only_dumps_and_leaves_the_shutdown_to_vzdump(
    double: PveApiDouble,
    cert: Cert,
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    vzdump = Vzdump(hook_config(tmp_path, double, cert, ssh_guest.guest_table(dump=True)))
    mysqld = min(lab.mysqld_pids())
    vzdump.ok("backup-start", "stop", DB_VMID)
    dumped = vzdump.ok("pre-stop", "stop", DB_VMID)
    assert "-> dump to store" in dumped.stdout
    assert lab_services.all_running() and min(lab.mysqld_pids()) == mysqld, "nothing stopped"
    [folder] = (tmp_path / "store" / "db").glob("snapcoord-vzdump-*")
    dumps = list(folder.glob("*.sql.zst"))  # compression = "auto": the lab guest has zstd
    assert dumps and dumps[0].stat().st_size > 1000
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["snapshot_by"] == "vzdump"
    # vzdump shuts the guest down and starts it again: the restart phases find nothing frozen
    vzdump.ok("pre-restart", "stop", DB_VMID)
    vzdump.ok("post-restart", "stop", DB_VMID)
    assert lab_services.all_running() and min(lab.mysqld_pids()) == mysqld


def test_an_unknown_vmid_and_a_vm_without_guest_are_left_alone(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    vzdump = Vzdump(hook_config(tmp_path, double, cert, stop_guest))
    mysqld = min(lab.mysqld_pids())
    for phase in ("backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end"):
        result = vzdump.ok(phase, "snapshot", 999)
        lines = (result.stdout + result.stderr).splitlines()
        if phase == "pre-stop":
            assert len(lines) == 1 and "vmid 999 is not in" in lines[0], lines
            assert "left alone" in lines[0]
        else:
            assert lines == [], (phase, lines)
    assert lab_services.all_running() and min(lab.mysqld_pids()) == mysqld
    no_guest = vzdump("pre-stop", "snapshot", 102)  # configured, but without [guest]
    assert no_guest.returncode == 2, no_guest.stderr
    assert "web: the freeze hook needs a [vms.web.guest] table" in no_guest.stderr


def test_a_guest_that_cannot_be_quiesced_fails_pre_stop_with_one_line(
    double: PveApiDouble,
    cert: Cert,
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    guest = ssh_guest.guest_table(port=lab.free_port())  # nothing listens there
    vzdump = Vzdump(hook_config(tmp_path, double, cert, guest))
    result = vzdump("pre-stop", "snapshot", DB_VMID)
    assert result.returncode == 4, result.stdout + result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("snapcoord: error:")]
    assert len(errors) == 1 and errors[0].startswith("snapcoord: error: db: "), result.stderr
    assert "Traceback" not in result.stderr
    assert lab_services.all_running()
    vzdump.ok("backup-abort", "snapshot", DB_VMID)  # vzdump's error path: nothing to do


def test_no_post_restart_the_limit_restores_and_post_restart_then_fails(
    double: PveApiDouble,
    cert: Cert,
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    """The limit between the phases is the VM's freeze_max_seconds: a backup that does not
    reach post-restart in time gets its guest back, and is told it is not consistent."""
    guest = ssh_guest.guest_table(freeze_max_seconds=10)
    vzdump = Vzdump(ct_config(tmp_path, double, cert, guest), vmtype="lxc")
    vzdump.ok("pre-stop", "snapshot", CT_VMID)
    assert all_down(lab_services)
    wait_for(lab_services.all_running, 30, "the freeze limit to restore the guest")
    wait_for(lambda: holder_pids("db") == [], 15, "the holder to exit")
    late = vzdump("post-restart", "snapshot", CT_VMID)
    assert late.returncode == 5, late.stdout + late.stderr
    assert "reached its limit before thaw" in late.stderr


def test_explicit_vzdump_vmid_needs_no_api_and_names_need_it(
    double: PveApiDouble,
    cert: Cert,
    stop_guest: dict[str, Any],
    lab_services: lab.GuestServices,
    tmp_path: Path,
) -> None:
    by_name = Vzdump(hook_config(tmp_path, double, cert, stop_guest))
    explicit_dir = tmp_path / "explicit"
    explicit_dir.mkdir()
    explicit = Vzdump(
        hook_config(
            explicit_dir, double, cert, stop_guest, vm={"name": "db1", "vzdump_vmid": DB_VMID}
        )
    )
    double.stop()  # the API is gone
    failed = by_name("pre-stop", "suspend", DB_VMID)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert "cannot tell whether it is one of db (configured by name)" in failed.stderr
    assert "vzdump_vmid" in failed.stderr
    assert lab_services.all_running()
    # suspend mode: the freeze is snapcoord's own bracket, no API call needed
    explicit.ok("pre-stop", "suspend", DB_VMID)
    assert all_down(lab_services)
    explicit.ok("post-restart", "suspend", DB_VMID)
    assert lab_services.all_running()


@pytest.fixture
def paused_lab(lab_services: lab.GuestServices) -> Iterator[lab.GuestServices]:
    pause_load.ensure_binlog()
    pause_load.reset_schema()
    yield lab_services
    wait_for(lambda: lock_sessions() == [], 15, "every lock session to end")
    pause_load.drop_schema()


def test_pause_mode_holds_commits_from_pre_stop_to_post_restart(
    double: PveApiDouble,
    cert: Cert,
    ssh_guest: lab.SshGuest,
    paused_lab: lab.GuestServices,
    tmp_path: Path,
) -> None:
    guest = ssh_guest.guest_table(consistency="pause")
    vzdump = Vzdump(hook_config(tmp_path, double, cert, guest))
    mysqld = min(lab.mysqld_pids())
    vzdump.ok("backup-start", "suspend", DB_VMID)
    assert not _commit_blocked()
    frozen = vzdump.ok("pre-stop", "suspend", DB_VMID)
    assert "frozen (commits held)" in frozen.stdout
    assert paused_lab.all_running(), "nothing stops in pause mode"
    assert _commit_blocked(), "a commit went through between pre-stop and post-restart"
    vzdump.ok("pre-restart", "suspend", DB_VMID)
    assert _commit_blocked(), "suspend mode: the guest is still suspended at pre-restart"
    vzdump.ok("post-restart", "suspend", DB_VMID)
    assert _insert(10).returncode == 0
    vzdump.ok("job-end")
    assert min(lab.mysqld_pids()) == mysqld

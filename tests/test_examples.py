"""The integration examples in examples/ work as shipped.

- systemd: ``systemd-analyze verify`` accepts ``snapcoord@nightly.service`` and ``.timer`` without
  a warning (ExecStart pointed at this venv's ``snapcoord``: verify checks that it is executable),
  and rates the service's hardening OK; the unit's ExecStart, with ``%i`` a tag or a VM, snapshots
  exactly those VMs on the Proxmox API double.
- cron: the ``/etc/cron.d`` line's command, run by ``sh -c`` as cron would, snapshots the VMs
  tagged ``nightly`` (and no other) on the double; a failure leaves a syslog line with its code.
- The shell scripts pass ``sh -n`` (and shellcheck when installed) and are executable.
- The Veeam pre-freeze/post-thaw pair and the vzdump wrapper quiesce and restore the loopback
  guest (real sshd, MariaDB, Apache, cron), passing snapcoord's exit codes through.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord.adapters.base import MARKER
from tests import lab
from tests.cli_helpers import REPO, unstamped, write_config
from tests.guest_fixtures import (
    VM_NAME,
    guest_config,
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

EXAMPLES = REPO / "examples"
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, where pip put snapcoord
SNAPCOORD_BIN = VENV_BIN / "snapcoord"
INSTALLED_BIN = "/usr/local/bin/snapcoord"  # where the examples expect it
SYSTEM_CONFIG = "/etc/snapcoord/config.toml"
SCRIPTS = (
    "veeam/pre-freeze.sh",
    "veeam/post-thaw.sh",
    "vzdump/snapcoord-vzdump-hook",
)
URI = "test:///default"  # freeze and thaw never call the hypervisor


def installed_snapcoord() -> Path:
    assert os.access(SNAPCOORD_BIN, os.X_OK), f"{SNAPCOORD_BIN} missing: pip install -e '.[dev]'"
    return SNAPCOORD_BIN


# -- systemd ---------------------------------------------------------------------------------


def unit_folder(tmp_path: Path, extra_service_line: str = "") -> Path:
    """The two template units in a folder of their own, ExecStart's binary replaced by this
    venv's snapcoord (``systemd-analyze verify`` fails on a missing executable)."""
    folder = tmp_path / "units"
    folder.mkdir()
    service = (EXAMPLES / "systemd" / "snapcoord@.service").read_text()
    assert service.count(f"ExecStart={INSTALLED_BIN} ") == 1
    service = service.replace(f"ExecStart={INSTALLED_BIN} ", f"ExecStart={installed_snapcoord()} ")
    if extra_service_line:
        service = service.replace("[Service]\n", f"[Service]\n{extra_service_line}\n")
    (folder / "snapcoord@.service").write_text(service)
    timer = (EXAMPLES / "systemd" / "snapcoord@.timer").read_text()
    (folder / "snapcoord@.timer").write_text(timer)
    return folder


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = lab.require("systemd-analyze", "systemd")
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def verify_instances(folder: Path) -> subprocess.CompletedProcess[str]:
    """Verify the instances ``nightly`` of both templates: systemd-analyze adds the folder of
    the named files to its unit path, so the templates there serve the instance names."""
    units = [str(folder / f"snapcoord@nightly.{kind}") for kind in ("service", "timer")]
    return analyze("verify", *units, cwd=folder)


def complaints(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """Lines of systemd-analyze's output about our units (they name the file or the unit);
    warnings about the system's own units are not ours to judge."""
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if "snapcoord" in line]


def test_systemd_units_verify_without_a_warning(tmp_path: Path) -> None:
    verified = verify_instances(unit_folder(tmp_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert complaints(verified) == [], verified.stdout + verified.stderr


def test_systemd_verify_would_report_an_unknown_directive(tmp_path: Path) -> None:
    """The check above is not vacuous: the same call names a directive systemd does not know."""
    verified = verify_instances(unit_folder(tmp_path, "NoSuchDirective=yes"))
    assert any("NoSuchDirective" in line for line in complaints(verified)), (
        verified.stdout + verified.stderr
    )


def test_systemd_service_hardening_is_rated_ok(tmp_path: Path) -> None:
    folder = unit_folder(tmp_path)
    service = str(folder / "snapcoord@nightly.service")
    rated = analyze("security", "--offline=true", "--no-pager", service, cwd=folder)
    output = rated.stdout + rated.stderr
    found = re.search(
        r"Overall exposure level for snapcoord@nightly\.service: ([\d.]+) (\w+)", output
    )
    assert found, output
    assert found.group(2) in ("SAFE", "OK"), found.group(0)


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (comments and sections left out), by key."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_service_is_a_oneshot_snapshot_that_hides_no_failure() -> None:
    settings = unit_settings((EXAMPLES / "systemd" / "snapcoord@.service").read_text())
    assert settings["Type"] == ["oneshot"]
    assert settings["ExecStart"] == [f"{INSTALLED_BIN} snapshot --select %i"]
    assert settings["Environment"] == [f"SNAPCOORD_CONFIG={SYSTEM_CONFIG}"]
    assert "SuccessExitStatus" not in settings  # 75, 6, ... all fail the unit
    assert "/var/lib/snapcoord" in settings["ReadWritePaths"]  # the default store
    assert settings["ProtectHome"] == ["read-only"]  # /root/.ssh stays readable
    families = settings["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)  # SSH, HTTPS, libvirtd
    timer = unit_settings((EXAMPLES / "systemd" / "snapcoord@.timer").read_text())
    assert timer["Persistent"] == ["true"] and timer["WantedBy"] == ["timers.target"]


# -- the Proxmox API double, for the scheduled runs ------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("examples-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    server = start_double(cert, task_seconds=0.02)
    yield server
    server.stop()


# vms.X -> the double's VMID (seeded guests, tests/pve_api/cluster.py); hypervisor-only VMs
NIGHTLY = {"db": 100, "web": 102}
UNTAGGED = {"other": 202}


def pve_config(
    tmp_path: Path, double: PveApiDouble, cert: Cert, extra_vms: dict[str, Any] | None = None
) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store"), "label": "scheduled"},
        "hypervisors.pve": hypervisor_table(double, cert, lock_wait_seconds=0.5),
        "vms.db": {"hypervisor": "pve", "name": "db1", "tags": ["nightly"]},
        "vms.web": {"hypervisor": "pve", "vmid": 102, "tags": ["nightly", "prod"]},
        "vms.other": {"hypervisor": "pve", "vmid": 202},
        **(extra_vms or {}),
    }
    return write_config(tmp_path / "snapcoord.toml", tables)


def snapcoord_snapshots(double: PveApiDouble, vmid: int) -> dict[str, str]:
    with double.cluster.lock:
        snaps = double.cluster.guests[vmid].snapshots
        return {name: snap.description for name, snap in snaps.items()}


def assert_snapshotted(double: PveApiDouble, label: str, vmids: set[int]) -> None:
    """Each of ``vmids`` has exactly one new snapcoord snapshot labelled ``label``; every other
    guest of the double has none (the double starts without snapshots)."""
    with double.cluster.lock:
        all_vmids = set(double.cluster.guests)
    for vmid in sorted(all_vmids):
        snaps = snapcoord_snapshots(double, vmid)
        if vmid in vmids:
            [(name, description)] = snaps.items()
            assert name.startswith(f"snapcoord-{label}-"), name
            assert description.startswith(MARKER), description
        else:
            assert snaps == {}, f"vmid {vmid} was not selected: {snaps}"


def cron_like_env(tmp_path: Path, settings: dict[str, str]) -> dict[str, str]:
    """What cron gives a job: HOME, LOGNAME, SHELL and the file's own variables, and nothing
    of this test's environment but the API token (the config reads it from the environment)
    and pytest-cov's variables (subprocess coverage)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "LOGNAME": "root", "SHELL": "/bin/sh", **settings}
    env[TOKEN_ENV] = TOKEN_SECRET
    env.update({k: v for k, v in os.environ.items() if k.startswith("COV_CORE_")})
    return env


# -- systemd's ExecStart, run as systemd would ---------------------------------------------


@pytest.mark.parametrize(
    ("instance", "selected"),
    [("nightly", set(NIGHTLY.values())), ("db", {NIGHTLY["db"]})],
    ids=["a-tag", "a-vm"],
)
def test_systemd_execstart_snapshots_the_instance(
    instance: str, selected: set[int], double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    settings = unit_settings((EXAMPLES / "systemd" / "snapcoord@.service").read_text())
    [exec_start] = settings["ExecStart"]
    argv = [arg.replace("%i", instance) for arg in shlex.split(exec_start)]
    assert argv[0] == INSTALLED_BIN
    argv[0] = str(installed_snapcoord())
    [environment] = settings["Environment"]
    name, _, value = environment.partition("=")
    assert (name, value) == ("SNAPCOORD_CONFIG", SYSTEM_CONFIG)
    # the test's config instead of /etc/snapcoord/config.toml
    env = cron_like_env(tmp_path, {"SNAPCOORD_CONFIG": str(pve_config(tmp_path, double, cert))})
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's
    ran = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert_snapshotted(double, "scheduled", selected)  # [defaults] label


# -- cron --------------------------------------------------------------------------------------


def cron_file() -> tuple[dict[str, str], list[tuple[list[str], str, str]]]:
    """examples/cron/snapcoord: its variables and its jobs (5 time fields, user, command)."""
    text = (EXAMPLES / "cron" / "snapcoord").read_text()
    assert text.endswith("\n"), "cron ignores a last line without a newline"
    variables: dict[str, str] = {}
    jobs = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", stripped)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2).strip("\"'")
            continue
        fields = stripped.split(None, 6)
        assert len(fields) == 7, f"not a cron.d job line: {line}"
        jobs.append((fields[:5], fields[5], fields[6]))
    return variables, jobs


def test_cron_file_is_one_nightly_root_job() -> None:
    name = (EXAMPLES / "cron" / "snapcoord").name
    assert "." not in name, "cron skips /etc/cron.d files with a dot in their name"
    variables, jobs = cron_file()
    [(when, user, command)] = jobs
    minute, hour, *rest = when
    assert rest == ["*", "*", "*"] and 0 <= int(hour) <= 5 and 0 <= int(minute) <= 59
    assert user == "root"
    assert "snapcoord snapshot --tag nightly" in command
    assert "%" not in command.replace("\\%", ""), "cron turns % into a newline"
    assert variables["SNAPCOORD_CONFIG"] == SYSTEM_CONFIG
    assert "/usr/local/bin" in variables["PATH"].split(":")  # where pip installs snapcoord


def run_cron_job(tmp_path: Path, config: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the cron line's command as cron would (``$SHELL -c`` in HOME with the file's
    variables). The test substitutes its own paths for the file's system paths: the config
    (SNAPCOORD_CONFIG), the log (SNAPCOORD_LOG), and PATH gets this venv's bin and a stand-in
    ``logger`` (recording its arguments, as syslog would) in front."""
    variables, [(_when, _user, command)] = cron_file()
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    syslog = tmp_path / "syslog"
    logger = stubs / "logger"
    logger.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(syslog))}\n')
    logger.chmod(0o755)
    env = cron_like_env(tmp_path, variables)
    env["SNAPCOORD_CONFIG"] = str(config)
    env["SNAPCOORD_LOG"] = str(tmp_path / "snapcoord.log")
    env["PATH"] = f"{stubs}:{installed_snapcoord().parent}:{variables['PATH']}"
    ran = subprocess.run(
        [env["SHELL"], "-c", command],
        capture_output=True,
        text=True,
        env=env,
        cwd=env["HOME"],
        timeout=180,
    )
    return ran, syslog


def test_cron_job_snapshots_the_nightly_vms_only(
    double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    ran, syslog = run_cron_job(tmp_path, pve_config(tmp_path, double, cert))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout == ran.stderr == "", "everything goes to the log, cron mails nothing"
    assert_snapshotted(double, "nightly", set(NIGHTLY.values()))  # --label nightly
    log = unstamped((tmp_path / "snapcoord.log").read_text())  # every line has its time
    for key in NIGHTLY:
        assert re.search(rf"^{key}: snapshot ok, snapshot snapcoord-nightly-", log, re.M), log
    assert not re.search(r"^other:", log, re.M), log
    assert not syslog.exists(), "a successful run leaves nothing in syslog"


def test_cron_job_failure_leaves_a_syslog_line_with_the_exit_code(
    double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    missing = {"vms.gone": {"hypervisor": "pve", "name": "no-such-vm", "tags": ["nightly"]}}
    ran, syslog = run_cron_job(tmp_path, pve_config(tmp_path, double, cert, missing))
    assert ran.stdout == ran.stderr == "", ran.stdout + ran.stderr
    [line] = syslog.read_text().splitlines()
    assert line.startswith("-t snapcoord -p cron.err "), line
    assert "failed with exit code 3" in line, line  # the VM is not on its hypervisor
    assert_snapshotted(double, "nightly", set(NIGHTLY.values()))  # the others still ran
    assert "gone" in (tmp_path / "snapcoord.log").read_text()


# -- the scripts --------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable_posix_sh(script: str) -> None:
    path = EXAMPLES / script
    assert path.read_text().startswith("#!/bin/sh\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o755 == 0o755, f"{script}: mode {mode:o}, want 755 (chmod 755 {path})"
    parsed = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    shellcheck = lab.which("shellcheck")
    if shellcheck:  # optional: not installed by scripts/install-system-deps
        checked = subprocess.run(
            [shellcheck, "-s", "sh", str(path)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_backup_product_configs_name_the_installed_paths() -> None:
    """vzdump.conf names where the wrapper is installed; the Bacula job freezes before and thaws
    after, also after a failure, and a failed freeze aborts the job."""
    vzdump = (EXAMPLES / "vzdump" / "vzdump.conf").read_text()
    options = [line for line in vzdump.splitlines() if line and not line.startswith("#")]
    assert options == ["script: /usr/local/bin/snapcoord-vzdump-hook"]
    bacula = (EXAMPLES / "bacula" / "bacula-dir.conf.snippet").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in bacula.splitlines())
    blocks = re.findall(r"RunScript\s*\{(.*?)\}", code, re.DOTALL)
    scripts = [
        {k.strip(): v.strip().strip('"') for k, v in re.findall(r"^\s*(\w+)\s*=\s*(.+)$", b, re.M)}
        for b in blocks
    ]
    before, after = scripts
    assert before["RunsWhen"] == "Before" and before["FailJobOnError"] == "yes"
    assert shlex.split(before["Command"])[0] == INSTALLED_BIN
    assert shlex.split(before["Command"])[3:5] == ["freeze", "db1"]
    assert after["RunsWhen"] == "After" and after["RunsOnFailure"] == "yes"
    assert shlex.split(after["Command"])[3:] == ["thaw", "db1"]


# -- Veeam and vzdump against the loopback guest ----------------------------------------------


def holder_pids(vm: str = VM_NAME) -> list[int]:
    return [
        pid
        for pid, _comm, args in lab.process_table()
        if "snapcoord.holder" in args and args.split()[-1] == vm
    ]


def holder_args(vm: str = VM_NAME) -> list[str]:
    return [
        args
        for _pid, _comm, args in lab.process_table()
        if "snapcoord.holder" in args and args.split()[-1] == vm
    ]


def run_example(
    script: str, *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def script_env(config: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPCOORD_")}
    env["PATH"] = f"{installed_snapcoord().parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["SNAPCOORD_CONFIG"] = str(config)
    return {**env, **extra}


def all_down(services: lab.GuestServices) -> bool:
    return not any(services.states().values())


@pytest.fixture
def thaw_after(tmp_path: Path) -> Iterator[list[Path]]:
    """Configs whose VM is thawed after the test if a holder is still there (a failed test
    must not leave the lab frozen until the limit)."""
    configs: list[Path] = []
    yield configs
    for config in configs:
        if holder_pids():
            subprocess.run(
                [str(installed_snapcoord()), "-c", str(config), "thaw", VM_NAME],
                capture_output=True,
                timeout=180,
            )


def test_veeam_pre_freeze_and_post_thaw_against_the_guest(
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    thaw_after: list[Path],
) -> None:
    config = guest_config(tmp_path, URI, ssh_guest.guest_table())
    thaw_after.append(config)
    env = script_env(config, SNAPCOORD_MAX_SECONDS="600")
    assert lab_services.all_running()

    frozen = run_example("veeam/pre-freeze.sh", VM_NAME, env=env)
    assert frozen.returncode == 0, frozen.stdout + frozen.stderr
    assert all_down(lab_services), lab_services.states()
    [holder] = holder_pids()
    [args] = holder_args()
    assert "--max-seconds 600" in args, args  # SNAPCOORD_MAX_SECONDS reached snapcoord

    # a second pre-freeze passes snapcoord's 75 through and changes nothing
    again = run_example("veeam/pre-freeze.sh", VM_NAME, env=env)
    assert again.returncode == 75, again.stdout + again.stderr
    assert "already frozen" in again.stderr
    assert holder_pids() == [holder] and all_down(lab_services)

    # the VM from $SNAPCOORD_VM instead of an argument
    thawed = run_example("veeam/post-thaw.sh", env={**env, "SNAPCOORD_VM": VM_NAME})
    assert thawed.returncode == 0, thawed.stdout + thawed.stderr
    assert lab_services.all_running(), lab_services.states()
    assert f"{VM_NAME}: thaw ok" in thawed.stdout
    wait_for(lambda: holder_pids() == [], 10, "the holder to exit")


def test_veeam_scripts_without_a_vm_are_usage_errors(tmp_path: Path) -> None:
    env = script_env(tmp_path / "unused.toml")
    for script in ("veeam/pre-freeze.sh", "veeam/post-thaw.sh"):
        ran = run_example(script, env=env, timeout=30)
        assert ran.returncode == 2, ran.stdout + ran.stderr
        assert "no VM" in ran.stderr and "SNAPCOORD_VM" in ran.stderr


def test_veeam_post_thaw_passes_a_late_thaw_through_as_5(
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    thaw_after: list[Path],
) -> None:
    """The freeze ran out before post-thaw: the snapshot may not be consistent, and Veeam must
    hear so (exit 5), with everything running."""
    config = guest_config(tmp_path, URI, ssh_guest.guest_table())
    thaw_after.append(config)
    env = script_env(config, SNAPCOORD_MAX_SECONDS="10")
    assert run_example("veeam/pre-freeze.sh", VM_NAME, env=env).returncode == 0
    wait_for(lab_services.all_running, 60, "the holder to restore at the limit")
    wait_for(lambda: holder_pids() == [], 15, "the holder to exit")
    late = run_example("veeam/post-thaw.sh", VM_NAME, env=env)
    assert late.returncode == 5, late.stdout + late.stderr
    assert "may not be consistent" in late.stderr
    assert lab_services.all_running()


VZDUMP_VMID = 4242


def test_vzdump_wrapper_freezes_at_pre_stop_and_thaws_at_post_restart(
    ssh_guest: lab.SshGuest,
    lab_services: lab.GuestServices,
    tmp_path: Path,
    thaw_after: list[Path],
) -> None:
    """The phases of one snapshot-mode backup of a container, as vzdump calls the hook (its
    storage snapshot falls between pre-stop and pre-restart); a QEMU VM's pre-stop through the
    same wrapper refuses without the guest agent and the freeze hook."""
    config = guest_config(tmp_path, URI, ssh_guest.guest_table())
    text = config.read_text().replace(
        f"[vms.{VM_NAME}]\n", f"[vms.{VM_NAME}]\nvzdump_vmid = {VZDUMP_VMID}\n", 1
    )
    config.write_text(text)
    thaw_after.append(config)
    env = script_env(config, VMTYPE="lxc")
    hook = "vzdump/snapcoord-vzdump-hook"
    vmid = str(VZDUMP_VMID)

    for phase in ("job-init", "job-start"):
        ran = run_example(hook, phase, env=env)
        assert ran.returncode == 0, ran.stdout + ran.stderr
    assert run_example(hook, "backup-start", "snapshot", vmid, env=env).returncode == 0
    assert lab_services.all_running()

    frozen = run_example(hook, "pre-stop", "snapshot", vmid, env=env)
    assert frozen.returncode == 0, frozen.stdout + frozen.stderr
    assert all_down(lab_services), lab_services.states()
    assert len(holder_pids()) == 1

    still = run_example(hook, "pre-restart", "snapshot", vmid, env=env)
    assert still.returncode == 0, still.stdout + still.stderr
    assert all_down(lab_services), lab_services.states()
    thawed = run_example(hook, "post-restart", "snapshot", vmid, env=env)
    assert thawed.returncode == 0, thawed.stdout + thawed.stderr
    assert lab_services.all_running(), lab_services.states()
    wait_for(lambda: holder_pids() == [], 10, "the holder to exit")
    ran = run_example(hook, "backup-end", "snapshot", vmid, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert run_example(hook, "job-end", env=env).returncode == 0
    assert lab_services.all_running()

    qemu = run_example(hook, "pre-stop", "snapshot", vmid, env=script_env(config, VMTYPE="qemu"))
    assert qemu.returncode == 3, qemu.stdout + qemu.stderr  # the agent check asks the hypervisor
    stderr = unstamped(qemu.stderr)  # snapcoord's own lines, into a pipe: each with its time
    errors = [line for line in stderr.splitlines() if line.startswith("snapcoord: error:")]
    assert len(errors) == 1 and "Traceback" not in qemu.stderr, qemu.stderr
    assert lab_services.all_running() and holder_pids() == []


def stand_in_snapcoord(tmp_path: Path, exit_code: int) -> tuple[Path, Path]:
    """A ``snapcoord`` that records its arguments (one a line) and $SNAPCOORD_CONFIG, and exits
    ``exit_code``: what the scripts hand over, and that they pass the code through. Returns the
    folder to put first in PATH and the record file."""
    folder = tmp_path / "stand-in"
    folder.mkdir()
    record = tmp_path / "record"
    script = folder / "snapcoord"
    script.write_text(
        "#!/bin/sh\n"
        f"exec >{shlex.quote(str(record))}\n"
        'echo "config=${SNAPCOORD_CONFIG-<unset>}"\n'
        'for arg in "$@"; do echo "arg=$arg"; done\n'
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return folder, record


def stand_in_env(folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPCOORD_")}
    env["PATH"] = f"{folder}:/usr/bin:/bin"
    return {**env, **extra}


def recorded(record: Path) -> tuple[str, list[str]]:
    lines = record.read_text().splitlines()
    return lines[0].removeprefix("config="), [line.removeprefix("arg=") for line in lines[1:]]


@pytest.mark.parametrize("exit_code", [0, 4, 75])
def test_vzdump_wrapper_hands_everything_over_and_defaults_the_config(
    tmp_path: Path, exit_code: int
) -> None:
    folder, record = stand_in_snapcoord(tmp_path, exit_code)
    ran = run_example(
        "vzdump/snapcoord-vzdump-hook", "pre-stop", "snapshot", "100", env=stand_in_env(folder)
    )
    assert ran.returncode == exit_code, ran.stderr
    assert recorded(record) == (SYSTEM_CONFIG, ["vzdump-hook", "pre-stop", "snapshot", "100"])
    ran = run_example(
        "vzdump/snapcoord-vzdump-hook",
        "job-end",
        env=stand_in_env(folder, SNAPCOORD_CONFIG="/srv/my config.toml"),
    )
    assert ran.returncode == exit_code, ran.stderr
    assert recorded(record) == ("/srv/my config.toml", ["vzdump-hook", "job-end"])


@pytest.mark.parametrize(
    ("script", "command", "exit_code"),
    [
        ("veeam/pre-freeze.sh", "freeze", 4),
        ("veeam/pre-freeze.sh", "freeze", 75),
        ("veeam/post-thaw.sh", "thaw", 5),
        ("veeam/post-thaw.sh", "thaw", 6),
        ("veeam/post-thaw.sh", "thaw", 1),
    ],
)
def test_veeam_scripts_pass_every_exit_code_through(
    tmp_path: Path, script: str, command: str, exit_code: int
) -> None:
    folder, record = stand_in_snapcoord(tmp_path, exit_code)
    ran = run_example(script, "db 1", env=stand_in_env(folder))
    assert ran.returncode == exit_code, ran.stderr
    assert f"exit {exit_code}" in ran.stderr or "consistent" in ran.stderr, ran.stderr
    # the configuration is snapcoord's to find: the scripts set none of their own
    assert recorded(record) == ("<unset>", [command, "db 1"])
    if command == "freeze":
        env = stand_in_env(folder, SNAPCOORD_VM="db2", SNAPCOORD_MAX_SECONDS="900")
        assert run_example(script, env=env).returncode == exit_code
        assert recorded(record)[1] == ["freeze", "db2", "--max-seconds", "900"]

"""The lab's isolation itself (tests/lab/sandbox.py, isolation.py, host_services.py): a worker's
guest is a sandbox whose services, files and processes are its own, and a change to a service
outside the sandbox is what the session check catches."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import lab
from tests.guest_fixtures import wait_for
from tests.lab import host_services, sandbox
from tests.lab.guests import more_guests

pytestmark = pytest.mark.real


def test_this_worker_runs_in_a_sandbox_with_its_own_pid_1(
    guest_services: lab.GuestServices,
) -> None:
    assert sandbox.active()
    init = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"tests/lab/sandbox.py") for part in init)
    assert not Path("/run/systemd/system").exists(), "service uses the init scripts"
    assert Path(sandbox.INSIDE, sandbox.PORTS_FILE).is_file()


def test_the_sandbox_servers_listen_on_its_own_ports(guest_services: lab.GuestServices) -> None:
    ports = sandbox.ports()
    assert len(set(ports.values())) == 3
    assert lab.mysql_rows("SELECT @@port")[0][0] == str(ports["mysql"])
    assert lab.mysql_rows("SELECT @@bind_address")[0][0] == "127.0.0.1"
    page = lab.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                    f"http://127.0.0.1:{ports['http']}/"])  # fmt: skip
    assert page.stdout == "200"


def test_the_sandbox_holds_its_ports_below_the_ephemeral_range() -> None:
    """No bind(0) on the machine can be given a sandbox's port while its service is stopped
    (they are below net.ipv4.ip_local_port_range), and no other sandbox takes one: each is
    locked by this sandbox's PID 1 for its life. Two sandboxes once got the same port from
    bind(0), and one's Apache could not start while the other's MariaDB held it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for name, port in sandbox.ports().items():
        assert port < low, f"{name} port {port} is in the ephemeral range (from {low})"
        lock = sandbox.PORT_LOCKS / f"{port}.lock"
        taken = lab.run(["flock", "-n", str(lock), "true"], check=False)
        assert taken.returncode != 0, f"nothing holds the lock of {name} port {port}"


def test_etc_changes_stay_in_the_sandbox(guest_services: lab.GuestServices) -> None:
    """/etc is an overlay: what the lab writes there is the sandbox's, and the host's /etc as
    the sandbox's parent sees it (``outside`` of the sandbox's own upper layer) has none of it."""
    marker = Path("/etc/snapcoord-lab-sandbox-marker")
    marker.write_text("sandbox\n")
    try:
        upper = sandbox.outside(Path(sandbox.INSIDE, "etc-upper", marker.name))
        assert upper.parent.parent.name.startswith("snapcoord-sandbox-")
        assert Path(sandbox.INSIDE, "etc-upper", marker.name).read_text() == "sandbox\n"
        mounts = Path("/proc/self/mountinfo").read_text()
        assert " /etc " in mounts and "overlay" in mounts
    finally:
        marker.unlink()


def test_a_nested_sandbox_sees_neither_our_processes_nor_our_files(
    guest_services: lab.GuestServices, tmp_path: Path
) -> None:
    """Another sandbox (here: nested in ours) has its own MariaDB, /run and /tmp; stopping its
    cron leaves ours running, and it cannot see our processes."""
    own_tmp = Path("/tmp/snapcoord-lab-sandbox-probe")
    own_tmp.write_text("ours\n")
    ours = subprocess.Popen(["sleep", "301.5"])  # a process of this sandbox, by its arguments
    try:
        with more_guests(1) as (other,):
            script = (
                "test ! -e /tmp/snapcoord-lab-sandbox-probe && echo tmp-private; "
                "pgrep -fx 'sleep 301.5' >/dev/null || echo pid-private; "
                "service cron stop >/dev/null && echo stopped; "
                "mysql -N -e 'SELECT @@port'"
            )
            out = other.ssh("sh", "-c", script).stdout.split()
            assert out[:3] == ["tmp-private", "pid-private", "stopped"], out
            assert out[3] != str(sandbox.ports()["mysql"])
            assert guest_services.running("cron"), "our cron is not theirs"
            assert other.ssh("service", "cron", "status", check=False).returncode != 0
            assert any(args.split() == ["sleep", "301.5"] for _p, _c, args in lab.process_table())
    finally:
        ours.kill()
        ours.wait()
        own_tmp.unlink()


def test_the_host_check_sees_a_service_that_was_started_stopped_or_restarted(
    tmp_path: Path,
) -> None:
    """The session check (tests/lab/isolation.py) on real processes: a program named ``cron``
    started, then stopped and started again, shows as appeared, then stopped and appeared."""
    fake = tmp_path / "cron"
    shutil.copy("/bin/sleep", fake)
    before = host_services.services()
    first = subprocess.Popen([str(fake), "60"])
    try:
        during = host_services.services()
        started = [s for s in during - before if s.pid == first.pid]
        assert [s.name for s in started] == ["cron"]
        assert host_services.changes(before, during) == [
            f"cron (pid {first.pid}) was started during the tests"
        ]
    finally:
        first.kill()
        first.wait()
    second = subprocess.Popen([str(fake), "60"])
    try:
        after = host_services.services()
        lines = host_services.changes(during, after)
        assert f"cron (pid {first.pid}) stopped or restarted during the tests" in lines
        assert f"cron (pid {second.pid}) was started during the tests" in lines
    finally:
        second.kill()
        second.wait()
    assert host_services.changes(before, host_services.services()) == []


def test_a_service_worker_process_is_not_a_service_of_its_own(tmp_path: Path) -> None:
    """Only the top of a service's process tree counts: a forked worker of ``apache2`` (its
    parent has the same name) comes and goes without being a change."""
    fake = tmp_path / "apache2"
    fake.write_text("#!/bin/sh\n( while :; do sleep 1; done ) &\nwait\n")
    fake.chmod(0o755)
    server = subprocess.Popen([str(fake)], start_new_session=True)
    try:
        wait_for(lambda: len(lab.process_group(server.pid)) >= 3, 10, "the worker to fork")
        workers = [pid for pid in lab.process_group(server.pid) if pid != server.pid
                   and Path(f"/proc/{pid}/comm").read_text().strip() == "apache2"]  # fmt: skip
        assert workers, "the forked worker has the server's name"
        ours = set(lab.process_group(server.pid))  # the sandbox's own Apache is not ours
        found = [s.pid for s in host_services.services() if s.name == "apache2" and s.pid in ours]
        assert found == [server.pid]
    finally:
        os.killpg(server.pid, 9)
        server.wait()

"""pytest plugin: every test runs in a lab sandbox, never against the host's own services.

Loaded for every run (``-p tests.lab.isolation`` in pyproject.toml's addopts). In the process
that starts pytest (the controller), as root:

* every pytest-xdist worker starts through ``tests/lab/sandboxed-python``, so each has its own
  lab guest (tests/lab/sandbox.py); a run without ``-n`` gets one worker, so the lab is never
  the host. Tests are distributed by load, except the QEMU group (the tests that share one real
  Debian guest, and the libvirtd + QEMU tests), which goes to one worker as one unit, first.
* libvirtd is started once for all workers (and shared with other pytest sessions on this
  machine) and stopped after the last one ends (tests/libvirtd.py :class:`SharedLibvirtd`).
* the host's own MariaDB, Apache, cron and PostgreSQL processes are recorded before the run
  and compared after it (tests/lab/host_services.py): if any stopped, restarted or appeared,
  the session fails.

Without root nothing changes (the lab's tests skip, or fail under CI=true). Inside a sandbox
(an xdist worker, or ``tests/lab/sandboxed-python -m pytest``) the tests run where they are.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.lab import host_services, sandbox

WRAPPER = Path(__file__).resolve().with_name("sandboxed-python")

_BEFORE = pytest.StashKey[frozenset[host_services.HostService]]()
_LIBVIRTD = pytest.StashKey[object]()


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and not sandbox.active()


def _sandboxed_specs(specs: list[str]) -> list[str]:
    out = []
    for spec in specs:
        if spec.split("//", 1)[0] != "popen" or "python=" in spec:
            raise pytest.UsageError(
                f"--tx {spec}: the lab runs only in local workers it starts itself (popen)"
            )
        out.append(f"{spec}//python={WRAPPER}")
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0 or not _is_controller(config) or config.getoption("collectonly"):
        return
    if not hasattr(config.option, "tx"):
        return  # no pytest-xdist: the lab's fixtures refuse to run (tests/lab/common.py)
    if config.option.dist == "no" or not config.option.tx:
        config.option.dist = "load"
        config.option.tx = ["popen"]
    config.option.tx = _sandboxed_specs(list(config.option.tx))
    os.environ["SNAPCOORD_LAB_PYTHON"] = sys.executable
    config.stash[_BEFORE] = host_services.services()
    if shutil.which("libvirtd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
        from tests.libvirtd import SharedLibvirtd

        shared = SharedLibvirtd()
        shared.acquire()
        config.stash[_LIBVIRTD] = shared


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(_LIBVIRTD, None)
    if shared is not None:
        shared.release()  # type: ignore[attr-defined]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    lines = host_services.changes(before, host_services.services())
    if not lines:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(f"host services: {line}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


#: Tests that share one real Debian guest under QEMU (tests/realvm_guest.py), or drive QEMU
#: through libvirtd: one group, run on one worker, beside the others. By module, because the
#: controller schedules by node id: xdist's own ``xdist_group`` marks do not reach the node ids
#: under pytest 9.2 (xdist 3.8 rewrites ``item._nodeid``, which pytest no longer reads).
QEMU_GROUP = "realvm"
QEMU_MODULES = ("tests/test_realvm.py", "tests/test_realvm_boot.py",
                "tests/test_realvm_fsfreeze.py", "tests/test_realvm_install.py",
                "tests/test_realvm_agent.py", "tests/test_realvm_agent_e2e.py",
                "tests/test_realvm_lease.py", "tests/test_libvirt_qemu.py",
                "tests/test_realvm_boot_verify.py", "tests/test_realvm_verify_cli.py")  # fmt: skip


def in_qemu_group(nodeid: str) -> bool:
    return nodeid.split("::", 1)[0] in QEMU_MODULES


#: Fixtures that start or use a real service: a test that uses any of them is marked ``real``
#: (``make test-fast`` leaves those out).
REAL_FIXTURES = frozenset({
    "ssh_guest", "sudo_guest", "nosudo_guest", "guest_users", "guest_services", "lab_services",
    "idoit_db", "scratch_mariadb", "pg_services", "pg_shop", "real_guest", "qemu_uri",
    "vcsim_binary", "vcsim_factory", "vcsim", "guests",
})  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A real-guest module outside the group would boot a guest of its own on each worker its
    # tests land on, and a module's later tests would miss what its earlier ones did there.
    strays = sorted(
        {
            item.nodeid.split("::", 1)[0]
            for item in items
            if item.get_closest_marker("realvm") and not in_qemu_group(item.nodeid)
        }
    )
    if strays:
        raise pytest.UsageError(
            f"realvm tests outside the QEMU group: {', '.join(strays)} "
            "(add the module to QEMU_MODULES in tests/lab/isolation.py)"
        )
    for item in items:
        if REAL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)
        if in_qemu_group(item.nodeid):
            item.add_marker(pytest.mark.qemu)
    # The QEMU group first: one worker takes it at once and the others share the rest, so the
    # longest group runs beside everything else instead of after it.
    items.sort(key=lambda item: not in_qemu_group(item.nodeid))


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # an xdist hook: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Load scheduling, with the QEMU group as one unit of work (see :data:`QEMU_GROUP`)."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler.loadscope import LoadScopeScheduling

    class QemuGroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return QEMU_GROUP if in_qemu_group(nodeid) else nodeid

    return QemuGroupScheduling(config, log)

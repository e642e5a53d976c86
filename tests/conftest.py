"""Shared pytest fixtures: the real guest lab (tests/lab/) and the i-doit-like dataset.

The "guest" is this worker's lab sandbox (tests/lab/sandbox.py: its own mount and PID
namespaces, /etc overlay, /run, datadirs and ports), reached over a private OpenSSH server on
127.0.0.1; never this machine's own services. All lab fixtures need root and the sandbox; a
missing component skips the test, or fails it when ``CI=true``.

Fixtures
--------
``ssh_guest`` (session)
    :class:`tests.lab.SshGuest` logging in as root: ``host``, ``port``, ``user``,
    ``identity_file``, ``known_hosts``, ``wrong_known_hosts`` (same host, a different key: the
    "host key changed" case), ``host_key_fingerprint`` (``SHA256:...``), ``ssh_config`` (alias
    ``snapcoord-lab``), ``pid`` of the sshd, ``guest_table(**overrides)`` -> ``[vms.X.guest]``
    dict, ``ssh(*argv)`` to run a command strictly, ``as_user(name)``.
``guest_users`` (session)
    ``{"sudo": "snapcoord-test", "nosudo": "snapcoord-nosudo"}``; both users exist and log in
    with the lab key; ``snapcoord-test`` has ``NOPASSWD: ALL`` in /etc/sudoers.d/snapcoord-test.
``sudo_guest`` / ``nosudo_guest`` (session)
    ``ssh_guest`` logging in as those users (``guest_table()`` then has ``sudo = true``).
``guest_services`` (function)
    mariadb, apache2 and cron are running when the test starts, and are running again after it
    (started with ``service NAME start`` only if needed; anything ``break_start`` did is
    repaired first). Holds the sandbox's lab lock (/run/snapcoord-lab.lock) for the test. Yields
    :class:`tests.lab.GuestServices`: ``running(name)``, ``states()``, ``stop(name)``,
    ``start(name)``, ``mariadb_uptime()``, ``mysqld_running()`` (a process check from outside),
    ``break_start(name)`` / ``break_start_command(name)`` (the next ``service NAME start``
    fails; the command form is a shell line for a ``frozen`` hook).
``idoit_db`` (function)
    the i-doit-like dataset (tests/idoit_fixture.py) in the guest's MariaDB, in its pristine
    state: built once per session, rebuilt (about 1 s) only if an earlier test changed it.
    Yields :class:`tests.idoit_fixture.IdoitDB` with the baseline ``checksums``, ``row_counts``,
    ``schema`` (fingerprint), ``objects`` (views, triggers, routines, events, foreign keys),
    ``is_pristine()``, ``mutate_schema_for_errno150()``, ``mutate_data()``.
    ``idoit_fixture.add_broken_view()`` makes the next mysqldump fail mid-stream (exit 2,
    no completion marker).
``scratch_mariadb`` (function)
    a private MariaDB server (own datadir/socket/port, started and stopped by PID, one per
    session) with every non-system database dropped before the test:
    :class:`tests.lab.ScratchMariaDB` with ``socket``, ``load(path)``, ``checksums(dbs)``.

Helpers for tests: ``lab.require(cmd, apt_package)`` (skip, or fail under CI=true),
``lab.table_checksums(dbs, socket)``, ``lab.row_counts``, ``lab.mysql_exec``,
``lab.mysqldump_to``, ``lab.load_sql``, ``lab.mysqld_running()``, ``lab.lab_lock()``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests import idoit_fixture, lab, pg_fixture
from tests.lab import sandbox


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """A test module may define ``setup_failed(item)``: called when one of its tests fails in
    setup (the fault matrix records the cell, so its docs test never waits for it)."""
    report = yield
    if report.when == "setup" and report.failed:
        setup_failed = getattr(getattr(item, "module", None), "setup_failed", None)
        if callable(setup_failed):
            setup_failed(item)
    return report


def _require_guest_tools() -> None:
    lab.require_root()
    for cmd in ("sshd", "ssh", "ssh-keygen"):
        lab.require(cmd)


def _require_services() -> None:
    lab.require_root()
    lab.require("service")
    lab.require("mysql")
    lab.require("mysqladmin")
    packages = {"mariadb": "mariadb-server", "apache2": "apache2", "cron": "cron"}
    for name, package in packages.items():
        if not lab.init_script_exists(name):
            lab.require(f"/etc/init.d/{name}", package)


@pytest.fixture(autouse=True)
def _no_guest_lease_left() -> None:
    """Every test starts without a guest lease in its sandbox: a run an earlier test killed
    holds the sandbox's guest until its lease expires, and each test's runs are a coordinator
    of their own (their own store)."""
    if sandbox.active():
        lab.clear_guest_lease()


@pytest.fixture(scope="session")
def ssh_guest() -> Iterator[lab.SshGuest]:
    _require_guest_tools()
    guest = lab.start_sshd()
    try:
        yield guest
    finally:
        guest.stop()
        shutil.rmtree(guest.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_users() -> dict[str, str]:
    lab.require_root()
    lab.require("sudo")
    lab.require("visudo")
    return lab.ensure_test_users()


@pytest.fixture(scope="session")
def sudo_guest(ssh_guest: lab.SshGuest, guest_users: dict[str, str]) -> lab.SshGuest:
    return ssh_guest.as_user(guest_users["sudo"])


@pytest.fixture(scope="session")
def nosudo_guest(ssh_guest: lab.SshGuest, guest_users: dict[str, str]) -> lab.SshGuest:
    return ssh_guest.as_user(guest_users["nosudo"])


@pytest.fixture
def guest_services() -> Iterator[lab.GuestServices]:
    _require_services()
    services = lab.GuestServices()
    with lab.lab_lock():
        lab.end_leftovers()  # an earlier test's watchdog must not act in this one
        services.ensure_running()
        try:
            yield services
        finally:
            services.ensure_running()


@pytest.fixture(scope="session")
def _idoit_baseline() -> idoit_fixture.IdoitDB:
    _require_services()
    with lab.lab_lock():
        lab.ensure_running(["mariadb"])
        return idoit_fixture.build_idoit()


@pytest.fixture
def idoit_db(
    guest_services: lab.GuestServices, _idoit_baseline: idoit_fixture.IdoitDB
) -> Iterator[idoit_fixture.IdoitDB]:
    if not _idoit_baseline.is_pristine():
        _idoit_baseline.rebuild()
        if not _idoit_baseline.is_pristine():
            pytest.fail("rebuilding the i-doit dataset did not reproduce its checksums")
    yield _idoit_baseline
    if lab.mysqld_running():  # a test that broke a view leaves the server dumpable again
        idoit_fixture.remove_broken_view()


@pytest.fixture(scope="session")
def _scratch_server() -> Iterator[lab.ScratchMariaDB]:
    lab.require_root()
    lab.require("mariadbd", "mariadb-server")
    lab.require("mariadb-install-db", "mariadb-server")
    lab.require("mysql")
    server = lab.start_scratch_mariadb()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def scratch_mariadb(_scratch_server: lab.ScratchMariaDB) -> lab.ScratchMariaDB:
    if not _scratch_server.running():
        pytest.fail(f"the scratch MariaDB died; see {_scratch_server.log_file}")
    _scratch_server.reset()
    return _scratch_server


# -- PostgreSQL (not in the MariaDB tests' guest: these fixtures add it) ----------------------

PG_GUEST_SERVICES = (lab.PG_SERVICE, "apache2", "cron")


@pytest.fixture
def pg_services() -> Iterator[lab.GuestServices]:
    """PostgreSQL (loopback and socket only), apache2 and cron running before and after the
    test, under the lab lock; MariaDB is left as it is."""
    lab.require_root()
    lab.require("service")
    for cmd in ("pg_lsclusters", "psql", "pg_isready", "runuser"):
        lab.require(cmd)
    if not lab.init_script_exists(lab.PG_SERVICE):
        lab.require(f"/etc/init.d/{lab.PG_SERVICE}", "postgresql")
    services = lab.GuestServices(names=PG_GUEST_SERVICES)
    with lab.lab_lock():
        lab.end_leftovers()
        lab.ensure_postgresql()
        services.ensure_running()
        try:
            yield services
        finally:
            services.ensure_running()


@pytest.fixture
def pg_shop(pg_services: lab.GuestServices) -> pg_fixture.PgShop:
    """The PostgreSQL dataset (tests/pg_fixture.py), built fresh for the test."""
    return pg_fixture.build()

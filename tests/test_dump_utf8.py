"""Non-ASCII database, table and column names (and names with a backtick and quotes) through
the MySQL dump, its row counts and checksums, restore-dump and verify, on the real loopback SSH
guest and the lab MariaDB.

The guest's ``mysql`` client takes its character set from the locale unless told otherwise, and
an SSH session without LANG (the lab's sshd, sudo's reset environment) is in the C locale: the
client then spoke latin1, a database ``dé`` matched nothing in information_schema (its tables
were left out of the manifest) and a table ``ümlaut`` came back as invalid UTF-8, a name that
does not exist (ERROR 1146). snapcoord's client sessions now say utf8mb4
(hooks/databases/mysql.py CLIENT_CHARSET)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapcoord import store
from snapcoord.guest import ExecTransport, Transport, shell_transport
from snapcoord.hooks.databases import dumpfile, mysql
from snapcoord.plans.restore import DumpSource, restore_dump
from snapcoord.shell import Completed
from tests import lab
from tests.test_mysqldump import make_config, take_dump
from tests.verify_helpers import recorded_figures, verified_figures, verify_folder

pytestmark = pytest.mark.real

#: a non-ASCII database name, and an ASCII one holding non-ASCII table names
DB = "snapcoord_dé"
PLAIN = "snapcoord_utf8"
DATABASES = [DB, PLAIN]
TICK = "ti`ck'q\"uote"  # a backtick, a single and a double quote
#: "db.table" -> rows, as the manifest must name them (the same UTF-8 names)
ROWS = {
    f"{DB}.ümlaut": 3,
    f"{DB}.日本語": 2,
    f"{DB}.{TICK}": 2,
    f"{PLAIN}.ümlaut": 1,
    f"{PLAIN}.plain": 2,
}


def q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def guest_sql(sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """SQL into the guest's server as root, in utf8mb4 whatever this process's locale."""
    argv = lab.mysql_argv(None, "--default-character-set=utf8mb4")
    return lab.run(argv, input="SET NAMES utf8mb4;" + sql, timeout=120, check=check)


def create_names() -> None:
    d, p = q(DB), q(PLAIN)
    guest_sql(
        f"DROP DATABASE IF EXISTS {d}; DROP DATABASE IF EXISTS {p};"
        f"CREATE DATABASE {d} CHARACTER SET utf8mb4; CREATE DATABASE {p} CHARACTER SET utf8mb4;"
        f"CREATE TABLE {d}.`ümlaut` (id INT PRIMARY KEY, `cölumn` VARCHAR(40), `ß` TEXT)"
        " ENGINE=InnoDB;"
        f"INSERT INTO {d}.`ümlaut` VALUES (1, 'ä', 'Straße'), (2, '😀 four bytes', NULL),"
        " (3, '', 'x');"
        f"CREATE TABLE {d}.`日本語` (`名前` INT PRIMARY KEY AUTO_INCREMENT, `値` VARCHAR(20))"
        " ENGINE=InnoDB;"
        f"INSERT INTO {d}.`日本語` (`値`) VALUES ('一'), ('二');"
        f"CREATE TABLE {d}.{q(TICK)} ({q('c`o' + chr(39) + 'l')} INT PRIMARY KEY,"
        ' `é"` VARCHAR(10)) ENGINE=InnoDB;'
        f"INSERT INTO {d}.{q(TICK)} VALUES (1, 'a\\'b'), (2, 'ü');"
        f"CREATE VIEW {d}.`vüe` AS SELECT `cölumn` FROM {d}.`ümlaut`;"
        f"CREATE TABLE {p}.`ümlaut` (`ünique` INT PRIMARY KEY) ENGINE=InnoDB;"
        f"INSERT INTO {p}.`ümlaut` VALUES (7);"
        f"CREATE TABLE {p}.plain (id INT PRIMARY KEY, `naïve` VARCHAR(10)) ENGINE=InnoDB;"
        f"INSERT INTO {p}.plain VALUES (1, 'café'), (2, NULL);"
    )


@pytest.fixture
def odd_names(guest_services: lab.GuestServices) -> Iterator[None]:
    """The two databases above in the guest's server (removed after the test)."""
    lab.ensure_running(["mariadb"])
    create_names()
    yield
    guest_sql(f"DROP DATABASE IF EXISTS {q(DB)}; DROP DATABASE IF EXISTS {q(PLAIN)};", check=False)


def guest_transport(vm: Any) -> Transport:
    transport = shell_transport(vm.guest, vm="lab")
    transport.open()
    return transport


def guest_sums(vm: Any) -> dict[str, dumpfile.TableSum]:
    """table_sums over the guest's server, through snapcoord's own guest client."""
    transport = guest_transport(vm)
    try:
        client = mysql.Client.from_config(vm.dump, vm.guest, vm="lab")
        return mysql.table_sums(client, transport, DATABASES, timeout=120)
    finally:
        transport.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_non_ascii_names_are_counted_summed_and_restored_exactly(
    threads: int, ssh_guest: lab.SshGuest, odd_names: None, tmp_path: Path
) -> None:
    config = make_config(ssh_guest, tmp_path / "store", databases=DATABASES,
                         compression="zstd", threads=threads)  # fmt: skip
    vm = config.vm("lab")
    transport = guest_transport(vm)
    try:
        result, folder = take_dump(transport, vm, config.store, "snap-u")
    finally:
        transport.close()

    section = store.verify(folder)["mysqldump"]
    assert section["valid"] is True
    assert section["format"] == ("parallel" if threads > 1 else "single")
    assert section["databases"] == DATABASES
    assert section["tables"] == ROWS  # every table, by its own UTF-8 name
    assert set(section["checksums"]) == set(ROWS)
    assert all(v.isdigit() and int(v) > 0 for v in section["checksums"].values())
    assert result.tables == len(ROWS) and result.rows == sum(ROWS.values())
    if threads > 1:
        parts = section["parts"]
        listed = sorted(t for p in parts for t in p["tables"])
        assert listed == sorted(ROWS) and len(parts) == threads + 1
        for part in parts[:-1]:  # the view is never in a tables part (ignore-table, UTF-8)
            sql = subprocess.run(["zstd", "-dc", str(folder / part["file"])],
                                 capture_output=True, check=True).stdout  # fmt: skip
            created = re.findall(rb"^CREATE TABLE `((?:[^`]|``)+)`", sql, re.MULTILINE)
            names = sorted(c.replace(b"``", b"`").decode() for c in created)
            assert names == sorted(t.split(".", 1)[1] for t in part["tables"])
            assert "vüe".encode() not in sql
    recorded = {name: (rows, section["checksums"][name]) for name, rows in ROWS.items()}
    assert {n: (s.rows, s.checksum) for n, s in guest_sums(vm).items()} == recorded

    # changed data, a dropped table and a dropped view: restore-dump brings back the dump
    d = q(DB)
    guest_sql(
        f"UPDATE {d}.`ümlaut` SET `ß` = 'changed' WHERE id = 1;"
        f"DELETE FROM {d}.`日本語` WHERE `名前` = 2; DROP VIEW {d}.`vüe`;"
        f"DROP TABLE {d}.{q(TICK)}; INSERT INTO {q(PLAIN)}.`ümlaut` VALUES (8);"
        f"CREATE TABLE {d}.`nëu` (id INT) ENGINE=InnoDB;"  # gone once the database is dropped
    )
    changed = guest_sums(vm)
    assert {n: (s.rows, s.checksum) for n, s in changed.items()} != recorded
    restored = restore_dump(config, "lab", source=DumpSource(snapshot="snap-u"))

    assert restored.ok, [str(f) for f in restored.failures]
    assert restored.values["dropped"] == DATABASES
    # the same tables (nëu went with the dropped database), rows and checksums
    assert {n: (s.rows, s.checksum) for n, s in guest_sums(vm).items()} == recorded
    views = guest_sql(
        "SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = 'snapcoord_dé';"
    ).stdout.split()
    assert views == ["vüe"]


def test_verify_loads_and_measures_non_ascii_names_as_recorded(
    ssh_guest: lab.SshGuest, odd_names: None, tmp_path: Path
) -> None:
    lab.require_root()
    lab.require("/usr/sbin/mariadbd", "mariadb-server-core")
    config = make_config(ssh_guest, tmp_path / "store", databases=DATABASES,
                         compression="gzip", threads=1)  # fmt: skip
    vm = config.vm("lab")
    transport = guest_transport(vm)
    try:
        _, folder = take_dump(transport, vm, config.store, "snap-v")
    finally:
        transport.close()
    source = dumpfile.read_recorded(folder, mysql.FORMAT, vm="lab")
    assert source.databases == DATABASES
    expected = recorded_figures(source)
    assert set(expected) == set(ROWS)
    with verify_folder() as verify_dir:
        assert verified_figures(source, verify_dir, DATABASES) == expected


class CLocale:
    """An exec transport whose commands run in the C locale, as an SSH session without LANG
    does: the ``mysql`` client's default character set ("auto") is then latin1."""

    def __init__(self) -> None:
        self.inner = ExecTransport(["env", "-u", "LC_CTYPE", "-u", "LANG", "LC_ALL=C"], vm="lab")
        self.argvs: list[list[str]] = []

    def run(self, argv: Any, **kwargs: Any) -> Completed:
        self.argvs.append(list(argv))
        return self.inner.run(argv, **kwargs)


def test_the_client_speaks_utf8mb4_whatever_the_guest_locale(
    scratch_mariadb: lab.ScratchMariaDB,
) -> None:
    sock = scratch_mariadb.socket
    lab.run(
        lab.mysql_argv(sock, "--default-character-set=utf8mb4"),
        input="SET NAMES utf8mb4; CREATE DATABASE `dé` CHARACTER SET utf8mb4;"
        "CREATE TABLE `dé`.`ümlaut` (`cölumn` VARCHAR(9)) ENGINE=InnoDB;"
        "INSERT INTO `dé`.`ümlaut` VALUES ('ä'), ('😀');"
        "CREATE TABLE `dé`.`日本` (id INT) ENGINE=InnoDB; INSERT INTO `dé`.`日本` VALUES (1);",
    )
    transport = CLocale()
    plain = lab.run(["env", "-u", "LC_CTYPE", "-u", "LANG", "LC_ALL=C", *lab.mysql_argv(sock)],
                    input="SELECT @@character_set_client;")  # fmt: skip
    assert plain.stdout.split() == ["latin1"]  # what the client takes from this locale
    client = mysql.Client(vm="lab", sudo=False, user="root", connection=(f"--socket={sock}",))
    tables = mysql.list_tables(client, transport, ["dé"], timeout=60)  # type: ignore[arg-type]
    assert tables == [("dé", "ümlaut"), ("dé", "日本")]
    counts = mysql.row_counts(client, transport, ["dé"], timeout=60)  # type: ignore[arg-type]
    assert counts == {"dé.ümlaut": 2, "dé.日本": 1}
    sums = mysql.table_sums(client, transport, ["dé"], timeout=60)  # type: ignore[arg-type]
    assert {n: s.rows for n, s in sums.items()} == counts
    assert all(s.checksum is not None for s in sums.values())
    assert all(f"--default-character-set={mysql.CLIENT_CHARSET}" in a for a in transport.argvs)

"""Issue 23, finding 10: a blocked dump option is blocked in every spelling the tool accepts.

mysqldump (my_getopt) and pg_dumpall (getopt_long) take any unambiguous prefix of a long option;
my_getopt also '_' for '-', --loose-/--skip-/--enable-... in front, and clusters of short
options. Only check_options runs here: no guest, no database.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from snapcoord.config import parse_table
from snapcoord.errors import PreflightError
from snapcoord.hooks.databases import mysql, postgresql
from snapcoord.hooks.databases.dumpfile import RestoreSource
from snapcoord.settings import DumpConfig
from snapcoord.shell import Completed


def dump(*options: str) -> DumpConfig:
    return dataclasses.replace(parse_table(DumpConfig, {}), options=tuple(options))


@pytest.mark.parametrize(
    ("option", "meaning"),
    [
        ("--pass=secret", "--password"),
        ("--password=secret", "--password"),
        ("--password", "--password"),
        ("--passw", "--password"),
        ("--PASSWORD=x", "--password"),
        ("--loose-password=x", "--password"),
        ("--loose_password=x", "--password"),
        ("--enable-password=x", "--password"),
        ("--skip-password", "--password"),
        ("--loose-skip-pass", "--password"),
        ("--password1=x", "--password1"),
        ("-ppw", "--password"),
        ("-p", "--password"),
        ("-vpsecret", "--password"),
        ("--result-f=/tmp/x", "--result-file"),
        ("--res=/tmp/x", "--result-file"),
        ("--result_file=/x", "--result-file"),
        ("--result-file=/x", "--result-file"),
        ("--maximum-result-file=/x", "--result-file"),
        ("-r/tmp/x", "--result-file"),
        ("-vr/tmp/x", "--result-file"),
        ("-r", "--result-file"),
        ("--ta=/tmp", "--tab"),
        ("--tab=/tmp", "--tab"),
        ("-T/tmp", "--tab"),
        ("--x", "--xml"),
        ("-X", "--xml"),
        ("--compac", "--compact"),
        ("--skip-comments", "--skip-comments"),
        ("--skip_comments", "--skip-comments"),
        ("--skip-comm", "--skip-comments"),
        ("--disable-comments", "--skip-comments"),
        ("--loose-skip-comments", "--skip-comments"),
        ("--comments=0", "--skip-comments"),
        ("--comments=OFF", "--skip-comments"),
        ("--enable-comments=false", "--skip-comments"),
        ("--=x", "--result-file"),
    ],
)
def test_mysqldump_refuses_every_spelling_of_a_blocked_option(option: str, meaning: str) -> None:
    with pytest.raises(PreflightError) as info:
        mysql.check_options(dump("--single-transaction", option), vm="db1")
    message = info.value.message
    assert message.startswith("mysqldump option '") and "cannot be used by snapcoord" in message
    assert meaning in message
    assert "secret" not in message and "pw" not in message  # no password echoed


@pytest.mark.parametrize(
    "option",
    [
        "--single-transaction",
        "--routines",
        "--hex-blob",
        "--skip-lock-tables",
        "--skip-opt",
        "--disable-keys",
        "--tables",
        "--comments",
        "--comments=1",
        "--enable-comments",
        "--host=db.internal",
        "--user=backup",
        "--port=3307",
        "-hreplica",  # -h takes the rest of its cluster: the host "replica", not -r
        "-P3306",
        "-uroot",
        "-q",
        "-qQ",
        "--where=id>1",
        "--set-gtid-purged=OFF",
        "--max_allowed_packet=1G",
    ],
)
def test_mysqldump_options_that_do_no_harm_pass(option: str) -> None:
    assert mysql.check_options(dump(option), vm="db1") == [option, "--all-databases"]


@pytest.mark.parametrize("option", ["-", "--", "x", "databases"])
def test_mysqldump_arguments_that_are_no_option_are_refused(option: str) -> None:
    with pytest.raises(PreflightError, match="must start with '-'"):
        mysql.check_options(dump(option), vm="db1")


@pytest.mark.parametrize(
    ("option", "meaning"),
    [
        ("--fil=/tmp/x", "--file"),
        ("--file=/tmp/x", "--file"),
        ("--f=/tmp/x", "--file"),
        ("--user=someone", "--username"),
        ("--usern=someone", "--username"),
        ("--username=someone", "--username"),
        ("--pass", "--password"),
        ("--glob", "--globals-only"),
        ("--roles", "--roles-only"),
        ("--schema", "--schema-only"),
        ("--data", "--data-only"),
        ("--cl", "--clean"),
        ("--no-comm", "--no-comments"),
        ("--exclude-d=x", "--exclude-database"),
        ("--db=x", "--dbname"),
        ("--filter=/tmp/f", "--filter"),
        ("--statistics-o", "--statistics-only"),
        ("--vers", "--version"),
    ],
)
def test_pg_dumpall_refuses_every_abbreviation_of_a_forbidden_option(
    option: str, meaning: str
) -> None:
    with pytest.raises(PreflightError) as info:
        postgresql.check_options(dump("--lock-wait-timeout=200", option), vm="db1")
    message = info.value.message
    assert "pg_dumpall option '" in message and "cannot be used by snapcoord" in message
    assert meaning in message


@pytest.mark.parametrize(
    "option",
    [
        "--lock-wait-timeout=200",
        "--role=backup",  # a whole option name, though a prefix of --roles-only
        "--statistics",  # likewise --statistics-only
        "--host=/run/postgresql",
        "--port=5433",
        "--quote-all-identifiers",
        "--no-owner",
        "--no-password",
        "--verbose",
    ],
)
def test_pg_dumpall_options_that_do_no_harm_pass(option: str) -> None:
    assert postgresql.check_options(dump(option), vm="db1") == [option]


@pytest.mark.parametrize("option", ["--", "--=x", "-f/tmp/x", "-U", "file"])
def test_pg_dumpall_arguments_that_are_no_long_option_are_refused(option: str) -> None:
    with pytest.raises(PreflightError, match="is not a long pg_dumpall option"):
        postgresql.check_options(dump(option), vm="db1")


# -- the character set of snapcoord's mysql client calls (tests/test_dump_utf8.py: real names)


@pytest.mark.parametrize(
    ("options", "charset"),
    [
        ([], "utf8mb4"),
        (["--single-transaction", "--routines"], "utf8mb4"),
        (["--default-character-set=latin1"], "latin1"),
        (["--default-character-set", "cp1251"], "cp1251"),
        (["--default_character_set=utf8"], "utf8"),
        (["--default-char=koi8r"], "koi8r"),
        (["--loose-default-character-set=greek"], "greek"),
        (["--default-character-set=latin1", "--default-character-set=utf8mb4"], "utf8mb4"),
        (["--skip-default-character-set"], "utf8mb4"),
        (["--default-auth=x", "--default-character-set=bad;name"], "utf8mb4"),
        (["--default-character-set"], "utf8mb4"),
    ],
)
def test_a_dump_is_loaded_in_the_character_set_mysqldump_wrote_it_in(
    options: list[str], charset: str
) -> None:
    assert mysql.dump_charset(options) == charset


class Recorder:
    """A transport that answers every command with nothing and keeps its argv."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    def run(self, argv: Any, **_: Any) -> Completed:
        self.argvs.append(list(argv))
        return Completed(tuple(argv), 0, b"", b"", 0.0)

    def run_streaming(self, argv: Any, **_: Any) -> Completed:
        return self.run(argv)


def test_every_mysql_client_call_names_its_character_set(tmp_path: Path) -> None:
    """Queries speak utf8mb4 whatever the guest's locale or option files say (the command line
    wins over both); a load reads the dump in the character set its manifest records."""
    client = mysql.Client(vm="v", sudo=False, connection=("--socket=/s",))
    transport = Recorder()
    client.query(transport, "SELECT 1;", timeout=5)  # type: ignore[arg-type]
    mysql.row_counts(client, transport, ["dé"], timeout=5)  # type: ignore[arg-type]
    mysql.sum_plans(client, transport, ["dé"], timeout=5)  # type: ignore[arg-type]
    assert len(transport.argvs) == 3
    for argv in transport.argvs:
        args = argv[argv.index("mysql") + 1 :]
        assert args[:2] == ["--socket=/s", "--default-character-set=utf8mb4"]
    dump_file = tmp_path / "mysql.sql"
    dump_file.write_bytes(b"-- Dump completed\n")
    for recorded, expected in ((None, "utf8mb4"), (["--default-character-set=latin1"], "latin1")):
        manifest = None if recorded is None else {"mysqldump": {"options": recorded}}
        source = RestoreSource(dump_file, "none", manifest, ["dé"], ["dé"], "mysqldump")
        loads = Recorder()
        mysql.load(loads, client, source, timeout=5)  # type: ignore[arg-type]
        (argv,) = loads.argvs
        assert argv[argv.index("mysql") + 1 :] == [
            "--socket=/s",
            f"--default-character-set={expected}",
            "--batch",
        ]

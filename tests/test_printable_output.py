"""Names and text from hypervisors, guests and files never reach the terminal as control
characters (issue 23, finding 16): a terminal escape sequence in a snapshot name or in a guest
command's error output is printed as ``\\x1b``, never executed by the admin's terminal."""

from __future__ import annotations

import io
from pathlib import Path

from snapcoord.output import PrintableStream, printable, raw_stream
from tests.cli_helpers import snapcoord, stand_in_guest
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

ESC = "\x1b"


def test_control_characters_are_shown_as_escapes_and_text_is_left_alone() -> None:
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("\x9b2J") == "\\x9b2J", "the 8-bit CSI too"
    assert printable("x\x07\x7f\r") == "x\\x07\\x7f\\r"
    assert printable("invoice\u202egpj.exe") == "invoice\\u202egpj.exe", "no bidi override"
    assert printable("tab\there\nnext line: é, 日本") == "tab\there\nnext line: é, 日本"


def test_a_printable_stream_escapes_what_it_is_given_and_its_raw_stream_does_not() -> None:
    below = io.StringIO()
    stream = PrintableStream(below)
    stream.write("vm1: \x1b]0;owned\x07 ok\n")
    raw_stream(stream).write("\x1b[2K")  # the live view's own cursor movements
    assert below.getvalue() == "vm1: \\x1b]0;owned\\x07 ok\n\x1b[2K"
    assert raw_stream(below) is below


def test_a_guests_escape_sequences_in_an_error_are_printed_not_executed(
    tmp_path: Path, libvirt_node: str
) -> None:
    config, state = stand_in_guest(
        tmp_path,
        libvirt_node,
        tables={
            "vms.db1.hooks": {
                "before": ["printf '\\033[2J\\033]0;owned\\007hook failed\\n' >&2; exit 3"]
            }
        },
    )
    failed = snapcoord("-c", str(config), "snapshot", "db1")
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "hook failed" in failed.stderr, failed.stderr
    assert "\\x1b[2J" in failed.stderr + failed.stdout, "shown, as an escape"
    assert ESC not in failed.stderr and ESC not in failed.stdout
    assert "\x07" not in failed.stderr + failed.stdout
    assert {p.name for p in state.glob("*.running")} == {
        "apache2.running",
        "cron.running",
        "mariadb.running",
    }, "nothing was left stopped"

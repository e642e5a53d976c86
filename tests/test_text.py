"""Long reasons in one-line errors are clipped at a word, never mid-word (issue 25: "a long
error is cut mid-word at 200 characters"): the rule, and a guest command's long error through
the real CLI."""

from __future__ import annotations

from pathlib import Path

from snapcoord.text import ELLIPSIS, clip
from tests.cli_helpers import snapcoord, stand_in_guest
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture


def test_short_text_is_left_alone_long_text_ends_at_a_word() -> None:
    assert clip("connection refused", 200) == "connection refused"
    words = "the guest said something very long about what went wrong " * 10
    clipped = clip(words, 100)
    assert len(clipped) <= 100 and clipped.endswith(ELLIPSIS)
    kept = clipped.removesuffix(ELLIPSIS)
    assert words.startswith(kept) and words[len(kept)] == " ", "cut between two words"


def test_one_overlong_word_is_cut_where_it_must_be() -> None:
    clipped = clip("x" * 500, 50)
    assert clipped == "x" * 49 + ELLIPSIS


def test_a_guests_long_error_reaches_the_cli_clipped_at_a_word(
    tmp_path: Path, libvirt_node: str
) -> None:
    reason = " ".join(f"word{i:03}" for i in range(120))  # 959 characters, one line
    config, _state = stand_in_guest(
        tmp_path, libvirt_node, tables={"vms.db1.hooks": {"before": [f"echo {reason} >&2; exit 3"]}}
    )
    failed = snapcoord("-c", str(config), "snapshot", "db1")
    assert failed.returncode != 0, failed.stdout + failed.stderr
    [line] = [ln for ln in failed.stderr.splitlines() if "word000" in ln]
    assert ELLIPSIS in line, line
    shown = line[line.index("word000") : line.index(ELLIPSIS)]
    assert reason.startswith(shown) and reason[len(shown)] == " ", "cut between two words"

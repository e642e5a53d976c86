"""snapcoord(1), generated from the argument parser: ``python3 -m snapcoord.manpage > snapcoord.1``
(scripts/install does this). Every subcommand and option the parser has is in it."""

from __future__ import annotations

import argparse
import sys

from snapcoord import __version__, parser_info

HEADER = '.\\" snapcoord(1), generated from its argument parser by snapcoord.manpage'


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _item(option: parser_info.Option) -> list[str]:
    if option.positional:
        head = f"\\fI{roff(option.metavar)}\\fR"
    else:
        flags = ", ".join(f"\\fB{roff(flag)}\\fR" for flag in option.flags)
        head = f"{flags} \\fI{roff(option.metavar)}\\fR" if option.metavar else flags
    lines = [".TP", head]
    text = option.help
    if option.choices and option.positional:
        text = f"{text} (one of: {', '.join(option.choices)})" if text else ""
    lines.append(roff(text) if text else "\\&")
    return lines


def render(parser: argparse.ArgumentParser) -> str:
    global_flags = {flag for option in parser_info.options(parser) for flag in option.flags}
    description = (parser.description or "").rstrip(".")
    lines = [
        HEADER,
        f'.TH SNAPCOORD 1 "" "snapcoord {__version__}" "User Commands"',
        ".SH NAME",
        f"snapcoord \\- {roff(description[:1].lower() + description[1:])}",
        ".SH SYNOPSIS",
        ".nf",
        roff(parser_info.usage(parser)),
        ".fi",
        ".SH DESCRIPTION",
        roff(parser.description or ""),
        "The global options may also follow the command; given there, they win.",
        ".SH OPTIONS",
    ]
    for option in parser_info.options(parser):
        lines += _item(option)
    lines.append(".SH COMMANDS")
    for command in parser_info.commands(parser):
        lines += [f".SS {command.name}", roff(command.help)]
        if command.description:
            lines += [".PP", roff(command.description)]
        lines += [".PP", ".nf", roff(command.usage), ".fi"]
        for option in command.options:
            if option.flags and set(option.flags) <= global_flags:
                continue  # the global options, listed once above
            lines += _item(option)
    lines += [
        ".SH EXIT STATUS",
        roff(parser.epilog or ""),
        ".SH FILES",
        ".TP",
        "\\fI/etc/snapcoord/config.toml\\fR",
        "the configuration (or \\fB$SNAPCOORD_CONFIG\\fR, \\fI~/.config/snapcoord/config.toml\\fR)",
        ".TP",
        "\\fI/var/lib/snapcoord\\fR",
        "the store: journal, last runs, dumps",
        ".SH SEE ALSO",
        "The documentation in the source tree: README.md and docs/ (docs/install.md, "
        "docs/configuration.md, docs/exit\\-codes.md, docs/scheduling.md).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    from snapcoord.cli import build_parser

    sys.stdout.write(render(build_parser()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

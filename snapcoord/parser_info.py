"""What the command line accepts, read from the argparse parser (snapcoord.cli.build_parser): the
one source of the man page (snapcoord.manpage) and the bash completion (snapcoord.completion),
so neither is maintained by hand."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Option:
    """One option or positional argument of a parser."""

    flags: tuple[str, ...]  # ("-c", "--config"); empty for a positional argument
    metavar: str  # "" for a flag that takes no value
    choices: tuple[str, ...]
    help: str
    takes_file: bool  # its value names a file (completion offers file names)
    dest: str  # the attribute it sets ("vms", "tag", "config")
    many: bool  # a positional that takes any number of values

    @property
    def positional(self) -> bool:
        return not self.flags


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    usage: str  # without "usage: ", wrapped at 78 columns
    options: tuple[Option, ...]


#: options whose value is a path (the parser's type is Path, or the option is the config file)
_FILE_DESTS = frozenset({"config"})


def _option(parser: argparse.ArgumentParser, action: argparse.Action) -> Option:
    formatter = argparse.HelpFormatter(parser.prog)
    choices = tuple(str(c) for c in action.choices) if action.choices else ()
    if action.nargs == 0:
        metavar = ""
    elif isinstance(action.metavar, str):
        metavar = action.metavar
    elif choices:
        metavar = "{" + ",".join(choices) + "}"
    else:  # argparse's own default: the dest, upper case for an option
        metavar = action.dest.upper() if action.option_strings else action.dest
    if action.nargs in ("*", argparse.REMAINDER):
        metavar = f"[{metavar} ...]"
    text = formatter._expand_help(action) if action.help else ""
    takes_file = bool(metavar) and (action.dest in _FILE_DESTS or action.type is Path)
    many = action.nargs in ("*", "+", argparse.REMAINDER)
    return Option(
        tuple(action.option_strings), metavar, choices, text, takes_file, action.dest, many
    )


def options(parser: argparse.ArgumentParser) -> tuple[Option, ...]:
    """The parser's options and positionals (help included), in the order they were added."""
    return tuple(
        _option(parser, action)
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and action.help is not argparse.SUPPRESS
    )


def usage(parser: argparse.ArgumentParser, width: int = 78) -> str:
    """The parser's usage, without "usage: ", wrapped at ``width``."""
    formatter = argparse.HelpFormatter(parser.prog, width=width)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, "")
    return formatter.format_help().strip()


def commands(parser: argparse.ArgumentParser) -> tuple[Command, ...]:
    """The subcommands in the order the parser lists them."""
    found: list[Command] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            found.append(
                Command(
                    name=name,
                    help=helps.get(name, ""),
                    description=sub.description or "",
                    usage=usage(sub),
                    options=options(sub),
                )
            )
    return tuple(found)

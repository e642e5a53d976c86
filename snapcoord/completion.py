"""Bash completion for snapcoord, generated from the argument parser:
``python3 -m snapcoord.completion > /usr/share/bash-completion/completions/snapcoord``
(scripts/install does this). It completes the commands, each command's options, the choices of
an argument (``config check|example``) and file names after ``-c``/``--config`` and ``--file``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from snapcoord import parser_info

HEADER = (
    "# bash completion for snapcoord, generated from its argument parser by snapcoord.completion"
)

_BODY = r"""_snapcoord() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev='' cmd='' i
    local opts='' valued='' files='' words='' choices=''
    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD - 1]}
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            @GLOBAL_VALUED@) ((i++)) ;;
            -*) ;;
            *) cmd=${COMP_WORDS[i]}; break ;;
        esac
    done
    case $cmd in
@CASES@
    esac
    if [[ -n $choices ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$choices" -- "$cur")
    elif [[ $files == *" $prev "* ]]; then
        compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    elif [[ $valued == *" $prev "* ]]; then
        COMPREPLY=()
    elif [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
    elif [[ -z $cmd ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$_snapcoord_commands" -- "$cur")
    else
        mapfile -t COMPREPLY < <(compgen -W "$words" -- "$cur")
    fi
}
complete -F _snapcoord snapcoord
"""


def _words(items: list[str]) -> str:
    return shlex.quote(" ".join(items))


def _padded(items: list[str]) -> str:
    return shlex.quote(" " + " ".join(items) + " ")


def _case(pattern: str, options: tuple[parser_info.Option, ...]) -> list[str]:
    flags = [flag for option in options for flag in option.flags]
    valued = [flag for option in options if option.metavar for flag in option.flags]
    files = [flag for option in options if option.takes_file for flag in option.flags]
    words = [choice for option in options if option.positional for choice in option.choices]
    lines = [
        f"        {pattern})",
        f"            opts={_words(flags)}",
        f"            valued={_padded(valued)}",
        f"            files={_padded(files)}",
        f"            words={_words(words)}",
    ]
    with_choices = [option for option in options if option.flags and option.choices]
    if with_choices:
        lines.append("            case $prev in")
        for option in with_choices:
            pattern_ = "|".join(shlex.quote(flag) for flag in option.flags)
            lines.append(f"                {pattern_}) choices={_words(list(option.choices))} ;;")
        lines.append("            esac")
    lines.append("            ;;")
    return lines


def render(parser: argparse.ArgumentParser) -> str:
    commands = parser_info.commands(parser)
    global_options = parser_info.options(parser)
    global_valued = [flag for option in global_options if option.metavar for flag in option.flags]
    cases = _case("''", global_options)
    for command in commands:
        cases += _case(shlex.quote(command.name), command.options)
    body = _BODY.replace(
        "@GLOBAL_VALUED@", "|".join(shlex.quote(flag) for flag in global_valued) or "''"
    ).replace("@CASES@", "\n".join(cases))
    names = _words([command.name for command in commands])
    return f"{HEADER}\n_snapcoord_commands={names}\n{body}"


def main() -> int:
    from snapcoord.cli import build_parser

    sys.stdout.write(render(build_parser()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

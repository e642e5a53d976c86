"""Bash completion for snapcoord, generated from the argument parser:
``python3 -m snapcoord.completion > /usr/share/bash-completion/completions/snapcoord``
(scripts/install does this). It completes the commands, each command's options, the choices of
an argument (``config check|example``), file names after ``-c``/``--config`` and ``--file``,
and the VM keys, tags and hypervisor names of the configuration (``-c FILE`` on the line,
``$SNAPCOORD_CONFIG``, ``~/.config/snapcoord/config.toml`` or ``/etc/snapcoord/config.toml``, if
the user may read it: names only, read with Debian's python3 and ``tomllib``).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from snapcoord import parser_info

HEADER = (
    "# bash completion for snapcoord, generated from its argument parser by snapcoord.completion"
)

_BODY = r"""# _snapcoord_names KIND CONFIG: the configuration's VM keys (vm), tags (tag), both
# (select) or hypervisor names (hypervisor); nothing if the file cannot be read
_snapcoord_names() {
    local config=$2
    if [[ -z $config ]]; then
        config=${SNAPCOORD_CONFIG:-}
        local user_config=~/.config/snapcoord/config.toml
        [[ -z $config && -f $user_config ]] && config=$user_config
        [[ -z $config ]] && config=/etc/snapcoord/config.toml
    fi
    [[ -r $config ]] || return 0
    /usr/bin/python3 -I -c '
import re, sys, tomllib
kind, path = sys.argv[1:]
with open(path, "rb") as handle:
    data = tomllib.load(handle)
vms = data.get("vms") if isinstance(data.get("vms"), dict) else {}
names = set(vms) if kind in ("vm", "select") else set()
if kind in ("tag", "select"):
    for table in vms.values():
        tags = table.get("tags", []) if isinstance(table, dict) else []
        names |= {tag for tag in tags if isinstance(tag, str)} if isinstance(tags, list) else set()
if kind == "hypervisor" and isinstance(data.get("hypervisors"), dict):
    names |= set(data["hypervisors"])
print("\n".join(sorted(n for n in names if re.fullmatch(r"[\w.@+-]+", n))))
' "$1" "$config" 2>/dev/null
}

_snapcoord() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev='' cmd='' at=0 i config='' count=0
    local opts='' valued='' files='' words='' choices='' kind='' vm=''
    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD - 1]}
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            @GLOBAL_VALUED@) ((i++)) ;;
            -*) ;;
            *) cmd=${COMP_WORDS[i]}; at=$i; break ;;
        esac
    done
    for ((i = 1; i < COMP_CWORD; i++)); do  # -c FILE, before or after the command
        case ${COMP_WORDS[i]} in
            -c | --config) ((i + 1 < COMP_CWORD)) && config=${COMP_WORDS[i + 1]} ;;
            --config=*) config=${COMP_WORDS[i]#--config=} ;;
        esac
    done
    case $cmd in
@CASES@
    esac
    if ((at > 0)); then  # the command's arguments so far (option values not counted)
        for ((i = at + 1; i < COMP_CWORD; i++)); do
            if [[ $valued == *" ${COMP_WORDS[i]} "* ]]; then
                ((i++))
            elif [[ ${COMP_WORDS[i]} != -* ]]; then
                ((count++))
            fi
        done
    fi
    if [[ -n $choices ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$choices" -- "$cur")
    elif [[ -n $kind ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$(_snapcoord_names "$kind" "$config")" -- "$cur")
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
        if [[ $vm == many || ($vm == one && count -eq 0) ]]; then
            words="$words $(_snapcoord_names vm "$config")"
        fi
        mapfile -t COMPREPLY < <(compgen -W "$words" -- "$cur")
    fi
}
complete -F _snapcoord snapcoord
"""


def _words(items: list[str]) -> str:
    return shlex.quote(" ".join(items))


def _padded(items: list[str]) -> str:
    return shlex.quote(" " + " ".join(items) + " ")


#: option or argument (by its dest) -> which names of the configuration it takes
_NAMES = {
    "vms": "vm",
    "vm": "vm",
    "exclude": "vm",
    "tag": "tag",
    "select": "select",
    "hypervisor": "hypervisor",
}


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
    vm = [option for option in options if option.positional and _NAMES.get(option.dest) == "vm"]
    if vm:
        lines.append(f"            vm={'many' if vm[0].many else 'one'}")
    arms = []
    for option in options:
        pattern_ = "|".join(shlex.quote(flag) for flag in option.flags)
        if option.flags and option.choices:
            arms.append(f"                {pattern_}) choices={_words(list(option.choices))} ;;")
        elif option.flags and option.metavar and option.dest in _NAMES:
            arms.append(f"                {pattern_}) kind={_NAMES[option.dest]} ;;")
    if arms:
        lines += ["            case $prev in", *arms, "            esac"]
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

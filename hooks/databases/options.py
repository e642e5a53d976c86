"""Which blocked option of a dump tool an argument stands for, read the way the tool reads it.

A blocked option compared by its exact spelling is no block: both parsers take any unambiguous
prefix of a long option for the option (``--pass=x`` is ``--password=x``, ``--fil=x`` is
``--file=x``). MySQL's ``my_getopt`` (mysqldump, mysql) also treats ``-`` and ``_`` in a name
alike, lets ``--loose-``, ``--skip-``, ``--disable-``, ``--enable-`` and ``--maximum-`` (MariaDB
also ``--autoset-``) stand in front of any option, chained (``--loose-skip-...``), and reads a
cluster of short options (``-vr/tmp/x`` is ``-v -r /tmp/x``). ``getopt_long`` (pg_dumpall) takes
prefixes, exactly spelled.

So an argument is blocked when its name, with those prefixes taken off, is a prefix of a blocked
name: every abbreviation the tool would resolve to it, and some it would refuse as ambiguous
(``--p``), which cannot work either. Matching is case-insensitive, which only ever blocks more.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: my_getopt's special prefixes (MySQL and MariaDB), in front of any long option
MYSQL_SPECIAL_PREFIXES = ("loose", "skip", "disable", "enable", "maximum", "autoset")
#: the prefixes that turn a boolean option off
MYSQL_NEGATING = frozenset({"skip", "disable"})
#: a boolean option's values that mean "on" (my_getopt; anything else is "off" or an error)
MYSQL_TRUE = frozenset({"1", "true", "on"})


@dataclass(frozen=True)
class LongOption:
    """``--[PREFIX-]...NAME[=VALUE]`` as a parser reads it."""

    name: str  # lower case; '-' for '_' where the parser treats them alike
    prefixes: tuple[str, ...] = ()  # the special prefixes taken off, in order
    value: str | None = None

    @property
    def negated(self) -> bool:
        """A boolean option this argument may turn off (``--skip-X``, ``--X=0``...)."""
        if any(p in MYSQL_NEGATING for p in self.prefixes):
            return True
        return self.value is not None and self.value.lower() not in MYSQL_TRUE


def mysql_long(option: str) -> LongOption:
    """``option`` (starting with ``--``) as my_getopt reads it."""
    text, eq, value = option[2:].partition("=")
    name = text.lower().replace("_", "-")
    prefixes: list[str] = []
    stripped = True
    while stripped:
        stripped = False
        for prefix in MYSQL_SPECIAL_PREFIXES:
            if name.startswith(prefix + "-"):
                prefixes.append(prefix)
                name = name[len(prefix) + 1 :]
                stripped = True
                break
    return LongOption(name, tuple(prefixes), value if eq else None)


def getopt_long(option: str) -> LongOption:
    """``option`` (starting with ``--``) as getopt_long reads it."""
    text, eq, value = option[2:].partition("=")
    return LongOption(text.lower(), (), value if eq else None)


def abbreviates(name: str, blocked: Iterable[str], allowed: Iterable[str] = ()) -> str | None:
    """The first blocked option ``name`` may stand for (it is one, or a prefix of one).

    ``allowed``: options of the tool whose whole name is a prefix of a blocked one (pg_dumpall's
    ``--role`` and ``--roles-only``): an exact name wins over an abbreviation, in both parsers."""
    if name in allowed:
        return None
    return next((full for full in blocked if full.startswith(name)), None)


def short_cluster(option: str, blocked: dict[str, str], with_value: frozenset[str]) -> str | None:
    """In a cluster of short options (``-vr/tmp/x``), the blocked one it holds, if any: the
    letters are options until one that takes a value (the rest of the cluster is its value).
    Returns the cluster up to that letter, e.g. ``-vr``."""
    for index, letter in enumerate(option[1:], start=1):
        if letter in blocked:
            return option[: index + 1]
        if letter in with_value:
            return None
    return None

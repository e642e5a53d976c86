"""Config that never crashes: configurations generated from the schema (snapcoord.schema is
walked, no key list is written down here) and checked with the real CLI entry point.

Whatever a configuration file holds, ``snapcoord config check`` exits 0 or 2, never with a
traceback; on 2 every stderr line is ``snapcoord: error: FILE: KEY.PATH: problem`` (or names
the file: "not valid TOML"). Valid configurations pass, and a single known defect (a wrong type,
a missing required key, an unknown key, a bad table name, a bad secret, ...) is reported on the
line of its key path.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import io
import math
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapcoord import schema
from snapcoord.cli import main
from snapcoord.schema import REQUIRED, Key
from tests.cli_helpers import snapcoord, unstamped

# -- a small TOML writer ------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def toml_str(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_key(name: str) -> str:
    return name if _BARE.fullmatch(name) else toml_str(name)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(value)


def render(config: dict[str, Any]) -> str:
    """Tables as [headers] (as people write them), tables inside arrays inline."""
    lines: list[str] = []

    def table(prefix: list[str], data: dict[str, Any]) -> None:
        if prefix:
            lines.append("[" + ".".join(map(toml_key, prefix)) + "]")
        for name, value in data.items():
            if not isinstance(value, dict):
                lines.append(f"{toml_key(name)} = {toml_value(value)}")
        for name, value in data.items():
            if isinstance(value, dict):
                table([*prefix, name], value)

    table([], config)
    return "\n".join(lines) + "\n"


def same(a: Any, b: Any) -> bool:
    """Equality in which nan equals nan (the writer's round trip)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_the_writer_round_trips() -> None:
    doc = {
        "a": {"": {"x.y": [1, 2.5, 'q"\\\n\x00\x7f', {"k": float("nan")}]}},
        "b": [dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), dt.date(1, 1, 1)],
        "c": [dt.time(0, 0, 0, 1), float("-inf"), 1e300, -0.0, 2**70, True, {}],
    }
    assert same(tomllib.loads(render(doc)), doc)


# -- the schema, walked --------------------------------------------------------------------------

SET_ENV = "SNAPCOORD_FUZZ_SECRET"  # set while a test runs
UNSET_ENV = "SNAPCOORD_FUZZ_UNSET"  # never set
# Placeholders replaced in the rendered file by paths in the example's own folder.
SECRET_FILE = "@SECRET_FILE@"  # a readable 0600 secret
BINARY_FILE = "@BINARY_FILE@"  # not UTF-8
MISSING_FILE = "@MISSING_FILE@"  # does not exist
FOLDER = "@FOLDER@"  # a directory

HYPERVISOR_KINDS = sorted(schema.HYPERVISOR_TYPES)


def hypervisor_keys(kind: str | None) -> dict[str, Key]:
    return {**schema.HYPERVISOR_COMMON, **schema.HYPERVISOR_TYPES.get(kind or "", {})}


def schema_tables(config: dict[str, Any]) -> list[tuple[tuple[str, ...], dict[str, Key]]]:
    """Every table the schema describes that this configuration has or could have (a VM's
    subtables and [defaults] may be absent), with its keys."""
    found: list[tuple[tuple[str, ...], dict[str, Key]]] = [
        (("defaults",), schema.DEFAULTS),
        (("notify",), schema.NOTIFY),
    ]
    for name, table in config.get("hypervisors", {}).items():
        found.append((("hypervisors", name), hypervisor_keys(table.get("type"))))
    for name in config.get("vms", {}):
        found.append((("vms", name), schema.VM))
        found += [(("vms", name, sub), keys) for sub, keys in schema.VM_SUBTABLES.items()]
    return found


def every_key() -> Iterator[tuple[str, Key]]:
    yield from schema.DEFAULTS.items()
    yield from schema.NOTIFY.items()
    for kind in HYPERVISOR_KINDS:
        yield from hypervisor_keys(kind).items()
    yield from schema.VM.items()
    for keys in schema.VM_SUBTABLES.values():
        yield from keys.items()


def accepts(kind: str, value: Any) -> bool:
    """Whether a value has a TOML type the schema kind could accept at all."""
    if kind in ("str", "choice"):
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind in ("strlist", "argv"):
        return isinstance(value, list)
    if kind == "secret":
        return isinstance(value, dict)
    if kind == "count":  # an integer or the string "auto"
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    raise AssertionError(f"schema kind {kind!r} unknown to this test: teach it")


# Candidates for keys with a check: the valid ones are found by asking the check itself.
SAMPLES = [
    "/var/lib/snapcoord",
    "/etc/passwd",  # a file every machine has: for the keys that name a file to read
    "/srv/www",
    "nightly",
    "x",
    "apache2",
    "mysql@main",
    "db1.example.org",
    "sha256:" + ":".join(["ab"] * 32),
    "sha256:" + "CD" * 32,
    "https://hc-ping.com/5f0c1d2e",
]

CHARS = st.characters(codec="utf-8")  # what a TOML file can hold: no surrogates
NAME_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12)
VALID_NAMES = st.from_regex(schema.TABLE_KEY_RE, fullmatch=True).filter(
    lambda n: schema.TABLE_KEY_RE.fullmatch(n) is not None and len(n) < 20
)


def good_samples(key: Key) -> list[Any]:
    if key.kind in ("strlist", "argv"):
        return [s for s in SAMPLES if key.check is None or key.check([s]) is None]
    candidates = [key.default, key.example, *SAMPLES]
    return [
        s for s in candidates if isinstance(s, str) and (key.check or (lambda _: None))(s) is None
    ]


def valid_value(key: Key) -> st.SearchStrategy[Any]:
    kind = key.kind
    if kind == "choice":
        return st.sampled_from(key.choices)
    if kind == "bool":
        return st.booleans()
    if kind in ("int", "float"):
        low = -(10**6) if key.minimum is None else key.minimum
        high = 10**9 if key.maximum is None else key.maximum
        ints = st.integers(math.ceil(low), math.floor(high))
        if kind == "int":
            return ints
        return ints | st.floats(low, high, allow_nan=False, allow_infinity=False)
    if kind == "secret":
        return st.sampled_from([{"env": SET_ENV}, {"file": SECRET_FILE}])
    if kind == "count":
        assert key.minimum is not None and key.maximum is not None
        return st.just("auto") | st.integers(int(key.minimum), int(key.maximum))
    if kind == "str":
        if key.check is None:
            return NAME_TEXT | st.sampled_from(SAMPLES)
        return st.sampled_from(good_samples(key))
    if kind in ("strlist", "argv"):
        item = NAME_TEXT if key.check is None else st.sampled_from(good_samples(key))
        return st.lists(item, max_size=4)
    raise AssertionError(f"schema kind {kind!r} unknown to this test: teach it")


def test_every_schema_key_can_be_generated() -> None:
    """Guards the generator: a new key with a check none of SAMPLES passes must extend SAMPLES,
    a new kind must be taught to accepts()/valid_value()."""
    for name, key in every_key():
        if key.kind in ("str", "strlist", "argv") and key.check is not None:
            assert good_samples(key), f"no valid sample for {name}: extend SAMPLES"
        accepts(key.kind, None)
        valid_value(key)


def table_of(keys: dict[str, Key], skip: frozenset[str] = frozenset()) -> st.SearchStrategy[Any]:
    """A valid table: every required key, any optional ones."""
    wanted = {name: key for name, key in keys.items() if name not in skip}
    return st.fixed_dictionaries(
        {name: valid_value(key) for name, key in wanted.items() if key.default is REQUIRED},
        optional={
            name: valid_value(key) for name, key in wanted.items() if key.default is not REQUIRED
        },
    )


# Rules across keys live in config.py, not in the schema: a valid configuration must obey them.
PROXMOX_PAIRS = (("token_id", "token_secret"), ("user", "password"))
VM_REFS = ("hypervisor", "name", "vmid")


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if draw(st.booleans()):
        config["defaults"] = draw(table_of(schema.DEFAULTS))
    if draw(st.booleans()):
        config["notify"] = draw(table_of(schema.NOTIFY))
    names = draw(st.lists(VALID_NAMES, max_size=3, unique=True))
    if names:
        config["hypervisors"] = {}
    for name in names:
        kind = draw(st.sampled_from(HYPERVISOR_KINDS))
        keys = hypervisor_keys(kind)
        pairs = PROXMOX_PAIRS if kind == "proxmox" else ()
        skip = frozenset({"type", *(k for pair in pairs for k in pair)})
        table = {"type": kind, **draw(table_of(keys, skip))}
        if pairs:
            for pair_key in draw(st.sampled_from(pairs)):
                table[pair_key] = draw(valid_value(keys[pair_key]))
        config["hypervisors"][name] = table
    vm_names = draw(st.lists(VALID_NAMES, max_size=2, unique=True)) if names else []
    if vm_names:
        config["vms"] = {}
    for name in vm_names:
        vm = {
            "hypervisor": draw(st.sampled_from(names)),
            **draw(table_of(schema.VM, frozenset(VM_REFS))),
        }
        ref = draw(st.sampled_from(["", "name", "vmid"]))
        if ref:
            vm[ref] = draw(valid_value(schema.VM[ref]))
        for sub, keys in schema.VM_SUBTABLES.items():
            if draw(st.booleans()):
                vm[sub] = draw(table_of(keys))
        guest = vm.get("guest")
        if guest is not None:
            transport = guest.get("transport", schema.GUEST["transport"].default)
            hypervisor_type = config["hypervisors"][vm["hypervisor"]]["type"]
            if transport == "agent" and hypervisor_type not in ("libvirt", "proxmox"):
                guest["transport"] = transport = "ssh"  # the agent is QEMU's (configuration.md)
            needed = {"ssh": ["host"], "exec": ["exec_prefix"], "agent": []}[transport]
            if transport == "agent" and guest.get("dump_transport") == "ssh":
                needed = ["host"]  # the streams go over SSH
            for key in needed:
                if key not in guest:
                    guest[key] = draw(valid_value(schema.GUEST[key]))
            if not _watchdog_outlasts_the_stops(guest):  # a rule across keys (configuration.md)
                guest.update(stop_timeout=1.0, parallel_services=True)  # 2 s < watchdog >= 10 s
        config["vms"][name] = vm
    return config


def _watchdog_outlasts_the_stops(guest: dict[str, Any]) -> bool:
    def get(key: str) -> Any:
        return guest.get(key, schema.GUEST[key].default)

    services = len(get("services"))
    stops = (min(services, 1) if get("parallel_services") else services) + (
        get("consistency") == "stop" and get("database") != "none"
    )
    return bool(get("watchdog_seconds") > stops * get("stop_timeout"))


# -- any TOML value -----------------------------------------------------------------------------

ODD_NAMES = [
    "",
    " ",
    ".",
    "..",
    "a.b",
    "-x",
    "_x",
    "a/b",
    "../etc",
    "CON",
    "défaut",
    "名前",
    "🐬",
    "db1\n",
    "a\tb",
    "\u2028",
    "\x7f",
    '"',
    "\\",
    "defaults",
    "hypervisors",
    "vms",
    "guest",
    "type",
]
LONG_NAMES = st.sampled_from([63, 64, 1000]).map(lambda n: "x" * n)
ANY_NAME = st.sampled_from(ODD_NAMES) | LONG_NAMES | st.text(CHARS, max_size=8)
HUGE_STRINGS = ["x" * 100_000, "🐬" * 25_000, "\n" * 10_000]
ODD_STRINGS = ["", " ", "\0", "a\0b", "\n", "x\n", "/", "nan", "true", *HUGE_STRINGS]
SCALARS = st.one_of(
    st.text(CHARS, max_size=20),
    st.sampled_from(ODD_STRINGS),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63), 10**300, -(10**300)]),
    st.floats(),
    st.booleans(),
    st.datetimes(timezones=st.sampled_from([None, dt.UTC])),
    st.dates(),
    st.times(),
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_NAME, inner, max_size=4),
    max_leaves=8,
)
NON_TABLE = ANY_VALUE.filter(lambda v: not isinstance(v, dict))

BAD_SECRETS = [
    {"env": UNSET_ENV},
    {"file": MISSING_FILE},
    {"file": FOLDER},
    {"file": BINARY_FILE},
    {"env": ""},
    {"file": ""},
    {"env": "A\0B"},
    {"env": 5},
    {"file": 42},
    {"env": {}},
    {"file": []},
    {"file": {"file": SECRET_FILE}},
    {},
    {"env": SET_ENV, "file": SECRET_FILE},
    {"name": SET_ENV},
    "literal-password",
    "",
    42,
    [SET_ENV],
    [{"env": SET_ENV}],
    dt.date(2024, 1, 1),
]


def bad_values(key: Key) -> list[Any]:
    """Values of the right TOML type that are still invalid, whatever the key's check says."""
    kind = key.kind
    if kind in ("str", "choice"):
        return ["", "\0", "a\0b", *(["not-a-choice", "\n"] if kind == "choice" else [])]
    if kind in ("int", "float"):
        low, high = key.minimum, key.maximum
        out = [10**300 if high is None else high + 1, -(10**300) if low is None else low - 1]
        if kind == "float":
            out += [float("nan"), float("inf"), float("-inf"), 10**400, -(10**400)]
            if high is not None:
                out.append(float(high) * 1.5)
        return out
    if kind in ("strlist", "argv"):
        return [[""], ["a\0"], [1], [[]], ["x", {}], [dt.time(1, 2)]]
    if kind == "secret":
        return BAD_SECRETS
    return []


def bad_value(key: Key) -> st.SearchStrategy[Any]:
    values = bad_values(key)
    if not values:  # bool: every bool is fine, so a wrong type
        return ANY_VALUE.filter(lambda v: not accepts(key.kind, v))
    if key.kind == "choice":
        return st.sampled_from(values) | st.text(CHARS).filter(lambda t: t not in key.choices)
    return st.sampled_from(values)


# -- running the CLI in-process -------------------------------------------------------------------

PROBLEM_PATH = re.compile(
    r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"(?:\.\.\.)?)'
    r'(?:\.(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"(?:\.\.\.)?))*: \S'
)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    problems: list[str]  # the error lines without "snapcoord: error: FILE: "


def check_config_text(text: str | bytes, *, placeholders: bool = True) -> Outcome:
    """Write the file into a fresh folder, run ``snapcoord -c FILE config check`` in-process and
    assert the properties that hold for every input."""
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        secret = base / "secret"
        secret.write_text("s3cret\n")
        secret.chmod(0o600)
        binary = base / "binary"
        binary.write_bytes(b"\xff\xfe\x00secret")
        binary.chmod(0o600)
        if isinstance(text, str) and placeholders:
            for placeholder, path in (
                (SECRET_FILE, secret),
                (BINARY_FILE, binary),
                (MISSING_FILE, base / "missing"),
                (FOLDER, base),
            ):
                text = text.replace(placeholder, str(path))
        config = base / "snapcoord.toml"
        if isinstance(text, bytes):
            config.write_bytes(text)
        else:
            config.write_text(text, encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        env = {SET_ENV: "from-env"}
        with (
            mock.patch.dict(os.environ, env),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            os.environ.pop(UNSET_ENV, None)
            code = main(["-c", str(config), "config", "check"])
    stderr = unstamped(err.getvalue())  # a StringIO is no terminal: each line has its time
    assert code in (0, 2), (code, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert all(line.startswith(("snapcoord: error: ", "snapcoord: warning: ")) for line in lines), (
        stderr
    )
    errors = [line for line in lines if line.startswith("snapcoord: error: ")]
    prefix = f"snapcoord: error: {config}: "
    assert all(line.startswith(prefix) for line in errors), stderr  # each names the file...
    problems = [line.removeprefix(prefix) for line in errors]
    for problem in problems:  # ... and a key path, unless the file is not TOML at all
        assert problem.startswith("not valid TOML: ") or PROBLEM_PATH.match(problem), problem
    if code == 0:
        assert not errors and f"{config}: ok" in out.getvalue()
    else:
        assert problems, "exit 2 without a single error line"
    return Outcome(code, out.getvalue(), stderr, problems)


def check_config(config: dict[str, Any]) -> Outcome:
    text = render(config)
    assert same(tomllib.loads(text), config), "the test's TOML writer is wrong"
    return check_config_text(text)


def shown(path: tuple[str, ...]) -> str:
    """A key path as the messages write it (names from VALID_NAMES need no escaping)."""
    return ".".join(toml_key(p) for p in path)


# -- the properties -------------------------------------------------------------------------------

FUZZ = settings(max_examples=250, deadline=None, database=None)  # 250+500+200+100 examples


@FUZZ
@given(valid_configs())
def test_valid_configs_pass(config: dict[str, Any]) -> None:
    outcome = check_config(config)
    assert outcome.code == 0, outcome.problems


Expectation = Callable[[list[str]], bool]


def line_starting(text: str, *, containing: str = "") -> Expectation:
    def expect(problems: list[str]) -> bool:
        return any(p.startswith(text) and containing in p for p in problems)

    expect.__doc__ = f"a line starting with {text!r} containing {containing!r}"
    return expect


@st.composite
def one_defect(draw: st.DrawFn) -> tuple[dict[str, Any], Expectation]:
    """A valid configuration with exactly one defect, and the line that must report it."""
    config = draw(valid_configs())
    tables = schema_tables(config)
    kind = draw(
        st.sampled_from(
            [
                "wrong_type",
                "bad_value",
                "unknown_key",
                "missing_required",
                "not_a_table",
                "section_not_a_table",
                "odd_table_name",
                "bad_secret",
                "unknown_top_level",
                "dangling_hypervisor",
            ]
        )
    )

    def table_at(path: tuple[str, ...]) -> dict[str, Any]:
        node = config
        for part in path:
            node = node.setdefault(part, {})
        return node

    if kind in ("wrong_type", "bad_value"):
        path, keys = draw(st.sampled_from(tables))
        name = draw(st.sampled_from(sorted(keys)))
        key = keys[name]
        strategy = (
            bad_value(key)
            if kind == "bad_value"
            else ANY_VALUE.filter(lambda v: not accepts(key.kind, v))
        )
        table_at(path)[name] = draw(strategy)
        return config, line_starting(f"{shown(path)}.{name}: ")
    if kind == "unknown_key":
        path, keys = draw(st.sampled_from(tables))
        known = set(keys) | (
            set(schema.VM_SUBTABLES) if len(path) == 2 and path[0] == "vms" else set()
        )
        name = draw(ANY_NAME.filter(lambda n: n not in known))
        table_at(path)[name] = draw(ANY_VALUE)
        return config, line_starting(f"{shown(path)}.", containing=": unknown key")
    if kind == "missing_required":
        present = [
            (path, name)
            for path, keys in tables
            for name, key in keys.items()
            if key.default is REQUIRED and name in table_at(path)
        ]
        if not present:
            return config, lambda problems: True
        path, name = draw(st.sampled_from(present))
        del table_at(path)[name]
        return config, line_starting(f"{shown(path)}.{name}: required key is missing")
    if kind == "not_a_table":
        path, _ = draw(st.sampled_from(tables))
        *parent, last = path
        table_at(tuple(parent))[last] = draw(NON_TABLE)
        return config, line_starting(f"{shown(path)}: must be a table")
    if kind == "section_not_a_table":
        section = draw(st.sampled_from(["defaults", "hypervisors", "vms"]))
        config[section] = draw(NON_TABLE)
        return config, line_starting(f"{section}: must be a table")
    if kind == "odd_table_name":
        section = draw(st.sampled_from(["hypervisors", "vms"]))
        name = draw(ANY_NAME.filter(lambda n: n not in config.get(section, {})))
        content = draw(st.just({}) | ANY_VALUE)
        config.setdefault(section, {})[name] = content
        if schema.TABLE_KEY_RE.fullmatch(name):
            return config, lambda problems: True  # a fine name: whatever the content says
        return config, line_starting(f"{section}.", containing=": name must be")
    if kind == "bad_secret":
        secrets = [
            (path, name)
            for path, keys in tables
            for name, key in keys.items()
            if key.kind == "secret"
        ]
        if not secrets:
            return config, lambda problems: True
        path, name = draw(st.sampled_from(secrets))
        table_at(path)[name] = draw(st.sampled_from(BAD_SECRETS))
        return config, line_starting(f"{shown(path)}.{name}: ")
    if kind == "unknown_top_level":
        name = draw(ANY_NAME.filter(lambda n: n not in ("defaults", "hypervisors", "vms")))
        config[name] = draw(ANY_VALUE)
        return config, lambda problems: any(": unknown table (" in p for p in problems)
    assert kind == "dangling_hypervisor"
    if not config.get("vms"):
        return config, lambda problems: True
    vm = draw(st.sampled_from(sorted(config["vms"])))
    target = draw(VALID_NAMES.filter(lambda n: n not in config.get("hypervisors", {})))
    config["vms"][vm]["hypervisor"] = target
    return config, line_starting(f"{shown(('vms', vm))}.hypervisor: no hypervisor ")


@settings(FUZZ, max_examples=500)
@given(one_defect())
def test_each_defect_is_exit_2_on_its_key_path(case: tuple[dict[str, Any], Expectation]) -> None:
    config, expect = case
    outcome = check_config(config)
    assert outcome.code == 2 or expect([]), "a defect passed as valid"
    assert expect(outcome.problems), (expect.__doc__, outcome.problems)


@st.composite
def chaos(draw: st.DrawFn) -> dict[str, Any]:
    """Several defects at once, or tables of anything under the known sections."""
    if draw(st.booleans()):
        config = draw(valid_configs())
        for _ in range(draw(st.integers(2, 3))):
            mutated, _expect = draw(one_defect())
            for section, value in mutated.items():
                config.setdefault(section, value)
                if isinstance(value, dict) and isinstance(config[section], dict):
                    config[section].update(value)
        return config
    return {
        section: draw(st.dictionaries(ANY_NAME, ANY_VALUE, max_size=3) | ANY_VALUE)
        for section in draw(
            st.lists(st.sampled_from(["defaults", "hypervisors", "vms"]), unique=True)
        )
    }


@settings(FUZZ, max_examples=200)
@given(chaos())
def test_any_configuration_is_exit_0_or_2(config: dict[str, Any]) -> None:
    check_config(config)


@settings(FUZZ, max_examples=100)
@given(
    st.binary(max_size=200)
    | st.text(CHARS, max_size=200)
    | st.builds(render, st.dictionaries(ANY_NAME, ANY_VALUE))
)
def test_any_file_is_exit_0_or_2(data: bytes | str) -> None:
    check_config_text(data, placeholders=False)


# -- every key, every TOML type -----------------------------------------------------------------

ONE_OF_EACH_TYPE = [
    "text",
    "",
    0,
    7,
    -(2**63),
    1.5,
    float("nan"),
    float("inf"),
    True,
    [],
    ["a", 1],
    [[]],
    {},
    {"env": [SET_ENV]},
    {"a": {"b": [{}]}},
    dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
    dt.datetime(2024, 5, 6, 7, 8, 9),
    dt.date(2024, 5, 6),
    dt.time(7, 8, 9),
]


def first_valid(key: Key) -> Any:
    """A deterministic valid value for a key, from the schema (no random draw)."""
    if key.kind == "choice":
        return key.choices[0]
    if key.kind == "bool":
        return False
    if key.kind in ("int", "float"):
        return math.ceil(key.minimum if key.minimum is not None else 0)
    if key.kind == "secret":
        return {"env": SET_ENV}
    if key.kind in ("strlist", "argv"):
        return []
    return good_samples(key)[0] if key.check else "x"


def key_locations() -> list[tuple[dict[str, Any], tuple[str, ...], dict[str, Key]]]:
    """For every table of the schema: a minimal valid configuration holding it, its path, keys."""
    found: list[tuple[dict[str, Any], tuple[str, ...], dict[str, Key]]] = []
    found.append(({}, ("defaults",), schema.DEFAULTS))
    hypervisors = {}
    for kind in HYPERVISOR_KINDS:
        keys = hypervisor_keys(kind)
        table = {n: first_valid(k) for n, k in keys.items() if k.default is REQUIRED}
        table["type"] = kind
        if kind == "proxmox":
            table.update({name: first_valid(keys[name]) for name in PROXMOX_PAIRS[0]})
        hypervisors[kind] = table
        found.append(({"hypervisors": {"h": table}}, ("hypervisors", "h"), keys))
    base = {"hypervisors": {"lab": hypervisors[HYPERVISOR_KINDS[0]]}}
    vm = {n: first_valid(k) for n, k in schema.VM.items() if k.default is REQUIRED}
    vm["hypervisor"] = "lab"
    found.append(({**base, "vms": {"db1": vm}}, ("vms", "db1"), schema.VM))
    for sub, keys in schema.VM_SUBTABLES.items():
        table = {n: first_valid(k) for n, k in keys.items() if k.default is REQUIRED}
        if sub == "guest":
            table["host"] = "db1"  # transport = "ssh" (the default) needs a host
        found.append(({**base, "vms": {"db1": {**vm, sub: table}}}, ("vms", "db1", sub), keys))
    return copy.deepcopy(found)


KEY_CASES = [
    pytest.param(config, path, name, key, id=".".join([*path, name]))
    for config, path, keys in key_locations()
    for name, key in keys.items()
]


def test_every_minimal_configuration_is_valid() -> None:
    for config, _path, _keys in key_locations():
        assert check_config(config).code == 0, config


@pytest.mark.parametrize(("config", "path", "name", "key"), KEY_CASES)
def test_every_key_given_every_toml_type(
    config: dict[str, Any], path: tuple[str, ...], name: str, key: Key
) -> None:
    """Each key of each table, given a value of each TOML type it does not take and bad values of
    its own type (bad secrets for a secret): exit 2 and a line on its key path (the schema walked
    exhaustively, no sampling)."""
    wrong_types = [v for v in ONE_OF_EACH_TYPE if not accepts(key.kind, v)]
    for value in wrong_types + bad_values(key):
        case = copy.deepcopy(config)
        table = case
        for part in path:
            table = table.setdefault(part, {})
        table[name] = value
        outcome = check_config(case)
        want = f"{shown(path)}.{name}: "
        assert outcome.code == 2, (value, outcome.stdout)
        assert any(p.startswith(want) for p in outcome.problems), (value, outcome.problems)


ALL_ODD_NAMES = [*ODD_NAMES, "x" * 63, "x" * 64, "x" * 1000]


@pytest.mark.parametrize("section", ["hypervisors", "vms"])
def test_every_odd_table_name(section: str) -> None:
    config, _path, _keys = key_locations()[-1]  # a hypervisor and a VM
    for name in ALL_ODD_NAMES:
        case = copy.deepcopy(config)
        case[section][name] = copy.deepcopy(
            case[section]["lab" if section == "hypervisors" else "db1"]
        )
        outcome = check_config(case)
        if schema.TABLE_KEY_RE.fullmatch(name):
            continue  # a fine name (the properties above still held)
        assert outcome.code == 2, name
        assert any(
            p.startswith(f"{section}.") and ": name must be" in p for p in outcome.problems
        ), (name, outcome.problems)


def test_every_odd_key_name_in_every_table() -> None:
    """Unknown keys with any name: one line each (names are quoted and escaped), exit 2."""
    for config, path, keys in key_locations():
        for name in ALL_ODD_NAMES:
            if name in keys or (len(path) == 2 and name in schema.VM_SUBTABLES):
                continue
            case = copy.deepcopy(config)
            table = case
            for part in path:
                table = table.setdefault(part, {})
            table[name] = 1
            outcome = check_config(case)
            assert outcome.code == 2, (path, name)
            assert any(
                p.startswith(f"{shown(path)}.") and ": unknown key" in p for p in outcome.problems
            ), (path, name, outcome.problems)
    for name in ALL_ODD_NAMES:
        if name not in ("defaults", "hypervisors", "vms"):
            outcome = check_config({name: {"a": 1}})
            assert [p for p in outcome.problems if ": unknown table (" in p], (name, outcome)


# -- explicit regressions -----------------------------------------------------------------------

LIBVIRT = '[hypervisors.lab]\ntype = "libvirt"\n'
VSPHERE = '[hypervisors.vc]\ntype = "vsphere"\nhost = "vc"\nuser = "u"\n'
VM = '[vms.db1]\nhypervisor = "lab"\n'


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[hypervisors.lab]\ntype = []\n", "hypervisors.lab.type: must be a non-empty string"),
        ("[hypervisors.lab]\ntype = {}\n", "hypervisors.lab.type: must be a non-empty string"),
        ('[hypervisors.lab]\ntype = { a = [1] }\nuri = "x"\n', "hypervisors.lab.type: must be"),
        ('[hypervisors."a.b"]\ntype = [[]]\n', 'hypervisors."a.b".type: must be'),
        ('vms = "x"\n', "vms: must be a table of tables"),
        ("hypervisors = []\n", "hypervisors: must be a table of tables"),
        ("defaults = 1979-05-27\n", "defaults: must be a table"),
        (LIBVIRT + '[vms]\ndb1 = "x"\n', "vms.db1: must be a table"),
        (LIBVIRT + VM + "guest = [1]\n", "vms.db1.guest: must be a table"),
        (
            LIBVIRT + VM + '[vms.db1.guest]\nhost = "h"\nservices = {}\n',
            "vms.db1.guest.services: must be a list of non-empty strings",
        ),
        (LIBVIRT + VM + "[vms.db1.guest]\nhost = { a = 1 }\n", "vms.db1.guest.host: must be"),
        (LIBVIRT + '[vms.db1]\nhypervisor = ["lab"]\n', "vms.db1.hypervisor: must be"),
        (VSPHERE + "password = { env = {} }\n", "hypervisors.vc.password: must be"),
        (VSPHERE + "password = { env = 5 }\n", "hypervisors.vc.password: must be"),
        (VSPHERE + "password = { file = 42 }\n", "hypervisors.vc.password: must be"),
        (VSPHERE + 'password = { file = "/x\\u0000y" }\n', "hypervisors.vc.password: must be"),
        (VSPHERE + "password = { file = [] }\n", "hypervisors.vc.password: must be"),
        (VSPHERE + "password = 1\n", "hypervisors.vc.password: must be"),
        ("[defaults]\nsnapshot_timeout = nan\n", "defaults.snapshot_timeout: must be a finite"),
        ("[defaults]\nsnapshot_timeout = inf\n", "defaults.snapshot_timeout: must be a number 1-"),
        (
            "[defaults]\nsnapshot_timeout = 1" + "0" * 400 + "\n",
            "defaults.snapshot_timeout: must be a number 1-",
        ),
        ("[defaults]\nsnapshot_timeout = 1e10\n", "defaults.snapshot_timeout: must be a number"),
        (
            "[vms.a]\nsnapshot_timeout = -1" + "0" * 400 + "\n",
            "vms.a.snapshot_timeout: must be a number 1-",
        ),
        ('[defaults]\nlabel = "nightly\\n"\n', "defaults.label: must be 1-13"),
        ('[defaults]\nstore = "/var/\\u0000"\n', "defaults.store: must not contain a NUL"),
        (
            LIBVIRT + VM + '[vms.db1.guest]\nhost = "h"\nservices = ["cron\\n"]\n',
            "vms.db1.guest.services: service name 'cron\\n': use letters",
        ),
        (LIBVIRT + '[vms."db1\\n"]\nhypervisor = "lab"\n', 'vms."db1\\n": name must be'),
        (LIBVIRT + '[vms."x\\u2028y"]\n', 'vms."x\\u2028y": name must be'),
        ('[hypervisors.lab]\ntype = "libvirt"\n"a\\nb" = 1\n', 'hypervisors.lab."a\\nb": unknown'),
        ('"" = 1\n', '"": unknown table'),
        ("[" + "x" * 5000 + "]\n", '"' + "x" * 60 + '"...: unknown table'),
        ("x = 1" + "0" * 5000 + "\n", "not valid TOML: "),
        ("x = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML: nested too deeply"),
        ("x = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n", "not valid TOML: nested too deeply"),
    ],
)
def test_crashes_found_by_fuzzing_are_exit_2_with_the_key_path(text: str, problem: str) -> None:
    outcome = check_config_text(text)
    assert outcome.code == 2
    assert any(p.startswith(problem) for p in outcome.problems), outcome.problems


def test_bad_secret_files_are_problems_not_crashes() -> None:
    for placeholder, problem in (
        (BINARY_FILE, "is not UTF-8 text"),
        (FOLDER, "is not a regular file"),
        (MISSING_FILE, "cannot read secret file"),
    ):
        outcome = check_config_text(VSPHERE + f'password = {{ file = "{placeholder}" }}\n')
        assert outcome.code == 2
        assert [p for p in outcome.problems if p.startswith("hypervisors.vc.password: ")]
        assert any(problem in p for p in outcome.problems), outcome.problems


def test_config_file_not_utf8_is_exit_2() -> None:
    text = b'[defaults]\nlabel = "\xff"\n'
    outcome = check_config_text(text)
    assert outcome.problems == [f"not valid TOML: not UTF-8 text (byte {text.index(0xFF)})"]


def test_a_crashing_case_in_a_real_process(tmp_path: Path) -> None:
    """The real process: one line per problem, exit 2, no traceback; a FIFO as a secret file
    would block reading it, so it is refused before (the timeout catches a hang)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    config = tmp_path / "c.toml"
    config.write_text(
        "[hypervisors.lab]\ntype = []\n\n[hypervisors.vc]\ntype = { x = 1 }\n\n"
        '[hypervisors.pve]\ntype = "proxmox"\nhost = "h"\nuser = "u"\n'
        f'password = {{ file = "{fifo}" }}\n'
        '\n[vms.db1]\nhypervisor = "lab"\nguest = { services = {} }\n'
    )
    proc = snapcoord("-c", str(config), "config", "check", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert all(line.startswith(f"snapcoord: error: {config}: ") for line in lines), lines
    for path in (
        "hypervisors.lab.type",
        "hypervisors.vc.type",
        "hypervisors.pve.password",
        "vms.db1.guest.services",
    ):
        assert any(line.startswith(f"snapcoord: error: {config}: {path}: ") for line in lines)

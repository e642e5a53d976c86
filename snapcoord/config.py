"""Find, load and validate the TOML configuration against :mod:`snapcoord.schema`.

Validation collects **every** problem, each with its key path, and raises one ConfigError.
It never raises anything else: whatever a TOML file holds, each problem is one line naming its key
path (names that are not bare TOML keys are quoted and escaped, long ones shortened).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from snapcoord import schema
from snapcoord.errors import ConfigError, UsageError
from snapcoord.schema import REQUIRED, Key
from snapcoord.secrets import Secret, resolve_secret
from snapcoord.settings import (
    HYPERVISOR_SETTINGS,
    SCHEMA_OF,
    ArchiveConfig,
    Config,
    Defaults,
    DumpConfig,
    GuestConfig,
    HooksConfig,
    HypervisorSettings,
    NotifyConfig,
    VMConfig,
    build,
)
from snapcoord.trust import UnsafeFile, read_trusted
from snapcoord.watchdog_rule import watchdog_problem

__all__ = ["Config", "VMConfig", "load_config", "parse_config", "parse_table"]

# Never the current directory: a file someone else left there would be code for root (hooks,
# exec_prefix, ssh_options). ssh reads no configuration from the current directory either.
SEARCH_PATH = (
    "~/.config/snapcoord/config.toml",
    "/etc/snapcoord/config.toml",
)


def find_config_file(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("SNAPCOORD_CONFIG")
    if env:
        return Path(env)
    for candidate in SEARCH_PATH:
        path = Path(candidate).expanduser()
        if path.is_file():
            return path
    hint = (
        "pass --config FILE, set SNAPCOORD_CONFIG, or create /etc/snapcoord/config.toml or "
        "~/.config/snapcoord/config.toml; snapcoord config example prints one"
    )
    if Path("snapcoord.toml").is_file():
        hint = "the current directory is not searched: pass --config ./snapcoord.toml to use it"
    raise UsageError("no configuration found", hint=hint)


def load_config(explicit: str | None = None, *, watchdog_rule: bool = True) -> Config:
    """The configuration, validated. ``watchdog_rule=False`` leaves the watchdog's length to
    the caller (``snapcoord check`` reports it as one VM's problem instead of refusing all)."""
    path = find_config_file(explicit)
    try:
        data = read_trusted(str(path))
    except UnsafeFile as exc:
        raise ConfigError([f"not used: this file {exc}"], source=str(path)) from None
    except FileNotFoundError:
        raise UsageError(f"configuration file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except ValueError:  # a NUL byte in the path
        raise UsageError(f"invalid configuration file name {str(path)!r}") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        problem = f"not valid TOML: not UTF-8 text (byte {exc.start})"
        raise ConfigError([problem], source=str(path)) from None
    except RecursionError:
        raise ConfigError(["not valid TOML: nested too deeply"], source=str(path)) from None
    except ValueError as exc:  # TOMLDecodeError, or an integer beyond int_max_str_digits
        raise ConfigError([f"not valid TOML: {_one_line(str(exc))}"], source=str(path)) from None
    return parse_config(raw, source=str(path), watchdog_rule=watchdog_rule)


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    return f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}"


def _key(name: str) -> str:
    """One component of a key path, as TOML would write it: bare, or quoted with every character
    that is not printable escaped (a problem stays one line); very long names are shortened."""
    if _BARE_KEY_RE.fullmatch(name):
        return name
    if len(name) > 64:
        return '"' + "".join(map(_escape, name[:60])) + '"...'
    return '"' + "".join(map(_escape, name)) + '"'


def _show(value: str) -> str:
    """A string value inside a message: repr (escapes line breaks), shortened when long."""
    return repr(value) if len(value) <= 64 else repr(value[:60]) + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _suggest(name: Any, keys: dict[str, Key]) -> str:
    """ "did you mean 'label'?" for a near miss; the table's keys otherwise."""
    close = difflib.get_close_matches(str(name), list(keys), n=1, cutoff=0.75)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known: " + ", ".join(sorted(keys))


class _Validator:
    def __init__(self, *, watchdog_rule: bool = True) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.watchdog_rule = watchdog_rule

    def table(self, raw: Any, keys: dict[str, Key], path: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.problems.append(f"{path}: must be a table")
            return {}
        out: dict[str, Any] = {}
        for name in raw:
            if name not in keys:
                self.problems.append(f"{path}.{_key(name)}: unknown key ({_suggest(name, keys)})")
        for name, key in keys.items():
            if name in raw:
                value = self.value(raw[name], key, f"{path}.{name}")
                if value is not None:
                    out[name] = value
            elif key.default is REQUIRED:
                self.problems.append(f"{path}.{name}: required key is missing")
            elif key.default is not None:  # optional keys without default stay absent
                out[name] = list(key.default) if isinstance(key.default, list) else key.default
        return out

    def value(self, value: Any, key: Key, path: str) -> Any:
        if key.kind == "secret" and isinstance(value, Secret):
            return value  # resolved already (parse_table from code; TOML never holds one)
        error = _type_error(value, key)
        if error is None and key.kind == "secret":
            secret, error, warning = resolve_secret(value)
            if warning:
                self.warnings.append(f"{path}: {warning}")
            value = secret
        elif error is None and key.check is not None:
            error = key.check(value)
        if error:
            self.problems.append(f"{path}: {error}")
            return None
        return float(value) if key.kind == "float" else value


_ENV_OR_FILE = 'must be { env = "NAME" } or { file = "/path" }'


def _text(value: Any) -> bool:
    """A non-empty string without NUL (which no path, argv or environment entry can hold)."""
    return isinstance(value, str) and bool(value) and "\0" not in value


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{value:.0f}"


def _type_error(value: Any, key: Key) -> str | None:
    kind = key.kind
    if kind in ("str", "choice"):
        if not isinstance(value, str) or not value:
            return "must be a non-empty string"
        if "\0" in value:
            return "must not contain a NUL character"
        if kind == "choice" and value not in key.choices:
            return "must be one of " + ", ".join(repr(c) for c in key.choices)
    elif kind == "bool":
        if not isinstance(value, bool):
            return "must be true or false"
    elif kind == "count":  # an integer within the bounds, or "auto"
        first, last = key.minimum or 0, key.maximum or 0
        if value != "auto" and (
            not isinstance(value, int) or isinstance(value, bool) or not first <= value <= last
        ):
            return f'must be "auto" or an integer {_number(first)}-{_number(last)}'
    elif kind in ("int", "float"):
        noun = "an integer" if kind == "int" else "a number"
        ok = isinstance(value, int) if kind == "int" else isinstance(value, int | float)
        if not ok or isinstance(value, bool):
            return f"must be {noun}"
        low, high = key.minimum, key.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                return f"must be {noun} {_number(low)}-{_number(high)}"
            if low is not None:
                return f"must be {noun} >= {_number(low)}"
            return f"must be {noun} <= {_number(high or 0)}"
        # nan passes every bound check; inf (or an int too big for a float) overflows the time
        # APIs a timeout ends up in
        if (isinstance(value, float) and not math.isfinite(value)) or (
            kind == "float" and abs(value) > sys.float_info.max
        ):
            return "must be a finite number"
    elif kind in ("strlist", "argv"):
        if not isinstance(value, list) or not all(_text(v) for v in value):
            return "must be a list of non-empty strings (without NUL characters)"
    elif kind == "secret":
        if isinstance(value, str):
            return f"must not be a literal: use {_ENV_OR_FILE.removeprefix('must be ')}"
        if not isinstance(value, dict) or len(value) != 1 or not set(value) <= {"env", "file"}:
            return _ENV_OR_FILE
        if not _text(next(iter(value.values()))):
            return _ENV_OR_FILE + " with a non-empty string"
    return None


def parse_config(
    raw: dict[str, Any], *, source: str = "<config>", watchdog_rule: bool = True
) -> Config:
    check = _Validator(watchdog_rule=watchdog_rule)
    if not isinstance(raw, dict):
        raise ConfigError(["the configuration must be a table"], source=source)
    for name in raw:
        if name not in ("defaults", "hypervisors", "vms", "notify"):
            check.problems.append(
                f"{_key(name)}: unknown table (known: defaults, hypervisors, vms, notify)"
            )
    defaults = build(Defaults, check.table(raw.get("defaults", {}), schema.DEFAULTS, "defaults"))
    notify = check.table(raw.get("notify", {}), schema.NOTIFY, "notify")

    hypervisors: dict[str, HypervisorSettings | None] = {
        name: _parse_hypervisor(table, f"hypervisors.{_key(name)}", check)
        for name, table in _named_tables(raw, "hypervisors", check).items()
    }

    vms: dict[str, VMConfig] = {}
    for name, table in _named_tables(raw, "vms", check).items():
        vm = _parse_vm(name, table, defaults, notify, hypervisors, check)
        if vm is not None:
            vms[name] = vm

    if check.problems:
        raise ConfigError(check.problems, source=source)
    typed = {name: settings for name, settings in hypervisors.items() if settings is not None}
    return Config(source, defaults, typed, vms, tuple(check.warnings), build(NotifyConfig, notify))


T = TypeVar("T")


def parse_table(cls: type[T], raw: dict[str, Any], *, path: str = "table") -> T:
    """One table, validated and typed on its own (``cls`` is a class of snapcoord.settings):
    for the callers and tests that build a piece of configuration without a whole file."""
    check = _Validator()
    if cls in HYPERVISOR_SETTINGS.values():
        value: Any = _parse_hypervisor(raw, path, check)
    else:
        value = build(cls, check.table(raw, SCHEMA_OF[cls], path))
    if check.problems:
        raise ConfigError(check.problems, source=path)
    if not isinstance(value, cls):
        raise ConfigError([f"{path}.type: must be a {cls.__name__} type"], source=path)
    return value


def _parse_hypervisor(table: Any, path: str, check: _Validator) -> HypervisorSettings | None:
    # Only a string can pick a type: anything else (a list or table is not even hashable)
    # leaves the common keys, and check.table reports the bad type.
    kind = table.get("type") if isinstance(table, dict) else None
    if not isinstance(kind, str):
        kind = None
    keys = dict(schema.HYPERVISOR_COMMON)
    if kind in schema.HYPERVISOR_TYPES:
        keys.update(schema.HYPERVISOR_TYPES[kind])
    before = len(check.problems)
    settings = check.table(table, keys, path)
    if kind == "proxmox":
        _check_proxmox_auth(settings, path, check)
    if settings.get("verify_tls") is False:
        check.warnings.append(f"{path}: verify_tls = false: the certificate is not checked")
    if kind not in HYPERVISOR_SETTINGS or len(check.problems) > before:
        return None
    return build(HYPERVISOR_SETTINGS[kind], settings)


def _named_tables(raw: dict[str, Any], section: str, check: _Validator) -> dict[str, Any]:
    tables = raw.get(section, {})
    if not isinstance(tables, dict):
        check.problems.append(f"{section}: must be a table of tables")
        return {}
    good = {}
    for name, table in tables.items():
        if not schema.TABLE_KEY_RE.fullmatch(name):
            check.problems.append(
                f"{section}.{_key(name)}: name must be 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        else:
            good[name] = table
    return good


def _check_proxmox_auth(settings: dict[str, Any], path: str, check: _Validator) -> None:
    token = "token_id" in settings or "token_secret" in settings
    ticket = "user" in settings or "password" in settings
    if token and ticket:
        check.problems.append(f"{path}: use either token_id/token_secret or user/password")
    elif token and not ("token_id" in settings and "token_secret" in settings):
        check.problems.append(f"{path}: token_id and token_secret go together")
    elif ticket and not ("user" in settings and "password" in settings):
        check.problems.append(f"{path}: user and password go together")
    elif not token and not ticket:
        check.problems.append(f"{path}: set token_id + token_secret (or user + password)")


def _renamed(table: dict[str, Any], old: str, new: str, path: str, check: _Validator) -> None:
    """Accept a key under its former name, with a warning; both names at once is a problem."""
    if old not in table:
        return
    if new in table:
        check.problems.append(f"{path}.{old}: set {new} only ({old} is its former name)")
    else:
        check.warnings.append(f"{path}.{old}: deprecated name, use {new}")
        table[new] = table[old]
    del table[old]


#: Hypervisors whose API reaches a QEMU guest agent (docs/guest.md, "The guest agent transport").
AGENT_HYPERVISORS = ("libvirt", "proxmox")


def _check_agent_transport(
    guest: dict[str, Any], hypervisor: HypervisorSettings | None, gpath: str, check: _Validator
) -> None:
    """``transport = "agent"``: a QEMU hypervisor; SSH's keys mean nothing (``guest``: the keys
    the table sets); containers keep ``exec`` (``pct exec``) or SSH."""
    kind = getattr(hypervisor, "type", None)
    if kind is not None and kind not in AGENT_HYPERVISORS:
        check.problems.append(
            f"{gpath}.transport: 'agent' needs a libvirt or proxmox hypervisor (QEMU's guest "
            f"agent), not {kind}; use 'ssh'"
        )
    ssh_keys = [key for key in SSH_ONLY_KEYS if key in guest]
    if ssh_keys and guest.get("dump_transport") != "ssh":
        check.warnings.append(
            f"{gpath}: {', '.join(ssh_keys)} ignored with transport = 'agent' (no SSH is used "
            "unless dump_transport = 'ssh')"
        )
    if guest.get("sudo"):
        check.warnings.append(
            f"{gpath}.sudo: ignored with transport = 'agent' (the agent runs commands as root)"
        )


SSH_ONLY_KEYS = ("host", "port", "user", "identity_file", "known_hosts", "host_key_fingerprint",
                 "accept_new_host_key", "ssh_config", "ssh_options")  # fmt: skip


def _parse_vm(
    name: str,
    table: Any,
    defaults: Defaults,
    notify: dict[str, Any],
    hypervisors: dict[str, HypervisorSettings | None],
    check: _Validator,
) -> VMConfig | None:
    path = f"vms.{_key(name)}"
    known_problems = len(check.problems)
    if not isinstance(table, dict):
        check.problems.append(f"{path}: must be a table")
        return None
    table = dict(table)
    _renamed(table, "mysqldump", "dump", path, check)
    if isinstance(table.get("guest"), dict):
        table["guest"] = dict(table["guest"])
        _renamed(table["guest"], "mysqldump", "dump", f"{path}.guest", check)
    own = {k: v for k, v in table.items() if k not in schema.VM_SUBTABLES}
    settings = check.table(own, schema.VM, path)
    subs = {
        sub: check.table(table.get(sub, {}), keys, f"{path}.{sub}")
        for sub, keys in schema.VM_SUBTABLES.items()
    }
    hypervisor = settings.get("hypervisor")
    if hypervisor is not None and hypervisor not in hypervisors:
        known = ", ".join(_key(h) for h in sorted(hypervisors)) or "none"
        check.problems.append(
            f"{path}.hypervisor: no hypervisor {_show(hypervisor)} (defined: {known})"
        )
    if "vmid" in settings and "name" in table:
        check.problems.append(f"{path}: set either name or vmid, not both")
    ref = str(settings["vmid"]) if "vmid" in settings else settings.get("name") or name

    guest = subs["guest"] if "guest" in table else None
    if guest is not None:
        gpath = f"{path}.guest"
        # the raw table: a host that failed its check is reported once, as that problem
        if guest.get("transport") == "ssh" and "host" not in table["guest"]:
            check.problems.append(f"{gpath}.host: required when transport = 'ssh'")
        if guest.get("transport") == "exec" and "exec_prefix" not in table["guest"]:
            check.problems.append(
                f"{gpath}.exec_prefix: required when transport = 'exec' ([] runs locally)"
            )
        raw = table["guest"] if isinstance(table["guest"], dict) else {}  # else: reported
        if guest.get("transport") == "agent":
            given = {**raw, "dump_transport": guest.get("dump_transport")}
            _check_agent_transport(given, hypervisors.get(hypervisor or ""), gpath, check)
            if guest.get("dump_transport") == "ssh" and "host" not in raw:
                check.problems.append(f"{gpath}.host: required when dump_transport = 'ssh'")
        elif "dump_transport" in raw:
            check.warnings.append(f"{gpath}.dump_transport: ignored unless transport = 'agent'")
    if "dump" in table and (guest is None or not guest.get("dump")):
        check.warnings.append(f"{path}.dump: ignored unless {path}.guest.dump = true")
    guest_cfg = None
    if guest is not None and len(check.problems) == known_problems:  # a valid guest table
        guest_cfg = build(GuestConfig, guest)
        problem = watchdog_problem(guest_cfg, f"{path}.guest") if check.watchdog_rule else None
        if problem:
            check.problems.append(problem)
    if check.problems:
        return None  # nothing is built from a configuration with problems
    return build(
        VMConfig,
        settings,
        key=name,
        ref=ref,
        hypervisor=hypervisor,
        label=settings.get("label") or defaults.label,
        snapshot_timeout=settings.get("snapshot_timeout") or defaults.snapshot_timeout,
        guest=guest_cfg,
        hooks=build(HooksConfig, subs["hooks"]),
        dump=build(DumpConfig, subs["dump"]),
        archive=build(ArchiveConfig, subs["archive"]),
        notify=build(NotifyConfig, {**notify, **subs["notify"]}),
        **{
            name: settings[name] if name in settings else getattr(defaults, name)
            for name in schema.RETENTION
        },
    )

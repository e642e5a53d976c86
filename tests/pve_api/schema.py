"""Routing and parameter validation from the Proxmox VE schema subset in data/.

Error strings follow pve-common's ``PVE::JSONSchema`` as quoted in data/NOTES.md section 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
SCHEMA_FILE = DATA / "pve-snapshot-api.json"
#: endpoints beyond the shared subset, in the same shape (what ``snapcoord check`` asks)
EXTRA_SCHEMA_FILES = (DATA / "pve-check-api.json", DATA / "pve-agent-api.json")

NODE_RE = re.compile(r"^([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?)$")
VMID_RE = re.compile(r"^[1-9][0-9]{2,8}$")
CONFIGID_RE = re.compile(r"^[a-z][a-z0-9_-]+$", re.IGNORECASE)
REALM_RE = re.compile(r"^[A-Za-z][A-Za-z0-9\.\-_]+$")
INT_RE = re.compile(r"^-?\d+$")

MISSING = "property is missing and it is not optional"
UNKNOWN = "property is not defined in schema and the schema does not allow additional properties"


def _check_format(fmt: Any, value: str) -> str | None:
    """The validator's die text (with its trailing newline), or None when the value is fine."""
    if fmt == "pve-configid":
        return None if CONFIGID_RE.match(value) else f"invalid configuration ID '{value}'\n"
    if fmt == "pve-node":
        return None if NODE_RE.match(value) else "value does not look like a valid node name\n"
    if fmt == "pve-vmid":
        return None if VMID_RE.match(value) else "value does not look like a valid VM ID\n"
    if fmt == "pve-realm":
        return None if REALM_RE.match(value) else f"invalid realm '{value}'\n"
    return None  # formats the double does not model (CIDR, property strings, ...)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    segments: tuple[str, ...]
    params: dict[str, dict[str, Any]]
    allowtoken: bool
    returns_task_upid: bool
    raw: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"

    def match(self, method: str, segments: list[str]) -> dict[str, str] | None:
        if method != self.method or len(segments) != len(self.segments):
            return None
        found: dict[str, str] = {}
        for want, got in zip(self.segments, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                found[want[1:-1]] = got
            elif want != got:
                return None
        return found

    @property
    def literal_count(self) -> int:
        return sum(not s.startswith("{") for s in self.segments)


class Schema:
    def __init__(
        self, path: Path = SCHEMA_FILE, extra: tuple[Path, ...] = EXTRA_SCHEMA_FILES
    ) -> None:
        items = [
            item
            for file in (path, *extra)
            for item in json.loads(file.read_text(encoding="utf-8"))["endpoints"]
        ]
        self.endpoints: list[Endpoint] = []
        #: what a double claiming Proxmox VE 8 does differently (the files' ``_pve8``): its one
        #: guest agent privilege, parameters its endpoints lack, its POST size limit
        self.pve8_permission: tuple[str, ...] = ()
        self.pve8_absent: dict[str, frozenset[str]] = {}
        self.pve8_max_post: int | None = None
        for file in (path, *extra):
            pve8 = json.loads(file.read_text(encoding="utf-8")).get("_pve8")
            if pve8:
                self.pve8_permission = tuple(pve8["permission"])
                self.pve8_absent.update(
                    {name: frozenset(keys) for name, keys in pve8["absent_parameters"].items()}
                )
                self.pve8_max_post = int(pve8["max_post"])
        for item in items:
            segments = tuple(s for s in item["path"].split("/") if s)
            self.endpoints.append(
                Endpoint(
                    method=item["method"],
                    path=item["path"],
                    segments=segments,
                    params={p["name"]: p for p in item["parameters"]},
                    allowtoken=bool(item.get("allowtoken", True)),
                    returns_task_upid=bool(item.get("returns_task_upid")),
                    raw=item,
                )
            )
        #: every privilege a permission check of the schema names (what "all" means here)
        self.privileges = frozenset(
            priv
            for item in items
            if (item.get("permissions") or {}).get("check", [None])[0] == "perm"
            for priv in item["permissions"]["check"][2]
        ) | frozenset(self.pve8_permission)
        # Most literal segments first, so /status/current wins over a placeholder.
        self.endpoints.sort(key=lambda e: -e.literal_count)

    def route(self, method: str, segments: list[str]) -> tuple[Endpoint, dict[str, str]] | None:
        for endpoint in self.endpoints:
            found = endpoint.match(method, segments)
            if found is not None:
                return endpoint, found
        return None


def _add(errors: dict[str, str], key: str, message: str) -> None:
    # JSONSchema.pm joins several messages for one key with the two characters backslash-n.
    errors[key] = f"{errors[key]}\\n{message}" if key in errors else message


def _type_ok(kind: str, value: Any) -> tuple[bool, Any]:
    """Type check of one value, form-encoded (str) or JSON. Returns (ok, converted)."""
    if kind == "boolean":
        if isinstance(value, bool):
            return True, value
        if isinstance(value, int) and value in (0, 1):
            return True, bool(value)
        if value in ("0", "1"):
            return True, value == "1"
        return False, value
    if kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if isinstance(value, str) and INT_RE.match(value):
            return True, int(value)
        return False, value
    if kind == "number":
        try:
            return True, float(value)
        except (TypeError, ValueError):
            return False, value
    if kind == "string":
        if isinstance(value, bool | int | float):
            return True, str(value)
        return isinstance(value, str), value
    return True, value


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "ARRAY"
    if isinstance(value, dict):
        return "HASH"
    return str(value)


def validate(
    endpoint: Endpoint, params: dict[str, Any], absent: frozenset[str] = frozenset()
) -> tuple[dict[str, str], dict[str, Any]]:
    """Check ``params`` (path and query/body merged) like PVE::JSONSchema::validate; ``absent``
    names parameters this version's endpoint does not have.

    Returns (errors by parameter name, converted values).
    """
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:  # undefined: as if not given (a required one is missing below)
            continue
        spec = endpoint.params.get(key)
        if spec is None or key in absent:
            _add(errors, key, UNKNOWN)
            continue
        kind = spec["type"]
        if kind == "array":
            # RESTHandler's normalize_legacy_param_formats: one form value is a one-element
            # array; items are checked like any value of their type
            items = value if isinstance(value, list) else [value]
            item_kind = (spec.get("items") or {}).get("type", "string")
            bad = [
                i for i, v in enumerate(items)
                if isinstance(v, list | dict) or not _type_ok(item_kind, v)[0]
            ]  # fmt: skip
            for index in bad:  # check_prop's path for an item: name[index]
                _add(errors, f"{key}[{index}]", f"type check ('{item_kind}') failed")
            if not bad:
                clean[key] = [_type_ok(item_kind, v)[1] for v in items]
            continue
        if isinstance(value, list | dict):
            _add(errors, key, f"type check ('{kind}') failed - got {_shown(value)}")
            continue
        ok, converted = _type_ok(kind, value)
        if not ok:
            _add(errors, key, f"type check ('{kind}') failed - got '{_shown(value)}'")
            continue
        text = str(value)
        fmt = spec.get("format")
        if fmt is not None and kind != "boolean":
            problem = _check_format(fmt, text)
            if problem is not None:
                _add(errors, key, f"invalid format - {problem}")
        if kind in ("integer", "number"):
            if "minimum" in spec and converted < spec["minimum"]:
                _add(errors, key, f"value must have a minimum value of {spec['minimum']}")
            if "maximum" in spec and converted > spec["maximum"]:
                _add(errors, key, f"value must have a maximum value of {spec['maximum']}")
        if kind == "string":
            if "maxLength" in spec and len(text) > spec["maxLength"]:
                _add(errors, key, f"value may only be {spec['maxLength']} characters long")
            if "minLength" in spec and len(text) < spec["minLength"]:
                _add(errors, key, f"value must be at least {spec['minLength']} characters long")
            pattern = spec.get("pattern")
            if pattern and not re.fullmatch(pattern, text):
                _add(errors, key, "value does not match the regex pattern")
            enum = spec.get("enum")
            if enum and text not in enum:
                _add(
                    errors,
                    key,
                    f"value '{text}' does not have a value in the enumeration '{', '.join(enum)}'",
                )
        clean[key] = converted
    for key, spec in endpoint.params.items():
        if not spec.get("optional") and params.get(key) is None and key not in absent:
            _add(errors, key, MISSING)
    return errors, clean

"""`snapcoord config example`: a commented configuration generated from the schema itself."""

from __future__ import annotations

import json
from typing import Any

from snapcoord import schema
from snapcoord.schema import REQUIRED, Key

_EXAMPLE_VALUES: dict[str, Any] = {
    "hypervisors.vcenter.password": {"env": "VSPHERE_PASSWORD"},
    "hypervisors.pve.token_secret": {"env": "PVE_TOKEN_SECRET"},
    "hypervisors.vcenter.host": "vcenter.example.org",
    "hypervisors.vcenter.user": "snapcoord@vsphere.local",
    "hypervisors.pve.host": "pve1.example.org",
    "hypervisors.pve.token_id": "snapcoord@pve!backup",
    "vms.db1.name": "db1-on-the-hypervisor",
    "vms.db1.guest.host": "db1.example.org",
    "vms.db1.guest.user": "backup",
    "vms.db1.guest.sudo": True,
}

_SKIP_IN_EXAMPLE = {"hypervisors.pve.user", "hypervisors.pve.password", "vms.db1.vmid"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


def _table(lines: list[str], title: str, keys: dict[str, Key], path: str) -> None:
    lines.append(f"[{title}]")
    for name, key in keys.items():
        full = f"{path}.{name}"
        if full in _SKIP_IN_EXAMPLE:
            continue
        value = _EXAMPLE_VALUES.get(full, key.example)
        if value is None and key.default is not REQUIRED:
            value = key.default
        choices = f" ({' | '.join(key.choices)})" if key.choices else ""
        lines.append(f"# {key.doc}{choices}")
        if value is None:
            lines.append(f"# {name} = ...")
        elif full in _EXAMPLE_VALUES or key.default is REQUIRED or key.example is not None:
            lines.append(f"{name} = {_toml_value(value)}")
        else:
            lines.append(f"# {name} = {_toml_value(value)}")
    lines.append("")


def example_config() -> str:
    lines = [
        "# snapcoord configuration (generated from the schema: snapcoord config example).",
        '# Commented keys show their defaults. Secrets: { env = "NAME" } or { file = "/path" }.',
        "",
    ]
    _table(lines, "defaults", schema.DEFAULTS, "defaults")
    _table(lines, "notify", schema.NOTIFY, "notify")
    for name, kind in (("lab", "libvirt"), ("vcenter", "vsphere"), ("pve", "proxmox")):
        keys = {**schema.HYPERVISOR_COMMON, **schema.HYPERVISOR_TYPES[kind]}
        _EXAMPLE_VALUES[f"hypervisors.{name}.type"] = kind
        _table(lines, f"hypervisors.{name}", keys, f"hypervisors.{name}")
    _table(lines, "vms.db1", schema.VM, "vms.db1")
    for sub, keys in schema.VM_SUBTABLES.items():
        _table(lines, f"vms.db1.{sub}", keys, f"vms.db1.{sub}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The key reference embedded in docs/configuration.md (a test keeps the two equal)."""
    sections: list[tuple[str, dict[str, Key]]] = [
        ("[defaults]", schema.DEFAULTS),
        ("[notify]", schema.NOTIFY),
    ]
    for kind, keys in schema.HYPERVISOR_TYPES.items():
        sections.append((f'[hypervisors.NAME] type = "{kind}"', keys))
    sections.append(("[vms.NAME]", schema.VM))
    sections += [(f"[vms.NAME.{sub}]", keys) for sub, keys in schema.VM_SUBTABLES.items()]
    lines: list[str] = []
    for title, keys in sections:
        lines += [f"### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, key in keys.items():
            if key.default is REQUIRED:
                default = "**required**"
            elif key.default is None:
                default = ""
            else:
                default = f"`{_toml_value(key.default)}`"
            kind = key.kind + (f" ({', '.join(key.choices)})" if key.choices else "")
            if key.kind == "count":
                kind = f"int ({key.minimum:g}-{key.maximum:g}) or auto"
            lines.append(f"| `{name}` | {kind} | {default} | {key.doc} |")
        lines.append("")
    return "\n".join(lines)

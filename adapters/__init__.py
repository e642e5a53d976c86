"""Hypervisor adapters. Each SDK is imported only when a VM on that hypervisor is used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from snapcoord.errors import MissingDependency, UsageError
from snapcoord.settings import HypervisorSettings

if TYPE_CHECKING:
    from snapcoord.adapters.base import Adapter

# type -> (module, class, pip extra, SDK top-level modules whose absence means "install the extra")
REGISTRY: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "libvirt": ("snapcoord.adapters.libvirt_adapter", "LibvirtAdapter", "libvirt", ("libvirt",)),
    "vsphere": ("snapcoord.adapters.vsphere", "VSphereAdapter", "vsphere", ("pyVmomi", "pyVim")),
    "proxmox": (
        "snapcoord.adapters.proxmox",
        "ProxmoxAdapter",
        "proxmox",
        ("proxmoxer", "requests"),
    ),
}


def adapter_class(kind: str) -> type[Adapter]:
    try:
        module_name, class_name, extra, sdk_modules = REGISTRY[kind]
    except KeyError:
        raise UsageError(f"unknown hypervisor type {kind!r}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in sdk_modules:
            raise MissingDependency(
                f"the {kind} adapter needs the {exc.name!r} module",
                hint=f"pip install 'snapcoord[{extra}]'",
            ) from exc
        raise
    cls: type[Adapter] = getattr(module, class_name)
    return cls


def open_adapter(name: str, settings: HypervisorSettings) -> Adapter:
    """Instantiate the adapter for hypervisor table ``name`` (settings already validated)."""
    return adapter_class(settings.type)(name, settings)

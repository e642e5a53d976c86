"""The configuration as typed, frozen values: one class per table of :mod:`snapcoord.schema`.

The schema stays the one place for key names, types, bounds and defaults; these classes only give
the validated tables a type. :func:`build` fills a class from a validated table (config.py), and
a check at import time keeps every class's fields equal to its schema table, so the two cannot
drift apart. Lists become tuples (the values are frozen); optional keys that are not set are None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from snapcoord import schema
from snapcoord.errors import UsageError
from snapcoord.schema import Key
from snapcoord.secrets import Secret


@dataclass(frozen=True)
class Defaults:
    store: str
    label: str
    snapshot_timeout: float
    metrics_file: str | None
    verify_dir: str
    keep_last: int | None
    keep_hourly: int | None
    keep_daily: int | None
    keep_weekly: int | None
    keep_monthly: int | None


@dataclass(frozen=True)
class RetentionPolicy:
    """How many snapcoord snapshots a VM keeps, per label (docs/retention.md); 0 = rule off."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    @property
    def configured(self) -> bool:
        """A policy with every rule off prunes nothing (it would otherwise delete all but one)."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class NotifyConfig:
    ping_url: str | None
    webhook_url: str | None
    timeout: float


@dataclass(frozen=True)
class HypervisorSettings:
    """Base of every ``[hypervisors.X]`` table; ``type`` picks the subclass."""

    type: str
    max_parallel: int = dataclasses.field(
        default=schema.HYPERVISOR_COMMON["max_parallel"].default, kw_only=True
    )


@dataclass(frozen=True)
class LibvirtSettings(HypervisorSettings):
    uri: str


@dataclass(frozen=True)
class TLSSettings(HypervisorSettings):
    verify_tls: bool
    ca_file: str | None
    thumbprint: str | None


@dataclass(frozen=True)
class VsphereSettings(TLSSettings):
    host: str
    port: int
    user: str
    password: Secret
    datacenter: str | None
    folder: str | None
    max_snapshots: int
    max_age_hours: float


@dataclass(frozen=True)
class ProxmoxSettings(TLSSettings):
    host: str
    port: int
    token_id: str | None
    token_secret: Secret | None
    user: str | None
    password: Secret | None
    lock_wait_seconds: float


HYPERVISOR_SETTINGS: dict[str, type[HypervisorSettings]] = {
    "libvirt": LibvirtSettings,
    "vsphere": VsphereSettings,
    "proxmox": ProxmoxSettings,
}


@dataclass(frozen=True)
class GuestConfig:
    transport: str
    dump_transport: str
    host: str | None
    port: int | None
    user: str | None
    identity_file: str | None
    known_hosts: str | None
    host_key_fingerprint: str | None
    accept_new_host_key: bool
    ssh_config: str | None
    ssh_options: tuple[str, ...]
    exec_prefix: tuple[str, ...]
    sudo: bool
    services: tuple[str, ...]
    parallel_services: bool
    database: str
    consistency: str
    pause_method: str
    pause_timeout: float
    check_url: str | None
    dump: bool
    watchdog_seconds: int
    freeze_max_seconds: int
    freeze_hook_max_seconds: int
    connect_timeout: float
    command_timeout: float
    stop_timeout: float
    start_timeout: float
    dump_timeout: float


@dataclass(frozen=True)
class HooksConfig:
    before: tuple[str, ...]
    frozen: tuple[str, ...]
    after: tuple[str, ...]
    timeout: float


@dataclass(frozen=True)
class DumpConfig:
    options: tuple[str, ...] | None  # None: the database kind's (schema.DEFAULT_DUMP_OPTIONS)
    databases: tuple[str, ...]
    compression: str
    threads: int | str  # 1-8 or "auto" (resolved in the kind's preflight)
    compress_on: str
    user: str | None
    password: Secret | None
    on_dump_failure: str
    verify: bool
    verify_timeout: float


@dataclass(frozen=True)
class ArchiveConfig:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class VMConfig:
    key: str  # the [vms.KEY] table name, used in messages, the store and locks
    ref: str  # what the adapter's find_vm receives: name, path, uuid:/moref: or vmid
    hypervisor: str
    name: str | None
    vmid: int | None
    vzdump_vmid: int | None
    memory: bool
    quiesce: bool
    label: str  # defaults.label when the VM sets none
    snapshot_timeout: float  # defaults.snapshot_timeout when the VM sets none
    safety_snapshot: bool
    tags: tuple[str, ...]
    keep_last: int | None  # each keep_*: the VM's own value, else defaults', else None
    keep_hourly: int | None
    keep_daily: int | None
    keep_weekly: int | None
    keep_monthly: int | None
    guest: GuestConfig | None  # None: no [vms.X.guest] table, snapshots only
    hooks: HooksConfig
    dump: DumpConfig
    archive: ArchiveConfig
    notify: NotifyConfig  # [vms.X.notify] over [notify], key by key

    @property
    def retention(self) -> RetentionPolicy | None:
        """The VM's retention policy; None when no rule is on (nothing is ever pruned)."""
        policy = RetentionPolicy(
            **{name: getattr(self, name) or 0 for name in schema.RETENTION},
        )
        return policy if policy.configured else None


@dataclass(frozen=True)
class Config:
    source: str
    defaults: Defaults
    hypervisors: dict[str, HypervisorSettings]
    vms: dict[str, VMConfig]
    warnings: tuple[str, ...] = ()
    notify: NotifyConfig = NotifyConfig(None, None, schema.NOTIFY["timeout"].default)

    @property
    def store(self) -> Path:
        return Path(self.defaults.store)

    def vm(self, key: str) -> VMConfig:
        if key not in self.vms:
            known = ", ".join(sorted(self.vms)) or "none"
            raise UsageError(f"no VM {key!r} in {self.source} (configured: {known})")
        return self.vms[key]


T = TypeVar("T")


def build(cls: type[T], table: dict[str, Any], **extra: Any) -> T:
    """``cls`` from a validated table: absent optional keys become None, lists become tuples."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = extra[item.name] if item.name in extra else table.get(item.name)
        values[item.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


# Each class and the schema table(s) it types; VMConfig adds its own fields to schema.VM.
SCHEMA_OF: dict[type[Any], dict[str, Key]] = {
    Defaults: schema.DEFAULTS,
    GuestConfig: schema.GUEST,
    HooksConfig: schema.HOOKS,
    DumpConfig: schema.DUMP,
    ArchiveConfig: schema.ARCHIVE,
    NotifyConfig: schema.NOTIFY,
    **{
        cls: {**schema.HYPERVISOR_COMMON, **schema.HYPERVISOR_TYPES[kind]}
        for kind, cls in HYPERVISOR_SETTINGS.items()
    },
}
VM_OWN_FIELDS = ("key", "ref", *schema.VM_SUBTABLES)


def _check_fields() -> None:
    """A class whose fields differ from its schema table is a bug: fail at import."""
    tables: dict[type[Any], Iterable[str]] = {**SCHEMA_OF, VMConfig: [*schema.VM, *VM_OWN_FIELDS]}
    for cls, keys in tables.items():
        names = {item.name for item in dataclasses.fields(cls)}
        if names != set(keys):
            raise AssertionError(
                f"{cls.__name__} fields differ from the schema: {names ^ set(keys)}"
            )


_check_fields()

"""Which VMs a command works on: named VMs, ``--all``, ``--tag``, ``--hypervisor``, ``--select``
(a VM or a tag: what a systemd template's ``%i`` names), less ``--exclude``. Unknown names, tags
and hypervisors are errors (a typo must not silently select nothing, or everything but one)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from snapcoord.errors import UsageError
from snapcoord.settings import Config


@dataclass(frozen=True)
class Selection:
    names: tuple[str, ...] = ()
    all: bool = False
    tags: tuple[str, ...] = ()
    hypervisors: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    either: tuple[str, ...] = ()  # each a VM key or a tag

    @property
    def is_fleet(self) -> bool:
        """Selected by rule (or several names): the output ends with a summary object."""
        return self.all or bool(self.tags or self.hypervisors) or len(self.names) > 1


def select(config: Config, selection: Selection) -> list[str]:
    """The selected VM keys in configuration order, each once."""
    if selection.either:
        selection = _resolve_either(config, selection)
    for name in (*selection.names, *selection.exclude):
        config.vm(name)  # raises with the list of configured VMs
    known_tags = sorted({tag for vm in config.vms.values() for tag in vm.tags})
    for tag in selection.tags:
        if tag not in known_tags:
            raise UsageError(
                f"no VM has tag {tag!r} (tags in use: {', '.join(known_tags) or 'none'})",
                hint="set tags = [...] in [vms.NAME]",
            )
    for hypervisor in selection.hypervisors:
        if hypervisor not in config.hypervisors:
            known = ", ".join(sorted(config.hypervisors)) or "none"
            raise UsageError(f"no hypervisor {hypervisor!r} in {config.source} (defined: {known})")
    if not (selection.all or selection.names or selection.tags or selection.hypervisors):
        raise UsageError("no VM given: name VMs, or use --all, --tag T or --hypervisor H")
    chosen = [
        key
        for key, vm in config.vms.items()
        if selection.all
        or key in selection.names
        or set(vm.tags) & set(selection.tags)
        or vm.hypervisor in selection.hypervisors
    ]
    # named VMs keep the order they were given in; rules follow configuration order
    named = [key for key in selection.names if key in chosen]
    ordered = named + [key for key in chosen if key not in named]
    result = [key for key in ordered if key not in selection.exclude]
    if not result:
        raise UsageError("the selection is empty once --exclude is applied")
    return result


def _resolve_either(config: Config, selection: Selection) -> Selection:
    """``--select NAME``: the VM of that key, or the VMs with that tag; never both."""
    names, tags = list(selection.names), list(selection.tags)
    known_tags = {tag for vm in config.vms.values() for tag in vm.tags}
    for name in selection.either:
        if name in config.vms and name in known_tags:
            raise UsageError(
                f"--select {name}: {name!r} is both a VM and a tag",
                hint=f"use the VM's name alone, or --tag {name}",
            )
        if name in config.vms:
            names.append(name)
        elif name in known_tags:
            tags.append(name)
        else:
            raise UsageError(
                f"--select {name}: no VM and no tag {name!r} in {config.source}",
                hint="name a [vms.NAME] table, or a tag of tags = [...]",
            )
    return dataclasses.replace(selection, names=tuple(names), tags=tuple(tags), either=())

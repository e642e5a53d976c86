"""Secrets from `{ env = "NAME" }` or `{ file = "/path" }`.

Revealed only where used, masked everywhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from snapcoord.trust import UnsafeFile, read_trusted

MASK = "********"

#: the environment variables the configuration takes secrets from (``{ env = "NAME" }``):
#: no child process sees them (:func:`child_environment`)
_SECRET_VARIABLES: set[str] = set()


def child_environment(*, with_secrets: bool = False) -> dict[str, str]:
    """The environment for a child process: this one's, without the variables that hold the
    configuration's secrets (ssh, the guest's commands, hooks and the database clients never
    need them). ``with_secrets`` only for snapcoord's own children that load the same
    configuration (the freeze holder)."""
    env = dict(os.environ)
    if not with_secrets:
        for name in _SECRET_VARIABLES:
            env.pop(name, None)
    return env


@dataclass(frozen=True)
class Secret:
    """A secret value: ``str()``/``repr()`` never show it; :meth:`reveal` at the point of use."""

    source: str  # "env:NAME" or "file:/path": safe to show
    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({self.source})"


def resolve_secret(spec: dict[str, str]) -> tuple[Secret | None, str | None, str | None]:
    """Resolve a secret table. Returns ``(secret, error, warning)``; never raises (``spec`` holds
    non-empty strings without NUL). A secret file is read only if it is private to root or the
    running user (snapcoord.trust): one that others can read or change is an error."""
    if set(spec) == {"env"}:
        name = spec["env"]
        if name not in os.environ:
            return None, f"environment variable {name!r} is not set", None
        _SECRET_VARIABLES.add(name)
        return Secret(f"env:{name}", os.environ[name]), None, None
    if set(spec) == {"file"}:
        path = spec["file"]
        try:
            data = read_trusted(path, private=True)
        except UnsafeFile as exc:
            return None, f"secret file {path!r} not used: it {exc}", None
        except OSError as exc:
            return None, f"cannot read secret file {path!r}: {exc.strerror}", None
        try:
            value = data.decode("utf-8").rstrip("\n")
        except UnicodeDecodeError:
            return None, f"secret file {path!r} is not UTF-8 text", None
        return Secret(f"file:{path}", value), None, None
    return None, 'must be { env = "NAME" } or { file = "/path" }', None

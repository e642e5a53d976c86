"""Secrets from `{ env = "NAME" }` or `{ file = "/path" }`.

Revealed only where used, masked everywhere else.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

MASK = "********"


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
    """Resolve a secret table. Returns ``(secret, error, warning)``; never raises."""
    if set(spec) == {"env"}:
        name = spec["env"]
        if name not in os.environ:
            return None, f"environment variable {name!r} is not set", None
        return Secret(f"env:{name}", os.environ[name]), None, None
    if set(spec) == {"file"}:
        path = spec["file"]
        try:
            with open(path, encoding="utf-8") as handle:
                value = handle.read().rstrip("\n")
            mode = os.stat(path).st_mode
        except OSError as exc:
            return None, f"cannot read secret file {path!r}: {exc.strerror}", None
        warning = None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warning = f"secret file {path!r} is readable by others (chmod 600 it)"
        return Secret(f"file:{path}", value), None, warning
    return None, 'must be { env = "NAME" } or { file = "/path" }', None

"""Text for one-line messages: long reasons are clipped at a word, never mid-word."""

from __future__ import annotations

ELLIPSIS = "…"


def clip(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else cut at the last space before the
    limit (mid-word only when a single word is longer than half of it), ending in an ellipsis."""
    if len(text) <= limit:
        return text
    room = max(limit - len(ELLIPSIS), 1)
    cut = text.rfind(" ", 0, room + 1)
    if cut < room // 2:
        cut = room
    return text[:cut].rstrip(" ,;:") + ELLIPSIS

"""Hypothesis strategies for the hostile-input suites: JSON-like values of every shape, as a
corrupt file or a broken server would hand them to snapcoord (tests/test_*_boundary.py,
tests/test_proxmox_answers.py, tests/test_vsphere_answers.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st


def scalars(*likely: Any, nan: bool = True) -> st.SearchStrategy[Any]:
    """None, booleans, huge integers, floats (NaN and infinities unless ``nan`` is False: JSON
    files hold none), short text, and the ``likely`` values that reach deeper checks."""
    parts: list[st.SearchStrategy[Any]] = [
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=nan, allow_infinity=nan),
        st.text(max_size=20),
    ]
    if likely:
        parts.append(st.sampled_from(likely))
    return st.one_of(*parts)


def nested(
    leaves: st.SearchStrategy[Any], keys: Sequence[str], *, max_leaves: int = 12
) -> st.SearchStrategy[Any]:
    """``leaves`` in lists and in objects whose keys are ``keys`` (the fields a reader looks
    for), nested."""
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(keys), inner, max_size=6)
        ),
        max_leaves=max_leaves,
    )


def records(keys: Sequence[str], values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Objects with any of ``keys``, each holding any of ``values``."""
    return st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))

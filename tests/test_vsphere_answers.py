"""vSphere answers of every shape (issue 23: hostile inputs): a snapshot tree is read at one
place (``adapters/vsphere.snapshots_from_info``), node by node, without recursion; one of a
shape vSphere does not send, or larger or deeper than it ever does, is one error line (exit 3),
never a traceback. Property-based over trees of every shape, a 5000-deep chain (the recursive
walk died of RecursionError), and on the real simulator: snapshot names with terminal escapes
and bidirectional overrides are listed as escapes."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask

from snapcoord.adapters.vsphere import MAX_SNAPSHOTS, BadAnswer, snapshots_from_info
from tests.test_vsphere_cli import run  # noqa: F401 - fixture
from tests.vcsim_fixture import (  # noqa: F401 - fixtures
    CLUSTER_VM,
    VCSim,
    vcsim,
    vcsim_binary,
    vcsim_factory,
)

WHEN = datetime(2026, 12, 1, 3, tzinfo=UTC)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=12),
    st.just(WHEN),
    st.builds(lambda m: SimpleNamespace(_moId=m), st.one_of(st.text(max_size=8), st.none())),
)


def node(children: list[Any], fields: dict[str, Any]) -> SimpleNamespace:
    base = {"snapshot": SimpleNamespace(_moId="snapshot-1"), "name": "n", "createTime": WHEN,
            "description": "", "state": "poweredOff", "quiesced": False, "id": 1,
            "childSnapshotList": children}  # fmt: skip
    return SimpleNamespace(**{**base, **fields})


field_names = st.sampled_from(
    ["snapshot", "name", "createTime", "description", "state", "quiesced", "childSnapshotList"]
)
trees = st.recursive(
    st.builds(node, st.just([]), st.dictionaries(field_names, scalars, max_size=3)),
    lambda inner: st.builds(
        node, st.lists(inner, max_size=3), st.dictionaries(field_names, scalars, max_size=2)
    ),
    max_leaves=12,
)
infos = st.one_of(
    st.none(),
    st.builds(
        lambda roots, current: SimpleNamespace(rootSnapshotList=roots, currentSnapshot=current),
        st.one_of(st.lists(trees, max_size=3), scalars),
        st.one_of(st.none(), st.builds(lambda m: SimpleNamespace(_moId=m), st.text(max_size=8))),
    ),
)


@settings(max_examples=600, deadline=None)
@given(info=infos)
def test_any_tree_gives_snapshots_or_bad_answer_never_another_exception(info: Any) -> None:
    try:
        found = snapshots_from_info(info)
    except BadAnswer:
        return
    for snap in found:
        assert isinstance(snap.name, str) and snap.name and isinstance(snap.id, str)
        assert snap.created is None or snap.created.tzinfo is not None
        assert isinstance(snap.description, str)


def chain(depth: int) -> SimpleNamespace:
    """A chain of ``depth`` snapshots, each the child of the one before (built bottom-up)."""
    tree = None
    for level in reversed(range(depth)):
        fields = {"snapshot": SimpleNamespace(_moId=f"snapshot-{level}"), "name": f"s{level}"}
        tree = node([] if tree is None else [tree], fields)
    return SimpleNamespace(rootSnapshotList=[tree], currentSnapshot=None)


def test_a_chain_deeper_than_the_stack_is_read_without_recursion() -> None:
    found = snapshots_from_info(chain(MAX_SNAPSHOTS - 1))
    assert len(found) == MAX_SNAPSHOTS - 1
    parents = {snap.name: snap.parent for snap in found}
    assert parents["s0"] is None and parents["s1"] == "s0"
    assert parents[f"s{MAX_SNAPSHOTS - 2}"] == f"s{MAX_SNAPSHOTS - 3}"


def test_a_chain_larger_than_vsphere_keeps_is_refused() -> None:
    with pytest.raises(BadAnswer, match=f"more than {MAX_SNAPSHOTS} snapshots"):
        snapshots_from_info(chain(5000))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"name": None}, "no name"),
        ({"snapshot": None}, "no MoRef ID"),
        ({"createTime": "yesterday"}, "createTime is not a time"),
        ({"description": 5}, "description is not text"),
        ({"childSnapshotList": "x"}, "not a list"),
    ],
)
def test_each_wrong_field_is_named(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(BadAnswer, match=problem):
        snapshots_from_info(SimpleNamespace(rootSnapshotList=[node([], fields)]))


# -- on the simulator -------------------------------------------------------------------------

# what XML lets through (C0 controls but tab and newline are not XML characters): the 8-bit
# CSI, DEL, a bidirectional override
HOSTILE_NAMES = ["csi\x9b2J\x9b31m", "invoice\u202egpj.exe", "del\x7fname"]


@pytest.mark.real
def test_hostile_snapshot_names_are_listed_as_escapes(
    vcsim: VCSim,
    run: Callable[..., Any],
) -> None:
    ctx = ssl.create_default_context(cafile=str(vcsim.cert_file))
    ctx.set_ciphers("DEFAULT@SECLEVEL=1")
    connect: Any = SmartConnect
    si = connect(host=vcsim.host, port=vcsim.port, user=vcsim.user, pwd=vcsim.password,
                 sslContext=ctx)  # fmt: skip
    try:
        found = si.content.searchIndex.FindByInventoryPath(f"DC0/vm/{CLUSTER_VM}")
        if found is None:
            found = next(
                vm
                for vm in si.content.viewManager.CreateContainerView(
                    si.content.rootFolder, [], True
                ).view
                if getattr(vm, "name", None) == CLUSTER_VM
            )
        for name in HOSTILE_NAMES:
            WaitForTask(found.CreateSnapshot_Task(name, "someone else's", False, False))
    finally:
        Disconnect(si)
    listed = run("list", "db")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    shown = listed.stdout + listed.stderr
    assert "\x9b" not in shown and "\x7f" not in shown and "\u202e" not in shown
    for escaped in ("csi\\x9b2J\\x9b31m", "invoice\\u202egpj.exe", "del\\x7fname"):
        assert escaped in listed.stdout, listed.stdout
    as_json = run("list", "db", "--json")
    names = {s["name"] for s in json.loads(as_json.stdout)["snapshots"]}
    assert set(HOSTILE_NAMES) <= names, "--json keeps the names as they are (escaped by JSON)"

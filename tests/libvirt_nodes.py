"""Private libvirt test-driver nodes for tests.

``test:///default`` keeps its state for the whole process, so tests would leak into each other;
a node file per test gives every connection its own private state. Each connection to the same
file reloads it: state lives as long as the connection (and does not survive the process).

Use the fixture: ``from tests.libvirt_nodes import libvirt_node`` and take ``libvirt_node`` as a
test argument (a ``test:///.../node.xml`` URI), or call :func:`write_node` for a custom node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"

#: <test:runstate> values (virDomainState)
RUNNING, PAUSED, SHUTOFF, PMSUSPENDED = 1, 3, 5, 7


@dataclass(frozen=True)
class SnapSpec:
    name: str
    created: datetime
    description: str = ""
    state: str = "running"  # running (holds RAM) | shutoff (disk only)
    parent: str | None = None
    current: bool = False


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    runstate: int = RUNNING
    snapshots: Sequence[SnapSpec] = ()
    devices: str = ""  # raw XML inside <devices>
    memory_kib: int = 1048576


DB1_UUID = "5e6ab1d2-0000-4000-8000-000000000001"

#: The default node: several domains, one shut off, preloaded snapshots on db1.
DEFAULT_DOMAINS: tuple[DomainSpec, ...] = (
    DomainSpec(
        "db1",
        DB1_UUID,
        snapshots=(
            SnapSpec(
                "snapcoord-manual-20260101T020000Z",
                datetime(2026, 1, 1, 2, 0, tzinfo=UTC),
                description="snapcoord: label=manual",
            ),
            SnapSpec(
                "before-upgrade",
                datetime(2026, 2, 1, 12, 30, tzinfo=UTC),
                description="taken by hand & kept",
                state="shutoff",
                parent="snapcoord-manual-20260101T020000Z",
                current=True,
            ),
        ),
    ),
    DomainSpec("web1", "5e6ab1d2-0000-4000-8000-000000000002"),
    DomainSpec("stopped1", "5e6ab1d2-0000-4000-8000-000000000003", runstate=SHUTOFF),
    DomainSpec("paused1", "5e6ab1d2-0000-4000-8000-000000000004", runstate=PAUSED),
    DomainSpec("sleepy1", "5e6ab1d2-0000-4000-8000-000000000005", runstate=PMSUSPENDED),
    DomainSpec(
        "agent1",
        "5e6ab1d2-0000-4000-8000-000000000006",
        devices=(
            "<channel type='unix'><source mode='bind' path='/tmp/snapcoord-test-ga.sock'/>"
            "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        ),
    ),
    DomainSpec(
        "rawdisk1",
        "5e6ab1d2-0000-4000-8000-000000000007",
        devices=(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            "<source file='/var/lib/libvirt/images/rawdisk1.img'/>"
            "<target dev='vda' bus='virtio'/></disk>"
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            "<target dev='sda' bus='sata'/><readonly/></disk>"
        ),
    ),
)


def _inner_domain(dom: DomainSpec) -> str:
    # Without type and uuid, reverting needs force ("lacks domain rollback info").
    return (
        f"<domain type='test'><name>{escape(dom.name)}</name><uuid>{dom.uuid}</uuid>"
        f"<memory>{dom.memory_kib}</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
    )


def _snapshot_xml(dom: DomainSpec, snap: SnapSpec) -> str:
    # Not wrapped in <domainsnapshot>; <creationTime> is mandatory for the node to load.
    parent = f"<parent><name>{escape(snap.parent)}</name></parent>" if snap.parent else ""
    return (
        "<test:domainsnapshot>"
        f"<name>{escape(snap.name)}</name>"
        f"<description>{escape(snap.description)}</description>"
        f"{parent}"
        f"<creationTime>{int(snap.created.timestamp())}</creationTime>"
        f"<state>{snap.state}</state>"
        f"{_inner_domain(dom)}"
        f"<active>{int(snap.current)}</active>"
        "</test:domainsnapshot>"
    )


def naming_run(
    snapshot: str, run: str, domains: Sequence[DomainSpec] = DEFAULT_DOMAINS
) -> tuple[DomainSpec, ...]:
    """``domains`` with snapshot ``snapshot``'s description naming the run that took it, as
    snapcoord writes it (``run=<id>``): a revert to it ends that run's processes, which the
    snapshot's memory would bring back (docs/lease.md)."""

    def named(snap: SnapSpec) -> SnapSpec:
        if snap.name != snapshot:
            return snap
        return replace(snap, description=f"{snap.description} run={run}".strip())

    return tuple(replace(d, snapshots=tuple(named(s) for s in d.snapshots)) for d in domains)


def node_xml(domains: Sequence[DomainSpec] = DEFAULT_DOMAINS) -> str:
    parts = ["<node>"]
    for dom in domains:
        runstate = f"<test:runstate>{dom.runstate}</test:runstate>" if dom.runstate != 1 else ""
        parts.append(
            f"<domain type='test' xmlns:test='{TEST_NS}'>"
            f"<name>{escape(dom.name)}</name><uuid>{dom.uuid}</uuid>"
            f"<memory>{dom.memory_kib}</memory><vcpu>1</vcpu><os><type>hvm</type></os>"
            f"<devices>{dom.devices}</devices>"
            f"{runstate}" + "".join(_snapshot_xml(dom, s) for s in dom.snapshots) + "</domain>"
        )
    parts.append("</node>")
    return "\n".join(parts) + "\n"


def write_node(directory: Path, domains: Sequence[DomainSpec] = DEFAULT_DOMAINS) -> str:
    """Write ``node.xml`` into ``directory`` and return its ``test:///...`` URI."""
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / "node.xml").resolve()
    path.write_text(node_xml(domains), encoding="utf-8")
    return f"test://{path}"


@pytest.fixture
def libvirt_node(tmp_path: Path) -> str:
    """A private test-driver node (the DEFAULT_DOMAINS) for this test; its URI."""
    return write_node(tmp_path / "libvirt")


@dataclass
class NodeFactory:
    """Writes custom nodes into one test's tmp dir: ``libvirt_node_factory(domains)``."""

    base: Path
    count: int = field(default=0)

    def __call__(self, domains: Sequence[DomainSpec] = DEFAULT_DOMAINS) -> str:
        self.count += 1
        return write_node(self.base / f"libvirt-{self.count}", domains)


@pytest.fixture
def libvirt_node_factory(tmp_path: Path) -> NodeFactory:
    return NodeFactory(tmp_path)

"""docs/first-setup.md stays true to the code: every privilege it tells the admin to grant is
exactly what adapters/permissions.py says snapcoord needs (the table, the pveum lines, the govc
line), and its sudoers and authorized_keys blocks are single, parseable lines (the e2e test
tests/test_least_sudo_e2e.py uses them)."""

from __future__ import annotations

import re
import shlex

import pytest

from snapcoord.adapters import permissions
from tests.cli_helpers import REPO

DOC = REPO / "docs" / "first-setup.md"


def doc() -> str:
    return DOC.read_text()


def fenced(language: str) -> list[str]:
    """The lines of the one fenced block of ``language``, without comments and blank lines."""
    blocks = re.findall(rf"^```{re.escape(language)}\n(.*?)^```$", doc(), re.M | re.S)
    assert len(blocks) == 1, f"docs/first-setup.md has {len(blocks)} ```{language} blocks"
    return [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.startswith("#")]


def sudoers_rule() -> str:
    """The sudoers line the docs give (exactly one)."""
    (line,) = fenced("sudoers")
    return line


def authorized_keys_options() -> str:
    """The options in front of the key in the docs' authorized_keys line."""
    (line,) = fenced("authorized_keys")
    options, key_type, _rest = line.split(" ", 2)
    assert key_type == "ssh-ed25519"
    return options


def privileges_in(text: str) -> tuple[str, ...]:
    found = re.findall(r"[A-Za-z]+(?:\.[A-Za-z]+)+", text)
    assert len(found) == len(set(found)), f"a privilege twice in {text!r}"
    return tuple(sorted(found))


def table_rows() -> dict[str, tuple[str, str]]:
    head = "| operation | Proxmox VE | vSphere |\n|---|---|---|\n"
    body = doc().split(head, 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = (cells[1], cells[2])
    return rows


def pveum_privs(subcommand: str, comment: str = "") -> tuple[str, ...]:
    pattern = rf"^pveum role {subcommand} SnapcoordRole (?:-append 1 )?-privs (\"[^\"]*\")(.*)$"
    matches = [m for m in re.finditer(pattern, doc(), re.M) if comment in m.group(2)]
    assert len(matches) == 1, f"pveum role {subcommand} {comment}: {len(matches)} lines"
    return tuple(sorted(shlex.split(matches[0].group(1))[0].split(",")))


def test_the_table_lists_each_operations_privileges() -> None:
    rows = table_rows()
    assert set(rows) == set(permissions.PROXMOX) | set(permissions.VSPHERE)
    for operation, (proxmox, vsphere) in rows.items():
        assert privileges_in(proxmox) == tuple(sorted(permissions.PROXMOX.get(operation, ())))
        assert privileges_in(vsphere) == tuple(sorted(permissions.VSPHERE.get(operation, ())))


def test_the_proxmox_role_is_the_union_of_every_operation() -> None:
    assert pveum_privs("add") == permissions.proxmox_privileges()


@pytest.mark.parametrize("major", [8, 9])
def test_the_guest_agent_lines_are_each_versions_agent_privileges(major: int) -> None:
    assert pveum_privs("modify", f"# Proxmox VE {major}") == permissions.union(
        permissions.PROXMOX_AGENT[major]
    )
    with_agent = permissions.proxmox_privileges(agent=True, pve_major=major)
    assert set(with_agent) == set(pveum_privs("add")) | set(
        pveum_privs("modify", f"# Proxmox VE {major}")
    )


def test_the_acl_lines_use_the_acl_path() -> None:
    path = permissions.PROXMOX_ACL_PATH.format(vmid=100)
    acl = re.findall(
        r"^pveum acl modify (\S+) -(users|tokens) .* -roles SnapcoordRole$", doc(), re.M
    )
    assert acl == [(path, "users"), (path, "tokens")]


def test_the_vsphere_role_is_the_union_of_every_operation() -> None:
    (line,) = re.findall(r"^govc role\.create Snapcoord (.*)$", doc(), re.M)
    assert tuple(sorted(line.split())) == permissions.vsphere_privileges()


def test_one_sudoers_line_for_one_dedicated_user_and_sh_only() -> None:
    assert sudoers_rule() == "snapcoord ALL=(root) NOPASSWD: /bin/sh"
    assert "a rule that allows `sh` is root" in doc()


def test_the_authorized_keys_line_restricts_the_key() -> None:
    assert authorized_keys_options() == 'restrict,from="192.0.2.10"'


def test_the_readme_links_here() -> None:
    first_screen = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    assert "(docs/first-setup.md)" in first_screen

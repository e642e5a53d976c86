"""The install route (scripts/install, docs/install.md) and what it installs besides the command:
the man page and the bash completion, both generated from the argument parser.

The generated files are checked against the parser itself (every command, every option), the
man page through groff, the completion in a real bash. scripts/install runs for real here, as
root, into a folder that stands for / (SNAPCOORD_INSTALL_ROOT), from a wheelhouse built for the
test; tests/test_realvm_install.py runs it into the real / of a Debian 12 guest.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from snapcoord import __version__, completion, manpage, parser_info
from snapcoord.cli import build_parser
from tests import lab

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"
BASH = ("bash", "--norc", "--noprofile", "-c")
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check")


def parser_commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string the parser shows in its help."""
    return {
        flag
        for action in parser._actions
        if action.help is not argparse.SUPPRESS
        for flag in action.option_strings
    }


def positional_choices(parser: argparse.ArgumentParser) -> set[str]:
    return {
        str(choice)
        for action in parser._actions
        if not action.option_strings and action.choices and not isinstance(action.choices, dict)
        for choice in action.choices
    }


# -- the man page -------------------------------------------------------------------------------


def test_man_page_has_every_command_and_option() -> None:
    text = manpage.render(build_parser()).replace("\\-", "-")
    assert text.startswith(manpage.HEADER + "\n")
    assert f'"snapcoord {__version__}"' in text
    assert {f"--{flag.lstrip('-')}" for flag in flags(build_parser()) if flag.startswith("--")}
    for flag in flags(build_parser()):
        assert f"\\fB{flag}\\fR" in text, flag
    for name, sub in parser_commands().items():
        assert f"\n.SS {name}\n" in text, name
        section = text.split(f"\n.SS {name}\n", 1)[1].split("\n.SS ", 1)[0].split("\n.SH ", 1)[0]
        for flag in flags(sub) - flags(build_parser()):
            assert f"\\fB{flag}\\fR" in section, (name, flag)
        for choice in positional_choices(sub):
            assert choice in section, (name, choice)


def test_roff_escapes_what_roff_would_read_as_requests() -> None:
    assert manpage.roff(".TH x\n'x\nback\\slash -x") == "\\&.TH x\n\\&'x\nback\\eslash \\-x"


@pytest.mark.real
def test_man_page_renders_without_warnings(tmp_path: Path) -> None:
    lab.require("groff", "groff-base")
    page = tmp_path / "snapcoord.1"
    page.write_text(manpage.render(build_parser()))
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lab.require("man", "man-db")
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "80"},
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rendered = re.sub(".\x08", "", proc.stdout)  # no bold by overstriking
    assert "snapcoord - consistent VM snapshots of database servers" in rendered
    for name in parser_commands():
        assert f"\n   {name}\n" in rendered, name


# -- the bash completion ------------------------------------------------------------------------


def complete(
    script: Path, *words: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> list[str]:
    """What bash's completion function offers for ``words`` (the last one is being typed)."""
    lines = " ".join(f"{w!r}" if w else "''" for w in words)
    proc = subprocess.run(
        [
            *BASH,
            f'source "$1"; COMP_WORDS=({lines}); COMP_CWORD={len(words) - 1}; _snapcoord; '
            'printf "%s\\n" "${COMPREPLY[@]}"',
            "bash",
            str(script),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
        # no configuration of this machine's: only what the test gives
        env={**os.environ, "SNAPCOORD_CONFIG": "/nonexistent/config.toml", **(env or {})},
    )
    return [line for line in proc.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def completion_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "snapcoord"
    path.write_text(completion.render(build_parser()))
    return path


def test_completion_registers_in_bash(completion_file: Path) -> None:
    proc = subprocess.run(
        [*BASH, 'source "$1"; complete -p snapcoord', "bash", str(completion_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "complete -F _snapcoord snapcoord"
    assert completion_file.read_text().startswith(completion.HEADER + "\n")


def test_completion_completes_commands_and_options(completion_file: Path) -> None:
    assert complete(completion_file, "snapcoord", "sn") == ["snapshot"]
    assert complete(completion_file, "snapcoord", "snapshot", "--t") == ["--tag"]
    assert complete(completion_file, "snapcoord", "") == list(parser_commands())
    # the value of an option is not an option or a command
    assert complete(completion_file, "snapcoord", "snapshot", "--tag", "") == []
    assert complete(completion_file, "snapcoord", "snapshot", "--tag", "sn") == []
    # a global option's value before the command is skipped when finding the command
    assert complete(completion_file, "snapcoord", "-c", "x.toml", "list", "--j") == ["--json"]
    assert complete(completion_file, "snapcoord", "config", "") == ["check", "example"]
    assert complete(completion_file, "snapcoord", "freeze-hook", "un") == ["uninstall"]


def test_completion_offers_file_names_for_the_configuration(
    completion_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "site.toml").write_text("")
    (tmp_path / "other").write_text("")
    assert complete(completion_file, "snapcoord", "-c", "si", cwd=tmp_path) == ["site.toml"]
    assert complete(completion_file, "snapcoord", "list", "--config", "o", cwd=tmp_path) == [
        "other"
    ]
    assert complete(
        completion_file, "snapcoord", "restore-dump", "db", "--file", "s", cwd=tmp_path
    ) == ["site.toml"]


CONFIG = """
[hypervisors.pve]
type = "proxmox"
[hypervisors.vc]
type = "vsphere"
[vms.db1]
hypervisor = "pve"
tags = ["nightly", "db"]
[vms.web1]
hypervisor = "vc"
tags = ["nightly"]
[vms."odd name"]
hypervisor = "vc"
"""


def test_completion_offers_the_configurations_names(completion_file: Path, tmp_path: Path) -> None:
    """VM keys, tags and hypervisor names from the configuration snapcoord would read: -c FILE
    anywhere on the line, else $SNAPCOORD_CONFIG; a name that is not one word is left out."""
    config = tmp_path / "site.toml"
    config.write_text(CONFIG)
    c = str(config)

    def offered(*words: str, env: dict[str, str] | None = None) -> list[str]:
        return complete(completion_file, "snapcoord", *words, env=env)

    assert offered("-c", c, "snapshot", "") == ["db1", "web1"]
    assert offered("snapshot", "--config", c, "db1", "w") == ["web1"]
    assert offered(f"--config={c}", "snapshot", "--tag", "") == ["db", "nightly"]
    assert offered("-c", c, "prune", "--select", "") == ["db", "db1", "nightly", "web1"]
    assert offered("-c", c, "status", "--hypervisor", "") == ["pve", "vc"]
    assert offered("-c", c, "thaw", "--exclude", "d") == ["db1"]
    assert offered("-c", c, "delete", "") == ["db1", "web1"]
    assert offered("-c", c, "delete", "db1", "") == [], "the snapshot name is no VM"
    assert offered("-c", c, "snapshot", "--parallel", "") == []
    assert offered("list", "", env={"SNAPCOORD_CONFIG": c}) == ["db1", "web1"]
    assert offered("list", "", env={"SNAPCOORD_CONFIG": str(tmp_path / "none.toml")}) == []
    config.write_text("[vms.db1\n")  # not TOML: no names, no error
    assert offered("-c", c, "list", "") == []


def test_completion_has_every_command_and_option(completion_file: Path) -> None:
    assert set(complete(completion_file, "snapcoord", "-")) == flags(build_parser())
    for name, sub in parser_commands().items():
        assert set(complete(completion_file, "snapcoord", name, "-")) == flags(sub), name
        choices = positional_choices(sub)
        if choices:
            assert set(complete(completion_file, "snapcoord", name, "")) == choices, name


# -- scripts/install ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """snapcoord's wheel (built from a copy of the checkout) and its dependencies for the
    proxmox extra."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    source = copy_checkout(tmp_path_factory.mktemp("checkout"))
    subprocess.run(
        [*PIP, "wheel", "-q", "-w", str(folder), f"{source}[proxmox]"],
        check=True,
        capture_output=True,
    )
    return folder


def checkout_files() -> list[str]:
    """What `git archive` of the working tree would hold (tracked and new, not ignored)."""
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    return [name for name in proc.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def copy_checkout(folder: Path) -> Path:
    for name in checkout_files():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, folder / name)
    return folder


def install(root: Path, *args: str, script: Path = INSTALL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SNAPCOORD_INSTALL_ROOT": str(root)},
        timeout=600,
    )


def tree(root: Path) -> set[str]:
    """Every path under root, venv contents left out."""
    return {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if not str(path.relative_to(root)).startswith("opt/snapcoord/")
    }


MADE = {
    "opt",
    "opt/snapcoord",
    "usr",
    "usr/local",
    "usr/local/bin",
    "usr/local/bin/snapcoord",
    "usr/local/share",
    "usr/local/share/man",
    "usr/local/share/man/man1",
    "usr/local/share/man/man1/snapcoord.1",
    "usr/share",
    "usr/share/bash-completion",
    "usr/share/bash-completion/completions",
    "usr/share/bash-completion/completions/snapcoord",
}


def require_install_tools() -> None:
    """Root, Debian's python3 with python3-venv and python3-libvirt (scripts/install-system-deps
    test installs them): a test without them skips, or fails under CI=true."""
    lab.require_root()
    lab.require("dpkg-query", "dpkg")
    for package, probe in (
        ("python3-venv", "/usr/lib/python3.11/ensurepip/__init__.py"),
        ("python3-libvirt", "/usr/lib/python3/dist-packages/libvirt.py"),
    ):
        if not Path(probe).is_file():
            msg = f"{package} is not installed: apt-get install -y {package}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{msg} (CI=true: CI must install it)", pytrace=False)
            pytest.skip(msg)


@pytest.mark.real
def test_install_upgrade_uninstall(wheelhouse: Path, tmp_path: Path) -> None:
    """Install, install again (the upgrade), uninstall: exactly the files it made, the venv
    root's own, the generated files those of the installed snapcoord, and back to nothing."""
    require_install_tools()
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    (root / "etc" / "snapcoord").mkdir(parents=True)
    (root / "etc" / "snapcoord" / "config.toml").write_text("# kept\n")
    kept = tree(root)
    proc = install(root, "--extras", "proxmox,libvirt", "--wheelhouse", str(wheelhouse))
    assert proc.returncode == 0, proc.stderr
    assert f"snapcoord {__version__} installed in {root}/opt/snapcoord" in proc.stdout
    assert tree(root) - kept == MADE
    venv = root / "opt" / "snapcoord"
    link = root / "usr" / "local" / "bin" / "snapcoord"
    assert os.readlink(link) == f"{venv}/bin/snapcoord"
    for path in [venv, *venv.rglob("*")]:
        if not path.is_symlink():
            st = path.lstat()
            assert st.st_uid == 0 and st.st_gid == 0 and st.st_mode & 0o022 == 0, path
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"snapcoord {__version__}"
    # libvirt is Debian's module (linked); nothing else of Debian's Python packages is seen
    probe = subprocess.run(
        [
            f"{venv}/bin/python",
            "-I",
            "-c",
            "import libvirt, requests; print(libvirt.__file__); print(requests.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    libvirt_file, requests_file = probe.stdout.split()
    assert Path(libvirt_file).resolve() == Path("/usr/lib/python3/dist-packages/libvirt.py")
    assert requests_file.startswith(f"{venv}/lib/")
    assert (root / "usr/local/share/man/man1/snapcoord.1").read_text() == manpage.render(
        build_parser()
    )
    assert (root / "usr/share/bash-completion/completions/snapcoord").read_text() == (
        completion.render(build_parser())
    )

    again = install(root, "--extras", "proxmox", "--wheelhouse", str(wheelhouse))
    assert again.returncode == 0, again.stderr
    assert tree(root) - kept == MADE
    assert not (venv / "debian-libvirt").exists(), "the libvirt extra went with --extras"

    gone = install(root, "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert tree(root) == kept, "uninstall removes what install made, and only that"
    assert "kept the configuration" in gone.stdout


@pytest.mark.real
def test_install_from_the_checkout_writes_nothing_into_it(tmp_path: Path) -> None:
    """Without a wheelhouse: snapcoord built from a copy of this checkout, the dependencies from
    the package index (pip's own configuration); the checkout gets no build/ or egg-info."""
    require_install_tools()
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    checkout = copy_checkout(tmp_path / "checkout")
    before = sorted(checkout.rglob("*"))
    proc = install(root, "--extras", "proxmox", script=checkout / "scripts" / "install")
    assert proc.returncode == 0, proc.stderr
    assert f"(snapcoord from {checkout}, dependencies from PyPI; extras: proxmox)" in proc.stdout
    assert sorted(checkout.rglob("*")) == before
    version = subprocess.run([str(root / "usr/local/bin/snapcoord"), "--version"], text=True)
    assert version.returncode == 0
    assert install(root, "--uninstall").returncode == 0
    assert list(root.iterdir()) == []


@pytest.mark.real
def test_install_refuses_what_it_did_not_make(wheelhouse: Path, tmp_path: Path) -> None:
    """A snapcoord already in /usr/local/bin (say from `pip install --break-system-packages`),
    a folder others may write to, an unknown extra: one line, exit 1, nothing changed."""
    require_install_tools()
    root = tmp_path / "root"
    (root / "usr" / "local" / "bin").mkdir(parents=True)
    root.chmod(0o755)
    (root / "usr" / "local" / "bin" / "snapcoord").write_text("#!/bin/sh\n")
    before = tree(root)
    proc = install(root, "--extras", "proxmox", "--wheelhouse", str(wheelhouse))
    assert proc.returncode == 1
    assert "is not a link to" in proc.stderr and "remove it first" in proc.stderr, proc.stderr
    assert tree(root) == before

    shutil.rmtree(root / "usr")
    (root / "opt").mkdir(mode=0o777)
    (root / "opt").chmod(0o777)
    proc = install(root, "--extras", "proxmox", "--wheelhouse", str(wheelhouse))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"scripts/install: {root}/opt is writable by others than root")
    assert tree(root) == {"opt"}

    proc = install(root, "--extras", "proxmox,xen")
    assert proc.returncode == 1
    assert "unknown extra 'xen'" in proc.stderr

    gone = install(root, "--uninstall")  # nothing of ours there: nothing removed
    assert gone.returncode == 0 and tree(root) == {"opt"}


def test_every_argument_has_help_text() -> None:
    """What the man page and `snapcoord COMMAND --help` show for each argument is never empty."""
    for command in parser_info.commands(build_parser()):
        for option in command.options:
            assert option.help.strip(), (command.name, option.flags or option.dest)

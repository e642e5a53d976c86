"""The holder's socket directory is root-only and checked before use (issue 23, finding 9).

With a long store path the socket used to move to ``/tmp/snapcoord-<uid>/``, a directory anyone
could create first: another user made it, answered "frozen" (freeze refused) or "thaw ok".
Now the long-path socket lives in a runtime directory only the running user can use
(``/run/snapcoord-freeze`` for root), and every directory a socket lives in is checked (lstat: a
real directory, owned by this user, mode 0700) before freeze, the holder or thaw use it; anything
else is refused in one line and nothing is created in it. These tests point the runtime
directory into ``tmp_path`` (never the machine's ``/run``) and plant the bad directories there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from snapcoord import freeze as freeze_module
from snapcoord.cli import main
from snapcoord.errors import PreflightError
from snapcoord.freeze import holder_state, private_dir, runtime_dir, socket_path, thaw_vm
from snapcoord.holder import Channel, ThawWaiter
from snapcoord.plans.context import RunContext
from snapcoord.run import SilentReporter
from tests.cli_helpers import write_config
from tests.test_freeze import GUEST, config

NOBODY = 65534


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNUSED_TOKEN", "never-sent")


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The runtime directory for long-path sockets (not created), in a short private temporary
    directory (``tmp_path`` is too long for a socket path), removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="sc-"))
    path = top / "snapcoord"
    monkeypatch.setattr(freeze_module, "runtime_dir", lambda: path)
    yield path
    shutil.rmtree(top)


def long_store(tmp_path: Path) -> Path:
    return tmp_path / ("x" * 120)


def long_config(tmp_path: Path) -> Any:
    return config(long_store(tmp_path), db={"hypervisor": "lab", "guest": GUEST})


def waiter_for(cfg: Any) -> ThawWaiter:
    waiter = ThawWaiter(cfg, "db", Channel(None), 60)
    waiter.ctx = cast(
        RunContext, SimpleNamespace(key="db", freeze={"since": 1.0, "source": "t"}, outputs={})
    )
    return waiter


def plant(path: Path, kind: str, tmp_path: Path) -> None:
    """A directory someone else made where the runtime directory goes."""
    if kind == "other owner":
        path.mkdir(mode=0o700)
        os.chown(path, NOBODY, NOBODY)
    elif kind == "mode 0777":
        path.mkdir()
        path.chmod(0o777)
    elif kind == "mode 0755":
        path.mkdir()
        path.chmod(0o755)
    elif kind == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        target.chmod(0o700)
        path.symlink_to(target)
    elif kind == "file":
        path.write_text("")
    else:  # pragma: no cover
        raise AssertionError(kind)


def entries(path: Path) -> list[str]:
    real = path.resolve() if path.is_symlink() else path
    return sorted(os.listdir(real)) if real.is_dir() else []


def test_runtime_dir_is_root_only_for_root_and_per_user_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert runtime_dir() == Path("/run/snapcoord-freeze"), "root never uses one from its env"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert runtime_dir() == Path("/run/user/1000/snapcoord")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/" + "r" * 80)
    assert runtime_dir().name == "snapcoord-1000", "a socket path there would not fit"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir().name == "snapcoord-1000"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert runtime_dir().name == "snapcoord-1000"


def test_a_long_store_path_puts_the_socket_in_the_runtime_dir(
    tmp_path: Path, runtime: Path
) -> None:
    path = socket_path(long_config(tmp_path), "db")
    assert path.parent == runtime and len(str(path)) <= 100
    assert not str(path).startswith("/tmp/snapcoord-"), "never the shared temporary directory"


def test_a_correct_private_dir_is_created_and_used(tmp_path: Path, runtime: Path) -> None:
    cfg = long_config(tmp_path)
    old = os.umask(0o022)
    try:
        waiter = waiter_for(cfg)
        waiter.listen()
    finally:
        os.umask(old)
    try:
        info = runtime.lstat()
        assert info.st_mode & 0o777 == 0o700 and info.st_uid == os.geteuid()
        assert socket_path(cfg, "db").parent == runtime
        assert entries(runtime) == [socket_path(cfg, "db").name]
        assert (runtime / socket_path(cfg, "db").name).stat().st_mode & 0o777 == 0o600
        assert private_dir(runtime) is True, "the same directory is used again"
    finally:
        waiter.close()


def test_a_missing_dir_is_no_holder_for_the_clients(tmp_path: Path, runtime: Path) -> None:
    assert holder_state(long_config(tmp_path), "db") is None
    assert not runtime.exists(), "asking creates nothing"


@pytest.mark.parametrize("kind", ["other owner", "mode 0777", "mode 0755", "symlink", "file"])
def test_a_dir_someone_else_made_is_refused_and_left_untouched(
    tmp_path: Path, runtime: Path, kind: str
) -> None:
    plant(runtime, kind, tmp_path)
    cfg = long_config(tmp_path)
    before = entries(runtime)
    with pytest.raises(PreflightError) as refused:
        waiter_for(cfg).listen()
    line = str(refused.value)
    assert "\n" not in line and str(runtime) in line and "not using it" in line
    with pytest.raises(PreflightError, match="not using it"):
        holder_state(cfg, "db")  # freeze's check for a holder: no forged "frozen"
    with pytest.raises(PreflightError, match="not using it"):
        thaw_vm(cfg, "db", reporter=SilentReporter())  # no forged "thaw ok"
    assert entries(runtime) == before, "nothing was created in it"


def test_freeze_refuses_in_one_line_when_the_runtime_dir_is_not_its_own(
    tmp_path: Path, runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI: ``freeze`` and ``thaw`` exit 4 with one error line (no traceback, no holder)."""
    plant(runtime, "other owner", tmp_path)
    # a forged holder would answer here: it must never be asked
    cfg = write_config(
        tmp_path / "c.toml",
        {
            "defaults": {"store": str(long_store(tmp_path))},
            "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
            "vms.db": {"hypervisor": "lab"},
            "vms.db.guest": {"transport": "exec", "exec_prefix": []},
        },
    )
    for command in ("freeze", "thaw"):
        code = main(["-c", str(cfg), command, "db"])
        err = capsys.readouterr().err
        assert code == 4, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert str(runtime) in lines[0] and f"belongs to uid {NOBODY}" in lines[0]
    assert entries(runtime) == []
    assert not (long_store(tmp_path) / "freeze").exists() or not any(
        (long_store(tmp_path) / "freeze").glob("*.log")
    ), "no holder was started"


def test_the_store_socket_dir_is_checked_the_same_way(tmp_path: Path) -> None:
    cfg = config(tmp_path / "s", db={"hypervisor": "lab", "guest": GUEST})
    folder = tmp_path / "s" / "freeze"
    folder.parent.mkdir()
    folder.symlink_to(tmp_path)
    with pytest.raises(PreflightError, match="symbolic link"):
        waiter_for(cfg).listen()
    with pytest.raises(PreflightError, match="symbolic link"):
        holder_state(cfg, "db")

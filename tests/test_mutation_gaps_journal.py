"""A run that leaves a service down keeps its journal: the next run refuses to start over it
and `recover` starts what it names. The CLI in a child process, libvirt's test driver, and the
demo's stand-in services (exec transport) with one that can be made to fail its start."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli_helpers import DEMO_BIN, running_stand_ins, snapcoord, stand_in_guest
from tests.libvirt_nodes import libvirt_node  # noqa: F401 - fixture

# In front of the demo's `service`: a start fails while $DEMO_STATE/NAME.broken exists.
BREAKABLE_SERVICE = f"""#!/bin/sh
if [ "$2" = start ] && [ -e "$DEMO_STATE/$1.broken" ]; then
  echo "$1: configuration error (test)" >&2; exit 1
fi
exec {DEMO_BIN}/service "$@"
"""


def test_a_service_left_down_keeps_the_journal_until_recover(
    tmp_path: Path, libvirt_node: str
) -> None:
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "service").write_text(BREAKABLE_SERVICE)
    (wrapper / "service").chmod(0o755)
    state = tmp_path / "state"
    config, _ = stand_in_guest(
        tmp_path,
        libvirt_node,
        guest={"start_timeout": 5.0},
        # inside the window cron's configuration breaks: it cannot start again
        tables={"vms.db1.hooks": {"frozen": [f"touch {state}/cron.broken"]}},
        path_prefix=wrapper,
    )
    journal = tmp_path / "store" / "journal" / "db1.json"

    first = snapcoord("-c", str(config), "snapshot", "db1", "--json")
    assert first.returncode == 6, first.stderr
    assert json.loads(first.stdout.splitlines()[-1])["services_down"] == ["cron"]
    assert running_stand_ins(state) == {"apache2", "mariadb"}
    assert journal.exists(), "the journal of a run that left cron down was removed"
    assert "cron" in json.loads(journal.read_text())["stopped"]

    refused = snapcoord("-c", str(config), "snapshot", "db1")
    assert refused.returncode == 4
    assert "snapcoord recover db1" in refused.stderr
    assert running_stand_ins(state) == {"apache2", "mariadb"}  # the refused run touched nothing

    (state / "cron.broken").unlink()  # the admin fixed cron
    fixed = snapcoord("-c", str(config), "recover", "db1")
    assert fixed.returncode == 0, fixed.stderr
    assert running_stand_ins(state) == {"apache2", "cron", "mariadb"}
    assert not journal.exists()

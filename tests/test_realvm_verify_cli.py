"""``snapcoord snapshot`` with ``verify = true`` and ``snapcoord verify --boot`` by the CLI on the
real Debian 12 guest (libvirt, QEMU, systemd inside, commands through the guest agent): the
stop-mode snapshot's dump is restored and compared on this host after the window, and a copy of
the snapshot's disks boots without network into a guest whose services run and whose MariaDB
passes ``mariadb-check``. The MyISAM table written right before the run is not synced by the
test: the run's stop of the database syncs the guest's files, so the disks alone hold them
(without that, a cold boot of the disks found the table broken). Afterwards the VM's own
snapshot tree holds only what the test took, no transient domain is left, and every unit runs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import libvirt
import pytest

from snapcoord.verify.boot import PREFIX
from tests.cli_helpers import snapcoord, write_config
from tests.realvm_guest import RealGuest, real_guest  # noqa: F401 - fixture
from tests.test_realvm_agent_e2e import agent_sh, all_active, run, sql, tables

pytestmark = [pytest.mark.real, pytest.mark.realvm]

DB = "verify_cli"
SETUP = f"""
DROP DATABASE IF EXISTS {DB}; CREATE DATABASE {DB}; USE {DB};
CREATE TABLE parent (id INT PRIMARY KEY, name VARCHAR(40)) ENGINE=InnoDB;
CREATE TABLE child (id INT AUTO_INCREMENT PRIMARY KEY, parent_id INT NOT NULL,
  FOREIGN KEY (parent_id) REFERENCES parent (id)) ENGINE=InnoDB;
CREATE TABLE journal (id INT AUTO_INCREMENT PRIMARY KEY, payload VARCHAR(200)) ENGINE=MyISAM;
INSERT INTO parent SELECT seq, CONCAT('p', seq) FROM seq_1_to_50;
INSERT INTO child (parent_id) SELECT 1 + seq % 50 FROM seq_1_to_5000;
INSERT INTO journal (payload) SELECT REPEAT('j', 150) FROM seq_1_to_5000;
"""


def _domains(guest: RealGuest) -> tuple[list[str], list[str]]:
    """(the VM's snapshots, transient verify domains of it)."""
    conn = libvirt.open(guest.uri)
    try:
        snaps = list(conn.lookupByName(guest.domain).snapshotListNames())
        left = [d.name() for d in conn.listAllDomains() if d.name().startswith(PREFIX)]
        return snaps, [n for n in left if n.startswith(f"{PREFIX}{guest.domain}-")]
    finally:
        conn.close()


def test_verify_true_and_boot_verify_of_a_stop_mode_snapshot(
    real_guest: RealGuest, tmp_path: Path
) -> None:
    flat: dict[str, Any] = tables(real_guest, tmp_path)
    flat["vms.guest.dump"] = {"verify": True, "verify_timeout": 900.0}
    flat["defaults"]["metrics_file"] = str(tmp_path / "snapcoord.prom")
    config = write_config(tmp_path / "snapcoord.toml", flat)
    sql(real_guest, SETUP)  # no sync: the MyISAM file's last writes sit in the guest's RAM
    before, _ = _domains(real_guest)
    taken: str | None = None
    try:
        code, summary, err = run(config, "snapshot", "guest", timeout=1800)
        assert code == 0, err
        taken = summary["snapshot"]
        assert summary["verify"]["verified"] is True, summary
        assert summary["verify"]["compared"] == "checksums"
        assert summary["verify"]["rows"] >= 10_050
        assert all_active(real_guest)

        code, summary, err = run(config, "verify", "guest", "--boot", timeout=1800)
        assert code == 0, (summary, err)
        booted = summary["verify"]
        assert booted["what"] == "boot" and booted["snapshot"] == taken
        assert booted["verified"] is True, booted
        services = booted["extra"]["services"]
        assert {"apache2", "cron"} <= {name.removesuffix(".service") for name in services}
        assert set(services.values()) == {"active"}
        assert "OK" in booted["extra"]["database_check"]
        assert set(booted["split_seconds"]) == {"copy", "boot", "checks", "teardown"}
        assert any("memory" in note.lower() or "ram" in note.lower() for note in summary["notes"])

        status = snapcoord("-c", str(config), "status", "guest", "--offline")
        assert "last verify (boot) ok " in status.stdout and taken in status.stdout
        prom = (tmp_path / "snapcoord.prom").read_text()
        assert 'snapcoord_last_verify_success{vm="guest",what="boot"} 1\n' in prom
        last = json.loads((tmp_path / "store" / "journal" / "guest.last-verify.json").read_text())
        assert last["what"] == "boot" and last["verified"] is True
    finally:
        if taken is not None:
            with contextlib.suppress(Exception):
                snapcoord("-c", str(config), "delete", "guest", taken, "--yes", timeout=600)
        agent_sh(real_guest, f"mysql -e 'DROP DATABASE IF EXISTS {DB}'")
    after, left = _domains(real_guest)
    assert left == []
    assert sorted(after) == sorted(before)
    assert all_active(real_guest)

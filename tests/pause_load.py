"""Load on the loopback guest's MariaDB while writes are paused: a writer committing a row every
10 ms and a reader timing a SELECT every 10 ms, each one long-lived ``mysql`` client fed on stdin.
Every acknowledged commit is recorded with its time and GTID, every read with its latency."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from tests import lab

BINLOG_CNF = Path("/etc/mysql/mariadb.conf.d/90-snapcoord-lab-binlog.cnf")
SCHEMA = "snapcoord_pausetest"


def ensure_binlog() -> None:
    """The guest's MariaDB with its binary log on (so a pause records a GTID position);
    restarted once if it was off. The file stays: later servers start with it too."""
    text = (
        "[mysqld]\nlog_bin = snapcoord-lab-bin\nserver_id = 1\nbinlog_format = ROW\n"
        "expire_logs_days = 1\nlog_bin_trust_function_creators = 1\n"
    )
    if not BINLOG_CNF.exists() or BINLOG_CNF.read_text() != text:
        BINLOG_CNF.write_text(text)
    if lab.mysql_rows("SELECT @@log_bin")[0][0] != "1":
        lab.run(lab.service_argv("mariadb", "restart"), timeout=120)
    assert lab.mysql_rows("SELECT @@log_bin")[0][0] == "1"


def reset_schema() -> None:
    lab.mysql_exec(
        f"DROP DATABASE IF EXISTS {SCHEMA}; CREATE DATABASE {SCHEMA};"
        f"CREATE TABLE {SCHEMA}.w (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB;"
    )


def drop_schema() -> None:
    lab.mysql_exec(f"DROP DATABASE IF EXISTS {SCHEMA}", check=False)


def gtid_seq(gtid: str) -> int:
    """The sequence number of a single-domain GTID position ``D-S-N`` (0 for none)."""
    return int(gtid.rsplit("-", 1)[1]) if gtid else 0


class _Client(threading.Thread):
    """One long-lived client: send ``statement`` (``{n}`` is the iteration), wait for its line."""

    def __init__(self, statement: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.statement = statement
        self.interval = interval
        self.records: list[tuple[float, float, list[str]]] = []  # sent, answered, row
        self.error: str | None = None
        self._stop_event = threading.Event()
        self.proc = subprocess.Popen(
            ["mysql", "--batch", "-N", "--unbuffered", "--skip-reconnect"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def run(self) -> None:
        assert self.proc.stdin and self.proc.stdout
        n = 0
        while not self._stop_event.is_set():
            n += 1
            sent = time.time()
            self.proc.stdin.write(self.statement.format(n=n) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                self.error = self.proc.stderr.read() if self.proc.stderr else "ended"
                return
            self.records.append((sent, time.time(), line.rstrip("\n").split("\t")))
            time.sleep(self.interval)

    def finish(self) -> None:
        self._stop_event.set()
        self.join(timeout=120)
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Load:
    """The writer and the reader; ``with Load() as load:`` runs them."""

    def __init__(self) -> None:
        insert = f"INSERT INTO {SCHEMA}.w (v) VALUES ({{n}});"
        self.writer = _Client(insert + " SELECT {n}, @@last_gtid;")
        self.reader = _Client(f"SELECT COUNT(*) FROM {SCHEMA}.w;")

    def __enter__(self) -> Load:
        self.writer.start()
        self.reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.finish()
        self.reader.finish()

    def commits(self) -> list[tuple[float, int]]:
        """(time acknowledged, GTID sequence number) of every commit."""
        return [(got, gtid_seq(row[1])) for _sent, got, row in self.writer.records]

    def sent_commits(self) -> list[tuple[float, float, int]]:
        """(time sent, time acknowledged, GTID sequence number) of every commit."""
        return [(sent, got, gtid_seq(row[1])) for sent, got, row in self.writer.records]

    def reads(self) -> list[tuple[float, float]]:
        """(time sent, latency) of every read."""
        return [(sent, got - sent) for sent, got, _row in self.reader.records]

    def last_ack(self) -> float:
        return self.writer.records[-1][1] if self.writer.records else 0.0

    def settle(self, count: int = 5, timeout: float = 30.0) -> None:
        """Return once the writer and the reader each got ``count`` more answers than they had
        when called (the load runs, before a run; it still runs, after one)."""
        wrote, read = len(self.writer.records), len(self.reader.records)
        deadline = time.monotonic() + timeout
        while len(self.writer.records) < wrote + count or len(self.reader.records) < read + count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the load got no {count} more answers in {timeout:g} s")
            time.sleep(0.01)

    def stalled_for(self) -> float:
        """Seconds since the last acknowledged commit."""
        return time.time() - self.last_ack()

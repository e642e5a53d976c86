"""Notifications against a real HTTP server on 127.0.0.1 that records every request: the
healthchecks-style ping (start, success, fail with the errors as body), the JSON webhook,
grouping by URL, one retry, timeouts and refused connections as warnings, no secret in any
message."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from snapcoord import notify
from snapcoord.config import Config, load_config
from snapcoord.notify import Notifier, redact
from snapcoord.outcome import Outcome
from tests.cli_helpers import json_lines, write_config
from tests.pve_api import PveApiDouble
from tests.pve_api.testing import Cert, make_cert, start_double
from tests.test_status import cli, pve_tables

SECRET_UUID = "5f0c1e2d-aaaa-4bbb-8ccc-1234567890ab"
SECRET_TOKEN = "tok-9f8e7d6c5b4a"


@dataclass
class Hit:
    method: str
    path: str
    query: dict[str, str]
    body: bytes
    headers: dict[str, str]
    at: float


@dataclass
class Recorder:
    """The server's log and script: ``answers`` is consumed one per request (an HTTP status,
    or "hang": answer nothing until the test ends); 200 when it is empty."""

    server: ThreadingHTTPServer
    hits: list[Hit] = field(default_factory=list)
    answers: list[int | str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def paths(self) -> list[str]:
        return [h.path for h in self.hits]


@pytest.fixture
def server() -> Iterator[Recorder]:
    recorder: Recorder

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            recorder.hits.append(
                Hit(
                    self.command,
                    url.path,
                    dict(urllib.parse.parse_qsl(url.query)),
                    body,
                    dict(self.headers),
                    time.time(),
                )
            )
            answer = recorder.answers.pop(0) if recorder.answers else 200
            if answer == "hang":
                recorder.release.wait(10)
                return
            assert isinstance(answer, int)
            self.send_response(answer)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_GET = do_POST = do_HEAD = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    recorder = Recorder(httpd)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield recorder
    recorder.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def make_config(
    tmp_path: Path, notify_table: dict[str, Any] | None, **per_vm: dict[str, Any]
) -> Config:
    """VMs a, b, c on a libvirt test hypervisor; ``per_vm["c"]`` = c's [vms.c.notify]."""
    tables: dict[str, dict[str, Any]] = {
        "defaults": {"store": str(tmp_path / "store")},
        "hypervisors.lab": {"type": "libvirt", "uri": "test:///default"},
    }
    if notify_table is not None:
        tables["notify"] = notify_table
    for key in ("a", "b", "c"):
        tables[f"vms.{key}"] = {"hypervisor": "lab", "name": "test"}
        if key in per_vm:
            tables[f"vms.{key}.notify"] = per_vm[key]
    return load_config(str(write_config(tmp_path / "c.toml", tables)))


def ok(vm: str) -> Outcome:
    summary = {"vm": vm, "ok": True, "exit_code": 0, "command": "snapshot", "snapshot": "s1"}
    return Outcome(vm, 0, summary, [f"{vm}: snapshot ok"])


def failed(vm: str, code: int = 5, *errors: str) -> Outcome:
    summary = {"vm": vm, "ok": False, "exit_code": code, "command": "snapshot"}
    return Outcome(vm, code, summary, [], list(errors))


@pytest.fixture(autouse=True)
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "RETRY_DELAY", 0.05)


def test_start_then_success_once_for_the_fleet(server: Recorder, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"ping_url": f"{server.base}/ping/{SECRET_UUID}/"})
    notifier = Notifier(config, ["a", "b", "c"])
    assert notifier.start() == []
    assert [(h.method, h.path) for h in server.hits] == [("GET", f"/ping/{SECRET_UUID}/start")]
    assert notifier.finish([ok("a"), ok("b"), ok("c")], "snapshot") == []
    start, success = server.hits
    assert (success.method, success.path) == ("POST", f"/ping/{SECRET_UUID}")
    assert start.query["rid"] == success.query["rid"]  # healthchecks pairs start and end
    assert success.body.decode() == "a: snapshot ok\nb: snapshot ok\nc: snapshot ok\n"
    assert success.headers["User-Agent"].startswith("snapcoord/")


def test_failure_pings_fail_with_the_errors_of_the_failing_vms(
    server: Recorder, tmp_path: Path
) -> None:
    config = make_config(tmp_path, {"ping_url": f"{server.base}/ping/{SECRET_UUID}"})
    notifier = Notifier(config, ["a", "b", "c"])
    outcomes = [
        ok("a"),
        failed("b", 6, "b: mariadb did not start: timed out after 60 s", "b: second problem"),
        failed("c", 3, "c: hypervisor lab unreachable"),
    ]
    assert notifier.finish(outcomes, "snapshot") == []
    (hit,) = server.hits
    assert (hit.method, hit.path) == ("POST", f"/ping/{SECRET_UUID}/fail")
    assert hit.body.decode() == (
        "b: snapshot failed (exit 6)\n"
        "  b: mariadb did not start: timed out after 60 s\n"
        "  b: second problem\n"
        "c: snapshot failed (exit 3)\n"
        "  c: hypervisor lab unreachable\n"
    )


def test_a_vm_without_an_outcome_is_a_failure(server: Recorder, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"ping_url": f"{server.base}/ping/x"})
    assert Notifier(config, ["a", "b"]).finish([ok("a")], "snapshot") == []
    (hit,) = server.hits
    assert hit.path == "/ping/x/fail" and hit.body == b"b: snapshot not run\n"


def test_query_of_the_ping_url_is_kept(server: Recorder, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"ping_url": f"{server.base}/ping/key/db-nightly?create=1"})
    Notifier(config, ["a"]).start()
    (hit,) = server.hits
    assert hit.path == "/ping/key/db-nightly/start" and hit.query["create"] == "1"


def test_webhook_posts_the_json_summary(server: Recorder, tmp_path: Path) -> None:
    config = make_config(tmp_path, {"webhook_url": f"{server.base}/hook?token={SECRET_TOKEN}"})
    notifier = Notifier(config, ["a", "b", "c"])
    assert notifier.start() == []  # a webhook has no start
    assert server.hits == []
    outcomes = [ok("a"), failed("b", 5, "b: snapshot failed"), ok("c")]
    assert notifier.finish(outcomes, "snapshot") == []
    (hit,) = server.hits
    assert (hit.method, hit.path, hit.query["token"]) == ("POST", "/hook", SECRET_TOKEN)
    assert hit.headers["Content-Type"] == "application/json"
    body = json.loads(hit.body)
    assert body["summary"].pop("seconds") >= 0
    assert body == {
        "command": "snapshot",
        "vms": [o.summary for o in outcomes],
        "summary": {
            "vms": 3,
            "ok": 2,
            "failed": 1,
            "outcomes": {"failed": 1, "ok": 2},
            "exit_code": 5,
        },
    }
    notifier.finish(outcomes, "snapshot", exit_code=130)  # the command's own code wins
    assert json.loads(server.hits[-1].body)["summary"]["exit_code"] == 130


def test_ping_and_webhook_together(server: Recorder, tmp_path: Path) -> None:
    config = make_config(
        tmp_path, {"ping_url": f"{server.base}/ping/p", "webhook_url": f"{server.base}/hook"}
    )
    notifier = Notifier(config, ["a"])
    notifier.start()
    notifier.finish([ok("a")], "prune")
    assert sorted(server.paths()) == ["/hook", "/ping/p", "/ping/p/start"]
    (hook,) = [h for h in server.hits if h.path == "/hook"]
    assert json.loads(hook.body)["command"] == "prune"


def test_a_vm_with_its_own_url_pings_its_own(server: Recorder, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"ping_url": f"{server.base}/ping/fleet", "timeout": 5},
        c={"ping_url": f"{server.base}/ping/c-own"},
    )
    notifier = Notifier(config, ["a", "b", "c"])
    assert [g.keys for g in notifier.groups] == [["a", "b"], ["c"]]
    notifier.start()
    assert sorted(server.paths()) == ["/ping/c-own/start", "/ping/fleet/start"]
    server.hits.clear()
    notifier.finish([ok("a"), ok("b"), failed("c", 4, "c: sudo: a password is required")], "x")
    by_path = {h.path: h for h in server.hits}
    assert set(by_path) == {"/ping/fleet", "/ping/c-own/fail"}
    assert by_path["/ping/fleet"].body == b"a: x ok\nb: x ok\n"
    assert b"c: sudo: a password is required" in by_path["/ping/c-own/fail"].body


def test_only_the_selected_vms_and_none_without_urls(server: Recorder, tmp_path: Path) -> None:
    config = make_config(tmp_path, None, c={"ping_url": f"{server.base}/ping/c"})
    notifier = Notifier(config, ["a", "b"])  # c has a URL but is not selected
    assert notifier.groups == []
    assert notifier.start() == [] and notifier.finish([ok("a"), ok("b")], "snapshot") == []
    assert server.hits == []


def test_one_retry_after_a_server_error(server: Recorder, tmp_path: Path) -> None:
    server.answers = [500, 200]
    config = make_config(tmp_path, {"ping_url": f"{server.base}/ping/r"})
    assert Notifier(config, ["a"]).start() == []
    assert server.paths() == ["/ping/r/start", "/ping/r/start"]


def test_two_server_errors_are_a_warning(
    server: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.answers = [503, 503]
    config = make_config(tmp_path, {"ping_url": f"{server.base}/ping/{SECRET_UUID}"})
    with caplog.at_level(logging.INFO, logger="snapcoord"):
        warnings = Notifier(config, ["a"]).finish([ok("a")], "snapshot")
    assert warnings == [f"notification: success ping to {server.base} failed: HTTP 503"]
    assert len(server.hits) == 2
    assert warnings[0] in caplog.text


def test_a_client_error_is_not_retried(server: Recorder, tmp_path: Path) -> None:
    server.answers = [404]
    config = make_config(tmp_path, {"webhook_url": f"{server.base}/hook/{SECRET_TOKEN}"})
    (warning,) = Notifier(config, ["a"]).finish([ok("a")], "snapshot")
    assert warning == f"notification: webhook to {server.base} failed: HTTP 404"
    assert len(server.hits) == 1


def test_a_server_that_never_answers_costs_two_timeouts(server: Recorder, tmp_path: Path) -> None:
    server.answers = ["hang", "hang"]
    config = make_config(tmp_path, {"ping_url": f"{server.base}/ping/h", "timeout": 0.3})
    began = time.monotonic()
    warnings = Notifier(config, ["a"]).start()
    elapsed = time.monotonic() - began
    assert warnings == [f"notification: start ping to {server.base} failed: timed out"]
    assert len(server.hits) == 2 and 0.6 <= elapsed < 2.5


def test_connection_refused_is_a_warning(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens
    url = f"http://127.0.0.1:{port}/ping/{SECRET_UUID}"
    config = make_config(tmp_path, {"ping_url": url, "webhook_url": url + "/hook"})
    notifier = Notifier(config, ["a"])
    (start,) = notifier.start()
    assert (
        start == f"notification: start ping to http://127.0.0.1:{port} failed: Connection refused"
    )
    warnings = notifier.finish([failed("a", 5, "a: boom")], "snapshot")
    assert len(warnings) == 2 and all("Connection refused" in w for w in warnings)


def test_no_secret_in_any_message(
    server: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.answers = [500] * 10
    port = server.server.server_address[1]
    ping = f"http://user:{SECRET_TOKEN}@127.0.0.1:{port}/ping/{SECRET_UUID}?k={SECRET_TOKEN}"
    hook = f"{server.base}/hooks/{SECRET_TOKEN}?token={SECRET_TOKEN}"
    config = make_config(tmp_path, {"ping_url": ping, "webhook_url": hook})
    with caplog.at_level(logging.DEBUG, logger="snapcoord"):
        notifier = Notifier(config, ["a"])
        warnings = notifier.start() + notifier.finish([failed("a", 5, "a: x")], "snapshot")
    assert len(warnings) == 3
    text = "\n".join(warnings) + caplog.text
    assert SECRET_UUID not in text and SECRET_TOKEN not in text and "user" not in text
    assert f"http://127.0.0.1:{port}" in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hc-ping.com/5f0c1e2d-aaaa", "https://hc-ping.com"),
        ("https://u:p@example.org:8443/x?y=z", "https://example.org:8443"),
        ("http://[::1]:8080/p", "http://[::1]:8080"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_webhook_summary_counts_vms_not_run_and_the_worst_code() -> None:
    body = notify.webhook_body("snapshot", [ok("a"), failed("b", 4), failed("c", 6)], ["d"])
    totals = body["summary"]
    assert (totals["vms"], totals["ok"], totals["failed"]) == (4, 1, 3)
    assert totals["outcomes"] == {
        "ok": 1,
        "not_run": 1,
        "preflight_failed": 1,
        "service_not_restored": 1,
    }
    assert totals["not_run"] == ["d"] and totals["exit_code"] == 6


# -- through the CLI, on the Proxmox API double ----------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("notify-tls"))


@pytest.fixture
def double(cert: Cert) -> Iterator[PveApiDouble]:
    api = start_double(cert, task_seconds=0.05)
    yield api
    api.stop()


def fleet_config(tmp_path: Path, double: PveApiDouble, cert: Cert, notify_table: Any) -> Path:
    tables = pve_tables(tmp_path, double.port, cert)
    tables["notify"] = notify_table
    return write_config(tmp_path / "c.toml", tables)


def test_cli_pings_start_before_the_snapshot_and_success_after(
    server: Recorder, double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    ping = f"{server.base}/ping/{SECRET_UUID}"
    config = fleet_config(
        tmp_path, double, cert, {"ping_url": ping, "webhook_url": f"{server.base}/hook"}
    )
    proc = cli(config, "snapshot", "db", "ct", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    runs = [line for line in json_lines(proc.stdout) if "vm" in line]
    assert {r["vm"] for r in runs} == {"db", "ct"}
    first_step = min(r["steps"][0]["started"] for r in runs)
    last_step = max(r["steps"][-1]["ended"] for r in runs)
    start, *finish = server.hits
    assert start.path == f"/ping/{SECRET_UUID}/start" and start.at < first_step
    assert sorted(h.path for h in finish) == ["/hook", f"/ping/{SECRET_UUID}"]
    assert all(h.at > last_step for h in finish)
    (hook,) = [h for h in finish if h.path == "/hook"]
    body = json.loads(hook.body)
    assert body["command"] == "snapshot"
    assert sorted(body["vms"], key=lambda v: v["vm"]) == sorted(runs, key=lambda r: r["vm"])
    assert body["summary"]["ok"] == 2 and body["summary"]["exit_code"] == 0


def test_cli_failure_pings_fail_with_the_error(
    server: Recorder, double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    config = fleet_config(tmp_path, double, cert, {"ping_url": f"{server.base}/ping/f"})
    double.cluster.lock_guest(201, "backup")
    proc = cli(config, "snapshot", "db", "remote")
    assert proc.returncode == 3, proc.stderr
    assert server.paths() == ["/ping/f/start", "/ping/f/fail"]
    body = server.hits[1].body.decode()
    assert body.startswith("remote: snapshot failed (exit 3)\n")
    assert "locked" in body and "db:" not in body


def test_cli_a_failed_notification_is_a_warning_not_a_failure(
    double: PveApiDouble, cert: Cert, tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ping/{SECRET_UUID}"
    config = fleet_config(tmp_path, double, cert, {"ping_url": url, "timeout": 1})
    proc = cli(config, "snapshot", "db")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "notification" in line]
    assert warnings == [
        f"snapcoord: warning: notification: {what} ping to http://127.0.0.1:{port} failed: "
        "Connection refused"
        for what in ("start", "success")
    ]
    assert SECRET_UUID not in proc.stderr + proc.stdout

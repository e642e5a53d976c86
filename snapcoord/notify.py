"""Notifications: a healthchecks-style ping URL and a generic JSON webhook (``[notify]``, per VM
``[vms.X.notify]``), with the standard library only.

The selected VMs are grouped by their (ping_url, webhook_url): a fleet sharing the global URL
pings once per command, a VM with its own URL pings its own. Ping protocol (healthchecks.io):
``<url>/start`` before the runs, ``<url>`` on success, ``<url>/fail`` with the errors as the body
on failure; start and finish carry the same ``rid`` so the service pairs them. Each request has
the configured timeout and one retry. A failed notification is a warning — returned for the
caller to show (and logged at info level), never raised — and never fails a run. URLs may carry
secrets (check UUIDs, tokens): messages name only ``scheme://host``.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from snapcoord import __version__, fleet
from snapcoord.config import Config
from snapcoord.outcome import Outcome

log = logging.getLogger("snapcoord")

RETRY_DELAY = 0.5  # seconds between the attempt and its one retry
MAX_BODY = 100_000  # healthchecks.io keeps the first 100 kB of a ping body
MAX_WORKERS = 8  # groups notified at once
USER_AGENT = f"snapcoord/{__version__}"


@dataclass
class Group:
    """VMs that share their notification URLs."""

    ping_url: str | None
    webhook_url: str | None
    timeout: float
    keys: list[str] = field(default_factory=list)
    rid: str = field(default_factory=lambda: str(uuid.uuid4()))


class Notifier:
    """``Notifier(config, keys)``: :meth:`start` before preflight, :meth:`finish` after every VM
    is done. Both return warnings (empty when every notification went out)."""

    def __init__(self, config: Config, keys: Sequence[str]) -> None:
        self.started = time.monotonic()
        self.groups: list[Group] = []
        by_urls: dict[tuple[str | None, str | None], Group] = {}
        for key in keys:
            notify = config.vm(key).notify
            urls = (notify.ping_url, notify.webhook_url)
            if urls == (None, None):
                continue
            group = by_urls.get(urls)
            if group is None:
                group = by_urls[urls] = Group(*urls, timeout=notify.timeout)
                self.groups.append(group)
            group.timeout = max(group.timeout, notify.timeout)
            group.keys.append(key)

    def start(self) -> list[str]:
        """``<ping_url>/start`` once per group that has a ping URL."""
        self.started = time.monotonic()
        requests = [
            _Request("start ping", _ping_url(g.ping_url, "start", g.rid), g.timeout)
            for g in self.groups
            if g.ping_url
        ]
        return _send_all(requests)

    def finish(
        self, outcomes: Sequence[Outcome], command: str, *, exit_code: int | None = None
    ) -> list[str]:
        """Per group: the success or ``/fail`` ping and the webhook. A VM of the group without
        an outcome (never run) counts as failed. ``exit_code``: the command's, for the webhook
        summary (default: the most severe of the group's, :func:`snapcoord.fleet.most_severe`)."""
        seconds = time.monotonic() - self.started
        by_vm = {o.vm: o for o in outcomes}
        requests: list[_Request] = []
        for group in self.groups:
            mine = [by_vm[k] for k in group.keys if k in by_vm]
            missing = [k for k in group.keys if k not in by_vm]
            if group.ping_url:
                requests.append(_finish_ping(group, mine, missing, command))
            if group.webhook_url:
                body = webhook_body(command, mine, missing, seconds=seconds, exit_code=exit_code)
                requests.append(
                    _Request(
                        "webhook",
                        group.webhook_url,
                        group.timeout,
                        json.dumps(body, default=str).encode(),
                        "application/json",
                    )
                )
        return _send_all(requests)


def _finish_ping(group: Group, mine: list[Outcome], missing: list[str], command: str) -> _Request:
    assert group.ping_url is not None
    failed = [o for o in mine if not o.ok]
    if not failed and not missing:
        text = "".join(f"{o.vm}: {command} ok\n" for o in mine)
        url = _ping_url(group.ping_url, "", group.rid)
        return _Request("success ping", url, group.timeout, text.encode(), "text/plain")
    url = _ping_url(group.ping_url, "fail", group.rid)
    return _Request("fail ping", url, group.timeout, fail_text(failed, missing, command).encode())


def fail_text(failed: list[Outcome], missing: list[str], command: str) -> str:
    """The body of a ``/fail`` ping: each failing VM's error lines."""
    lines: list[str] = []
    for outcome in failed:
        lines.append(f"{outcome.vm}: {command} failed (exit {outcome.exit_code})")
        lines += [f"  {error}" for error in outcome.errors]
    lines += [f"{key}: {command} not run" for key in missing]
    text = "\n".join(lines) + "\n"
    return text if len(text) <= MAX_BODY else text[: MAX_BODY - 12] + "\n[cut short]\n"


def webhook_body(
    command: str,
    outcomes: Sequence[Outcome],
    missing: Sequence[str] = (),
    *,
    seconds: float = 0.0,
    exit_code: int | None = None,
) -> dict[str, Any]:
    """``{"command", "vms": [each --json summary], "summary": ...}``: the summary is the one
    ``--json`` prints for a fleet (counts per outcome, exit code), plus the VMs not run."""
    totals = fleet.summary(list(outcomes), command=command, seconds=seconds)
    totals.pop("command")
    if missing:
        totals["vms"] += len(missing)
        totals["failed"] += len(missing)
        totals["outcomes"]["not_run"] = len(missing)
        totals["not_run"] = list(missing)
    if exit_code is not None:
        totals["exit_code"] = exit_code
    return {"command": command, "vms": [o.summary for o in outcomes], "summary": totals}


# -- URLs ----------------------------------------------------------------------------------------


def _ping_url(base: str, suffix: str, rid: str) -> str:
    """``base`` + ``/suffix`` (a trailing slash in ``base`` is fine), with ``rid=`` added to any
    query it has."""
    parts = urllib.parse.urlsplit(base)
    path = parts.path.rstrip("/")
    if suffix:
        path = f"{path}/{suffix}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query.append(("rid", rid))
    return urllib.parse.urlunsplit(parts._replace(path=path, query=urllib.parse.urlencode(query)))


def redact(url: str) -> str:
    """Only ``scheme://host[:port]`` of ``url``: paths, queries and user info may be secrets."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


# -- sending -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    what: str  # "start ping", "webhook", ... for messages
    url: str
    timeout: float
    body: bytes | None = None
    content_type: str = "text/plain; charset=utf-8"


def _send_all(requests: list[_Request]) -> list[str]:
    if not requests:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(requests))) as pool:
        results = list(pool.map(_send, requests))
    return [warning for warning in results if warning is not None]


def _send(request: _Request) -> str | None:
    """Send ``request`` with one retry; the warning when both attempts failed, else None."""
    error = ""
    for attempt in (1, 2):
        try:
            _attempt(request)
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                break  # the URL is wrong: a retry cannot help
        except (OSError, ValueError, http.client.HTTPException) as exc:
            error = _reason(exc)
        else:
            log.debug("notify: %s to %s sent", request.what, redact(request.url))
            return None
        where = redact(request.url)
        log.debug("notify: %s to %s: attempt %d: %s", request.what, where, attempt, error)
        if attempt == 1:
            time.sleep(RETRY_DELAY)
    warning = f"notification: {request.what} to {redact(request.url)} failed: {error}"
    log.info("%s", warning)  # the caller shows the returned warnings (CLI: once, on stderr)
    return warning


def _attempt(request: _Request) -> None:
    headers = {"User-Agent": USER_AGENT}
    if request.body is not None:
        headers["Content-Type"] = request.content_type
    if urllib.parse.urlsplit(request.url).scheme not in ("http", "https"):
        raise ValueError("not an http(s) URL")  # the schema allows no other; be sure
    prepared = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        request.url,
        data=request.body,
        headers=headers,
        method="GET" if request.body is None else "POST",
    )
    with urllib.request.urlopen(prepared, timeout=request.timeout) as response:  # noqa: S310
        response.read(65536)


def _reason(exc: BaseException) -> str:
    """A short cause that never contains the URL (urllib's messages can)."""
    cause: BaseException | str = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, TimeoutError):
        return "timed out"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(cause, BaseException):
        return type(cause).__name__
    return "error" if "/" in cause else cause

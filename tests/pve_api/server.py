"""HTTP(S) front of the double: /api2/json envelope, authentication, CSRF, validation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from . import api
from .cluster import ApiError, Cluster, param_error
from .schema import Schema, validate

BASE = "/api2/json"
CONFLICT = "duplicate parameter (already defined in URI) with conflicting values!"
TICKET_LIFETIME = 7200
#: pve-http-server's limit_max_post since 5.2.1 (Proxmox VE 9; 8 is in the schema's _pve8)
MAX_POST = 512 * 1024
TOKEN_HEADER_RE = re.compile(r"(?:^|\s)PVEAPIToken(?:=| )([^;]*)")
TOKEN_ID_RE = re.compile(r"^([^\s:/]+@[A-Za-z][A-Za-z0-9\.\-_]+)!([A-Za-z][A-Za-z0-9\.\-_]+)$")
# Unauthenticated calls (manager PVE/HTTPServer.pm auth_handler).
NO_AUTH = {("GET", "/access/ticket"), ("POST", "/access/ticket"), ("GET", "/access/domains")}


def _covers(acl_path: str, path: str) -> bool:
    """Whether an ACL on ``acl_path`` applies to ``path`` (itself or a path below it)."""
    return acl_path == "/" or path == acl_path or path.startswith(acl_path.rstrip("/") + "/")


@dataclass
class Logged:
    method: str
    path: str  # relative to /api2/json, UPIDs and names included
    status: int
    params: dict[str, Any]


class PveApiDouble:
    """A strict Proxmox VE API double. ``start()`` serves it in a thread on 127.0.0.1.

    Test controls are Python methods on ``cluster`` (lock_guest, set_status, move_guest...) and
    :meth:`expire_tickets`; none of them is reachable over HTTP.
    """

    def __init__(
        self,
        *,
        task_seconds: float = 0.2,
        tokens: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        auth_fail_delay: float = 0.0,
        seed: bool = True,
        pve_major: int = 9,
    ) -> None:
        self.schema = Schema()
        #: the Proxmox VE major version claimed (GET /version); 8 also means VM.Monitor for the
        #: guest agent endpoints, file-read without count/decode/offset and 64 KiB POST bodies
        #: (data/pve-agent-api.json, _pve8)
        self.pve_major = pve_major
        self.cluster = Cluster(task_seconds=task_seconds)
        if seed:
            self.cluster.seed()
        self.tokens = dict(tokens or {})
        self.users = dict(users or {})
        #: ACLs by user or token id: {ACL path: privileges}. Whoever is not listed holds every
        #: privilege on / (root@pam, or the Administrator role): see :meth:`permissions`.
        self.acl: dict[str, dict[str, frozenset[str]]] = {}
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.auth_fail_delay = auth_fail_delay
        self.log: list[Logged] = []
        self._log_lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._ticket_offset = 0.0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- permissions (data/pve-check-api.json, _behaviour) --------------------------------

    def grant(self, authid: str, path: str, privileges: set[str] | frozenset[str]) -> None:
        """Give ``authid`` exactly ``privileges`` on ``path`` and below (propagate), replacing
        what it had there; its first grant takes away the default of every privilege."""
        self.acl.setdefault(authid, {})[path] = frozenset(privileges)

    def permissions(self, authid: str, path: str) -> dict[str, int]:
        """Effective privileges of ``authid`` on ``path`` (privilege -> propagate), as
        RPCEnvironment::permissions: the most specific ACL path at or above ``path`` wins."""
        acl = self.acl.get(authid)
        if acl is None:
            return {priv: 1 for priv in self.schema.privileges}
        best = max((p for p in acl if _covers(p, path)), key=len, default=None)
        return {} if best is None else {priv: 1 for priv in sorted(acl[best])}

    def check_permission(
        self, authid: str, endpoint_raw: dict[str, Any], params: dict[str, Any]
    ) -> None:
        """Raise the 403 of RPCEnvironment::check/check_any unless ``authid`` may call it."""
        check = (endpoint_raw.get("permissions") or {}).get("check")
        if not check or check[0] != "perm":
            return
        path = re.sub(r"\{(\w+)\}", lambda m: str(params.get(m.group(1), "")), check[1])
        wanted: list[str] = list(check[2])
        any_of = len(check) > 4 and check[3] == "any" and bool(check[4])
        if self.pve_major == 8 and "/agent/" in endpoint_raw["path"]:
            wanted, any_of = list(self.schema.pve8_permission), False
        held = self.permissions(authid, path)
        if any_of:
            if not any(p in held for p in wanted):
                raise ApiError(403, f"Permission check failed ({path}, {'|'.join(wanted)})")
            return
        for priv in wanted:
            if priv not in held:
                raise ApiError(403, f"Permission check failed ({path}, {priv})")

    # -- lifecycle ----------------------------------------------------------------------

    def bind(self, host: str = "127.0.0.1", port: int = 0) -> None:
        double = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        class Handler(_Handler):
            pass

        Handler.double = double
        httpd = Server((host, port), Handler)
        if self.tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls_cert, self.tls_key)
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd

    def start(self, host: str = "127.0.0.1", port: int = 0) -> PveApiDouble:
        self.bind(host, port)
        assert self._httpd is not None
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        assert self._httpd is not None
        self._httpd.serve_forever()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> PveApiDouble:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}{BASE}"

    # -- test controls ----------------------------------------------------------------

    def expire_tickets(self) -> None:
        """Every ticket and CSRF token issued so far is now older than two hours."""
        self._ticket_offset += TICKET_LIFETIME + 1

    def calls(self) -> list[tuple[str, str]]:
        with self._log_lock:
            return [(e.method, e.path) for e in self.log]

    def clear_log(self) -> None:
        with self._log_lock:
            self.log.clear()

    def record(self, entry: Logged) -> None:
        with self._log_lock:
            self.log.append(entry)

    # -- tickets ------------------------------------------------------------------------

    def _now(self) -> int:
        return int(time.time() + self._ticket_offset)

    def _sign(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode().rstrip("=")

    def issue_ticket(self, user: str) -> dict[str, Any]:
        stamp = f"{self._now():08X}"
        plain = f"PVE:{user}:{stamp}"
        return {
            "username": user,
            "ticket": f"{plain}::{self._sign(plain)}",
            "CSRFPreventionToken": f"{stamp}:{self._sign(stamp + ':' + user)}",
            "cap": {},
        }

    def _fresh(self, stamp: str) -> bool:
        try:
            age = self._now() - int(stamp, 16)
        except ValueError:
            return False
        return -300 < age < TICKET_LIFETIME

    def verify_ticket(self, ticket: str) -> str | None:
        match = re.fullmatch(r"(PVE:([^:]+):([0-9A-F]{8}))::(.+)", ticket)
        if not match:
            return None
        plain, user, stamp, sig = match.groups()
        if not hmac.compare_digest(sig, self._sign(plain)) or not self._fresh(stamp):
            return None
        return user

    def verify_csrf(self, token: str, user: str) -> bool:
        stamp, _, sig = token.partition(":")
        return hmac.compare_digest(sig, self._sign(stamp + ":" + user)) and self._fresh(stamp)

    def check_login(self, user: str, password: str) -> bool:
        known = self.users.get(user)
        if known is not None and hmac.compare_digest(known, password):
            return True
        return self.verify_ticket(password) == user  # ticket renewal


def decode_urlencoded(data: str) -> dict[str, Any]:
    """pve-http-server's decode_urlencoded: values decoded as UTF-8 (malformed bytes become
    U+FFFD), a repeated key an array; a key without a value (``k=``: Perl's split drops the
    empty field) is undefined (None), and it replaces what the key had."""
    result: dict[str, Any] = {}
    for pair in re.split(r"[&;]", data):
        if not pair:
            continue
        fields = pair.split("=")
        while len(fields) > 1 and fields[-1] == "":
            fields.pop()
        key = unquote_to_bytes(fields[0].replace("+", " ")).decode("latin-1")
        value: Any = None
        if len(fields) > 1:
            value = unquote_to_bytes(fields[1].replace("+", " ")).decode("utf-8", "replace")
            old = result.get(key)
            if old is not None:
                value = [*old, value] if isinstance(old, list) else [old, value]
        result[key] = value
    return result


class _Handler(BaseHTTPRequestHandler):
    #: the request being answered, until it is logged (:meth:`_record`)
    _pending: tuple[str, str, dict[str, Any]] | None = None

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls
    double: PveApiDouble

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- plumbing -----------------------------------------------------------------------

    def _record(self, status: int) -> None:
        """Log the request being answered, once: before its reply goes out, so a client that
        has its answer finds the request in the log (request counts read right after a call)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            method, path, params = pending
            shown = {k: ("***" if k == "password" else v) for k, v in params.items()}
            self.double.record(Logged(method, path, status, shown))

    def _send(self, status: int, body: dict[str, Any] | None, reason: str | None = None) -> None:
        self._record(status)
        raw = b"" if body is None else json.dumps(body).encode()
        phrase = (reason or "").split("\n")[0].strip() or None
        if phrase is not None:  # Perl writes the text's UTF-8 bytes; http.server sends Latin-1
            phrase = phrase.encode("utf-8").decode("latin-1")
        try:
            self.send_response(status, phrase)
            if body is not None:
                self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (ConnectionError, ssl.SSLError):
            # The client is gone (a test cut the connection, tests/test_agent_fault_matrix.py's
            # api_down): nobody to answer, and not a bug of the double.
            self.close_connection = True

    def _fail(self, error: ApiError) -> None:
        if error.bare:  # the HTTP server's own error: a status line, no JSON
            self._send(error.status, None, error.message)
            return
        if error.status == 401:
            time.sleep(self.double.auth_fail_delay)
            self._send(401, None, error.message)  # no JSON body on auth failures
            return
        body: dict[str, Any] = {"data": None}
        if error.errors:
            body["errors"] = error.errors
        body["message"] = error.message
        self._send(error.status, body, error.message)

    def _params(self, method: str, query: str) -> dict[str, Any]:
        params: dict[str, Any] = {}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        limit = MAX_POST if self.double.pve_major > 8 else self.double.schema.pve8_max_post
        if limit is not None and length > limit:
            self.close_connection = True  # PVE answers >= 400 with Connection: close
            raise ApiError(501, "for data too large", bare=True)
        if body:
            ctype = self.headers.get("Content-Type", "")
            if "application/json" in ctype:
                data = json.loads(body)
                if not isinstance(data, dict):
                    raise param_error({"_root": "type check ('object') failed"})
                params.update(data)
            else:
                params.update(decode_urlencoded(body.decode("latin-1")))
        params.update(decode_urlencoded(query))  # the query wins, as in extract_params
        return params

    def _authenticate(self, method: str, rel: str) -> tuple[str, bool]:
        """Return (user, is_api_token) or raise a 401."""
        double = self.double
        header = self.headers.get("Authorization", "")
        match = TOKEN_HEADER_RE.search(header)
        if match:
            value = unquote(match.group(1))
            token_id, sep, secret = value.rpartition("=")
            if (
                not sep
                or not TOKEN_ID_RE.match(token_id)
                or token_id not in double.tokens
                or not hmac.compare_digest(double.tokens[token_id], secret)
            ):
                raise ApiError(401, "Authentication failed!")
            return token_id, True
        ticket = None
        cookie = self.headers.get("Cookie", "")
        found = re.search(r"(?:^|;\s*)PVEAuthCookie=([^;]*)", cookie)
        if found:
            ticket = unquote(found.group(1))
        else:
            found = re.search(r"(?:^|\s)PVEAuthCookie=([^;\s]*)", header)
            if found:
                ticket = unquote(found.group(1))
        if not ticket:
            raise ApiError(401, "No ticket")
        user = double.verify_ticket(ticket)
        if user is None:
            raise ApiError(401, "Authentication failed!")
        if method != "GET":
            csrf = self.headers.get("CSRFPreventionToken", "")
            if not csrf or not double.verify_csrf(csrf, user):
                raise ApiError(401, "Permission denied - invalid csrf token")
        return user, False

    def _handle(self, method: str) -> None:
        double = self.double
        split = urlsplit(self.path)
        rel = split.path[len(BASE) :] if split.path.startswith(BASE + "/") else None
        params: dict[str, Any] = {}
        status = 200
        self._pending = (method, rel if rel is not None else split.path, params)
        try:
            double.cluster.tick()
            params = self._params(method, split.query)
            self._pending = (method, rel if rel is not None else split.path, params)
            if rel is None:
                raise ApiError(501, f"Method '{method} {split.path}' not implemented")
            segments = [unquote(s) for s in rel.split("/") if s]
            rel_uri = "/" + "/".join(segments)
            user, is_token = "", False
            if (method, rel_uri) not in NO_AUTH:
                user, is_token = self._authenticate(method, rel_uri)
            routed = double.schema.route(method, segments)
            if routed is None:
                raise ApiError(501, f"Method '{method} {rel_uri}' not implemented")
            endpoint, path_params = routed
            if is_token and not endpoint.allowtoken:
                raise ApiError(
                    403,
                    f"Permission check failed (URI '{rel_uri}' not available with API token, "
                    "need proper ticket.\n)",
                )
            for key, value in path_params.items():
                if key in params and params[key] != value:
                    raise param_error({key: CONFLICT})
            absent: frozenset[str] = frozenset()
            if double.pve_major == 8:
                absent = double.schema.pve8_absent.get(endpoint.name, frozenset())
            errors, clean = validate(endpoint, {**params, **path_params}, absent)
            if errors:
                raise param_error(errors)
            if user:
                double.check_permission(user, endpoint.raw, clean)
            request = api.Request(
                cluster=double.cluster,
                permissions=double.permissions,
                params=clean,
                user=user,
                issue_ticket=double.issue_ticket,
                check_login=double.check_login,
                pve_major=double.pve_major,
            )
            with double.cluster.lock:
                result = api.HANDLERS[endpoint.name](request)
            body: dict[str, Any]
            if isinstance(result, api.Reply):
                body = {"data": result.data}
                if result.total is not None:
                    body["total"] = result.total
            else:
                body = {"data": result}
            self._send(200, body)
        except ApiError as error:
            status = error.status
            self._fail(error)
        except Exception as exc:  # a bug in the double: say so loudly (logged as 599)
            status = 599
            self._record(status)
            self._fail(ApiError(500, f"API double bug: {type(exc).__name__}: {exc}"))
            raise
        finally:
            self._record(status)  # unless the reply recorded it already

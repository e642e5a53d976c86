"""Proxmox VE adapter: qemu VMs and lxc containers through proxmoxer's HTTPS backend.

Every write returns a task UPID; :meth:`ProxmoxAdapter._run_task` waits on the task's status
(adaptive polling through :func:`poll_until`) and retries while the guest is locked by another
task, which is safe: a locked guest fails before anything was changed. See docs/proxmox.md.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import requests
from proxmoxer.backends.https import (
    JsonSerializer,
    ProxmoxHTTPApiTokenAuth,
    ProxmoxHTTPAuth,
    ProxmoxHTTPAuthBase,
    ProxmoxHttpSession,
)
from proxmoxer.core import ProxmoxResource, ResourceException
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from snapcoord import cancel
from snapcoord.adapters.base import (
    THAW_POLL_SECONDS,
    VM,
    Adapter,
    Capabilities,
    PowerState,
    Snapshot,
    poll_until,
)
from snapcoord.adapters.permissions import (
    proxmox_agent_transport_privileges,
    proxmox_privileges,
)
from snapcoord.agent_link import AgentLink
from snapcoord.errors import (
    HypervisorError,
    SnapshotExists,
    SnapshotNotFound,
    TaskTimeout,
    UnsupportedOperation,
    UsageError,
    VMNotFound,
)
from snapcoord.secrets import Secret
from snapcoord.settings import ProxmoxSettings
from snapcoord.text import clip

T = TypeVar("T")
log = logging.getLogger(__name__)

HTTP_TIMEOUT = 30.0  # seconds for one API request
FIRST_POLL = 0.05  # first task status poll after this many seconds ...
POLL_INTERVAL = 0.1  # ... then this, doubling up to ...
MAX_POLL_INTERVAL = 0.5  # a finished task is seen at most this late (inside the window)

SNAPNAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{1,39}")  # pve-configid, maxLength 40
TOKEN_ID_RE = re.compile(r"([^\s:/]+@[A-Za-z][A-Za-z0-9.\-_]+)!([A-Za-z][A-Za-z0-9.\-_]+)")
TASK_OK_RE = re.compile(r"^(OK|WARNINGS: \d+)$")
# Errors meaning "another task holds the guest": nothing was changed, a retry is safe.
LOCKED_RE = re.compile(
    r"^(?:(?:VM|CT) is locked \((?P<lock>[^)]*)\)"
    r"|can't lock file '[^']*' - got timeout"
    r"|Failed to obtain guest migration lock.*)$"
)
EXISTS_RE = re.compile(r"^snapshot name '.*' already used$")
MISSING_RE = re.compile(r"^snapshot '.*' does not exist$")
#: the API's answers while the guest's agent does not answer (yet: it reconnects after a revert)
AGENT_NOT_YET_RE = re.compile(
    r"QEMU guest agent is not running|qga command '[^']*' failed - got timeout"
)
VM_NOT_RUNNING_RE = re.compile(r"^VM \d+ is not running")


class _GuestLocked(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _PinnedAdapter(HTTPAdapter):
    """Accept exactly the server certificate with this SHA-256 fingerprint (hex, no colons).

    Chain verification is off (``verify=False``) because the pin replaces it, so the pin must
    reach every connection pool this adapter hands out: the direct pool manager's, and the
    proxy managers' that requests builds in :meth:`proxy_manager_for` when ``https_proxy``
    applies (these never see ``init_poolmanager``'s arguments). The pin is set on every path
    (pool manager, proxy managers, each request's pool key) and checked on the pool actually
    chosen, so a path requests adds later fails closed instead of sending the credentials
    unpinned. urllib3 compares the fingerprint right after the TLS handshake, before any byte
    of the request (API token, ``username=…&password=…``) is written."""

    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self._fingerprint
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs["assert_fingerprint"] = self._fingerprint
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str, cert: Any = None
    ) -> tuple[Any, Any]:
        host_params, typed = super().build_connection_pool_key_attributes(request, verify, cert)
        pool_kwargs = cast(dict[str, Any], typed)  # the stubs' TypedDict lacks the key
        pool_kwargs["assert_fingerprint"] = self._fingerprint
        return host_params, pool_kwargs

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> Any:
        pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
        if getattr(pool, "assert_fingerprint", None) != self._fingerprint:
            raise requests.exceptions.SSLError(
                "certificate pin not applied to this connection: refused", request=request
            )
        return pool


class _TicketAuth(ProxmoxHTTPAuth):  # type: ignore[misc]
    """proxmoxer's ticket auth (CSRF header on writes, renewal after an hour), but logging in
    through our own session so ``ca_file`` and the fingerprint pin apply to the login too, and
    falling back to the password when the ticket can no longer be renewed (expired)."""

    def __init__(
        self,
        username: str,
        password: Secret,
        base_url: str,
        login_session: requests.Session,
        verify: bool | str,
    ) -> None:
        ProxmoxHTTPAuthBase.__init__(self, timeout=HTTP_TIMEOUT, verify_ssl=verify)
        self.base_url = base_url
        self.username = username
        self.pve_auth_ticket = ""
        self._password = password
        self._login_session = login_session
        self.login()

    def login(self) -> None:
        self._post_ticket(self._password.reveal())

    def _get_new_tokens(self, password: Any = None, otp: Any = None, otptype: Any = None) -> None:
        # proxmoxer calls this without a password to renew the ticket with the ticket itself.
        try:
            self._post_ticket(self.pve_auth_ticket if password is None else password)
        except _LoginRefused:
            if password is not None:
                raise
            self.login()

    def _post_ticket(self, password: str) -> None:
        response = self._login_session.post(
            self.base_url + "/access/ticket",
            data={"username": self.username, "password": password},
            verify=self.verify_ssl,
            timeout=self.timeout,
        )
        if response.status_code == 401:
            raise _LoginRefused()
        if response.status_code != 200:
            raise ResourceException(response.status_code, response.reason, response.reason)
        data = response.json()["data"]
        if data.get("NeedTFA"):
            raise HypervisorError(
                f"user {self.username} needs two-factor authentication",
                hint="use an API token (token_id + token_secret) instead",
            )
        self.birth_time = time.monotonic()
        self.pve_auth_ticket = data["ticket"]
        self.csrf_prevention_token = data["CSRFPreventionToken"]


class ApiUnreachable(HypervisorError):
    """The API did not answer (no connection, or no answer in time): it may answer again. The
    agent transport's link takes it for a guest agent that does not answer, retried inside a
    window like a lost SSH connection (adapters/proxmox_agent.py)."""


class _LoginRefused(Exception):
    pass


def _agent_enabled(value: Any) -> bool:
    """Parse the qemu ``agent`` property string: '1', 'enabled=1,fstrim_cloned_disks=1', ..."""
    if value is None:
        return False
    for part in str(value).split(","):
        key, sep, val = part.partition("=")
        if not sep:
            key, val = "enabled", key
        if key.strip() == "enabled":
            return val.strip().lower() in ("1", "on", "yes", "true")
    return False


def _agent_option(value: Any, key: str, default: str) -> str:
    """One key of the qemu ``agent`` property string (the first bare value is ``enabled``)."""
    for index, part in enumerate(str(value or "").split(",")):
        name, sep, val = part.partition("=")
        if not sep and index == 0:
            name, val = "enabled", name
        if name.strip() == key:
            return val.strip()
    return default


def _backup_freezes(value: Any) -> bool:
    """Whether vzdump's archive step calls the agent's fs-freeze: the agent is enabled and
    ``freeze-fs-on-backup`` (named ``freeze-fs`` in newer qemu-server) is not off."""
    if not _agent_enabled(value):
        return False
    for key in ("freeze-fs", "freeze-fs-on-backup", "guest-fsfreeze"):
        if _agent_option(value, key, "1").lower() in ("0", "off", "no", "false"):
            return False
    return True


def _checked_answers(method: Callable[..., T]) -> Callable[..., T]:
    """The API's JSON is read by key in the methods below: an answer of the wrong shape (a
    missing key, a list for an object, a string for a number) is the hypervisor's error, one
    line with exit 3, never a traceback (``--debug`` shows where it was met)."""

    @functools.wraps(method)
    def checked(self: ProxmoxAdapter, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
            vm = next((a.name for a in args if isinstance(a, VM)), None)
            raise HypervisorError(
                f"{self.where} gave an answer snapcoord does not understand in "
                f"{method.__name__} ({type(exc).__name__}: {_short(exc)})",
                vm=vm,
                hint="is it the Proxmox VE API, version 7 or later?",
            ) from exc

    return checked


class ProxmoxAdapter(Adapter):
    type_name = "proxmox"

    settings: ProxmoxSettings

    def __init__(self, name: str, settings: ProxmoxSettings) -> None:
        super().__init__(name, settings)
        self.host = settings.host
        self.port = settings.port
        self.lock_wait = settings.lock_wait_seconds
        self._version: dict[str, Any] | None = None
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        self.base_url = f"https://{host}:{self.port}/api2/json"
        self.where = f"{self.host}:{self.port}"
        #: every API request made, as "METHOD /path" (the benchmark counts them)
        self.requests: list[str] = []
        self._api: Any = None
        self._session: requests.Session | None = None
        self._ticket: _TicketAuth | None = None

    # -- session ------------------------------------------------------------------------

    def _verify(self) -> bool | str:
        if self.settings.thumbprint:
            return False  # the pin replaces chain verification (self-signed PVE certificates)
        if not self.settings.verify_tls:
            return False
        # what requests would read from the environment on every request (trust_env is off)
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        return self.settings.ca_file or bundle or True

    def _new_session(self, session: requests.Session) -> requests.Session:
        thumbprint = self.settings.thumbprint
        if thumbprint:
            hex_digits = re.sub(r"[^0-9A-Fa-f]", "", thumbprint.removeprefix("sha256:"))
            session.mount("https://", _PinnedAdapter(hex_digits.lower()))
        # The environment's proxy settings are read once, here: with trust_env requests reads
        # the whole environment again on every request (about 1 ms each: a quarter of the
        # coordinator's CPU in a fleet of 64 VMs at once, bench/fleet.py).
        session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
        session.trust_env = False
        return session

    def connect(self) -> None:
        if self._api is not None:
            return
        verify = self._verify()
        session = self._new_session(ProxmoxHttpSession())
        session.headers["Connection"] = "keep-alive"
        session.headers["accept"] = JsonSerializer().get_accept_types()
        session.hooks["response"].append(self._count)
        token_id, token_secret = self.settings.token_id, self.settings.token_secret
        if token_id and token_secret is not None:
            match = TOKEN_ID_RE.fullmatch(token_id)
            if not match:
                raise UsageError(
                    f"hypervisors.{self.name}.token_id {token_id!r} is not USER@REALM!TOKENID"
                )
            session.auth = ProxmoxHTTPApiTokenAuth(
                match.group(1),
                match.group(2),
                token_secret.reveal(),
                verify_ssl=verify,
                timeout=HTTP_TIMEOUT,
            )
        else:
            user, password = self.settings.user, self.settings.password
            if not user or password is None:
                raise UsageError(
                    f"hypervisors.{self.name}: set token_id + token_secret or user + password"
                )
            login = self._new_session(requests.Session())
            login.hooks["response"].append(self._count)
            try:
                self._ticket = _TicketAuth(str(user), password, self.base_url, login, verify)
            except _LoginRefused:
                raise HypervisorError(
                    f"login to {self.where} as {user} failed",
                    hint="check user (USER@REALM) and password",
                ) from None
            except requests.RequestException as exc:
                raise self._network_error(exc) from None
            except ResourceException as exc:
                raise HypervisorError(f"login to {self.where} failed: {exc}") from None
            session.auth = self._ticket
        self._session = session
        self._api = ProxmoxResource(
            base_url=self.base_url, session=session, serializer=JsonSerializer()
        )
        if self._ticket is None:
            try:
                self.api_version()
            except BaseException:
                self.close()
                raise

    @_checked_answers
    def api_version(self) -> str:
        """The pve-manager version (``GET /version``, which needs no privilege). ``connect``
        asks it when it uses a token, so that a wrong token or an unreachable host fails at
        connect, not at the first call after it (proxmoxer connects lazily; a ticket login is
        such a request already)."""
        version = self._version_answer()["version"]
        if not isinstance(version, str):
            raise TypeError(f"version is {type(version).__name__}")
        return version

    def _version_answer(self) -> dict[str, Any]:
        """``GET /version``, asked once per session (connect and major_version read it)."""
        if self._version is None:
            answer = self._request("get", "version")
            if not isinstance(answer, dict):
                raise TypeError(f"the version answer is a {type(answer).__name__}")
            self._version = answer
        return self._version

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        if self._ticket is not None:
            self._ticket._login_session.close()
        self._api = self._session = self._ticket = None
        self._version = None

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        path = urlsplit(response.request.url or "").path
        self.requests.append(f"{response.request.method} {path.removeprefix('/api2/json')}")

    # -- requests and errors --------------------------------------------------------------

    def _request(self, method: str, path: str, /, vm: str | None = None, **params: Any) -> Any:
        """One API call (``path`` relative to /api2/json); errors become snapcoord errors."""
        try:
            return self._send(method, path, vm, params)
        except ResourceException as exc:
            raise self._api_error(exc, method, path, vm) from None

    def _send(self, method: str, path: str, vm: str | None, params: Mapping[str, Any]) -> Any:
        """:meth:`_request` that leaves the API's own error (:class:`ResourceException`) to the
        caller, for callers that tell its answers apart (adapters/proxmox_agent.py)."""
        self.connect()
        for attempt in (1, 2):
            try:
                return getattr(self._api(path), method)(**params)
            except ResourceException as exc:
                if exc.status_code == 401 and self._ticket is not None and attempt == 1:
                    log.info("ticket for %s refused (expired?): logging in again", self.where)
                    self._relogin()
                    continue
                raise
            except requests.RequestException as exc:
                raise self._network_error(exc, vm) from None
        raise AssertionError("unreachable")

    def _relogin(self) -> None:
        assert self._ticket is not None
        try:
            self._ticket.login()
        except _LoginRefused:
            raise HypervisorError(
                f"login to {self.where} as {self._ticket.username} failed",
                hint="check user and password",
            ) from None
        except requests.RequestException as exc:
            raise self._network_error(exc) from None

    def _api_error(
        self, exc: ResourceException, method: str, path: str, vm: str | None
    ) -> HypervisorError:
        status, reason = exc.status_code, _one_line(str(exc.content or ""))
        if status == 401:
            what = "token_id/token_secret" if self._ticket is None else "user/password"
            return HypervisorError(
                f"authentication to {self.where} failed ({reason or 'HTTP 401'})",
                vm=vm,
                hint=f"check {what}",
            )
        if status == 403:
            return HypervisorError(
                f"permission denied on {self.where}: {reason}",
                vm=vm,
                hint="the user or token needs VM.Audit, VM.Snapshot (and VM.PowerMgmt to start)",
            )
        if status == 500 and "Configuration file" in reason and "does not exist" in reason:
            return VMNotFound(
                f"guest is not where the cluster said: {reason}",
                vm=vm,
                hint="it may have been migrated meanwhile; run again",
            )
        detail = reason
        if exc.errors:
            detail = f"{reason}: " + "; ".join(
                _one_line(f"{k}: {v}") for k, v in exc.errors.items()
            )
        return HypervisorError(
            f"{method.upper()} /{path} on {self.where} failed (HTTP {status}): {detail}", vm=vm
        )

    def _network_error(
        self, exc: requests.RequestException, vm: str | None = None
    ) -> HypervisorError:
        if isinstance(exc, requests.exceptions.SSLError) and not _handshake_cut(exc):
            hint = "set ca_file (the cluster CA: /etc/pve/pve-root-ca.pem) or thumbprint"
            if self.settings.thumbprint:
                hint = (
                    "the certificate is not the pinned thumbprint: renewed, or someone between "
                    "(check https_proxy); nothing was sent"
                )
            return HypervisorError(
                f"TLS certificate of {self.where} not accepted: {_short(exc)}", vm=vm, hint=hint
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return ApiUnreachable(f"{self.where} did not answer within {HTTP_TIMEOUT:g} s", vm=vm)
        return ApiUnreachable(f"cannot reach {self.where}: {_short(exc)}", vm=vm)

    # -- guests ---------------------------------------------------------------------------

    @_checked_answers
    def find_vm(self, ref: str) -> VM:
        resources = self._request("get", "cluster/resources", vm=ref, type="vm")
        guests = [r for r in resources if r.get("type") in ("qemu", "lxc")]
        by_id = ref.isdigit()
        if by_id:
            matches = [r for r in guests if str(r.get("vmid")) == ref]
        else:
            matches = [r for r in guests if r.get("name") == ref]
        if not matches:
            what = f"vmid {ref}" if by_id else f"name {ref!r}"
            raise VMNotFound(
                f"no qemu VM or lxc container with {what} on {self.where}",
                vm=ref,
                hint="check the name (or set vmid) and that the user may see it (VM.Audit)",
            )
        if len(matches) > 1:
            ids = ", ".join(f"{r['vmid']} on {r.get('node')}" for r in matches)
            raise HypervisorError(
                f"{len(matches)} guests are named {ref!r} (vmids {ids})",
                vm=ref,
                hint="set vmid = <id> instead of name for this VM",
            )
        found = matches[0]
        vmid = int(found["vmid"])
        return VM(
            name=str(found.get("name") or ref),
            id=str(vmid),
            hypervisor=self.name,
            extra={"node": str(found["node"]), "type": str(found["type"]), "vmid": vmid},
        )

    @staticmethod
    def _base(vm: VM) -> str:
        return f"nodes/{vm.extra['node']}/{vm.extra['type']}/{vm.extra['vmid']}"

    @_checked_answers
    def power_state(self, vm: VM) -> PowerState:
        status = self._request("get", f"{self._base(vm)}/status/current", vm=vm.name)
        if status.get("status") == "running":
            if status.get("qmpstatus") in ("paused", "prelaunch"):
                return PowerState.PAUSED
            if status.get("qmpstatus") == "suspended":
                return PowerState.SUSPENDED
            return PowerState.RUNNING
        if status.get("status") == "stopped":
            return PowerState.STOPPED
        return PowerState.UNKNOWN

    def capabilities(self) -> Capabilities:
        return Capabilities(
            memory=True,
            quiesce=True,
            disk_only=True,
            extra={
                "memory": "qemu VMs only (vmstate); containers have no RAM state",
                "quiesce": "qemu: guest agent enabled and running, no vmstate; "
                "lxc: PVE always freezes a running container",
            },
        )

    @_checked_answers
    def check_snapshot_ready(self, vm: VM, *, memory: bool, quiesce: bool) -> None:
        """Preflight, before anything is stopped: RAM state and quiesce possible, and no other
        task holding the guest (a lock met later would stretch the service window)."""
        vmid, kind = vm.extra["vmid"], vm.extra["type"]
        if kind == "lxc" and memory:
            raise UnsupportedOperation(
                "containers have no RAM state to save", vm=vm.name, hint="set memory = false"
            )
        if kind == "qemu" and quiesce and memory:
            raise UnsupportedOperation(
                "Proxmox VE freezes file systems only for snapshots without RAM state",
                vm=vm.name,
                hint="set either memory = true or quiesce = true, not both",
            )
        config = self._wait_unlocked(vm)
        if kind == "lxc" or not quiesce:
            return  # PVE freezes and syncs a running container for every snapshot itself
        if not _agent_enabled(config.get("agent")):
            raise UnsupportedOperation(
                f"quiesce needs the QEMU guest agent, which is not enabled for VM {vmid}",
                vm=vm.name,
                hint=f"qm set {vmid} --agent enabled=1, install qemu-guest-agent in the guest "
                "and restart the VM; or set quiesce = false",
            )
        try:
            self._request("post", f"{self._base(vm)}/agent/ping", vm=vm.name)
        except HypervisorError as exc:
            if VM_NOT_RUNNING_RE.match(exc.message.rpartition(": ")[2]):
                return  # a stopped VM's disks are consistent: nothing to freeze
            raise UnsupportedOperation(
                f"quiesce needs the QEMU guest agent, which does not answer ({exc.message})",
                vm=vm.name,
                hint="start qemu-guest-agent in the guest, or set quiesce = false",
            ) from None

    @_checked_answers
    def check_snapshot_support(self, vm: VM) -> None:
        vmid, kind = vm.extra["vmid"], vm.extra["type"]
        word, tool = ("VM", "qm") if kind == "qemu" else ("CT", "pct")
        config: dict[str, Any] = self._request("get", f"{self._base(vm)}/config", vm=vm.name)
        if str(config.get("template", 0)) == "1":
            raise UnsupportedOperation(
                f"{word} {vmid} is a template: Proxmox VE takes no snapshot of a template",
                vm=vm.name,
                hint="point [vms.X] vmid at the guest itself, not at its template",
            )
        lock = config.get("lock")
        if lock:
            raise HypervisorError(
                f"{word} {vmid} is locked ({_said(lock)}): a run now would wait up to "
                f"lock_wait_seconds ({self.lock_wait:g} s) for it",
                vm=vm.name,
                hint=f"another task (backup, snapshot, migration) holds it; if it is stale: "
                f"{tool} unlock {vmid}",
            )
        feature = self._request("get", f"{self._base(vm)}/feature", vm=vm.name, feature="snapshot")
        has = feature["hasFeature"]
        if has not in (True, False, 0, 1, "0", "1"):
            raise ValueError(f"hasFeature is {has!r}")
        if str(int(has)) != "1":
            raise UnsupportedOperation(
                f"a disk of {word} {vmid} is on storage that cannot take snapshots",
                vm=vm.name,
                hint="move its disks to storage with snapshots (qcow2 on a directory or NFS, "
                "LVM-thin, ZFS, Ceph RBD)",
            )

    @_checked_answers
    def missing_privileges(self, vm: VM, operations: Sequence[str]) -> list[str]:
        path = f"/vms/{vm.extra['vmid']}"
        answer = self._request("get", "access/permissions", vm=vm.name, path=path)
        if not isinstance(answer, dict):
            raise TypeError(f"permissions are a {type(answer).__name__}")
        held = answer.get(path, {})
        if not isinstance(held, dict) or not all(isinstance(k, str) for k in held):
            raise TypeError(f"the privileges on {path} are not a map of names")
        major = self.major_version()
        wanted = proxmox_privileges(
            [op for op in operations if op not in ("quiesce", "guest-agent")],
            agent="quiesce" in operations,
            pve_major=major,
        )
        if "guest-agent" in operations:
            wanted = tuple(sorted({*wanted, *proxmox_agent_transport_privileges(major)}))
        return [priv for priv in wanted if priv not in held]

    def guest_agent(self, vm: VM) -> AgentLink:
        """The VM's QEMU guest agent through ``nodes/{node}/qemu/{vmid}/agent/*``
        (adapters/proxmox_agent.py); containers have none."""
        from snapcoord.adapters.proxmox_agent import guest_agent_link

        return guest_agent_link(self, vm)

    @_checked_answers
    def major_version(self) -> int:
        """The Proxmox VE major version (``GET /version``: ``release`` is ``x.y``): the guest
        agent's privileges changed between 8 and 9."""
        release = self._version_answer()["release"]
        if not isinstance(release, str) or not re.fullmatch(r"\d{1,3}\.\d{1,3}", release):
            raise ValueError(f"release is {release!r}")
        return int(release.split(".")[0])

    @_checked_answers
    def check_backup_freeze(self, vm: VM) -> None:
        kind, vmid = vm.extra["type"], vm.id
        if kind != "qemu":
            raise UnsupportedOperation(
                "containers have no guest agent: vzdump snapshots them between pre-stop and "
                "pre-restart, which the hook's freeze and thaw bracket",
                vm=vm.name,
            )
        config: dict[str, Any] = self._request("get", f"{self._base(vm)}/config", vm=vm.name)
        agent = config.get("agent")
        if not _backup_freezes(agent):
            off = "not enabled" if not _agent_enabled(agent) else "set not to freeze on backup"
            raise UnsupportedOperation(
                f"VM {vmid}'s guest agent is {off} (agent: {agent or 'unset'}): vzdump would "
                "take the backup without the freeze that snapcoord's hook stops the services at",
                vm=vm.name,
                hint=f"qm set {vmid} --agent enabled=1,freeze-fs-on-backup=1 and restart the VM",
            )
        try:
            self._request("post", f"{self._base(vm)}/agent/ping", vm=vm.name)
        except HypervisorError as exc:
            raise UnsupportedOperation(
                f"the guest agent does not answer ({exc.message}): vzdump's freeze would fail",
                vm=vm.name,
                hint="start qemu-guest-agent in the guest",
            ) from None

    @_checked_answers
    def thaw_filesystems(self, vm: VM, *, wait: float = 0.0) -> bool:
        if vm.extra["type"] != "qemu":
            return False
        base = self._base(vm)
        config = self._request("get", f"{base}/config", vm=vm.name)
        if not _agent_enabled(config.get("agent") if isinstance(config, dict) else None):
            return False  # no agent: nothing could have frozen the guest
        deadline = time.monotonic() + wait
        while True:
            try:
                status = self._request("post", f"{base}/agent/fsfreeze-status", vm=vm.name)
                break
            except HypervisorError as exc:
                if not AGENT_NOT_YET_RE.search(exc.message):  # refused, or no agent at all
                    return False
                if time.monotonic() >= deadline:  # it does not answer (yet, after a revert)
                    log.info("%s: file systems not thawed: %s", vm.name, exc.message)
                    return False
                time.sleep(THAW_POLL_SECONDS)
        result = status.get("result") if isinstance(status, dict) else status
        if result != "frozen":
            return False
        self._request("post", f"{base}/agent/fsfreeze-thaw", vm=vm.name)
        return True

    def _wait_unlocked(self, vm: VM) -> dict[str, Any]:
        """The guest config, once no ``lock`` is set (waiting up to lock_wait_seconds)."""
        seen: dict[str, str] = {}

        def check() -> dict[str, Any] | None:
            config: dict[str, Any] = self._request("get", f"{self._base(vm)}/config", vm=vm.name)
            lock = config.get("lock")
            if not lock:
                return config
            if not seen:
                log.info("%s: guest is locked (%s); waiting", vm.name, _said(lock))
            seen["lock"] = _said(lock)
            return None

        try:
            return poll_until(
                check,
                timeout=self.lock_wait,
                what="waiting for the guest lock",
                vm=vm.name,
                first_interval=0.25,
                max_interval=2.0,
            )
        except TaskTimeout:
            tool = "qm" if vm.extra["type"] == "qemu" else "pct"
            word = "VM" if vm.extra["type"] == "qemu" else "CT"
            raise HypervisorError(
                f"{word} is locked ({seen.get('lock')}) for more than {self.lock_wait:g} s",
                vm=vm.name,
                hint="another task (backup, snapshot, migration) holds the guest; if the lock "
                f"is stale: {tool} unlock {vm.extra['vmid']}",
            ) from None

    # -- snapshots ------------------------------------------------------------------------

    def _check_name(self, vm: VM, name: str) -> None:
        if not SNAPNAME_RE.fullmatch(name):
            raise UsageError(
                f"snapshot name {name!r} is not valid on Proxmox VE "
                "(2-40 characters: a letter, then letters, digits, '-' or '_')",
                vm=vm.name,
            )
        reserved = ("current", "vzdump") if vm.extra["type"] == "lxc" else ("current",)
        if name in reserved or (vm.extra["type"] == "qemu" and name.lower() == "pending"):
            kind = "containers" if vm.extra["type"] == "lxc" else "VMs"
            raise UsageError(f"snapshot name {name!r} is reserved on Proxmox VE {kind}", vm=vm.name)

    @_checked_answers
    def list_snapshots(self, vm: VM) -> list[Snapshot]:
        items = self._request("get", f"{self._base(vm)}/snapshot", vm=vm.name)
        current: dict[str, Any] = next((i for i in items if i.get("name") == "current"), {})
        parents = {i["name"]: i.get("parent") for i in items if i.get("name") != "current"}

        def depth(name: str) -> int:
            seen: set[str] = set()
            while name in parents and name not in seen:
                seen.add(name)
                name = parents[name] or ""
            return len(seen)

        snapshots = []
        for item in items:
            name = item.get("name")
            if name == "current" or not name:
                continue
            parent = item.get("parent") or None
            if not isinstance(name, str) or not (parent is None or isinstance(parent, str)):
                raise TypeError(f"snapshot name or parent is not text: {name!r}, {parent!r}")
            snaptime = int(item.get("snaptime") or 0)
            extra: dict[str, Any] = {"vmid": vm.extra["vmid"]}
            if item.get("snapstate"):
                extra["snapstate"] = item["snapstate"]
            snapshots.append(
                Snapshot(
                    name=name,
                    id=name,
                    created=datetime.fromtimestamp(snaptime, UTC) if snaptime else None,
                    description=str(item.get("description") or ""),
                    parent=parent,
                    memory=bool(item.get("vmstate")),
                    current=name == current.get("parent"),
                    extra=extra,
                )
            )
        snapshots.sort(key=lambda s: (s.created or datetime.min.replace(tzinfo=UTC), depth(s.id)))
        return snapshots

    @_checked_answers
    def create_snapshot(
        self,
        vm: VM,
        name: str,
        description: str,
        *,
        memory: bool,
        quiesce: bool,
        timeout: float,
    ) -> Snapshot:
        self._check_name(vm, name)
        if memory and vm.extra["type"] == "lxc":
            raise UnsupportedOperation(
                "containers have no RAM state to save", vm=vm.name, hint="set memory = false"
            )
        params: dict[str, Any] = {"snapname": name, "description": description}
        if memory:
            params["vmstate"] = 1
        status = self._run_task(
            vm, "post", f"{self._base(vm)}/snapshot", f"snapshot {name!r}", timeout, params
        )
        # No extra list call inside the service window: the task's start is the snapshot time.
        return Snapshot(
            name=name,
            id=name,
            created=datetime.fromtimestamp(int(status["starttime"]), UTC),
            description=description,
            memory=memory,
            quiesced=quiesce,
            current=True,
            extra={"vmid": vm.extra["vmid"], "upid": status.get("upid")},
        )

    @_checked_answers
    def revert_snapshot(
        self, vm: VM, snapshot: Snapshot, *, start: bool | None, timeout: float
    ) -> None:
        self._check_name(vm, snapshot.name)
        if start is None:  # keep the power state the guest had before the revert
            start = self.power_state(vm) is PowerState.RUNNING
        params: dict[str, Any] = {"start": 1} if start else {}
        path = f"{self._base(vm)}/snapshot/{snapshot.name}/rollback"
        self._run_task(vm, "post", path, f"rollback to {snapshot.name!r}", timeout, params)

    @_checked_answers
    def delete_snapshot(self, vm: VM, snapshot: Snapshot, *, timeout: float) -> None:
        self._check_name(vm, snapshot.name)
        path = f"{self._base(vm)}/snapshot/{snapshot.name}"
        self._run_task(vm, "delete", path, f"deleting snapshot {snapshot.name!r}", timeout, {})

    # -- tasks ------------------------------------------------------------------------------

    def _run_task(
        self, vm: VM, method: str, path: str, what: str, timeout: float, params: dict[str, Any]
    ) -> dict[str, Any]:
        """Start a task and wait for it; retry while the guest is locked, then say by what."""

        def attempt() -> dict[str, Any]:
            upid = self._request(method, path, vm=vm.name, **params)
            status = self._wait(vm, str(upid), what, timeout)
            exitstatus = _one_line(str(status.get("exitstatus", "")))
            if TASK_OK_RE.match(exitstatus):
                if exitstatus != "OK":
                    log.warning("%s: %s finished with %s", vm.name, what, exitstatus)
                return status
            if LOCKED_RE.match(exitstatus):
                log.info("%s: %s: %s; waiting", vm.name, what, exitstatus)
                raise _GuestLocked(exitstatus)
            if EXISTS_RE.match(exitstatus):
                raise SnapshotExists(f"{what} failed: {exitstatus}", vm=vm.name)
            if MISSING_RE.match(exitstatus):
                raise SnapshotNotFound(f"{what} failed: {exitstatus}", vm=vm.name)
            raise HypervisorError(f"{what} failed: {exitstatus}", vm=vm.name)

        retrying = Retrying(
            stop=stop_after_delay(self.lock_wait),
            wait=wait_exponential(multiplier=0.25, max=1),
            retry=retry_if_exception_type(_GuestLocked),
            reraise=True,
        )
        try:
            result: dict[str, Any] = retrying(attempt)
        except _GuestLocked as exc:
            tool = "qm" if vm.extra["type"] == "qemu" else "pct"
            raise HypervisorError(
                f"{what} failed: {exc.text}, still after waiting {self.lock_wait:g} s",
                vm=vm.name,
                hint="another task (backup, snapshot, migration) holds the guest; if the lock "
                f"is stale: {tool} unlock {vm.extra['vmid']}",
            ) from None
        return result

    def _wait(self, vm: VM, upid: str, what: str, timeout: float) -> dict[str, Any]:
        node = upid.split(":")[1] if upid.startswith("UPID:") else vm.extra["node"]
        path = f"nodes/{node}/tasks/{upid}/status"

        def check() -> dict[str, Any] | None:
            status: dict[str, Any] = self._request("get", path, vm=vm.name)
            return status if status.get("status") == "stopped" else None

        cancel.sleep(FIRST_POLL)
        return poll_until(
            check,
            timeout=max(timeout - FIRST_POLL, 0.0),
            what=f"{what} (task {upid})",
            vm=vm.name,
            first_interval=POLL_INTERVAL,
            max_interval=MAX_POLL_INTERVAL,
        )


def _handshake_cut(exc: BaseException) -> bool:
    """Whether a TLS error is the connection ending during the handshake (EOF, reset: the API
    went away, as when pveproxy restarts), not a certificate that was refused. Nothing was sent:
    the next connection verifies the certificate again."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        item = pending.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return False
        if isinstance(item, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
            return True
        pending += [*item.args, getattr(item, "reason", None), item.__cause__, item.__context__]
    return False


_WORD_RE = re.compile(r"[\w.-]{1,64}")


def _said(value: object) -> str:
    """A value of an API answer inside a message: as it is when it is a plain word (a lock's
    name: backup, snapshot), else escaped and quoted, so that no answer breaks the line."""
    text = str(value)
    return text if _WORD_RE.fullmatch(text) else ascii(text[:64])


def _one_line(text: str) -> str:
    """Free text of an answer (a task's exit status, an error's reason) on one line."""
    return clip(" ".join(text.split()), 300)


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, one line, without the URL noise."""
    text = str(exc)
    for marker in ("SSLError(", "NewConnectionError(", "ConnectTimeoutError("):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = re.sub(r"<[^>]*>:?\s*", "", text).strip(" ()'\"")
    return clip(text.splitlines()[0], 200) if text else type(exc).__name__

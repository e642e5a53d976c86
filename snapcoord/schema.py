"""The one configuration schema: validation (config.py) and the sample config (`config example`)
are both generated from it, so they cannot drift apart."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REQUIRED = object()

# Every name pattern is used with fullmatch: "$" also matches before a trailing newline, so
# "cron\n" would pass as a name. A value that reaches a command line as an argument never starts
# with '-' (the program would take it for an option) nor '.' ('.' and '..' are paths).
SERVICE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9@._-]{0,254}")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,12}")
TABLE_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: a host name, an IPv4 address or a Host alias of ssh_config
HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
#: an IPv6 literal, with or without a zone (fe80::1%eth0); ipaddress decides whether it is one
IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?")
#: a login name, also with a domain (user@example.org) as sssd/winbind spell them
USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
#: a MySQL database name snapcoord passes to mysqldump --databases: letters and digits of any
#: script (``dé``), never a leading '-' (:func:`database_name_ok` also keeps it in the BMP)
DATABASE_RE = re.compile(r"[\w$][\w$.@-]{0,63}")

# Upper bound of every duration: far above any real wait, far below what the time APIs overflow
# on (threading and select refuse timeouts beyond about 2**33 s; timedelta beyond 10**9 days).
MAX_SECONDS = 366 * 24 * 3600


@dataclass(frozen=True)
class Key:
    """One configuration key.

    ``kind``: str, int, float, bool, secret, strlist, argv, choice or count (an integer
    within ``minimum``-``maximum``, or "auto").
    """

    kind: str
    doc: str
    default: Any = None
    example: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], str | None] | None = None


_SERVICE_RULE = (
    "use letters, digits, '@', '.', '_' or '-', starting with a letter, digit or '_' (at most 255)"
)


def _service_name(value: Any) -> str | None:
    if not SERVICE_RE.fullmatch(value):
        return f"must be a service name: {_SERVICE_RULE}"
    return None


def _services(value: list[str]) -> str | None:
    for item in value:
        if not SERVICE_RE.fullmatch(item):
            return f"service name {item!r}: {_SERVICE_RULE}"
    return None


def _host(value: str) -> str | None:
    if HOST_RE.fullmatch(value):
        return None
    if IPV6_RE.fullmatch(value) and ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            pass
        else:
            return None
    return (
        "must be a host name, an IP address or a Host alias of ssh_config: letters, digits, "
        "'.', '_' or '-', starting with a letter, digit or '_' (or an IPv6 address)"
    )


def _user(value: str) -> str | None:
    if not USER_RE.fullmatch(value):
        return (
            "must be a user name: letters, digits, '_', '.', '@' or '-', starting with a letter, "
            "digit or '_' (at most 64)"
        )
    return None


def _argument(value: str) -> str | None:
    """A value passed on as one argument: never an option, one printable line."""
    if value.startswith("-"):
        return "must not start with '-'"
    if not value.isprintable():
        return "must not contain line breaks or other control characters"
    return None


def database_name_ok(name: str) -> bool:
    """A database name snapcoord accepts: :data:`DATABASE_RE`, in the Basic Multilingual Plane
    (MySQL and MariaDB keep identifiers in 3-byte UTF-8: no emoji)."""
    return DATABASE_RE.fullmatch(name) is not None and all(ord(c) <= 0xFFFF for c in name)


def _databases(value: list[str]) -> str | None:
    for item in value:
        if not database_name_ok(item):
            return (
                f"database name {item!r}: use letters, digits, '_', '$', '.', '@' or '-', "
                "starting with a letter, digit, '_' or '$' (at most 64)"
            )
    return None


def _label(value: str) -> str | None:
    if not LABEL_RE.fullmatch(value):
        return "must be 1-13 letters, digits or '_' (it goes into a 40-character snapshot name)"
    return None


def _abs_path(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def _readable_file(value: str) -> str | None:
    """An absolute path to a file snapcoord can read now (checked by ``config check``, so a
    missing CA file or key is one line there, not an error at the first connection)."""
    if not value.startswith("/"):
        return "must be an absolute path"
    if not os.path.isfile(value):
        return f"{value!r}: no such file" if not os.path.exists(value) else f"{value!r}: not a file"
    if not os.access(value, os.R_OK):
        return f"{value!r}: not readable by this user"
    return None


def _abs_paths(value: list[str]) -> str | None:
    for item in value:
        if not item.startswith("/"):
            return f"{item!r} must be an absolute path"
    return None


def _tags(value: list[str]) -> str | None:
    for tag in value:
        if not TABLE_KEY_RE.fullmatch(tag):
            return (
                f"tag {tag!r}: use letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
    return None


def _http_url(value: str) -> str | None:
    if not re.fullmatch(r"https?://[^/\s]+(?:[/?#]\S*)?", value) or not value.isprintable():
        return "must be an http:// or https:// URL without spaces or control characters"
    return None


def _thumbprint(value: str) -> str | None:
    if not re.fullmatch(r"sha256:([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}", value):
        return 'must be "sha256:" followed by 32 hex bytes (colons optional)'
    return None


DEFAULTS: dict[str, Key] = {
    "store": Key(
        "str",
        "off-guest store for dumps, the run journal and locks",
        default="/var/lib/snapcoord",
        check=_abs_path,
    ),
    "label": Key(
        "str",
        "default label in snapshot names snapcoord-<label>-<UTC time>",
        default="manual",
        check=_label,
    ),
    "snapshot_timeout": Key(
        "float",
        "seconds to wait for a hypervisor snapshot task",
        default=600.0,
        minimum=1,
        maximum=MAX_SECONDS,
    ),
}

# Retention (sanoid/borg semantics, docs/retention.md): in [defaults], overridden per VM.
RETENTION: dict[str, Key] = {
    "keep_last": Key(
        "int",
        "keep this many newest snapcoord snapshots per VM and label",
        minimum=0,
        maximum=10000,
    ),
    "keep_hourly": Key(
        "int", "keep the newest snapshot of each of the last N hours", minimum=0, maximum=10000
    ),
    "keep_daily": Key(
        "int", "keep the newest snapshot of each of the last N days", minimum=0, maximum=10000
    ),
    "keep_weekly": Key(
        "int", "keep the newest snapshot of each of the last N ISO weeks", minimum=0, maximum=10000
    ),
    "keep_monthly": Key(
        "int", "keep the newest snapshot of each of the last N months", minimum=0, maximum=10000
    ),
}

DEFAULTS.update(
    {
        "metrics_file": Key(
            "str",
            "Prometheus textfile-collector file, rewritten atomically after every command",
            check=_abs_path,
        ),
        "verify_dir": Key(
            "str",
            "verify: where the throwaway database servers put their files (a private folder per "
            "run, removed after; needs room for the largest restored database)",
            default="/var/tmp",
            check=_abs_path,
        ),
        **RETENTION,
    }
)

# The [notify] table; [vms.X.notify] overrides it key by key (VM_NOTIFY: the same keys, unset).
NOTIFY: dict[str, Key] = {
    "ping_url": Key(
        "str",
        "healthchecks-style URL: /start when a run begins, the URL on success, /fail on failure",
        check=_http_url,
    ),
    "webhook_url": Key(
        "str", "POST the run's JSON summary here when the run ended", check=_http_url
    ),
    "timeout": Key(
        "float",
        "seconds per notification attempt (one retry)",
        default=10.0,
        minimum=0.1,
        maximum=300,
    ),
}
VM_NOTIFY: dict[str, Key] = {
    name: Key(
        key.kind,
        key.doc + " (default: [notify])" if name == "timeout" else key.doc,
        minimum=key.minimum,
        maximum=key.maximum,
        check=key.check,
    )
    for name, key in NOTIFY.items()
}

# Keys every hypervisor table has, then the keys of each type.
HYPERVISOR_COMMON: dict[str, Key] = {
    "type": Key(
        "choice",
        "hypervisor kind",
        default=REQUIRED,
        example="libvirt",
        choices=("libvirt", "vsphere", "proxmox"),
    ),
    "max_parallel": Key(
        "int",
        "at most this many VMs of this hypervisor are worked on at once (snapshot --parallel)",
        default=4,
        minimum=1,
        maximum=1000,
    ),
}

_TLS: dict[str, Key] = {
    "verify_tls": Key(
        "bool", "verify the server certificate (set false only for labs: warned)", default=True
    ),
    "ca_file": Key(
        "str",
        "PEM file of the CA (or the self-signed certificate) to trust",
        check=_readable_file,
    ),
    "thumbprint": Key(
        "str", "pin the server certificate by its SHA-256 fingerprint", check=_thumbprint
    ),
}

HYPERVISOR_TYPES: dict[str, dict[str, Key]] = {
    "libvirt": {
        "uri": Key(
            "str", "libvirt connection URI", default="qemu:///system", example="qemu:///system"
        ),
    },
    "vsphere": {
        "host": Key("str", "vCenter or ESXi host name", default=REQUIRED),
        "port": Key("int", "HTTPS port", default=443, minimum=1, maximum=65535),
        "user": Key("str", "user name", default=REQUIRED),
        "password": Key("secret", "password", default=REQUIRED),
        "datacenter": Key("str", "restrict VM lookups to this datacenter"),
        "folder": Key("str", "restrict VM lookups to this VM folder (inventory path)"),
        "max_snapshots": Key(
            "int", "warn when a VM has more snapshots than this", default=3, minimum=1, maximum=32
        ),
        "max_age_hours": Key(
            "float",
            "warn about snapcoord snapshots older than this",
            default=72.0,
            minimum=1,
            maximum=100 * 366 * 24,  # 100 years: `now - timedelta(hours=...)` stays in range
        ),
        **_TLS,
    },
    "proxmox": {
        "host": Key("str", "Proxmox VE node or cluster address", default=REQUIRED),
        "port": Key("int", "API port", default=8006, minimum=1, maximum=65535),
        "token_id": Key("str", "API token id USER@REALM!TOKENID (recommended)"),
        "token_secret": Key("secret", "API token secret"),
        "user": Key("str", "USER@REALM for ticket login (instead of a token)"),
        "password": Key("secret", "password for ticket login"),
        "lock_wait_seconds": Key(
            "float",
            "wait this long for a guest locked by another task",
            default=120.0,
            minimum=0,
            maximum=MAX_SECONDS,
        ),
        **_TLS,
    },
}

VM: dict[str, Key] = {
    "hypervisor": Key("str", "key of the [hypervisors.X] table", default=REQUIRED, example="lab"),
    "name": Key("str", "name (or vSphere path/uuid:/moref:) on the hypervisor; default: table key"),
    "vmid": Key("int", "Proxmox VMID (instead of name)", minimum=100, maximum=999999999),
    "vzdump_vmid": Key(
        "int",
        "the vzdump hook: the VMID vzdump passes for this VM, when neither vmid nor name give it",
        minimum=100,
        maximum=999999999,
    ),
    "memory": Key("bool", "include RAM state in the snapshot", default=False),
    "quiesce": Key(
        "bool", "ask the hypervisor's guest agent to freeze file systems", default=False
    ),
    "label": Key("str", "label for this VM's snapshots (default: defaults.label)", check=_label),
    "snapshot_timeout": Key(
        "float",
        "seconds to wait for snapshot tasks (default: defaults)",
        minimum=1,
        maximum=MAX_SECONDS,
    ),
    "safety_snapshot": Key(
        "bool", "take a snapshot of the current state before a revert", default=True
    ),
    "tags": Key(
        "strlist", "tags for selecting VMs (--tag)", default=[], example=["prod"], check=_tags
    ),
    **{
        name: Key(key.kind, key.doc + " (default: [defaults])", minimum=0, maximum=10000)
        for name, key in RETENTION.items()
    },
}

GUEST: dict[str, Key] = {
    "transport": Key(
        "choice",
        "how to run commands in the guest: ssh, exec (an argv prefix) or agent (the QEMU guest "
        "agent through the hypervisor: libvirt or Proxmox VE VMs)",
        default="ssh",
        choices=("ssh", "exec", "agent"),
    ),
    "dump_transport": Key(
        "choice",
        "transport = 'agent': where dumps and archives stream: 'agent' (a root-only file in the "
        "guest read back in chunks) or 'ssh' (the guest's sshd, set host)",
        default="agent",
        choices=("agent", "ssh"),
    ),
    "host": Key(
        "str",
        "SSH host (an alias from ~/.ssh/config works)",
        example="db1.example.org",
        check=_host,
    ),
    "port": Key("int", "SSH port (default: ssh_config, then 22)", minimum=1, maximum=65535),
    "user": Key("str", "SSH user (default: ssh_config)", example="backup", check=_user),
    "identity_file": Key("str", "SSH private key", check=_readable_file),
    # may not exist yet: accept_new_host_key records the first key in it
    "known_hosts": Key("str", "known_hosts file to verify the host key against", check=_abs_path),
    "host_key_fingerprint": Key("str", "pin the host key: SHA256:... as ssh-keygen -l shows it"),
    "accept_new_host_key": Key(
        "bool", "first contact: accept and record an unknown host key", default=False
    ),
    "ssh_config": Key(
        "str", "ssh client config file (ssh -F; default: ~/.ssh/config)", check=_readable_file
    ),
    "ssh_options": Key("strlist", "extra ssh -o options, e.g. ['ProxyJump=bastion']", default=[]),
    "exec_prefix": Key(
        "argv", "transport exec: argv prefix, e.g. ['pct','exec','101','--']", default=[]
    ),
    "sudo": Key("bool", "run privileged commands with sudo -n", default=False),
    "services": Key(
        "strlist",
        "stopped first, restarted last (only those that were running)",
        default=["apache2", "cron"],
        check=_services,
    ),
    "parallel_services": Key(
        "bool",
        "stop/start the services concurrently (they must not depend on each other)",
        default=True,
    ),
    "database": Key(
        "str",
        "database service: a name, 'auto' (mariadb or mysql) or 'none'",
        default="auto",
        check=_service_name,
    ),
    "consistency": Key(
        "choice",
        "'stop': stop the services and the database around the snapshot (a clean shutdown); "
        "'pause': keep everything running and hold only commits for the snapshot call "
        "(crash-consistent at a recorded commit point; MySQL/MariaDB only, docs/consistency.md)",
        default="stop",
        choices=("stop", "pause"),
    ),
    "pause_method": Key(
        "choice",
        "how 'pause' holds commits: 'auto' (BACKUP STAGE on MariaDB >= 10.4, else FLUSH TABLES "
        "WITH READ LOCK), 'backup_stage' or 'ftwrl'",
        default="auto",
        choices=("auto", "backup_stage", "ftwrl"),
    ),
    "pause_timeout": Key(
        "float",
        "the longest commits may ever be held in 'pause' mode; the guest ends the lock session "
        "after this even if snapcoord dies or the network goes",
        default=60.0,
        minimum=5,
        maximum=3600,
    ),
    "check_url": Key(
        "str", "HTTP URL that must answer after the web server restarted", check=_http_url
    ),
    "dump": Key(
        "bool",
        "stream a logical dump of the database off the guest before stopping it "
        "(formerly mysqldump)",
        default=False,
    ),
    "watchdog_seconds": Key(
        "int",
        "guest-side watchdog restarts stopped services after this; must be more than the "
        "stops can take (stop_timeout for the services, then for the database)",
        default=600,
        minimum=10,
        maximum=MAX_SECONDS,
    ),
    "freeze_max_seconds": Key(
        "int",
        "freeze and the vzdump hook: the longest the guest stays quiesced when no thaw comes "
        "(freeze --max-seconds overrides it)",
        default=300,
        minimum=10,
        maximum=86400,
    ),
    "freeze_hook_max_seconds": Key(
        "int",
        "the guest-side freeze hook (snapcoord freeze-hook install): the longest the guest stays "
        "quiesced after the guest agent's freeze when no thaw comes; the hook's own watchdog then "
        "restores everything",
        default=300,
        minimum=10,
        maximum=86400,
    ),
    "connect_timeout": Key(
        "float", "seconds to open the connection", default=15.0, minimum=1, maximum=MAX_SECONDS
    ),
    "command_timeout": Key(
        "float", "seconds for a plain guest command", default=60.0, minimum=1, maximum=MAX_SECONDS
    ),
    "stop_timeout": Key(
        "float", "seconds for a service to stop", default=120.0, minimum=1, maximum=MAX_SECONDS
    ),
    "start_timeout": Key(
        "float", "seconds for a service to start", default=120.0, minimum=1, maximum=MAX_SECONDS
    ),
    "dump_timeout": Key(
        "float", "seconds for the logical dump", default=3600.0, minimum=1, maximum=MAX_SECONDS
    ),
}

HOOKS: dict[str, Key] = {
    "before": Key(
        "strlist", "guest shell commands before anything stops (failure: abort)", default=[]
    ),
    "frozen": Key(
        "strlist",
        "guest commands right before the snapshot: after the database stopped, or while its "
        "commits are held (consistency = 'pause')",
        default=[],
    ),
    "after": Key(
        "strlist", "guest commands after everything is back (failure: reported)", default=[]
    ),
    "timeout": Key(
        "float", "seconds for each hook command", default=300.0, minimum=1, maximum=MAX_SECONDS
    ),
}

#: the most mysqldump sessions a parallel dump runs ([vms.X.dump] threads)
MAX_DUMP_THREADS = 8

# The dump program's options when [vms.X.dump] options is not set, per database kind.
DEFAULT_DUMP_OPTIONS: dict[str, tuple[str, ...]] = {
    "mysql": ("--single-transaction", "--routines", "--events", "--triggers", "--hex-blob"),
    "postgresql": (),
}

DUMP: dict[str, Key] = {
    "options": Key(
        "strlist",
        "options of the dump program (default: the database kind's: mysqldump "
        + " ".join(DEFAULT_DUMP_OPTIONS["mysql"])
        + "; pg_dumpall none)",
    ),
    "databases": Key(
        "strlist",
        "MySQL only: dump only these databases (default: --all-databases)",
        default=[],
        check=_databases,
    ),
    "compression": Key(
        "choice",
        "compression of the stored dump: auto (zstd when the guest has the zstd command, else "
        "gzip with a note on the run's line), zstd (the guest must have it), gzip or none",
        default="auto",
        choices=("auto", "zstd", "gzip", "none"),
    ),
    "threads": Key(
        "count",
        "MySQL only: mysqldump sessions that dump tables at once from one consistent view "
        "(docs/dump.md): 1 writes the single-stream file; auto takes the guest's cores (at "
        f"most {MAX_DUMP_THREADS}), and 1 when the databases hold less than 256 MiB (one "
        "stream is as fast there, and the single readable file is kept); more than 1 needs the "
        "dump to stream over SSH",
        default="auto",
        minimum=1,
        maximum=MAX_DUMP_THREADS,
    ),
    "compress_on": Key(
        "choice",
        "where gzip runs: coordinator (measured fastest over SSH, spares the database server's "
        "CPU), guest (less traffic: slow links, the guest agent) or auto (the guest when the "
        "dump crosses the guest agent, else the coordinator); zstd always runs in the guest",
        default="auto",
        choices=("auto", "coordinator", "guest"),
    ),
    "user": Key(
        "str",
        "MySQL: the database user (default: the guest's client config / socket auth); "
        "PostgreSQL: the superuser's OS account pg_dumpall runs as (default: postgres)",
        check=_argument,
    ),
    "password": Key(
        "secret",
        "MySQL only: the user's password (passed to the client as an option file on a pipe, "
        "never in argv or a file)",
    ),
    "on_dump_failure": Key(
        "choice",
        "abort: no snapshot, exit 4; continue: snapshot anyway",
        default="abort",
        choices=("abort", "continue"),
    ),
    "verify": Key(
        "bool",
        "after every dump (once the services run again): restore it into a throwaway database "
        "server on the coordinator and compare every table with what was recorded when it was "
        "taken (snapcoord verify, docs/verify.md)",
        default=False,
    ),
    "verify_timeout": Key(
        "float",
        "seconds for one verify: the throwaway server's start, the load, the comparison; "
        "with --boot, the copy, the boot and the checks",
        default=3600.0,
        minimum=10,
        maximum=MAX_SECONDS,
    ),
}

ARCHIVE: dict[str, Key] = {
    "paths": Key(
        "strlist",
        "guest paths archived as tar.gz into the run folder",
        default=[],
        check=_abs_paths,
    ),
}

VM_SUBTABLES: dict[str, dict[str, Key]] = {
    "guest": GUEST,
    "hooks": HOOKS,
    "dump": DUMP,
    "archive": ARCHIVE,
    "notify": VM_NOTIFY,
}

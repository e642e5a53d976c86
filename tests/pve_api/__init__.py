"""A strict Proxmox VE API double for tests (and for trying the CLI without a cluster).

Importable (``PveApiDouble(...).start()``) or standalone::

    python -m tests.pve_api --listen 127.0.0.1:8006 --tls-cert C --tls-key K \
        --task-seconds 1.5 --token 'root@pam!snapcoord=SECRET' --user root@pam --password P

Every request is validated against data/pve-snapshot-api.json; behaviour follows data/NOTES.md.
"""

from .cluster import ApiError, Cluster, Guest, Snap, Task
from .server import PveApiDouble

__all__ = ["ApiError", "Cluster", "Guest", "PveApiDouble", "Snap", "Task"]

"""The one user-facing error type, its subclasses, and the documented exit codes.

Every error a user can cause or meet is a :class:`SnapcoordError`: the CLI prints its message as
one line and exits with its ``exit_code``. Anything else escaping to the CLI is a bug (exit 1,
traceback). See docs/exit-codes.md.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    BUG = 1
    USAGE = 2  # bad command line or configuration
    HYPERVISOR = 3  # hypervisor unreachable, login failed, VM not found, API error
    PREFLIGHT = 4  # guest or preflight failure: nothing was changed
    SNAPSHOT_FAILED = 5  # the snapshot (or revert/restore) failed; services were restored
    SERVICE_NOT_RESTORED = 6  # a service we stopped could not be started again
    LOCKED = 75  # another run holds the VM's lock (EX_TEMPFAIL)
    INTERRUPTED = 130  # SIGINT/SIGTERM; everything was unwound


class SnapcoordError(Exception):
    """A failure to report to the user as one line, without traceback."""

    exit_code: ExitCode = ExitCode.BUG

    def __init__(self, message: str, *, vm: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.vm = vm
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.vm}: {self.text()}" if self.vm else self.text()

    def text(self) -> str:
        """The message and its hint, without the VM: for a line that names the VM already."""
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def line(self, key: str) -> str:
        """One line that names the VM by its configuration key ``key`` first; when an adapter
        named it as the hypervisor does (a VMID, a VM name), that name follows in brackets, to
        find it in the hypervisor's task log: ``shopdb (hypervisor VM 100): cannot reach``."""
        if self.vm and self.vm != key:
            return f"{key} (hypervisor VM {self.vm}): {self.text()}"
        return f"{key}: {self.text()}"


class UsageError(SnapcoordError):
    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """Configuration problems; ``problems`` holds every one of them, each with its key path."""

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))


class HypervisorError(SnapcoordError):
    exit_code = ExitCode.HYPERVISOR


class VMNotFound(HypervisorError):
    pass


class SnapshotNotFound(HypervisorError):
    pass


class SnapshotExists(HypervisorError):
    pass


class UnsupportedOperation(HypervisorError):
    """The hypervisor cannot do what was asked (e.g. quiesce without a guest agent)."""


class TaskTimeout(HypervisorError):
    pass


class MissingDependency(UsageError):
    """An optional SDK is not installed; the message names the extra to install."""


class PreflightError(SnapcoordError):
    exit_code = ExitCode.PREFLIGHT


class GuestError(PreflightError):
    """A guest command failed (transport, sudo, a hook)."""


class SnapshotFailed(SnapcoordError):
    exit_code = ExitCode.SNAPSHOT_FAILED


class VerifyFailed(SnapshotFailed):
    """``verify``: the dump does not load, fails the database's own check, or its tables differ
    from what was recorded when it was taken (docs/verify.md)."""


class VerifyUnavailable(PreflightError):
    """``verify`` could not run on this coordinator (server binaries missing, out of disk in the
    verify folder, the throwaway server would not start): the dump was not judged."""


class ServiceNotRestored(SnapcoordError):
    exit_code = ExitCode.SERVICE_NOT_RESTORED


class Locked(SnapcoordError):
    exit_code = ExitCode.LOCKED


class Interrupted(SnapcoordError):
    exit_code = ExitCode.INTERRUPTED

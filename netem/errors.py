"""Typed errors of the netem package: every failure names the operation and, where the kernel
gave one, the errno. Raised by the applier and the state records; never logged and ignored.
"""

from __future__ import annotations

from errno import errorcode

from dualpath.errors import EXIT_USAGE, DualPathError


class NetemError(DualPathError):
    """A netem operation failed. `operation` says what was being done, `errno` why (or None)."""

    context = "network setup failed: "

    def __init__(self, message: str, *, operation: str = "", errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation
        self.errno = errno

    def __str__(self) -> str:
        parts = [self.message]
        if self.operation and self.operation not in self.message:
            parts.append(f"operation: {self.operation}")
        if self.errno is not None:
            parts.append(f"errno {self.errno} ({errorcode.get(self.errno, '?')})")
        return "; ".join(parts)


class NetemPermissionError(NetemError):
    """The netns backend needs root or CAP_NET_ADMIN."""

    exit_status = EXIT_USAGE
    context = ""

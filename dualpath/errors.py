"""One base class for the errors the lab raises on purpose, each carrying the exit status a
command ends with when the error reaches it, and the one function that turns such an error into
a line for the user and that status (`dualpath` and the compose driver both end through it).

Exit statuses: 0 ok, 1 the run or the step failed, 2 bad input (a config, a scenario, a file, a
missing privilege the user can grant), 3 a run was host-bound (the machine's CPU shaped its
figures), 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import ClassVar, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HOST_BOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_STATUS_HELP = (
    "exit status: 0 ok, 1 the run failed, 2 bad input, 3 a run was host-bound (this machine's "
    "CPU shaped its figures; --allow-host-bound accepts it), 130 interrupted"
)


class DualPathError(Exception):
    """An error the lab raises on purpose: its message names the problem for the user."""

    exit_status: ClassVar[int] = EXIT_FAILED
    """What a command exits with when this error ends it."""
    context: ClassVar[str] = ""
    """Put before the message for the user (e.g. "network setup failed: ")."""


class UsageError(DualPathError):
    """Bad input the user can fix: a config, a scenario, a file, a missing privilege."""

    exit_status = EXIT_USAGE


def describe(exc: DualPathError) -> str:
    """`exc` as the user sees it: one `error:` line."""
    return f"error: {exc.context}{exc}"


def report(exc: DualPathError, stream: TextIO | None = None) -> int:
    """Print `exc` as the user sees it and return the exit status it carries."""
    print(describe(exc), file=stream or sys.stderr)
    return exc.exit_status

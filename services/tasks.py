"""Small shared pieces of the node shells: the tasks a process owns and its recent errors.

A shell spawns tasks that must all end with it (`TaskSet`), and counts and keeps its last
errors for its reports and logs (`ErrorLog`). No policy here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

KEEP_ERRORS = 50


class TaskSet:
    """Tasks that live as long as their owner: `cancel_all()` ends and awaits every one."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ErrorLog:
    """Counts errors, keeps the last KEEP_ERRORS and logs each one.

    A transient error — a lost or unreachable peer, a timeout: what an injected fault causes
    and a retry gets past — is kept apart from the rest (corruption, bad input, bugs), so a
    run can tell the consequences of its own faults from failures."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self.count = 0
        self.recent: list[str] = []
        self.transient = 0
        self.recent_transient: list[str] = []

    def record(self, msg: str, *, transient: bool = False) -> None:
        if transient:
            self.transient += 1
            self.recent_transient.append(msg)
            del self.recent_transient[:-KEEP_ERRORS]
            self._log(f"error (peer lost or timed out): {msg}")
            return
        self.count += 1
        self.recent.append(msg)
        del self.recent[:-KEEP_ERRORS]
        self._log(f"error: {msg}")

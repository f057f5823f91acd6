"""The policy protocol every scheduling policy implements; the policies themselves live in
`dualpath_policy`, and `registry` is the one place that names them.

`schedule()` takes frozen views and returns a frozen plan; it never mutates its inputs and
does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from scheduler.views import NodeView, PendingTurn, SchedulePlan


class SchedulingPolicy(Protocol):
    @property
    def name(self) -> str: ...

    def schedule(
        self,
        queue: Sequence[PendingTurn],
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        now: float,
    ) -> SchedulePlan: ...

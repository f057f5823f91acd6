"""The policy protocol, and the policies selected by the system mode (basic, dualpath, oracle).

Each mode is least-tokens engine selection with its read-side rule; the paper's selection
lives in `dualpath_policy`. `schedule()` takes frozen views and returns a frozen plan; it never
mutates its inputs and does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from scheduler.views import NodeView, PendingTurn, SchedulePlan


class UnknownPolicyError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")


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


POLICIES: dict[str, str] = {"basic": "prefill", "dualpath": "shorter_queue", "oracle": "none"}


def make_policy(name: str, *, beta_tokens: int) -> SchedulingPolicy:
    """Look a policy up by name; unknown names raise UnknownPolicyError listing valid ones."""
    # Imported here: dualpath_policy builds on this module's protocol and error.
    from scheduler.dualpath_policy import LeastTokensBaseline

    rule = POLICIES.get(name)
    if rule is None:
        raise UnknownPolicyError(name)
    return LeastTokensBaseline(beta_tokens=beta_tokens, read_rule=rule)  # type: ignore[arg-type]

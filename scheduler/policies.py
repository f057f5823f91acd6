"""Selection policies by name: which prefill engine, decode engine and read side per turn.

This version uses simple least-tokens rules (the paper-exact Algorithm 1 and two-level DE
selection replace them later). `schedule()` takes frozen views and returns a frozen plan; it
never mutates its inputs and does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from scheduler.views import Assignment, EngineView, NodeView, PendingTurn, ReadSide, SchedulePlan


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


@dataclass
class _Load:
    """Mutable working copy of the views for one scheduling round."""

    tok: dict[tuple[str, int], int]
    seq: dict[tuple[str, int], int]
    free: dict[tuple[str, int], int]
    read_q: dict[str, int]

    @classmethod
    def of(cls, nodes: Sequence[NodeView]) -> _Load:
        tok: dict[tuple[str, int], int] = {}
        seq: dict[tuple[str, int], int] = {}
        free: dict[tuple[str, int], int] = {}
        for n in nodes:
            for e in n.engines:
                tok[(n.node_id, e.engine)] = e.tok
                seq[(n.node_id, e.engine)] = e.seq
                free[(n.node_id, e.engine)] = e.free_kv_tokens
        return cls(tok, seq, free, {n.node_id: n.read_q_tokens for n in nodes})


def _engines(nodes: Sequence[NodeView]) -> list[EngineView]:
    return [e for n in nodes for e in n.engines]


@dataclass(frozen=True)
class LeastTokensPolicy:
    """PE: fewest tokens among engines with tok <= beta; DE: fewest tokens with room.

    `read_side_rule`: "prefill" always reads on the prefill node (the paper's Basic);
    "shorter_queue" reads on whichever of the two nodes has the shorter read queue
    (DualPath §6), counting tokens assigned earlier in this round; "none" skips reads (Oracle).
    """

    name: str
    read_side_rule: str
    beta_tokens: int

    def schedule(
        self,
        queue: Sequence[PendingTurn],
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        now: float,
    ) -> SchedulePlan:
        del now
        load = _Load.of([*prefill, *decode])
        pes = _engines(prefill)
        des = _engines(decode)
        out: list[Assignment] = []
        for turn in queue:  # FIFO: stop at the first turn that cannot be placed
            pe_cands = [e for e in pes if load.tok[(e.node_id, e.engine)] <= self.beta_tokens]
            de_cands = [e for e in des if load.free[(e.node_id, e.engine)] >= turn.kv_tokens]
            if not pe_cands or not de_cands:
                break
            pe = min(pe_cands, key=lambda e: (load.tok[(e.node_id, e.engine)], e.node_id, e.engine))
            de = min(de_cands, key=lambda e: (load.tok[(e.node_id, e.engine)], e.node_id, e.engine))
            side = self._read_side(turn, pe.node_id, de.node_id, load)
            pk, dk = (pe.node_id, pe.engine), (de.node_id, de.engine)
            load.tok[pk] += turn.prompt_tokens
            load.seq[pk] += 1
            load.tok[dk] += turn.kv_tokens
            load.seq[dk] += 1
            load.free[dk] -= turn.kv_tokens
            if side is ReadSide.PREFILL:
                load.read_q[pe.node_id] += turn.hit_tokens
            elif side is ReadSide.DECODE:
                load.read_q[de.node_id] += turn.hit_tokens
            out.append(Assignment(turn.turn_id, pe.node_id, pe.engine, de.node_id, de.engine, side))
        return SchedulePlan(tuple(out))

    def _read_side(self, turn: PendingTurn, pe_node: str, de_node: str, load: _Load) -> ReadSide:
        if self.read_side_rule == "none":
            return ReadSide.NONE
        if turn.hit_tokens == 0 or self.read_side_rule == "prefill":
            return ReadSide.PREFILL
        # DualPath §6: the whole request reads on the side with the shorter disk-read queue.
        if load.read_q[de_node] < load.read_q[pe_node]:
            return ReadSide.DECODE
        return ReadSide.PREFILL

    def with_beta(self, beta_tokens: int) -> LeastTokensPolicy:
        return replace(self, beta_tokens=beta_tokens)


POLICIES: dict[str, str] = {"basic": "prefill", "dualpath": "shorter_queue", "oracle": "none"}


def make_policy(name: str, *, beta_tokens: int) -> SchedulingPolicy:
    """Look a policy up by name; unknown names raise UnknownPolicyError listing valid ones."""
    rule = POLICIES.get(name)
    if rule is None:
        raise UnknownPolicyError(name)
    return LeastTokensPolicy(name=name, read_side_rule=rule, beta_tokens=beta_tokens)

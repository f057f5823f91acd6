"""The paper's scheduler as one SchedulingPolicy, plus round-robin and least-tokens baselines.

# DualPath §6: Algorithm 1, two-level DE selection, read side (whole, or split: §6 future work).
Pure: views in, frozen plan out, inputs never mutated, no I/O; only RoundRobinPolicy has state.

How the steps compose (decisions where the paper is silent):

- One call = one fetch: Algorithm 1 places a FIFO prefix of the queue on PEs; that prefix is
  the DE queue, which the two-level DE rule places group by group; each placed turn then gets
  its read side in FIFO order. A turn appears in the plan only with both a PE and a DE.
- A turn whose DE group is full stays in the queue; turns behind it that went to other
  groups are still placed, so a plan need not be a prefix. The blocked turn's tokens stay on
  its PE's working load for the rest of the call (in the paper it would sit on that PE
  waiting for a DE); the next call starts from fresh views and places it again.
- The read side uses a working copy of each node's read_q and read total (`ReadLoads`) that
  this call charges with the hit tokens it sends there, so one fetch does not herd every read
  onto one side; equal queues go to the node that has read less (scheduler/read_side.py).
  Algorithm 1 itself sees read_q as reported (see scheduler/pe_selection.py for why).
- Split reads come back as SplitAssignment (an Assignment subclass carrying block ranges);
  its `read_side` is the side reading more blocks. A turn whose best split gives every block
  to one side comes back as a plain Assignment.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from scheduler.de_selection import Z_SLACK, select_decode
from scheduler.pe_selection import select_prefill
from scheduler.read_side import BlockRange, choose_read_side, split_read, tie_side
from scheduler.views import Assignment, NodeView, PendingTurn, ReadSide, SchedulePlan

ReadRule = Literal["prefill", "shorter_queue", "none", "alternate"]


@dataclass(frozen=True, slots=True)
class SplitAssignment(Assignment):
    """An Assignment whose hit blocks are read on both sides.

    The prefill node reads `prefill_blocks`, the decode node `decode_blocks`; together they
    cover blocks [0, hit_tokens // block_tokens) exactly once. Code unaware of splits sees an
    ordinary Assignment and reads everything on `read_side` (correct, only unbalanced).
    """

    prefill_blocks: BlockRange
    decode_blocks: BlockRange


def _rate_table(rates: Mapping[str, float] | None) -> Mapping[str, float]:
    table = dict(rates or {})
    for node_id, rate in table.items():
        if rate <= 0:
            raise ValueError(f"snic rate of {node_id} must be > 0 tokens/s, got {rate}")
    return MappingProxyType(table)


@dataclass(frozen=True, slots=True)
class DualPathPolicy:
    """DualPath §6 scheduling: Algorithm 1, two-level DE selection, shorter-queue read side.

    `split_reads=True` splits each turn's hit blocks across both sides so both finish
    together, using `snic_tokens_per_s` (or the per-node `node_snic_tokens_per_s`) and
    `block_tokens`; with equal snic rates the split only depends on the queues.
    """

    alpha_tokens: int
    beta_tokens: int
    split_reads: bool = False
    block_tokens: int = 64
    snic_tokens_per_s: float = 1.0
    node_snic_tokens_per_s: Mapping[str, float] | None = field(default=None, hash=False)
    z_slack: float = Z_SLACK

    def __post_init__(self) -> None:
        if self.alpha_tokens < 0 or self.beta_tokens < 0:
            raise ValueError("alpha_tokens and beta_tokens must be >= 0")
        if self.block_tokens <= 0:
            raise ValueError("block_tokens must be > 0")
        if self.snic_tokens_per_s <= 0:
            raise ValueError("snic_tokens_per_s must be > 0")
        if self.z_slack <= 0:
            raise ValueError("z_slack must be > 0")
        # a read-only copy: the caller's mapping cannot change the policy later
        object.__setattr__(self, "node_snic_tokens_per_s", _rate_table(self.node_snic_tokens_per_s))

    @property
    def name(self) -> str:
        return "dualpath_split" if self.split_reads else "dualpath"

    def _rate(self, node_id: str) -> float:
        rates = self.node_snic_tokens_per_s
        if rates is None:
            return self.snic_tokens_per_s
        return rates.get(node_id, self.snic_tokens_per_s)

    def schedule(
        self,
        queue: Sequence[PendingTurn],
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        now: float,
        groups: frozenset[str] | None = None,
    ) -> SchedulePlan:
        """One fetch. `groups` limits PE selection to the fetching prefill group(s)."""
        del now  # the rules use load snapshots only
        pe = select_prefill(
            queue,
            prefill,
            alpha_tokens=self.alpha_tokens,
            beta_tokens=self.beta_tokens,
            groups=groups,
        )
        if not pe.choices:
            return SchedulePlan(())
        prefix = list(itertools.islice(queue, len(pe.choices)))
        de = select_decode(prefix, decode, z_slack=self.z_slack)
        if not de.choices:
            return SchedulePlan(())
        loads = ReadLoads.of(prefill, decode)
        out: list[Assignment] = []
        de_iter = iter(de.choices)
        dc = next(de_iter, None)
        for turn, pc in zip(prefix, pe.choices, strict=True):
            if dc is None:
                break
            if dc.turn_id != turn.turn_id:
                continue  # blocked in its DE group
            out.append(self._read(turn, pc.node_id, pc.engine, dc.node_id, dc.engine, loads))
            dc = next(de_iter, None)
        return SchedulePlan(tuple(out))

    def _read(
        self,
        turn: PendingTurn,
        pe_node: str,
        pe_engine: int,
        de_node: str,
        de_engine: int,
        loads: ReadLoads,
    ) -> Assignment:
        if not self.split_reads:
            side = loads.whole(turn, pe_node, de_node)
            return Assignment(turn.turn_id, pe_node, pe_engine, de_node, de_engine, side)
        qp, qd = loads.queue.get(pe_node, 0), loads.queue.get(de_node, 0)
        bt = self.block_tokens
        split = split_read(
            max(0, turn.hit_tokens) // bt,
            block_tokens=bt,
            prefill_read_q_tokens=qp,
            decode_read_q_tokens=qd,
            prefill_tokens_per_s=self._rate(pe_node),
            decode_tokens_per_s=self._rate(de_node),
        )
        num_p, num_d = split.prefill_blocks.num_blocks, split.decode_blocks.num_blocks
        loads.charge(pe_node, num_p * bt)
        loads.charge(de_node, num_d * bt)
        if num_p == 0 or num_d == 0:
            side = ReadSide.DECODE if num_d > 0 else ReadSide.PREFILL
            return Assignment(turn.turn_id, pe_node, pe_engine, de_node, de_engine, side)
        return SplitAssignment(
            turn.turn_id,
            pe_node,
            pe_engine,
            de_node,
            de_engine,
            split.major_side,
            split.prefill_blocks,
            split.decode_blocks,
        )


# --- baselines -------------------------------------------------------------------------------
def _engine_order(nodes: Iterable[NodeView]) -> list[tuple[str, int, int]]:
    """(node_id, engine, index into the node's engines), sorted: the rotation order."""
    return sorted((n.node_id, e.engine, i) for n in nodes for i, e in enumerate(n.engines))


@dataclass(frozen=True, slots=True)
class ReadLoads:
    """One fetch's working copy of each node's read queue and read total, charged as turns
    are assigned (the views themselves are never changed)."""

    queue: dict[str, int]
    total: dict[str, int]

    @classmethod
    def of(cls, *views: Sequence[NodeView]) -> ReadLoads:
        nodes = [n for v in views for n in v]
        return cls(
            {n.node_id: n.read_q_tokens for n in nodes},
            {n.node_id: n.read_total_tokens for n in nodes},
        )

    def charge(self, node_id: str, tokens: int) -> None:
        self.queue[node_id] = self.queue.get(node_id, 0) + tokens
        self.total[node_id] = self.total.get(node_id, 0) + tokens

    def whole(self, turn: PendingTurn, pe: str, de: str) -> ReadSide:
        """The shorter-queue side of a whole-request read (read_side.py), charged."""
        side = choose_read_side(
            hit_tokens=turn.hit_tokens,
            prefill_read_q_tokens=self.queue.get(pe, 0),
            decode_read_q_tokens=self.queue.get(de, 0),
            prefill_read_total_tokens=self.total.get(pe, 0),
            decode_read_total_tokens=self.total.get(de, 0),
            tie=tie_side(turn.turn_id),
        )
        self.charge(pe if side is ReadSide.PREFILL else de, max(0, turn.hit_tokens))
        return side


def _baseline_side(
    rule: ReadRule, turn: PendingTurn, pe: str, de: str, loads: ReadLoads
) -> ReadSide:
    if rule == "none":  # Oracle: nothing is read
        return ReadSide.NONE
    if rule == "prefill":
        return ReadSide.PREFILL
    return loads.whole(turn, pe, de)


def _check_rule(rule: str, *, alternate: bool = False) -> None:
    valid = ("prefill", "shorter_queue", "none", *(("alternate",) if alternate else ()))
    if rule not in valid:
        raise ValueError(f"read_rule must be one of {', '.join(valid)}; got {rule!r}")


@dataclass(frozen=True, slots=True)
class RoundRobinCursor:
    """Where each rotation resumes: index into the sorted (node_id, engine) order."""

    prefill: int = 0
    decode: int = 0
    side: int = 0
    """Turns assigned so far under read_rule 'alternate' (even: prefill side, odd: decode)."""


def round_robin_plan(
    queue: Sequence[PendingTurn],
    prefill: Sequence[NodeView],
    decode: Sequence[NodeView],
    *,
    beta_tokens: int,
    cursor: RoundRobinCursor,
    read_rule: ReadRule = "prefill",
) -> tuple[SchedulePlan, RoundRobinCursor]:
    """Round robin over PEs and over DEs (the baseline of the paper's load-balance comparison).

    The next engine in rotation takes the turn, skipping PEs with tok_e > beta and DEs
    without room for the turn's KV (so it never overloads or overcommits); the call stops at
    the first turn no PE or no DE can take. Returns the plan and the cursor to resume from.
    read_rule 'alternate' rotates the read side too (prefill, decode, prefill, ...), so no
    decision of the scheduler looks at load; the other rules are those of `_baseline_side`.
    """
    pes = _engine_order(prefill)
    des = _engine_order(decode)
    pe_nodes = {n.node_id: n for n in prefill}
    de_nodes = {n.node_id: n for n in decode}
    pe_tok = [pe_nodes[nid].engines[i].tok for nid, _, i in pes]
    de_free = [de_nodes[nid].engines[i].free_kv_tokens for nid, _, i in des]
    loads = ReadLoads.of(prefill, decode)
    pc = cursor.prefill % len(pes) if pes else 0
    dc = cursor.decode % len(des) if des else 0
    sides = cursor.side
    out: list[Assignment] = []
    for turn in queue:
        p = next(
            (j % len(pes) for j in range(pc, pc + len(pes)) if pe_tok[j % len(pes)] <= beta_tokens),
            None,
        )
        d = next(
            (
                j % len(des)
                for j in range(dc, dc + len(des))
                if de_free[j % len(des)] >= turn.kv_tokens
            ),
            None,
        )
        if p is None or d is None:
            break
        pe_tok[p] += turn.prompt_tokens
        de_free[d] -= turn.kv_tokens
        pe_node, pe_engine, _ = pes[p]
        de_node, de_engine, _ = des[d]
        if read_rule == "alternate":
            side = ReadSide.PREFILL if sides % 2 == 0 else ReadSide.DECODE
            sides += 1
        else:
            side = _baseline_side(read_rule, turn, pe_node, de_node, loads)
        out.append(Assignment(turn.turn_id, pe_node, pe_engine, de_node, de_engine, side))
        pc, dc = p + 1, d + 1
    return SchedulePlan(tuple(out)), RoundRobinCursor(pc, dc, sides)


class RoundRobinPolicy:
    """Round-robin baseline; its only state is the rotation cursor, advanced by schedule().

    A rotation needs memory across fetches (a stateless variant would restart at the same
    engine every fetch); `round_robin_plan` is the pure core, this class holds the cursor.
    """

    def __init__(self, *, beta_tokens: int, read_rule: ReadRule = "prefill") -> None:
        if beta_tokens < 0:
            raise ValueError("beta_tokens must be >= 0")
        _check_rule(read_rule, alternate=True)
        self.beta_tokens = beta_tokens
        self.read_rule: ReadRule = read_rule
        self._cursor = RoundRobinCursor()

    @property
    def name(self) -> str:
        return "round_robin"

    @property
    def cursor(self) -> RoundRobinCursor:
        return self._cursor

    def schedule(
        self,
        queue: Sequence[PendingTurn],
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        now: float,
    ) -> SchedulePlan:
        del now
        plan, self._cursor = round_robin_plan(
            queue,
            prefill,
            decode,
            beta_tokens=self.beta_tokens,
            cursor=self._cursor,
            read_rule=self.read_rule,
        )
        return plan


@dataclass(frozen=True, slots=True)
class LeastTokensBaseline:
    """PE: fewest tokens among tok_e <= beta (read_q ignored); DE: fewest tokens among all
    DEs with room (no groups, no Z); read side per `read_rule`. Stops at the first turn
    without a PE or a DE, so a plan is a FIFO prefix."""

    beta_tokens: int
    read_rule: ReadRule = "prefill"

    def __post_init__(self) -> None:
        if self.beta_tokens < 0:
            raise ValueError("beta_tokens must be >= 0")
        _check_rule(self.read_rule)

    @property
    def name(self) -> str:
        return "least_tokens"

    def schedule(
        self,
        queue: Sequence[PendingTurn],
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        now: float,
        groups: frozenset[str] | None = None,
    ) -> SchedulePlan:
        del now
        # alpha = "infinity" puts every engine in C2: Algorithm 1 becomes plain least tokens
        pe = select_prefill(
            queue, prefill, alpha_tokens=sys.maxsize, beta_tokens=self.beta_tokens, groups=groups
        )
        heap = [(e.tok, n.node_id, e.engine, e.free_kv_tokens) for n in decode for e in n.engines]
        heapq.heapify(heap)
        loads = ReadLoads.of(prefill, decode)
        out: list[Assignment] = []
        for turn, pc in zip(queue, pe.choices, strict=False):
            need = turn.kv_tokens
            skipped: list[tuple[int, str, int, int]] = []
            found: tuple[int, str, int, int] | None = None
            while heap:
                top = heapq.heappop(heap)
                if top[3] >= need:
                    found = top
                    break
                skipped.append(top)
            for s in skipped:
                heapq.heappush(heap, s)
            if found is None:
                break
            tok, de_node, de_engine, free = found
            heapq.heappush(heap, (tok + need, de_node, de_engine, free - need))
            side = _baseline_side(self.read_rule, turn, pc.node_id, de_node, loads)
            out.append(Assignment(turn.turn_id, pc.node_id, pc.engine, de_node, de_engine, side))
        return SchedulePlan(tuple(out))

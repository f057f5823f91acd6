"""Shortest read queue first: an example DualPath Mesh scheduling policy, shipped as a plugin.

The policy reads only the scheduler's frozen views (`scheduler.views`) and returns a plan, as
every policy does (docs/design.md, "Policy plugins"). It places each turn storage-first: on
the prefill node and the decode node whose storage-read queues are the shortest, then on the
engine of that node with the fewest tokens, and the turn's hit-KV read goes to whichever of
the two nodes has the shorter queue. Turns are taken in FIFO order; the plan stops at the
first turn that has no prefill engine under `beta_tokens` or no decode engine with room.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.registry import PolicyKnobs
from scheduler.views import Assignment, NodeView, PendingTurn, ReadSide, SchedulePlan

NAME = "shortest_read_queue"


@dataclass(frozen=True, slots=True)
class ShortestReadQueueFirst:
    """Nodes by shortest storage-read queue, engines by fewest tokens, reads to the shorter
    of the two queues."""

    beta_tokens: int
    """A prefill engine takes a new turn only while it holds at most this many tokens."""

    def __post_init__(self) -> None:
        if self.beta_tokens < 1:
            raise ValueError(f"beta_tokens must be >= 1, got {self.beta_tokens}")

    @property
    def name(self) -> str:
        return NAME

    def schedule(
        self,
        queue: Sequence[PendingTurn],
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        now: float,
    ) -> SchedulePlan:
        del now  # the views are the whole state this policy needs
        read_q = {n.node_id: n.read_q_tokens for n in (*prefill, *decode)}
        pe_tok = {(n.node_id, e.engine): e.tok for n in prefill for e in n.engines}
        de_tok = {(n.node_id, e.engine): e.tok for n in decode for e in n.engines}
        pe_room = {key: self.beta_tokens - tok for key, tok in pe_tok.items()}
        de_room = {(n.node_id, e.engine): e.free_kv_tokens for n in decode for e in n.engines}
        out: list[Assignment] = []
        for turn in queue:
            pe = _pick(prefill, read_q, pe_tok, pe_room, need=0)
            de = _pick(decode, read_q, de_tok, de_room, need=turn.kv_tokens)
            if pe is None or de is None:
                break  # FIFO: a later turn never overtakes one that does not fit
            side = ReadSide.DECODE if read_q[de[0]] < read_q[pe[0]] else ReadSide.PREFILL
            read_q[de[0] if side is ReadSide.DECODE else pe[0]] += turn.hit_tokens
            pe_tok[pe] += turn.prompt_tokens
            pe_room[pe] -= turn.prompt_tokens
            de_tok[de] += turn.kv_tokens
            de_room[de] -= turn.kv_tokens
            out.append(Assignment(turn.turn_id, pe[0], pe[1], de[0], de[1], side))
        return SchedulePlan(tuple(out))


def _pick(
    nodes: Sequence[NodeView],
    read_q: dict[str, int],
    tok: dict[tuple[str, int], int],
    room: dict[tuple[str, int], int],
    *,
    need: int,
) -> tuple[str, int] | None:
    """(node, engine): the node with the shortest read queue (then the lowest id) that has an
    engine with `room` for `need` tokens; of those engines, the one with the fewest tokens."""
    for node in sorted(nodes, key=lambda n: (read_q[n.node_id], n.node_id)):
        keys = [
            (node.node_id, e.engine) for e in node.engines if room[node.node_id, e.engine] >= need
        ]
        if keys:
            return min(keys, key=lambda key: (tok[key], key[1]))
    return None


def make_policy(knobs: PolicyKnobs) -> ShortestReadQueueFirst:
    """Shortest read queue first: nodes by storage-read queue, engines by fewest tokens."""
    return ShortestReadQueueFirst(beta_tokens=knobs.beta_tokens)

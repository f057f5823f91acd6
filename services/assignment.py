"""One turn as the scheduler assigned it: which nodes and engines, which blocks each side reads.

The scheduler sends it as an `AssignedTurn` (services/wire/rpc.py); engine nodes check it
here, and both halves of a node (timeline and data plane) work from the frozen result.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dualpath.errors import DualPathError
from services.spec import Role


class AssignmentError(DualPathError, ValueError):
    """An assignment from the scheduler is malformed; the message names the field."""


def _int(wire: Mapping[str, Any], name: str) -> int:
    value = wire.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AssignmentError(f"assignment field {name!r} must be an integer >= 0, got {value!r}")
    return value


def _str(wire: Mapping[str, Any], name: str) -> str:
    value = wire.get(name)
    if not isinstance(value, str) or not value:
        raise AssignmentError(f"assignment field {name!r} must be a non-empty string")
    return value


def _range(wire: Mapping[str, Any], side: str, hit_blocks: int) -> tuple[int, int]:
    reads = wire.get("reads")
    value = reads.get(side) if isinstance(reads, Mapping) else None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise AssignmentError(f"assignment field 'reads.{side}' must be [first, end]")
    first, end = int(value[0]), int(value[1])
    if not 0 <= first <= end <= hit_blocks:
        raise AssignmentError(
            f"assignment field 'reads.{side}': [{first}, {end}) outside the {hit_blocks} hit blocks"
        )
    return first, end


def _flag(wire: Mapping[str, Any], name: str) -> bool:
    value = wire.get(name, False)
    if not isinstance(value, bool):
        raise AssignmentError(f"assignment field {name!r} must be true or false")
    return value


def _sources(wire: Mapping[str, Any], hit_blocks: int) -> tuple[tuple[int, int, int], ...]:
    """`sources`: (trajectory, first, end) runs that tile [0, hit_blocks) in order, or none."""
    value = wire.get("sources", ())
    if not isinstance(value, list | tuple):
        raise AssignmentError("assignment field 'sources' must be a list of [traj, first, end]")
    out: list[tuple[int, int, int]] = []
    at = 0
    for i, src in enumerate(value):
        if (
            not isinstance(src, list | tuple)
            or len(src) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in src)
        ):
            raise AssignmentError(f"assignment field 'sources[{i}]' must be [traj, first, end]")
        traj, first, end = (int(v) for v in src)
        if first != at or end <= first:
            raise AssignmentError(
                f"assignment field 'sources[{i}]': [{first}, {end}) does not continue at {at}"
            )
        out.append((traj, first, end))
        at = end
    if out and at != hit_blocks:
        raise AssignmentError(
            f"assignment field 'sources' covers {at} blocks, the turn hits {hit_blocks}"
        )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class TurnAssignment:
    turn_id: str
    traj_id: int
    context_tokens: int
    prompt_tokens: int
    gen_tokens: int
    hit_blocks: int
    """Blocks of the context already persisted: read from storage, not computed."""
    prompt_blocks: int
    """Blocks the prompt spans; [hit_blocks, prompt_blocks) are computed by prefill."""
    persist_end_block: int
    """After decoding, blocks [hit_blocks, persist_end_block) are written to storage."""
    prefill_node: str
    prefill_engine: int
    decode_node: str
    decode_engine: int
    read_side: str
    prefill_read: tuple[int, int]
    """Hit blocks [first, end) the prefill node reads from storage (empty: first == end)."""
    decode_read: tuple[int, int]
    """Hit blocks [first, end) the decode node reads and relays to the prefill node."""
    stream_tokens: bool = False
    """The decode node reports every generated token (`token` events), not only the first,
    second and last: a client streams them (the scheduler's OpenAI-compatible API)."""
    sources: tuple[tuple[int, int, int], ...] = ()
    """Where the hit blocks live when other requests persisted them (content-addressed
    prefixes, docs/design.md "Request traces"): (trajectory, first, end) runs tiling
    [0, hit_blocks). Empty: every block is the turn's own trajectory's."""

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> TurnAssignment:
        hit = _int(wire, "hit_blocks")
        a = cls(
            turn_id=_str(wire, "turn_id"),
            traj_id=_int(wire, "traj_id"),
            context_tokens=_int(wire, "context_tokens"),
            prompt_tokens=_int(wire, "prompt_tokens"),
            gen_tokens=_int(wire, "gen_tokens"),
            hit_blocks=hit,
            prompt_blocks=_int(wire, "prompt_blocks"),
            persist_end_block=_int(wire, "persist_end_block"),
            prefill_node=_str(wire, "prefill_node"),
            prefill_engine=_int(wire, "prefill_engine"),
            decode_node=_str(wire, "decode_node"),
            decode_engine=_int(wire, "decode_engine"),
            read_side=_str(wire, "read_side"),
            prefill_read=_range(wire, "prefill", hit),
            decode_read=_range(wire, "decode", hit),
            stream_tokens=_flag(wire, "stream_tokens"),
            sources=_sources(wire, hit),
        )
        if not a.hit_blocks <= a.prompt_blocks or a.persist_end_block < a.hit_blocks:
            raise AssignmentError(
                f"assignment {a.turn_id}: blocks hit {a.hit_blocks}, prompt {a.prompt_blocks}, "
                f"persist end {a.persist_end_block} are out of order"
            )
        if a.prompt_tokens < 1 or a.gen_tokens < 1:
            raise AssignmentError(f"assignment {a.turn_id}: prompt and gen tokens must be >= 1")
        return a

    def to_wire(self) -> dict[str, Any]:
        return {
            "turn_id": self.turn_id,
            "traj_id": self.traj_id,
            "context_tokens": self.context_tokens,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "hit_blocks": self.hit_blocks,
            "prompt_blocks": self.prompt_blocks,
            "persist_end_block": self.persist_end_block,
            "prefill_node": self.prefill_node,
            "prefill_engine": self.prefill_engine,
            "decode_node": self.decode_node,
            "decode_engine": self.decode_engine,
            "read_side": self.read_side,
            "reads": {"prefill": list(self.prefill_read), "decode": list(self.decode_read)},
            "stream_tokens": self.stream_tokens,
            "sources": [list(src) for src in self.sources],
        }

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV the decode engine holds: prompt and generated."""
        return self.prompt_tokens + self.gen_tokens

    def read_blocks(self, role: Role) -> range:
        """The hit blocks the node of `role` reads from storage for this turn."""
        first, end = self.prefill_read if role is Role.PREFILL else self.decode_read
        return range(first, end)

    def pieces(self, blocks: range) -> list[tuple[int, range]]:
        """`blocks` cut where their trajectory changes: (trajectory, blocks) in order. Blocks
        past the hit ones, and every block when the turn has no sources, are its own."""
        if not self.sources:
            return [(self.traj_id, blocks)] if blocks else []
        out: list[tuple[int, range]] = []
        for traj, first, end in (*self.sources, (self.traj_id, self.hit_blocks, blocks.stop)):
            lo, hi = max(first, blocks.start), min(end, blocks.stop)
            if lo < hi:
                out.append((traj, range(lo, hi)))
        return out

    def owns(self, traj: int, blocks: tuple[int, ...]) -> bool:
        """Every one of `blocks` lives in trajectory `traj` (the check of an inbound frame)."""
        if not self.sources:
            return traj == self.traj_id
        if not blocks:
            return True
        spans = self.pieces(range(min(blocks), max(blocks) + 1))
        if len(spans) == 1:  # the usual frame: one run of one trajectory
            return spans[0][0] == traj
        return all(any(t == traj and b in r for t, r in spans) for b in blocks)

    def hit_tokens(self, block_tokens: int) -> int:
        return self.hit_blocks * block_tokens

    def engine(self, role: Role) -> int:
        return self.prefill_engine if role is Role.PREFILL else self.decode_engine

    def peer(self, role: Role) -> str:
        """The turn's node of the other role."""
        return self.decode_node if role is Role.PREFILL else self.prefill_node

"""Frozen views the scheduler service hands to policies, and the plans policies return.

Views are snapshots (engine loads, read queues, the FIFO queue of turns); plans are the
assignments to execute. Policies never mutate a view. Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ReadSide(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    NONE = "none"  # oracle: no storage read


@dataclass(frozen=True, slots=True)
class EngineView:
    node_id: str
    engine: int
    seq: int
    """Unfinished requests on this engine (`seq_e`)."""
    tok: int
    """Total tokens of those requests (`tok_e`)."""
    free_kv_tokens: int = 0
    """Decode engines: GPU KV memory still free, in tokens."""


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    read_q_tokens: int
    """Tokens waiting in (or being read by) this node's storage-read queue (`read_q`)."""
    engines: tuple[EngineView, ...]
    read_total_tokens: int = 0
    """Hit tokens the scheduler has assigned to this node's storage reads so far; breaks
    read-side ties between equal queues (the node that has read less takes the turn)."""


@dataclass(frozen=True, slots=True)
class PendingTurn:
    turn_id: str
    traj_id: int
    prompt_tokens: int
    hit_tokens: int
    gen_tokens: int

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV the decode engine holds for this turn at its end."""
        return self.prompt_tokens + self.gen_tokens


@dataclass(frozen=True, slots=True)
class Assignment:
    turn_id: str
    prefill_node: str
    prefill_engine: int
    decode_node: str
    decode_engine: int
    read_side: ReadSide


@dataclass(frozen=True, slots=True)
class SchedulePlan:
    assignments: tuple[Assignment, ...]

    @property
    def assigned_ids(self) -> frozenset[str]:
        return frozenset(a.turn_id for a in self.assignments)

"""An engine node's timeline, the vocabulary: its configuration, the actions its machines
return, the phases of a turn and of a step, and the turn and load records they share.

The machines are services/engine_core.py (the node: turns, loads, failures),
services/prefill_core.py (the node's prefill steps) and services/decode_core.py (one decode
GPU's continuous batching). All pure: time is an argument, nothing sleeps, sends or reads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from scheduler.costmodel import CostModel
from services.assignment import TurnAssignment
from services.spec import Role

TIMER_SLACK_S = 0.001
"""A deadline this close counts as reached: event-loop timers have millisecond resolution, and
the lateness (or earliness) is carried into the next interval anyway (deadline-driven)."""


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineConfig:
    node_id: str
    role: Role
    num_gpus: int
    layer_groups: int
    block_tokens: int
    time_dilation: float
    """Emulated seconds per real second: every cost-model duration is multiplied by it."""
    layerwise: bool
    """Layerwise prefill (DualPath §4): group g computes once group g's KV is there, and a
    finished turn's group g leaves while g+1 computes. False is Basic: load all, then compute."""
    compute_quota_s: float | None
    layer_timeout_s: float
    gpu_kv_capacity_tokens: int
    collectives: bool
    """Each compute interval ends with an all-to-all burst to the node's same-role peers."""
    cost: CostModel

    def __post_init__(self) -> None:
        if self.role not in (Role.PREFILL, Role.DECODE):
            raise ValueError(f"{self.node_id}: a timeline needs an engine role, not {self.role}")
        if self.num_gpus < 1 or self.layer_groups < 1 or self.time_dilation <= 0:
            raise ValueError(f"{self.node_id}: num_gpus, layer_groups and tau must be positive")


# -- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssignKv:
    """Data plane: a new turn; read, relay and receive its KV."""

    assignment: TurnAssignment


@dataclass(frozen=True, slots=True)
class SendGroup:
    """Data plane (prefill): layer group `group` of the turn is computed; send its KV."""

    turn_id: str
    group: int


@dataclass(frozen=True, slots=True)
class PrefillDone:
    """Data plane (prefill): every group was handed over; send `kv_done` once sent, release."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class Persist:
    """Data plane (decode): decoding ended; persist the turn's new full blocks."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class DropKv:
    """Data plane: forget the turn (free its buffers); `tell_peer`: let the turn's other node
    stop waiting for it."""

    turn_id: str
    reason: str
    tell_peer: bool


@dataclass(frozen=True, slots=True)
class Emit:
    """A turn event for the scheduler (and through it the client)."""

    turn_id: str
    kind: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Collective:
    """Run one all-to-all burst with the same-role peers; then call on_collective_done(key)."""

    key: tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class StepTimed:
    """One GPU step's compute: planned (cost model x tau) and actual seconds, and how much
    later than planned it ended (negative: early)."""

    started_at: float
    planned_s: float
    actual_s: float
    late_s: float


@dataclass(frozen=True, slots=True)
class PrefillStepStats:
    """A prefill step of the node's GPUs: attention max/avg and how many GPUs had work."""

    started_at: float
    attention_balance: float
    busy_gpus: int
    num_gpus: int


Action = (
    AssignKv
    | SendGroup
    | PrefillDone
    | Persist
    | DropKv
    | Emit
    | Collective
    | StepTimed
    | PrefillStepStats
)


class FailureOrigin(Enum):
    TIMELINE = "timeline"
    """Decided here (a layer group that did not arrive): the data plane must drop it and
    tell the peer."""
    DATA_PLANE = "data_plane"
    """The data plane failed it: it has dropped it and told the peer."""
    SCHEDULER = "scheduler"
    """Cancelled by the scheduler (it tells every node of the turn)."""


# -- state -----------------------------------------------------------------------------------


class TurnPhase(Enum):
    QUEUED = "queued"
    """Prefill: in its GPU's FIFO queue (KV arriving, or being computed chunk by chunk)."""
    FINISHING = "finishing"
    """Prefill: computed; the data plane is sending its KV."""
    WAITING_KV = "waiting_kv"
    """Decode: waiting for the full context's KV."""
    DECODING = "decoding"
    PERSISTING = "persisting"
    """Decode: tokens done; the data plane writes the new blocks."""


@dataclass
class TimelineTurn:
    """A turn on this node's GPU timeline: its assignment, phase and progress."""

    a: TurnAssignment
    phase: TurnPhase
    ready: list[bool]
    computed_tokens: int = 0
    emitted_tokens: int = 1
    """Decode: tokens out so far (the first came from prefill)."""
    failed: str | None = None


@dataclass
class EngineLoad:
    """One engine's load as DualPath §6 defines it: unfinished requests and their tokens."""

    seq: int = 0
    tok: int = 0
    kv_tokens: int = 0
    busy_s: float = 0.0
    queue: deque[str] = field(default_factory=deque)


class StepPhase(Enum):
    """Where a compute step (a prefill step, a decode GPU's step) is."""

    WAIT = "wait"
    COMPUTE = "compute"
    COLLECTIVE = "collective"


@dataclass
class Interval:
    """Deadline-driven compute: an interval's deadline is shortened by the lateness carried
    from the interval before it on the same timeline (its debt), so millisecond timer slack
    does not add up over a run of back-to-back steps."""

    started: float
    planned_s: float
    deadline: float


class Outbox:
    """The node's actions in the order its machines decided them, until the shell drains them."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[Action] = []

    def drain(self) -> list[Action]:
        out, self.items = self.items, []
        return out

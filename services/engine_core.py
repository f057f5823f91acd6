"""An engine node's timeline as a sans-I/O state machine: its emulated GPUs, steps and loads.

Inputs are method calls that carry `now` (seconds on a monotonic clock); outputs are actions
drained with `actions()`, and `next_deadline()` says when the shell must call `on_timer(now)`.
It never sleeps, sends or reads (services/engine.py runs it). Moving bytes is the data plane's
job (services/dataplane_core.py): the timeline only learns that a layer group is ready, that a
turn's KV is complete, released or persisted, so byte handling can never move GPU time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from scheduler.batching import (
    PrefillBatch,
    PrefillItem,
    attention_balance,
    head_batch,
    pack_prefill_batch,
)
from scheduler.costmodel import CostModel
from services.assignment import TurnAssignment
from services.spec import Role
from services.wire.rpc import EngineLoadReport

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
class _TimelineTurn:
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


class _Phase(Enum):
    WAIT = "wait"
    COMPUTE = "compute"
    COLLECTIVE = "collective"


@dataclass
class _Interval:
    """Deadline-driven compute: an interval's deadline is shortened by the lateness carried
    from the interval before it on the same timeline (its debt), so millisecond timer slack
    does not add up over a run of back-to-back steps."""

    started: float
    planned_s: float
    deadline: float


@dataclass
class _PrefillStep:
    seq: int
    packed: list[tuple[PrefillBatch, list[_TimelineTurn]]]
    turns: list[_TimelineTurn]
    done: set[str]
    compute_s: float
    started: float
    group: int = 0
    phase: _Phase = _Phase.WAIT
    wait_since: float = 0.0
    interval: _Interval | None = None
    planned_s: float = 0.0
    actual_s: float = 0.0


@dataclass
class _DecodeGpu:
    active: list[_TimelineTurn] = field(default_factory=list)
    batch: list[_TimelineTurn] = field(default_factory=list)
    phase: _Phase | None = None
    interval: _Interval | None = None
    steps: int = 0
    debt_s: float = 0.0
    started: float = 0.0


# -- the core ---------------------------------------------------------------------------------


class EngineCore:
    """The timeline of one prefill or decode node (one engine group: all its GPUs)."""

    def __init__(self, cfg: TimelineConfig) -> None:
        self.cfg = cfg
        self.role = cfg.role
        self.turns: dict[str, _TimelineTurn] = {}
        self.loads = [EngineLoad() for _ in range(cfg.num_gpus)]
        self.counters: dict[str, int] = {"turns_prefilled": 0, "turns_decoded": 0}
        self._actions: list[Action] = []
        self._step: _PrefillStep | None = None
        self._step_seq = 0
        self._debt_s = 0.0
        self._gpus = [_DecodeGpu() for _ in range(cfg.num_gpus)]

    # -- outputs -------------------------------------------------------------------------------
    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def next_deadline(self) -> float | None:
        """When on_timer must be called next (None: nothing is timed)."""
        times: list[float] = []
        st = self._step
        if st is not None:
            if st.phase is _Phase.COMPUTE and st.interval is not None:
                times.append(st.interval.deadline)
            elif st.phase is _Phase.WAIT:
                times.append(st.wait_since + self.cfg.layer_timeout_s)
        for gpu in self._gpus:
            if gpu.phase is _Phase.COMPUTE and gpu.interval is not None:
                times.append(gpu.interval.deadline)
        return min(times) if times else None

    def engine_loads(self) -> list[EngineLoadReport]:
        """Each engine's seq_e, tok_e and free KV tokens for the scheduler (DualPath §6)."""
        cap = self.cfg.gpu_kv_capacity_tokens
        return [
            EngineLoadReport(i, e.seq, e.tok, cap - e.kv_tokens) for i, e in enumerate(self.loads)
        ]

    # -- inputs: the scheduler -----------------------------------------------------------------
    def assign(self, a: TurnAssignment, now: float) -> None:
        """A turn the scheduler placed on this node (a repeated delivery is ignored)."""
        if a.turn_id in self.turns:
            return
        if a.engine(self.role) >= self.cfg.num_gpus:
            raise ValueError(
                f"{a.turn_id}: engine {a.engine(self.role)} of {self.cfg.num_gpus} on "
                f"{self.cfg.node_id}"
            )
        groups = self.cfg.layer_groups
        eng = self.loads[a.engine(self.role)]
        eng.seq += 1
        if self.role is Role.PREFILL:
            t = _TimelineTurn(a, TurnPhase.QUEUED, [False] * groups)
            eng.tok += a.prompt_tokens
            eng.queue.append(a.turn_id)
        else:
            t = _TimelineTurn(a, TurnPhase.WAITING_KV, [False] * groups)
            eng.tok += a.kv_tokens
            eng.kv_tokens += a.kv_tokens
        self.turns[a.turn_id] = t
        self._actions.append(AssignKv(a))
        self._advance(now)

    def cancel(self, turn_id: str, reason: str, now: float) -> None:
        """The scheduler says the turn failed elsewhere: drop it, report nothing."""
        self._fail(turn_id, f"cancelled by the scheduler: {reason}", now, FailureOrigin.SCHEDULER)

    # -- inputs: the data plane ----------------------------------------------------------------
    def on_group_ready(self, turn_id: str, group: int, now: float) -> None:
        """Prefill: layer group `group` of the turn's hit KV is in this node's buffer."""
        t = self.turns.get(turn_id)
        if t is None or t.failed is not None:
            return
        if not 0 <= group < self.cfg.layer_groups:
            raise ValueError(f"{turn_id}: layer group {group} of {self.cfg.layer_groups}")
        t.ready[group] = True
        self._advance(now)

    def on_kv_complete(self, turn_id: str, now: float) -> None:
        """Decode: the full context's KV is here and verified: decoding can start."""
        t = self.turns.get(turn_id)
        if t is None or t.failed is not None or t.phase is not TurnPhase.WAITING_KV:
            return
        if t.a.gen_tokens <= 1:  # the only token came from prefill
            self._persist(t)
            return
        t.phase = TurnPhase.DECODING
        gpu = self._gpus[t.a.decode_engine]
        gpu.active.append(t)
        if gpu.phase is None:
            self._start_decode_step(t.a.decode_engine, now)

    def on_released(self, turn_id: str, now: float) -> None:
        """Prefill: the data plane sent the turn's KV and `kv_done`: the turn leaves the node."""
        t = self.turns.get(turn_id)
        if t is None or t.failed is not None or t.phase is not TurnPhase.FINISHING:
            return
        self.counters["turns_prefilled"] += 1
        self._release(t)
        self._advance(now)

    def on_persisted(self, turn_id: str, now: float) -> None:
        """Decode: the turn's new blocks are in storage: the turn is done."""
        t = self.turns.get(turn_id)
        if t is None or t.failed is not None or t.phase is not TurnPhase.PERSISTING:
            return
        self.counters["turns_decoded"] += 1
        self._actions.append(Emit(turn_id, "done", {"tokens": t.a.gen_tokens}))
        self._release(t)

    def on_failed(
        self, turn_id: str, reason: str, now: float, *, retryable: bool, report: bool
    ) -> None:
        """The data plane failed the turn (storage, corrupt KV, a peer's failure, ...)."""
        self._fail(
            turn_id, reason, now, FailureOrigin.DATA_PLANE, retryable=retryable, report=report
        )

    # -- inputs: the shell ---------------------------------------------------------------------
    def on_collective_done(self, key: tuple[str, int, int], now: float) -> None:
        """The collective burst of `key` was answered by every peer (or gave up)."""
        if key[0] == "prefill":
            st = self._step
            if st is None or st.seq != key[1] or st.group != key[2]:
                return
            if st.phase is not _Phase.COLLECTIVE:
                return
            self._after_group(st, now)
            self._advance(now)
        else:
            gpu = self._gpus[key[1]]
            if gpu.phase is not _Phase.COLLECTIVE or gpu.steps != key[2]:
                return
            self._end_decode_step(key[1], now)

    def on_timer(self, now: float) -> None:
        st = self._step
        if st is not None:
            if st.phase is _Phase.COMPUTE and st.interval is not None:
                if now + TIMER_SLACK_S >= st.interval.deadline:
                    self._end_prefill_interval(st, now)
                    self._advance(now)
            elif st.phase is _Phase.WAIT:
                self._advance(now)
        for i, gpu in enumerate(self._gpus):
            if (
                gpu.phase is _Phase.COMPUTE
                and gpu.interval is not None
                and now + TIMER_SLACK_S >= gpu.interval.deadline
            ):
                self._end_decode_interval(i, now)

    # -- failure ---------------------------------------------------------------------------------
    def _fail(
        self,
        turn_id: str,
        reason: str,
        now: float,
        origin: FailureOrigin,
        *,
        retryable: bool = False,
        report: bool = True,
        advance: bool = True,
    ) -> None:
        t = self.turns.get(turn_id)
        if t is None or t.failed is not None:
            return
        t.failed = reason
        if origin is FailureOrigin.SCHEDULER:
            report = False
        if report:
            extra = {"node": self.cfg.node_id, "reason": reason, "retryable": retryable}
            self._actions.append(Emit(turn_id, "failed", extra))
        if origin is not FailureOrigin.DATA_PLANE:
            self._actions.append(
                DropKv(turn_id, reason, tell_peer=origin is FailureOrigin.TIMELINE)
            )
        eng = self.loads[t.a.engine(self.role)]
        in_step = self._step is not None and any(x is t for x in self._step.turns)
        if t.phase is TurnPhase.QUEUED and not in_step and turn_id in eng.queue:
            eng.queue.remove(turn_id)
        if t.phase is TurnPhase.DECODING:
            gpu = self._gpus[t.a.decode_engine]
            gpu.active = [x for x in gpu.active if x is not t]
        self._release(t)
        if advance:
            self._advance(now)

    def _release(self, t: _TimelineTurn) -> None:
        """The turn no longer loads its engine (DualPath §6: seq_e, tok_e)."""
        if self.turns.pop(t.a.turn_id, None) is None:
            return
        eng = self.loads[t.a.engine(self.role)]
        eng.seq -= 1
        if self.role is Role.PREFILL:
            eng.tok -= t.a.prompt_tokens
        else:
            eng.tok -= t.a.kv_tokens
            eng.kv_tokens -= t.a.kv_tokens

    # -- prefill -----------------------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        if self.role is not Role.PREFILL:
            return
        while True:
            st = self._step
            if st is None:
                st = self._start_prefill_step(now)
                if st is None:
                    self._debt_s = 0.0  # idle: nothing back to back to compensate
                    return
            if st.phase is not _Phase.WAIT:
                return
            g = st.group
            missing = [t for t in st.turns if t.failed is None and not t.ready[g]]
            if missing:
                if now < st.wait_since + self.cfg.layer_timeout_s:
                    return
                # The whole group waits at this layer: a transfer that stalls must not hold
                # every GPU for a request timeout.
                for t in missing:
                    self._fail(
                        t.a.turn_id,
                        f"layer group {g} of {t.a.turn_id} did not arrive within "
                        f"{self.cfg.layer_timeout_s:g} s",
                        now,
                        FailureOrigin.TIMELINE,
                        retryable=True,
                        advance=False,
                    )
                continue
            self._start_prefill_interval(st, now)

    def _ready(self, t: _TimelineTurn) -> bool:
        return t.ready[0] if self.cfg.layerwise else all(t.ready)

    def _pack(self, gpu: int) -> tuple[PrefillBatch, list[_TimelineTurn]]:
        """The next step of one GPU from the ready turns of its FIFO queue (DualPath §6:
        quota packing with a chunked cut, or the head request whole without a quota)."""
        ready = [
            t
            for tid in self.loads[gpu].queue
            if (t := self.turns[tid]).failed is None and self._ready(t)
        ]
        hit = self.cfg.block_tokens
        items = [
            PrefillItem(
                t.a.turn_id,
                t.a.hit_blocks * hit + t.computed_tokens,
                t.a.prompt_tokens - t.a.hit_blocks * hit - t.computed_tokens,
            )
            for t in ready
        ]
        quota = self.cfg.compute_quota_s
        if quota is None:
            batch = head_batch(items, self.cfg.cost)
        else:
            batch = pack_prefill_batch(items, self.cfg.cost, quota_s=quota)
        return batch, ready[: len(batch.items)]

    def _start_prefill_step(self, now: float) -> _PrefillStep | None:
        packed = [self._pack(gpu) for gpu in range(self.cfg.num_gpus)]
        if not any(batch.items for batch, _ in packed):
            return None
        cost = self.cfg.cost
        compute_s = max(batch.step_s(cost) for batch, _ in packed) * self.cfg.time_dilation
        self._step_seq += 1
        st = _PrefillStep(
            seq=self._step_seq,
            packed=packed,
            turns=[t for _, ts in packed for t in ts],
            done={tid for batch, _ in packed for tid in batch.completed_turn_ids},
            compute_s=compute_s,
            started=now,
            wait_since=now,
        )
        self._step = st
        busy = sum(1 for batch, _ in packed if batch.items)
        balance = attention_balance([b.attention_s for b, _ in packed])
        self._actions.append(PrefillStepStats(now, balance, busy, len(packed)))
        for gpu, (_, ts) in enumerate(packed):
            for t in ts:
                if t.computed_tokens == 0:
                    extra = {"node": self.cfg.node_id, "gpu": gpu}
                    self._actions.append(Emit(t.a.turn_id, "prefill_started", extra))
        return st

    def _group_compute_s(self, st: _PrefillStep) -> float:
        if self.cfg.layerwise:
            return st.compute_s / self.cfg.layer_groups
        return st.compute_s if st.group == 0 else 0.0  # Basic: compute once all KV is in

    def _start_prefill_interval(self, st: _PrefillStep, now: float) -> None:
        planned = self._group_compute_s(st)
        st.planned_s += planned
        if planned <= 0.0:
            self._collective_or_next(st, now)
            return
        st.phase = _Phase.COMPUTE
        effective = planned - self._debt_s
        self._debt_s = max(-effective, 0.0)  # debt left over when it exceeds the interval
        st.interval = _Interval(now, planned, now + max(effective, 0.0))
        if effective <= 0.0:
            self._end_prefill_interval(st, now)

    def _end_prefill_interval(self, st: _PrefillStep, now: float) -> None:
        iv = st.interval
        assert iv is not None
        st.actual_s += now - iv.started
        late = now - iv.deadline
        self._debt_s = min(self._debt_s + late, iv.planned_s)
        st.interval = None
        self._collective_or_next(st, now)

    def _collective_or_next(self, st: _PrefillStep, now: float) -> None:
        if self.cfg.collectives:
            st.phase = _Phase.COLLECTIVE
            self._actions.append(Collective(("prefill", st.seq, st.group)))
            return
        self._after_group(st, now)

    def _after_group(self, st: _PrefillStep, now: float) -> None:
        g = st.group
        if self.cfg.layerwise:  # layer group g of finished turns leaves while g+1 computes
            for t in st.turns:
                if t.a.turn_id in st.done and t.failed is None:
                    self._actions.append(SendGroup(t.a.turn_id, g))
        if g + 1 < self.cfg.layer_groups:
            st.group = g + 1
            st.phase = _Phase.WAIT
            st.wait_since = now
            return
        self._finish_prefill_step(st, now)

    def _finish_prefill_step(self, st: _PrefillStep, now: float) -> None:
        self._step = None
        self._actions.append(
            StepTimed(st.started, st.planned_s, st.actual_s, st.actual_s - st.planned_s)
        )
        took = now - st.started
        for gpu, (batch, ts) in enumerate(st.packed):
            eng = self.loads[gpu]
            if batch.items:
                eng.busy_s += took
            for item, t in zip(batch.items, ts, strict=True):
                t.computed_tokens += item.new_tokens
                finished = t.a.turn_id in st.done
                if (finished or t.failed is not None) and t.a.turn_id in eng.queue:
                    eng.queue.remove(t.a.turn_id)
                if not finished or t.failed is not None:
                    continue
                t.phase = TurnPhase.FINISHING
                self._actions.append(Emit(t.a.turn_id, "first_token", {"node": self.cfg.node_id}))
                if not self.cfg.layerwise:
                    for g in range(self.cfg.layer_groups):
                        self._actions.append(SendGroup(t.a.turn_id, g))
                self._actions.append(PrefillDone(t.a.turn_id))

    # -- decode ------------------------------------------------------------------------------------
    def _persist(self, t: _TimelineTurn) -> None:
        t.phase = TurnPhase.PERSISTING
        self._actions.append(Persist(t.a.turn_id))

    def _start_decode_step(self, i: int, now: float) -> None:
        """Continuous batching: every active sequence advances one token per step."""
        gpu = self._gpus[i]
        if not gpu.active:
            gpu.phase = None
            gpu.debt_s = 0.0
            return
        gpu.batch = list(gpu.active)
        ctx = sum(t.a.prompt_tokens + t.emitted_tokens for t in gpu.batch)
        planned = self.cfg.cost.decode_step_s(len(gpu.batch), ctx) * self.cfg.time_dilation
        gpu.steps += 1
        gpu.started = now
        gpu.phase = _Phase.COMPUTE
        effective = planned - gpu.debt_s
        gpu.debt_s = max(-effective, 0.0)
        gpu.interval = _Interval(now, planned, now + max(effective, 0.0))
        if effective <= 0.0:
            self._end_decode_interval(i, now)

    def _end_decode_interval(self, i: int, now: float) -> None:
        gpu = self._gpus[i]
        iv = gpu.interval
        assert iv is not None
        late = now - iv.deadline
        gpu.debt_s = min(gpu.debt_s + late, iv.planned_s)
        actual = now - iv.started
        self._actions.append(StepTimed(iv.started, iv.planned_s, actual, actual - iv.planned_s))
        gpu.interval = None
        if self.cfg.collectives:
            gpu.phase = _Phase.COLLECTIVE
            self._actions.append(Collective(("decode", i, gpu.steps)))
            return
        self._end_decode_step(i, now)

    def _end_decode_step(self, i: int, now: float) -> None:
        gpu = self._gpus[i]
        self.loads[i].busy_s += now - gpu.started
        for t in gpu.batch:
            if t.failed is not None or t.phase is not TurnPhase.DECODING:
                continue
            t.emitted_tokens += 1
            if t.emitted_tokens == 2:
                self._actions.append(Emit(t.a.turn_id, "second_token", {"node": self.cfg.node_id}))
            if t.emitted_tokens >= t.a.gen_tokens:
                # Decoding ends here; persisting the new blocks follows in the background
                # (DualPath §3), so TPOT ends at this token, not when `done` is reported.
                self._actions.append(Emit(t.a.turn_id, "last_token", {"node": self.cfg.node_id}))
                gpu.active = [x for x in gpu.active if x is not t]
                self._persist(t)
        gpu.batch = []
        self._start_decode_step(i, now)

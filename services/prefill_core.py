"""A prefill node's steps as a sans-I/O machine: one per node, all its GPUs in lockstep.

Each step packs every GPU's next batch from the ready turns of its FIFO queue (DualPath §6),
then computes layer group by layer group: group g waits for its KV (at most
`layer_timeout_s`), computes for its share of the step's cost-model time (deadline-driven:
lateness carried as debt into the next interval), ends with a collective burst when the node
has peers, and — layerwise — hands finished turns' group g to the data plane while g+1
computes. The node's turns, loads and failures are services/engine_core.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler.batching import (
    PrefillBatch,
    PrefillItem,
    attention_balance,
    head_batch,
    pack_prefill_batch,
)
from services.timeline import (
    TIMER_SLACK_S,
    Collective,
    Emit,
    EngineLoad,
    Interval,
    Outbox,
    PrefillDone,
    PrefillStepStats,
    SendGroup,
    StepPhase,
    StepTimed,
    TimelineConfig,
    TimelineTurn,
    TurnPhase,
)


@dataclass
class PrefillStep:
    seq: int
    packed: list[tuple[PrefillBatch, list[TimelineTurn]]]
    turns: list[TimelineTurn]
    done: set[str]
    compute_s: float
    started: float
    group: int = 0
    phase: StepPhase = StepPhase.WAIT
    wait_since: float = 0.0
    interval: Interval | None = None
    planned_s: float = 0.0
    actual_s: float = 0.0


class PrefillMachine:
    """The prefill steps of one node. `turns` and `loads` are the node's (shared, not copied);
    `fail_late(t, reason, now)` fails a turn whose layer group did not arrive in time."""

    def __init__(
        self,
        cfg: TimelineConfig,
        turns: dict[str, TimelineTurn],
        loads: list[EngineLoad],
        out: Outbox,
        fail_late: Callable[[TimelineTurn, str, float], None],
    ) -> None:
        self.cfg = cfg
        self.turns = turns
        self.loads = loads
        self.out = out
        self._fail_late = fail_late
        self._step: PrefillStep | None = None
        self._step_seq = 0
        self._debt_s = 0.0

    def deadline(self) -> float | None:
        st = self._step
        if st is not None:
            if st.phase is StepPhase.COMPUTE and st.interval is not None:
                return st.interval.deadline
            if st.phase is StepPhase.WAIT:
                return st.wait_since + self.cfg.layer_timeout_s
        return None

    def holds(self, t: TimelineTurn) -> bool:
        """The turn is in the step being computed."""
        return self._step is not None and any(x is t for x in self._step.turns)

    def on_timer(self, now: float) -> None:
        st = self._step
        if st is not None:
            if st.phase is StepPhase.COMPUTE and st.interval is not None:
                if now + TIMER_SLACK_S >= st.interval.deadline:
                    self._end_interval(st, now)
                    self.advance(now)
            elif st.phase is StepPhase.WAIT:
                self.advance(now)

    def on_collective_done(self, seq: int, group: int, now: float) -> None:
        st = self._step
        if st is None or st.seq != seq or st.group != group:
            return
        if st.phase is not StepPhase.COLLECTIVE:
            return
        self._after_group(st, now)
        self.advance(now)

    def advance(self, now: float) -> None:
        """Start, wait for or compute the next layer group while it can go on."""
        while True:
            st = self._step
            if st is None:
                st = self._start_step(now)
                if st is None:
                    self._debt_s = 0.0  # idle: nothing back to back to compensate
                    return
            if st.phase is not StepPhase.WAIT:
                return
            g = st.group
            missing = [t for t in st.turns if t.failed is None and not t.ready[g]]
            if missing:
                if now < st.wait_since + self.cfg.layer_timeout_s:
                    return
                # The whole group waits at this layer: a transfer that stalls must not hold
                # every GPU for a request timeout.
                for t in missing:
                    self._fail_late(
                        t,
                        f"layer group {g} of {t.a.turn_id} did not arrive within "
                        f"{self.cfg.layer_timeout_s:g} s",
                        now,
                    )
                continue
            self._start_interval(st, now)

    def _ready(self, t: TimelineTurn) -> bool:
        return t.ready[0] if self.cfg.layerwise else all(t.ready)

    def _pack(self, gpu: int) -> tuple[PrefillBatch, list[TimelineTurn]]:
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

    def _start_step(self, now: float) -> PrefillStep | None:
        packed = [self._pack(gpu) for gpu in range(self.cfg.num_gpus)]
        if not any(batch.items for batch, _ in packed):
            return None
        cost = self.cfg.cost
        compute_s = max(batch.step_s(cost) for batch, _ in packed) * self.cfg.time_dilation
        self._step_seq += 1
        st = PrefillStep(
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
        self.out.items.append(PrefillStepStats(now, balance, busy, len(packed)))
        for gpu, (_, ts) in enumerate(packed):
            for t in ts:
                if t.computed_tokens == 0:
                    extra = {"node": self.cfg.node_id, "gpu": gpu}
                    self.out.items.append(Emit(t.a.turn_id, "prefill_started", extra))
        return st

    def _group_compute_s(self, st: PrefillStep) -> float:
        if self.cfg.layerwise:
            return st.compute_s / self.cfg.layer_groups
        return st.compute_s if st.group == 0 else 0.0  # Basic: compute once all KV is in

    def _start_interval(self, st: PrefillStep, now: float) -> None:
        planned = self._group_compute_s(st)
        st.planned_s += planned
        if planned <= 0.0:
            self._collective_or_next(st, now)
            return
        st.phase = StepPhase.COMPUTE
        effective = planned - self._debt_s
        self._debt_s = max(-effective, 0.0)  # debt left over when it exceeds the interval
        st.interval = Interval(now, planned, now + max(effective, 0.0))
        if effective <= 0.0:
            self._end_interval(st, now)

    def _end_interval(self, st: PrefillStep, now: float) -> None:
        iv = st.interval
        assert iv is not None
        st.actual_s += now - iv.started
        late = now - iv.deadline
        self._debt_s = min(self._debt_s + late, iv.planned_s)
        st.interval = None
        self._collective_or_next(st, now)

    def _collective_or_next(self, st: PrefillStep, now: float) -> None:
        if self.cfg.collectives:
            st.phase = StepPhase.COLLECTIVE
            self.out.items.append(Collective(("prefill", st.seq, st.group)))
            return
        self._after_group(st, now)

    def _after_group(self, st: PrefillStep, now: float) -> None:
        g = st.group
        if self.cfg.layerwise:  # layer group g of finished turns leaves while g+1 computes
            for t in st.turns:
                if t.a.turn_id in st.done and t.failed is None:
                    self.out.items.append(SendGroup(t.a.turn_id, g))
        if g + 1 < self.cfg.layer_groups:
            st.group = g + 1
            st.phase = StepPhase.WAIT
            st.wait_since = now
            return
        self._finish_step(st, now)

    def _finish_step(self, st: PrefillStep, now: float) -> None:
        self._step = None
        self.out.items.append(
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
                self.out.items.append(Emit(t.a.turn_id, "first_token", {"node": self.cfg.node_id}))
                if not self.cfg.layerwise:
                    for g in range(self.cfg.layer_groups):
                        self.out.items.append(SendGroup(t.a.turn_id, g))
                self.out.items.append(PrefillDone(t.a.turn_id))

"""One decode GPU's steps as a sans-I/O machine: continuous batching, one machine per GPU.

Every active sequence advances one token per step; a step computes for the cost model's
decode time (deadline-driven: lateness carried as debt into the next step), ends with a
collective burst when the node has peers, and a sequence that reached its last token leaves
the batch to persist its new blocks. The node's turns, loads and failures are
services/engine_core.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.timeline import (
    TIMER_SLACK_S,
    Collective,
    Emit,
    EngineLoad,
    Interval,
    Outbox,
    Persist,
    StepPhase,
    StepTimed,
    TimelineConfig,
    TimelineTurn,
    TurnPhase,
)


def persist(t: TimelineTurn, out: Outbox) -> None:
    """Decoding ended: the data plane persists the turn's new blocks."""
    t.phase = TurnPhase.PERSISTING
    out.items.append(Persist(t.a.turn_id))


@dataclass
class DecodeGpu:
    """GPU `index` of a decode node; `load` is its entry of the node's loads (shared)."""

    index: int
    cfg: TimelineConfig
    load: EngineLoad
    out: Outbox
    active: list[TimelineTurn] = field(default_factory=list)
    batch: list[TimelineTurn] = field(default_factory=list)
    phase: StepPhase | None = None
    interval: Interval | None = None
    steps: int = 0
    debt_s: float = 0.0
    started: float = 0.0

    def add(self, t: TimelineTurn, now: float) -> None:
        """A turn whose KV is complete joins the batch (at once when the GPU is idle)."""
        self.active.append(t)
        if self.phase is None:
            self._start_step(now)

    def drop(self, t: TimelineTurn) -> None:
        self.active = [x for x in self.active if x is not t]

    def deadline(self) -> float | None:
        if self.phase is StepPhase.COMPUTE and self.interval is not None:
            return self.interval.deadline
        return None

    def on_timer(self, now: float) -> None:
        if (
            self.phase is StepPhase.COMPUTE
            and self.interval is not None
            and now + TIMER_SLACK_S >= self.interval.deadline
        ):
            self._end_interval(now)

    def on_collective_done(self, steps: int, now: float) -> None:
        if self.phase is not StepPhase.COLLECTIVE or self.steps != steps:
            return
        self._end_step(now)

    def _start_step(self, now: float) -> None:
        """Continuous batching: every active sequence advances one token per step."""
        if not self.active:
            self.phase = None
            self.debt_s = 0.0
            return
        self.batch = list(self.active)
        ctx = sum(t.a.prompt_tokens + t.emitted_tokens for t in self.batch)
        planned = self.cfg.cost.decode_step_s(len(self.batch), ctx) * self.cfg.time_dilation
        self.steps += 1
        self.started = now
        self.phase = StepPhase.COMPUTE
        effective = planned - self.debt_s
        self.debt_s = max(-effective, 0.0)
        self.interval = Interval(now, planned, now + max(effective, 0.0))
        if effective <= 0.0:
            self._end_interval(now)

    def _end_interval(self, now: float) -> None:
        iv = self.interval
        assert iv is not None
        late = now - iv.deadline
        self.debt_s = min(self.debt_s + late, iv.planned_s)
        actual = now - iv.started
        self.out.items.append(StepTimed(iv.started, iv.planned_s, actual, actual - iv.planned_s))
        self.interval = None
        if self.cfg.collectives:
            self.phase = StepPhase.COLLECTIVE
            self.out.items.append(Collective(("decode", self.index, self.steps)))
            return
        self._end_step(now)

    def _end_step(self, now: float) -> None:
        self.load.busy_s += now - self.started
        for t in self.batch:
            if t.failed is not None or t.phase is not TurnPhase.DECODING:
                continue
            t.emitted_tokens += 1
            if t.emitted_tokens == 2:
                self.out.items.append(Emit(t.a.turn_id, "second_token", {"node": self.cfg.node_id}))
            elif t.a.stream_tokens and 2 < t.emitted_tokens < t.a.gen_tokens:
                self.out.items.append(Emit(t.a.turn_id, "token", {"n": t.emitted_tokens}))
            if t.emitted_tokens >= t.a.gen_tokens:
                # Decoding ends here; persisting the new blocks follows in the background
                # (DualPath §3), so TPOT ends at this token, not when `done` is reported.
                self.out.items.append(Emit(t.a.turn_id, "last_token", {"node": self.cfg.node_id}))
                self.active = [x for x in self.active if x is not t]
                persist(t, self.out)
        self.batch = []
        self._start_step(now)

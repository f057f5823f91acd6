"""An engine node's timeline as sans-I/O state machines: its turns, loads and GPU steps.

Inputs are method calls that carry `now` (seconds on a monotonic clock); outputs are actions
drained with `actions()`, and `next_deadline()` says when the shell must call `on_timer(now)`.
It never sleeps, sends or reads (services/engine.py runs it). Moving bytes is the data plane's
job (services/dataplane_core.py): the timeline only learns that a layer group is ready, that a
turn's KV is complete, released or persisted, so byte handling can never move GPU time.

`EngineCore` is the node: it takes the scheduler's turns, the data plane's news and the
shell's timers, keeps each engine's load (DualPath §6) and fails turns; the steps themselves
are services/prefill_core.py's (one machine per prefill node) and services/decode_core.py's
(one per decode GPU). The types they share are services/timeline.py's.
"""

from __future__ import annotations

from services.assignment import TurnAssignment
from services.decode_core import DecodeGpu, persist
from services.prefill_core import PrefillMachine
from services.spec import Role
from services.timeline import (
    Action,
    AssignKv,
    DropKv,
    Emit,
    EngineLoad,
    FailureOrigin,
    Outbox,
    TimelineConfig,
    TimelineTurn,
    TurnPhase,
)
from services.wire.rpc import EngineLoadReport


class EngineCore:
    """The timeline of one prefill or decode node (one engine group: all its GPUs)."""

    def __init__(self, cfg: TimelineConfig) -> None:
        self.cfg = cfg
        self.role = cfg.role
        self.turns: dict[str, TimelineTurn] = {}
        self.loads = [EngineLoad() for _ in range(cfg.num_gpus)]
        self.counters: dict[str, int] = {"turns_prefilled": 0, "turns_decoded": 0}
        self._out = Outbox()
        self._prefill = PrefillMachine(cfg, self.turns, self.loads, self._out, self._fail_late)
        self._gpus = [DecodeGpu(i, cfg, self.loads[i], self._out) for i in range(cfg.num_gpus)]

    # -- outputs -------------------------------------------------------------------------------
    def actions(self) -> list[Action]:
        return self._out.drain()

    def next_deadline(self) -> float | None:
        """When on_timer must be called next (None: nothing is timed)."""
        times: list[float] = []
        t = self._prefill.deadline()
        if t is not None:
            times.append(t)
        for gpu in self._gpus:
            t = gpu.deadline()
            if t is not None:
                times.append(t)
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
            t = TimelineTurn(a, TurnPhase.QUEUED, [False] * groups)
            eng.tok += a.prompt_tokens
            eng.queue.append(a.turn_id)
        else:
            t = TimelineTurn(a, TurnPhase.WAITING_KV, [False] * groups)
            eng.tok += a.kv_tokens
            eng.kv_tokens += a.kv_tokens
        self.turns[a.turn_id] = t
        self._out.items.append(AssignKv(a))
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
            persist(t, self._out)
            return
        t.phase = TurnPhase.DECODING
        self._gpus[t.a.decode_engine].add(t, now)

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
        self._out.items.append(Emit(turn_id, "done", {"tokens": t.a.gen_tokens}))
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
            self._prefill.on_collective_done(key[1], key[2], now)
        else:
            self._gpus[key[1]].on_collective_done(key[2], now)

    def on_timer(self, now: float) -> None:
        self._prefill.on_timer(now)
        for gpu in self._gpus:
            gpu.on_timer(now)

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
            self._out.items.append(Emit(turn_id, "failed", extra))
        if origin is not FailureOrigin.DATA_PLANE:
            self._out.items.append(
                DropKv(turn_id, reason, tell_peer=origin is FailureOrigin.TIMELINE)
            )
        eng = self.loads[t.a.engine(self.role)]
        in_step = self._prefill.holds(t)
        if t.phase is TurnPhase.QUEUED and not in_step and turn_id in eng.queue:
            eng.queue.remove(turn_id)
        if t.phase is TurnPhase.DECODING:
            self._gpus[t.a.decode_engine].drop(t)
        self._release(t)
        if advance:
            self._advance(now)

    def _release(self, t: TimelineTurn) -> None:
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

    def _fail_late(self, t: TimelineTurn, reason: str, now: float) -> None:
        """A layer group of `t` did not arrive in time: the prefill step goes on without it."""
        self._fail(t.a.turn_id, reason, now, FailureOrigin.TIMELINE, retryable=True, advance=False)

    def _advance(self, now: float) -> None:
        if self.role is Role.PREFILL:
            self._prefill.advance(now)

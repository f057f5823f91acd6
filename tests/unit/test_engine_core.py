"""The engine timeline core, driven in memory: every transition of the prefill and decode
timelines, the deadline-driven compute intervals and every failure path. No sleeps: time is
an argument."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.costmodel import CostModel, CostModelParams
from services.assignment import TurnAssignment
from services.engine_core import EngineCore
from services.spec import Role
from services.timeline import (
    Action,
    AssignKv,
    Collective,
    DropKv,
    Emit,
    Persist,
    PrefillDone,
    PrefillStepStats,
    SendGroup,
    StepTimed,
    TimelineConfig,
)
from services.wire.rpc import EngineLoadReport

G = 3
BT = 64
# 10 ms per prefill step + 1 us per new token, no attention; decode 8 ms + 1 ms per sequence.
COST = CostModel(CostModelParams(10.0, 1.0, 0.0, 8.0, 1000.0, 0.0))


def config(role: Role = Role.PREFILL, **kw: Any) -> TimelineConfig:
    base: dict[str, Any] = {
        "node_id": f"{role.value}-0",
        "role": role,
        "num_gpus": 2,
        "layer_groups": G,
        "block_tokens": BT,
        "time_dilation": 1.0,
        "layerwise": True,
        "compute_quota_s": None,
        "layer_timeout_s": 5.0,
        "gpu_kv_capacity_tokens": 100_000,
        "collectives": False,
        "cost": COST,
    }
    base.update(kw)
    return TimelineConfig(**base)


def assignment(turn: str = "t1", *, engine: int = 0, **kw: Any) -> TurnAssignment:
    wire: dict[str, Any] = {
        "turn_id": turn,
        "traj_id": 7,
        "context_tokens": 640,
        "prompt_tokens": 640 + 100,
        "gen_tokens": 4,
        "hit_blocks": 10,
        "prompt_blocks": 12,
        "persist_end_block": 11,
        "prefill_node": "prefill-0",
        "prefill_engine": engine,
        "decode_node": "decode-0",
        "decode_engine": engine,
        "read_side": "prefill",
        "reads": {"prefill": [0, 10], "decode": [0, 0]},
    }
    wire.update(kw)
    return TurnAssignment.from_wire(wire)


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def emits(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.turn_id, a.kind) for a in of(actions, Emit)]


def step_s(new_tokens: int) -> float:
    return COST.prefill_step_s(new_tokens, 0.0)


def ready_all(core: EngineCore, turn: str, now: float) -> None:
    for g in range(G):
        core.on_group_ready(turn, g, now)


def run_timers(core: EngineCore, *, until: float = 1e9, late: float = 0.0) -> float:
    """Fire every deadline in order (each `late` seconds after it is due); return the time."""
    now = 0.0
    while (d := core.next_deadline()) is not None and d <= until:
        now = d + late
        core.on_timer(now)
    return now


# -- prefill ---------------------------------------------------------------------------------


def test_assignment_goes_to_the_data_plane_and_loads_the_engine() -> None:
    core = EngineCore(config())
    core.assign(assignment(engine=1), 0.0)
    acts = core.actions()
    assert of(acts, AssignKv) == [AssignKv(assignment(engine=1))]
    assert core.engine_loads() == [
        EngineLoadReport(0, 0, 0, 100_000),
        EngineLoadReport(1, 1, 740, 100_000),
    ]
    assert core.next_deadline() is None  # nothing ready: nothing timed


def test_a_repeated_assignment_is_ignored() -> None:
    core = EngineCore(config())
    core.assign(assignment(), 0.0)
    core.assign(assignment(), 0.0)
    assert len(of(core.actions(), AssignKv)) == 1
    assert core.engine_loads()[0].seq == 1


def test_an_engine_the_node_lacks_is_an_error() -> None:
    with pytest.raises(ValueError, match="engine 5 of 2"):
        EngineCore(config()).assign(assignment(engine=5), 0.0)


def test_layerwise_step_computes_group_by_group_and_sends_each_group() -> None:
    core = EngineCore(config())
    core.assign(assignment(), 0.0)
    core.actions()
    core.on_group_ready("t1", 0, 1.0)  # group 0 is enough to start (layerwise)
    acts = core.actions()
    assert emits(acts) == [("t1", "prefill_started")]
    stats = of(acts, PrefillStepStats)
    assert stats and stats[0].busy_gpus == 1 and stats[0].num_gpus == 2
    per_group = step_s(100) / G
    assert core.next_deadline() == pytest.approx(1.0 + per_group)
    core.on_timer(1.0 + per_group)
    acts = core.actions()
    assert of(acts, SendGroup) == [SendGroup("t1", 0)]  # group 0 leaves while 1 computes
    # group 1 is not there yet: the step waits, bounded by the layer timeout
    assert core.next_deadline() == pytest.approx(1.0 + per_group + 5.0)
    core.on_group_ready("t1", 1, 1.5)
    core.on_group_ready("t1", 2, 1.5)
    end = run_timers(core)
    acts = core.actions()
    assert of(acts, SendGroup) == [SendGroup("t1", 1), SendGroup("t1", 2)]
    assert emits(acts) == [("t1", "first_token")]
    assert of(acts, PrefillDone) == [PrefillDone("t1")]
    timed = of(acts, StepTimed)
    assert len(timed) == 1 and timed[0].planned_s == pytest.approx(step_s(100))
    assert end == pytest.approx(1.5 + 2 * per_group)
    assert core.engine_loads()[0].seq == 1  # still loaded until the data plane releases it
    core.on_released("t1", end)
    assert (core.engine_loads()[0].seq, core.engine_loads()[0].tok) == (0, 0)
    assert core.counters["turns_prefilled"] == 1
    assert "t1" not in core.turns


def test_basic_waits_for_every_group_then_computes_once_and_sends_all() -> None:
    core = EngineCore(config(layerwise=False, collectives=True))
    core.assign(assignment(), 0.0)
    core.on_group_ready("t1", 0, 0.0)
    core.on_group_ready("t1", 1, 0.0)
    assert core.next_deadline() is None and not emits(core.actions())
    core.on_group_ready("t1", 2, 0.0)
    assert core.next_deadline() == pytest.approx(step_s(100))  # all compute in group 0
    core.on_timer(step_s(100))
    # every layer group still ends with the group's all-to-all
    for g in range(G):
        colls = of(core.actions(), Collective)
        assert colls == [Collective(("prefill", 1, g))]
        core.on_collective_done(colls[0].key, step_s(100))
    acts = core.actions()
    assert of(acts, SendGroup) == [SendGroup("t1", g) for g in range(G)]
    assert of(acts, PrefillDone) == [PrefillDone("t1")]


def test_collective_of_another_step_or_group_is_ignored() -> None:
    core = EngineCore(config(collectives=True))
    core.assign(assignment(), 0.0)
    ready_all(core, "t1", 0.0)
    run_timers(core)
    assert of(core.actions(), Collective) == [Collective(("prefill", 1, 0))]
    core.on_collective_done(("prefill", 1, 1), 1.0)
    core.on_collective_done(("prefill", 2, 0), 1.0)
    core.on_collective_done(("decode", 0, 1), 1.0)
    assert core.next_deadline() is None  # still waiting for the right burst
    core.on_collective_done(("prefill", 1, 0), 1.0)
    assert core.next_deadline() == pytest.approx(1.0 + step_s(100) / G)


def test_gpus_step_together_for_as_long_as_the_slowest() -> None:
    core = EngineCore(config(layer_groups=1))
    core.assign(assignment("t0", engine=0), 0.0)
    core.on_group_ready("t0", 0, 0.0)  # step 1 runs t0 alone
    core.assign(assignment("t1", engine=0), 0.0)
    core.assign(assignment("t2", engine=1, prompt_tokens=640 + 1000, prompt_blocks=26), 0.0)
    core.on_group_ready("t1", 0, 0.001)
    core.on_group_ready("t2", 0, 0.001)
    core.actions()
    core.on_timer(step_s(100))  # step 2 packs one turn per GPU
    acts = core.actions()
    assert sorted(emits(acts)) == [
        ("t0", "first_token"),
        ("t1", "prefill_started"),
        ("t2", "prefill_started"),
    ]
    assert of(acts, PrefillStepStats)[0].busy_gpus == 2
    assert core.next_deadline() == pytest.approx(step_s(100) + step_s(1000))
    run_timers(core)
    assert sorted(p.turn_id for p in of(core.actions(), PrefillDone)) == ["t1", "t2"]


def test_quota_chunks_a_long_prefill_over_several_steps() -> None:
    # attention 1 ns per pair: a 2,000-token prompt on 640 cached tokens exceeds a 1 ms quota
    cost = CostModel(CostModelParams(10.0, 1.0, 1.0, 8.0, 1000.0, 0.0))
    core = EngineCore(config(compute_quota_s=0.001, cost=cost))
    core.assign(assignment(prompt_tokens=640 + 2000, prompt_blocks=42), 0.0)
    ready_all(core, "t1", 0.0)
    run_timers(core)
    acts = core.actions()
    assert emits(acts).count(("t1", "prefill_started")) == 1
    assert ("t1", "first_token") in emits(acts)
    assert len(of(acts, PrefillStepStats)) > 1  # several steps, one first token
    assert len(of(acts, PrefillDone)) == 1
    assert core.turns["t1"].computed_tokens == 2000


def test_ready_turns_do_not_wait_behind_a_turn_still_loading() -> None:
    core = EngineCore(config())
    core.assign(assignment("t1"), 0.0)
    core.assign(assignment("t2"), 0.0)
    ready_all(core, "t2", 0.0)
    assert ("t2", "prefill_started") in emits(core.actions())


def test_a_late_timer_shortens_the_next_interval_deadline_driven() -> None:
    core = EngineCore(config())
    core.assign(assignment(), 0.0)
    ready_all(core, "t1", 0.0)
    per_group = step_s(100) / G
    core.on_timer(per_group + 0.003)  # the host woke us 3 ms late
    assert core.next_deadline() == pytest.approx(per_group + 0.003 + per_group - 0.003)
    run_timers(core)
    timed = of(core.actions(), StepTimed)[0]
    # the debt was paid back inside the step: it ended on its planned time
    assert timed.actual_s == pytest.approx(step_s(100))
    assert timed.late_s == pytest.approx(0.0, abs=1e-9)


def test_lateness_that_is_not_paid_back_is_reported() -> None:
    core = EngineCore(config(layer_groups=1))
    core.assign(assignment(), 0.0)
    core.on_group_ready("t1", 0, 0.0)
    run_timers(core, late=0.004)
    timed = of(core.actions(), StepTimed)[0]
    assert timed.late_s == pytest.approx(0.004)
    assert timed.planned_s == pytest.approx(step_s(100))


def test_idle_time_clears_the_debt() -> None:
    core = EngineCore(config(layer_groups=1))
    core.assign(assignment("t1"), 0.0)
    core.on_group_ready("t1", 0, 0.0)
    run_timers(core, late=0.004)
    core.assign(assignment("t2"), 5.0)
    core.on_group_ready("t2", 0, 5.0)
    assert core.next_deadline() == pytest.approx(5.0 + step_s(100))


def test_layer_timeout_fails_the_missing_turn_and_the_step_goes_on() -> None:
    core = EngineCore(config())
    core.assign(assignment("t1"), 0.0)
    core.assign(assignment("t2"), 0.0)
    ready_all(core, "t1", 0.0)
    core.on_group_ready("t2", 0, 0.0)  # t2's group 1 never comes
    core.actions()
    now = run_timers(core, until=100.0)
    acts = core.actions()
    failed = [a for a in of(acts, Emit) if a.kind == "failed"]
    assert [f.turn_id for f in failed] == ["t2"]
    assert failed[0].extra["retryable"] is True
    assert "did not arrive within 5 s" in failed[0].extra["reason"]
    assert of(acts, DropKv) == [DropKv("t2", failed[0].extra["reason"], tell_peer=True)]
    assert [p.turn_id for p in of(acts, PrefillDone)] == ["t1"]
    assert "t2" not in core.turns
    assert core.loads[0].queue == __import__("collections").deque()  # t1 done, t2 removed
    assert core.engine_loads()[0].seq == 1  # t1 until released
    assert now >= 5.0


def test_data_plane_failure_of_a_queued_turn() -> None:
    core = EngineCore(config())
    core.assign(assignment(), 0.0)
    core.actions()
    core.on_failed("t1", "storage read failed", 1.0, retryable=True, report=True)
    acts = core.actions()
    assert emits(acts) == [("t1", "failed")]
    assert not of(acts, DropKv)  # the data plane failed it: it has dropped it already
    assert (core.engine_loads()[0].seq, core.engine_loads()[0].tok) == (0, 0)
    assert not core.loads[0].queue


def test_a_failure_the_peer_reports_is_not_reported_twice() -> None:
    core = EngineCore(config())
    core.assign(assignment(), 0.0)
    core.actions()
    core.on_failed("t1", "decode-0 failed the turn", 1.0, retryable=True, report=False)
    assert not emits(core.actions())
    assert "t1" not in core.turns


def test_scheduler_cancel_drops_without_telling_anyone() -> None:
    core = EngineCore(config())
    core.assign(assignment(), 0.0)
    core.actions()
    core.cancel("t1", "node lost", 1.0)
    acts = core.actions()
    assert not emits(acts)
    assert of(acts, DropKv) == [DropKv("t1", "cancelled by the scheduler: node lost", False)]
    core.cancel("unknown", "x", 1.0)  # nothing to do
    assert not core.actions()


def test_failure_during_a_step_skips_its_sends_and_frees_the_queue() -> None:
    core = EngineCore(config())
    core.assign(assignment("t1"), 0.0)
    core.assign(assignment("t2"), 0.0)
    ready_all(core, "t1", 0.0)
    ready_all(core, "t2", 0.0)
    core.actions()
    core.on_failed("t2", "corrupt KV", 0.001, retryable=False, report=True)
    run_timers(core)
    acts = core.actions()
    assert {s.turn_id for s in of(acts, SendGroup)} == {"t1"}
    assert [p.turn_id for p in of(acts, PrefillDone)] == ["t1"]
    assert list(core.loads[0].queue) == []


def test_failure_while_finishing_releases_once() -> None:
    core = EngineCore(config())
    core.assign(assignment(), 0.0)
    ready_all(core, "t1", 0.0)
    run_timers(core)
    core.actions()
    core.on_failed("t1", "send failed", 2.0, retryable=True, report=True)
    core.on_released("t1", 2.0)  # too late: ignored
    assert (core.engine_loads()[0].seq, core.engine_loads()[0].tok) == (0, 0)
    assert core.counters["turns_prefilled"] == 0


def test_group_ready_for_an_unknown_group_is_an_error() -> None:
    core = EngineCore(config())
    core.assign(assignment(), 0.0)
    with pytest.raises(ValueError, match="layer group 3 of 3"):
        core.on_group_ready("t1", 3, 0.0)


def test_events_for_unknown_turns_are_ignored() -> None:
    core = EngineCore(config())
    core.on_group_ready("x", 0, 0.0)
    core.on_released("x", 0.0)
    core.on_failed("x", "r", 0.0, retryable=False, report=True)
    assert not core.actions()


# -- decode ----------------------------------------------------------------------------------


def decode_core(**kw: Any) -> EngineCore:
    return EngineCore(config(Role.DECODE, **kw))


def test_decode_waits_for_the_full_context_then_steps_token_by_token() -> None:
    core = decode_core()
    core.assign(assignment(gen_tokens=4), 0.0)
    assert of(core.actions(), AssignKv)
    assert core.engine_loads()[0] == EngineLoadReport(0, 1, 744, 100_000 - 744)
    assert core.next_deadline() is None
    core.on_kv_complete("t1", 1.0)
    d = COST.decode_step_s(1, 741)
    assert core.next_deadline() == pytest.approx(1.0 + d)
    core.on_timer(1.0 + d)
    acts = core.actions()
    assert emits(acts) == [("t1", "second_token")]
    assert len(of(acts, StepTimed)) == 1
    run_timers(core)
    acts = core.actions()
    assert of(acts, Persist) == [Persist("t1")]  # tokens 3 and 4 came, then persist
    assert len(of(acts, StepTimed)) == 2
    assert core.next_deadline() is None
    core.on_persisted("t1", 9.0)
    assert emits(core.actions()) == [("t1", "done")]
    assert core.engine_loads()[0] == EngineLoadReport(0, 0, 0, 100_000)
    assert core.counters["turns_decoded"] == 1


def test_a_single_token_turn_persists_without_decoding() -> None:
    core = decode_core()
    core.assign(assignment(gen_tokens=1), 0.0)
    core.on_kv_complete("t1", 0.0)
    assert of(core.actions(), Persist) == [Persist("t1")]
    assert core.next_deadline() is None


def test_continuous_batching_joins_at_the_next_step() -> None:
    core = decode_core(collectives=True)
    core.assign(assignment("t1", gen_tokens=10), 0.0)
    core.assign(assignment("t2", gen_tokens=10), 0.0)
    core.on_kv_complete("t1", 0.0)
    first = core.next_deadline()
    assert first == pytest.approx(COST.decode_step_s(1, 741))
    core.on_kv_complete("t2", 0.001)  # mid-step: joins the next one
    assert core.next_deadline() == first
    core.on_timer(first)
    coll = of(core.actions(), Collective)
    assert coll == [Collective(("decode", 0, 1))]
    core.on_collective_done(coll[0].key, first + 0.002)
    assert core.next_deadline() == pytest.approx(first + 0.002 + COST.decode_step_s(2, 742 + 741))


def test_gpus_decode_independently() -> None:
    core = decode_core()
    core.assign(assignment("t1", engine=0, gen_tokens=2), 0.0)
    core.assign(assignment("t2", engine=1, gen_tokens=2), 0.0)
    core.on_kv_complete("t1", 0.0)
    core.on_kv_complete("t2", 0.5)
    assert core.next_deadline() == pytest.approx(COST.decode_step_s(1, 741))
    core.on_timer(COST.decode_step_s(1, 741))
    assert core.next_deadline() == pytest.approx(0.5 + COST.decode_step_s(1, 741))


def test_failure_while_decoding_leaves_the_batch() -> None:
    core = decode_core()
    core.assign(assignment("t1", gen_tokens=50), 0.0)
    core.assign(assignment("t2", gen_tokens=50), 0.0)
    core.on_kv_complete("t1", 0.0)
    core.on_kv_complete("t2", 0.0)
    core.actions()
    core.on_failed("t2", "kv lost", 0.001, retryable=True, report=True)
    end = run_timers(core, until=0.1)
    acts = core.actions()
    assert ("t2", "failed") in emits(acts)
    assert ("t2", "second_token") not in emits(acts)
    assert ("t1", "second_token") in emits(acts)
    assert core.engine_loads()[0].seq == 1
    assert end > 0


def test_kv_complete_for_a_failed_or_decoding_turn_is_ignored() -> None:
    core = decode_core()
    core.assign(assignment(), 0.0)
    core.on_kv_complete("t1", 0.0)
    deadline = core.next_deadline()
    core.on_kv_complete("t1", 0.0)
    assert core.next_deadline() == deadline
    core.cancel("t1", "x", 0.0)
    core.on_persisted("t1", 0.0)
    assert ("t1", "done") not in emits(core.actions())


def test_config_refuses_a_non_engine_role() -> None:
    with pytest.raises(ValueError, match="engine role"):
        config(Role.STORAGE)


def test_the_last_token_is_reported_before_persisting() -> None:
    core = decode_core()
    core.assign(assignment(gen_tokens=3), 0.0)
    core.on_kv_complete("t1", 0.0)
    run_timers(core)
    acts = core.actions()
    kinds = [k for _, k in emits(acts)]
    assert kinds == ["second_token", "last_token"]
    assert of(acts, Persist) == [Persist("t1")]

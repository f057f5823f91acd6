"""The scheduler's turn table (services/scheduler/state.py), without sockets: submit, fetch,
deliver, report, with the typed messages of services.wire.rpc."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lab.config.cluster import build_cluster_spec
from lab.config.models import parse_config
from scheduler.read_side import tie_side
from scheduler.registry import PolicyKnobs, make_policy
from services.scheduler.state import FINISHED_RETENTION_S, SchedulerState, policy_for
from services.spec import Role
from services.wire.rpc import (
    AssignedTurn,
    Cancellation,
    EngineLoadReport,
    FetchRequest,
    MessageError,
    ReadRanges,
    ReportRequest,
    TurnEvent,
    TurnSubmission,
    decode_as,
    json_body,
)


def make_state() -> SchedulerState:
    """A 1P1D dualpath cluster placing turns by least tokens on the shorter-queue side."""
    cfg = parse_config(
        {"policy": "dualpath", "cluster": {"gpus_per_node": 1, "cnic_gbit_per_gpu": 1600}}
    )
    spec = build_cluster_spec(cfg, lab_id="u", backend="netns", data_dir=Path("/nonexistent"))
    return SchedulerState(spec, make_policy("least_tokens", PolicyKnobs(beta_tokens=10**9)))


def body(traj: int, context: int = 6400) -> dict[str, Any]:
    return {
        "traj_id": traj,
        "turn_index": 1,
        "context_tokens": context,
        "append_tokens": 100,
        "gen_tokens": 5,
    }


def turn_of(traj: int, context: int = 6400) -> TurnSubmission:
    return decode_as(body(traj, context), TurnSubmission)


def fetch(
    state: SchedulerState,
    node: str,
    *,
    read_q: int = 0,
    turns: tuple[str, ...] = (),
    boot: str = "b1",
) -> list[AssignedTurn]:
    req = FetchRequest(
        node_id=node,
        boot=boot,
        role=node.split("-")[0],
        read_q_tokens=read_q,
        engines=(EngineLoadReport(0, len(turns), 0, 10**9),),
        turns=turns,
    )
    return list(state.fetch(req, 0.0).assignments)


@pytest.mark.parametrize(
    ("field", "value"), [("context_tokens", -1), ("gen_tokens", 0), ("traj_id", "x")]
)
def test_bad_turns_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(MessageError, match=field):
        decode_as({**body(1), field: value}, TurnSubmission)


def test_nothing_is_assigned_until_every_engine_node_reported() -> None:
    state = make_state()
    state.submit(turn_of(1), 0.0)
    assert fetch(state, "prefill-0") == []
    fetch(state, "decode-0")
    got = fetch(state, "prefill-0")
    assert [w.traj_id for w in got] == [1]
    assert got[0].hit_blocks == 100 and got[0].prompt_blocks == 102
    # the decode node gets the same turn on its next fetch, once
    assert [w.turn_id for w in fetch(state, "decode-0")] == [got[0].turn_id]
    assert fetch(state, "decode-0") == []


def test_finished_prefill_work_is_not_counted_again() -> None:
    """A turn the prefill node has finished (but the decode node still decodes) must not be
    added back to a node's read queue: that pushed every later read to the other side.
    Equal queues go to the node that has read less, so equal turns alternate sides."""
    state = make_state()
    fetch(state, "decode-0")
    sides = []
    for traj in range(1, 5):
        state.submit(turn_of(traj), 0.0)
        got = fetch(state, "prefill-0")
        sides.append(got[0].read_side)
        tid = got[0].turn_id
        fetch(state, "decode-0", turns=(tid,))  # the decode node holds it until it decodes
        # the prefill node reported the turn, read it and finished its prefill: gone there
        fetch(state, "prefill-0", turns=(tid,))
        fetch(state, "prefill-0", turns=())
        views = [*(state.view(Role.PREFILL) or []), *(state.view(Role.DECODE) or [])]
        assert [v.read_q_tokens for v in views] == [0, 0]
    assert sides[0] == tie_side("t1").value  # nothing read anywhere yet: the coin decides
    assert sorted(sides[:2]) == sorted(sides[2:]) == ["decode", "prefill"]
    totals = [v.read_total_tokens for v in state.view(Role.PREFILL) or []]
    assert totals == [2 * 6400]  # two 6,400-token hits read on the prefill node


def test_events_finish_a_turn_once() -> None:
    state = make_state()
    turn = state.submit(turn_of(1), 0.0)
    tid = turn.pending.turn_id
    state.report(
        ReportRequest(
            (TurnEvent(tid, "done", 1.0, {}), TurnEvent(tid, "failed", 2.0, {"reason": "x"}))
        )
    )
    assert [e["event"] for e in turn.events] == ["queued", "done"]
    assert state.num_done == 1 and state.num_failed == 0


def test_split_reads_cover_the_hit_blocks_and_charge_both_queues() -> None:
    cfg = parse_config(
        {
            "policy": "dualpath",
            "cluster": {"gpus_per_node": 1, "cnic_gbit_per_gpu": 1600},
            "scheduling": {"split_reads": True, "alpha_tokens": 10**9, "beta_tokens": 10**9},
        }
    )
    spec = build_cluster_spec(cfg, lab_id="u", backend="netns", data_dir=Path("/nonexistent"))
    state = SchedulerState(spec, policy_for(spec))
    fetch(state, "decode-0")
    fetch(state, "prefill-0")
    state.submit(turn_of(1), 0.0)
    (first,) = fetch(state, "prefill-0", read_q=3200)  # 50 blocks queued on the prefill side
    # both sides finish together: 50 + 25 blocks on the prefill side, 75 on the decode side
    assert first.reads == ReadRanges(prefill=(0, 25), decode=(25, 100))
    assert first.hit_blocks == 100
    # the next fetch sees the split charged to both nodes until their reports cover it
    queues = {
        n.node_id: n.read_q_tokens for r in (Role.PREFILL, Role.DECODE) for n in state.view(r) or ()
    }
    assert queues == {"prefill-0": 3200 + 25 * 64, "decode-0": 75 * 64}


def test_a_node_that_stops_fetching_is_lost_and_its_turns_fail_retryably() -> None:
    state = make_state()
    timeout = state.spec.node_timeout_s
    fetch(state, "decode-0")
    fetch(state, "prefill-0")
    turn = state.submit(turn_of(1), 0.0)
    (wire,) = fetch(state, "prefill-0")
    assert state.reap(timeout / 2) == []  # both reported at 0.0: not lost yet
    assert sorted(state.reap(timeout + 1.0)) == ["decode-0", "prefill-0"]
    assert state.reap(timeout + 2.0) == []  # lost once, not again
    assert state.lost == {"prefill-0", "decode-0"}
    last = turn.events[-1]
    assert last["event"] == "failed" and last["retryable"] is True
    assert "lost" in last["reason"] and turn.finished
    # no view of a lost node, so nothing is assigned; a node that fetches again is back
    state.submit(turn_of(2), 0.0)
    assert state.view(Role.PREFILL) == [] and state.view(Role.DECODE) == []
    fetch(state, "decode-0")
    assert state.lost == {"prefill-0"}
    got = fetch(state, "prefill-0")
    assert state.lost == set() and [w.traj_id for w in got] == [2]
    assert wire.turn_id != got[0].turn_id


def test_a_restarted_node_fails_the_turns_it_held() -> None:
    state = make_state()
    fetch(state, "decode-0")
    fetch(state, "prefill-0")
    turn = state.submit(turn_of(1), 0.0)
    fetch(state, "prefill-0")
    fetch(state, "decode-0")  # same process: nothing happens
    assert not turn.finished
    fetch(state, "decode-0", boot="b2")  # a new process: what the old one held is gone
    assert turn.finished and turn.events[-1]["reason"] == "node decode-0 restarted"
    assert turn.events[-1]["retryable"] is True


def test_a_node_is_told_to_drop_turns_that_failed_elsewhere() -> None:
    state = make_state()
    fetch(state, "decode-0")
    fetch(state, "prefill-0")
    turn = state.submit(turn_of(1), 0.0)
    (wire,) = fetch(state, "prefill-0")
    held = (wire.turn_id,)
    fetch(state, "prefill-0", turns=held)
    assert state.cancelled("prefill-0") == ()
    fetch(state, "decode-0", boot="b2")  # the decode node restarted: the turn fails
    assert turn.finished
    fetch(state, "prefill-0", turns=held)
    assert state.cancelled("prefill-0") == (Cancellation(wire.turn_id, "node decode-0 restarted"),)
    fetch(state, "prefill-0")  # once the node dropped it, nothing is left to cancel
    assert state.cancelled("prefill-0") == ()


def test_a_cancelled_queued_turn_is_never_assigned() -> None:
    state = make_state()
    t = state.submit(turn_of(1), 0.0)
    state.cancel(t.pending.turn_id, "the client closed the request", 1.0)
    assert t.finished and list(state.queue) == []
    fetch(state, "decode-0")
    assert fetch(state, "prefill-0") == []


def test_finished_turns_are_forgotten_once_nobody_holds_them() -> None:
    state = make_state()
    fetch(state, "decode-0")
    a, b = state.submit(turn_of(1), 0.0), state.submit(turn_of(2), 0.0)
    fetch(state, "prefill-0")
    ta, tb = a.pending.turn_id, b.pending.turn_id
    state.event(ta, "done", 1.0)
    state.event(tb, "failed", 1.0, reason="x", retryable=True)
    assert state.prune(1.0 + FINISHED_RETENTION_S / 2) == 0  # too recent
    fetch(state, "decode-0", turns=(tb,))  # the decode node still holds the failed one
    assert state.prune(2.0 + FINISHED_RETENTION_S) == 1
    assert ta not in state.turns and tb in state.turns
    assert state.cancelled("decode-0") == (
        Cancellation(tb, "x"),
    )  # so it can still be told to drop it
    fetch(state, "decode-0")
    assert state.prune(3.0 + FINISHED_RETENTION_S) == 1 and state.turns == {}
    state.event(ta, "done", 4.0)  # a late event of a forgotten turn changes nothing
    assert state.num_done == 1 and state.turns == {}


def test_status_and_cluster_bodies_keep_their_json_shape() -> None:
    state = make_state()
    fetch(state, "decode-0")
    fetch(state, "decode-0", boot="b2")  # restarted: the old process's counters stay
    status = json.loads(json.dumps(json_body(state.status(0.5))))  # as served
    assert status == {
        "policy": "least_tokens",
        "queue": 0,
        "turns": 0,
        "done": 0,
        "failed": 0,
        "ready": False,
        "nodes": {
            "decode-0": {
                "role": "decode",
                "age_s": 0.5,
                "read_q_tokens": 0,
                "engines": [{"engine": 0, "seq": 0, "tok": 0, "free_kv_tokens": 10**9}],
            }
        },
    }
    assert json_body(state.cluster()) == {
        "decode-0": {"role": "decode", "counters": {}, "boot": "b2"},
        "decode-0@b1": {"role": "decode", "counters": {}, "boot": "b1", "retired": True},
    }

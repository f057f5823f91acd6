"""Content-addressed KV blocks: the catalogue, a keyed turn through the scheduler's table, an
assignment whose hit blocks live in other trajectories, and the data-plane core reading and
checking them (services/prefixes.py, services/scheduler/state.py, services/assignment.py,
services/dataplane_core.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab.config.cluster import build_cluster_spec
from lab.config.models import parse_config
from scheduler.registry import PolicyKnobs, make_policy
from services.assignment import AssignmentError, TurnAssignment
from services.dataplane_core import (
    DataPlaneConfig,
    DataPlaneCore,
    Failed,
    GroupReady,
    StartRead,
    Write,
)
from services.kvblocks import SliceSet
from services.prefixes import PrefixCatalogue
from services.scheduler.state import SchedulerState, SubmissionError
from services.spec import Role
from services.wire.rpc import (
    EngineLoadReport,
    FetchRequest,
    MessageError,
    ReportRequest,
    TurnEvent,
    TurnSubmission,
    decode_as,
)

# -- the catalogue ---------------------------------------------------------------------------


def test_the_longest_persisted_prefix_is_found_with_where_each_block_lives() -> None:
    cat = PrefixCatalogue()
    cat.persisted(1, [10, 11, 12], range(0, 3))
    cat.persisted(2, [10, 11, 12, 13, 14], range(3, 5))  # request 2 read 0..3, wrote 3..5
    assert cat.lookup([10, 11, 12, 13, 14, 15]) == (5, ((1, 0, 3), (2, 3, 5)))
    assert cat.lookup([10, 99, 12]) == (1, ((1, 0, 1),))  # the first miss ends the hit
    assert cat.lookup([99, 11]) == (0, ())
    assert len(cat) == 5


def test_a_key_keeps_its_first_home_and_a_known_key_elsewhere_is_a_miss() -> None:
    cat = PrefixCatalogue()
    assert cat.persisted(1, [10, 11], range(0, 2)) == 2
    assert cat.persisted(2, [10, 11], range(0, 2)) == 0  # persisted twice, first home kept
    assert cat.lookup([10, 11]) == (2, ((1, 0, 2),))
    # key 10 lives at position 0; a prompt that has it at position 1 does not hit it
    assert cat.lookup([5, 10]) == (0, ())


# -- the scheduler's table --------------------------------------------------------------------

BT = 64


def make_state() -> SchedulerState:
    cfg = parse_config(
        {"policy": "dualpath", "cluster": {"gpus_per_node": 1, "cnic_gbit_per_gpu": 1600}}
    )
    spec = build_cluster_spec(cfg, lab_id="u", backend="netns", data_dir=Path("/nonexistent"))
    return SchedulerState(spec, make_policy("least_tokens", PolicyKnobs(beta_tokens=10**9)))


def keyed(traj: int, keys: list[int], extra_tokens: int = 10) -> TurnSubmission:
    body = {
        "traj_id": traj,
        "turn_index": 0,
        "context_tokens": 0,
        "append_tokens": len(keys) * BT + extra_tokens,
        "gen_tokens": 3,
        "block_keys": keys,
    }
    return decode_as(body, TurnSubmission)


def fetch(state: SchedulerState, node: str) -> list[Any]:
    req = FetchRequest(
        node_id=node,
        boot="b1",
        role=node.split("-")[0],
        read_q_tokens=0,
        engines=(EngineLoadReport(0, 0, 0, 10**9),),
    )
    return list(state.fetch(req, 0.0).assignments)


def done(state: SchedulerState, turn_id: str) -> None:
    state.report(ReportRequest((TurnEvent(turn_id, "done", 1.0, {}),)))


def test_a_keyed_request_reads_the_prefix_others_persisted_and_persists_its_own_blocks() -> None:
    state = make_state()
    fetch(state, "decode-0")
    first = state.submit(keyed(1, [1, 2, 3]), 0.0)
    (a1,) = fetch(state, "prefill-0")
    # nothing persisted yet: no hit; its 3 full blocks (of 4 the prompt spans) are persisted
    assert (a1.hit_blocks, a1.prompt_blocks, a1.persist_end_block) == (0, 4, 3)
    assert a1.context_tokens == 0 and a1.sources == ()
    # not before it is done: a block is known once it is in storage
    state.submit(keyed(2, [1, 2, 3, 4]), 0.0)
    (early,) = fetch(state, "prefill-0")
    assert early.hit_blocks == 0
    done(state, first.turn_id)
    state.submit(keyed(3, [1, 2, 3, 4, 5]), 0.0)
    (a3,) = fetch(state, "prefill-0")
    assert (a3.hit_blocks, a3.context_tokens, a3.prompt_tokens) == (3, 3 * BT, 5 * BT + 10)
    assert a3.sources == ((1, 0, 3),)
    assert a3.persist_end_block == 5  # blocks 3 and 4 are new: written under trajectory 3
    event = next(e for e in state.turns[a3.turn_id].events if e["event"] == "assigned")
    assert (event["hit_blocks"], event["prompt_blocks"]) == (3, 6)
    # the assignment an engine node receives checks out and reads from trajectory 1
    ta = a3.turn_assignment()
    assert ta.pieces(range(0, 5)) == [(1, range(0, 3)), (3, range(3, 5))]


def test_keys_that_do_not_cover_the_prompt_are_refused() -> None:
    state = make_state()
    bad = decode_as(
        {
            "traj_id": 1,
            "turn_index": 0,
            "context_tokens": 0,
            "append_tokens": 3 * BT,
            "gen_tokens": 1,
            "block_keys": [1, 2],
        },
        TurnSubmission,
    )
    with pytest.raises(SubmissionError, match=r"2 keys for a prompt of 192 tokens.*3 full"):
        state.submit(bad, 0.0)
    assert not state.turns and not state.queue


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"context_tokens": 64}, "context_tokens 0"),
        ({"block_keys": [-1]}, "block_keys"),
        ({"block_keys": [1 << 63]}, "block_keys"),
    ],
)
def test_a_bad_keyed_submission_names_the_field(change: dict[str, Any], match: str) -> None:
    body = {
        "traj_id": 1,
        "turn_index": 0,
        "context_tokens": 0,
        "append_tokens": 64,
        "gen_tokens": 1,
        "block_keys": [1],
        **change,
    }
    with pytest.raises((MessageError, ValueError), match=match):
        decode_as(body, TurnSubmission)


# -- assignments with sources --------------------------------------------------------------------


def wire(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "turn_id": "t1",
        "traj_id": 9,
        "context_tokens": 640,
        "prompt_tokens": 740,
        "gen_tokens": 4,
        "hit_blocks": 10,
        "prompt_blocks": 12,
        "persist_end_block": 11,
        "prefill_node": "prefill-0",
        "prefill_engine": 0,
        "decode_node": "decode-0",
        "decode_engine": 0,
        "read_side": "split",
        "reads": {"prefill": [0, 4], "decode": [4, 10]},
        "sources": [[1, 0, 3], [2, 3, 10]],
    }
    out.update(kw)
    return out


@pytest.mark.parametrize(
    ("sources", "match"),
    [
        ([[1, 0, 3], [2, 4, 10]], r"sources\[1\].*does not continue at 3"),
        ([[1, 0, 3]], "covers 3 blocks, the turn hits 10"),
        ([[1, 0]], r"sources\[0\]' must be \[traj, first, end\]"),
        ([[1, 0, 0], [1, 0, 10]], r"sources\[0\]"),
        ("x", "must be a list"),
    ],
)
def test_bad_sources_are_refused_naming_the_field(sources: Any, match: str) -> None:
    with pytest.raises(AssignmentError, match=match):
        TurnAssignment.from_wire(wire(sources=sources))


def test_sources_round_trip_and_say_which_trajectory_holds_a_block() -> None:
    a = TurnAssignment.from_wire(wire())
    assert TurnAssignment.from_wire(a.to_wire()) == a
    assert a.pieces(range(2, 12)) == [(1, range(2, 3)), (2, range(3, 10)), (9, range(10, 12))]
    assert a.owns(1, (0, 1, 2)) and a.owns(2, (5, 9)) and a.owns(9, (10, 11))
    assert not a.owns(9, (2,)) and not a.owns(1, (2, 3)) and not a.owns(2, (9, 10))


G = 2


def prefill_reads_all() -> TurnAssignment:
    """The prefill node reads all 10 hit blocks: 0-3 of trajectory 1, 3-10 of trajectory 2."""
    return TurnAssignment.from_wire(
        wire(read_side="prefill", reads={"prefill": [0, 10], "decode": [0, 0]})
    )


def core(role: Role) -> DataPlaneCore:
    return DataPlaneCore(DataPlaneConfig(f"{role.value}-0", role, G, False))


def test_the_data_plane_reads_each_trajectory_and_is_ready_after_the_last() -> None:
    c = core(Role.PREFILL)
    c.assign(prefill_reads_all(), 0.0)
    assert c.actions() == [StartRead("t1", 1, range(0, 3)), StartRead("t1", 2, range(3, 10))]
    c.on_read_done("t1")
    assert c.actions() == []  # one of two reads in
    c.on_read_done("t1")
    assert c.actions() == [GroupReady("t1", 0), GroupReady("t1", 1)]


def test_the_decode_side_takes_kv_of_the_trajectories_that_hold_it_and_writes_its_own() -> None:
    c = core(Role.DECODE)
    c.assign(prefill_reads_all(), 0.0)
    c.actions()
    for g in range(G):
        c.on_kv("t1", SliceSet(1, (0, 1, 2), g, g + 1), 0.0)
        c.on_kv("t1", SliceSet(2, tuple(range(3, 10)), g, g + 1), 0.0)
        c.on_kv("t1", SliceSet(9, (10, 11), g, g + 1), 0.0)
    c.on_kv_done("t1", 0.0)
    assert [type(a).__name__ for a in c.actions()] == ["KvComplete"]
    c.persist("t1")
    assert c.actions() == [Write("t1", 9, range(10, 11))]


def test_kv_under_the_wrong_trajectory_fails_the_turn() -> None:
    c = core(Role.DECODE)
    c.assign(prefill_reads_all(), 0.0)
    c.actions()
    c.on_kv("t1", SliceSet(9, (0, 1), 0, 1), 0.0)  # blocks 0-1 live in trajectory 1
    (failed,) = [a for a in c.actions() if isinstance(a, Failed)]
    assert "trajectory 9 does not hold blocks [0, 1]" in failed.reason

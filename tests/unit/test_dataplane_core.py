"""The engine data-plane core, driven in memory: reads, relay, sends, completeness, binding of
frames to their turn, parked frames, and every failure path."""

from __future__ import annotations

from typing import Any

import pytest

from services.assignment import TurnAssignment
from services.dataplane_core import (
    Action,
    DataPlaneConfig,
    DataPlaneCore,
    Discarded,
    Failed,
    FreeBuffers,
    GroupReady,
    KvComplete,
    Persisted,
    Relay,
    Released,
    SendKv,
    SendKvDone,
    StartRead,
    TellPeer,
    Write,
)
from services.kvblocks import SliceSet
from services.spec import Role

G = 2


def core(role: Role, *, oracle: bool = False, **kw: Any) -> DataPlaneCore:
    cfg = DataPlaneConfig(f"{role.value}-0", role, G, oracle, **kw)
    return DataPlaneCore(cfg)


def assignment(turn: str = "t1", **kw: Any) -> TurnAssignment:
    """10 hit blocks; the prompt spans 12; by default the prefill node reads all 10."""
    wire: dict[str, Any] = {
        "turn_id": turn,
        "traj_id": 7,
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
        "read_side": "prefill",
        "reads": {"prefill": [0, 10], "decode": [0, 0]},
    }
    wire.update(kw)
    return TurnAssignment.from_wire(wire)


DE_READS = {"read_side": "decode", "reads": {"prefill": [0, 0], "decode": [0, 10]}}
SPLIT = {"read_side": "split", "reads": {"prefill": [0, 4], "decode": [4, 10]}}


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def group(blocks: range | list[int], g: int, traj: int = 7) -> SliceSet:
    return SliceSet(traj, tuple(blocks), g, g + 1)


# -- prefill side -----------------------------------------------------------------------------


def test_prefill_read_then_every_group_is_ready() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(), 0.0)
    assert c.actions() == [StartRead("t1", 7, range(0, 10))]
    c.on_read_done("t1")
    assert c.actions() == [GroupReady("t1", 0), GroupReady("t1", 1)]


def test_nothing_to_read_is_ready_at_once() -> None:
    c = core(Role.PREFILL)
    c.assign(
        assignment(hit_blocks=0, context_tokens=10, reads={"prefill": [0, 0], "decode": [0, 0]}),
        0.0,
    )
    assert c.actions() == [GroupReady("t1", 0), GroupReady("t1", 1)]


def test_a_relayed_group_is_ready_when_all_its_blocks_came() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(**DE_READS), 0.0)
    assert c.actions() == []  # nothing to read here; waits for the relay
    c.on_relay("t1", group(range(0, 6), 1), 0.0)
    c.on_relay("t1", group(range(6, 10), 1), 0.0)
    c.on_relay_group_done("t1", 1, 0.0)
    assert c.actions() == [GroupReady("t1", 1)]  # groups may come in any order
    c.on_relay("t1", group(range(0, 10), 0), 0.0)
    c.on_relay_group_done("t1", 0, 0.0)
    assert c.actions() == [GroupReady("t1", 0)]


def test_split_needs_the_own_read_and_the_relay() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(**SPLIT), 0.0)
    assert c.actions() == [StartRead("t1", 7, range(0, 4))]
    c.on_relay("t1", group(range(4, 10), 0), 0.0)
    c.on_relay_group_done("t1", 0, 0.0)
    assert c.actions() == []
    c.on_read_done("t1")
    assert c.actions() == [GroupReady("t1", 0)]


@pytest.mark.parametrize(
    ("slices", "match"),
    [
        (group(range(0, 10), 0, traj=8), "trajectory 8"),
        (group(range(5, 11), 0), "outside the turn's"),
        (SliceSet(7, tuple(range(10)), 0, 2), "one group per frame"),
    ],
)
def test_a_relay_frame_that_is_not_the_turns_fails_it(slices: SliceSet, match: str) -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(**DE_READS), 0.0)
    c.on_relay("t1", slices, 0.0)
    acts = c.actions()
    failed = of(acts, Failed)
    assert len(failed) == 1 and not failed[0].retryable and failed[0].report
    assert match in failed[0].reason
    assert of(acts, TellPeer) == [TellPeer("decode-0", "t1", failed[0].reason)]
    assert of(acts, FreeBuffers) == [FreeBuffers("t1")]
    assert "t1" not in c.turns


def test_a_block_relayed_twice_fails_the_turn() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(**DE_READS), 0.0)
    c.on_relay("t1", group(range(0, 5), 0), 0.0)
    c.on_relay("t1", group(range(4, 6), 0), 0.0)
    assert "relayed twice" in of(c.actions(), Failed)[0].reason


def test_group_done_before_all_its_blocks_fails_the_turn() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(**DE_READS), 0.0)
    c.on_relay("t1", group(range(0, 5), 0), 0.0)
    c.on_relay_group_done("t1", 0, 0.0)
    assert "after 5 of 10 blocks" in of(c.actions(), Failed)[0].reason


def test_sends_then_kv_done_then_release() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(), 0.0)
    c.on_read_done("t1")
    c.actions()
    c.send_group("t1", 0)
    c.send_group("t1", 1)
    assert c.actions() == [SendKv("t1", 0), SendKv("t1", 1)]
    c.prefill_done("t1")
    assert c.actions() == []  # kv_done waits for the sends in flight
    c.on_group_sent("t1", 1)
    c.on_group_sent("t1", 0)
    assert c.actions() == [SendKvDone("t1")]
    c.on_kv_done_sent("t1")
    assert c.actions() == [FreeBuffers("t1"), Released("t1")]
    assert "t1" not in c.turns


def test_oracle_reads_and_sends_nothing_but_still_says_kv_done() -> None:
    c = core(Role.PREFILL, oracle=True)
    c.assign(assignment(**DE_READS), 0.0)
    assert c.actions() == [GroupReady("t1", 0), GroupReady("t1", 1)]
    c.send_group("t1", 0)
    c.prefill_done("t1")
    assert c.actions() == [SendKvDone("t1")]


# -- decode side ------------------------------------------------------------------------------


def test_decode_read_is_relayed_and_counts_as_present() -> None:
    c = core(Role.DECODE)
    c.assign(assignment(**DE_READS), 0.0)
    assert c.actions() == [StartRead("t1", 7, range(0, 10))]
    c.on_read_done("t1")
    assert c.actions() == [Relay("t1")]
    c.on_relayed("t1")
    assert c.actions() == [FreeBuffers("t1")]
    for g in range(G):
        c.on_kv("t1", group([10, 11], g), 0.0)  # only the new tokens come back
    c.on_kv_done("t1", 0.0)
    assert c.actions() == [KvComplete("t1")]


def test_prefill_read_path_sends_everything() -> None:
    c = core(Role.DECODE)
    c.assign(assignment(), 0.0)
    assert c.actions() == []
    for g in range(G):
        c.on_kv("t1", group(range(0, 12), g), 0.0)
    c.on_kv_done("t1", 0.0)
    assert c.actions() == [KvComplete("t1")]


def test_an_incomplete_context_fails_at_kv_done() -> None:
    c = core(Role.DECODE)
    c.assign(assignment(), 0.0)
    c.on_kv("t1", group(range(0, 12), 0), 0.0)
    c.on_kv("t1", group(range(0, 11), 1), 0.0)
    c.on_kv_done("t1", 0.0)
    failed = of(c.actions(), Failed)
    assert failed and "context incomplete: 1 of 24 slices missing" in failed[0].reason


def test_kv_the_turn_does_not_have_fails_it() -> None:
    c = core(Role.DECODE)
    c.assign(assignment(**DE_READS), 0.0)
    c.on_kv("t1", group([3], 0), 0.0)  # the decode node read block 3 itself
    assert "outside the turn's" in of(c.actions(), Failed)[0].reason


def test_persist_writes_the_new_full_blocks() -> None:
    c = core(Role.DECODE)
    c.assign(assignment(), 0.0)
    c.persist("t1")
    assert c.actions() == [Write("t1", 7, range(10, 11))]
    c.persist("t1")  # once
    assert c.actions() == []
    c.on_written("t1")
    assert c.actions() == [FreeBuffers("t1"), Persisted("t1")]


def test_nothing_new_to_persist_is_done_at_once() -> None:
    c = core(Role.DECODE)
    c.assign(assignment(persist_end_block=10), 0.0)
    c.persist("t1")
    assert c.actions() == [FreeBuffers("t1"), Persisted("t1")]


def test_oracle_decode_skips_the_completeness_check() -> None:
    c = core(Role.DECODE, oracle=True)
    c.assign(assignment(**DE_READS), 0.0)
    assert c.actions() == []
    c.on_kv_done("t1", 0.0)
    assert c.actions() == [KvComplete("t1")]
    c.persist("t1")
    assert of(c.actions(), Persisted) == [Persisted("t1")]


# -- frames that overtake their turn, stale frames ------------------------------------------


def test_frames_before_the_assignment_are_parked_then_replayed() -> None:
    c = core(Role.DECODE)
    for g in range(G):
        c.on_kv("t1", group(range(0, 12), g), 0.0)
    c.on_kv_done("t1", 0.0)
    assert c.actions() == [] and c.num_parked == G + 1
    c.assign(assignment(), 1.0)
    assert c.actions() == [KvComplete("t1")]
    assert c.num_parked == 0


def test_parked_frames_expire() -> None:
    c = core(Role.DECODE, park_timeout_s=10.0)
    c.on_kv("t9", group([0], 0), 0.0)
    c.tick(5.0)
    assert c.actions() == []
    c.tick(10.0)
    assert of(c.actions(), Discarded) == [Discarded("t9", "kv", "never assigned within 10 s")]
    c.assign(assignment("t9"), 11.0)  # its turn comes after all: without those frames
    assert "t9" in c.turns and not c.turns["t9"].present[0]


def test_frames_of_a_finished_turn_are_discarded() -> None:
    c = core(Role.DECODE)
    c.assign(assignment(persist_end_block=10), 0.0)
    c.persist("t1")
    c.actions()
    c.on_kv("t1", group([0], 0), 1.0)
    assert c.actions() == [Discarded("t1", "kv", "the turn is over here")]
    assert c.num_parked == 0


def test_parking_is_bounded() -> None:
    c = core(Role.DECODE, max_parked=2)
    for i in range(3):
        c.on_kv(f"x{i}", group([0], 0), 0.0)
    assert of(c.actions(), Discarded) == [
        Discarded("x2", "kv", "too many frames for unknown turns")
    ]


# -- failures ------------------------------------------------------------------------------------


def test_own_failure_frees_tells_the_peer_and_reports() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(), 0.0)
    c.actions()
    c.fail("t1", "storage read failed", retryable=True)
    assert c.actions() == [
        FreeBuffers("t1"),
        TellPeer("decode-0", "t1", "storage read failed"),
        Failed("t1", "storage read failed", True, report=True),
    ]
    c.fail("t1", "again", retryable=True)
    assert c.actions() == []


def test_the_peers_failure_is_not_reported_again_nor_echoed() -> None:
    c = core(Role.DECODE)
    c.assign(assignment(), 0.0)
    c.on_peer_failed("t1", "corrupt KV", 0.0)
    acts = c.actions()
    assert not of(acts, TellPeer)
    failed = of(acts, Failed)
    assert failed[0].report is False and "prefill-0 failed the turn: corrupt KV" in failed[0].reason


def test_drop_frees_and_tells_the_peer_only_when_asked() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment("t1"), 0.0)
    c.assign(assignment("t2"), 0.0)
    c.actions()
    c.drop("t1", "layer timeout", tell_peer=True)
    assert c.actions() == [FreeBuffers("t1"), TellPeer("decode-0", "t1", "layer timeout")]
    c.drop("t2", "cancelled", tell_peer=False)
    assert c.actions() == [FreeBuffers("t2")]


def test_io_completions_of_dropped_turns_are_ignored() -> None:
    c = core(Role.PREFILL)
    c.assign(assignment(), 0.0)
    c.drop("t1", "gone", tell_peer=False)
    c.actions()
    c.on_read_done("t1")
    c.on_group_sent("t1", 0)
    c.on_kv_done_sent("t1")
    c.send_group("t1", 0)
    assert c.actions() == []

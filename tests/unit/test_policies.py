"""The policy registry and its least-tokens policies: FIFO order, placement, read side, DE
memory, purity."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.policies import SchedulingPolicy
from scheduler.registry import POLICIES, PolicyKnobs, UnknownPolicyError, make_policy, policy_name
from scheduler.views import EngineView, NodeView, PendingTurn, ReadSide


def node(node_id: str, read_q: int, toks: list[int], free: int = 10**9) -> NodeView:
    return NodeView(
        node_id, read_q, tuple(EngineView(node_id, i, 0, t, free) for i, t in enumerate(toks))
    )


def turn(i: int, prompt: int = 1000, hit: int = 900, gen: int = 10) -> PendingTurn:
    return PendingTurn(f"t{i}", i, prompt, hit, gen)


def least(name: str, beta_tokens: int) -> SchedulingPolicy:
    return make_policy(name, PolicyKnobs(beta_tokens=beta_tokens))


LEAST_TOKENS = ("basic", "least_tokens", "oracle")
"""The registry's least-tokens policies: each plan is a FIFO prefix."""


def test_unknown_policy_lists_valid_names() -> None:
    with pytest.raises(UnknownPolicyError, match="basic, dualpath, dualpath_split, least_tokens"):
        least("fastest", 100)
    with pytest.raises(UnknownPolicyError, match="selector 'x'; valid: dualpath, least_tokens"):
        policy_name("dualpath", "x")
    assert policy_name("basic", "round_robin") == "basic"  # selectors only apply to dualpath
    assert policy_name("dualpath", "least_tokens") == "least_tokens"
    assert set(LEAST_TOKENS) < set(POLICIES)


@pytest.mark.parametrize(
    ("name", "side"),
    [("basic", ReadSide.PREFILL), ("oracle", ReadSide.NONE), ("least_tokens", ReadSide.DECODE)],
)
def test_read_side_by_policy(name: str, side: ReadSide) -> None:
    plan = least(name, 10**9).schedule(
        [turn(0)], [node("prefill-0", 5000, [0])], [node("decode-0", 0, [0])], now=0.0
    )
    assert [a.read_side for a in plan.assignments] == [side]


def test_shorter_queue_alternates_sides_as_queues_grow() -> None:
    plan = least("least_tokens", 10**9).schedule(
        [turn(i) for i in range(6)],
        [node("prefill-0", 0, [0, 0])],
        [node("decode-0", 0, [0, 0])],
        now=0.0,
    )
    sides = [a.read_side for a in plan.assignments]
    assert sides.count(ReadSide.PREFILL) == sides.count(ReadSide.DECODE) == 3


def test_least_tokens_engine_and_fifo_order() -> None:
    plan = least("basic", 10**9).schedule(
        [turn(0, prompt=500), turn(1, prompt=100)],
        [node("prefill-0", 0, [300, 0, 200])],
        [node("decode-0", 0, [0])],
        now=0.0,
    )
    assert [a.turn_id for a in plan.assignments] == ["t0", "t1"]
    assert [a.prefill_engine for a in plan.assignments] == [1, 2]


def test_overloaded_prefill_engines_stop_the_fetch() -> None:
    plan = least("least_tokens", 1000).schedule(
        [turn(0), turn(1), turn(2)],
        [node("prefill-0", 0, [0])],
        [node("decode-0", 0, [0])],
        now=0.0,
    )
    # after two turns the only engine holds 2000 > beta tokens: the third waits
    assert len(plan.assignments) == 2


def test_decode_memory_is_never_overcommitted() -> None:
    plan = least("least_tokens", 10**9).schedule(
        [turn(i, prompt=1000, gen=10) for i in range(5)],
        [node("prefill-0", 0, [0])],
        [node("decode-0", 0, [0], free=2500)],
        now=0.0,
    )
    assert len(plan.assignments) == 2  # 2 x 1010 fits in 2500, a third does not


@given(
    st.lists(st.tuples(st.integers(1, 50_000), st.integers(0, 50_000)), max_size=30),
    st.lists(st.integers(0, 100_000), min_size=1, max_size=4),
    st.lists(st.integers(0, 100_000), min_size=1, max_size=4),
    st.sampled_from(LEAST_TOKENS),
)
def test_invariants(
    turns: list[tuple[int, int]], pe_toks: list[int], de_toks: list[int], name: str
) -> None:
    queue = [PendingTurn(f"t{i}", i, p, min(h, p), 5) for i, (p, h) in enumerate(turns)]
    prefill = [node("prefill-0", 0, pe_toks)]
    decode = [node("decode-0", 0, de_toks, free=200_000)]
    frozen = (tuple(queue), tuple(prefill), tuple(decode))
    policy = least(name, 150_000)
    plan = policy.schedule(queue, prefill, decode, now=0.0)
    # a FIFO prefix is assigned, each turn once
    assert [a.turn_id for a in plan.assignments] == [t.turn_id for t in queue][
        : len(plan.assignments)
    ]
    # decode memory never overcommitted
    used = sum(t.kv_tokens for t in queue[: len(plan.assignments)])
    assert used <= 200_000 * len(de_toks)
    # inputs untouched, same plan again (deterministic)
    assert (tuple(queue), tuple(prefill), tuple(decode)) == frozen
    assert policy.schedule(queue, prefill, decode, now=1.0) == plan
    assert all(dataclasses.is_dataclass(a) for a in plan.assignments)

"""The example policy plugin (examples/policy-plugin, installed by `make venv`): shortest read
queue first, built on the views alone, and accepted by the plugin checks."""

from __future__ import annotations

import pytest
from dualpath_example_policy import ShortestReadQueueFirst, make_policy

from scheduler.plugins import check_plan, check_policy
from scheduler.registry import PolicyKnobs
from scheduler.views import Assignment, EngineView, NodeView, PendingTurn, ReadSide


def node(node_id: str, read_q: int, toks: list[int], free: int = 10**9) -> NodeView:
    return NodeView(
        node_id, read_q, tuple(EngineView(node_id, i, 0, t, free) for i, t in enumerate(toks))
    )


def turn(i: int, prompt: int = 1000, hit: int = 900, gen: int = 10) -> PendingTurn:
    return PendingTurn(f"t{i}", i, prompt, hit, gen)


def test_nodes_by_read_queue_engines_by_tokens_reads_to_the_shorter_queue() -> None:
    policy = make_policy(PolicyKnobs(beta_tokens=10**9))
    assert policy.name == "shortest_read_queue"
    prefill = [node("prefill-0", 5000, [0, 0]), node("prefill-1", 100, [700, 300])]
    decode = [node("decode-0", 200, [50, 10]), node("decode-1", 4000, [0])]
    plan = policy.schedule([turn(0)], prefill, decode, now=0.0)
    # prefill-1 (queue 100) over prefill-0, its engine 1 (300 tokens); decode-0 (queue 200),
    # its engine 1; the read to prefill-1, whose queue is the shorter
    assert plan.assignments == (Assignment("t0", "prefill-1", 1, "decode-0", 1, ReadSide.PREFILL),)


def test_each_placement_charges_the_queues_and_engines_it_fills() -> None:
    policy = make_policy(PolicyKnobs(beta_tokens=10**9))
    prefill = [node("prefill-0", 0, [0]), node("prefill-1", 0, [0])]
    decode = [node("decode-0", 500, [0]), node("decode-1", 500, [0])]
    plan = policy.schedule([turn(i, hit=1000) for i in range(4)], prefill, decode, now=0.0)
    sides = [(a.prefill_node, a.decode_node, a.read_side) for a in plan.assignments]
    assert sides == [
        ("prefill-0", "decode-0", ReadSide.PREFILL),  # 0 < 500: prefill-0's queue becomes 1000
        ("prefill-1", "decode-0", ReadSide.PREFILL),  # prefill-1 now the shorter one: 1000
        ("prefill-0", "decode-0", ReadSide.DECODE),  # 1000 vs 500: decode-0 becomes 1500
        ("prefill-0", "decode-1", ReadSide.DECODE),  # decode-1 (500) now shorter than 1000
    ]


def test_a_plan_is_a_fifo_prefix_bounded_by_beta_and_decode_memory() -> None:
    policy = make_policy(PolicyKnobs(beta_tokens=1500))
    prefill = [node("prefill-0", 0, [1000])]
    decode = [node("decode-0", 0, [0], free=2500)]
    queue = [turn(0), turn(1), turn(2, prompt=10)]
    plan = policy.schedule(queue, prefill, decode, now=0.0)
    assert [a.turn_id for a in plan.assignments] == ["t0"]  # then prefill-0 holds 2000 > beta
    roomy = policy.schedule(queue, [node("prefill-0", 0, [0])], decode, now=0.0)
    assert [a.turn_id for a in roomy.assignments] == ["t0", "t1"]  # then 2000 > beta
    assert policy.schedule(queue, prefill, [node("decode-0", 0, [0], free=5)], now=0.0) == (
        policy.schedule([], prefill, decode, now=0.0)
    )


def test_the_plugin_checks_accept_it_and_it_refuses_a_meaningless_beta() -> None:
    policy = make_policy(PolicyKnobs(beta_tokens=10**9))
    checked = check_policy(policy, "example")
    prefill, decode = [node("prefill-0", 0, [0, 0])], [node("decode-0", 0, [0, 0])]
    queue = [turn(i) for i in range(5)]
    plan = checked.schedule(queue, prefill, decode, now=0.0)
    assert len(plan.assignments) == 5
    assert check_plan(plan, queue, prefill, decode, "example") is plan
    with pytest.raises(ValueError, match="beta_tokens must be >= 1"):
        ShortestReadQueueFirst(beta_tokens=0)

"""The composed DualPath policy and its baselines: registry, composition, splits, invariants."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.de_selection import select_decode
from scheduler.dualpath_policy import (
    DualPathPolicy,
    LeastTokensBaseline,
    RoundRobinCursor,
    RoundRobinPolicy,
    SplitAssignment,
    round_robin_plan,
)
from scheduler.pe_selection import select_prefill
from scheduler.policies import SchedulingPolicy
from scheduler.read_side import tie_side
from scheduler.registry import POLICIES, PolicyKnobs, UnknownPolicyError, make_policy
from scheduler.views import EngineView, NodeView, PendingTurn, ReadSide, SchedulePlan

BIG = 10**9


def node(node_id: str, read_q: int, toks: list[int], free: int = BIG) -> NodeView:
    return NodeView(
        node_id, read_q, tuple(EngineView(node_id, i, 0, t, free) for i, t in enumerate(toks))
    )


def turn(i: int, prompt: int = 1000, hit: int = 896, gen: int = 10) -> PendingTurn:
    return PendingTurn(f"t{i}", i, prompt, hit, gen)


DUALPATH_SYSTEM = ("dualpath", "dualpath_split", "least_tokens", "round_robin")
"""The registry's policies of the dualpath system: the paper's selection and its baselines."""


def system_policy(
    name: str, *, alpha_tokens: int, beta_tokens: int, block_tokens: int = 64
) -> SchedulingPolicy:
    knobs = PolicyKnobs(
        alpha_tokens=alpha_tokens, beta_tokens=beta_tokens, block_tokens=block_tokens
    )
    return make_policy(name, knobs)


def test_registry_names_and_unknown_name() -> None:
    assert sorted(POLICIES) == sorted(["basic", "oracle", *DUALPATH_SYSTEM])
    with pytest.raises(UnknownPolicyError, match="dualpath, dualpath_split, least_tokens"):
        system_policy("fastest", alpha_tokens=1, beta_tokens=1)
    for name in DUALPATH_SYSTEM:
        policy: SchedulingPolicy = system_policy(name, alpha_tokens=1, beta_tokens=1)
        assert policy.name == name
    split = make_policy("dualpath_split", PolicyKnobs(alpha_tokens=1, beta_tokens=2))
    assert split == DualPathPolicy(alpha_tokens=1, beta_tokens=2, split_reads=True)
    knobs = PolicyKnobs(beta_tokens=2, baseline_read_side="alternate")
    rotating = make_policy("round_robin", knobs)
    assert isinstance(rotating, RoundRobinPolicy) and rotating.read_rule == "alternate"


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        DualPathPolicy(alpha_tokens=-1, beta_tokens=1)
    with pytest.raises(ValueError):
        DualPathPolicy(alpha_tokens=1, beta_tokens=1, block_tokens=0)
    with pytest.raises(ValueError):
        DualPathPolicy(alpha_tokens=1, beta_tokens=1, node_snic_tokens_per_s={"prefill-0": 0.0})
    with pytest.raises(ValueError):
        RoundRobinPolicy(beta_tokens=1, read_rule="decode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LeastTokensBaseline(beta_tokens=-1)


def test_plan_composes_algorithm_1_and_two_level_de() -> None:
    prefill = [node("prefill-0", 0, [0, 500]), node("prefill-1", 9000, [0, 0])]
    decode = [node("decode-0", 0, [0, 100]), node("decode-1", 0, [50, 50])]
    queue = [turn(i, prompt=300 + 100 * i) for i in range(6)]
    policy = DualPathPolicy(alpha_tokens=5000, beta_tokens=1200)
    plan = policy.schedule(queue, prefill, decode, now=0.0)
    pe = select_prefill(queue, prefill, alpha_tokens=5000, beta_tokens=1200)
    de = select_decode(queue[: len(pe.choices)], decode)
    assert [(a.turn_id, a.prefill_node, a.prefill_engine) for a in plan.assignments] == [
        (c.turn_id, c.node_id, c.engine) for c in pe.choices
    ]
    assert [(a.turn_id, a.decode_node, a.decode_engine) for a in plan.assignments] == [
        (c.turn_id, c.node_id, c.engine) for c in de.choices
    ]
    # C2 (prefill-0, read_q <= alpha) is filled to beta before C3 is touched
    assert [a.prefill_node for a in plan.assignments][:3] == ["prefill-0"] * 3


def test_read_sides_alternate_as_the_working_queues_grow() -> None:
    plan = DualPathPolicy(alpha_tokens=BIG, beta_tokens=BIG).schedule(
        [turn(i) for i in range(6)],
        [node("prefill-0", 0, [0, 0])],
        [node("decode-0", 0, [0, 0])],
        now=0.0,
    )
    sides = [a.read_side for a in plan.assignments]
    # equal queues before every even turn: it takes its tie side, the next turn the other one
    other = {ReadSide.PREFILL: ReadSide.DECODE, ReadSide.DECODE: ReadSide.PREFILL}
    expected = [s for i in (0, 2, 4) for s in (tie_side(f"t{i}"), other[tie_side(f"t{i}")])]
    assert sides == expected and len(set(expected)) == 2


def test_a_full_de_group_does_not_block_the_others() -> None:
    prefill = [node("prefill-0", 0, [0])]
    decode = [node("decode-0", 0, [0], free=500), node("decode-1", 0, [200])]
    queue = [turn(0, prompt=3000), turn(1), turn(2)]
    plan = DualPathPolicy(alpha_tokens=BIG, beta_tokens=BIG).schedule(
        queue, prefill, decode, now=0.0
    )
    # level 1: t0 -> decode-0 (0 -> 3010), whose only DE has no room for it; t1 -> decode-1
    # (200 -> 1210); t2 -> decode-1 (1210 < 3010). decode-1 serves both.
    assert [(a.turn_id, a.decode_node) for a in plan.assignments] == [
        ("t1", "decode-1"),
        ("t2", "decode-1"),
    ]


def test_overloaded_prefill_stops_the_fetch() -> None:
    plan = DualPathPolicy(alpha_tokens=BIG, beta_tokens=1000).schedule(
        [turn(0), turn(1), turn(2)], [node("prefill-0", 0, [0])], [node("decode-0", 0, [0])], now=0
    )
    assert len(plan.assignments) == 2  # 0 -> 1000 (<= beta) -> 2000: the third waits


def test_groups_limit_pe_selection_to_the_fetching_group() -> None:
    prefill = [node("prefill-0", 0, [0]), node("prefill-1", 0, [500])]
    plan = DualPathPolicy(alpha_tokens=BIG, beta_tokens=BIG).schedule(
        [turn(0)], prefill, [node("decode-0", 0, [0])], now=0.0, groups=frozenset({"prefill-1"})
    )
    assert [a.prefill_node for a in plan.assignments] == ["prefill-1"]


def test_split_reads_cover_the_hit_blocks_and_balance_queues() -> None:
    policy = DualPathPolicy(alpha_tokens=BIG, beta_tokens=BIG, split_reads=True, block_tokens=64)
    prefill = [node("prefill-0", 640, [0])]
    decode = [node("decode-0", 0, [0])]
    plan = policy.schedule([turn(0, prompt=2000, hit=1280)], prefill, decode, now=0.0)
    (a,) = plan.assignments
    assert isinstance(a, SplitAssignment)
    # 20 hit blocks, prefill 10 blocks behind: 5 on the prefill side, 15 on the decode side
    assert (a.prefill_blocks.num_blocks, a.decode_blocks.num_blocks) == (5, 15)
    assert a.read_side is ReadSide.DECODE
    # a turn whose best split is one-sided is a plain Assignment
    plan = policy.schedule(
        [turn(0, prompt=2000, hit=128)], [node("prefill-0", 10**6, [0])], decode, now=0.0
    )
    (b,) = plan.assignments
    assert type(b).__name__ == "Assignment" and b.read_side is ReadSide.DECODE


def test_split_uses_per_node_snic_rates() -> None:
    policy = DualPathPolicy(
        alpha_tokens=BIG,
        beta_tokens=BIG,
        split_reads=True,
        block_tokens=64,
        snic_tokens_per_s=1000.0,
        node_snic_tokens_per_s={"prefill-0": 3000.0},
    )
    (a,) = policy.schedule(
        [turn(0, prompt=3000, hit=64 * 40)],
        [node("prefill-0", 0, [0])],
        [node("decode-0", 0, [0])],
        now=0.0,
    ).assignments
    assert isinstance(a, SplitAssignment)
    assert (a.prefill_blocks.num_blocks, a.decode_blocks.num_blocks) == (30, 10)


def test_round_robin_rotates_across_calls_and_skips_the_overloaded() -> None:
    prefill = [node("prefill-0", 0, [0, 5000]), node("prefill-1", 0, [0])]
    decode = [node("decode-0", 0, [0, 0])]
    policy = RoundRobinPolicy(beta_tokens=1000)
    first = policy.schedule([turn(0), turn(1)], prefill, decode, now=0.0)
    # engine prefill-0/1 is over beta: the rotation is prefill-0/0, prefill-1/0
    assert [(a.prefill_node, a.prefill_engine) for a in first.assignments] == [
        ("prefill-0", 0),
        ("prefill-1", 0),
    ]
    assert [a.decode_engine for a in first.assignments] == [0, 1]
    assert policy.cursor == RoundRobinCursor(prefill=3, decode=2)
    second = policy.schedule([turn(2)], prefill, decode, now=1.0)
    assert [(a.prefill_node, a.prefill_engine, a.decode_engine) for a in second.assignments] == [
        ("prefill-0", 0, 0)
    ]
    assert {a.read_side for a in (*first.assignments, *second.assignments)} == {ReadSide.PREFILL}
    # the pure core gives the same plan from the same cursor
    plan, cursor = round_robin_plan(
        [turn(2)], prefill, decode, beta_tokens=1000, cursor=RoundRobinCursor(3, 2)
    )
    assert plan == second and cursor == policy.cursor


def test_round_robin_alternate_rotates_the_read_side_across_calls() -> None:
    # the decode node's read queue is far longer: a load-aware rule would always pick prefill
    prefill = [node("prefill-0", 0, [0])]
    decode = [node("decode-0", 10**6, [0])]
    policy = RoundRobinPolicy(beta_tokens=BIG, read_rule="alternate")
    first = policy.schedule([turn(0), turn(1), turn(2)], prefill, decode, now=0.0)
    second = policy.schedule([turn(3)], prefill, decode, now=1.0)
    sides = [a.read_side for a in (*first.assignments, *second.assignments)]
    assert sides == [ReadSide.PREFILL, ReadSide.DECODE, ReadSide.PREFILL, ReadSide.DECODE]
    assert policy.cursor.side == 4
    with pytest.raises(ValueError, match="alternate"):
        LeastTokensBaseline(beta_tokens=1, read_rule="alternate")


def test_least_tokens_baseline_equals_the_basic_policy() -> None:
    queue = [turn(i, prompt=200 * (i + 1)) for i in range(8)]
    prefill = [node("prefill-0", 0, [300, 0, 200])]
    decode = [node("decode-0", 0, [0, 400], free=3000)]
    ours = LeastTokensBaseline(beta_tokens=1500).schedule(queue, prefill, decode, now=0.0)
    theirs = make_policy("basic", PolicyKnobs(beta_tokens=1500)).schedule(
        queue, prefill, decode, now=0.0
    )
    assert ours == theirs


# --- properties over every policy ----------------------------------------------------------
node_specs = st.lists(
    st.tuples(st.integers(0, 4000), st.lists(st.integers(0, 3000), min_size=1, max_size=3)),
    min_size=1,
    max_size=3,
)
decode_specs = st.lists(
    st.tuples(
        st.integers(0, 4000),
        st.lists(st.tuples(st.integers(0, 3000), st.integers(-100, 4000)), min_size=0, max_size=3),
    ),
    min_size=1,
    max_size=3,
)
turn_specs = st.lists(
    st.tuples(st.integers(1, 1500), st.integers(0, 20), st.integers(1, 200)), max_size=25
)


def build(
    pspec: list[tuple[int, list[int]]],
    dspec: list[tuple[int, list[tuple[int, int]]]],
    tspec: list[tuple[int, int, int]],
) -> tuple[list[PendingTurn], list[NodeView], list[NodeView]]:
    prefill = [node(f"prefill-{i}", rq, toks) for i, (rq, toks) in enumerate(pspec)]
    decode = [
        NodeView(
            f"decode-{i}",
            rq,
            tuple(EngineView(f"decode-{i}", j, j % 3, t, f) for j, (t, f) in enumerate(engs)),
        )
        for i, (rq, engs) in enumerate(dspec)
    ]
    queue = [PendingTurn(f"t{i}", i, p, min(p, 16 * hb), g) for i, (p, hb, g) in enumerate(tspec)]
    return queue, prefill, decode


def check_invariants(
    plan: SchedulePlan,
    queue: list[PendingTurn],
    prefill: list[NodeView],
    decode: list[NodeView],
    beta: int,
    block_tokens: int,
) -> None:
    by_id = {t.turn_id: t for t in queue}
    ids = [a.turn_id for a in plan.assignments]
    # each turn at most once, in FIFO order
    assert ids == [t.turn_id for t in queue if t.turn_id in set(ids)]
    assert len(set(ids)) == len(ids)
    # PE: the chosen engine held <= beta tokens when chosen (replayed in plan order)
    pe_tok = {(n.node_id, e.engine): e.tok for n in prefill for e in n.engines}
    # DE: per engine, the KV placed never exceeds its reported free memory
    de_free = {(n.node_id, e.engine): e.free_kv_tokens for n in decode for e in n.engines}
    for a in plan.assignments:
        t = by_id[a.turn_id]
        pk, dk = (a.prefill_node, a.prefill_engine), (a.decode_node, a.decode_engine)
        assert pe_tok[pk] <= beta
        pe_tok[pk] += t.prompt_tokens
        de_free[dk] -= t.kv_tokens
        assert de_free[dk] >= 0
        if isinstance(a, SplitAssignment):
            n = t.hit_tokens // block_tokens
            assert a.prefill_blocks.first_block == 0
            assert a.prefill_blocks.end_block == a.decode_blocks.first_block
            assert a.decode_blocks.end_block == n
            assert min(a.prefill_blocks.num_blocks, a.decode_blocks.num_blocks) > 0


@given(
    node_specs,
    decode_specs,
    turn_specs,
    st.integers(0, 4000),
    st.integers(0, 4000),
    st.sampled_from(DUALPATH_SYSTEM),
)
def test_invariants_of_every_policy(
    pspec: list[tuple[int, list[int]]],
    dspec: list[tuple[int, list[tuple[int, int]]]],
    tspec: list[tuple[int, int, int]],
    alpha: int,
    beta: int,
    name: str,
) -> None:
    queue, prefill, decode = build(pspec, dspec, tspec)
    snapshot = copy.deepcopy((queue, prefill, decode))
    policy = system_policy(name, alpha_tokens=alpha, beta_tokens=beta, block_tokens=16)
    plan = policy.schedule(queue, prefill, decode, now=0.0)
    check_invariants(plan, queue, prefill, decode, beta, 16)
    assert (queue, prefill, decode) == snapshot
    # deterministic: a fresh policy (round robin has a cursor) gives the same plan
    again = system_policy(name, alpha_tokens=alpha, beta_tokens=beta, block_tokens=16)
    assert again.schedule(queue, prefill, decode, now=5.0) == plan


@given(node_specs, decode_specs, turn_specs, st.integers(0, 4000))
def test_least_tokens_baseline_matches_basic_and_dualpath_rules(
    pspec: list[tuple[int, list[int]]],
    dspec: list[tuple[int, list[tuple[int, int]]]],
    tspec: list[tuple[int, int, int]],
    beta: int,
) -> None:
    queue, prefill, decode = build(pspec, dspec, tspec)
    for rule, old in (("prefill", "basic"), ("shorter_queue", "least_tokens")):
        ours = LeastTokensBaseline(beta_tokens=beta, read_rule=rule).schedule(  # type: ignore[arg-type]
            queue, prefill, decode, now=0.0
        )
        assert ours == make_policy(old, PolicyKnobs(beta_tokens=beta)).schedule(
            queue, prefill, decode, now=0.0
        )


@given(node_specs, decode_specs, turn_specs, st.integers(0, 4000), st.integers(0, 4000))
def test_split_and_whole_reads_place_the_same_engines(
    pspec: list[tuple[int, list[int]]],
    dspec: list[tuple[int, list[tuple[int, int]]]],
    tspec: list[tuple[int, int, int]],
    alpha: int,
    beta: int,
) -> None:
    queue, prefill, decode = build(pspec, dspec, tspec)
    whole = DualPathPolicy(alpha_tokens=alpha, beta_tokens=beta).schedule(
        queue, prefill, decode, now=0.0
    )
    split = DualPathPolicy(alpha_tokens=alpha, beta_tokens=beta, split_reads=True).schedule(
        queue, prefill, decode, now=0.0
    )

    def engines(p: SchedulePlan) -> list[tuple[str, str, int, str, int]]:
        return [
            (a.turn_id, a.prefill_node, a.prefill_engine, a.decode_node, a.decode_engine)
            for a in p.assignments
        ]

    assert engines(whole) == engines(split)


def _reads_per_node(policy: SchedulingPolicy, *, rounds: int, drain: int) -> dict[str, int]:
    """Feed a 2P4D cluster of 2 engines per node one turn per round; each node's storage NIC
    then reads `drain` tokens of its queue (equal NICs), and engines keep every turn's tokens
    (tok_e only grows). Returns the hit tokens each node was given to read. (With one engine
    per node, the rotation over the nodes and the one over the two sides would alias.)"""
    names = [f"prefill-{i}" for i in range(2)] + [f"decode-{i}" for i in range(4)]
    queue = dict.fromkeys(names, 0)
    total = dict.fromkeys(names, 0)
    toks = {(n, e): 0 for n in names for e in range(2)}

    def view(n: str) -> NodeView:
        engines = tuple(EngineView(n, e, 0, toks[n, e], BIG) for e in range(2))
        return NodeView(n, queue[n], engines, total[n])

    for i in range(rounds):
        t = turn(i)
        plan = policy.schedule(
            [t], [view(n) for n in names[:2]], [view(n) for n in names[2:]], now=float(i)
        )
        (a,) = plan.assignments
        toks[a.prefill_node, a.prefill_engine] += t.prompt_tokens
        toks[a.decode_node, a.decode_engine] += t.kv_tokens
        reader = a.prefill_node if a.read_side is ReadSide.PREFILL else a.decode_node
        queue[reader] += t.hit_tokens
        total[reader] += t.hit_tokens
        queue = {n: max(0, q - drain) for n, q in queue.items()}
    return total


def test_load_blind_read_side_on_2p4d_gives_the_papers_round_robin_imbalance() -> None:
    """DualPath §8: snic max/avg 1.53 with round robin. Reads split evenly between the sides
    load each of P prefill NICs with 1/(2P) and each of D decode NICs with 1/(2D), so max/avg
    is (P+D)/(2P) = 1.5 on 2P4D; the shorter-queue rule spreads them evenly, whichever
    engines were picked."""

    def max_over_avg(policy: SchedulingPolicy) -> float:
        reads = _reads_per_node(policy, rounds=600, drain=150)
        return max(reads.values()) * len(reads) / sum(reads.values())

    assert max_over_avg(RoundRobinPolicy(beta_tokens=BIG, read_rule="alternate")) == (
        pytest.approx(1.5)
    )
    assert max_over_avg(RoundRobinPolicy(beta_tokens=BIG, read_rule="shorter_queue")) < 1.02
    assert max_over_avg(DualPathPolicy(alpha_tokens=BIG, beta_tokens=BIG)) < 1.02

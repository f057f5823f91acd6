"""PE selection (DualPath §6, Algorithm 1): FIFO, C2 before C3, never tok > beta, stop, ties."""

from __future__ import annotations

import copy
import random
import zlib
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.pe_selection import (
    PeChoice,
    PeTier,
    UnknownGroupError,
    alpha_tokens_for,
    beta_tokens_for,
    select_prefill,
)
from scheduler.views import EngineView, NodeView, PendingTurn


def node(node_id: str, read_q: int, toks: list[int], total: int = 0) -> NodeView:
    engines = tuple(EngineView(node_id, i, 0, t) for i, t in enumerate(toks))
    return NodeView(node_id, read_q, engines, total)


def turn(i: int, prompt: int = 1000) -> PendingTurn:
    return PendingTurn(f"t{i}", i, prompt, prompt - 100, 10)


def picks(choices: Sequence[PeChoice]) -> list[tuple[str, int]]:
    return [(c.node_id, c.engine) for c in choices]


def reference(
    queue: list[PendingTurn],
    prefill: list[NodeView],
    alpha: int,
    beta: int,
    groups: frozenset[str] | None = None,
) -> list[tuple[str, str, int, str, int]]:
    """Algorithm 1 written out literally: rebuild C2 and C3 for every head turn."""
    tok = {
        (n.node_id, e.engine): e.tok
        for n in prefill
        if groups is None or n.node_id in groups
        for e in n.engines
    }
    read_q = {n.node_id: n.read_q_tokens for n in prefill}
    total = {n.node_id: n.read_total_tokens for n in prefill}
    out = []
    for t in queue:
        c2 = [k for k in tok if tok[k] <= beta and read_q[k[0]] <= alpha]
        c3 = [k for k in tok if tok[k] <= beta and read_q[k[0]] > alpha]
        pool = c2 or c3
        if not pool:
            break
        order = sorted(tok)
        offset = zlib.crc32(queue[0].turn_id.encode()) % len(order) if order else 0
        rank = {k: (i - offset) % len(order) for i, k in enumerate(order)}
        k = min(pool, key=lambda k: (tok[k], read_q[k[0]], total[k[0]], rank[k]))
        out.append((t.turn_id, k[0], k[1], "C2" if c2 else "C3", tok[k]))
        tok[k] += t.prompt_tokens
    return out


def test_least_tokens_in_c2_beats_lighter_engine_in_c3() -> None:
    prefill = [node("prefill-0", 10_000, [0, 0]), node("prefill-1", 100, [500, 300])]
    sel = select_prefill([turn(0)], prefill, alpha_tokens=1000, beta_tokens=10_000)
    (c,) = sel.choices
    assert (c.node_id, c.engine, c.tier) == ("prefill-1", 1, PeTier.SHORT_READ_QUEUE)


def test_falls_back_to_c3_when_c2_is_overloaded() -> None:
    prefill = [node("prefill-0", 10_000, [50, 0]), node("prefill-1", 100, [20_000])]
    sel = select_prefill([turn(0)], prefill, alpha_tokens=1000, beta_tokens=10_000)
    (c,) = sel.choices
    assert (c.node_id, c.engine, c.tier) == ("prefill-0", 1, PeTier.LONG_READ_QUEUE)


def test_read_q_equal_to_alpha_is_c2() -> None:
    prefill = [node("prefill-0", 1000, [500]), node("prefill-1", 1001, [0])]
    sel = select_prefill([turn(0)], prefill, alpha_tokens=1000, beta_tokens=10_000)
    assert picks(sel.choices) == [("prefill-0", 0)]


def test_overloaded_engine_is_never_chosen_and_fetch_stops() -> None:
    prefill = [node("prefill-0", 0, [1001, 0])]
    # engine 1 takes t0 (0 -> 1000 <= beta) and t1 (1000 -> 2000 > beta); t2 finds nobody
    sel = select_prefill(
        [turn(0), turn(1), turn(2, prompt=1)], prefill, alpha_tokens=0, beta_tokens=1000
    )
    assert picks(sel.choices) == [("prefill-0", 1), ("prefill-0", 1)]
    assert sel.stopped
    assert [c.tok_before for c in sel.choices] == [0, 1000]


def test_stop_is_fifo_small_turns_do_not_overtake() -> None:
    prefill = [node("prefill-0", 0, [2000])]
    sel = select_prefill([turn(0), turn(1, prompt=1)], prefill, alpha_tokens=0, beta_tokens=1000)
    assert sel.choices == () and sel.stopped


def test_empty_queue_and_no_engines() -> None:
    assert select_prefill([], [node("prefill-0", 0, [0])], alpha_tokens=1, beta_tokens=1) == (
        select_prefill([], [], alpha_tokens=1, beta_tokens=1)
    )
    sel = select_prefill([turn(0)], [], alpha_tokens=1, beta_tokens=1)
    assert sel.choices == () and sel.stopped


def test_tok_is_charged_with_prompt_tokens_between_turns() -> None:
    prefill = [node("prefill-0", 0, [0, 100])]
    sel = select_prefill(
        [turn(0, prompt=150), turn(1, prompt=10), turn(2, prompt=10)],
        prefill,
        alpha_tokens=0,
        beta_tokens=10**6,
    )
    # 0 -> e0 (150); 100 < 150 -> e1 (110); 110 < 150 -> e1 (120)
    assert picks(sel.choices) == [("prefill-0", 0), ("prefill-0", 1), ("prefill-0", 1)]


def test_ties_go_to_the_shorter_read_queue_then_rotate_whatever_the_view_order() -> None:
    a = [node("prefill-1", 0, [0, 0]), node("prefill-0", 10, [5, 0])]
    b = [node("prefill-0", 10, [5, 0]), node("prefill-1", 0, [0, 0])]
    queue = [turn(i, prompt=1) for i in range(3)]
    sa = select_prefill(queue, a, alpha_tokens=100, beta_tokens=100)
    sb = select_prefill(queue, b, alpha_tokens=100, beta_tokens=100)
    assert sa == sb
    # three engines at tok 0: prefill-1's two first (shorter read queue), then prefill-0/1
    assert set(picks(sa.choices)[:2]) == {("prefill-1", 0), ("prefill-1", 1)}
    assert picks(sa.choices)[2] == ("prefill-0", 1)


def test_ties_go_to_the_node_that_has_read_less_before_the_rotation() -> None:
    prefill = [node("prefill-0", 0, [0, 0], total=5000), node("prefill-1", 0, [0, 0], total=10)]
    for i in range(20):  # whatever the rotation's offset
        sel = select_prefill([turn(i, prompt=1)], prefill, alpha_tokens=1, beta_tokens=10)
        assert picks(sel.choices)[0][0] == "prefill-1"


def test_ties_rotate_with_the_head_turn_so_no_engine_is_favoured() -> None:
    """Idle engines tie at tok 0 on every fetch below saturation; over many fetches each
    engine takes the first turn about equally often."""
    prefill = [node(f"prefill-{i}", 0, [0, 0]) for i in range(2)]
    firsts = Counter(
        picks(select_prefill([turn(i)], prefill, alpha_tokens=1, beta_tokens=10).choices)[0]
        for i in range(400)
    )
    assert set(firsts) == {("prefill-0", 0), ("prefill-0", 1), ("prefill-1", 0), ("prefill-1", 1)}
    assert max(firsts.values()) < 2 * min(firsts.values())


def test_read_q_is_not_updated_within_a_fetch() -> None:
    # every turn reads ~900 tokens, yet prefill-0 stays in C2 for the whole fetch
    prefill = [node("prefill-0", 0, [0]), node("prefill-1", 5000, [0])]
    sel = select_prefill([turn(i) for i in range(5)], prefill, alpha_tokens=1000, beta_tokens=10**6)
    assert {c.node_id for c in sel.choices} == {"prefill-0"}


def test_groups_restrict_selection_to_the_fetching_group() -> None:
    prefill = [node("prefill-0", 0, [0]), node("prefill-1", 0, [10_000])]
    sel = select_prefill(
        [turn(0)],
        prefill,
        alpha_tokens=0,
        beta_tokens=10**6,
        groups=frozenset({"prefill-1"}),
    )
    assert picks(sel.choices) == [("prefill-1", 0)]
    with pytest.raises(UnknownGroupError, match="decode-0"):
        select_prefill(
            [turn(0)], prefill, alpha_tokens=0, beta_tokens=1, groups=frozenset({"decode-0"})
        )


def test_thresholds_from_profiled_rates() -> None:
    assert alpha_tokens_for(1_250_000.0) == 3_750_000  # 50 GB/s at 40 KB/token, 3 s
    assert beta_tokens_for(100_000.0) == 500_000
    assert alpha_tokens_for(1.0, window_s=0.1) == 1
    with pytest.raises(ValueError):
        alpha_tokens_for(0.0)
    with pytest.raises(ValueError):
        select_prefill([], [], alpha_tokens=-1, beta_tokens=0)


clusters = st.lists(
    st.tuples(st.integers(0, 3000), st.lists(st.integers(0, 3000), min_size=0, max_size=4)),
    min_size=0,
    max_size=5,
)
queues = st.lists(st.integers(1, 800), max_size=40)


@given(
    clusters,
    queues,
    st.integers(0, 3000),
    st.integers(0, 3000),
    st.randoms(use_true_random=False),
)
def test_matches_literal_algorithm_1(
    spec: list[tuple[int, list[int]]],
    prompts: list[int],
    alpha: int,
    beta: int,
    rnd: random.Random,
) -> None:
    prefill = [node(f"prefill-{i}", rq, toks) for i, (rq, toks) in enumerate(spec)]
    queue = [turn(i, prompt=p) for i, p in enumerate(prompts)]
    snapshot = copy.deepcopy((queue, prefill))
    sel = select_prefill(queue, prefill, alpha_tokens=alpha, beta_tokens=beta)
    got = [(c.turn_id, c.node_id, c.engine, c.tier.value, c.tok_before) for c in sel.choices]
    assert got == reference(queue, prefill, alpha, beta)
    # invariants, stated directly
    assert [c.turn_id for c in sel.choices] == [t.turn_id for t in queue][: len(sel.choices)]
    assert all(c.tok_before <= beta for c in sel.choices)
    assert sel.stopped == (len(sel.choices) < len(queue))
    # inputs untouched; same answer again and for any listing order of nodes and engines
    assert (queue, prefill) == snapshot
    assert select_prefill(queue, prefill, alpha_tokens=alpha, beta_tokens=beta) == sel
    shuffled = [
        NodeView(n.node_id, n.read_q_tokens, tuple(rnd.sample(n.engines, len(n.engines))))
        for n in rnd.sample(prefill, len(prefill))
    ]
    assert select_prefill(queue, shuffled, alpha_tokens=alpha, beta_tokens=beta) == sel


@given(clusters, queues, st.integers(0, 3000), st.integers(0, 3000), st.data())
def test_groups_match_algorithm_1_on_the_subset(
    spec: list[tuple[int, list[int]]],
    prompts: list[int],
    alpha: int,
    beta: int,
    data: st.DataObject,
) -> None:
    prefill = [node(f"prefill-{i}", rq, toks) for i, (rq, toks) in enumerate(spec)]
    ids = [n.node_id for n in prefill]
    groups = frozenset(
        data.draw(st.lists(st.sampled_from(ids), unique=True) if ids else st.just([]))
    )
    queue = [turn(i, prompt=p) for i, p in enumerate(prompts)]
    sel = select_prefill(queue, prefill, alpha_tokens=alpha, beta_tokens=beta, groups=groups)
    assert {c.node_id for c in sel.choices} <= groups
    got = [(c.turn_id, c.node_id, c.engine, c.tier.value, c.tok_before) for c in sel.choices]
    assert got == reference(queue, prefill, alpha, beta, groups)

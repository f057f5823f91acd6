"""Intra-engine batching: quota, binary-search chunking, FIFO, minimal progress, decode, balance."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.batching import (
    DEFAULT_COMPUTE_QUOTA_S,
    DecodeBatch,
    DecodeItem,
    PrefillBatch,
    PrefillItem,
    attention_balance,
    decode_batch,
    head_batch,
    pack_prefill_batch,
    plan_batches,
    remaining_queue,
)
from scheduler.costmodel import CostModel, CostModelParams

PARAMS = CostModelParams(
    prefill_base_ms=5.0,
    prefill_us_per_token=10.0,
    attention_ns_per_token_pair=0.5,
    decode_base_ms=8.0,
    decode_us_per_seq=20.0,
    decode_ns_per_context_token=5.0,
)
COST = CostModel(PARAMS)
FREE = CostModel(CostModelParams(5.0, 10.0, 0.0, 8.0, 20.0, 5.0))  # attention costs nothing


def att(cached: int, new: int) -> float:
    return COST.attention_s(cached, new)


def total(items: tuple[PrefillItem, ...], cost: CostModel = COST) -> float:
    acc = 0.0
    for i in items:
        acc += cost.attention_s(i.cached_tokens, i.new_tokens)
    return acc


# -- known cases ------------------------------------------------------------------------------


def test_default_quota_is_the_papers_300_ms() -> None:
    assert DEFAULT_COMPUTE_QUOTA_S == 0.300


def test_small_items_fit_whole_in_one_batch() -> None:
    queue = [PrefillItem("a", 1000, 100), PrefillItem("b", 0, 512), PrefillItem("c", 20_000, 300)]
    batch = pack_prefill_batch(queue, COST)
    assert batch.items == tuple(queue)
    assert batch.remainder is None and not batch.over_quota
    assert batch.attention_s == pytest.approx(att(1000, 100) + att(0, 512) + att(20_000, 300))
    assert batch.completed_turn_ids == ("a", "b", "c")
    assert batch.num_new_tokens == 912
    assert remaining_queue(queue, batch) == ()
    assert plan_batches(queue, COST) == (batch,)


def test_overflowing_item_is_cut_to_the_largest_chunk_that_fits() -> None:
    # 10,000 new over 100,000 cached is 0.525 s of attention: more than the 0.3 s quota.
    # k x (100,000 + k/2) x 0.5 ns <= 0.3 s  <=>  k <= 5,830.05
    queue = [PrefillItem("a", 100_000, 10_000), PrefillItem("b", 0, 10)]
    batch = pack_prefill_batch(queue, COST)
    assert batch.items == (PrefillItem("a", 100_000, 5830),)
    assert batch.remainder == PrefillItem("a", 105_830, 4170)
    assert batch.attention_s <= 0.300 < att(100_000, 5831)
    assert batch.completed_turn_ids == ()
    assert remaining_queue(queue, batch) == (batch.remainder, PrefillItem("b", 0, 10))


def test_packing_stops_at_the_cut_even_if_a_later_item_would_fit() -> None:
    # "a" fills most of the quota, "b" is cut, "c" (tiny) waits: packing is FIFO
    queue = [
        PrefillItem("a", 0, 30_000),  # 0.225 s
        PrefillItem("b", 50_000, 10_000),
        PrefillItem("c", 0, 1),
    ]
    batch = pack_prefill_batch(queue, COST)
    assert [i.turn_id for i in batch.items] == ["a", "b"]
    assert batch.items[0] == queue[0]
    assert batch.remainder is not None and batch.remainder.turn_id == "b"
    rest = remaining_queue(queue, batch)
    assert [i.turn_id for i in rest] == ["b", "c"]


def test_head_that_cannot_take_one_token_waits_untouched_behind_a_nonempty_batch() -> None:
    # after "a" only ~1 ms is left; one token of "b" over 10 M cached tokens costs 5 ms
    first_new = 34_600  # 34,600^2 / 2 x 0.5 ns = 0.2993 s
    queue = [PrefillItem("a", 0, first_new), PrefillItem("b", 10_000_000, 50)]
    batch = pack_prefill_batch(queue, COST)
    assert batch.items == (queue[0],)
    assert batch.remainder is None and not batch.over_quota
    assert remaining_queue(queue, batch) == (queue[1],)


def test_minimal_progress_takes_exactly_one_token_when_nothing_fits() -> None:
    # one token over 1 M cached tokens costs 0.5 ms; the quota is 1 us
    queue = [PrefillItem("big", 1_000_000, 3), PrefillItem("small", 0, 10)]
    batches = plan_batches(queue, COST, quota_s=1e-6)
    assert [b.items for b in batches[:3]] == [
        (PrefillItem("big", 1_000_000, 1),),
        (PrefillItem("big", 1_000_001, 1),),
        (PrefillItem("big", 1_000_002, 1),),
    ]
    assert all(b.over_quota and b.attention_s > 1e-6 for b in batches[:3])
    assert [b.remainder for b in batches[:3]] == [
        PrefillItem("big", 1_000_001, 2),
        PrefillItem("big", 1_000_002, 1),
        None,
    ]
    assert batches[2].completed_turn_ids == ("big",)
    # "small" (10 x 5 pairs x 0.5 ns = 25 ns) then fits whole, within the quota
    assert batches[3].items == (PrefillItem("small", 0, 10),)
    assert not batches[3].over_quota
    assert len(batches) == 4


def test_infinite_quota_takes_everything_and_free_attention_always_fits() -> None:
    queue = [PrefillItem(f"t{i}", 10**6, 10**5) for i in range(4)]
    assert plan_batches(queue, COST, quota_s=math.inf) == (
        PrefillBatch(tuple(queue), total(tuple(queue))),
    )
    batches = plan_batches(queue, FREE, quota_s=1e-9)
    assert len(batches) == 1 and batches[0].attention_s == 0.0


def test_empty_queue() -> None:
    assert pack_prefill_batch([], COST) == PrefillBatch((), 0.0)
    assert plan_batches([], COST) == ()


def test_inputs_are_not_mutated() -> None:
    queue = [PrefillItem("a", 100_000, 10_000), PrefillItem("b", 0, 10)]
    before = list(queue)
    plan_batches(queue, COST)
    pack_prefill_batch(queue, COST)
    assert queue == before


@pytest.mark.parametrize("quota", [0.0, -0.1, math.nan])
def test_bad_quota_is_rejected(quota: float) -> None:
    with pytest.raises(ValueError, match="quota_s"):
        pack_prefill_batch([PrefillItem("a", 0, 1)], COST, quota_s=quota)
    with pytest.raises(ValueError, match="quota_s"):
        plan_batches([], COST, quota_s=quota)


@pytest.mark.parametrize(
    "cached, new, field", [(-1, 1, "cached_tokens"), (0, 0, "new_tokens"), (5, -3, "new_tokens")]
)
def test_bad_prefill_items_are_rejected(cached: int, new: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PrefillItem("t", cached, new)


# -- properties -------------------------------------------------------------------------------


def check_plan(queue: list[PrefillItem], cost: CostModel, quota: float) -> None:
    before = list(queue)
    batches = plan_batches(queue, cost, quota_s=quota)
    assert queue == before  # never mutated
    assert plan_batches(queue, cost, quota_s=quota) == batches  # deterministic
    assert bool(batches) == bool(queue)

    # every batch holds something and stays within the quota, except a forced 1-token batch
    for b in batches:
        assert b.items
        assert b.attention_s == pytest.approx(total(b.items, cost), rel=1e-12, abs=1e-15)
        if b.over_quota:
            assert len(b.items) == 1 and b.items[0].new_tokens == 1
            assert b.attention_s > quota
            assert cost.attention_s(b.items[0].cached_tokens, 1) > quota
        else:
            assert b.attention_s <= quota

    # FIFO: turns appear in queue order, each turn's chunks contiguous
    order: list[str] = []
    for b in batches:
        for i in b.items:
            if not order or order[-1] != i.turn_id:
                order.append(i.turn_id)
    assert order == [i.turn_id for i in queue]

    # chunks of a turn sum to its new tokens; each chunk's cached = previous cached + chunk
    chunks: dict[str, list[PrefillItem]] = {}
    for b in batches:
        for i in b.items:
            chunks.setdefault(i.turn_id, []).append(i)
    for item in queue:
        got = chunks[item.turn_id]
        assert sum(c.new_tokens for c in got) == item.new_tokens
        assert got[0].cached_tokens == item.cached_tokens
        for prev, later in itertools.pairwise(got):
            assert later.cached_tokens == prev.cached_tokens + prev.new_tokens

    # only the last item of a batch is partial, and its remainder is what comes next
    for b, nxt in itertools.pairwise(batches):
        if b.remainder is not None:
            assert nxt.items[0].turn_id == b.remainder.turn_id
            assert nxt.items[0].cached_tokens == b.remainder.cached_tokens
    assert batches == () or batches[-1].remainder is None

    # maximal: a cut chunk + 1 token would overflow; an uncut batch can't take the next token
    following: list[PrefillBatch | None] = [*batches[1:], None]
    for b, after in zip(batches, following[: len(batches)], strict=True):
        if b.over_quota:
            continue
        prefix = total(b.items[:-1], cost)
        last = b.items[-1]
        if b.remainder is not None:
            assert prefix + cost.attention_s(last.cached_tokens, last.new_tokens + 1) > quota
        elif after is not None:
            head = after.items[0]
            assert b.attention_s + cost.attention_s(head.cached_tokens, 1) > quota

    # chunked prefill does not change the total predicted attention
    assert sum(b.attention_s for b in batches) == pytest.approx(
        sum(cost.attention_s(i.cached_tokens, i.new_tokens) for i in queue), rel=1e-9
    )

    # stepping pack_prefill_batch + remaining_queue gives the same batches
    rest: tuple[PrefillItem, ...] = tuple(queue)
    stepped: list[PrefillBatch] = []
    while rest:
        b = pack_prefill_batch(rest, cost, quota_s=quota)
        stepped.append(b)
        rest = remaining_queue(rest, b)
    assert tuple(stepped) == batches


items = st.lists(st.tuples(st.integers(0, 200_000), st.integers(1, 4000)), min_size=0, max_size=8)


@given(items, st.floats(0.005, 0.5))
def test_plan_invariants(raw: list[tuple[int, int]], quota: float) -> None:
    check_plan([PrefillItem(f"t{i}", c, n) for i, (c, n) in enumerate(raw)], COST, quota)


@given(
    st.lists(st.tuples(st.integers(0, 2_000_000), st.integers(1, 40)), min_size=1, max_size=6),
    st.floats(1e-7, 1e-3),
)
def test_plan_invariants_with_tiny_quotas(raw: list[tuple[int, int]], quota: float) -> None:
    # exercises the minimal-progress batches (one token over a long context > quota)
    check_plan([PrefillItem(f"t{i}", c, n) for i, (c, n) in enumerate(raw)], COST, quota)


@settings(max_examples=50)
@given(
    st.integers(0, 10**6),
    st.integers(2, 10**6),
    st.floats(0.0, 0.3),
    st.floats(1e-6, 1.0),
)
def test_binary_search_finds_the_maximal_chunk(
    cached: int, new: int, used_fraction: float, quota: float
) -> None:
    # a first item uses part of the quota; the second is cut at exactly the largest chunk
    first_new = max(1, int(math.sqrt(4 * used_fraction * quota / 1e-9)))
    first = PrefillItem("first", 0, first_new)
    batch = pack_prefill_batch([first, PrefillItem("x", cached, new)], COST, quota_s=quota)
    if batch.over_quota or batch.items[0] != first:
        return  # the first item alone did not fit; covered elsewhere
    used = att(0, first_new)
    if used + att(cached, new) <= quota:
        assert batch.items[-1] == PrefillItem("x", cached, new)
        return
    if len(batch.items) == 1:
        assert used + att(cached, 1) > quota  # not even one token fits after "first"
        return
    chunk = batch.items[-1].new_tokens
    assert 1 <= chunk < new
    assert used + att(cached, chunk) <= quota < used + att(cached, chunk + 1)


# -- decode -----------------------------------------------------------------------------------


def test_decode_batch_takes_every_active_sequence() -> None:
    active = [DecodeItem("a", 30_000), DecodeItem("b", 12_000), DecodeItem("c", 0)]
    before = list(active)
    batch = decode_batch(active)
    assert active == before
    assert batch == DecodeBatch(tuple(active))
    assert batch.num_seqs == 3 and batch.context_tokens == 42_000
    assert batch.step_s(COST) == pytest.approx(COST.decode_step_s(3, 42_000))
    assert decode_batch([]).step_s(COST) == 0.0


def test_bad_decode_item_is_rejected() -> None:
    with pytest.raises(ValueError, match="context_tokens"):
        DecodeItem("a", -1)


# -- balance ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "times, expected",
    [
        ([0.3], 1.0),
        ([0.1, 0.1, 0.1], 1.0),
        ([0.0, 0.0, 0.0, 0.0], 1.0),
        ([0.1, 0.3], 1.5),
        ([0.0, 0.2], 2.0),
        ([0.3, 0.3, 0.3, 0.0], 4 / 3),
    ],
)
def test_attention_balance(times: list[float], expected: float) -> None:
    assert attention_balance(times) == pytest.approx(expected)
    assert attention_balance(tuple(times)) == attention_balance(times)


def test_attention_balance_of_equal_times_is_exactly_one() -> None:
    assert attention_balance([0.1] * 3) == 1.0
    assert attention_balance([0.0] * 8) == 1.0


@pytest.mark.parametrize("times", [[], [0.1, -0.1], [math.nan], [0.1, math.inf]])
def test_attention_balance_rejects_bad_input(times: list[float]) -> None:
    with pytest.raises(ValueError):
        attention_balance(times)


@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=16))
def test_attention_balance_bounds(times: list[float]) -> None:
    b = attention_balance(times)
    assert 1.0 - 1e-12 <= b <= len(times) + 1e-9  # max/mean is between 1 and the GPU count


def test_step_time_is_one_fixed_cost_plus_tokens_plus_attention() -> None:
    batch = pack_prefill_batch([PrefillItem("a", 1000, 100), PrefillItem("b", 2000, 50)], COST)
    expected = 5e-3 + 150 * 10e-6 + att(1000, 100) + att(2000, 50)
    assert math.isclose(batch.step_s(COST), expected)
    # one request alone costs what the cost model's prefill_s says
    alone = pack_prefill_batch([PrefillItem("a", 1000, 100)], COST)
    assert math.isclose(alone.step_s(COST), COST.prefill_s(1000, 100))
    assert PrefillBatch((), 0.0).step_s(COST) == 0.0


def test_without_a_quota_the_head_runs_whole() -> None:
    queue = [PrefillItem("a", 60_000, 12_000), PrefillItem("b", 10, 10)]
    batch = head_batch(queue, COST)
    assert batch.items == (queue[0],) and batch.remainder is None
    assert batch.attention_s == att(60_000, 12_000) > DEFAULT_COMPUTE_QUOTA_S
    assert batch.completed_turn_ids == ("a",)
    assert head_batch([], COST) == PrefillBatch((), 0.0)

"""Read side (DualPath §6) and split reads (§6 future work): coverage, balance, optimality."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.read_side import BlockRange, ReadSplit, choose_read_side, split_read, tie_side
from scheduler.views import ReadSide


def test_whole_read_goes_to_the_shorter_queue_ties_to_the_tie_side() -> None:
    def side(hit: int, qp: int, qd: int) -> ReadSide:
        return choose_read_side(hit_tokens=hit, prefill_read_q_tokens=qp, decode_read_q_tokens=qd)

    assert side(640, 100, 99) is ReadSide.DECODE
    assert side(640, 99, 100) is ReadSide.PREFILL
    assert side(640, 100, 100) is ReadSide.PREFILL  # the default tie
    assert side(0, 100, 0) is ReadSide.PREFILL  # nothing to read
    tied = choose_read_side(
        hit_tokens=640, prefill_read_q_tokens=0, decode_read_q_tokens=0, tie=ReadSide.DECODE
    )
    assert tied is ReadSide.DECODE


def test_equal_queues_go_to_the_node_that_has_read_less() -> None:
    def side(total_p: int, total_d: int) -> ReadSide:
        return choose_read_side(
            hit_tokens=640,
            prefill_read_q_tokens=50,
            decode_read_q_tokens=50,
            prefill_read_total_tokens=total_p,
            decode_read_total_tokens=total_d,
            tie=ReadSide.PREFILL,
        )

    assert side(1000, 999) is ReadSide.DECODE
    assert side(999, 1000) is ReadSide.PREFILL
    assert side(1000, 1000) is ReadSide.PREFILL  # the tie side
    # the queue decides first, whatever the totals
    assert (
        choose_read_side(
            hit_tokens=640,
            prefill_read_q_tokens=51,
            decode_read_q_tokens=50,
            prefill_read_total_tokens=0,
            decode_read_total_tokens=10**9,
        )
        is ReadSide.DECODE
    )


def test_ties_split_about_evenly_over_turns() -> None:
    sides = Counter(tie_side(f"t{i}") for i in range(1000))
    assert set(sides) == {ReadSide.PREFILL, ReadSide.DECODE}
    assert abs(sides[ReadSide.PREFILL] - sides[ReadSide.DECODE]) < 100
    assert tie_side("t7") is tie_side("t7")


def split(n: int, qp: int, qd: int, rp: float = 1.0, rd: float = 1.0, bt: int = 64) -> ReadSplit:
    return split_read(
        n,
        block_tokens=bt,
        prefill_read_q_tokens=qp,
        decode_read_q_tokens=qd,
        prefill_tokens_per_s=rp,
        decode_tokens_per_s=rd,
    )


def test_equal_queues_and_rates_split_in_half() -> None:
    s = split(10, 0, 0)
    assert (s.prefill_blocks, s.decode_blocks) == (BlockRange(0, 5), BlockRange(5, 10))
    assert s.prefill_finish_s == s.decode_finish_s == 320.0


def test_split_fills_the_shorter_queue_first() -> None:
    # prefill queue 640 tokens = 10 blocks behind: it takes (20 - 10) / 2 = 5 of 20 blocks
    s = split(20, 640, 0)
    assert (s.prefill_blocks.num_blocks, s.decode_blocks.num_blocks) == (5, 15)
    assert s.prefill_finish_s == s.decode_finish_s
    assert s.major_side is ReadSide.DECODE


def test_faster_snic_takes_proportionally_more() -> None:
    s = split(30, 0, 0, rp=2.0, rd=1.0)
    assert (s.prefill_blocks.num_blocks, s.decode_blocks.num_blocks) == (20, 10)


def test_far_longer_queue_reads_nothing() -> None:
    s = split(4, 10**6, 0)
    assert (s.prefill_blocks, s.decode_blocks) == (BlockRange(0, 0), BlockRange(0, 4))
    assert s.prefill_finish_s == 0.0 and s.decode_finish_s == 256.0


def test_no_hit_blocks() -> None:
    s = split(0, 5, 5)
    assert (s.prefill_blocks.num_blocks, s.decode_blocks.num_blocks) == (0, 0)
    assert s.finish_s == 0.0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        split(-1, 0, 0)
    with pytest.raises(ValueError):
        split(1, 0, 0, bt=0)
    with pytest.raises(ValueError):
        split(1, 0, 0, rp=0.0)
    with pytest.raises(ValueError):
        BlockRange(3, 2)
    with pytest.raises(ValueError):
        BlockRange(-1, 2)


rates = st.floats(0.5, 4.0, allow_nan=False)


@given(
    st.integers(0, 600),
    st.integers(0, 50_000),
    st.integers(0, 50_000),
    rates,
    rates,
    st.sampled_from([1, 16, 64, 256]),
)
def test_split_covers_each_block_once_and_is_optimal(
    n: int, qp: int, qd: int, rp: float, rd: float, bt: int
) -> None:
    s = split(n, qp, qd, rp, rd, bt)
    # contiguous, prefill first, every hit block exactly once
    assert s.prefill_blocks.first_block == 0
    assert s.prefill_blocks.end_block == s.decode_blocks.first_block
    assert s.decode_blocks.end_block == n
    covered = [*range(s.prefill_blocks.first_block, s.prefill_blocks.end_block)]
    covered += range(s.decode_blocks.first_block, s.decode_blocks.end_block)
    assert covered == list(range(n))

    # finish times as documented, and no split of whole blocks finishes earlier
    def finish(k: int) -> tuple[float, float]:
        fp = (qp + k * bt) / rp if k > 0 else 0.0
        fd = (qd + (n - k) * bt) / rd if k < n else 0.0
        return fp, fd

    k = s.prefill_blocks.num_blocks
    assert (s.prefill_finish_s, s.decode_finish_s) == finish(k)
    best = min(max(finish(j)) for j in range(n + 1))
    assert s.finish_s == best
    # balanced: when both sides read, their finish times differ by under one block per side
    if 0 < k < n:
        assert abs(s.prefill_finish_s - s.decode_finish_s) <= bt / rp + bt / rd + 1e-9
    assert split(n, qp, qd, rp, rd, bt) == s

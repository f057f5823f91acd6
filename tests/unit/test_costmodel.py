"""Cost model: known values, zero cases, monotonicity, chunked prefill and input checks."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.costmodel import CostModel, CostModelParams

PARAMS = CostModelParams(
    prefill_base_ms=5.0,
    prefill_us_per_token=10.0,
    attention_ns_per_token_pair=0.5,
    decode_base_ms=8.0,
    decode_us_per_seq=20.0,
    decode_ns_per_context_token=5.0,
)
MODEL = CostModel(PARAMS)
ZERO = CostModel(CostModelParams(0.0, 0.0, 0.0, 0.0, 0.0, 0.0))

tokens = st.integers(0, 200_000)


def test_known_prefill_values() -> None:
    # 100 new tokens over 1,000 cached: 100 x (1,000 + 50) query-key pairs
    assert MODEL.attention_s(1000, 100) == pytest.approx(105_000 * 0.5e-9)
    assert MODEL.prefill_s(1000, 100) == pytest.approx(5e-3 + 100 * 10e-6 + 105_000 * 0.5e-9)
    assert MODEL.prefill_tokens_per_s(1000, 100) == pytest.approx(1100 / MODEL.prefill_s(1000, 100))
    # a fresh 512-token prompt: 512 x 256 pairs
    assert MODEL.attention_s(0, 512) == pytest.approx(512 * 256 * 0.5e-9)


def test_known_decode_values() -> None:
    assert MODEL.decode_step_s(4, 10_000) == pytest.approx(8e-3 + 4 * 20e-6 + 10_000 * 5e-9)
    assert MODEL.decode_step_s(1, 0) == pytest.approx(8e-3 + 20e-6)


def test_zero_cases() -> None:
    assert MODEL.prefill_s(0, 0) == pytest.approx(5e-3)  # the fixed cost remains
    assert MODEL.attention_s(50_000, 0) == 0.0
    assert MODEL.decode_step_s(0, 123_456) == 0.0  # no sequences, no step
    assert MODEL.prefill_tokens_per_s(0, 0) == 0.0
    assert ZERO.prefill_s(1000, 100) == 0.0
    assert ZERO.prefill_tokens_per_s(1000, 100) == float("inf")
    assert ZERO.decode_step_s(8, 1000) == 0.0


@pytest.mark.parametrize("cached, new", [(-1, 0), (0, -1), (-5, -5)])
def test_prefill_rejects_negative_token_counts(cached: int, new: int) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        MODEL.prefill_s(cached, new)
    with pytest.raises(ValueError):
        MODEL.prefill_tokens_per_s(cached, new)


@pytest.mark.parametrize("num_seqs, context", [(-1, 100), (1, -1)])
def test_decode_rejects_negative_inputs(num_seqs: int, context: int) -> None:
    try:
        MODEL.decode_step_s(num_seqs, context)
    except ValueError:
        return
    raise AssertionError("negative input accepted")


@given(cached=tokens, new=tokens, more=st.integers(1, 10_000))
def test_prefill_is_monotone_in_both_token_counts(cached: int, new: int, more: int) -> None:
    t = MODEL.prefill_s(cached, new)
    assert MODEL.prefill_s(cached + more, new) >= t
    assert MODEL.prefill_s(cached, new + more) > t


@given(seqs=st.integers(1, 512), context=st.integers(0, 10**7), more=st.integers(1, 10_000))
def test_decode_step_is_monotone(seqs: int, context: int, more: int) -> None:
    t = MODEL.decode_step_s(seqs, context)
    assert t > 0
    assert MODEL.decode_step_s(seqs + 1, context) > t
    assert MODEL.decode_step_s(seqs, context + more) > t


@given(cached=tokens, first=tokens, second=tokens)
def test_chunked_prefill_attention_adds_up(cached: int, first: int, second: int) -> None:
    # A prefill cut in two chunks (the PE batcher's overflow rule, DualPath §6) does the same
    # attention work as the whole; only the fixed cost is paid twice.
    whole = MODEL.attention_s(cached, first + second)
    chunks = MODEL.attention_s(cached, first) + MODEL.attention_s(cached + first, second)
    assert chunks == pytest.approx(whole, rel=1e-9, abs=1e-15)
    split = MODEL.prefill_s(cached, first) + MODEL.prefill_s(cached + first, second)
    assert split == pytest.approx(MODEL.prefill_s(cached, first + second) + 5e-3, rel=1e-9)


def test_model_and_params_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PARAMS.prefill_base_ms = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODEL.params = PARAMS  # type: ignore[misc]

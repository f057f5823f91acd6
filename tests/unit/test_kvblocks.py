"""Deterministic KV bytes: same identity, same bytes; any other bytes fail verification."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kvblocks import KvCorruption, KvGenerator, crc

GEN = KvGenerator(slice_bytes=1000, layer_groups=4)


def test_slices_are_deterministic_across_generators() -> None:
    other = KvGenerator(slice_bytes=1000, layer_groups=4)
    assert GEN.slice(3, 17, 2) == other.slice(3, 17, 2)
    assert GEN.expected_crc(3, 17, 2) == crc(other.slice(3, 17, 2))


def test_slice_has_the_requested_size() -> None:
    for n in (64, 1000, 65_537):
        assert len(KvGenerator(slice_bytes=n, layer_groups=1).slice(1, 2, 0)) == n


def test_distinct_slices_differ() -> None:
    ids = [(t, b, g) for t in range(3) for b in range(4) for g in range(4)]
    slices = {GEN.slice(*i) for i in ids}
    crcs = {GEN.expected_crc(*i) for i in ids}
    assert len(slices) == len(ids)
    assert len(crcs) == len(ids)


def test_full_block_is_its_groups_in_order() -> None:
    block = GEN.full_block(5, 9)
    assert len(block) == 4 * 1000
    assert block == b"".join(GEN.slice(5, 9, g) for g in range(4))


def test_pack_then_verify_counts_bytes() -> None:
    ids = [(b, g) for b in (0, 1, 7) for g in range(4)]
    entries, payload = GEN.pack(11, ids)
    assert [e[:2] for e in entries] == [list(i) for i in ids]
    assert GEN.verify(11, entries, payload) == len(ids) * 1000 == len(payload)


def test_verify_of_nothing_is_zero() -> None:
    assert GEN.verify(1, [], b"") == 0


@given(bit=st.integers(min_value=0, max_value=3 * 1000 * 8 - 1))
def test_any_flipped_bit_is_caught(bit: int) -> None:
    entries, payload = GEN.pack(2, [(4, 0), (4, 1), (4, 2)])
    damaged = bytearray(payload)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(KvCorruption, match="crc"):
        GEN.verify(2, entries, bytes(damaged))


def test_self_consistent_wrong_content_is_caught() -> None:
    # The bytes of block 8 with their own, correct crc, labelled as block 3.
    wrong = GEN.slice(1, 8, 0)
    entries = [[3, 0, crc(wrong)]]
    with pytest.raises(KvCorruption, match="not the expected KV"):
        GEN.verify(1, entries, wrong)


def test_wrong_trajectory_is_caught() -> None:
    entries, payload = GEN.pack(1, [(0, 0)])
    with pytest.raises(KvCorruption, match="not the expected KV"):
        GEN.verify(2, entries, payload)


@pytest.mark.parametrize("delta", [-1, 1, -1000, 1000])
def test_length_mismatch(delta: int) -> None:
    entries, payload = GEN.pack(1, [(0, 0), (0, 1)])
    bad = payload[:delta] if delta < 0 else payload + b"\x00" * delta
    with pytest.raises(KvCorruption, match="payload of"):
        GEN.verify(1, entries, bad)


def test_slice_bigger_than_the_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="pool"):
        KvGenerator(slice_bytes=8 << 20, layer_groups=1).slice(0, 0, 0)

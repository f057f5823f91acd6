"""KV content format v2: same identity, same bytes; the per-frame crc is derived, not generated,
and any other bytes (flipped in flight, or the right bytes of another slice) fail verification."""

from __future__ import annotations

import random
import struct

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kvblocks import POOL_BYTES, KvCorruption, KvGenerator, SliceSet, crc

U32_MAX = (1 << 32) - 1
GEN = KvGenerator(slice_bytes=1000, layer_groups=4)
POOL = random.Random(0x5EED).randbytes(POOL_BYTES)  # the documented pool, rebuilt here


def whole(traj: int, blocks: list[int] | tuple[int, ...], gen: KvGenerator = GEN) -> SliceSet:
    return SliceSet(traj, tuple(blocks), 0, gen.layer_groups)


# -- the format --------------------------------------------------------------------------------


def test_crc_is_crc32c() -> None:
    assert crc(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc(bytearray(b"123456789")) == crc(memoryview(b"123456789")) == 0xE3069283


@pytest.mark.parametrize("n", [64, 1000, 4112, 4113, 65_537])
def test_a_slice_is_a_stamp_and_a_body_from_the_cyclic_pool(n: int) -> None:
    gen = KvGenerator(slice_bytes=n, layer_groups=3)
    data = gen.slice(7, U32_MAX, 2)
    assert len(data) == n
    assert data[:16] == struct.pack("!4sIII", b"KVB2", 7, U32_MAX, 2)
    assert data[16:] in POOL + POOL[: n - 16]


def test_a_slice_longer_than_the_pool_wraps_around_it() -> None:
    n = POOL_BYTES + 5000
    gen = KvGenerator(slice_bytes=n, layer_groups=1)
    s = SliceSet(1, (2, 3), 0, 1)
    data = gen.payload(s)
    body = data[16:n]
    start = POOL.find(body[:64])
    assert start >= 0
    assert body == (POOL[start:] + POOL + POOL)[: n - 16]
    assert gen.expected_crc(s) == crc32c.crc32c(data)


def test_slices_are_deterministic_across_generators() -> None:
    other = KvGenerator(slice_bytes=1000, layer_groups=4)
    s = SliceSet(3, (17, 4, 17), 1, 3)
    assert GEN.payload(s) == other.payload(s)
    assert GEN.expected_crc(s) == other.expected_crc(s) == crc(other.payload(s))


def test_distinct_slices_differ() -> None:
    ids = [(t, b, g) for t in range(3) for b in range(4) for g in range(4)]
    slices = {GEN.slice(*i) for i in ids}
    crcs = {GEN.expected_crc(SliceSet(t, (b,), g, g + 1)) for t, b, g in ids}
    assert len(slices) == len(crcs) == len(ids)


def test_payload_order_is_blocks_then_groups() -> None:
    s = SliceSet(5, (9, 2, 9), 1, 3)
    expected = b"".join(GEN.slice(5, b, g) for b in (9, 2, 9) for g in (1, 2))
    assert GEN.payload(s) == expected
    assert GEN.full_blocks(5, [9, 2]) == GEN.payload(whole(5, [9, 2]))
    assert GEN.full_blocks(5, [9]) == b"".join(GEN.slice(5, 9, g) for g in range(4))


def test_empty_sets() -> None:
    s = whole(1, [])
    assert s.num_slices == 0
    assert GEN.payload(s) == b""
    assert GEN.expected_crc(s) == 0 == crc(b"")
    assert GEN.verify(s, b"", 0) == 0


@given(
    n=st.one_of(st.integers(64, 5000), st.sampled_from([4111, 4112, 4113, 8208, 70_000])),
    groups=st.integers(1, 8),
    traj=st.integers(0, U32_MAX),
    blocks=st.lists(
        st.one_of(st.integers(0, 64), st.integers(U32_MAX - 8, U32_MAX), st.integers(0, U32_MAX)),
        min_size=1,
        max_size=40,
    ),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
def test_derived_crc_equals_the_crc_of_the_bytes(
    n: int, groups: int, traj: int, blocks: list[int], data: st.DataObject
) -> None:
    g0 = data.draw(st.integers(0, groups - 1), label="g0")
    g1 = data.draw(st.integers(g0 + 1, groups), label="g1")
    gen = KvGenerator(slice_bytes=n, layer_groups=groups)
    s = SliceSet(traj, tuple(blocks), g0, g1)
    payload = gen.payload(s)
    assert len(payload) == s.num_slices * n
    assert gen.expected_crc(s) == crc32c.crc32c(payload)
    assert gen.verify(s, payload, crc(payload)) == len(payload)


@pytest.mark.parametrize("num_slices", [1, 2, 3, 15, 16, 17, 255, 256, 257, 4096, 5000])
def test_derived_crc_for_frames_of_every_fold_shape(num_slices: int) -> None:
    gen = KvGenerator(slice_bytes=64, layer_groups=1)
    s = SliceSet(11, tuple(range(1000, 1000 + num_slices)), 0, 1)
    assert gen.expected_crc(s) == crc32c.crc32c(gen.payload(s))


# -- verification ------------------------------------------------------------------------------

FRAME = SliceSet(2, (4, 5), 1, 3)  # 4 slices


@given(bit=st.integers(min_value=0, max_value=4 * 1000 * 8 - 1))
def test_any_flipped_bit_is_caught_as_corruption_in_flight(bit: int) -> None:
    payload = GEN.payload(FRAME)
    carried = crc(payload)
    damaged = bytearray(payload)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(KvCorruption, match=r"crc .* \(corrupted in flight\)"):
        GEN.verify(FRAME, damaged, carried)


@pytest.mark.parametrize(
    "impostor",
    [
        SliceSet(2, (4, 6), 1, 3),  # another block
        SliceSet(3, (4, 5), 1, 3),  # another trajectory
        SliceSet(2, (4, 5), 0, 2),  # other groups
        SliceSet(2, (5, 4), 1, 3),  # the right slices in the wrong order
    ],
)
def test_self_consistent_wrong_content_is_caught(impostor: SliceSet) -> None:
    # Real KV bytes with their own, correct crc, labelled as FRAME's slices.
    wrong = GEN.payload(impostor)
    with pytest.raises(KvCorruption, match="content is not the expected KV"):
        GEN.verify(FRAME, wrong, crc(wrong))


def test_one_wrong_slice_among_many_is_caught() -> None:
    s = whole(9, range(100))
    payload = bytearray(GEN.payload(s))
    n = GEN.slice_bytes
    at = (57 * 4 + 2) * n
    payload[at : at + n] = GEN.slice(9, 57, 3)
    with pytest.raises(KvCorruption, match="not the expected KV"):
        GEN.verify(s, payload, crc(payload))


@pytest.mark.parametrize("delta", [-1, 1, -1000, 1000])
def test_length_mismatch(delta: int) -> None:
    payload = GEN.payload(FRAME)
    bad = payload[:delta] if delta < 0 else payload + b"\x00" * delta
    with pytest.raises(KvCorruption, match=f"payload of {len(bad)} bytes for 4 slices of 1000"):
        GEN.verify(FRAME, bad, crc(bad))


def test_verify_accepts_any_buffer() -> None:
    payload = GEN.payload(FRAME)
    for buf in (bytearray(payload), memoryview(payload)):
        assert GEN.verify(FRAME, buf, crc(payload)) == 4000


# -- group_slices ------------------------------------------------------------------------------


@pytest.mark.parametrize("g", range(4))
def test_group_slices_equals_slicing_by_hand(g: int) -> None:
    blocks = (8, 3, 3, 1 << 31)
    s = whole(6, blocks)
    payload = GEN.payload(s)
    n = GEN.slice_bytes
    by_hand = b"".join(payload[(i * 4 + g) * n : (i * 4 + g + 1) * n] for i in range(len(blocks)))
    assert GEN.group_slices(s, payload, g) == by_hand
    assert GEN.group_slices(s, memoryview(payload), g) == GEN.payload(SliceSet(6, blocks, g, g + 1))


def test_group_slices_needs_a_whole_block_frame() -> None:
    with pytest.raises(ValueError, match="whole blocks"):
        GEN.group_slices(FRAME, GEN.payload(FRAME), 1)
    s = whole(1, [0])
    with pytest.raises(ValueError, match="group 4"):
        GEN.group_slices(s, GEN.payload(s), 4)
    with pytest.raises(KvCorruption, match="payload of"):
        GEN.group_slices(s, GEN.payload(s)[:-1], 0)


# -- construction and arguments ----------------------------------------------------------------


def test_generator_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="slice_bytes"):
        KvGenerator(slice_bytes=63, layer_groups=1)
    with pytest.raises(ValueError, match="layer_groups"):
        KvGenerator(slice_bytes=64, layer_groups=0)


@pytest.mark.parametrize(
    "s",
    [
        SliceSet(1 << 32, (0,), 0, 1),
        SliceSet(-1, (0,), 0, 1),
        SliceSet(0, (1 << 32,), 0, 1),
        SliceSet(0, (-1,), 0, 1),
        SliceSet(0, (0,), 0, 5),
        SliceSet(0, (0,), 2, 2),
    ],
)
def test_out_of_range_identities_are_refused(s: SliceSet) -> None:
    with pytest.raises(ValueError):
        GEN.payload(s)
    with pytest.raises(ValueError):
        GEN.expected_crc(s)

"""Frame codec: round trips, incremental decoding and every way a frame can be malformed."""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterable
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.codec import (
    MAX_HEADER_BYTES,
    PREFIX,
    PREFIX_SIZE,
    Frame,
    FrameDecoder,
    FrameError,
    FrameReceiver,
    decode_header,
    encode,
    encode_bytes,
    encode_prefix,
    parse_prefix,
)
from services.wire.frames import error_frame


def raw_frame(header: object, payload: bytes = b"") -> bytes:
    """A frame with an arbitrary (possibly invalid) msgpack header."""
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    return encode_prefix(len(packed), len(payload)) + packed + payload


def test_round_trip_keeps_kind_header_and_payload() -> None:
    frame = Frame("blocks", {"req": 7, "traj": 3, "entries": [[1, 0, 99]]}, b"\x00\x01kv" * 100)
    assert FrameDecoder().feed(encode_bytes(frame)) == [frame]


def test_round_trip_without_payload_or_header() -> None:
    frame = Frame("stats")
    assert encode(frame)[1:] == []  # no empty payload buffer
    assert FrameDecoder().feed(encode_bytes(frame)) == [frame]


def test_payload_is_a_separate_buffer() -> None:
    payload = b"x" * 1000
    parts = encode(Frame("write", {"req": 1}, payload))
    assert parts[1] is payload


def test_header_t_is_the_kind_not_a_field() -> None:
    frame = Frame("read", {"t": "spoofed", "req": 1})
    (decoded,) = FrameDecoder().feed(encode_bytes(frame))
    assert decoded.kind == "read"
    assert "t" not in decoded.header


def test_byte_by_byte_decoding_yields_each_frame_once() -> None:
    frames = [
        Frame("read", {"req": 1, "blocks": [1, 2, 3]}),
        Frame("blocks", {"req": 1}, bytes(range(256)) * 3),
        Frame("read_done", {"req": 1, "num_blocks": 3}),
    ]
    data = b"".join(encode_bytes(f) for f in frames)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
    assert got == frames


def test_several_frames_in_one_feed() -> None:
    frames = [Frame("a", {"i": i}, b"p" * i) for i in range(5)]
    assert FrameDecoder().feed(b"".join(encode_bytes(f) for f in frames)) == frames


def test_error_frame_shape() -> None:
    frame = error_frame("missing", "block 3")
    assert frame.kind == "error"
    assert frame.header == {"code": "missing", "message": "block 3"}


# -- malformed frames -------------------------------------------------------------------------


def test_bad_magic() -> None:
    data = bytearray(encode_bytes(Frame("read")))
    data[0:2] = b"XX"
    with pytest.raises(FrameError, match="magic"):
        FrameDecoder().feed(bytes(data))


def test_bad_version() -> None:
    data = bytearray(encode_bytes(Frame("read")))
    data[2] = 99
    with pytest.raises(FrameError, match="version"):
        FrameDecoder().feed(bytes(data))


def test_garbage_is_rejected_as_soon_as_a_prefix_is_complete() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"hello, ") == []  # not yet a whole prefix
    with pytest.raises(FrameError):
        decoder.feed(b"storage!")


def test_oversize_header_length_in_prefix() -> None:
    prefix = PREFIX.pack(b"DP", 1, MAX_HEADER_BYTES + 1, 0)
    with pytest.raises(FrameError, match="header length"):
        FrameDecoder().feed(prefix)


def test_zero_header_length() -> None:
    with pytest.raises(FrameError, match="header length"):
        parse_prefix(PREFIX.pack(b"DP", 1, 0, 0))


def test_encoding_an_oversize_header_fails() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        encode(Frame("write", {"blob": b"x" * MAX_HEADER_BYTES}))


def test_oversize_payload_is_rejected_before_it_arrives() -> None:
    data = encode_bytes(Frame("write", {"req": 1}, b"x" * 101))
    decoder = FrameDecoder(max_payload_bytes=100)
    with pytest.raises(FrameError, match="payload length"):
        decoder.feed(data[:PREFIX_SIZE])


def test_payload_at_the_limit_is_fine() -> None:
    frame = Frame("write", {"req": 1}, b"x" * 100)
    assert FrameDecoder(max_payload_bytes=100).feed(encode_bytes(frame)) == [frame]


def test_short_prefix() -> None:
    with pytest.raises(FrameError, match="short"):
        parse_prefix(b"DP\x01")


@pytest.mark.parametrize("header", [[1, 2, 3], "read", 42, None])
def test_non_map_header(header: object) -> None:
    with pytest.raises(FrameError, match="must be a map"):
        FrameDecoder().feed(raw_frame(header))


@pytest.mark.parametrize("header", [{}, {"req": 1}, {"t": ""}, {"t": 5}, {"t": None}])
def test_missing_or_invalid_type(header: dict[str, Any]) -> None:
    with pytest.raises(FrameError, match="no message type"):
        FrameDecoder().feed(raw_frame(header))


def test_header_that_is_not_msgpack() -> None:
    junk = b"\xc1\xc1\xc1"  # 0xc1 is never used by msgpack
    with pytest.raises(FrameError, match="not valid msgpack"):
        FrameDecoder().feed(encode_prefix(len(junk), 0) + junk)


def test_header_with_trailing_bytes() -> None:
    packed = msgpack.packb({"t": "read"}) + b"\x00"
    with pytest.raises(FrameError, match="not valid msgpack"):
        decode_header(packed)


def test_header_with_non_string_keys() -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(raw_frame({"t": "read", 1: "x"}))


# -- property ---------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_frames = st.builds(
    Frame,
    kind=st.text(min_size=1, max_size=16),
    header=st.dictionaries(st.text(max_size=12).filter(lambda k: k != "t"), _values, max_size=6),
    payload=st.binary(max_size=2048),
)


@given(frames=st.lists(_frames, min_size=1, max_size=4), cuts=st.lists(st.integers(0, 10_000)))
def test_encode_then_decode_in_arbitrary_pieces(frames: list[Frame], cuts: list[int]) -> None:
    data = b"".join(encode_bytes(f) for f in frames)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder = FrameDecoder()
    got: list[Frame] = []
    for a, b in itertools.pairwise(points):
        got += decoder.feed(data[a:b])
    assert got == frames


# -- payload types ----------------------------------------------------------------------------


def test_encode_takes_bytearray_and_memoryview_payloads_without_copying() -> None:
    mutable = bytearray(b"kv" * 500)
    assert encode(Frame("write", {}, mutable))[1] is mutable
    view = memoryview(b"kv" * 500)[10:]
    assert encode(Frame("write", {}, view))[1] is view
    assert FrameDecoder().feed(encode_bytes(Frame("w", {}, view))) == [Frame("w", {}, view)]


def test_encode_sends_a_wide_memoryview_as_its_bytes() -> None:
    words = array.array("I", range(100))
    (_, part) = encode(Frame("write", {}, memoryview(words)))
    assert isinstance(part, memoryview)
    assert part.obj is words  # a cast, not a copy
    assert len(part) == 400
    (frame,) = FrameDecoder().feed(encode_bytes(Frame("write", {}, memoryview(words))))
    assert frame.payload == words.tobytes()


def test_encode_refuses_a_strided_memoryview() -> None:
    with pytest.raises(ValueError, match="C-contiguous"):
        encode(Frame("write", {}, memoryview(b"abcdef")[::2]))


# -- FrameReceiver ----------------------------------------------------------------------------


def drive(
    rx: FrameReceiver, data: bytes, read_sizes: Iterable[int] = ()
) -> tuple[list[Frame], list[tuple[object, int]]]:
    """Feed `data` the way an event loop would: ask for a buffer, write at most the next read
    size (0 or missing: as much as fits) into it, report it. Returns the frames and, per read,
    (the object behind the buffer handed out, bytes written)."""
    sizes = iter(read_sizes)
    frames: list[Frame] = []
    reads: list[tuple[object, int]] = []
    pos = 0
    while pos < len(data):
        buf = rx.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), len(data) - pos, next(sizes, 0) or len(data))
        buf[:n] = data[pos : pos + n]
        pos += n
        reads.append((buf.obj, n))
        frames += rx.buffer_updated(n)
    return frames, reads


SMALL_SCRATCH = 256  # payloads >= 64 bytes count as large: both read modes on small data


def mixed_frames() -> list[Frame]:
    return [
        Frame("read", {"req": 1, "blocks": [1, 2, 3]}),
        Frame("blocks", {"req": 1, "entries": [[1, 0, 7]]}, bytes(range(256)) * 3),
        Frame("blocks", {"req": 1, "entries": [[2, 0, 8], [2, 1, 9]]}, b"\xaa" * 500),
        Frame("note", {"req": 1}, b"tiny"),
        Frame("blocks", {"req": 2}, b"\x55" * 300),
        Frame("read_done", {"req": 1, "num_blocks": 3}),
    ]


def test_receiver_split_at_every_byte_boundary() -> None:
    frames = mixed_frames()
    data = b"".join(encode_bytes(f) for f in frames)
    for cut in range(len(data) + 1):
        rx = FrameReceiver(scratch_bytes=SMALL_SCRATCH)
        got, _ = drive(rx, data[:cut])
        assert rx.buffered_bytes == cut - sum(len(encode_bytes(f)) for f in got)
        more, _ = drive(rx, data[cut:])
        assert got + more == frames, f"cut at {cut}"
        assert rx.buffered_bytes == 0


def test_receiver_byte_by_byte() -> None:
    frames = mixed_frames()
    data = b"".join(encode_bytes(f) for f in frames)
    got, reads = drive(FrameReceiver(scratch_bytes=SMALL_SCRATCH), data, itertools.repeat(1))
    assert got == frames
    assert len(reads) == len(data)


def test_receiver_takes_several_frames_in_one_read() -> None:
    frames = [Frame("a", {"i": i}, b"p" * i) for i in range(20)]
    data = b"".join(encode_bytes(f) for f in frames)
    rx = FrameReceiver()
    buf = rx.get_buffer(-1)
    assert len(buf) >= len(data)
    buf[: len(data)] = data
    assert rx.buffer_updated(len(data)) == frames
    assert rx.buffered_bytes == 0


def test_receiver_payload_is_filled_in_place() -> None:
    # After one large frame, the next large payload gets no byte through the scratch buffer:
    # every byte of it is written straight into the (pooled) buffer the frame carries.
    big = [Frame("blocks", {"req": i}, bytes([i]) * (1 << 20)) for i in range(3)]
    data = b"".join(encode_bytes(f) for f in big)
    got, reads = drive(FrameReceiver(), data, itertools.repeat(200_000))
    assert got == big
    for frame in got[1:]:
        payload = frame.payload
        assert isinstance(payload, memoryview) and not payload.readonly
        in_place = sum(n for obj, n in reads if obj is payload.obj)
        assert in_place == len(payload)


def test_receiver_payloads_do_not_share_memory() -> None:
    frames = [Frame("a", {}, b"x" * 10), Frame("b", {}, b"y" * 10)]
    got = FrameDecoder().feed(b"".join(encode_bytes(f) for f in frames))
    first = got[0].payload
    assert isinstance(first, bytearray)
    first[:] = b"z" * 10
    assert got[1].payload == b"y" * 10


def test_receiver_zero_length_payload() -> None:
    rx = FrameReceiver()
    got, _ = drive(rx, encode_bytes(Frame("stats")) * 3)
    assert got == [Frame("stats")] * 3
    assert all(f.payload == b"" for f in got)


def test_receiver_header_near_the_limit_larger_than_its_scratch() -> None:
    frame = Frame("write", {"blob": b"h" * (MAX_HEADER_BYTES - 64)}, b"payload")
    data = encode_bytes(frame) + encode_bytes(Frame("next"))
    got, _ = drive(FrameReceiver(), data, itertools.repeat(100_000))
    assert got == [frame, Frame("next")]


def test_receiver_rejects_a_header_length_over_the_limit() -> None:
    rx = FrameReceiver()
    with pytest.raises(FrameError, match="header length"):
        drive(rx, PREFIX.pack(b"DP", 1, MAX_HEADER_BYTES + 1, 0))


def test_receiver_rejects_an_oversize_payload_before_it_arrives() -> None:
    data = encode_bytes(Frame("write", {"req": 1}, b"x" * 101))
    with pytest.raises(FrameError, match="payload length 101 exceeds limit 100"):
        drive(FrameReceiver(max_payload_bytes=100), data[:PREFIX_SIZE])
    got, _ = drive(FrameReceiver(max_payload_bytes=101), data)
    assert len(got) == 1


def test_receiver_rejects_garbage_once_a_prefix_is_complete() -> None:
    rx = FrameReceiver()
    assert drive(rx, b"hello, ")[0] == []
    assert rx.buffered_bytes == 7
    with pytest.raises(FrameError, match="bad magic b'he'"):
        drive(rx, b"storage!")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"XX" + encode_bytes(Frame("read"))[2:], "bad magic"),
        (b"DP\x63" + encode_bytes(Frame("read"))[3:], "unsupported frame version 99"),
        (PREFIX.pack(b"DP", 1, 0, 0), r"header length 0 outside 1\.\."),
        (raw_frame([1, 2, 3]), "header must be a map, got list"),
        (raw_frame({"req": 1}), "no message type 't'"),
        (encode_prefix(3, 0) + b"\xc1\xc1\xc1", "header is not valid msgpack"),
    ],
)
def test_receiver_error_messages_match_the_codec(data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        drive(FrameReceiver(), data)


def test_receiver_keeps_the_frames_before_garbage_and_stays_failed() -> None:
    good = [Frame("a", {"i": 1}, b"1"), Frame("b", {"i": 2})]
    data = b"".join(encode_bytes(f) for f in good) + b"garbage-garbage"
    rx = FrameReceiver()
    buf = rx.get_buffer(-1)
    buf[: len(data)] = data
    with pytest.raises(FrameError, match="bad magic") as info:
        rx.buffer_updated(len(data))
    assert info.value.frames == good
    assert rx.failed
    buf = rx.get_buffer(-1)  # somewhere to discard into, never empty
    assert len(buf) > 0
    with pytest.raises(FrameError, match="bad magic") as again:
        rx.buffer_updated(1)
    assert again.value.frames == []


def test_decoder_error_carries_earlier_frames_too() -> None:
    good = Frame("a", {"i": 1}, b"1")
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(encode_bytes(good) + b"XX" + bytes(20))
    assert info.value.frames == [good]


def test_receiver_refuses_more_bytes_than_it_handed_out() -> None:
    rx = FrameReceiver()
    buf = rx.get_buffer(-1)
    with pytest.raises(ValueError, match="nbytes"):
        rx.buffer_updated(len(buf) + 1)


@given(
    frames=st.lists(_frames, min_size=1, max_size=5),
    read_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=50),
    scratch=st.sampled_from([SMALL_SCRATCH, 4096, 64 << 10]),
)
def test_receiver_any_frames_any_read_sizes(
    frames: list[Frame], read_sizes: list[int], scratch: int
) -> None:
    data = b"".join(encode_bytes(f) for f in frames)
    rx = FrameReceiver(scratch_bytes=scratch)
    got, _ = drive(rx, data, itertools.cycle(read_sizes))
    assert got == frames
    assert rx.buffered_bytes == 0


def test_receiver_reports_the_wire_size_of_each_frame() -> None:
    frames = [Frame("a", {"i": 1}, b"x" * 10), Frame("bb", {}), Frame("c", {"k": "v"}, b"y")]
    wires = [encode_bytes(f) for f in frames]
    rx = FrameReceiver()
    buf = rx.get_buffer(-1)
    data = b"".join(wires)
    buf[: len(data)] = data
    assert rx.buffer_updated(len(data)) == frames
    assert rx.last_frame_bytes == [len(w) for w in wires]
    buf = rx.get_buffer(-1)
    buf[:3] = wires[0][:3]
    assert rx.buffer_updated(3) == []
    assert rx.last_frame_bytes == []


def test_pooled_payloads_are_reused_only_once_unreferenced() -> None:
    from services.buffers import PayloadPool

    pool = PayloadPool()
    first = pool.get(100_000)
    first[:5] = b"hello"
    kept = bytes(first[:5]), memoryview(first)[:5]  # a derived view keeps it alive
    del first
    second = pool.get(100_000)
    second[:5] = b"XXXXX"
    assert bytes(kept[1]) == b"hello"
    assert pool.num_reused == 0
    del kept, second
    third = pool.get(100_000)
    assert len(third) == 100_000 and pool.num_reused == 1
    assert isinstance(pool.get(1000), bytearray)  # small payloads are not pooled


def test_pool_serves_a_request_from_a_free_buffer_of_a_nearby_larger_class() -> None:
    from services.buffers import POOLED_MIN_BYTES, PayloadPool, class_size

    assert class_size(POOLED_MIN_BYTES) == POOLED_MIN_BYTES
    for n in (POOLED_MIN_BYTES + 1, 100_000, 2 << 20, (2 << 20) + 1, 3_000_001):
        assert n <= class_size(n) <= n * 1.25 + 1  # at most a quarter of slack
    pool = PayloadPool()
    big = pool.get(2 << 20)
    del big
    assert pool.free_bytes == 2 << 20
    smaller = pool.get((2 << 20) - 40_000)  # another class, within twice its size: reused
    assert pool.num_reused == 1 and pool.free_bytes == 0 and len(smaller) == (2 << 20) - 40_000
    del smaller
    tiny = pool.get(200_000)  # far smaller: a buffer of its own, the big one stays free
    assert pool.num_allocated == 2 and pool.free_bytes == 2 << 20 and len(tiny) == 200_000


def test_warm_pool_serves_the_first_requests_without_allocating() -> None:
    from services.buffers import PayloadPool, class_size

    pool = PayloadPool(max_free_bytes=16 << 20)
    added = pool.warm([2 << 20, 3 << 20], 64 << 20)  # capped by the pool's own limit
    assert added == pool.free_bytes <= 16 << 20
    assert added == 3 * (class_size(2 << 20) + class_size(3 << 20))  # round robin, 15 MiB
    allocated = pool.num_allocated
    held = [pool.get(n) for n in (2 << 20, 3 << 20) for _ in range(3)]
    assert pool.num_allocated == allocated and pool.num_reused == 6 and pool.free_bytes == 0
    assert pool.warm([1000], 1 << 20) == 0  # unpooled sizes: nothing to warm
    del held

"""Frame codec: round trips, incremental decoding and every way a frame can be malformed."""

from __future__ import annotations

import itertools
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
    decode_header,
    encode,
    encode_bytes,
    encode_prefix,
    error_frame,
    parse_prefix,
)


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

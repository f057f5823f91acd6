"""Fuzz the sans-I/O codec: valid frames survive any split into reads; arbitrary or mutated
bytes raise only FrameError (never another exception, never a hang), and a failed receiver
stays failed."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from fuzzlib import BUDGET, bounded, msgpack_values, mutated, tried
from hypothesis import given
from hypothesis import strategies as st

from services.codec import (
    PREFIX_SIZE,
    Frame,
    FrameDecoder,
    FrameError,
    FrameReceiver,
    decode_header,
    encode_bytes,
    parse_prefix,
)
from services.wire.frames import error_frame

valid_frames = st.builds(
    Frame,
    st.text(min_size=1, max_size=12),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "t"), msgpack_values, max_size=6),
    st.binary(max_size=2048),
)
chunks = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=16)


def _receive(data: bytes, sizes: list[int], *, max_payload: int = 1 << 20) -> list[Frame]:
    """Feed `data` to a FrameReceiver in reads of the given sizes (cycled), each at most what
    the receiver offered, as the transport does."""
    rx = FrameReceiver(max_payload_bytes=max_payload, scratch_bytes=4 * PREFIX_SIZE + 64)
    out: list[Frame] = []
    pos = i = 0
    while pos < len(data):
        buf = rx.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), len(data) - pos, sizes[i % len(sizes)])
        buf[:n] = data[pos : pos + n]
        pos += n
        i += 1
        out += rx.buffer_updated(n)
    return out


def _same(a: Frame, b: Frame) -> bool:
    # NaN != NaN: compare the msgpack encodings of the headers instead of the values
    return encode_bytes(a) == encode_bytes(b)


@pytest.mark.fuzz_target("codec.round_trip")
@BUDGET
@given(frames=st.lists(valid_frames, min_size=1, max_size=4), sizes=chunks)
def test_valid_frames_round_trip_through_any_reads(frames: list[Frame], sizes: list[int]) -> None:
    tried()
    data = b"".join(encode_bytes(f) for f in frames)
    with bounded(what="receive"):
        got = _receive(data, sizes)
        fed = FrameDecoder().feed(data)
    assert len(got) == len(fed) == len(frames)
    for sent, a, b in zip(frames, got, fed, strict=True):
        assert _same(sent, a) and _same(sent, b)


@pytest.mark.fuzz_target("codec.error_frame")
@BUDGET
@given(code=st.text(max_size=30), message=st.text(max_size=200), req=msgpack_values)
def test_error_frames_round_trip(code: str, message: str, req: Any) -> None:
    tried()
    frame = error_frame(code, message, req=req)
    (back,) = FrameDecoder().feed(encode_bytes(frame))
    assert back.kind == "error"
    assert (back.header["code"], back.header["message"]) == (code, message)
    assert _same(frame, back)


def _only_frame_errors(data: bytes, sizes: list[int]) -> None:
    rx = FrameReceiver(max_payload_bytes=4096, scratch_bytes=4 * PREFIX_SIZE + 64)
    pos = i = 0
    failed = False
    with bounded(what="receive"):
        while pos < len(data):
            buf = rx.get_buffer()
            n = min(len(buf), len(data) - pos, sizes[i % len(sizes)])
            buf[:n] = data[pos : pos + n]
            pos += n
            i += 1
            try:
                rx.buffer_updated(n)
            except FrameError:
                failed = True
            else:
                assert not failed, "a failed receiver must stay failed"
            assert rx.failed == failed
        with contextlib.suppress(FrameError):
            FrameDecoder(max_payload_bytes=4096).feed(data)


@pytest.mark.fuzz_target("codec.garbage")
@BUDGET
@given(
    data=st.binary(max_size=512) | st.binary(max_size=256).map(lambda b: b"DP\x01\x00" + b),
    sizes=chunks,
)
def test_arbitrary_bytes_raise_only_frame_errors(data: bytes, sizes: list[int]) -> None:
    tried()
    _only_frame_errors(data, sizes)
    with bounded(what="parse"):
        with contextlib.suppress(FrameError):
            parse_prefix(data[:PREFIX_SIZE])
        with contextlib.suppress(FrameError):
            decode_header(data)


@pytest.mark.fuzz_target("codec.mutated")
@BUDGET
@given(
    data=mutated(
        st.lists(valid_frames, min_size=1, max_size=3).map(
            lambda fs: b"".join(encode_bytes(f) for f in fs)
        )
    ),
    sizes=chunks,
)
def test_mutated_frames_raise_only_frame_errors(data: bytes, sizes: list[int]) -> None:
    tried()
    _only_frame_errors(data, sizes)

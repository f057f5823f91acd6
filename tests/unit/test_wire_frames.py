"""The typed frame messages: a message survives its frame, a header that is not the message
its kind carries is refused with BadMessage naming the field, and slice sets are bounded."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.blocks import block_runs, chunks, describe, per_frame, run_blocks
from services.codec import Frame, FrameDecoder, encode_bytes
from services.kvblocks import SliceSet
from services.wire.frames import (
    BadMessage,
    ErrorReply,
    FrameKind,
    KvSlices,
    ReadRequest,
    RelaySlices,
    StorageStats,
    WriteRequest,
    error_frame,
    parse,
    to_frame,
)

U32_MAX = (1 << 32) - 1


def _wire(frame: Frame) -> Frame:
    """`frame` as its receiver gets it: encoded and decoded."""
    (back,) = FrameDecoder().feed(encode_bytes(frame))
    return back


# -- block arithmetic -------------------------------------------------------------------------


def test_runs_compress_consecutive_blocks() -> None:
    blocks = (1, 2, 3, 7, 8, 5, 5, U32_MAX)
    assert block_runs(blocks) == [[1, 3], [7, 2], [5, 1], [5, 1], [U32_MAX, 1]]
    assert block_runs(()) == []
    assert run_blocks(block_runs(blocks)) == blocks


def test_frames_of_blocks() -> None:
    assert per_frame(1000, 300) == 3
    assert per_frame(100, 300) == 1  # at least one, even when one is larger than the frame
    assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert chunks(range(0), 2) == []
    assert describe((1, 2)) == "[1, 2]"
    assert describe(tuple(range(10))) == "[0, 1, ..., 9] (10)"


# -- messages -----------------------------------------------------------------------------------


def test_kv_message_round_trips_through_its_frame() -> None:
    s = SliceSet(7, (1, 2, 3, 7, 8, 5, 5, U32_MAX), 2, 3)
    frame = to_frame(KvSlices.of("t1", "prefill-0@b", s, 0xDEADBEEF), b"x")
    assert frame.kind == "kv"
    assert frame.header["runs"] == [[1, 3], [7, 2], [5, 1], [5, 1], [U32_MAX, 1]]
    msg = parse(_wire(frame), KvSlices)
    assert (msg.turn, msg.src, msg.crc) == ("t1", "prefill-0@b", 0xDEADBEEF)
    assert msg.slices(layer_groups=4, max_slices=99) == s


def test_a_frame_of_another_kind_is_refused() -> None:
    s = SliceSet(7, (1,), 0, 1)
    frame = to_frame(KvSlices.of("t1", "?", s, 0))
    with pytest.raises(BadMessage, match="expected a relay frame, got 'kv'"):
        parse(frame, RelaySlices)
    assert parse(Frame(FrameKind.RELAY, frame.header), RelaySlices).KIND == "relay"


def test_defaults_are_left_out_and_filled_back_in() -> None:
    frame = _wire(to_frame(ReadRequest(traj=1, blocks=(0, 1))))
    assert frame.header == {"traj": 1, "blocks": [0, 1]}
    msg = parse(frame, ReadRequest)
    assert (msg.req, msg.client) == (None, "?")


def test_unknown_fields_are_ignored() -> None:
    msg = parse(Frame("read", {"req": 3, "traj": 1, "blocks": [], "later": [1]}), ReadRequest)
    assert msg == ReadRequest(req=3, traj=1, blocks=())


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ({"traj": 1}, "blocks"),  # missing
        ({"traj": True, "blocks": []}, "traj"),
        ({"traj": 1 << 32, "blocks": []}, "traj"),
        ({"traj": 1, "blocks": [0, -1]}, "blocks[1]"),
        ({"traj": 1, "blocks": "all"}, "blocks"),
        ({"traj": 1, "blocks": [], "req": False}, "req"),
        ({"traj": 1, "blocks": [], "client": ""}, "client"),
        ({"traj": 1, "blocks": [], "client": "x" * 129}, "client"),
    ],
)
def test_bad_fields_are_named(header: dict[str, Any], field: str) -> None:
    with pytest.raises(BadMessage, match=re.escape(f"read frame field '{field}'")):
        parse(Frame("read", header), ReadRequest)


def test_error_frame_round_trips_any_req() -> None:
    frame = error_frame("missing", "block 3", req=b"\x00")
    assert frame.header == {"code": "missing", "message": "block 3", "req": b"\x00"}
    assert parse(_wire(frame), ErrorReply) == ErrorReply(
        code="missing", message="block 3", req=b"\x00"
    )


def test_storage_stats_reply() -> None:
    stats = StorageStats(
        req=4,
        read_queue_blocks=1,
        read_queue_bytes=2,
        bytes_read=3,
        bytes_written=4,
        num_blocks_stored=5,
        num_errors=0,
        read_by={"decode-0@b": 7},
    )
    assert parse(_wire(to_frame(stats)), StorageStats) == stats


def test_write_presents_the_secret_in_its_auth_field() -> None:
    s = SliceSet(1, (0, 1), 0, 4)
    frame = to_frame(WriteRequest.of(9, s, 5, auth="secret"))
    assert frame.header["auth"] == "secret"
    assert parse(frame, WriteRequest).slices(layer_groups=4, max_slices=8) == s


# -- slice sets on the wire ---------------------------------------------------------------------


@given(
    traj=st.integers(0, U32_MAX),
    blocks=st.lists(st.one_of(st.integers(0, 20), st.integers(U32_MAX - 3, U32_MAX)), max_size=30),
    g0=st.integers(0, 3),
)
def test_wire_round_trip(traj: int, blocks: list[int], g0: int) -> None:
    s = SliceSet(traj, tuple(blocks), g0, 4)
    msg = parse(_wire(to_frame(KvSlices.of("t", "?", s, 0))), KvSlices)
    assert msg.slices(layer_groups=4, max_slices=1000) == s


GOOD: dict[str, Any] = {
    "turn": "t",
    "traj": 1,
    "runs": [[0, 2], [10, 1]],
    "g0": 0,
    "g1": 4,
    "crc": 0,
}


def _slices(header: dict[str, Any], *, max_slices: int) -> SliceSet:
    return parse(Frame("kv", header), KvSlices).slices(layer_groups=4, max_slices=max_slices)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"traj": None}, "traj"),
        ({"traj": -1}, "traj"),
        ({"traj": 1 << 32}, "traj"),
        ({"traj": True}, "traj"),
        ({"traj": "1"}, "traj"),
        ({"runs": None}, "runs"),
        ({"runs": "0-2"}, "runs"),
        ({"runs": [[0, 2], [5]]}, "runs[1]"),
        ({"runs": [[0, 2, 3]]}, "runs[0]"),
        ({"runs": [7]}, "runs[0]"),
        ({"runs": [[-1, 2]]}, "runs[0][0]"),
        ({"runs": [[1 << 32, 1]]}, "runs[0][0]"),
        ({"runs": [[0, -1]]}, "runs[0][1]"),
        ({"runs": [[0, 1.5]]}, "runs[0][1]"),
        ({"runs": [[U32_MAX, 2]]}, "runs[0][1]"),  # would run past the last u32 block id
        ({"runs": [[0, 2], [5, 1 << 31]]}, "runs[1][1]"),  # far over max_slices
        ({"runs": [[0, 25]]}, "runs[0][1]"),  # 100 slices, one over
        ({"g0": None}, "g0"),
        ({"g0": 4}, "g0"),
        ({"g1": 5}, "g1"),
        ({"g0": 2, "g1": 2}, "g1"),
        ({"g0": 3, "g1": 1}, "g1"),
        ({"crc": 1 << 32}, "crc"),
        ({"turn": 5}, "turn"),
    ],
)
def test_slice_fields_are_refused_by_name(change: dict[str, Any], field: str) -> None:
    with pytest.raises(BadMessage, match=re.escape(f"field '{field}'")):
        _slices({**GOOD, **change}, max_slices=99)


def test_slice_set_limits() -> None:
    s = _slices({**GOOD, "runs": [[0, 24], [5, 0]]}, max_slices=96)
    assert s.num_slices == 96
    s = _slices({**GOOD, "runs": [[U32_MAX, 1]]}, max_slices=4)
    assert s.blocks == (U32_MAX,)

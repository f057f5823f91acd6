"""The scheduler's typed messages (services/wire/rpc.py): the wire format the engines, the
driver and the fuzz tests speak, and decoding that refuses naming the message and field."""

from __future__ import annotations

from typing import Any

import msgpack
import msgspec
import pytest

from services.assignment import AssignmentError, TurnAssignment
from services.wire.rpc import (
    MAX_CONTEXT_TOKENS,
    AssignedTurn,
    Cancellation,
    EngineLoadReport,
    FetchReply,
    FetchRequest,
    MessageError,
    ReadRanges,
    ReportRequest,
    TurnEvent,
    TurnSubmission,
    Undecodable,
    decode_as,
    encode,
    request_decoder,
)

FETCH: dict[str, Any] = {
    "node_id": "prefill-0",
    "role": "prefill",
    "read_q_tokens": 3,
    "engines": [[0, 1, 740, 1000], [1, 0, 0, -5]],
    "boot": "b1",
    "turns": ["t1"],
    "counters": {"bytes_verified": 7},
}
ASSIGNED = AssignedTurn(
    turn_id="t1",
    traj_id=4,
    turn_index=2,
    context_tokens=6400,
    prompt_tokens=6500,
    gen_tokens=5,
    hit_blocks=100,
    prompt_blocks=102,
    persist_end_block=101,
    prefill_node="prefill-0",
    prefill_engine=0,
    decode_node="decode-0",
    decode_engine=1,
    read_side="decode",
    reads=ReadRanges(prefill=(0, 25), decode=(25, 100)),
)


def test_a_fetch_keeps_its_wire_format() -> None:
    req = decode_as(FETCH, FetchRequest)
    assert req.engines[1] == EngineLoadReport(engine=1, seq=0, tok=0, free_kv_tokens=-5)
    assert msgpack.unpackb(encode(req)) == FETCH
    assert request_decoder(FetchRequest)(msgpack.packb(FETCH)) == req


def test_an_assignment_is_what_the_engines_parse() -> None:
    wire = msgpack.unpackb(encode(FetchReply((ASSIGNED,), (Cancellation("t0", "lost"),))))
    assert wire["cancel"] == [["t0", "lost"]]
    (raw,) = wire["assignments"]
    assert raw["reads"] == {"prefill": [0, 25], "decode": [25, 100]}
    parsed = TurnAssignment.from_wire(raw)
    assert parsed == ASSIGNED.turn_assignment()
    assert parsed.decode_read == (25, 100) and parsed.kv_tokens == 6505


def test_an_assignment_outside_its_hit_blocks_is_refused() -> None:
    bad = msgspec.structs.replace(ASSIGNED, reads=ReadRanges((0, 0), (0, 101)))
    with pytest.raises(AssignmentError, match=r"reads\.decode"):
        bad.turn_assignment()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"read_q_tokens": -1}, "read_q_tokens"),
        ({"engines": [[0, 0, 0]]}, "engines"),
        ({"engines": [[0, 0, 0, 1, 2]]}, "engines"),
        ({"engines": [[0, True, 0, 1]]}, "engines"),
        ({"engines": [[0, 0, 0, 1 << 63]]}, "engines"),
        ({"turns": [b"t1"]}, "turns"),
        ({"counters": {"k": b"\x00"}}, "counters"),
        ({"node_id": 7}, "node_id"),
    ],
)
def test_a_bad_fetch_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(MessageError, match=f"FetchRequest: .*{field}"):
        decode_as({**FETCH, **change}, FetchRequest)
    assert isinstance(
        request_decoder(FetchRequest)(msgpack.packb({**FETCH, **change})), Undecodable
    )


def test_a_report_is_a_list_of_positional_events() -> None:
    wire = {"events": [["t1", "done", 1, {"node": "decode-0"}]]}
    report = decode_as(wire, ReportRequest)
    assert report.events == (TurnEvent("t1", "done", 1.0, {"node": "decode-0"}),)
    for bad in (
        ["t1", "done", 1.0],
        ["t1", "done", 1.0, {"event": "x"}],
        ["t1", "done", 1.0, {"b": b""}],
    ):
        with pytest.raises(MessageError, match="ReportRequest"):
            decode_as({"events": [bad]}, ReportRequest)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"traj_id": 1 << 32}, "traj_id"),
        ({"gen_tokens": 0}, "gen_tokens"),
        ({"append_tokens": True}, "append_tokens"),
        ({"context_tokens": MAX_CONTEXT_TOKENS}, "context_tokens"),
    ],
)
def test_a_bad_turn_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    body = {"traj_id": 1, "turn_index": 0, "context_tokens": 640, "append_tokens": 64}
    with pytest.raises(MessageError, match=field):
        decode_as({**body, "gen_tokens": 8, **change}, TurnSubmission)


def test_bytes_that_are_not_msgpack_are_undecodable() -> None:
    got = request_decoder(ReportRequest)(b"\xc1")
    assert isinstance(got, Undecodable) and "not msgpack" in got.reason

"""Fuzz the scheduler's gRPC service on a live scheduler: Fetch, Report and the Pull stream
with fuzzed messages (well-formed ones with one field off, any msgpack value, bytes that are
not msgpack), with and without the secret.

The scheduler may refuse (INVALID_ARGUMENT, UNAUTHENTICATED, UNIMPLEMENTED) but a handler
that fails with anything else (UNKNOWN: an exception it did not expect; INTERNAL) has crashed,
and after every input a well-formed Fetch must still be answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import msgpack
import pytest
from fuzzlib import BUDGET, EDGES, INPUT_TIMEOUT_S, client_session, msgpack_values, tried
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st

from services.auth import GRPC_AUTH_KEY, bearer, new_secret
from services.spec import ClusterSpec
from services.wire.rpc import SERVICE

SECRET = new_secret()
FETCH = {
    "node_id": "prefill-0",
    "role": "prefill",
    "read_q_tokens": 0,
    "engines": [[0, 0, 0, 1000], [1, 0, 0, 1000]],
    "boot": "b1",
    "turns": [],
    "counters": {"bytes_verified": 0},
}
DECODE_FETCH = {**FETCH, "node_id": "decode-0", "role": "decode"}
REPORT = {"events": [["t1", "prefill_started", 1.0, {"node": "prefill-0"}]]}
REFUSALS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


@st.composite
def _one_field_off(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """`base` with one or two fields (or one element of a list field) at an edge value, any
    value, or dropped."""
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(base)), min_size=1, max_size=2)):
        value = draw(st.sampled_from(EDGES) | msgpack_values)
        how = draw(st.sampled_from(["set", "set", "drop", "inner"]))
        if how == "drop":
            body.pop(name, None)
        elif how == "inner" and isinstance(body.get(name), list) and body[name]:
            inner = list(body[name])
            i = draw(st.integers(min_value=0, max_value=len(inner) - 1))
            if isinstance(inner[i], list) and inner[i]:
                row = list(inner[i])
                row[draw(st.integers(min_value=0, max_value=len(row) - 1))] = value
                inner[i] = row
            else:
                inner[i] = value
            body[name] = inner
        else:
            body[name] = value
    return body


def messages(*bases: dict[str, Any]) -> st.SearchStrategy[bytes]:
    structured = st.one_of(
        st.sampled_from(bases),
        *(_one_field_off(b) for b in bases),
        *(_one_field_off(b) for b in bases),
        msgpack_values,
    )
    return st.one_of(structured.map(_pack), st.binary(max_size=64))


class Scheduler:
    def __init__(self, channel: aio.Channel, http: str) -> None:
        self.channel = channel
        self.http = http


@pytest.fixture
async def scheduler(
    make_spec: Callable[..., ClusterSpec], run_scheduler: Callable[[ClusterSpec], Any]
) -> AsyncIterator[Scheduler]:
    spec = make_spec(secret=SECRET)
    async with run_scheduler(spec):
        channel = aio.insecure_channel(f"{spec.grpc.host}:{spec.grpc.port}")
        try:
            yield Scheduler(channel, f"http://{spec.http.host}:{spec.http.port}")
        finally:
            await channel.close()


def _metadata(with_secret: bool) -> tuple[tuple[str, str], ...]:
    return ((GRPC_AUTH_KEY, bearer(SECRET)),) if with_secret else ()


async def _unary(scheduler: Scheduler, method: str, data: bytes, with_secret: bool) -> Any:
    call = scheduler.channel.unary_unary(f"/{SERVICE}/{method}")  # bytes in, bytes out
    try:
        await call(data, timeout=INPUT_TIMEOUT_S, metadata=_metadata(with_secret))
    except aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            pytest.fail(f"hang: {method} took over {INPUT_TIMEOUT_S} s")
        assert exc.code() in REFUSALS, f"{method}: {exc.code()}: {exc.details()}"
        return exc.code()
    return grpc.StatusCode.OK


async def _alive(scheduler: Scheduler) -> None:
    """A well-formed Fetch of each role is answered, and what fetches store still renders in
    the read-only views (a stored value they cannot serve would be a 500 there)."""
    fetch = scheduler.channel.unary_unary(f"/{SERVICE}/Fetch")
    for req in (FETCH, DECODE_FETCH):
        try:
            data = await fetch(_pack(req), timeout=INPUT_TIMEOUT_S, metadata=_metadata(True))
        except aio.AioRpcError as exc:
            pytest.fail(f"a well-formed Fetch failed after the input: {exc.code()}")
        assert "assignments" in msgpack.unpackb(data)
    timeout = aiohttp.ClientTimeout(total=INPUT_TIMEOUT_S)
    async with client_session(timeout=timeout) as session:
        for path in ("/v1/status", "/v1/cluster", "/metrics"):
            async with session.get(scheduler.http + path) as resp:
                assert resp.status == 200, f"GET {path}: {resp.status} {await resp.text()}"


@pytest.mark.fuzz_target("scheduler.grpc.fetch")
@BUDGET
@given(data=messages(FETCH, DECODE_FETCH), with_secret=st.booleans() | st.just(True))
async def test_fetch(scheduler: Scheduler, data: bytes, with_secret: bool) -> None:
    tried()
    await _unary(scheduler, "Fetch", data, with_secret)
    await _alive(scheduler)


@pytest.mark.fuzz_target("scheduler.grpc.report")
@BUDGET
@given(data=messages(REPORT), with_secret=st.booleans() | st.just(True))
async def test_report(scheduler: Scheduler, data: bytes, with_secret: bool) -> None:
    tried()
    await _unary(scheduler, "Report", data, with_secret)
    await _alive(scheduler)


@pytest.mark.fuzz_target("scheduler.grpc.pull")
@BUDGET
@given(
    stream=st.lists(messages(FETCH, DECODE_FETCH), min_size=1, max_size=3),
    with_secret=st.booleans() | st.just(True),
)
async def test_pull(scheduler: Scheduler, stream: list[bytes], with_secret: bool) -> None:
    tried()
    call = scheduler.channel.stream_stream(f"/{SERVICE}/Pull")(
        timeout=INPUT_TIMEOUT_S, metadata=_metadata(with_secret)
    )
    raced = False
    try:
        for data in stream:  # each reply read before the next write: a crash shows in read()
            try:
                await call.write(data)
            except (aio.AioRpcError, asyncio.InvalidStateError):
                raced = True  # the call ended before this write; the status says why
                break
            await call.read()
        else:
            await call.done_writing()
            await call.read()
    except aio.AioRpcError:
        pass  # the status below says how the server ended the call
    code = await call.code()
    call.cancel()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        pytest.fail(f"hang: Pull took over {INPUT_TIMEOUT_S} s")
    if raced and not with_secret and code == grpc.StatusCode.INTERNAL:
        code = grpc.StatusCode.UNAUTHENTICATED  # the first write raced the refusal: the
        # client then reports its own failed send (INTERNAL) instead of the server's status
    assert code in REFUSALS, f"Pull: {code}: {await call.details()}"
    await _alive(scheduler)


TURN = {"traj_id": 1, "turn_index": 0, "context_tokens": 640, "append_tokens": 64, "gen_tokens": 8}
JSON_INTS = [0, -1, 1, 63, 64, 1 << 31, 1 << 32, 1 << 53, 1 << 63, (1 << 64) - 1, 1 << 64, 10**30]


@st.composite
def turns(draw: st.DrawFn) -> dict[str, Any]:
    """A turn whose fields are well-formed, at the integer edges, or anything JSON."""
    turn = dict(TURN)
    for name in draw(st.lists(st.sampled_from(sorted(TURN)), min_size=1, max_size=2)):
        turn[name] = draw(st.sampled_from(JSON_INTS) | st.integers(min_value=0, max_value=1 << 40))
    return turn


@pytest.mark.fuzz_target("scheduler.turns")
@BUDGET
@given(turn=turns())
async def test_a_submitted_turn_reaches_the_engines(
    scheduler: Scheduler, turn: dict[str, Any]
) -> None:
    """A turn the HTTP API accepts must be one the engines can be handed: while its stream is
    open, the engines' fetches (which run the policy and carry the assignment) must succeed."""
    tried()
    timeout = aiohttp.ClientTimeout(total=INPUT_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {SECRET}"}
    async with (
        client_session(timeout=timeout) as session,
        session.post(scheduler.http + "/v1/turns", json=turn, headers=headers) as resp,
    ):
        assert resp.status in (200, 400), f"{resp.status}: {await resp.text()}"
        if resp.status == 200:
            assert json.loads(await resp.content.readline())["event"] == "queued"
            await _alive(scheduler)  # decode, prefill (schedules the turn), decode again
            await _alive(scheduler)
    await _alive(scheduler)


@st.composite
def live_events(draw: st.DrawFn) -> list[Any]:
    """Report events for turn t<n> (filled in by the test): well-formed, or a field off."""
    event: list[Any] = ["TURN", "prefill_started", 1.0, {"node": "prefill-0"}]
    for i in draw(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=2)):
        event[i] = draw(st.sampled_from(EDGES) | msgpack_values)
    return event


@pytest.mark.fuzz_target("scheduler.report_live")
@BUDGET
@given(events=st.lists(live_events(), min_size=1, max_size=3))
async def test_a_report_for_a_live_turn(scheduler: Scheduler, events: list[list[Any]]) -> None:
    """Events reported for a turn are streamed to its client: whatever a Report carries, the
    client's stream must go on as JSON lines (or end after a terminal event)."""
    tried()
    timeout = aiohttp.ClientTimeout(total=INPUT_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {SECRET}"}
    async with (
        client_session(timeout=timeout) as session,
        session.post(scheduler.http + "/v1/turns", json=TURN, headers=headers) as resp,
    ):
        assert resp.status == 200
        turn_id = json.loads(await resp.content.readline())["turn_id"]
        for event in events:
            event[0] = turn_id
        await _unary(scheduler, "Report", _pack({"events": events}), True)
        mark = [turn_id, "fuzz_mark", 2.0, {}]  # streamed after them, unless the turn ended
        await _unary(scheduler, "Report", _pack({"events": [mark]}), True)
        while True:
            line = await resp.content.readline()
            assert line, "the turn's stream ended without a terminal event"
            ev = json.loads(line)
            if ev["event"] in ("done", "failed", "fuzz_mark"):
                break
    await _alive(scheduler)

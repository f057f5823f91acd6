"""The scheduler's gRPC handlers refuse a malformed request as INVALID_ARGUMENT (never UNKNOWN,
gRPC's answer to a handler that crashed), and a refused request changes nothing: a real
scheduler (`serve_scheduler`) on loopback, called with the lab's secret."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import msgpack
import pytest
from grpc import aio

from services.auth import GRPC_AUTH_KEY, bearer
from services.spec import ClusterSpec
from services.wire.rpc import SERVICE

FETCH = {
    "node_id": "prefill-0",
    "role": "prefill",
    "read_q_tokens": 0,
    "engines": [[0, 0, 0, 1000], [1, 0, 0, 1000]],
    "boot": "b1",
}


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


@pytest.fixture
def spec(make_spec: Callable[..., ClusterSpec]) -> ClusterSpec:
    return make_spec()


@pytest.fixture
def http(spec: ClusterSpec) -> str:
    return f"http://{spec.http.host}:{spec.http.port}"


@pytest.fixture
async def channel(
    spec: ClusterSpec, run_scheduler: Callable[[ClusterSpec], Any]
) -> AsyncIterator[tuple[aio.Channel, Any]]:
    async with run_scheduler(spec):
        ch = aio.insecure_channel(f"{spec.grpc.host}:{spec.grpc.port}")
        try:
            yield ch, ((GRPC_AUTH_KEY, bearer(spec.secret)),)
        finally:
            await ch.close()


async def _call(channel: tuple[aio.Channel, Any], method: str, data: bytes) -> grpc.StatusCode:
    ch, metadata = channel
    try:
        await ch.unary_unary(f"/{SERVICE}/{method}")(data, timeout=10, metadata=metadata)
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", ["Fetch", "Report"])
@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", _pack(7), _pack([FETCH])])
async def test_a_request_that_is_not_a_msgpack_map_is_invalid(
    channel: tuple[aio.Channel, Any], method: str, data: bytes
) -> None:
    assert await _call(channel, method, data) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _call(channel, "Fetch", _pack(FETCH)) == grpc.StatusCode.OK


async def test_a_pull_stream_refuses_a_request_that_is_not_msgpack(
    channel: tuple[aio.Channel, Any],
) -> None:
    ch, metadata = channel
    call = ch.stream_stream(f"/{SERVICE}/Pull")(timeout=10, metadata=metadata)
    await call.write(_pack(FETCH))
    assert "assignments" in msgpack.unpackb(await call.read())
    await call.write(b"\xc1")
    with pytest.raises(aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "change",
    [
        {"read_q_tokens": float("inf")},  # was OverflowError: UNKNOWN
        {"engines": [[0, 0, 0, float("-inf")]]},
        {"engines": [[0, 0, 0]]},
        {"read_q_tokens": -1},
        {"role": "decode"},
        {"node_id": 7},
        {"boot": ["b2"]},
        {"turns": [b"t1"]},
        {"counters": {"bytes_verified": b"\x00"}},  # was stored: /v1/cluster then failed
        {"counters": {b"k": 1, "a": 1}},  # was stored: /metrics then failed to sort its keys
        {"counters": [1]},
    ],
)
async def test_a_malformed_fetch_is_invalid_and_changes_nothing(
    channel: tuple[aio.Channel, Any], http: str, change: dict[str, Any]
) -> None:
    assert await _call(channel, "Fetch", _pack(FETCH)) == grpc.StatusCode.OK
    bad = {**FETCH, "boot": "b2", **change}  # a new boot would fail the node's turns
    assert await _call(channel, "Fetch", _pack(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/status", "/v1/cluster", "/metrics"):
            async with session.get(http + path) as resp:
                assert resp.status == 200, (path, await resp.text())
        async with session.get(http + "/v1/cluster") as resp:
            cluster = await resp.json()
    assert cluster == {"prefill-0": {"role": "prefill", "counters": {}, "boot": "b1"}}


TURN = {"traj_id": 1, "turn_index": 0, "context_tokens": 640, "append_tokens": 64, "gen_tokens": 8}


@pytest.mark.parametrize(
    "change",
    [{"traj_id": 10**30}, {"traj_id": 1 << 32}, {"gen_tokens": 1 << 64}, {"turn_index": 1 << 63}],
)
async def test_a_turn_the_engines_cannot_be_handed_is_refused(
    channel: tuple[aio.Channel, Any], spec: ClusterSpec, http: str, change: dict[str, Any]
) -> None:
    # Was accepted: the prefill fetch that assigned it then failed (msgpack cannot carry the
    # integer; UNKNOWN) and the turn was lost; a traj_id over u32 cannot be stored either.
    headers = {"Authorization": f"Bearer {spec.secret}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{http}/v1/turns", json={**TURN, **change}, headers=headers) as resp,
    ):
        assert resp.status == 400
        assert next(iter(change)) in (await resp.json())["detail"]
    decode = {**FETCH, "node_id": "decode-0", "role": "decode"}
    for req in (decode, FETCH):
        assert await _call(channel, "Fetch", _pack(req)) == grpc.StatusCode.OK


@pytest.mark.parametrize(
    "bad",
    [
        ["TURN", "prefill_started", 1.0, {"node": b"\x00"}],  # was streamed: the client's
        ["TURN", "prefill_started", 1.0, {"turn_id": "t9"}],  # stream then broke off
        ["TURN", "prefill_started", "soon", {}],
        ["TURN", 7, 1.0, {}],
        ["TURN", "prefill_started", 1.0],
    ],
)
async def test_a_malformed_report_is_invalid_and_takes_no_event(
    channel: tuple[aio.Channel, Any], spec: ClusterSpec, http: str, bad: list[Any]
) -> None:
    headers = {"Authorization": f"Bearer {spec.secret}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{http}/v1/turns", json=TURN, headers=headers) as resp,
    ):
        turn_id = json.loads(await resp.content.readline())["turn_id"]
        good = [turn_id, "decode_started", 2.0, {"node": "decode-0"}]
        bad = [turn_id, *bad[1:]]
        report = _pack({"events": [good, bad]})  # the good one first: it is not taken either
        assert await _call(channel, "Report", report) == grpc.StatusCode.INVALID_ARGUMENT
        assert await _call(channel, "Report", _pack({"events": [good]})) == grpc.StatusCode.OK
        streamed = json.loads(await resp.content.readline())
        assert (streamed["event"], streamed["node"]) == ("decode_started", "decode-0")

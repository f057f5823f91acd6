"""The scheduler's gRPC calls and HTTP API refuse whoever does not present the lab's secret.

A real scheduler (`serve_scheduler`) on loopback: a Fetch, Pull or Report without the secret,
or with another lab's, is answered UNAUTHENTICATED and changes nothing (no node is registered,
no event is taken); a turn submitted without it is 401 with a problem body and is not queued;
with the secret each call goes through. The read-only GETs need no secret.
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
from grpc import aio

from services.auth import new_secret
from services.scheduler.client import SchedulerClient
from services.spec import ClusterSpec
from services.wire.rpc import SERVICE, FetchReply, FetchRequest, ReportRequest, TurnEvent, decode_as

FETCH = {
    "node_id": "prefill-0",
    "role": "prefill",
    "read_q_tokens": 0,
    "engines": [[0, 0, 0, 1000], [1, 0, 0, 1000]],
    "boot": "b1",
}
TURN = {"traj_id": 1, "turn_index": 0, "context_tokens": 640, "append_tokens": 64, "gen_tokens": 8}
WRONG = [None, "", "Bearer", "Basic abc", "another"]
"""Authorization values that must not pass ("another": a valid secret of another lab)."""


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


@pytest.fixture
async def scheduler(
    make_spec: Callable[..., ClusterSpec], run_scheduler: Callable[[ClusterSpec], Any]
) -> AsyncIterator[ClusterSpec]:
    spec = make_spec()
    async with run_scheduler(spec):
        yield spec


def _authorization(value: str | None) -> dict[str, str]:
    if value is None:
        return {}
    if value == "another":
        value = f"Bearer {new_secret()}"
    return {"Authorization": value}


async def _status(spec: ClusterSpec) -> dict[str, Any]:
    """GET /v1/status, without a secret: a read-only GET is open."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{spec.http.host}:{spec.http.port}/v1/status") as resp,
    ):
        assert resp.status == 200
        status: dict[str, Any] = await resp.json()
        return status


async def _raw_call(spec: ClusterSpec, method: str, body: Any, auth: str | None) -> grpc.StatusCode:
    """One unary call, with `auth` as its authorization metadata (None: none at all)."""
    metadata = None if auth is None else (("authorization", auth),)
    async with aio.insecure_channel(f"{spec.grpc.host}:{spec.grpc.port}") as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=_pack, response_deserializer=msgpack.unpackb
        )
        try:
            await call(body, metadata=metadata, timeout=10)
        except aio.AioRpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("auth", WRONG)
async def test_grpc_fetch_and_report_without_the_secret_change_nothing(
    scheduler: ClusterSpec, auth: str | None
) -> None:
    spec = scheduler
    value = _authorization(auth).get("Authorization")
    fetch = await _raw_call(spec, "Fetch", FETCH, value)
    report = await _raw_call(spec, "Report", {"events": [["t1", "done", 1.0, {}]]}, value)
    assert (fetch, report) == (grpc.StatusCode.UNAUTHENTICATED,) * 2
    status = await _status(spec)
    assert status["nodes"] == {} and status["done"] == 0 and status["failed"] == 0


async def test_a_pull_stream_without_the_secret_is_refused(scheduler: ClusterSpec) -> None:
    other = SchedulerClient(scheduler.model_copy(update={"secret": new_secret()}))
    try:
        with pytest.raises(aio.AioRpcError) as refused:
            await other.fetch(decode_as(FETCH, FetchRequest))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await other.close()
    assert (await _status(scheduler))["nodes"] == {}


async def test_grpc_calls_with_the_secret_go_through(scheduler: ClusterSpec) -> None:
    spec = scheduler
    client = SchedulerClient(spec)
    try:
        assert await client.fetch(decode_as(FETCH, FetchRequest)) == FetchReply()
        await client.report(ReportRequest((TurnEvent("t-unknown", "done", 1.0, {}),)))
    finally:
        await client.close()
    assert set((await _status(spec))["nodes"]) == {"prefill-0"}
    # the same call in raw form, with the header spelled as a client would
    assert await _raw_call(spec, "Fetch", FETCH, f"bearer {spec.secret}") == grpc.StatusCode.OK


@pytest.mark.parametrize("auth", WRONG)
async def test_a_turn_without_the_secret_is_refused_and_not_queued(
    scheduler: ClusterSpec, auth: str | None
) -> None:
    spec = scheduler
    base = f"http://{spec.http.host}:{spec.http.port}"
    async with aiohttp.ClientSession(headers=_authorization(auth)) as session:
        for method, path in (("POST", "/v1/turns"), ("POST", "/v1/status"), ("PUT", "/v1/x")):
            async with session.request(method, base + path, json=TURN) as resp:
                assert resp.status == 401, (method, path)
                assert resp.content_type == "application/problem+json"
                assert "secret" in json.loads(await resp.text())["detail"]
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    status = await _status(spec)
    assert status["turns"] == 0 and status["queue"] == 0


async def test_a_turn_with_the_secret_is_queued(scheduler: ClusterSpec) -> None:
    spec = scheduler
    headers = {"Authorization": f"Bearer {spec.secret}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(f"http://{spec.http.host}:{spec.http.port}/v1/turns", json=TURN) as resp,
    ):
        assert resp.status == 200
        first = json.loads(await resp.content.readline())
        assert first["event"] == "queued"
        assert (await _status(spec))["turns"] == 1
        # end the turn (no engine will), through an authenticated Report: its stream closes
        client = SchedulerClient(spec)
        try:
            failed = TurnEvent(first["turn_id"], "failed", 1.0, {"reason": "test"})
            await client.report(ReportRequest((failed,)))
        finally:
            await client.close()
        last = json.loads((await resp.content.read()).splitlines()[-1])
        assert last["event"] == "failed"


async def test_the_read_only_gets_need_no_secret(scheduler: ClusterSpec) -> None:
    spec = scheduler
    base = f"http://{spec.http.host}:{spec.http.port}"
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/status", "/v1/cluster", "/metrics", "/v1/health"):
            async with session.get(base + path) as resp:
                assert resp.status == 200, path


async def test_a_client_that_goes_away_cancels_its_turn(scheduler: ClusterSpec) -> None:
    """A turn whose client disconnected (or gave up after its timeout) is failed at once, so
    it is never assigned and its state can be forgotten, instead of running for nobody."""
    base = f"http://{scheduler.http.host}:{scheduler.http.port}"
    auth = {"Authorization": f"Bearer {scheduler.secret}"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{base}/v1/turns", json=TURN, headers=auth)
        first = json.loads(await resp.content.readline())
        assert first["event"] == "queued"  # no engine node has reported: it stays queued
        resp.close()  # the client goes away
        for _ in range(100):
            async with session.get(f"{base}/v1/status") as st:
                status = await st.json()
            if status["failed"]:
                break
            await asyncio.sleep(0.05)
    assert status["failed"] == 1 and status["queue"] == 0

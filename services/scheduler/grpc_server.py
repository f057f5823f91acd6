"""The scheduler's gRPC service for engine-group leaders: Fetch, Pull (Fetch as a stream)
and Report, as generic handlers over msgpack messages (services.wire.rpc; no generated code).

Every call must present the lab's secret (services.auth): the interceptor refuses any other
before its bytes are parsed. A message that does not decode is INVALID_ARGUMENT, never a crash.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from services.auth import GRPC_AUTH_KEY, REFUSAL, presented
from services.limits import GRPC_LIMITS, grpc_server_options
from services.scheduler.state import SchedulerState
from services.wire.rpc import (
    SERVICE,
    FetchReply,
    FetchRequest,
    ReportReply,
    ReportRequest,
    Undecodable,
    encode,
    request_decoder,
)

_REFUSED = (KeyError, ValueError, TypeError)
"""What a handler answers INVALID_ARGUMENT: a stranger node, a message that does not fit."""


def _fetch(state: SchedulerState, req: FetchRequest | Undecodable, now: float) -> FetchReply:
    if isinstance(req, Undecodable):
        raise TypeError(req.reason)
    return state.fetch(req, now)


def scheduler_handler(state: SchedulerState, clock: Callable[[], float]) -> grpc.GenericRpcHandler:
    async def fetch(req: FetchRequest | Undecodable, ctx: aio.ServicerContext) -> FetchReply:
        try:
            return _fetch(state, req, clock())
        except _REFUSED as exc:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad fetch: {exc}")
            raise  # unreachable: abort raises

    async def report(req: ReportRequest | Undecodable, ctx: aio.ServicerContext) -> ReportReply:
        if isinstance(req, Undecodable):
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad report: {req.reason}")
        else:
            state.report(req)
        return ReportReply()

    async def pull(
        requests: AsyncIterator[FetchRequest | Undecodable], ctx: aio.ServicerContext
    ) -> AsyncIterator[FetchReply]:
        """Fetch as a stream: one reply per request, half the CPU of a unary call each (a
        leader pulls every pull interval: 100 times a second per node at 10 emulated ms)."""
        async for req in requests:
            try:
                reply = _fetch(state, req, clock())
            except _REFUSED as exc:
                await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad fetch: {exc}")
                raise  # unreachable: abort raises
            yield reply

    fetches = request_decoder(FetchRequest)
    methods = {
        "Fetch": grpc.unary_unary_rpc_method_handler(
            fetch, request_deserializer=fetches, response_serializer=encode
        ),
        "Pull": grpc.stream_stream_rpc_method_handler(
            pull, request_deserializer=fetches, response_serializer=encode
        ),
        "Report": grpc.unary_unary_rpc_method_handler(
            report, request_deserializer=request_decoder(ReportRequest), response_serializer=encode
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class RequireSecret(aio.ServerInterceptor):  # type: ignore[misc]
    """Every RPC must carry `authorization: Bearer <secret>` in its metadata; any other call
    is answered UNAUTHENTICATED by a handler of the same kind that reads nothing from it."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        given = [v for k, v in details.invocation_metadata or () if k == GRPC_AUTH_KEY]
        if handler is None or (len(given) == 1 and presented(str(given[0]), self._secret)):
            return handler  # None: an unknown method, which gRPC answers UNIMPLEMENTED
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(_request: Any, ctx: aio.ServicerContext) -> None:
        await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def deny_stream(_request: Any, ctx: aio.ServicerContext) -> AsyncIterator[Any]:
        await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        yield None  # unreachable: abort raises; makes this an async generator

    # no deserializer: an unauthenticated request's bytes are never parsed
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


async def start_grpc(state: SchedulerState, clock: Callable[[], float]) -> aio.Server:
    """The gRPC server on the spec's address, started, under GRPC_LIMITS."""
    spec = state.spec
    server = aio.server(
        interceptors=(RequireSecret(spec.secret),),
        options=grpc_server_options(GRPC_LIMITS),
        maximum_concurrent_rpcs=GRPC_LIMITS.max_connections,
    )
    server.add_generic_rpc_handlers((scheduler_handler(state, clock),))
    server.add_insecure_port(f"{spec.grpc.host}:{spec.grpc.port}")
    await server.start()
    return server

"""What an engine-group leader uses to talk to the scheduler: Fetch over one Pull stream,
Report as a unary call, both with the lab's secret and typed messages (services.wire.rpc)."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from services.auth import GRPC_AUTH_KEY, bearer
from services.spec import ClusterSpec
from services.wire.rpc import (
    SERVICE,
    FetchReply,
    FetchRequest,
    ReportReply,
    ReportRequest,
    encode,
    reply_decoder,
)


class SchedulerClient:
    def __init__(self, spec: ClusterSpec) -> None:
        self._channel = aio.insecure_channel(f"{spec.grpc.host}:{spec.grpc.port}")
        self._metadata = ((GRPC_AUTH_KEY, bearer(spec.secret)),)
        self._report = self._channel.unary_unary(
            f"/{SERVICE}/Report",
            request_serializer=encode,
            response_deserializer=reply_decoder(ReportReply),
        )
        self._pull_method = self._channel.stream_stream(
            f"/{SERVICE}/Pull",
            request_serializer=encode,
            response_deserializer=reply_decoder(FetchReply),
        )
        self._pull: Any = None
        self._timeout = spec.request_timeout_s

    async def fetch(self, req: FetchRequest) -> FetchReply:
        """New assignments for the node, and the turns it holds that have failed elsewhere
        (it should drop them). Over one Pull stream, reopened after any error (the next
        fetch then starts a new stream)."""
        if self._pull is None:
            self._pull = self._pull_method(metadata=self._metadata)
        call = self._pull
        try:
            async with asyncio.timeout(self._timeout):
                await call.write(req)
                reply = await call.read()
        except BaseException:
            self._pull = None
            call.cancel()
            raise
        if reply is aio.EOF:
            self._pull = None
            raise ConnectionError("the scheduler ended the pull stream")
        assert isinstance(reply, FetchReply)
        return reply

    async def report(self, req: ReportRequest) -> None:
        await self._report(req, timeout=self._timeout, metadata=self._metadata)

    async def close(self) -> None:
        if self._pull is not None:
            self._pull.cancel()
            self._pull = None
        await self._channel.close()

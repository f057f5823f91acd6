"""aiohttp servers under PortLimits: a connection cap, a deadline for each request's head and
body, bounded bodies and keep-alive. The one place aiohttp sockets are bounded; no policy.

aiohttp bounds header lines and body sizes but has no connection cap and no deadline for a
request that arrives slowly (a sender trickling its head holds the connection forever).
BoundedSite gates connections before aiohttp sees them; `middleware` ends the deadline once
the head is parsed and reads the body under the same deadline, so a handler that streams its
reply for minutes (the scheduler's turns) is not cut off.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from services.limits import PortLimits

HTTP_COUNTERS = ("refused", "timed_out", "oversize")
"""Connections refused over the cap, requests whose head or body did not arrive within the
frame timeout, bodies over max_payload_bytes."""

_GATES: weakref.WeakKeyDictionary[asyncio.BaseTransport, _Gate] = weakref.WeakKeyDictionary()


class _Gate(asyncio.Protocol):
    """Stands in front of one aiohttp protocol: admits or refuses the connection, and holds
    the deadline of a request that has started to arrive but is not parsed yet."""

    def __init__(self, site: BoundedSite, inner: Any) -> None:
        self.site = site
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self.site
        self._transport = cast(asyncio.Transport, transport)
        if site.num_connections >= site.limits.max_connections:
            site.counters["refused"] += 1
            self._transport.abort()
            return
        self._admitted = True
        site.num_connections += 1
        _GATES[transport] = self
        self._inner.connection_made(transport)
        self._arm()  # the first request's head is due within the frame timeout

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if not self._in_request and self._timer is None:
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self._admitted:
            return None
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.site.num_connections -= 1
        self._disarm()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- deadline -----------------------------------------------------------------------------
    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.site.limits.frame_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self.site.counters["timed_out"] += 1
            self._transport.abort()

    def request_started(self) -> None:
        self._in_request = True

    def request_parsed(self) -> None:
        self._disarm()

    def request_done(self) -> None:
        self._in_request = False


class BoundedSite(web.BaseSite):
    """A site whose connections pass a _Gate: at most limits.max_connections at once. Built on
    BaseSite's public contract (register in start, set `_server` for stop to close, as
    aiohttp's own sites do) rather than on TCPSite's private fields."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limits: PortLimits) -> None:
        super().__init__(runner)
        self.runner = runner
        self.host = host
        self.port = port
        self.limits = limits
        self.num_connections = 0
        self.counters: dict[str, int] = dict.fromkeys(HTTP_COUNTERS, 0)

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stats(self) -> dict[str, int]:
        return {"connections": self.num_connections, **self.counters}

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        server = self.runner.server
        if server is None:
            raise RuntimeError("the runner is not set up: call runner.setup() first")
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(self, server()), self.host, self.port, backlog=128, reuse_address=True
        )
        if self._server.sockets:
            self.port = int(self._server.sockets[0].getsockname()[1])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The head is parsed: end its deadline; read the body under one (bounded by the app's
    client_max_size), then run the handler without one."""
    transport = request.transport
    gate = _GATES.get(transport) if transport is not None else None
    if gate is None:  # not behind a BoundedSite (tests on a plain site)
        return await handler(request)
    gate.request_started()
    gate.request_parsed()
    try:
        if request.body_exists:
            site = gate.site
            try:
                async with asyncio.timeout(site.limits.frame_timeout_s):
                    await request.read()
            except TimeoutError:
                site.counters["timed_out"] += 1
                raise web.HTTPRequestTimeout(text="request body too slow\n") from None
            except web.HTTPRequestEntityTooLarge:
                site.counters["oversize"] += 1
                raise
        return await handler(request)
    finally:
        gate.request_done()


def runner_kwargs(limits: PortLimits) -> dict[str, Any]:
    """web.AppRunner arguments for `limits`: keep-alive and the request parser's head bounds."""
    return {
        "keepalive_timeout": limits.idle_timeout_s,
        "max_line_size": min(8190, limits.max_header_bytes),
        "max_field_size": min(8190, limits.max_header_bytes),
        "max_headers": 64,
    }


async def start_site(
    runner: web.AppRunner, host: str, port: int, *, limits: PortLimits
) -> BoundedSite:
    """Listen on host:port behind a gate of `limits` (runner.setup() must have run)."""
    site = BoundedSite(runner, host, port, limits=limits)
    await site.start()
    return site

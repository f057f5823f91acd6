"""The accepting side of the frame transport: a listening FrameServer that enforces its port's
limits (connection cap, idle and frame timeouts, header/payload bounds) and runs one handler
task per connection. A malformed frame gets an error frame back and the connection closed; the
server keeps serving. Connections and framing are services/transport.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

from services.codec import (
    DEFAULT_MAX_HEADER_ITEMS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_HEADER_BYTES,
    Frame,
    FrameError,
    OversizeFrame,
)
from services.limits import PortLimits
from services.sockopts import Dscp, set_dscp
from services.transport import (
    RECV_QUEUE_BYTES,
    RECV_QUEUE_FRAMES,
    ConnectionClosed,
    FrameConnection,
    FrameProtocol,
    FrameTimeout,
)
from services.wire.frames import error_frame

Handler = Callable[[FrameConnection, Frame], Awaitable[None]]
ErrorLog = Callable[[str], None]


SERVER_COUNTERS = ("refused", "idle_closed", "timed_out", "oversize", "malformed")
"""What a FrameServer counts: connections refused over the cap, closed idle, cut off mid-frame
(slow senders), frames over the port's header/payload limit, other malformed frames."""


class FrameServer:
    """A listening frame server; `close()` also ends its live connections (3.11's
    asyncio.Server.close() leaves them running)."""

    def __init__(
        self, limits: PortLimits, handler: Handler, *, on_error: ErrorLog | None = None
    ) -> None:
        self.limits = limits
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._handler = handler
        self._on_error = on_error
        self._conns: set[FrameConnection] = set()
        self._closing = False
        self.counters: dict[str, int] = dict.fromkeys(SERVER_COUNTERS, 0)

    @property
    def num_connections(self) -> int:
        return len(self._conns)

    def stats(self) -> dict[str, int]:
        """The counters and the live connections, for a node's stats."""
        return {"connections": len(self._conns), **self.counters}

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self.server.sockets) if self.server else ()

    # -- accepting ---------------------------------------------------------------------------
    def accept(self, proto: FrameProtocol) -> None:
        """A connection was made: serve it in its own task, or close it at once when the
        server is closing or at its connection cap."""
        limits = self.limits
        conn = FrameConnection(
            proto, io_timeout_s=limits.idle_timeout_s, frame_timeout_s=limits.frame_timeout_s
        )
        if self._closing:
            conn.abort()
            return
        if len(self._conns) >= limits.max_connections:
            self.counters["refused"] += 1  # accepted and closed: the live ones keep their slots
            conn.abort()
            return
        self._track(conn, asyncio.get_running_loop().create_task(self._run(conn)))

    def _track(self, conn: FrameConnection, task: asyncio.Task[None]) -> None:
        self._conns.add(conn)
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            self._conns.discard(conn)
            conn.abort()  # no-op after close(); ends a connection whose task never ran

        task.add_done_callback(done)

    # -- one connection ----------------------------------------------------------------------
    async def _run(self, conn: FrameConnection) -> None:
        """`handler(conn, frame)` per frame, in order, until the connection ends."""
        handler = self._handler
        try:
            while True:
                try:
                    frame = await conn.recv()
                except (ConnectionClosed, TimeoutError, FrameError) as exc:
                    await self._end_on_recv_error(conn, exc)
                    return
                try:
                    await handler(conn, frame)
                except (ConnectionClosed, ConnectionError, TimeoutError):
                    return
                except Exception as exc:
                    await self._answer_failure(conn, frame, exc)
        except asyncio.CancelledError:
            # The server is closing: end the connection now, not after a graceful close.
            conn.abort()
            return
        finally:
            await conn.close()

    async def _end_on_recv_error(self, conn: FrameConnection, exc: Exception) -> None:
        """Count why recv() ended the connection; a malformed frame is answered first."""
        counters = self.counters
        if isinstance(exc, ConnectionClosed):
            return
        if isinstance(exc, FrameTimeout):
            counters["timed_out"] += 1
            self._log(str(exc))
        elif isinstance(exc, TimeoutError):
            counters["idle_closed"] += 1
        elif isinstance(exc, FrameError):
            counters["oversize" if isinstance(exc, OversizeFrame) else "malformed"] += 1
            self._log(f"malformed frame from {conn.peer}: {exc}")
            with contextlib.suppress(Exception):
                await conn.send(error_frame("malformed", str(exc)))

    async def _answer_failure(self, conn: FrameConnection, frame: Frame, exc: Exception) -> None:
        """The handler failed: an error frame carrying the request's `req`; the connection
        stays open."""
        self._log(f"{frame.kind} from {conn.peer} failed: {exc}")
        err = error_frame(type(exc).__name__, str(exc) or repr(exc), req=frame.header.get("req"))
        with contextlib.suppress(Exception):
            await conn.send(err)

    def _log(self, message: str) -> None:
        if self._on_error:
            self._on_error(message)

    # -- closing -----------------------------------------------------------------------------
    async def close(self) -> None:
        self._closing = True
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for conn in list(self._conns):
            conn.abort()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()


def default_limits(*, max_payload_bytes: int, io_timeout_s: float) -> PortLimits:
    """Limits of a server given none: the frame codec's own bounds, 1,024 connections."""
    return PortLimits(
        kind="frames",
        max_connections=1024,
        idle_timeout_s=io_timeout_s,
        frame_timeout_s=io_timeout_s,
        max_header_bytes=MAX_HEADER_BYTES,
        max_payload_bytes=max_payload_bytes,
        max_header_items=DEFAULT_MAX_HEADER_ITEMS,
    )


async def serve(
    host: str,
    port: int,
    handler: Handler,
    *,
    dscp: Dscp = Dscp.BEST_EFFORT,
    limits: PortLimits | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    io_timeout_s: float = 3600.0,
    on_error: ErrorLog | None = None,
    max_queued_frames: int = RECV_QUEUE_FRAMES,
    max_queued_bytes: int = RECV_QUEUE_BYTES,
) -> FrameServer:
    """Serve frames: `handler(conn, frame)` per frame, in order, per connection.

    A malformed frame is answered with an error frame and the connection is closed; an
    exception from the handler is answered with an error frame (carrying the request's `req`)
    and the connection stays open. `limits` bound connections, time and sizes (without it,
    `max_payload_bytes` and `io_timeout_s` with default_limits); a connection over the cap is
    accepted and closed at once. What was refused or cut off is in FrameServer.counters.
    """
    if limits is None:
        limits = default_limits(max_payload_bytes=max_payload_bytes, io_timeout_s=io_timeout_s)
    fs = FrameServer(limits, handler, on_error=on_error)
    port_limits = limits

    def factory() -> FrameProtocol:
        return FrameProtocol(
            max_payload_bytes=port_limits.max_payload_bytes,
            max_queued_frames=max_queued_frames,
            max_queued_bytes=max_queued_bytes,
            dscp=dscp,
            on_made=fs.accept,
            max_header_bytes=port_limits.max_header_bytes,
            max_header_items=port_limits.max_header_items,
        )

    loop = asyncio.get_running_loop()
    fs.server = await loop.create_server(factory, host, port, reuse_address=True)
    mark_listener(fs.server, dscp)
    return fs


def mark_listener(server: asyncio.Server, dscp: Dscp) -> None:
    """Mark the listening sockets too: Linux answers the SYN with the listener's TOS and
    accepted sockets inherit it, so even the handshake travels in the listener's class."""
    for sock in server.sockets:
        with contextlib.suppress(OSError):
            set_dscp(sock, dscp)

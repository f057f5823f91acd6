"""Thin asyncio transport for codec frames: one connection's bytes on the wire, both ways.

Protocol logic lives in the codec and the node modules; this module only moves frames. Reads go
through an asyncio.BufferedProtocol straight into each payload's own buffer (FrameReceiver);
writes hand the payload to the transport as it is. connect() opens the client side; the
accepting side (FrameServer, serve, limits) is services/transport_server.py, the socket options
(DSCP, NODELAY) services/sockopts.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable
from typing import Any, cast

from dualpath.errors import DualPathError
from services.codec import (
    DEFAULT_MAX_HEADER_ITEMS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_HEADER_BYTES,
    Frame,
    FrameError,
    FrameReceiver,
    OversizeFrame,
    Payload,
    encode,
)
from services.sockopts import Dscp, has_native_writelines, kernel_unread, set_dscp, tune_socket
from services.wire.frames import BadMessage, ErrorReply, FrameKind, parse

RECV_QUEUE_FRAMES = 8
RECV_QUEUE_BYTES = 16 << 20
"""Received frames wait in a per-connection queue; above either bound reading pauses until
recv() has taken it down to half of both, so a slow consumer leaves the bytes in the kernel
and TCP slows the sender, instead of this process growing."""

COALESCE_BYTES = 16 << 10
"""Without a zero-copy writelines (3.11's selector transports join the list), a payload up to
this size is sent in one write with its header (one small copy, one packet with TCP_NODELAY);
a larger one is written as a second buffer."""


class ConnectionClosed(DualPathError):
    """The peer closed the connection (cleanly or not) before a whole frame arrived."""


class FrameTimeout(DualPathError, TimeoutError):
    """A frame whose first bytes arrived was not complete within the port's frame timeout:
    the peer sends too slowly (or trickles on purpose)."""


class RemoteError(DualPathError):
    """The peer answered with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class FrameProtocol(asyncio.BufferedProtocol):
    """The event side of one connection: fills FrameReceiver's buffers, queues whole frames,
    applies read back-pressure and tracks write pause/resume. FrameConnection is its API."""

    def __init__(
        self,
        *,
        max_payload_bytes: int,
        max_queued_frames: int,
        max_queued_bytes: int,
        dscp: Dscp | None = None,
        on_made: Callable[[FrameProtocol], None] | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_header_items: int = DEFAULT_MAX_HEADER_ITEMS,
    ) -> None:
        if max_queued_frames < 1 or max_queued_bytes < 1:
            raise ValueError(
                f"queue bounds must be >= 1, got {max_queued_frames} frames, "
                f"{max_queued_bytes} bytes"
            )
        self.rx = FrameReceiver(
            max_payload_bytes=max_payload_bytes,
            max_header_bytes=max_header_bytes,
            max_header_items=max_header_items,
        )
        self.partial_since: float | None = None
        """Loop time at which the unfinished frame began to arrive; None at a frame boundary."""
        self.frames: collections.deque[tuple[Frame, int]] = collections.deque()  # (frame, wire)
        self.queued_bytes = 0  # wire bytes of the queued frames
        self._max_frames = max_queued_frames
        self._max_bytes = max_queued_bytes
        self._dscp = dscp
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.sock: Any = None
        self.peer = "?"
        self.native_writelines = False
        self.read_paused = False
        self.eof = False
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.frame_error: FrameError | None = None
        self.write_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        info = transport.get_extra_info("peername")
        self.peer = f"{info[0]}:{info[1]}" if info else "?"
        self.sock = transport.get_extra_info("socket")
        if self._dscp is not None:
            with contextlib.suppress(OSError):
                set_dscp(self.sock, self._dscp)
        tune_socket(self.sock)
        self.native_writelines = has_native_writelines(self.transport)
        if self._on_made is not None:
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.rx.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self.rx.buffer_updated(nbytes)
        except FrameError as exc:
            frames = exc.frames
            if self.frame_error is None:
                self.frame_error = exc
                self._pause_reading()  # nothing after the garbage is worth reading
        for frame, wire_bytes in zip(frames, self.rx.last_frame_bytes, strict=True):
            self.frames.append((frame, wire_bytes))
            self.queued_bytes += wire_bytes
        started = False
        if self.rx.buffered_bytes == 0:
            self.partial_since = None
        elif frames or self.partial_since is None:
            started = self.partial_since is None
            self.partial_since = self._loop.time()
        if frames or started or self.frame_error is not None:
            self._wake()
        if len(self.frames) > self._max_frames or self.queued_bytes > self._max_bytes:
            self._pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep the write side open: the owner closes (as asyncio streams do)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        self._wake()
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- used by FrameConnection -------------------------------------------------------------
    def pop(self) -> Frame:
        frame, wire_bytes = self.frames.popleft()
        self.queued_bytes -= wire_bytes
        if (
            self.read_paused
            and self.frame_error is None
            and len(self.frames) <= self._max_frames // 2
            and self.queued_bytes <= self._max_bytes // 2
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.read_paused = False
            self.transport.resume_reading()
        return frame

    async def wait_frames(self) -> None:
        if self._waiter is not None:
            raise RuntimeError("recv() called while another recv() is waiting")
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_drained(self) -> None:
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()


class FrameConnection:
    """One TCP connection carrying frames in both directions. Made by connect() and
    transport_server.serve().

    recv() returns frames in arrival order; a timed-out or cancelled recv() loses nothing (the
    frame stays queued). send() is serialised per connection and returns once the frame is
    handed to the transport and the transport's buffer is below its high-water mark.
    """

    def __init__(
        self,
        protocol: FrameProtocol,
        *,
        io_timeout_s: float,
        frame_timeout_s: float | None = None,
    ) -> None:
        """`io_timeout_s`: how long recv() waits for a frame. `frame_timeout_s` (servers): once
        a frame's first bytes arrived, how long recv() waits for the rest of it instead."""
        if protocol.transport is None:
            raise ValueError("FrameConnection needs a connected protocol")
        self._proto = protocol
        self._transport: asyncio.Transport = protocol.transport
        self.io_timeout_s = io_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self._send_lock = asyncio.Lock()
        self._marked: Dscp | None = None

    @property
    def peer(self) -> str:
        return self._proto.peer

    @property
    def max_payload_bytes(self) -> int:
        return self._proto.rx.max_payload_bytes

    def mark(self, dscp: Dscp) -> None:
        """Mark what this connection sends from now on (replies and pure ACKs) with `dscp`:
        a server answers in the class its client asked in, not in its listener's class.
        Marking again with the same class makes no system call."""
        if self._marked is not dscp:
            set_dscp(self._proto.sock, dscp)
            self._marked = dscp

    # -- receiving ---------------------------------------------------------------------------
    async def recv(self) -> Frame:
        """Next frame; raises ConnectionClosed, FrameError or TimeoutError (FrameTimeout when
        a started frame did not complete within frame_timeout_s)."""
        proto = self._proto
        if proto.frames:
            return proto.pop()
        if self.frame_timeout_s is None:
            async with asyncio.timeout(self.io_timeout_s):
                while not proto.frames:
                    self._raise_if_finished()
                    await proto.wait_frames()
            return proto.pop()
        loop = asyncio.get_running_loop()
        idle_deadline = loop.time() + self.io_timeout_s
        while not proto.frames:
            self._raise_if_finished()
            started = proto.partial_since
            deadline = idle_deadline if started is None else started + self.frame_timeout_s
            if loop.time() >= deadline:
                if started is None:
                    raise TimeoutError(f"peer {self.peer} sent nothing for {self.io_timeout_s} s")
                raise FrameTimeout(
                    f"peer {self.peer} took over {self.frame_timeout_s} s for one frame "
                    f"({proto.rx.buffered_bytes} bytes of it so far)"
                )
            # The protocol wakes us when a frame completes or starts: the deadline changes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await proto.wait_frames()
        return proto.pop()

    def _raise_if_finished(self) -> None:
        proto = self._proto
        if proto.frame_error is not None:
            err = proto.frame_error
            kind = OversizeFrame if isinstance(err, OversizeFrame) else FrameError
            raise kind(str(err)) from err
        if proto.lost and proto.lost_exc is not None:
            raise ConnectionClosed(f"peer {self.peer}: {proto.lost_exc}") from proto.lost_exc
        if proto.eof or proto.lost:
            partial = proto.rx.buffered_bytes
            if partial:
                raise ConnectionClosed(
                    f"peer {self.peer} closed mid-frame ({partial} bytes of an unfinished frame)"
                )
            if proto.eof:
                raise ConnectionClosed(f"peer {self.peer} closed the connection")
            raise ConnectionClosed(f"peer {self.peer}: connection closed")

    async def recv_reply(self) -> Frame:
        """Like recv(), but an error frame raises RemoteError."""
        frame = await self.recv()
        if frame.kind == FrameKind.ERROR:
            try:
                err = parse(frame, ErrorReply)
            except BadMessage as exc:
                raise RemoteError("malformed", str(exc)) from None
            raise RemoteError(err.code, err.message)
        return frame

    # -- sending -----------------------------------------------------------------------------
    async def send(self, frame: Frame) -> None:
        """Send `frame`; raises ConnectionClosed, FrameError (unencodable) or TimeoutError
        (the peer did not take the bytes within io_timeout_s: abort the connection)."""
        parts = encode(frame)
        async with self._send_lock:
            if self._transport.is_closing():  # a closing transport drops writes silently
                raise ConnectionClosed(f"peer {self.peer}: connection already closed")
            self._write(parts)
            proto = self._proto
            if proto.write_paused and not proto.lost:
                async with asyncio.timeout(self.io_timeout_s):
                    while proto.write_paused and not proto.lost:
                        await proto.wait_drained()
            if proto.lost:
                exc = proto.lost_exc
                raise ConnectionClosed(f"peer {self.peer}: {exc or 'connection lost'}") from exc

    def _write(self, parts: list[Payload]) -> None:
        t = self._transport
        if len(parts) == 1:
            t.write(parts[0])
        elif self._proto.native_writelines:
            t.writelines(parts)
        else:
            head, payload = parts
            if len(payload) <= COALESCE_BYTES:
                t.write(b"".join(parts))
            else:
                t.write(head)
                # A memoryview: what the kernel does not take at once is then copied once
                # into the transport's buffer, not sliced into a new bytes object first.
                t.write(memoryview(payload))

    # -- state and gauges --------------------------------------------------------------------
    def is_closing(self) -> bool:
        """True once this side closed or aborted, or the connection was lost."""
        return self._transport.is_closing()

    def at_eof(self) -> bool:
        """True when the peer has finished sending (EOF or connection lost) and no whole frame
        is waiting: recv() would raise."""
        proto = self._proto
        return (proto.eof or proto.lost) and not proto.frames

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info ("socket", "peername", "sockname", ...)."""
        return self._transport.get_extra_info(name, default)

    def queued_bytes(self) -> int:
        """Bytes read from the kernel but not yet returned by recv(): queued frames (prefix,
        header and payload) and what has arrived of the next one. Bounded by the queue's byte
        bound plus about two frames (the one that crossed the bound and the one being filled)."""
        return self._proto.queued_bytes + self._proto.rx.buffered_bytes

    def unread_bytes(self) -> int:
        """Received but not consumed: the kernel's receive queue (FIONREAD) + queued_bytes()."""
        kernel = 0 if self._proto.lost else kernel_unread(self._proto.sock)
        return kernel + self.queued_bytes()

    def send_backlog_bytes(self) -> int:
        """Bytes written but still in the transport's buffer (not yet taken by the kernel)."""
        return self._transport.get_write_buffer_size()

    # -- closing -----------------------------------------------------------------------------
    async def close(self, *, timeout_s: float = 2.0) -> None:
        """Close; a peer that stopped reading cannot hold us: abort after `timeout_s`."""
        self._transport.close()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._proto.closed)
        except TimeoutError:
            self._transport.abort()
        except BaseException:  # cancelled: do not leave it half-closed
            self._transport.abort()
            raise

    def abort(self) -> None:
        self._transport.abort()


async def connect(
    host: str,
    port: int,
    *,
    dscp: Dscp = Dscp.BEST_EFFORT,
    local_host: str | None = None,
    timeout_s: float = 10.0,
    io_timeout_s: float = 120.0,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_queued_frames: int = RECV_QUEUE_FRAMES,
    max_queued_bytes: int = RECV_QUEUE_BYTES,
) -> FrameConnection:
    """Open a frame connection, marked with `dscp` (IP_TOS) from the first packet on."""
    loop = asyncio.get_running_loop()
    proto = FrameProtocol(
        max_payload_bytes=max_payload_bytes,
        max_queued_frames=max_queued_frames,
        max_queued_bytes=max_queued_bytes,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        set_dscp(sock, dscp)
        tune_socket(sock)
        if local_host:
            sock.bind((local_host, 0))
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (host, port))
            await loop.create_connection(lambda: proto, sock=sock)
    except BaseException:
        if proto.transport is not None:
            proto.transport.abort()
        sock.close()
        raise
    return FrameConnection(proto, io_timeout_s=io_timeout_s)

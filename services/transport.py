"""Thin asyncio transport for codec frames: pumps bytes, sets DSCP, enforces limits.

Protocol logic lives in the codec and the node modules; this module only moves frames. A
malformed frame gets an error frame back and the connection closed; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from enum import IntEnum

from services.codec import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    PREFIX_SIZE,
    Frame,
    FrameError,
    decode_header,
    encode,
    error_frame,
    parse_prefix,
)

STREAM_LIMIT = 4 << 20


class Dscp(IntEnum):
    """Traffic classes on the cnic (architecture: collective > control > kv)."""

    COLLECTIVE = 46
    CONTROL = 24
    KV = 8
    BEST_EFFORT = 0

    @property
    def tos(self) -> int:
        return int(self) << 2


class ConnectionClosed(Exception):
    """The peer closed the connection (cleanly or not) before a whole frame arrived."""


class RemoteError(Exception):
    """The peer answered with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def set_dscp(sock: socket.socket | None, dscp: Dscp) -> None:
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp.tos)


def _tune(sock: socket.socket | None) -> None:
    if sock is None:
        return
    # Only NODELAY: fixed SO_SNDBUF/SO_RCVBUF would switch off the kernel's autotuning.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FrameConnection:
    """One TCP connection carrying frames in both directions."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        io_timeout_s: float = 120.0,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_payload_bytes = max_payload_bytes
        self.io_timeout_s = io_timeout_s
        self._send_lock = asyncio.Lock()

    @property
    def peer(self) -> str:
        info = self.writer.get_extra_info("peername")
        return f"{info[0]}:{info[1]}" if info else "?"

    def mark(self, dscp: Dscp) -> None:
        """Mark what this connection sends from now on (replies and pure ACKs) with `dscp`:
        a server answers in the class its client asked in, not in its listener's class."""
        set_dscp(self.writer.get_extra_info("socket"), dscp)

    async def recv(self) -> Frame:
        """Next frame; raises ConnectionClosed, FrameError or TimeoutError."""
        try:
            async with asyncio.timeout(self.io_timeout_s):
                prefix = await self.reader.readexactly(PREFIX_SIZE)
                hlen, plen = parse_prefix(prefix, max_payload_bytes=self.max_payload_bytes)
                kind, head = decode_header(await self.reader.readexactly(hlen))
                payload = await self.reader.readexactly(plen) if plen else b""
        except asyncio.IncompleteReadError as exc:
            raise ConnectionClosed(f"peer {self.peer} closed mid-frame") from exc
        except TimeoutError:
            raise
        except OSError as exc:  # ConnectionError, ETIMEDOUT, EHOSTUNREACH, ...
            raise ConnectionClosed(f"peer {self.peer}: {exc}") from exc
        return Frame(kind, head, payload)

    async def recv_reply(self) -> Frame:
        """Like recv(), but an error frame raises RemoteError."""
        frame = await self.recv()
        if frame.kind == "error":
            raise RemoteError(str(frame.header.get("code")), str(frame.header.get("message")))
        return frame

    async def send(self, frame: Frame) -> None:
        async with self._send_lock:
            if self.writer.is_closing():  # writing to a closed transport raises RuntimeError
                raise ConnectionClosed(f"peer {self.peer}: connection already closed")
            self.writer.writelines(encode(frame))
            try:
                async with asyncio.timeout(self.io_timeout_s):
                    await self.writer.drain()
            except TimeoutError:
                raise
            except (OSError, RuntimeError) as exc:  # RuntimeError: closed while draining
                raise ConnectionClosed(f"peer {self.peer}: {exc}") from exc

    async def close(self, *, timeout_s: float = 2.0) -> None:
        """Close; a peer that stopped reading cannot hold us: abort after `timeout_s`."""
        self.writer.close()
        try:
            async with asyncio.timeout(timeout_s):
                await self.writer.wait_closed()
        except TimeoutError:
            self.writer.transport.abort()
        except Exception:
            pass

    def abort(self) -> None:
        self.writer.transport.abort()


async def connect(
    host: str,
    port: int,
    *,
    dscp: Dscp = Dscp.BEST_EFFORT,
    local_host: str | None = None,
    timeout_s: float = 10.0,
    io_timeout_s: float = 120.0,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> FrameConnection:
    """Open a frame connection, marked with `dscp` (IP_TOS) from the first packet on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        set_dscp(sock, dscp)
        _tune(sock)
        if local_host:
            sock.bind((local_host, 0))
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
    except BaseException:
        sock.close()
        raise
    return FrameConnection(
        reader, writer, max_payload_bytes=max_payload_bytes, io_timeout_s=io_timeout_s
    )


Handler = Callable[[FrameConnection, Frame], Awaitable[None]]


class FrameServer:
    """A listening frame server; `close()` also ends its live connections (3.11's
    asyncio.Server.close() leaves them running)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self.server.sockets) if self.server else ()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()


async def serve(
    host: str,
    port: int,
    handler: Handler,
    *,
    dscp: Dscp = Dscp.BEST_EFFORT,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    io_timeout_s: float = 3600.0,
    on_error: Callable[[str], None] | None = None,
) -> FrameServer:
    """Serve frames: `handler(conn, frame)` per frame, in order, per connection.

    A malformed frame is answered with an error frame and the connection is closed; an
    exception from the handler is answered with an error frame (carrying the request's `req`)
    and the connection stays open.
    """
    fs = FrameServer()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            fs.tasks.add(task)
            task.add_done_callback(fs.tasks.discard)
        sock = writer.get_extra_info("socket")
        set_dscp(sock, dscp)
        _tune(sock)
        conn = FrameConnection(
            reader, writer, max_payload_bytes=max_payload_bytes, io_timeout_s=io_timeout_s
        )
        try:
            while True:
                try:
                    frame = await conn.recv()
                except (ConnectionClosed, TimeoutError):
                    return
                except FrameError as exc:
                    if on_error:
                        on_error(f"malformed frame from {conn.peer}: {exc}")
                    with contextlib.suppress(Exception):
                        await conn.send(error_frame("malformed", str(exc)))
                    return
                try:
                    await handler(conn, frame)
                except (ConnectionClosed, ConnectionError, TimeoutError):
                    return
                except Exception as exc:
                    if on_error:
                        on_error(f"{frame.kind} from {conn.peer} failed: {exc}")
                    err = error_frame(
                        type(exc).__name__, str(exc) or repr(exc), req=frame.header.get("req")
                    )
                    with contextlib.suppress(Exception):
                        await conn.send(err)
        except asyncio.CancelledError:
            # The server is closing. Returning (not re-raising) keeps 3.11's stream
            # callback from logging a traceback per connection.
            conn.abort()
            return
        finally:
            await conn.close()

    fs.server = await asyncio.start_server(
        on_client, host, port, limit=STREAM_LIMIT, reuse_address=True
    )
    return fs

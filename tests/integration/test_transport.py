"""Frame transport over real loopback TCP, on uvloop and on the default asyncio loop: payload
integrity, ordering, the server's error frames, timeouts, closes, flow control, DSCP."""

from __future__ import annotations

import asyncio
import random
import socket
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from services.codec import Frame, FrameDecoder, encode_bytes
from services.sockopts import Dscp
from services.transport import ConnectionClosed, FrameConnection, RemoteError, connect
from services.transport_server import FrameServer, serve

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]
HOST = "127.0.0.1"
TEST_TIMEOUT_S = 60.0


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(loop_kind: str) -> Runner[Any]:
    """Run a coroutine to completion on a fresh loop of the parametrised kind."""

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as r:
            return r.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))

    return runner


async def start(
    handler: Callable[[FrameConnection, Frame], Awaitable[None]], **kwargs: Any
) -> tuple[FrameServer, int]:
    server = await serve(HOST, 0, handler, **kwargs)
    return server, int(server.sockets[0].getsockname()[1])


def crc(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


async def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


def test_runs_on_the_loop_it_says(run: Runner[bool], loop_kind: str) -> None:
    async def main() -> bool:
        return isinstance(asyncio.get_running_loop(), uvloop.Loop)

    assert run(main()) == (loop_kind == "uvloop")


def test_large_payloads_arrive_intact(run: Runner[None]) -> None:
    data = random.Random(1).randbytes(32 << 20)

    async def echo(conn: FrameConnection, frame: Frame) -> None:
        await conn.send(Frame("echo", {"crc": crc(frame.payload)}, frame.payload))

    async def main() -> None:
        server, port = await start(echo)
        conn = await connect(HOST, port)
        try:
            for payload in (data, bytearray(data[: 5 << 20]), memoryview(data)[7 : (9 << 20) + 7]):
                await conn.send(Frame("put", {}, payload))
                reply = await conn.recv_reply()
                assert reply.header["crc"] == crc(payload)  # what the server received
                assert isinstance(reply.payload, bytearray | memoryview)
                assert len(reply.payload) == len(payload)
                assert crc(reply.payload) == crc(payload)  # what came back
        finally:
            await conn.close()
            await server.close()

    run(main())


def test_many_small_frames_in_order(run: Runner[None]) -> None:
    num_frames = 3000
    seen: list[int] = []

    async def ack(conn: FrameConnection, frame: Frame) -> None:
        seen.append(int(frame.header["i"]))
        await conn.send(Frame("ack", {"i": frame.header["i"]}, frame.payload))

    async def main() -> None:
        server, port = await start(ack)
        conn = await connect(HOST, port)

        async def read_acks() -> list[tuple[int, bytes]]:
            out = []
            for _ in range(num_frames):
                f = await conn.recv_reply()
                out.append((int(f.header["i"]), bytes(f.payload)))
            return out

        try:
            reader = asyncio.create_task(read_acks())
            for i in range(num_frames):  # pipelined: no waiting for acks
                await conn.send(Frame("req", {"i": i}, bytes([i % 251]) * (i % 97)))
            acks = await reader
        finally:
            await conn.close()
            await server.close()
        assert seen == list(range(num_frames))
        assert acks == [(i, bytes([i % 251]) * (i % 97)) for i in range(num_frames)]

    run(main())


def test_handler_error_is_answered_and_the_connection_stays_open(run: Runner[None]) -> None:
    errors: list[str] = []

    async def handler(conn: FrameConnection, frame: Frame) -> None:
        if frame.kind == "bad":
            raise ValueError("no such block")
        await conn.send(Frame("pong", {"req": frame.header.get("req")}))

    async def main() -> None:
        server, port = await start(handler, on_error=errors.append)
        conn = await connect(HOST, port)
        try:
            await conn.send(Frame("bad", {"req": 7}))
            error = await conn.recv()
            assert error.kind == "error"
            assert error.header == {"code": "ValueError", "message": "no such block", "req": 7}
            await conn.send(Frame("bad", {"req": 8}))
            with pytest.raises(RemoteError, match="ValueError: no such block"):
                await conn.recv_reply()
            await conn.send(Frame("ping", {"req": 9}))
            assert (await conn.recv_reply()).header == {"req": 9}
        finally:
            await conn.close()
            await server.close()
        assert len(errors) == 2
        for message in errors:
            assert message.startswith("bad from 127.0.0.1:")
            assert message.endswith(" failed: no such block")

    run(main())


def test_malformed_frame_is_answered_then_closed(run: Runner[None]) -> None:
    errors: list[str] = []

    async def handler(conn: FrameConnection, frame: Frame) -> None:
        await conn.send(Frame("pong", {}))

    async def main() -> None:
        server, port = await start(handler, on_error=errors.append)
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            # A good frame, then garbage in the same segment: the frame is still handled.
            writer.write(encode_bytes(Frame("ping")) + b"GET / HTTP/1.1\r\n\r\n")
            await writer.drain()
            reply = await reader.read()  # until the server closes
            writer.close()
            await writer.wait_closed()
            frames = FrameDecoder().feed(reply)
            assert [f.kind for f in frames] == ["pong", "error"]
            assert frames[1].header["code"] == "malformed"
            assert "bad magic b'GE'" in frames[1].header["message"]
            # The server still serves.
            conn = await connect(HOST, port)
            await conn.send(Frame("ping"))
            assert (await conn.recv_reply()).kind == "pong"
            await conn.close()
        finally:
            await server.close()
        assert len(errors) == 1
        assert errors[0].startswith("malformed frame from 127.0.0.1:")

    run(main())


def test_recv_times_out_and_loses_nothing(run: Runner[None]) -> None:
    async def slow(conn: FrameConnection, frame: Frame) -> None:
        await asyncio.sleep(0.3)
        await conn.send(Frame("late", {}, b"L" * 100_000))

    async def main() -> None:
        server, port = await start(slow)
        conn = await connect(HOST, port, io_timeout_s=0.05)
        try:
            await conn.send(Frame("slow"))
            with pytest.raises(TimeoutError):
                await conn.recv()
            conn.io_timeout_s = 10.0
            frame = await conn.recv()  # the frame that came after the timeout is whole
            assert (frame.kind, frame.payload) == ("late", b"L" * 100_000)
        finally:
            await conn.close()
            await server.close()

    run(main())


def test_peer_closing_mid_frame_raises_connection_closed(run: Runner[None]) -> None:
    whole = encode_bytes(Frame("blocks", {"req": 1}, b"x" * 100_000))

    async def main() -> None:
        async def half_then_close(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(encode_bytes(Frame("hello")) + whole[: len(whole) // 2])
            await w.drain()
            w.close()

        raw = await asyncio.start_server(half_then_close, HOST, 0)
        port = raw.sockets[0].getsockname()[1]
        conn = await connect(HOST, port)
        try:
            assert (await conn.recv()).kind == "hello"
            with pytest.raises(
                ConnectionClosed, match=rf"peer 127\.0\.0\.1:{port} closed mid-frame"
            ):
                await conn.recv()
            assert conn.at_eof()
            with pytest.raises(ConnectionClosed):  # and again, not a hang
                await conn.recv()
        finally:
            await conn.close()
            raw.close()
            await raw.wait_closed()

    run(main())


def test_clean_close_is_connection_closed_and_at_eof(run: Runner[None]) -> None:
    async def bye(conn: FrameConnection, frame: Frame) -> None:
        await conn.send(Frame("bye"))
        await conn.close()

    async def main() -> None:
        server, port = await start(bye)
        conn = await connect(HOST, port)
        try:
            assert not conn.at_eof()
            assert not conn.is_closing()
            await conn.send(Frame("hi"))
            assert (await conn.recv()).kind == "bye"
            await wait_until(conn.at_eof, "the server's close is seen", 5)
            with pytest.raises(ConnectionClosed, match="closed the connection"):
                await conn.recv()
            conn.abort()
            assert conn.is_closing()
            with pytest.raises(ConnectionClosed, match="already closed"):
                await conn.send(Frame("late"))
        finally:
            await conn.close()
            await server.close()

    run(main())


def test_at_eof_waits_for_queued_frames(run: Runner[None]) -> None:
    async def bye(conn: FrameConnection, frame: Frame) -> None:
        await conn.send(Frame("bye"))
        await conn.close()

    async def main() -> None:
        server, port = await start(bye)
        conn = await connect(HOST, port)
        try:
            await conn.send(Frame("hi"))
            await wait_until(lambda: conn.unread_bytes() > 0, "the reply arrives", 5)
            await asyncio.sleep(0.1)  # and the EOF behind it
            assert not conn.at_eof()  # a whole frame is still waiting
            assert (await conn.recv()).kind == "bye"
            await wait_until(conn.at_eof, "EOF after the last frame", 5)
        finally:
            await conn.close()
            await server.close()

    run(main())


def test_server_close_ends_live_connections(run: Runner[None]) -> None:
    async def handler(conn: FrameConnection, frame: Frame) -> None:
        await conn.send(Frame("pong"))

    async def main() -> None:
        server, port = await start(handler)
        conns = [await connect(HOST, port) for _ in range(3)]
        for c in conns:
            await c.send(Frame("ping"))
            assert (await c.recv()).kind == "pong"
        assert len(server.tasks) == 3
        await server.close()
        assert not server.tasks
        for c in conns:
            with pytest.raises(ConnectionClosed):
                await c.recv()
            await c.close()

    run(main())


def test_slow_consumer_blocks_the_sender_not_the_receivers_memory(run: Runner[None]) -> None:
    frame_bytes = 1 << 20
    max_queued_bytes = 4 << 20
    payload = random.Random(2).randbytes(frame_bytes)
    sender: dict[str, Any] = {"sent": 0, "in_send": False}
    server_conns: list[FrameConnection] = []

    async def stream(conn: FrameConnection, frame: Frame) -> None:
        server_conns.append(conn)
        while True:
            sender["in_send"] = True
            await conn.send(Frame("chunk", {"i": sender["sent"]}, payload))
            sender["in_send"] = False
            sender["sent"] += 1

    async def stalled() -> None:
        """The sender sits in send() and has made no progress for a while."""
        last = -1
        async with asyncio.timeout(30):
            while True:
                await asyncio.sleep(0.5)
                if sender["in_send"] and sender["sent"] == last:
                    return
                last = sender["sent"]

    async def main() -> None:
        server, port = await start(stream)
        conn = await connect(HOST, port, max_queued_frames=4, max_queued_bytes=max_queued_bytes)
        try:
            await conn.send(Frame("start"))
            await stalled()
            # What this process holds for the consumer stays bounded: the queue's bound plus
            # the frame that crossed it and the one being filled.
            assert 0 < conn.queued_bytes() <= max_queued_bytes + 2 * frame_bytes
            # The rest waits in the kernel (receiver side) and in the sender's transport.
            assert conn.unread_bytes() > conn.queued_bytes()
            assert server_conns[0].send_backlog_bytes() > 0
            assert conn.send_backlog_bytes() == 0
            stuck_at = sender["sent"]
            # Draining resumes reading: every frame arrives, whole and in order.
            for i in range(stuck_at + 8):
                frame = await conn.recv()
                assert frame.header["i"] == i
                assert frame.payload == payload
                assert conn.queued_bytes() <= max_queued_bytes + 2 * frame_bytes
            assert sender["sent"] > stuck_at
        finally:
            conn.abort()
            await server.close()

    run(main())


def test_gauges_are_zero_on_an_idle_connection(run: Runner[None]) -> None:
    async def handler(conn: FrameConnection, frame: Frame) -> None:
        await conn.send(Frame("pong", {}, b"p" * 1000))

    async def main() -> None:
        server, port = await start(handler)
        conn = await connect(HOST, port)
        try:
            await conn.send(Frame("ping"))
            await conn.recv()
            assert conn.unread_bytes() == 0
            assert conn.queued_bytes() == 0
            assert conn.send_backlog_bytes() == 0
        finally:
            await conn.close()
            await server.close()
        assert conn.unread_bytes() == 0  # closed: no socket to ask

    run(main())


def test_dscp_marks_and_nodelay(run: Runner[None]) -> None:
    def tos(sock: Any) -> int:
        return int(sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS))

    def nodelay(sock: Any) -> int:
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def report(conn: FrameConnection, frame: Frame) -> None:
        sock = conn.get_extra_info("socket")
        before = tos(sock)
        if frame.kind == "mark":
            conn.mark(Dscp.COLLECTIVE)
        await conn.send(Frame("tos", {"before": before, "after": tos(sock), "nd": nodelay(sock)}))

    async def main() -> None:
        server, port = await start(report, dscp=Dscp.CONTROL)
        assert tos(server.sockets[0]) == Dscp.CONTROL.tos  # the listener, for the SYN-ACK
        conn = await connect(HOST, port, dscp=Dscp.KV)
        try:
            sock = conn.get_extra_info("socket")
            assert tos(sock) == Dscp.KV.tos
            assert nodelay(sock) == 1
            await conn.send(Frame("ask"))
            head = (await conn.recv_reply()).header
            assert head == {"before": Dscp.CONTROL.tos, "after": Dscp.CONTROL.tos, "nd": 1}
            await conn.send(Frame("mark"))
            head = (await conn.recv_reply()).header
            assert (head["before"], head["after"]) == (Dscp.CONTROL.tos, Dscp.COLLECTIVE.tos)
            conn.mark(Dscp.BEST_EFFORT)
            assert tos(sock) == 0
            assert conn.peer == f"{HOST}:{port}"
            assert conn.get_extra_info("peername") == (HOST, port)
        finally:
            await conn.close()
            await server.close()

    run(main())


def test_close_does_not_hang_on_a_peer_that_stopped_reading(run: Runner[None]) -> None:
    async def stuck(conn: FrameConnection, frame: Frame) -> None:
        await asyncio.sleep(3600)  # never reads again

    async def main() -> None:
        server, port = await start(stuck, max_queued_frames=1, max_queued_bytes=1)
        conn = await connect(HOST, port, io_timeout_s=0.5)
        blob = bytes(4 << 20)
        try:
            await conn.send(Frame("go"))
            with pytest.raises(TimeoutError):
                for _ in range(64):
                    await conn.send(Frame("blob", {}, blob))
            assert conn.send_backlog_bytes() > 0
            await conn.close(timeout_s=0.2)  # aborts: the buffer cannot drain
            assert conn.is_closing()
        finally:
            await server.close()

    run(main())

"""An engine node's data plane on its KV port, run in this process behind a real IPC socket
pair: a KV frame whose fields do not parse fails its turn and is counted as an error, without
an error frame from the transport's last resort, and the port keeps serving."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from services.codec import Frame, FrameDecoder, encode_bytes
from services.dataplane import DataPlane
from services.ipc import DpStatus, IpcChannel, Stop
from services.kvblocks import KvGenerator, SliceSet
from services.spec import ClusterSpec
from services.wire.frames import slice_fields

TIMEOUT_S = 30.0  # a guard against hangs, not a timing assertion


@pytest.fixture
async def plane(make_spec: Callable[..., ClusterSpec]) -> AsyncIterator[DataPlane]:
    spec = make_spec()
    ours, theirs = socket.socketpair()
    dp = DataPlane(spec, "prefill-0", await IpcChannel.open(theirs), boot="it")
    channel = await IpcChannel.open(ours)
    task = asyncio.create_task(dp.run())
    async with asyncio.timeout(TIMEOUT_S):
        while not isinstance(await channel.recv(), DpStatus):
            pass
    try:
        yield dp
    finally:
        channel.send(Stop())
        await channel.drain()
        async with asyncio.timeout(TIMEOUT_S):
            await task
        await channel.close()


async def _send(dp: DataPlane, frame: Frame) -> list[Frame]:
    """One frame on a new connection; every frame the data plane answers until it closes."""
    assert dp.me.cnic is not None
    async with asyncio.timeout(TIMEOUT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.me.cnic.port)
        writer.write(encode_bytes(frame))
        writer.write_eof()
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
    return FrameDecoder().feed(reply)


def _kv(dp: DataPlane, carried: Any) -> Frame:
    p = dp.spec.profile
    gen = KvGenerator(slice_bytes=p.layer_group_bytes(0), layer_groups=p.layer_groups)
    s = SliceSet(0, (0, 1), 0, p.layer_groups)
    payload = gen.payload(s)
    head = {**slice_fields(s), "turn": "t1", "src": "decode-0@b", "crc": carried}
    return Frame("kv", head, payload)


@pytest.mark.parametrize("carried", [float("inf"), float("-inf"), 0.5, "7", None, True])
async def test_a_kv_frame_with_a_crc_that_is_not_an_integer_is_corrupt(
    plane: DataPlane, carried: Any
) -> None:
    frame = _kv(plane, carried)
    errors = plane.counters["errors"]
    assert await _send(plane, frame) == []  # no 'OverflowError' frame: the turn failed
    assert plane.counters["errors"] == errors + 1
    assert plane.counters["bytes_verified"] == 0
    # still serving: an unknown frame type is refused by the handler
    (refused,) = await _send(plane, Frame("ping", {"req": 1}))
    assert (refused.kind, refused.header["req"]) == ("error", 1)

"""A short calibration of this host for `scaling: auto` (lab.config.scaling).

Two measures, about two seconds in all, in this process: the CPU cost per GB of moving KV
frames through the lab's own transport on loopback and verifying them (what a data plane does
per byte, less the shaping), and how late a short event-loop sleep wakes up (what a timeline's
steps see). Both run on uvloop, like the nodes. It binds one loopback port and leaves nothing
behind.
"""

from __future__ import annotations

import asyncio
import os
import time

from lab.config.scaling import HostCalibration
from services.codec import Frame
from services.kvblocks import KvGenerator, SliceSet, crc
from services.sockopts import Dscp
from services.transport import FrameConnection, connect
from services.transport_server import serve
from services.wire.frames import KvSlices, parse, to_frame

SLICE_BYTES = 8192
FRAME_SLICES = 128
"""1 MiB frames, as the data planes send."""
TRANSFER_S = 1.0
SLEEPS = 100
SLEEP_S = 0.005


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


async def _transfer(seconds: float) -> float:
    """CPU seconds per GB: generate-once frames sent through the transport, each verified."""
    gen = KvGenerator(SLICE_BYTES, 1)
    ring = []
    for i in range(8):
        s = SliceSet(1, tuple(range(i * FRAME_SLICES, (i + 1) * FRAME_SLICES)), 0, 1)
        payload = gen.payload(s)
        ring.append(to_frame(KvSlices.of("calibrate", "calibrate", s, crc(payload)), payload))
    got = 0
    done = asyncio.Event()

    async def handler(conn: FrameConnection, frame: Frame) -> None:
        nonlocal got
        if frame.kind == "end":
            done.set()
            return
        msg = parse(frame, KvSlices)
        s = msg.slices(layer_groups=1, max_slices=FRAME_SLICES)
        got += gen.verify(s, frame.payload, msg.crc)

    server = await serve("127.0.0.1", 0, handler, dscp=Dscp.KV)
    port = server.sockets[0].getsockname()[1]
    conn = await connect("127.0.0.1", port, dscp=Dscp.KV)
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        i = 0
        while time.monotonic() - t0 < seconds:
            await conn.send(ring[i % len(ring)])
            i += 1
        await conn.send(Frame("end"))
        async with asyncio.timeout(30):
            await done.wait()
        cpu = time.process_time() - cpu0
    finally:
        await conn.close()
        await server.close()
    return cpu / max(got / 1e9, 1e-9)


async def _timer_p99_ms(n: int, interval_s: float) -> float:
    late = []
    loop = asyncio.get_running_loop()
    for _ in range(n):
        t = loop.time()
        await asyncio.sleep(interval_s)
        late.append(max(loop.time() - t - interval_s, 0.0))
    late.sort()
    return late[min(len(late) - 1, int(0.99 * len(late)))] * 1e3


async def _calibrate() -> HostCalibration:
    t0 = time.monotonic()
    await _transfer(0.2)  # warm-up: imports, tables, socket buffers
    cost = await _transfer(TRANSFER_S)
    late = await _timer_p99_ms(SLEEPS, SLEEP_S)
    return HostCalibration(
        cpus=_cpus(),
        cpu_s_per_gb=round(cost, 4),
        timer_late_p99_ms=round(late, 3),
        seconds=round(time.monotonic() - t0, 2),
    )


def calibrate() -> HostCalibration:
    """Measure this host (about two seconds)."""
    import uvloop

    return uvloop.run(_calibrate())

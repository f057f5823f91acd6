"""The data plane's DRAM buffer: a reservation waits for room, but not forever."""

from __future__ import annotations

import asyncio

import pytest

from services.kv_reads import DramBuffer


async def test_a_reservation_that_cannot_get_room_times_out_and_takes_nothing() -> None:
    dram = DramBuffer(100)
    assert await dram.acquire(80, 1.0) == 80
    with pytest.raises(TimeoutError):
        await dram.acquire(30, 0.05)
    assert dram.used == 80
    waiter = asyncio.ensure_future(dram.acquire(30, 5.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    dram.release(80)
    assert await waiter == 30 and dram.used == 30
    dram.release(30)
    await asyncio.sleep(0)
    assert await dram.acquire(1000, 1.0) == 100  # larger than the buffer: it proceeds alone

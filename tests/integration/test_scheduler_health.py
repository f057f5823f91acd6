"""The scheduler serves its emulation health at GET /v1/health; the driver gathers every
process's, and a process of an older build that has none is simply not reported."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from lab.run.driver import gather_health
from services.health import HealthMonitor
from services.scheduler.service import serve_scheduler
from services.spec import ClusterSpec
from services.transport import RemoteError


async def test_health_snapshot_over_http(make_spec: Callable[..., ClusterSpec]) -> None:
    spec = make_spec()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_scheduler(spec, "scheduler", stop))
    base = f"http://{spec.http.host}:{spec.http.port}"
    try:
        async with aiohttp.ClientSession() as session:
            snap = None
            for _ in range(100):  # until the server is up and the loop probe has a sample
                try:
                    async with session.get(f"{base}/v1/health") as resp:
                        assert resp.status == 200
                        snap = await resp.json()
                except aiohttp.ClientConnectionError:
                    snap = None
                if snap is not None and snap["loop_lag"]:
                    break
                await asyncio.sleep(0.05)
        assert snap is not None
        assert (snap["process"], snap["part"]) == ("scheduler", "scheduler")
        assert snap["loop_lag"] and snap["steps"] == []
        assert set(snap) >= {"pid", "started_at", "at", "times", "cpu", "gauges"}
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


class _OldStorageClient:
    """A StorageClient from before `health` existed."""


class _RefusingStorageClient:
    """A StorageClient whose server does not know the request (an older storage server)."""

    async def health(self, node_id: str) -> dict[str, Any]:
        raise RemoteError("unknown", f"{node_id}: no such request")


async def test_the_driver_gathers_every_process_and_tolerates_older_ones(
    make_spec: Callable[..., ClusterSpec],
) -> None:
    spec = make_spec()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_scheduler(spec, "scheduler", stop))
    base = f"http://{spec.http.host}:{spec.http.port}"
    own = HealthMonitor("driver", "driver")
    own.start()
    engines: dict[str, dict[str, Any]] = {
        "prefill-0": {"health": [{"process": "prefill-0", "part": "timeline"}]},
        "decode-0": {},  # an engine build without health
    }
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{base}/v1/status"):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            for storage in (_OldStorageClient(), _RefusingStorageClient()):
                health = await gather_health(spec, engines, storage, session, base, own)
                assert health["prefill-0"] == [{"process": "prefill-0", "part": "timeline"}]
                assert health["decode-0"] == []
                assert health["storage-0"] == health["storage-1"] == []
                assert [s["part"] for s in health["scheduler"]] == ["scheduler"]
                assert [s["process"] for s in health["driver"]] == ["driver"]
    finally:
        await own.stop()
        stop.set()
        await asyncio.wait_for(task, timeout=10)

"""Integration fixtures: a small local-backend cluster spec on free loopback ports, and a
scheduler served on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lab.config.cluster import build_cluster_spec
from lab.config.models import parse_config
from lab.run.backends import free_port_base
from services.scheduler.service import serve_scheduler
from services.spec import ClusterSpec

SMALL_CONFIG: dict[str, Any] = {
    "name": "it",
    "cluster": {"prefill_nodes": 1, "decode_nodes": 1, "storage_servers": 2, "gpus_per_node": 2},
    # 20480 B/token x 0.00025 x 100 = 512 B/token: 64-token blocks of 5 slices of 6554 bytes.
    "scaling": {"bandwidth_scale": 0.00025, "time_dilation": 100},
    "workload": {"num_agents": 4},
}


def local_spec(
    data_dir: Path, config: dict[str, Any] | None = None, **overrides: Any
) -> ClusterSpec:
    """A `local`-backend ClusterSpec whose endpoints are all on free ports."""
    cfg = parse_config(config or SMALL_CONFIG)
    probe = build_cluster_spec(cfg, lab_id="it", backend="local", data_dir=data_dir, base_port=1024)
    ports = [ep.port for n in probe.nodes for ep in (n.mgmt, n.cnic, n.storage) if ep is not None]
    ports += [probe.grpc.port, probe.http.port]
    base = free_port_base(max(ports) - 1024 + 1)  # the probe started at 1024
    spec = build_cluster_spec(cfg, lab_id="it", backend="local", data_dir=data_dir, base_port=base)
    return spec.model_copy(update=overrides) if overrides else spec


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., ClusterSpec]:
    def make(config: dict[str, Any] | None = None, **overrides: Any) -> ClusterSpec:
        return local_spec(tmp_path / "data", config, **overrides)

    return make


@contextlib.asynccontextmanager
async def running_scheduler(spec: ClusterSpec) -> AsyncIterator[None]:
    """`serve_scheduler` on the spec's loopback ports, answering GET /v1/status when entered;
    stopped on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve_scheduler(spec, "scheduler", stop))
    url = f"http://{spec.http.host}:{spec.http.port}/v1/status"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                if task.done():
                    task.result()  # it ended before serving: raise why
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        yield
    finally:
        stop.set()
        await task


@pytest.fixture
def run_scheduler() -> Callable[[ClusterSpec], Any]:
    """running_scheduler, for test modules (the tiers are directories without packages)."""
    return running_scheduler

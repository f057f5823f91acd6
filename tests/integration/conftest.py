"""Integration fixtures: a small local-backend cluster spec on free loopback ports, and a
scheduler served on it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lab.config.cluster import build_cluster_spec
from lab.config.models import parse_config
from lab.run.backends import LocalBackend, RunState, free_port_base
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


def lab_get(spec: ClusterSpec, path: str) -> Any:
    """GET a scheduler path's JSON (the read-only ones need no secret)."""
    with urllib.request.urlopen(f"http://{spec.http.host}:{spec.http.port}{path}", timeout=5) as r:
        return json.loads(r.read())


def wait_ready(spec: ClusterSpec, *, timeout_s: float = 60.0) -> None:
    # Five interpreters start at once: on a loaded two-core machine that alone took over 10 s.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if lab_get(spec, "/v1/status")["ready"]:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"cluster not ready within {timeout_s:.0f} s")


@contextlib.contextmanager
def local_lab(tmp_path: Path, config: dict[str, Any], lab_id: str) -> Iterator[ClusterSpec]:
    """A whole cluster as local processes on free loopback ports, ready; down on exit."""
    cfg = parse_config(config)
    spec = build_cluster_spec(
        cfg,
        lab_id=lab_id,
        backend="local",
        data_dir=tmp_path / f"dualpath-{lab_id}",
        base_port=free_port_base(64),
    )
    spec_path = tmp_path / "spec.json"
    spec.dump(spec_path)
    state = RunState(lab_id, "local", spec_path, None)
    be = LocalBackend(spec, spec_path, tmp_path / "logs", state)
    be.up()
    try:
        wait_ready(spec)
        yield spec
    finally:
        be.down()


@pytest.fixture
def start_local_lab(tmp_path: Path) -> Callable[..., Any]:
    """local_lab, for test modules: `with start_local_lab(config, "id") as spec:`."""
    return lambda config, lab_id: local_lab(tmp_path, config, lab_id)


@pytest.fixture(scope="module")
def start_module_lab(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """local_lab for a module-scoped fixture: the module's tests share one cluster."""
    return lambda config, lab_id: local_lab(tmp_path_factory.mktemp(lab_id), config, lab_id)

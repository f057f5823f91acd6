"""Garbage on every kind of listening port leaves each port serving, in bounded memory.

One subprocess serves a storage server (KV frames + management frames), the scheduler (HTTP
API + gRPC) and a node's /metrics on loopback, with the idle and frame timeouts (and the HTTP
API's connection cap) made small through PortLimits; lab.run.garbage sends random bytes,
oversize length prefixes, a slow sender and 2,000 connections to each port, then a
legitimate request. The server's peak RSS
(VmHWM) must stay far below what unbounded headers and payloads would cost.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.run.garbage import Outcome, Target, attack_all, oversize_messages, peak_rss_bytes, probe
from services.spec import ClusterSpec, Role
from services.storage_client import StorageClient

SERVER_SCRIPT = r"""
import asyncio, json, sys
from services.limits import HTTP_API_LIMITS, MGMT_PORT_LIMITS, METRICS_LIMITS, kv_limits_for
from services.prom import MetricsExporter
from services.scheduler.service import serve_scheduler
from services.spec import ClusterSpec
from services.storage import StorageServer

async def main() -> None:
    spec = ClusterSpec.load(__import__("pathlib").Path(sys.argv[1]))
    storage = spec.storage_nodes[0]
    server = StorageServer(
        spec,
        storage.node_id,
        kv_limits=kv_limits_for(spec).with_(idle_timeout_s=20.0, frame_timeout_s=3.0),
        mgmt_limits=MGMT_PORT_LIMITS.with_(idle_timeout_s=20.0, frame_timeout_s=3.0),
    )
    await server.start()

    async def no_counters():
        return {}

    metrics = MetricsExporter("storage-0", "storage", no_counters)
    await metrics.start(
        "127.0.0.1", 0, limits=METRICS_LIMITS.with_(idle_timeout_s=20.0, frame_timeout_s=3.0)
    )
    stop = asyncio.Event()
    http = HTTP_API_LIMITS.with_(max_connections=256, idle_timeout_s=20.0, frame_timeout_s=3.0)
    sched = asyncio.ensure_future(serve_scheduler(spec, "scheduler", stop, http_limits=http))
    print(json.dumps({"metrics": metrics.site.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop.set()
    await sched
    await metrics.close()
    await server.stop()

asyncio.run(main())
"""

RSS_BOUND_BYTES = 300 << 20
"""Generous: the servers idle at ~60-80 MB; one 64 MiB payload buffer per flooding connection,
or a 1 MiB header of empty arrays unpacked (~64 MB) per connection, would pass it many times."""

NUM_CONNECTIONS = 2000


@pytest.fixture
def spec(make_spec: Callable[..., ClusterSpec]) -> ClusterSpec:
    return make_spec()


@pytest.fixture
def server(spec: ClusterSpec, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Any]]:
    path = tmp_path / "spec.json"
    spec.dump(path)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=repo,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the server process exited before it was ready"
        ports = json.loads(line)
        yield proc, ports
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its pid
            proc.wait()


def targets(spec: ClusterSpec, metrics_port: int) -> list[Target]:
    st = spec.by_role(Role.STORAGE)[0]
    assert st.storage is not None
    return [
        Target(st.node_id, "kv", st.storage.host, st.storage.port, "frames", "read"),
        Target(st.node_id, "mgmt", st.mgmt.host, st.mgmt.port, "frames", "stats"),
        Target("scheduler", "http", spec.http.host, spec.http.port, "http", "/metrics"),
        Target(
            "scheduler", "grpc", spec.grpc.host, spec.grpc.port, "grpc", "dualpath.Scheduler/Fetch"
        ),
        Target(st.node_id, "metrics", "127.0.0.1", metrics_port, "http", "/metrics"),
    ]


async def wait_serving(ts: list[Target]) -> None:
    async with asyncio.timeout(30):
        for t in ts:
            while not await probe(t, timeout_s=2.0):
                await asyncio.sleep(0.2)


def test_every_port_keeps_serving_in_bounded_memory(spec: ClusterSpec, server: Any) -> None:
    proc, ports = server
    ts = targets(spec, int(ports["metrics"]))
    asyncio.run(wait_serving(ts))
    outcomes: list[Outcome] = asyncio.run(
        attack_all(ts, seed=7, flood_connections=NUM_CONNECTIONS, slow_max_s=45.0)
    )
    by_name = {o.name: o for o in outcomes}
    for t in ts:
        o = by_name[t.name]
        assert o.errors == [], (t.name, o.errors)
        assert o.serves_before and o.serves_after, (t.name, o)
        assert o.random_closed == 4, (t.name, "random bytes left a connection open", o)
        assert o.oversize_closed == len(oversize_messages(t)), (t.name, o)
        # Cut off by the frame timeout: 3 s here, 10 s for gRPC's handshake (GRPC_LIMITS);
        # not before it, within generous slack.
        timeout_s = 10.0 if t.name == "grpc" else 3.0
        cut = o.slow_cut_after_s
        assert cut is not None and timeout_s - 0.5 <= cut < timeout_s + 10, (t.name, o)
        assert o.flood_opened >= NUM_CONNECTIONS // 2, (t.name, o)
    # Frame and HTTP ports close what is over their cap at once (gRPC has no such count).
    for name in ("kv", "mgmt", "metrics", "http"):
        assert by_name[name].flood_closed_by_server > 0, by_name[name]
    hwm, _ = peak_rss_bytes(proc.pid)
    assert 0 < hwm < RSS_BOUND_BYTES, f"server peak RSS {hwm / 2**20:.0f} MiB"

    async def counters() -> dict[str, int]:
        client = StorageClient(spec)
        try:
            stats = await client.stats(spec.storage_nodes[0].node_id)
        finally:
            await client.close()
        return dict(stats["transport"])

    transport = asyncio.run(counters())
    for port in ("kv", "mgmt"):
        assert transport[f"{port}_refused"] > 0, transport
        assert transport[f"{port}_timed_out"] >= 1, transport
        assert transport[f"{port}_oversize"] >= 2, transport
        assert transport[f"{port}_malformed"] >= 4, transport


def test_headers_of_empty_arrays_cost_no_memory(spec: ClusterSpec, server: Any) -> None:
    """1 MiB headers of empty arrays (the old header limit; unpacked, ~64 MB each) from 64
    connections at once, four times: refused at the prefix, they cost next to nothing."""
    proc, _ = server
    st = spec.storage_nodes[0]
    assert st.storage is not None
    host, port = st.storage.host, st.storage.port
    n = (1 << 20) - 32
    body = b"\x81\xa1t\xa4read\xa1x\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    message = b"DP\x01\x00" + len(body).to_bytes(4, "big") + (0).to_bytes(4, "big") + body

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(message)  # not drained: the server stops reading after the prefix
        async with asyncio.timeout(20):
            assert await reader.read(65536)  # the error frame
        writer.transport.abort()

    async def main() -> None:
        await wait_serving([Target(st.node_id, "kv", host, port, "frames", "read")])
        for _ in range(4):
            await asyncio.gather(*(one() for _ in range(64)))
        assert await probe(Target(st.node_id, "kv", host, port, "frames", "read"))

    before, _ = peak_rss_bytes(proc.pid)
    asyncio.run(main())
    after, _ = peak_rss_bytes(proc.pid)
    assert after - before < 100 << 20, f"peak RSS grew {(after - before) / 2**20:.0f} MiB"

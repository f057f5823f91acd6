"""The scheduler process: one SchedulerState served over gRPC (leaders) and HTTP (clients),
a timer that reaps lost nodes and prunes finished turns, and the process's health monitor.
Only wiring and lifetime here; what each part does is in its own module."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiohttp import web

from scheduler.plugins import InstalledPolicies
from services import http_bounds
from services.health import HealthMonitor
from services.limits import HTTP_API_LIMITS, PortLimits
from services.scheduler.grpc_server import start_grpc
from services.scheduler.http_server import SchedulerApi
from services.scheduler.openai_api import OpenAiApi
from services.scheduler.state import SchedulerState, policy_for
from services.scheduler.vllm_metrics import VllmMetrics
from services.spec import ClusterSpec


async def _reap_forever(state: SchedulerState, clock: Callable[[], float]) -> None:
    while True:
        await asyncio.sleep(min(1.0, state.spec.node_timeout_s / 4))
        for lost in state.reap(clock()):
            print(f"[scheduler] {lost} lost: its unfinished turns failed", flush=True)
        state.prune(clock())


async def serve_scheduler(
    spec: ClusterSpec,
    node_id: str,
    stop: asyncio.Event,
    *,
    clock: Callable[[], float] = time.time,
    http_limits: PortLimits = HTTP_API_LIMITS,
) -> None:
    """Run the scheduler's gRPC and HTTP servers until `stop` is set; its emulation health
    (services.health) is measured all along and served at GET /v1/health. `http_limits`:
    the HTTP API's (services.limits; tests shrink them)."""
    state = SchedulerState(spec, policy_for(spec, InstalledPolicies()))
    print(f"[{node_id}] policy {state.policy.name}", flush=True)  # a plugin's name shows here
    monitor = HealthMonitor(node_id, "scheduler")
    monitor.start()
    server = await start_grpc(state, clock)
    reaping = asyncio.create_task(_reap_forever(state, clock))
    sites: list[http_bounds.BoundedSite] = []
    vllm = VllmMetrics(state, spec.profile.name)
    state.observers.append(vllm.observe)
    api = SchedulerApi(
        state,
        clock,
        monitor,
        port_stats=lambda: sites[0].stats() if sites else {},
        openai=OpenAiApi(state, clock, spec),
        vllm=vllm,
    )
    # handler_cancellation: a client that disconnects mid-turn ends its handler, which
    # cancels the turn (SchedulerApi.submit_turn), instead of leaving it to run for nobody
    runner = web.AppRunner(
        api.app(secret=spec.secret),
        access_log=None,
        handler_cancellation=True,
        **http_bounds.runner_kwargs(http_limits),
    )
    await runner.setup()
    sites.append(
        await http_bounds.start_site(runner, spec.http.host, spec.http.port, limits=http_limits)
    )
    try:
        await stop.wait()
    finally:
        reaping.cancel()
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await server.stop(grace=0.5)
        await monitor.stop()

"""The scheduler's HTTP API for clients: submit a turn and read its events as an NDJSON
stream (POST /v1/turns), and the read-only status, cluster, health and Prometheus GETs.

Every request but those GETs must present the lab's secret (services.auth) before its body
is read; a malformed body is a problem response (RFC 9457) naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services import http_bounds
from services.auth import bearer_middleware
from services.health import HealthMonitor
from services.limits import HTTP_API_LIMITS
from services.scheduler.openai_api import OpenAiApi
from services.scheduler.state import (
    TERMINAL_EVENTS,
    SchedulerState,
    SubmissionError,
    TurnEventRecord,
)
from services.scheduler.vllm_metrics import VllmMetrics
from services.wire.rpc import MessageError, TurnSubmission, decode_as, json_body

READ_ONLY_ROUTES = frozenset(
    {"/v1/status", "/v1/cluster", "/metrics", "/v1/health", "/v1/models", "/v1/api/summary"}
)
"""GETs that change nothing and may be read without the secret (a Prometheus scraper, curl
from a node); every other method and path requires it (docs/design.md, "Access control")."""


def problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


class SchedulerCollector(Collector):
    """GET /metrics, the lab's own part (a prometheus_client custom collector read at each
    scrape): queue and turn counts, each node's read queue and report counters, and the HTTP
    port's connection counters (`port_stats`)."""

    def __init__(
        self, state: SchedulerState, port_stats: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self.state = state
        self.port_stats = port_stats

    def collect(self) -> Iterator[Metric]:
        state = self.state
        yield GaugeMetricFamily("dualpath_queue_turns", "Turns queued.", value=len(state.queue))
        yield CounterMetricFamily("dualpath_turns_done", "Turns done.", value=state.num_done)
        yield CounterMetricFamily("dualpath_turns_failed", "Turns failed.", value=state.num_failed)
        reports = list(state.reports.values())
        read_q = GaugeMetricFamily(
            "dualpath_read_queue_tokens", "A node's storage read queue, tokens.", labels=["node"]
        )
        for r in reports:
            read_q.add_metric([r.node_id], r.fetch.read_q_tokens)
        yield read_q
        counters = CounterMetricFamily(
            "dualpath_node_counter",
            "An engine node's counters as its last report gave them.",
            labels=["node", "name"],
        )
        for r in reports:
            for key, value in sorted(r.fetch.counters.items()):
                if isinstance(value, int | float):
                    counters.add_metric([r.node_id, key], value)
        yield counters
        if self.port_stats is not None:
            port = GaugeMetricFamily(
                "dualpath_http_port",
                "The HTTP port's open connections and the connections its limits refused or cut.",
                labels=["name"],
            )
            for key, count in self.port_stats().items():
                port.add_metric([key], count)
            yield port


class SchedulerApi:
    """The handlers of the client API over one SchedulerState. `port_stats`: the HTTP port's
    connections and limit counters (http_bounds.BoundedSite.stats), added to /metrics."""

    def __init__(
        self,
        state: SchedulerState,
        clock: Callable[[], float],
        health: HealthMonitor | None = None,
        *,
        port_stats: Callable[[], dict[str, int]] | None = None,
        openai: OpenAiApi | None = None,
        vllm: VllmMetrics | None = None,
    ) -> None:
        self.state = state
        self.clock = clock
        self.health = health
        self.port_stats = port_stats
        self.openai = openai
        """The OpenAI-compatible routes (services/scheduler/openai_api.py), when served."""
        self.vllm = vllm
        """Request metrics under vLLM's names, added to /metrics."""
        self.registry = CollectorRegistry(auto_describe=False)
        """The lab's own metrics (read from the state at each scrape); vLLM's have theirs."""
        self.registry.register(SchedulerCollector(state, port_stats))

    async def submit_turn(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return problem(400, "invalid JSON", "the request body is not a JSON object")
        if not isinstance(body, dict):
            return problem(400, "invalid turn", "the request body must be a JSON object")
        try:
            submission = decode_as(body, TurnSubmission)
        except MessageError as exc:
            return problem(400, "invalid turn", str(exc))
        try:
            turn = self.state.submit(submission, self.clock())
        except SubmissionError as exc:
            return problem(400, "invalid turn", str(exc))
        queue: asyncio.Queue[TurnEventRecord] = asyncio.Queue()
        for ev in turn.events:
            queue.put_nowait(ev)
        turn.listeners.append(queue.put_nowait)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await resp.prepare(request)
            while True:
                ev = await queue.get()
                await resp.write(json.dumps(ev).encode() + b"\n")
                if ev["event"] in TERMINAL_EVENTS:
                    break
        finally:
            turn.listeners.remove(queue.put_nowait)
            if not turn.finished:  # the client went away (or gave up): nobody wants it now
                self.state.cancel(turn.turn_id, "the client closed the request", self.clock())
        await resp.write_eof()
        return resp

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(json_body(self.state.status(self.clock())))

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(json_body(self.state.cluster()))

    async def metrics(self, request: web.Request) -> web.Response:
        text = generate_latest(self.registry).decode()
        if self.vllm is not None:
            text += self.vllm.exposition()
        return web.Response(text=text, content_type="text/plain")

    async def health_report(self, request: web.Request) -> web.Response:
        if self.health is None:
            return problem(404, "no health monitor", "this scheduler measures no emulation health")
        return web.json_response(self.health.snapshot())

    def app(self, *, secret: str) -> web.Application:
        """The aiohttp application: bounded bodies, the secret, the routes."""
        guard = bearer_middleware(secret, open_reads=READ_ONLY_ROUTES)
        app = web.Application(
            client_max_size=HTTP_API_LIMITS.max_payload_bytes,
            middlewares=[http_bounds.middleware, guard],
        )
        app.router.add_post("/v1/turns", self.submit_turn)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/cluster", self.cluster)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/health", self.health_report)
        if self.openai is not None:
            self.openai.add_routes(app)
        return app

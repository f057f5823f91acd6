"""The scheduler's HTTP API for clients: submit a turn and read its events as an NDJSON
stream (POST /v1/turns), and the read-only status, cluster, health and Prometheus GETs.

Every request but those GETs must present the lab's secret (services.auth) before its body
is read; a malformed body is a problem response (RFC 9457) naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp import web

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


def prometheus_text(state: SchedulerState, port_stats: dict[str, int] | None = None) -> str:
    """GET /metrics: queue and turn counts, each node's read queue and counters, and the HTTP
    port's connection counters (`port_stats`)."""
    lines = [
        "# TYPE dualpath_queue_turns gauge",
        f"dualpath_queue_turns {len(state.queue)}",
        "# TYPE dualpath_turns_done_total counter",
        f"dualpath_turns_done_total {state.num_done}",
        "# TYPE dualpath_turns_failed_total counter",
        f"dualpath_turns_failed_total {state.num_failed}",
        "# TYPE dualpath_read_queue_tokens gauge",
    ]
    reports = state.reports.values()
    for r in reports:
        lines.append(f'dualpath_read_queue_tokens{{node="{r.node_id}"}} {r.fetch.read_q_tokens}')
    lines.append("# TYPE dualpath_node_counter counter")
    for r in reports:
        for key, value in sorted(r.fetch.counters.items()):
            if isinstance(value, int | float):
                labels = f'node="{r.node_id}",name="{key}"'
                lines.append(f"dualpath_node_counter{{{labels}}} {value}")
    if port_stats is not None:
        lines.append("# TYPE dualpath_http_port gauge")
        lines += [f'dualpath_http_port{{name="{k}"}} {v}' for k, v in port_stats.items()]
    return "\n".join(lines) + "\n"


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
        stats = self.port_stats() if self.port_stats is not None else None
        text = prometheus_text(self.state, stats)
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

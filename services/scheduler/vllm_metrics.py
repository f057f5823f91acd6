"""The scheduler's request metrics under vLLM's names, so dashboards and benchmark tools made
for vLLM read the lab as they read a vLLM server: TTFT, inter-token latency, end-to-end
latency, prefix-cache queries and hits, prompt and generated tokens, finished requests,
running and waiting requests; each labelled with the served model's name.

They cover every turn the scheduler sees (the driver's and the OpenAI-compatible API's) and
are kept with `prometheus_client` in a registry of their own, exposed beside the lab's own
metrics on GET /metrics. Times are the events' own (`at`, the engine's clock, and the
scheduler's at submission), in seconds.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from services.scheduler.state import SchedulerState, TurnEventRecord, TurnRecord

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
"""vLLM's TTFT buckets; used for the inter-token and end-to-end latencies as well."""


class VllmMetrics:
    """Observes a SchedulerState's events (add `observe` to its observers)."""

    def __init__(self, state: SchedulerState, model_name: str) -> None:
        self.state = state
        disable_created_metrics()  # type: ignore[no-untyped-call]  # vLLM exposes no `_created` series (process-wide setting)
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str) -> Any:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Request latency, end to end.")
        self.queries = Counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels,
            registry=r,
        )
        self.hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels, registry=r
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of assigned requests.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens of finished requests.", labels, registry=r
        )
        self.success = Counter(
            "vllm:request_success",
            "Finished requests.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.running = Gauge(
            "vllm:num_requests_running", "Requests assigned to engines.", labels, registry=r
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests queued at the scheduler.", labels, registry=r
        )
        self.model = model_name
        self._last: dict[str, float] = {}
        """Streamed turns: when their last token so far came."""

    def observe(self, turn: TurnRecord, ev: TurnEventRecord) -> None:
        kind, at, m = ev["event"], float(ev["at"]), self.model
        bt = self.state.block_tokens
        if kind == "assigned":
            prompt = turn.submission.prompt_tokens
            self.queries.labels(m).inc(prompt)
            self.hits.labels(m).inc(min(prompt, int(ev.get("hit_blocks", 0)) * bt))
            self.prompt_tokens.labels(m).inc(prompt)
        elif kind == "first_token":
            self.ttft.labels(m).observe(max(0.0, at - turn.submitted_at))
            self._last[turn.turn_id] = at
        elif kind in ("second_token", "token", "last_token"):
            last = self._last.get(turn.turn_id)
            if last is not None:
                self._itl(turn, kind, at, last)
            self._last[turn.turn_id] = at
        elif kind == "done":
            self._last.pop(turn.turn_id, None)
            gen = turn.submission.gen_tokens
            self.e2e.labels(m).observe(max(0.0, at - turn.submitted_at))
            self.generation_tokens.labels(m).inc(gen)
            self.success.labels(m, "length").inc()
        elif kind == "failed":
            self._last.pop(turn.turn_id, None)

    def _itl(self, turn: TurnRecord, kind: str, at: float, last: float) -> None:
        """One gap per token: a streamed turn reports each; otherwise the gap from the second
        token to the last is spread evenly over the tokens in between."""
        hist = self.itl.labels(self.model)
        gap = max(0.0, at - last)
        if kind == "last_token" and turn.submission.gen_tokens <= 2:
            return  # the second token was the last: its gap is counted
        if kind != "last_token" or turn.submission.stream_tokens:
            hist.observe(gap)
            return
        between = max(1, turn.submission.gen_tokens - 2)
        for _ in range(between):
            hist.observe(gap / between)

    def exposition(self) -> str:
        """The metrics as Prometheus text, gauges read from the state now."""
        busy = sum(1 for t in self.state.turns.values() if t.assignment and not t.finished)
        self.running.labels(self.model).set(busy)
        self.waiting.labels(self.model).set(len(self.state.queue))
        return generate_latest(self.registry).decode()

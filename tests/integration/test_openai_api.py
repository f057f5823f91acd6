"""The scheduler's OpenAI-compatible API, driven by the unmodified `openai` client against a
whole cluster on loopback (local backend): completions and chat, streamed and not, usage with
cached tokens, OpenAI-style errors, /v1/models, and vLLM's metric names on /metrics."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from services.prom import parse_samples, sample_key
from services.spec import ClusterSpec
from services.tokenizer import block_keys

MODEL = "tiny-llm"
BT = 64
CONFIG: dict[str, Any] = {
    "name": "api",
    "model": {"name": MODEL, "max_model_len": 4096, "block_tokens": BT},
    "cluster": {"prefill_nodes": 1, "decode_nodes": 1, "storage_servers": 2, "gpus_per_node": 2},
    "scaling": {"bandwidth_scale": 0.00025, "time_dilation": 2},
}
SYSTEM = (
    "You are a careful assistant for a storage-bound inference cluster. " * 8
)  # 536 bytes: 8 full blocks


@pytest.fixture(scope="module")
def lab(start_module_lab: Callable[..., Any]) -> Iterator[ClusterSpec]:
    # the module's tests share one cluster (bringing one up costs seconds of two cores)
    with start_module_lab(CONFIG, "apitest") as spec:
        yield spec


@pytest.fixture
def client(lab: ClusterSpec) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{lab.http.host}:{lab.http.port}/v1", api_key=lab.secret, max_retries=0
    )


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_a_completion_has_its_tokens_and_a_repeated_prefix_is_cached(
    client: openai.OpenAI,
) -> None:
    prompt = SYSTEM + "Say something about KV caches."
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7)
    n = len(prompt.encode())
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (n, 7)
    assert len(first.choices[0].text) == 7 and first.choices[0].finish_reason == "length"
    # the same prefix again: its full blocks were persisted by the first request
    second = client.completions.create(model=MODEL, prompt=SYSTEM + "And about DRAM.", max_tokens=3)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    shared = len(SYSTEM.encode()) // BT * BT
    assert second.usage.prompt_tokens_details.cached_tokens == shared


def test_a_streamed_chat_sends_each_token_and_usage_and_a_follow_up_hits(
    client: openai.OpenAI,
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Plan the next read."},
    ]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    finish = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len("".join(pieces)) == 12 and len(pieces) >= 3  # tokens came as they were made
    assert finish == "length" and usage is not None and usage.completion_tokens == 12
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[
            *messages,
            {"role": "assistant", "content": "".join(pieces)},
            {"role": "user", "content": "Go on."},
        ],
        max_tokens=2,
    )
    assert follow.usage is not None and follow.usage.prompt_tokens_details is not None
    assert follow.usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens // BT * BT


def test_errors_are_openai_shaped(client: openai.OpenAI, lab: ClusterSpec) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="x" * 4000, max_tokens=200)
    assert too_long.value.code == "context_length_exceeded"
    assert "maximum context length is 4096 tokens" in str(too_long.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert "messages[0].role" in str(bad.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://{lab.http.host}:{lab.http.port}/v1", api_key="wrong", max_retries=0
        ).completions.create(model=MODEL, prompt="hi", max_tokens=1)


def test_metrics_carry_vllm_names_and_the_summary_counts_the_requests(
    client: openai.OpenAI, lab: ClusterSpec
) -> None:
    client.completions.create(model=MODEL, prompt=SYSTEM, max_tokens=4)
    url = f"http://{lab.http.host}:{lab.http.port}"
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    label = f'model_name="{MODEL}"'
    lines = {line.split("{", 1)[0]: line for line in text.splitlines() if line.startswith("vllm:")}
    for name in (
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:request_success_total",
        "vllm:num_requests_waiting",
    ):
        assert label in lines.get(name, ""), name
    hits = float(lines["vllm:prefix_cache_hits_total"].rsplit(" ", 1)[1])
    # the lab's own families beside vLLM's: one exposition, one parse
    samples = parse_samples(text)
    assert samples["dualpath_turns_done_total"] >= 1
    assert samples[sample_key("dualpath_http_port", {"name": "connections"})] >= 1
    assert samples[sample_key("vllm:prefix_cache_hits_total", {"model_name": MODEL})] == hits
    assert hits >= len(block_keys(SYSTEM.encode(), BT)) * BT
    with urllib.request.urlopen(f"{url}/v1/api/summary", timeout=5) as r:
        summary = json.loads(r.read())
    assert summary["requests"] >= 1 and summary["ttft_s"]["p50"] > 0
    assert summary["itl_s"]["p50"] > 0 and summary["model"] == MODEL

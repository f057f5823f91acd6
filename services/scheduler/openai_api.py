"""The scheduler's OpenAI-compatible front door: POST /v1/completions and /v1/chat/completions
(streamed as server-sent events or not), GET /v1/models, and GET /v1/api/summary, the lab's own
record of the requests it served (docs/design.md, "The OpenAI-compatible API").

A request becomes one turn of the emulated cluster: its prompt is tokenized (services/tokenizer:
a token per UTF-8 byte; a chat by a fixed template) and keyed per full block, so equal prefixes
hit the same stored blocks wherever they were persisted; `max_tokens` tokens are generated.
The text of a completion is filler (the model has no weights), one byte per token; a streamed
request gets each token when its decode step ends. `usage` counts prompt, completion and
cached tokens (the prompt's hit blocks). Errors are OpenAI-shaped: `{"error": {message, type,
param, code}}`; an unknown model is 404 `model_not_found`, a request over the model's length
is 400 `context_length_exceeded`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from services.scheduler.state import TERMINAL_EVENTS, SchedulerState, TurnEventRecord
from services.spec import ClusterSpec
from services.tokenizer import (
    PromptError,
    block_keys,
    chat_prompt,
    completion_prompt,
    encode,
    generated_text,
)
from services.wire.rpc import U32_MAX, TurnSubmission

DEFAULT_MAX_TOKENS = 16
"""Tokens generated when a request does not say (the completions API's default)."""
API_TRAJ_BASE = 1 << 31
"""Trajectory ids of API requests start here, apart from the driver's (agents, traces)."""
MAX_LOGGED = 100_000
"""Finished API requests kept for GET /v1/api/summary (oldest dropped)."""


def error(
    status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _bad(message: str, param: str | None = None) -> web.Response:
    return error(400, message, "invalid_request_error", param=param)


@dataclass
class ServedRequest:
    """One API request as the scheduler saw it: when it came, when its first and last token
    reached the scheduler, how many tokens it had."""

    submitted: float
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean())}


class _Request:
    """What a handler needs of a parsed request."""

    def __init__(self, tokens: bytes, max_tokens: int, stream: bool, usage: bool) -> None:
        self.tokens, self.max_tokens, self.stream, self.usage = tokens, max_tokens, stream, usage


class OpenAiApi:
    def __init__(
        self, state: SchedulerState, clock: Callable[[], float], spec: ClusterSpec
    ) -> None:
        self.state = state
        self.clock = clock
        self.model = spec.profile.name
        self.max_len = spec.profile.max_model_len
        self.block_tokens = spec.profile.block_tokens
        self.created = int(time.time())
        self._next_traj = API_TRAJ_BASE
        self.served: deque[ServedRequest] = deque(maxlen=MAX_LOGGED)

    # -- routes ------------------------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/api/summary", self.summary)

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "dualpath-mesh",
            "max_model_len": self.max_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def summary(self, request: web.Request) -> web.Response:
        """The lab's own view of the API requests it served: TTFT, inter-token latency (per
        request: (last token - first token) / (tokens - 1)) and end to end, in seconds."""
        done = [r for r in self.served if r.first_token is not None and r.last_token is not None]
        ttft = [r.first_token - r.submitted for r in done if r.first_token is not None]
        itl = [
            (r.last_token - r.first_token) / (r.completion_tokens - 1)
            for r in done
            if r.completion_tokens > 1 and r.last_token is not None and r.first_token is not None
        ]
        e2e = [r.last_token - r.submitted for r in done if r.last_token is not None]
        body = {
            "model": self.model,
            "requests": len(done),
            "prompt_tokens": sum(r.prompt_tokens for r in done),
            "completion_tokens": sum(r.completion_tokens for r in done),
            "cached_tokens": sum(r.cached_tokens for r in done),
            "ttft_s": _percentiles(ttft),
            "itl_s": _percentiles(itl),
            "e2e_s": _percentiles(e2e),
        }
        return web.json_response(body)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    # -- one request -------------------------------------------------------------------------
    async def _parse(self, request: web.Request, chat: bool) -> _Request | web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _bad("the request body is not JSON")
        if not isinstance(body, dict):
            return _bad("the request body must be a JSON object")
        model = body.get("model")
        if model != self.model:
            return error(
                404,
                f"The model `{model}` does not exist. This server serves `{self.model}`.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        try:
            tokens = (
                encode(chat_prompt(body.get("messages")))
                if chat
                else completion_prompt(body.get("prompt"))
            )
        except PromptError as exc:
            return _bad(str(exc), str(exc).split(":", 1)[0].split("[", 1)[0])
        if not tokens:
            return _bad("the prompt is empty", "messages" if chat else "prompt")
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = body.get(key, DEFAULT_MAX_TOKENS)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return _bad(f"{key} must be an integer >= 1", key)
        if body.get("n", 1) != 1:
            return _bad("only n = 1 is supported", "n")
        if len(tokens) + max_tokens > self.max_len:
            return error(
                400,
                f"This model's maximum context length is {self.max_len} tokens. However, you "
                f"requested {len(tokens) + max_tokens} tokens ({len(tokens)} in the prompt, "
                f"{max_tokens} for the completion).",
                "invalid_request_error",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        stream = body.get("stream", False)
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            return _bad("stream must be true or false, stream_options an object", "stream")
        return _Request(tokens, max_tokens, stream, bool(options.get("include_usage", False)))

    def _submit(self, req: _Request) -> tuple[str, asyncio.Queue[TurnEventRecord], ServedRequest]:
        traj = self._next_traj
        self._next_traj = API_TRAJ_BASE + (self._next_traj + 1 - API_TRAJ_BASE) % (
            U32_MAX - API_TRAJ_BASE
        )
        sub = TurnSubmission(
            traj_id=traj,
            turn_index=0,
            context_tokens=0,
            append_tokens=len(req.tokens),
            gen_tokens=req.max_tokens,
            block_keys=block_keys(req.tokens, self.block_tokens),
            stream_tokens=req.stream,
        )
        now = self.clock()
        turn = self.state.submit(sub, now)
        queue: asyncio.Queue[TurnEventRecord] = asyncio.Queue()
        for ev in turn.events:
            queue.put_nowait(ev)
        turn.listeners.append(queue.put_nowait)
        return turn.turn_id, queue, ServedRequest(now, prompt_tokens=len(req.tokens))

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        parsed = await self._parse(request, chat)
        if isinstance(parsed, web.Response):
            return parsed
        turn_id, queue, record = self._submit(parsed)
        shape = _Shape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{turn_id}", self.model)
        resp: web.StreamResponse | None = None
        sent = 0
        try:
            while True:
                ev = await queue.get()
                kind = ev["event"]
                if kind == "assigned":
                    record.cached_tokens = min(
                        len(parsed.tokens), int(ev.get("hit_blocks", 0)) * self.block_tokens
                    )
                if kind == "failed":
                    return await self._failed(resp, shape, ev)
                have = _tokens_after(kind, ev, parsed.max_tokens)
                if have > sent:
                    now = self.clock()
                    if record.first_token is None:
                        record.first_token = now
                    record.last_token = now
                    if parsed.stream:
                        if resp is None:
                            resp = await _open_stream(request)
                        await _send(resp, shape.chunk(generated_text(sent, have - sent), sent == 0))
                    sent = have
                if kind in TERMINAL_EVENTS:
                    break
        finally:
            turn = self.state.turns.get(turn_id)
            if turn is not None:
                if queue.put_nowait in turn.listeners:
                    turn.listeners.remove(queue.put_nowait)
                if not turn.finished:  # the client went away: nobody wants it now
                    self.state.cancel(turn_id, "the client closed the request", self.clock())
        record.completion_tokens = sent
        self.served.append(record)
        usage = {
            "prompt_tokens": len(parsed.tokens),
            "completion_tokens": sent,
            "total_tokens": len(parsed.tokens) + sent,
            "prompt_tokens_details": {"cached_tokens": record.cached_tokens},
        }
        if not parsed.stream:
            return web.json_response(shape.whole(generated_text(0, sent), usage))
        if resp is None:
            resp = await _open_stream(request)
        await _send(resp, shape.finish())
        if parsed.usage:
            await _send(resp, shape.usage(usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _failed(
        self, resp: web.StreamResponse | None, shape: _Shape, ev: TurnEventRecord
    ) -> web.StreamResponse:
        retryable = bool(ev.get("retryable"))
        message = f"the request failed at {ev.get('node')}: {ev.get('reason')}"
        body = {"message": message, "type": "server_error", "param": None, "code": "turn_failed"}
        if resp is None:
            return web.json_response({"error": body}, status=503 if retryable else 500)
        await _send(resp, {"error": body})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _tokens_after(kind: str, ev: TurnEventRecord, max_tokens: int) -> int:
    """How many tokens the turn has generated once event `kind` happened (0: none said)."""
    if kind == "first_token":
        return 1
    if kind == "second_token":
        return min(2, max_tokens)
    if kind == "token":
        n = ev.get("n")
        return min(n, max_tokens) if isinstance(n, int) else 0
    if kind in ("last_token", "done"):
        return max_tokens
    return 0


async def _open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    return resp


async def _send(resp: web.StreamResponse, body: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")


class _Shape:
    """The JSON of a completion or chat completion: chunks, the last one, the whole."""

    def __init__(self, chat: bool, rid: str, model: str) -> None:
        self.chat, self.id, self.model = chat, rid, model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text} if first else {"content": text}
            )
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def finish(self) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

    def whole(self, text: str, usage: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

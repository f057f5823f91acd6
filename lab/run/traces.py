"""Public request traces: reading them whole and checked, and what `dualpath trace stats` says
of them.

Formats (`FORMATS`):
- `mooncake`: the Mooncake FAST'25 trace release (also what NVIDIA's AIPerf replays as
  `mooncake_trace`): one JSON object per line, `timestamp` (ms since the trace's start),
  `input_length` and `output_length` (tokens), `hash_ids` (one id per 512-token block of the
  prompt; equal ids are equal block content, so shared prefixes show as shared ids).
- `bailian`: Alibaba's Qwen-Bailian usage traces (AIPerf's `bailian_trace`): `chat_id`,
  `parent_chat_id` (-1 for a session's first request, the default), `timestamp` (s),
  `input_length`, `output_length`, `type`, `turn` (default 1) and `hash_ids` (16-token blocks;
  a request without them counts in the lengths, not in the hit rate). A session is a chain of
  requests linked by `parent_chat_id` from its root; a parent the file does not hold makes its
  child a root (a sampled trace).

A file is read whole before anything uses it: a malformed line raises TraceFileError naming
the file, the line and the field, and nothing of the file is kept.

The offline prefix-hit rate is the share of all prompt blocks that prefix caching with an
unbounded cache would serve: requests in arrival order, each hits the longest prefix of its
`hash_ids` seen before (the first unseen block ends its hit, as in vLLM's and Mooncake's
prefix caches), then every block of its prompt is in the cache. Pure.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualpath.errors import UsageError
from lab.results.stats import percentiles

MAX_TRACE_LINES = 1_000_000
"""More requests than any public trace has; a bigger file is refused, not half-read."""
MAX_LINE_BYTES = 1 << 20


class TraceFileError(UsageError):
    """A trace that cannot be read as its format: names the file, the line and the field."""

    def __init__(self, path: Path, line: int | None, field: str | None, message: str) -> None:
        where = str(path) if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace, in its own units."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_ids: tuple[int, ...] | None
    """Content ids of the prompt's blocks, in order (the trace's block size); None when the
    trace does not give them for this request."""
    chat_id: int | None = None
    parent_id: int | None = None
    """The request before it in its session (None: the first, or a format without sessions)."""
    line: int = 0
    """Its line in the file (1-based), for errors about it found after reading."""


@dataclass(frozen=True, slots=True)
class Trace:
    """A whole trace: its requests in arrival order and its block size in tokens."""

    path: Path
    format: str
    block_tokens: int
    requests: tuple[TraceRequest, ...]


def _int(obj: Mapping[str, Any], key: str, low: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(key, f"{value!r} is not an integer")
    if value < low:
        raise ValueError(key, f"{value} is below {low}")
    return value


def _mooncake(obj: Mapping[str, Any]) -> TraceRequest:
    stamp = obj.get("timestamp")
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or stamp < 0:
        raise ValueError("timestamp", f"{stamp!r} is not a time in ms >= 0")
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise ValueError("hash_ids", "must be a list of integer block ids")
    inp = _int(obj, "input_length", 1)
    out = _int(obj, "output_length", 0)
    if len(ids) != -(-inp // MOONCAKE_BLOCK_TOKENS):
        raise ValueError(
            "hash_ids",
            f"{len(ids)} block ids for {inp} prompt tokens (one per "
            f"{MOONCAKE_BLOCK_TOKENS}-token block: {-(-inp // MOONCAKE_BLOCK_TOKENS)})",
        )
    return TraceRequest(float(stamp) / 1000.0, inp, out, tuple(ids))


def _block_ids(obj: Mapping[str, Any]) -> tuple[int, ...] | None:
    ids = obj.get("hash_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise ValueError("hash_ids", "must be a list of integer block ids")
    return tuple(ids)


def _bailian(obj: Mapping[str, Any]) -> TraceRequest:
    stamp = obj.get("timestamp")
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or stamp < 0:
        raise ValueError("timestamp", f"{stamp!r} is not a time in s >= 0")
    chat = _int(obj, "chat_id", 0)
    parent = obj.get("parent_chat_id", -1)
    if isinstance(parent, bool) or not isinstance(parent, int) or parent < -1:
        raise ValueError("parent_chat_id", f"{parent!r} is not a chat id or -1")
    if parent == chat:
        raise ValueError("parent_chat_id", f"{parent} is the request's own chat_id")
    return TraceRequest(
        float(stamp),
        _int(obj, "input_length", 1),
        _int(obj, "output_length", 0),
        _block_ids(obj),
        chat_id=chat,
        parent_id=None if parent == -1 else parent,
    )


MOONCAKE_BLOCK_TOKENS = 512
BAILIAN_BLOCK_TOKENS = 16


@dataclass(frozen=True, slots=True)
class TraceFormat:
    """How one format's lines become requests, and its block size."""

    parse: Callable[[Mapping[str, Any]], TraceRequest]
    block_tokens: int


FORMATS: Mapping[str, TraceFormat] = {
    "mooncake": TraceFormat(_mooncake, MOONCAKE_BLOCK_TOKENS),
    "bailian": TraceFormat(_bailian, BAILIAN_BLOCK_TOKENS),
}


def load_trace(path: Path, fmt: str = "mooncake") -> Trace:
    """The whole trace at `path`, checked; TraceFileError for the first bad line."""
    form = FORMATS.get(fmt)
    if form is None:
        raise TraceFileError(
            path, None, None, f"unknown format {fmt!r}; known: {', '.join(FORMATS)}"
        )
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise TraceFileError(path, None, None, exc.strerror or str(exc)) from None
    requests: list[TraceRequest] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if number > MAX_TRACE_LINES:
            raise TraceFileError(path, number, None, f"more than {MAX_TRACE_LINES} lines")
        if len(raw) > MAX_LINE_BYTES:
            raise TraceFileError(path, number, None, f"a line over {MAX_LINE_BYTES} bytes")
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TraceFileError(path, number, None, f"not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise TraceFileError(path, number, None, "not a JSON object")
        try:
            requests.append(dataclasses.replace(form.parse(obj), line=number))
        except ValueError as exc:
            field, message = exc.args if len(exc.args) == 2 else (None, str(exc))
            raise TraceFileError(path, number, field, message) from None
    if not requests:
        raise TraceFileError(path, None, None, "no requests")
    ordered = sorted(requests, key=lambda r: r.arrival_s)  # stable: file order breaks ties
    chats: set[int] = set()
    for r in ordered:
        if r.chat_id is not None:
            if r.chat_id in chats:
                raise TraceFileError(path, None, "chat_id", f"{r.chat_id} appears twice")
            chats.add(r.chat_id)
    return Trace(path, fmt, form.block_tokens, tuple(ordered))


def sessions(requests: Sequence[TraceRequest]) -> int | None:
    """How many sessions the requests form (chains of `parent_id` from a root); None for a
    format without sessions. A parent the trace does not hold makes its child a root."""
    chats = {r.chat_id: r.parent_id for r in requests if r.chat_id is not None}
    if not chats:
        return None
    return sum(1 for parent in chats.values() if parent is None or parent not in chats)


def prefix_hits(requests: Sequence[TraceRequest]) -> list[int]:
    """Per request (in the order given), the blocks its prompt's longest cached prefix holds."""
    seen: set[int] = set()
    hits: list[int] = []
    for r in requests:
        if r.block_ids is None:
            hits.append(0)
            continue
        n = 0
        for block in r.block_ids:
            if block not in seen:
                break
            n += 1
        hits.append(n)
        seen.update(r.block_ids)
    return hits


def trace_stats(trace: Trace) -> dict[str, Any]:
    """What `dualpath trace stats` reports (its `--json` keys)."""
    reqs = trace.requests
    first, last = reqs[0].arrival_s, reqs[-1].arrival_s
    duration = last - first
    blocks = sum(len(r.block_ids) for r in reqs if r.block_ids is not None)
    per_request = prefix_hits(reqs)
    hits = sum(per_request)
    shares = [h / len(r.block_ids) for h, r in zip(per_request, reqs, strict=True) if r.block_ids]
    return {
        "file": str(trace.path),
        "format": trace.format,
        "block_tokens": trace.block_tokens,
        "requests": len(reqs),
        "sessions": sessions(reqs),
        "duration_s": round(duration, 3),
        "arrival_rate_per_s": round((len(reqs) - 1) / duration, 3) if duration > 0 else None,
        "input_tokens": percentiles([float(r.input_tokens) for r in reqs]),
        "output_tokens": percentiles([float(r.output_tokens) for r in reqs]),
        "prompt_blocks": blocks,
        "prefix_hit_blocks": hits,
        "requests_without_blocks": sum(1 for r in reqs if r.block_ids is None),
        "prefix_hit_rate": round(hits / blocks, 4) if blocks else None,
        # the mean over requests of each one's hit share (AIPerf's analyze-trace figure)
        "prefix_hit_rate_per_request": round(sum(shares) / len(shares), 4) if shares else None,
    }


def stats_lines(stats: Mapping[str, Any]) -> list[str]:
    """`trace stats` for a terminal."""
    rate = stats["arrival_rate_per_s"]

    def dist(key: str) -> str:
        p = stats[key]
        return f"p50 {p['p50']:g}  p90 {p['p90']:g}  p99 {p['p99']:g}  max {p['max']:g}"

    return [
        f"{stats['file']} ({stats['format']}, {stats['block_tokens']}-token blocks)",
        f"  requests        {stats['requests']}"
        + (f" in {stats['sessions']} sessions" if stats["sessions"] else ""),
        f"  duration        {stats['duration_s']:g} s"
        + (f", {rate:g} requests/s" if rate is not None else ""),
        f"  input tokens    {dist('input_tokens')}",
        f"  output tokens   {dist('output_tokens')}",
        f"  prefix hit rate {100 * stats['prefix_hit_rate']:.2f} % of {stats['prompt_blocks']} "
        f"prompt blocks, {100 * stats['prefix_hit_rate_per_request']:.2f} % per request on"
        " average (arrival order, unbounded cache)"
        if stats["prefix_hit_rate"] is not None
        else "  prefix hit rate unknown: no request gives its block ids",
    ]

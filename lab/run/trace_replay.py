"""A request trace as a replay plan: content-addressed prompts in the model's blocks, and who
sends what when (docs/design.md, "Replaying a trace").

- Keys. A trace names its prompt blocks in its own block size (Mooncake 512 tokens, Bailian
  16); the model's may differ. Model block j covers tokens [j b, (j+1) b); its key hashes the
  trace ids of the trace blocks those tokens fall in, where in them it starts, and the key of
  block j-1, so a key names its whole prefix (as vLLM's and LMCache's block hashes do) and
  two prompts share the key of block j exactly when they share the trace ids up to it. Only
  full model blocks have keys: a prompt's partial last block is recomputed, never persisted.
  Keys are 63 bits of BLAKE2b, the same on every machine.
- Who sends what. A format without sessions (`mooncake`) is open-loop: every request is sent
  at its timestamp (offset from the first) x tau / speedup. A format with sessions (`bailian`)
  is closed-loop along them: a session starts at its root's timestamp, and each request after
  the previous one of its session has finished.

Pure but `load_configured`: the trace is read and checked by lab.run.traces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualpath.errors import UsageError
from lab.config.models import LabConfig
from lab.run.traces import Trace, TraceFileError, TraceRequest, load_trace, trace_stats
from lab.run.workload import AgentPlan, ReplayPlan, TurnPlan

KEY_BITS = 63
"""Keys fit msgpack's and msgspec's signed 64-bit integers."""
_ROOT = b"dualpath-block-key-v1"


class TraceReplayError(UsageError):
    """A trace that cannot be replayed as configured (a request longer than max_len, ...)."""


@dataclass(frozen=True, slots=True)
class TraceReplayOptions:
    model_block_tokens: int
    time_dilation: float
    speedup: float = 1.0
    max_requests: int | None = None
    max_len: int = 131_072
    """Longest request (prompt + output tokens) the model serves; a longer one is refused."""
    trace_block_tokens: int | None = None
    """The trace's block size when it is not its format's."""
    gen_token_scale: float = 1.0
    max_gen_tokens: int | None = None


def block_keys(
    ids: Sequence[int] | None,
    input_tokens: int,
    *,
    trace_block_tokens: int,
    model_block_tokens: int,
    salt: int,
) -> tuple[int, ...]:
    """One key per full model block of a prompt. Trace blocks the trace does not name (no
    ids, or fewer than the prompt spans) get keys from `salt` (the request's own id): nobody
    else can share them, as with a prompt whose content is unknown."""
    b, t = model_block_tokens, trace_block_tokens
    known = len(ids) if ids is not None else 0
    keys: list[int] = []
    prev = _ROOT
    for j in range(input_tokens // b):
        first, last = (j * b) // t, ((j + 1) * b - 1) // t
        h = hashlib.blake2b(prev, digest_size=8)
        if ids is not None and last < known:
            # ids of any size (a trace's ids are not bounded): their decimal text
            h.update(f"{','.join(map(str, ids[first : last + 1]))}@{j * b - first * t}".encode())
        else:
            h.update(f"own:{salt}:{j}".encode())
        prev = h.digest()
        keys.append(int.from_bytes(prev, "big") >> (64 - KEY_BITS))
    return tuple(keys)


def _gen(r: TraceRequest, opts: TraceReplayOptions) -> int:
    gen = max(1, round(r.output_tokens * opts.gen_token_scale))
    return gen if opts.max_gen_tokens is None else min(gen, opts.max_gen_tokens)


def replayed(trace: Trace, max_requests: int | None) -> tuple[TraceRequest, ...]:
    """The requests a replay sends: the first `max_requests` in arrival order (all: None)."""
    return trace.requests if max_requests is None else trace.requests[:max_requests]


def plan_trace(trace: Trace, opts: TraceReplayOptions) -> ReplayPlan:
    """The replay plan of a trace: an agent per request (open loop) or per session (closed
    loop). TraceReplayError, naming the line, for a request longer than max_len."""
    if opts.speedup <= 0 or opts.model_block_tokens < 1:
        raise TraceReplayError("speedup must be > 0 and block_tokens >= 1")
    reqs = replayed(trace, opts.max_requests)
    for r in reqs:
        if r.input_tokens + r.output_tokens > opts.max_len:
            raise TraceFileError(
                trace.path,
                r.line,
                "input_length",
                f"{r.input_tokens} + {r.output_tokens} output tokens exceed max_len {opts.max_len}",
            )
    trace_bt = opts.trace_block_tokens or trace.block_tokens
    t0 = reqs[0].arrival_s
    scale = opts.time_dilation / opts.speedup

    def turn(i: int, r: TraceRequest, index: int) -> TurnPlan:
        keys = block_keys(
            r.block_ids,
            r.input_tokens,
            trace_block_tokens=trace_bt,
            model_block_tokens=opts.model_block_tokens,
            salt=i,
        )
        return TurnPlan(i, index, 0, r.input_tokens, _gen(r, opts), keys)

    agents: list[AgentPlan] = []
    if all(r.chat_id is None for r in reqs):
        for i, r in enumerate(reqs):
            agents.append(AgentPlan(i, 0, (turn(i, r, 0),), (r.arrival_s - t0) * scale))
        return ReplayPlan(tuple(agents))
    # sessions: each request's trajectory id is its index; the agent is named by its root's
    index = {r.chat_id: i for i, r in enumerate(reqs)}
    root: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for i, r in enumerate(reqs):  # arrival order: a parent comes before its children
        parent = index.get(r.parent_id) if r.parent_id is not None else None
        top = root[parent] if parent is not None and parent < i else i
        root[i] = top
        members.setdefault(top, []).append(i)
    for top, ids in members.items():
        turns = tuple(turn(i, reqs[i], n) for n, i in enumerate(ids))
        agents.append(AgentPlan(top, 0, turns, (reqs[top].arrival_s - t0) * scale))
    return ReplayPlan(tuple(agents))


def options_of(cfg: LabConfig, model_block_tokens: int) -> TraceReplayOptions:
    """The replay options a config's `workload.trace` gives (it must have one)."""
    w = cfg.workload
    t = w.trace
    assert t is not None
    return TraceReplayOptions(
        model_block_tokens=model_block_tokens,
        time_dilation=cfg.scaling.time_dilation,
        speedup=t.speedup,
        max_requests=t.max_requests,
        max_len=t.max_len if t.max_len is not None else cfg.model.max_model_len,
        trace_block_tokens=t.block_tokens,
        gen_token_scale=w.gen_token_scale,
        max_gen_tokens=w.max_gen_tokens_per_turn,
    )


def load_configured(cfg: LabConfig) -> Trace:
    """The trace a config names, read whole and checked."""
    t = cfg.workload.trace
    assert t is not None
    return load_trace(Path(t.file), t.format)


def offline_model_hit_rate(plan: ReplayPlan, model_block_tokens: int) -> float | None:
    """The offline prefix-hit rate of a planned replay in the model's blocks: requests in
    arrival order, each hitting the longest prefix of its keys seen before, over all blocks
    its prompt spans (the figure the replay's own rate is comparable with)."""
    turns = sorted(
        (t for a in plan.agents for t in a.turns), key=lambda t: t.traj_id
    )  # trajectory ids are arrival indices
    seen: set[int] = set()
    hit = total = 0
    for t in turns:
        n = 0
        for key in t.block_keys:
            if key not in seen:
                break
            n += 1
        hit += n
        total += -(-t.append_tokens // model_block_tokens)
        seen.update(t.block_keys)
    return round(hit / total, 4) if total else None


def trace_summary(
    trace: Trace,
    opts: TraceReplayOptions,
    plan: ReplayPlan,
    turns: Sequence[Mapping[str, Any]],
    *,
    storage_read_bytes: int,
    block_bytes: int,
) -> dict[str, Any]:
    """summary.json `trace`: the offline prefix-hit rate of the replayed requests (in the
    trace's blocks, as `dualpath trace stats` gives it, and in the model's) beside what the
    replay got: `prefix_hit_rate` is the blocks the storage servers actually served over the
    prompt blocks of the requests that finished; `assigned_hit_rate` what the scheduler found
    persisted for them (equal unless reads were retried or failed). The `_per_request` figures
    are means over requests of each one's hit share, as AIPerf's analyze-trace reports it."""
    reqs = replayed(trace, opts.max_requests)
    offline = trace_stats(Trace(trace.path, trace.format, trace.block_tokens, reqs))
    ok = [t for t in turns if t.get("error") is None and t.get("done_at") is not None]
    prompt_blocks = sum(int(t.get("prompt_blocks") or 0) for t in ok)
    hit_blocks = sum(int(t.get("hit_blocks") or 0) for t in ok)
    shares = [
        int(t.get("hit_blocks") or 0) / int(t["prompt_blocks"])
        for t in ok
        if t.get("prompt_blocks")
    ]
    served = storage_read_bytes // block_bytes if block_bytes > 0 else 0
    return {
        "file": str(trace.path),
        "format": trace.format,
        "requests": len(trace.requests),
        "requests_replayed": len(reqs),
        "requests_done": len(ok),
        "speedup": opts.speedup,
        "trace_block_tokens": opts.trace_block_tokens or trace.block_tokens,
        "model_block_tokens": opts.model_block_tokens,
        "offline_prefix_hit_rate": offline["prefix_hit_rate"],
        "offline_model_prefix_hit_rate": offline_model_hit_rate(plan, opts.model_block_tokens),
        "prompt_blocks": prompt_blocks,
        "blocks_served_by_storage": served,
        "prefix_hit_rate": round(served / prompt_blocks, 4) if prompt_blocks else None,
        "assigned_hit_blocks": hit_blocks,
        "assigned_hit_rate": round(hit_blocks / prompt_blocks, 4) if prompt_blocks else None,
        "offline_prefix_hit_rate_per_request": offline["prefix_hit_rate_per_request"],
        "prefix_hit_rate_per_request": round(sum(shares) / len(shares), 4) if shares else None,
    }

"""Bench: CPU cost of the DualPath scheduler per request at the paper's largest scale.

48P96D (1,152 engines in 144 groups of 8), a seeded 10,000-turn queue shaped like the 64K
workload (DualPath Table 2) and DeepSeek-V3.2-like alpha/beta (§6). Times PE selection, DE
selection and the whole policy (read side by difference) on one pinned core; target <= 50 us
per request. Pure CPU, no root. Writes results/bench/sched_cost.json.

    .venv/bin/python bench/sched_cost.py [--turns 10000] [--seed 1] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scheduler.costmodel import CostModel, CostModelParams  # noqa: E402
from scheduler.de_selection import select_decode  # noqa: E402
from scheduler.dualpath_policy import (  # noqa: E402
    DualPathPolicy,
    LeastTokensBaseline,
    RoundRobinPolicy,
)
from scheduler.pe_selection import alpha_tokens_for, beta_tokens_for, select_prefill  # noqa: E402
from scheduler.policies import SchedulingPolicy  # noqa: E402
from scheduler.views import (  # noqa: E402
    EngineView,
    NodeView,
    PendingTurn,
    ReadSide,
    SchedulePlan,
)

TARGET_US = 50.0
BLOCK_TOKENS = 64
KV_BYTES_PER_TOKEN = 40_000  # DS-V3.2 660B, derived (docs: dualpath.md, section 1)
SNIC_BYTES_PER_S = 400e9 / 8
DE_KV_CAPACITY_TOKENS = 1_000_000  # ~40 GB of KV per decode GPU
DS660B = CostModelParams(  # examples/ds660b-2p4d.yaml
    prefill_base_ms=10,
    prefill_us_per_token=30,
    attention_ns_per_token_pair=1.0,
    decode_base_ms=15,
    decode_us_per_seq=30,
    decode_ns_per_context_token=8,
)


@dataclass(frozen=True)
class Cluster:
    prefill: tuple[NodeView, ...]
    decode: tuple[NodeView, ...]


def make_cluster(
    rng: random.Random, *, prefill_nodes: int, decode_nodes: int, gpus: int, alpha: int, beta: int
) -> Cluster:
    """Loaded, not empty: PEs up to beta/2, DEs up to 60 % of KV memory, read queues spanning
    alpha on both sides (so C2 and C3 are both populated and the read side matters)."""
    prefill = tuple(
        NodeView(
            f"prefill-{i}",
            rng.randint(0, 2 * alpha),
            tuple(
                EngineView(f"prefill-{i}", e, t // 33_000, t)
                for e, t in ((e, rng.randint(0, beta // 2)) for e in range(gpus))
            ),
        )
        for i in range(prefill_nodes)
    )
    decode = []
    for i in range(decode_nodes):
        engines = []
        for e in range(gpus):
            tok = rng.randint(0, int(0.6 * DE_KV_CAPACITY_TOKENS))
            engines.append(
                EngineView(f"decode-{i}", e, tok // 33_000, tok, DE_KV_CAPACITY_TOKENS - tok)
            )
        decode.append(NodeView(f"decode-{i}", rng.randint(0, 2 * alpha), tuple(engines)))
    return Cluster(prefill, tuple(decode))


def make_queue(rng: random.Random, num_turns: int) -> list[PendingTurn]:
    """64K workload shape (Table 2): context ~33K on average, append ~429, gen ~176."""
    out = []
    for i in range(num_turns):
        context = rng.randint(1024, 64_512)
        append = 1 + int(rng.expovariate(1 / 429))
        gen = 1 + int(rng.expovariate(1 / 176))
        hit = context // BLOCK_TOKENS * BLOCK_TOKENS
        out.append(PendingTurn(f"turn-{i}", i % 4096, context + append, hit, gen))
    return out


def apply_plan(plan: SchedulePlan, queue: list[PendingTurn], c: Cluster) -> Cluster:
    """What the next fetch would see: the plan's loads added to the views (not timed)."""
    by_id = {t.turn_id: t for t in queue}
    tok: dict[tuple[str, int], int] = {}
    seq: dict[tuple[str, int], int] = {}
    free: dict[tuple[str, int], int] = {}
    read_q: dict[str, int] = {}
    for a in plan.assignments:
        t = by_id[a.turn_id]
        pk, dk = (a.prefill_node, a.prefill_engine), (a.decode_node, a.decode_engine)
        tok[pk] = tok.get(pk, 0) + t.prompt_tokens
        seq[pk] = seq.get(pk, 0) + 1
        tok[dk] = tok.get(dk, 0) + t.kv_tokens
        seq[dk] = seq.get(dk, 0) + 1
        free[dk] = free.get(dk, 0) - t.kv_tokens
        side = a.decode_node if a.read_side is ReadSide.DECODE else a.prefill_node
        read_q[side] = read_q.get(side, 0) + t.hit_tokens

    def upd(nodes: tuple[NodeView, ...]) -> tuple[NodeView, ...]:
        return tuple(
            NodeView(
                n.node_id,
                n.read_q_tokens + read_q.get(n.node_id, 0),
                tuple(
                    dataclasses.replace(
                        e,
                        tok=e.tok + tok.get((n.node_id, e.engine), 0),
                        seq=e.seq + seq.get((n.node_id, e.engine), 0),
                        free_kv_tokens=e.free_kv_tokens + free.get((n.node_id, e.engine), 0),
                    )
                    for e in n.engines
                ),
            )
            for n in nodes
        )

    return Cluster(upd(c.prefill), upd(c.decode))


@dataclass(frozen=True)
class Row:
    scenario: str
    what: str
    num_calls: int
    placed: int
    ms_per_run: float
    """Median over repeats of the timed calls' total wall time."""
    us_per_request: float

    @property
    def us_per_call(self) -> float:
        return self.ms_per_run * 1e3 / self.num_calls if self.num_calls else 0.0

    @property
    def ok(self) -> bool:
        return self.us_per_request <= TARGET_US


def timed(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """Median seconds of `run` over `repeats`; run returns the number of placed requests."""
    times, placed = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        placed = run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), placed


def bulk_row(
    name: str,
    what: str,
    repeats: int,
    run: Callable[[], int],
) -> Row:
    s, placed = timed(repeats, run)
    return Row(name, what, 1, placed, s * 1e3, s * 1e6 / max(1, placed))


def pull_rows(
    policy: DualPathPolicy, queue: list[PendingTurn], cluster: Cluster, *, fetch_turns: int
) -> Row:
    """Every prefill group in turn fetches for itself (groups={node}) with `fetch_turns` new
    turns waiting; views are advanced between fetches (untimed), as the service would."""
    c = cluster
    pending = list(queue)
    elapsed, placed, calls = 0.0, 0, 0
    while pending and calls < 20 * len(c.prefill):
        group = frozenset({c.prefill[calls % len(c.prefill)].node_id})
        window = pending[:fetch_turns]
        t0 = time.perf_counter()
        plan = policy.schedule(window, c.prefill, c.decode, now=0.0, groups=group)
        elapsed += time.perf_counter() - t0
        calls += 1
        if not plan.assignments:
            continue
        placed += len(plan.assignments)
        c = apply_plan(plan, window, c)
        done = plan.assigned_ids
        pending = [t for t in pending if t.turn_id not in done]
    return Row(
        f"pull_{fetch_turns}",
        f"per-group fetches, {fetch_turns} turns waiting each",
        calls,
        placed,
        elapsed * 1e3,
        elapsed * 1e6 / max(1, placed),
    )


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    snic_tokens_per_s = SNIC_BYTES_PER_S / KV_BYTES_PER_TOKEN
    alpha = alpha_tokens_for(snic_tokens_per_s)
    beta = beta_tokens_for(CostModel(DS660B).prefill_tokens_per_s(32_768, 512))
    cluster = make_cluster(
        rng,
        prefill_nodes=args.prefill_nodes,
        decode_nodes=args.decode_nodes,
        gpus=args.gpus_per_node,
        alpha=alpha,
        beta=beta,
    )
    queue = make_queue(rng, args.turns)
    pre, dec = cluster.prefill, cluster.decode
    whole = DualPathPolicy(alpha_tokens=alpha, beta_tokens=beta, block_tokens=BLOCK_TOKENS)
    split = dataclasses.replace(whole, split_reads=True, snic_tokens_per_s=snic_tokens_per_s)

    pe = select_prefill(queue, pre, alpha_tokens=alpha, beta_tokens=beta)
    prefix = queue[: len(pe.choices)]

    def plan_len(policy: SchedulingPolicy) -> Callable[[], int]:
        return lambda: len(policy.schedule(queue, pre, dec, now=0.0).assignments)

    r = args.repeats
    rows = [
        bulk_row(
            "pe",
            "Algorithm 1 over the whole queue",
            r,
            lambda: len(select_prefill(queue, pre, alpha_tokens=alpha, beta_tokens=beta).choices),
        ),
        bulk_row(
            "de",
            "two-level DE over the PE-placed turns",
            r,
            lambda: len(select_decode(prefix, dec).choices),
        ),
        bulk_row("dualpath", "whole policy, whole-request reads", r, plan_len(whole)),
        bulk_row("dualpath_split", "whole policy, split reads", r, plan_len(split)),
        bulk_row("round_robin", "baseline", r, plan_len(RoundRobinPolicy(beta_tokens=beta))),
        bulk_row("least_tokens", "baseline", r, plan_len(LeastTokensBaseline(beta_tokens=beta))),
    ]
    # read side + plan assembly, by difference (PE + DE are timed alone above)
    by = {row.scenario: row for row in rows}
    de_per_pe_placed = by["de"].ms_per_run * 1e3 / max(1, by["pe"].placed)
    read_us = by["dualpath"].us_per_request - by["pe"].us_per_request - de_per_pe_placed
    rows.insert(
        2,
        Row(
            "read_side",
            "dualpath - pe - de (by difference)",
            0,
            by["dualpath"].placed,
            0.0,
            read_us,
        ),
    )
    for fetch_turns in args.fetch_turns:
        rows.append(pull_rows(whole, queue, cluster, fetch_turns=fetch_turns))
    return {
        "bench": "sched_cost",
        "target_us_per_request": TARGET_US,
        "config": {
            "prefill_nodes": args.prefill_nodes,
            "decode_nodes": args.decode_nodes,
            "gpus_per_node": args.gpus_per_node,
            "engines": (args.prefill_nodes + args.decode_nodes) * args.gpus_per_node,
            "turns": args.turns,
            "seed": args.seed,
            "repeats": args.repeats,
            "alpha_tokens": alpha,
            "beta_tokens": beta,
            "de_kv_capacity_tokens": DE_KV_CAPACITY_TOKENS,
            "block_tokens": BLOCK_TOKENS,
        },
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_affinity": sorted(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
        },
        "results": [
            dataclasses.asdict(row) | {"us_per_call": row.us_per_call, "ok": row.ok} for row in rows
        ],
    }


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"{cfg['engines']} engines ({cfg['prefill_nodes']}P{cfg['decode_nodes']}D x "
        f"{cfg['gpus_per_node']}), {cfg['turns']} turns, alpha={cfg['alpha_tokens']:,} "
        f"beta={cfg['beta_tokens']:,} tokens, median of {cfg['repeats']}"
    )
    head = (
        f"{'scenario':<16} {'calls':>6} {'placed':>7} {'ms/run':>9} {'us/call':>9} "
        f"{'us/req':>8}  target  what"
    )
    print(head)
    print("-" * len(head))
    for row in result["results"]:
        mark = "ok" if row["ok"] else "OVER"
        print(
            f"{row['scenario']:<16} {row['num_calls']:>6} {row['placed']:>7} "
            f"{row['ms_per_run']:>9.2f} {row['us_per_call']:>9.1f} "
            f"{row['us_per_request']:>8.2f}  {mark:<6}  {row['what']}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-nodes", type=int, default=48)
    parser.add_argument("--decode-nodes", type=int, default=96)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--fetch-turns",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16, 256],
        help="queue length per pull-model fetch scenario, comma-separated",
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as claimed
    result = run_bench(args)
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sched_cost.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    worst = max(r["us_per_request"] for r in result["results"] if r["scenario"] == "dualpath")
    return 0 if worst <= TARGET_US else 1


if __name__ == "__main__":
    raise SystemExit(main())

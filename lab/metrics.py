"""Turn a run's raw material into summary.json: client timings and kernel counters only.

Latencies come from the driver's client-side timestamps; NIC utilisation from the sampled
qdisc counters over the measured window; byte accounting from the nodes' verified counters.
Configured rates only appear as the denominator of a utilisation. Pure, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

Sample = dict[str, Any]  # {"t": float, "nodes": {node: {nic: counters}}}


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    xs = sorted(values)

    def pct(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {
        "p50": round(pct(0.5), 6),
        "p90": round(pct(0.9), 6),
        "p99": round(pct(0.99), 6),
        "mean": round(sum(xs) / len(xs), 6),
        "max": round(xs[-1], 6),
    }


def _at(samples: Sequence[Sample], t: float, node: str, nic: str, key: str) -> tuple[float, int]:
    """The sample nearest to time t that has the counter; (time, value)."""
    best: tuple[float, int] | None = None
    for s in samples:
        c = s["nodes"].get(node, {}).get(nic)
        if c is None:
            continue
        if best is None or abs(s["t"] - t) < abs(best[0] - t):
            best = (float(s["t"]), int(c[key]))
    if best is None:
        raise KeyError(f"no samples of {node}/{nic}")
    return best


def nic_utilisation(
    samples: Sequence[Sample], start: float, end: float
) -> dict[str, dict[str, Any]]:
    """Per node and NIC: bytes and utilisation in each direction over [start, end]."""
    if len(samples) < 2:
        return {}
    out: dict[str, dict[str, Any]] = {}
    last = samples[-1]["nodes"]
    for node, nics in last.items():
        for nic, c in nics.items():
            rate = c.get("rate_mbit")
            entry: dict[str, Any] = {"rate_mbit": rate}
            for direction in ("ingress", "egress"):
                key = f"{direction}_bytes"
                t0, v0 = _at(samples, start, node, nic, key)
                t1, v1 = _at(samples, end, node, nic, key)
                span = max(t1 - t0, 1e-9)
                mbit = (v1 - v0) * 8 / span / 1e6
                entry[f"{direction}_bytes"] = v1 - v0
                entry[f"{direction}_mbit"] = round(mbit, 3)
                d_rate = c.get(f"{direction}_rate_mbit") or rate
                entry[f"{direction}_util"] = round(mbit / d_rate, 4) if d_rate else None
            out.setdefault(node, {})[nic] = entry
    return out


def snic_balance(samples: Sequence[Sample], start: float, end: float) -> dict[str, Any]:
    """Storage-NIC read traffic max/avg across engine nodes (DualPath §8: 1.53 round robin,
    1.18 with its scheduler): over the whole window and averaged over sample intervals."""
    inside = [s for s in samples if start <= s["t"] <= end]
    out: dict[str, Any] = {"whole_run": None, "mean_interval": None, "num_nodes": 0}
    if len(inside) < 2:
        return out

    def reads(s: Sample) -> dict[str, int]:
        return {
            node: int(nics["snic"]["ingress_bytes"])
            for node, nics in s["nodes"].items()
            if node.startswith(("prefill", "decode")) and "snic" in nics
        }

    def ratio(values: Sequence[int]) -> float | None:
        avg = sum(values) / len(values) if values else 0.0
        return max(values) / avg if avg > 0 else None

    first, last = reads(inside[0]), reads(inside[-1])
    nodes = sorted(set(first) & set(last))
    out["num_nodes"] = len(nodes)
    if not nodes:
        return out
    whole = ratio([last[n] - first[n] for n in nodes])
    per_interval = []
    for a, b in itertools.pairwise(inside):
        ra, rb = reads(a), reads(b)
        r = ratio([rb[n] - ra[n] for n in nodes if n in ra and n in rb])
        if r is not None:
            per_interval.append(r)
    out["whole_run"] = None if whole is None else round(whole, 4)
    if per_interval:
        out["mean_interval"] = round(sum(per_interval) / len(per_interval), 4)
    return out


EARLY_FRACTION = 0.25
"""'Early in the run' for the attention balance: the first quarter of the measured window."""


def attention_balance_summary(
    steps_by_node: dict[str, Sequence[Sequence[float]]], start: float, end: float
) -> dict[str, Any]:
    """Attention time max/avg across the GPUs of each prefill group, per step (DualPath §6,
    §8: about 1.06 early in a run with the 300 ms compute quota).

    A step row is [at, max/avg, GPUs with work, GPUs]; idle GPUs count as zero attention (they
    wait at the all-to-all too). "Early" is the first quarter of [start, end], when every
    agent's first turns are queued. `*_all_busy_mean` keeps only the steps in which every GPU
    of the group had work: a GPU with nothing ready (its KV still being read) is a scheduling
    or I/O gap that no batching rule can fill, while the quota's job is to even out the GPUs
    that do have work. Both figures are reported.
    """

    def mean(xs: Sequence[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    early_end = start + EARLY_FRACTION * (end - start)
    keys = ("early_mean", "early_all_busy_mean", "mean", "all_busy_mean")
    out: dict[str, Any] = {"early_window_s": round(early_end - start, 3), "nodes": {}}
    pooled: dict[str, list[float]] = {k: [] for k in keys}
    for node, rows in sorted(steps_by_node.items()):
        inside = [r for r in rows if start <= r[0] <= end]
        picked = {
            "early_mean": [r for r in inside if r[0] <= early_end],
            "early_all_busy_mean": [r for r in inside if r[0] <= early_end and r[2] == r[3]],
            "mean": inside,
            "all_busy_mean": [r for r in inside if r[2] == r[3]],
        }
        entry: dict[str, Any] = {"num_steps": len(inside)}
        for key, sel in picked.items():
            values = [float(r[1]) for r in sel]
            pooled[key] += values
            entry[key] = mean(values)
        out["nodes"][node] = entry
    for key in keys:
        out[key] = mean(pooled[key])
    return out


def throughput_series(samples: Sequence[Sample], start: float) -> list[dict[str, Any]]:
    """Per-NIC Mbit/s between consecutive samples, for time-series files and plots."""
    rows: list[dict[str, Any]] = []
    for prev, cur in itertools.pairwise(samples):
        dt = cur["t"] - prev["t"]
        if dt <= 0:
            continue
        row: dict[str, Any] = {"t": round(cur["t"] - start, 3)}
        for node, nics in cur["nodes"].items():
            for nic, c in nics.items():
                p = prev["nodes"].get(node, {}).get(nic)
                if p is None:
                    continue
                for direction in ("ingress", "egress"):
                    key = f"{direction}_bytes"
                    row[f"{node}/{nic}/{direction}_mbit"] = round(
                        (c[key] - p[key]) * 8 / dt / 1e6, 3
                    )
        rows.append(row)
    return rows


def summarize(
    *,
    policy: str,
    backend: str,
    config_name: str,
    time_dilation: float,
    driver: dict[str, Any],
    samples: Sequence[Sample],
    num_agents: int,
) -> dict[str, Any]:
    turns = driver["turns"]
    ok = [t for t in turns if t["error"] is None and t["done_at"] is not None]
    errors = [
        f"traj {t['traj_id']} turn {t['turn_index']}: {t['error']}" for t in turns if t["error"]
    ]
    ttft = [t["first_token_at"] - t["submitted_at"] for t in ok if t["first_token_at"]]
    ttst = [
        t["second_token_at"] - t["first_token_at"]
        for t in ok
        if t["second_token_at"] and t["first_token_at"]
    ]
    tpot = [
        (t["done_at"] - t["second_token_at"]) / (t["gen_tokens"] - 2) * 1000
        for t in ok
        if t["second_token_at"] and t["gen_tokens"] > 2
    ]
    jct = float(driver["jct_s"])
    tokens = sum(t["prompt_tokens"] + t["gen_tokens"] for t in ok)
    cluster = driver.get("cluster", {})
    node_counters = {n: v.get("counters", {}) for n, v in cluster.items()}

    def total(key: str) -> int:
        return int(sum(int(c.get(key, 0)) for c in node_counters.values()))

    before = driver.get("storage_before", {})
    after = driver.get("storage_after", {})
    storage_read = sum(
        int(after[n]["bytes_read"]) - int(before.get(n, {}).get("bytes_read", 0)) for n in after
    )
    bytes_verified = total("bytes_verified")
    relayed = total("bytes_relay_sent") + total("bytes_pd_sent")
    node_errors = total("errors")
    for node, c in node_counters.items():
        errors += [f"{node}: {e}" for e in c.get("last_errors", [])]
    read_sides: dict[str, int] = {}
    for t in ok:
        side = str(t.get("read_side"))
        read_sides[side] = read_sides.get(side, 0) + 1
    util = nic_utilisation(samples, driver["started_at"], driver["finished_at"])
    return {
        "config": config_name,
        "policy": policy,
        "backend": backend,
        "num_agents": num_agents,
        "turns_done": len(ok),
        "turns_failed": len(turns) - len(ok),
        "jct_s": round(jct, 3),
        "real_jct_s": round(jct / time_dilation, 6),
        "time_dilation": time_dilation,
        "throughput_tokens_per_s": round(tokens / jct, 1) if jct > 0 else 0.0,
        "ttft_s": percentiles(ttft),
        "ttst_s": percentiles(ttst),
        "tpot_ms": percentiles(tpot),
        "nics": util,
        "snic_balance": snic_balance(samples, driver["started_at"], driver["finished_at"]),
        "attention_balance": attention_balance_summary(
            driver.get("prefill_steps", {}), driver["started_at"], driver["finished_at"]
        ),
        "bytes_storage_read": storage_read,
        "bytes_relayed": relayed,
        "bytes_verified": bytes_verified,
        "bytes_accounted": bytes_verified == storage_read + relayed,
        "bytes_written": total("bytes_written"),
        "read_sides": read_sides,
        "engine_busy_s": {n: c.get("engine_busy_s") for n, c in node_counters.items()},
        "node_errors": node_errors,
        "errors": errors[:100],
    }

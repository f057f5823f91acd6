"""Turn a run's raw material into summary.json: client timings and kernel counters only.

Latencies come from the driver's client-side timestamps; NIC utilisation from the sampled
qdisc counters over the measured window; byte accounting from the nodes' verified counters.
Configured rates only appear as the denominator of a utilisation. Pure, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lab.results.ledger import account

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


def _rate(c: dict[str, Any], direction: str) -> float | None:
    rate = c.get(f"{direction}_rate_mbit") or c.get("rate_mbit")
    return float(rate) if rate else None


def _mean_rate(
    samples: Sequence[Sample], t0: float, t1: float, node: str, nic: str, direction: str
) -> float | None:
    """The configured rate averaged over [t0, t1]: a rate a chaos step changed counts for the
    time it was in effect (each sample's rate holds until the next sample)."""
    inside = [
        (float(s["t"]), s["nodes"][node][nic])
        for s in samples
        if t0 <= s["t"] <= t1 and nic in s["nodes"].get(node, {})
    ]
    area = 0.0
    span = 0.0
    for (ta, ca), (tb, _) in itertools.pairwise(inside):
        rate = _rate(ca, direction)
        if rate is None:
            return None
        area += rate * (tb - ta)
        span += tb - ta
    if span <= 0:
        return _rate(inside[-1][1], direction) if inside else None
    return area / span


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
                d_rate = _mean_rate(samples, t0, t1, node, nic, direction)
                if d_rate is not None and d_rate != rate:
                    entry[f"{direction}_mean_rate_mbit"] = round(d_rate, 3)
                entry[f"{direction}_util"] = round(mbit / d_rate, 4) if d_rate else None
            out.setdefault(node, {})[nic] = entry
    return out


SNIC_BALANCE_WINDOW_S = 5.0
"""Default window of `snic_balance`, lab seconds: at the lab's snic rates a node reads dozens
of turns' KV in it, so a window's shares reflect placement rather than single reads."""
SNIC_BALANCE_BUSY_FRACTION = 0.9
"""Default share of the run's snic read bytes that bounds the busy part of `snic_balance`."""


def _engine_reads(s: Sample) -> dict[str, int]:
    """Cumulative snic ingress (storage read) bytes of each engine node in one sample."""
    return {
        node: int(nics["snic"]["ingress_bytes"])
        for node, nics in s["nodes"].items()
        if node.startswith(("prefill", "decode")) and "snic" in nics
    }


def _max_over_avg(values: Sequence[float]) -> float | None:
    avg = sum(values) / len(values) if values else 0.0
    return max(values) / avg if avg > 0 else None


def _read_curve(samples: Sequence[Sample], nodes: Sequence[str]) -> list[tuple[float, list[int]]]:
    """(t, cumulative reads per node in `nodes` order) for the samples that have every node."""
    curve = []
    for s in sorted(samples, key=lambda s: float(s["t"])):
        r = _engine_reads(s)
        if all(n in r for n in nodes):
            curve.append((float(s["t"]), [r[n] for n in nodes]))
    return curve


def _interp(curve: Sequence[tuple[float, list[int]]], t: float) -> list[float]:
    """Cumulative reads at time t, linear between samples (counters only grow), clamped."""
    if t <= curve[0][0]:
        return [float(v) for v in curve[0][1]]
    for (t0, v0), (t1, v1) in itertools.pairwise(curve):
        if t <= t1:
            f = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
            return [a + (b - a) * f for a, b in zip(v0, v1, strict=True)]
    return [float(v) for v in curve[-1][1]]


def _busy_end(curve: Sequence[tuple[float, list[int]]], fraction: float) -> float:
    """The first time the engine nodes together have read `fraction` of the curve's bytes."""
    base = sum(curve[0][1])
    goal = fraction * (sum(curve[-1][1]) - base)
    for (t0, v0), (t1, v1) in itertools.pairwise(curve):
        a, b = sum(v0) - base, sum(v1) - base
        if b >= goal and b > a:
            return t0 + (t1 - t0) * max(0.0, goal - a) / (b - a)
    return curve[-1][0]


def _no_snic_balance(window_s: float, busy_fraction: float) -> dict[str, Any]:
    """snic_balance's answer before anything is measured: every figure None."""
    return {
        "whole_run": None,
        "mean_interval": None,
        "mean_window": None,
        "max_window": None,
        "busy": None,
        "num_windows": 0,
        "window_s": window_s,
        "busy_fraction": busy_fraction,
        "busy_s": None,
        "num_nodes": 0,
    }


def snic_balance(
    samples: Sequence[Sample],
    start: float,
    end: float,
    *,
    window_s: float = SNIC_BALANCE_WINDOW_S,
    busy_fraction: float = SNIC_BALANCE_BUSY_FRACTION,
) -> dict[str, Any]:
    """Storage-NIC read traffic max/avg across engine nodes (DualPath §8: 1.53 round robin,
    1.18 with its scheduler), from the snic ingress byte counters of the prefill and decode
    nodes.

    - `whole_run`: max/avg of each node's bytes read over [start, end]. Over a whole run
      placement errors average out, so this is close to 1 for any sensible scheduler.
    - `mean_interval`: mean of max/avg over consecutive samples (0.5 s apart in the lab).
      A node reads only a few turns' KV in one sample, so this mostly measures which node
      happened to be mid-read: burst noise, similar for every scheduler.
    - `mean_window` (the figure to compare with the paper): the busy part of the run is cut
      into consecutive windows of `window_s` seconds (long enough for each node to read many
      turns' KV); max/avg of the bytes each node read in a window, averaged over the windows.
      `max_window` is the worst window, `busy` the max/avg over the busy part as one span.

    The busy part is [start, busy_end], where busy_end is when the engine nodes together have
    read `busy_fraction` of the bytes they read in [start, end]. After that the run drains:
    agents finish, the last few turns' reads land wherever their turns went, and a node can
    idle because no work is left rather than because the scheduler misplaced any, which is
    noise a scheduler cannot remove. Cutting at a share of the bytes read, not at a time,
    compares every scheduler at the same point of the same workload (same seed, same reads).
    Windows are aligned at `start`; a last window shorter than half of `window_s` is dropped
    (one shorter but at least half as long is kept). Counters are interpolated linearly
    between samples at window edges. Fewer than two usable samples, or no reads, give None.
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    if not 0 < busy_fraction <= 1:
        raise ValueError(f"busy_fraction must be in (0, 1], got {busy_fraction}")
    inside = [s for s in samples if start <= s["t"] <= end]
    out = _no_snic_balance(window_s, busy_fraction)
    if len(inside) < 2:
        return out
    first, last = _engine_reads(inside[0]), _engine_reads(inside[-1])
    nodes = sorted(set(first) & set(last))
    out["num_nodes"] = len(nodes)
    if not nodes:
        return out
    whole = _max_over_avg([last[n] - first[n] for n in nodes])
    out["whole_run"] = None if whole is None else round(whole, 4)
    out["mean_interval"] = _mean_interval_balance(inside, nodes)
    curve = _read_curve(inside, nodes)
    if len(curve) < 2 or whole is None:
        return out
    out.update(_busy_balance(curve, window_s, busy_fraction))
    return out


def _mean_interval_balance(inside: Sequence[Sample], nodes: Sequence[str]) -> float | None:
    """snic_balance's `mean_interval`: max/avg per pair of consecutive samples, averaged."""
    per_interval = []
    for a, b in itertools.pairwise(inside):
        ra, rb = _engine_reads(a), _engine_reads(b)
        r = _max_over_avg([rb[n] - ra[n] for n in nodes if n in ra and n in rb])
        if r is not None:
            per_interval.append(r)
    return round(sum(per_interval) / len(per_interval), 4) if per_interval else None


def _window_edges(t0: float, t_end: float, window_s: float) -> list[float]:
    """Window edges from `t0` every `window_s` up to `t_end`; a last partial window is kept
    when it is at least half as long."""
    edges = [t0]
    while edges[-1] + window_s <= t_end + 1e-9:
        edges.append(edges[-1] + window_s)
    if t_end - edges[-1] >= window_s / 2:
        edges.append(t_end)
    return edges


def _busy_balance(
    curve: Sequence[tuple[float, list[int]]], window_s: float, busy_fraction: float
) -> dict[str, Any]:
    """snic_balance's busy-part figures: `busy_s`, `busy`, and the per-window ones."""
    t0 = curve[0][0]
    t_end = _busy_end(curve, busy_fraction)
    out: dict[str, Any] = {"busy_s": round(t_end - t0, 3)}
    busy = _max_over_avg(
        [b - a for a, b in zip(_interp(curve, t0), _interp(curve, t_end), strict=True)]
    )
    out["busy"] = None if busy is None else round(busy, 4)
    ratios = []
    for lo, hi in itertools.pairwise(_window_edges(t0, t_end, window_s)):
        va, vb = _interp(curve, lo), _interp(curve, hi)
        r = _max_over_avg([y - x for x, y in zip(va, vb, strict=True)])
        if r is not None:
            ratios.append(r)
    out["num_windows"] = len(ratios)
    if ratios:
        out["mean_window"] = round(sum(ratios) / len(ratios), 4)
        out["max_window"] = round(max(ratios), 4)
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
    that do have work. Both figures are reported, and the median of the early all-busy steps
    (`early_all_busy_p50`), which the one or two steps of the ramp-up, while the first reads
    land and queues are still short, cannot move.
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
    early_busy = sorted(pooled["early_all_busy_mean"])
    out["early_all_busy_p50"] = (
        round(percentiles(early_busy)["p50"] or 0.0, 4) if early_busy else None
    )
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


def latency_series(
    turns: Sequence[dict[str, Any]], started_at: float, *, bin_s: float = 2.0
) -> list[dict[str, Any]]:
    """TTFT of the turns whose first token came in each `bin_s` window of the run (driver
    clock, seconds from the start): p50 and max, for the run's time-axis plot."""
    bins: dict[int, list[float]] = {}
    for t in turns:
        if t.get("first_token_at") is None:
            continue
        k = int((t["first_token_at"] - started_at) // bin_s)
        bins.setdefault(k, []).append(t["first_token_at"] - t["submitted_at"])
    return [
        {
            "t": round((k + 0.5) * bin_s, 3),
            "ttft_p50_s": percentiles(v)["p50"],
            "ttft_max_s": max(v),
            "num_turns": len(v),
        }
        for k, v in sorted(bins.items())
    ]


SLO_TTFT_S = 4.0
"""DualPath §8 online SLO: TTFT <= 4 s (real)."""
SLO_TPOT_MS = 50.0
"""DualPath §8 online SLO: TPOT <= 50 ms (real)."""


def _decode_end(t: dict[str, Any]) -> float:
    """When the turn's last token came: TPOT covers decoding, not the persisting of its new
    blocks that follows it (results of runs before `last_token` existed: `done`)."""
    end = t.get("last_token_at") or t["done_at"]
    return float(end)


def slo_attainment(
    ok: Sequence[dict[str, Any]], num_turns: int, time_dilation: float
) -> dict[str, Any]:
    """Share of all submitted turns that completed within the paper's online SLO, on the
    real-equivalent clock (emulated durations / tau). A turn of one or two tokens has no TPOT
    and is judged on TTFT alone; a failed turn misses the SLO."""
    met = 0
    for t in ok:
        if t["first_token_at"] is None:
            continue
        ttft = (t["first_token_at"] - t["submitted_at"]) / time_dilation
        tpot_ok = True
        if t["second_token_at"] and t["gen_tokens"] > 2:
            tpot = (_decode_end(t) - t["second_token_at"]) / (t["gen_tokens"] - 2) * 1000
            tpot_ok = tpot / time_dilation <= SLO_TPOT_MS
        met += ttft <= SLO_TTFT_S and tpot_ok
    return {
        "ttft_s": SLO_TTFT_S,
        "tpot_ms": SLO_TPOT_MS,
        "attained": round(met / num_turns, 4) if num_turns else None,
    }


TTFT_PARTS = ("queue", "load", "prefill")


def ttft_breakdown(ok: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where the time to first token goes (DualPath §8: Basic fails through queueing, its
    queueing share of TTFT rising from ~21 % to ~73 % with load), on the driver's clock:

    - `queue`: submitted until its storage read began: the scheduler's FIFO queue, then the
      node's read queue and DRAM buffer (a turn that reads nothing: until its first prefill
      step);
    - `load`: its read began until its first prefill step: the KV read (the first layer
      group's, relayed, on the layerwise path; all of it otherwise), then the GPU's queue;
    - `prefill`: the prefill steps until the first token, overlapping the later layer groups'
      loads on the layerwise path.

    Means over the completed turns whose events all arrived (emulated seconds), and each
    part's share of their summed TTFT. Turns without them (results written before the driver
    recorded them) are left out and counted in `num_without_events`."""
    parts: dict[str, list[float]] = {k: [] for k in TTFT_PARTS}
    for t in ok:
        submitted, started, first = (
            t.get(k) for k in ("submitted_at", "prefill_started_at", "first_token_at")
        )
        if submitted is None or started is None or first is None:
            continue
        read = t.get("read_started_at")
        read = started if read is None else min(max(read, submitted), started)
        parts["queue"].append(max(0.0, read - submitted))
        parts["load"].append(max(0.0, started - read))
        parts["prefill"].append(max(0.0, first - started))
    n = len(parts["queue"])
    out: dict[str, Any] = {"num_turns": n, "num_without_events": len(ok) - n}
    total = sum(sum(v) for v in parts.values())
    for name, values in parts.items():
        out[f"{name}_mean_s"] = round(sum(values) / n, 6) if n else None
        out[f"{name}_share"] = round(sum(values) / total, 4) if total > 0 else None
    return out


def _gaps(times: Sequence[float], since: float) -> list[tuple[float, float]]:
    """The intervals from `since` to the first of `times` (sorted) and between them."""
    after = [t for t in times if t >= since]
    return list(zip([since, *after], after, strict=False))


def _longest(gaps: Sequence[tuple[float, float]]) -> float | None:
    return round(max(b - a for a, b in gaps), 3) if gaps else None


def recovery(
    samples: Sequence[Sample],
    turns: Sequence[dict[str, Any]],
    since: float,
    end: float,
    down: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> dict[str, Any]:
    """How the cluster kept going after the first fault at `since` (wall clock), from kernel
    counters and client timings: per engine node, the longest stretch its storage NIC read
    nothing, from `since` until its last read of the run (a node that went on reading through
    the fault shows the sample interval, a stalled one the stall) — over all, and leaving out
    the stretches that overlap the node's own outage (`down`: stopped or killed, until
    cont or restart); and the longest stretch in which no turn finished."""
    reads: dict[str, list[float]] = {}
    last: dict[str, int] = {}
    for s in samples:
        if not since - 1.0 <= s["t"] <= end:
            continue
        for node, nics in s["nodes"].items():
            snic = nics.get("snic")
            if snic is None or not node.startswith(("prefill", "decode")):
                continue
            got = int(snic.get("ingress_bytes", 0))
            if node in last and got > last[node]:
                reads.setdefault(node, []).append(float(s["t"]))
            last[node] = got
    done = sorted(float(t["done_at"]) for t in turns if t.get("done_at") and not t.get("error"))
    down = down or {}

    def up(node: str, gap: tuple[float, float]) -> bool:
        return all(gap[1] <= a or gap[0] >= b for a, b in down.get(node, ()))

    gaps = {n: _gaps(ts, since) for n, ts in sorted(reads.items())}
    return {
        "since_s": round(since, 3),
        "longest_read_gap_s": {n: _longest(g) for n, g in gaps.items()},
        "longest_read_gap_while_up_s": {
            n: _longest([x for x in g if up(n, x)]) for n, g in gaps.items()
        },
        "longest_gap_between_turns_done_s": _longest(_gaps(done, since)),
    }


def summarize(
    *,
    policy: str,
    backend: str,
    config_name: str,
    time_dilation: float,
    driver: dict[str, Any],
    samples: Sequence[Sample],
    num_agents: int,
    faults_injected: bool = False,
) -> dict[str, Any]:
    """summary.json from the driver's results and the kernel samples. With `faults_injected`
    (a chaos run), errors a node recorded about a lost or unresponsive peer are the faults'
    consequences: reported in `fault_errors`, not failures — turns that still failed after
    their retries and bytes that do not balance are."""
    turns = driver["turns"]
    ok = [t for t in turns if t["error"] is None and t["done_at"] is not None]
    started, finished = driver["started_at"], driver["finished_at"]
    cluster = driver.get("cluster", {})
    node_counters = {n: v.get("counters", {}) for n, v in cluster.items()}
    return {
        "config": config_name,
        "policy": policy,
        "backend": backend,
        "num_agents": num_agents,
        **_turn_counts(turns, ok),
        **_speed(ok, float(driver["jct_s"]), time_dilation),
        **_latencies(ok, len(turns), time_dilation),
        "nics": nic_utilisation(samples, started, finished),
        "snic_balance": snic_balance(samples, started, finished),
        "collective_latency_ms": {
            node: percentiles(ms) for node, ms in driver.get("collective_ms", {}).items() if ms
        },
        "attention_balance": attention_balance_summary(
            driver.get("prefill_steps", {}), started, finished
        ),
        **_bytes_moved(driver, node_counters),
        "node_restarts": sum(1 for v in cluster.values() if v.get("retired")),
        "bytes_written": _total(node_counters, "bytes_written"),
        "read_sides": _read_sides(ok),
        "engine_busy_s": {n: c.get("engine_busy_s") for n, c in node_counters.items()},
        **_error_report(turns, node_counters, faults_injected=faults_injected),
    }


def _total(node_counters: dict[str, dict[str, Any]], key: str) -> int:
    """One counter summed over the nodes."""
    return int(sum(int(c.get(key, 0)) for c in node_counters.values()))


def _turn_counts(turns: Sequence[dict[str, Any]], ok: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Turns done and failed, and what their retries took."""
    return {
        "turns_done": len(ok),
        "turns_failed": len(turns) - len(ok),
        "turns_retried": sum(int(t.get("attempts", 1)) > 1 for t in turns),
        "retries": sum(int(t.get("attempts", 1)) - 1 for t in turns),
        "attempts_timed_out": sum(int(t.get("timed_out", 0)) for t in turns),
    }


def _speed(ok: Sequence[dict[str, Any]], jct: float, time_dilation: float) -> dict[str, float]:
    """JCT (emulated and real) and the token throughput of the finished turns."""
    tokens = sum(t["prompt_tokens"] + t["gen_tokens"] for t in ok)
    return {
        "jct_s": round(jct, 3),
        "real_jct_s": round(jct / time_dilation, 6),
        "time_dilation": time_dilation,
        "throughput_tokens_per_s": round(tokens / jct, 1) if jct > 0 else 0.0,
    }


def _latencies(
    ok: Sequence[dict[str, Any]], num_turns: int, time_dilation: float
) -> dict[str, Any]:
    """TTFT (and its breakdown), TTST and TPOT percentiles, and the SLO attainment."""
    ttft = [t["first_token_at"] - t["submitted_at"] for t in ok if t["first_token_at"]]
    ttst = [
        t["second_token_at"] - t["first_token_at"]
        for t in ok
        if t["second_token_at"] and t["first_token_at"]
    ]
    tpot = [
        (_decode_end(t) - t["second_token_at"]) / (t["gen_tokens"] - 2) * 1000
        for t in ok
        if t["second_token_at"] and t["gen_tokens"] > 2
    ]
    return {
        "ttft_s": percentiles(ttft),
        "ttft_breakdown": ttft_breakdown(ok),
        "ttst_s": percentiles(ttst),
        "tpot_ms": percentiles(tpot),
        "slo": slo_attainment(ok, num_turns, time_dilation),
    }


def _storage_bytes_read(before: dict[str, Any], after: dict[str, Any]) -> int:
    """Bytes the storage servers read during the run; a server that restarted (another
    `boot`) counts from zero."""
    return sum(
        int(after[n]["bytes_read"])
        - (
            int(before[n]["bytes_read"])
            if before.get(n, {}).get("boot") == after[n].get("boot")
            else 0
        )
        for n in after
    )


def _bytes_moved(
    driver: dict[str, Any], node_counters: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Bytes read, relayed and verified, and whether they balance (the byte ledger)."""
    before = driver.get("storage_before", {})
    after = driver.get("storage_after", {})
    storage_read = _storage_bytes_read(before, after)
    ledger = account(driver.get("cluster_before", {}), driver.get("cluster", {}), before, after)
    faulted = bool(ledger["restarted"])
    bytes_verified = _total(node_counters, "bytes_verified")
    relayed = _total(node_counters, "bytes_relay_sent") + _total(node_counters, "bytes_pd_sent")
    return {
        "bytes_storage_read": storage_read,
        "bytes_relayed": relayed,
        "bytes_verified": bytes_verified,
        "bytes_accounted": ledger["balanced"]
        and (faulted or bytes_verified == storage_read + relayed),
        "byte_ledger": ledger,
    }


def _read_sides(ok: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Finished turns per read side (prefill, decode, split, None)."""
    read_sides: dict[str, int] = {}
    for t in ok:
        side = str(t.get("read_side"))
        read_sides[side] = read_sides.get(side, 0) + 1
    return read_sides


def _error_report(
    turns: Sequence[dict[str, Any]],
    node_counters: dict[str, dict[str, Any]],
    *,
    faults_injected: bool,
) -> dict[str, Any]:
    """The turns' and nodes' errors; a node's transient errors (a lost peer) are failures
    unless faults were injected, when they are reported apart as `fault_errors`."""
    errors = [
        f"traj {t['traj_id']} turn {t['turn_index']}: {t['error']}" for t in turns if t["error"]
    ]
    node_errors = _total(node_counters, "errors")
    transient = _total(node_counters, "errors_transient")
    fault_errors: list[str] = []
    for node, c in node_counters.items():
        errors += [f"{node}: {e}" for e in c.get("last_errors", [])]
        fault_errors += [f"{node}: {e}" for e in c.get("last_transient_errors", [])]
    if not faults_injected:  # a lost peer nobody killed is a failure
        errors += fault_errors
        node_errors += transient
        fault_errors, transient = [], 0
    return {
        "node_errors": node_errors,
        "errors": errors[:100],
        "fault_errors": {"count": transient, "recent": fault_errors[:100]},
    }

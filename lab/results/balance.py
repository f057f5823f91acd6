"""Load balance, the paper's Figures 11-12: how evenly the engine nodes' storage NICs read
(`snic_balance`, from kernel counters) and how evenly the attention layers' work spread over
the GPUs (`attention_balance_summary`, from the engines' step records)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from lab.results.stats import percentiles

Sample = dict[str, Any]  # {"t": float, "nodes": {node: {nic: counters}}}


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

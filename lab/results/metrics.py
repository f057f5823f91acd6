"""Turn a run's raw material into summary.json: client timings and kernel counters only.

Latencies come from the driver's client-side timestamps; NIC utilisation from the sampled
qdisc counters over the measured window; byte accounting from the nodes' verified counters.
Configured rates only appear as the denominator of a utilisation. Pure, no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from lab.results.balance import attention_balance_summary, snic_balance
from lab.results.ledger import account
from lab.results.stats import percentiles

Sample = dict[str, Any]  # {"t": float, "nodes": {node: {nic: counters}}}


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


def _decode_end(t: Mapping[str, Any]) -> float:
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


def turn_latencies(ok: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Each finished turn's TTFT (s) and, when it has more than two tokens, TPOT (ms): the
    values the summary's percentiles and the report's distributions count."""
    ttft = [t["first_token_at"] - t["submitted_at"] for t in ok if t["first_token_at"]]
    tpot = [
        (_decode_end(t) - t["second_token_at"]) / (t["gen_tokens"] - 2) * 1000
        for t in ok
        if t["second_token_at"] and t["gen_tokens"] > 2
    ]
    return ttft, tpot


def _latencies(
    ok: Sequence[dict[str, Any]], num_turns: int, time_dilation: float
) -> dict[str, Any]:
    """TTFT (and its breakdown), TTST and TPOT percentiles, and the SLO attainment."""
    ttft, tpot = turn_latencies(ok)
    ttst = [
        t["second_token_at"] - t["first_token_at"]
        for t in ok
        if t["second_token_at"] and t["first_token_at"]
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

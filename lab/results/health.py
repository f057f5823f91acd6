"""Emulation health of a run: did the host keep up with the lab it emulates?

Takes the lab processes' HealthMonitor snapshots (services/health.py) and the runner's host
samples over the measured window and returns summary.json's `emulation_health`: per-process
figures, host figures, a verdict and the reasons for it. Pure: data in, verdict out. It reads
no file and no clock; the runner reads /proc and hands the text to the parsers here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from lab.results.stats import percentiles

Verdict = Literal["healthy", "host-bound", "unknown"]
HEALTHY: Verdict = "healthy"
HOST_BOUND: Verdict = "host-bound"
UNKNOWN: Verdict = "unknown"

HostSample = dict[str, Any]
"""{"t": wall clock, "cpu_busy_jiffies", "cpu_total_jiffies", "psi_cpu_some_us", "num_cpus"};
each figure None where the host has no answer (no /proc/pressure on older kernels)."""

LATENESS_BIN_S = 1.0
"""Width of a bin of `lateness_per_s`, seconds."""


@dataclass(frozen=True)
class Thresholds:
    """Where a run stops counting as emulated faithfully. Each is an upper bound: a measure
    above it makes the verdict "host-bound" and adds a reason naming it. The defaults are
    calibrated with bench/invariance.py (docs/design.md, "Emulation health")."""

    timeline_drift: float = 0.02
    """Per timeline process: (actual - planned) / planned of all its GPU compute in the window.
    Time the emulated GPUs lost to the host: it stretches TPOT, prefill and JCT alike. Steps are
    deadline-driven (a late step's lateness is paid back by the next one), so on a host that
    keeps up this stays near 0 (measured: under 0.3 % even at 90 % host CPU)."""
    timeline_lateness_p99: float = 0.25
    """Per timeline process: p99 over its GPU steps of (late - timer_allowance_ms) / planned.
    Single steps the host delayed by a quarter of their length or more: beyond what the next
    step pays back unseen. Measured: with p99 up to ~15 % TPOT stayed within 1 % of a
    low-load run (bench/invariance.py)."""
    timer_allowance_ms: float = 2.0
    """Not a bound: the event loop's timers have millisecond resolution, so up to this much
    lateness per step is the clock's, not the host's load."""
    timeline_loop_lag_p99_ms: float = 50.0
    """Per timeline process: p99 of the event loop's wake-up lag. Collective bursts, hand-offs
    and turn events all wait on this loop: a late event is a client-side timing error of that
    much (50 emulated ms is 1 % of the laptop config's TTFT p50)."""
    dataplane_buffer_mib: float = 6.0
    """Per engine data plane and storage server: p99 of its event loop's wake-up lag must stay
    under the time this much KV takes at the node's shaped storage rate. A data plane that is
    not back at its sockets in time lets the link idle (TCP's receive window stays small on
    the lab's sub-millisecond round trips): KV then moves at CPU speed, not at the NIC's.
    Calibrated on the laptop config (1 Gbit/s storage NICs, so 50 ms): p99 up to ~60 ms kept
    JCT within 5 % of a low-load run, 80 ms and more did not."""
    dataplane_loop_lag_p99_ms: float = 100.0
    """The same bound's ceiling, and the bound where links are not shaped (local backend):
    beyond it a turn's latency, not only the link's use, carries the host's delay."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Thresholds.{f.name}: must be a finite number > 0, got {value!r}")


# -- host: /proc text in, one sample out -------------------------------------------------------


def parse_proc_stat(text: str) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat's aggregate `cpu` line. Busy is
    user + nice + system + irq + softirq + steal (time a hypervisor took counts as not
    available to the lab); total adds idle and iowait. Guest time is already inside user."""
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] != "cpu":
            continue
        try:
            values = [int(v) for v in parts[1:9]]
        except ValueError:
            return None
        if len(values) < 4:
            return None
        values += [0] * (8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, steal = values
        busy = user + nice + system + irq + softirq + steal
        return busy, busy + idle + iowait
    return None


def parse_psi_some_us(text: str) -> int | None:
    """The `some ... total=<µs>` figure of /proc/pressure/cpu: cumulative microseconds in which
    at least one runnable task waited for a CPU."""
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] != "some":
            continue
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key == "total":
                try:
                    return int(value)
                except ValueError:
                    return None
    return None


def host_sample(
    t: float, *, stat_text: str | None, psi_text: str | None, num_cpus: int | None
) -> HostSample:
    """One host sample at wall-clock `t` from the text of /proc/stat and /proc/pressure/cpu
    (None: the file was not there)."""
    stat = parse_proc_stat(stat_text) if stat_text is not None else None
    return {
        "t": round(t, 3),
        "cpu_busy_jiffies": None if stat is None else stat[0],
        "cpu_total_jiffies": None if stat is None else stat[1],
        "psi_cpu_some_us": parse_psi_some_us(psi_text) if psi_text is not None else None,
        "num_cpus": num_cpus,
    }


# -- per process -------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _rows(raw: Any, width: int, start: float, end: float) -> list[list[float]]:
    """The well-formed rows of a series (at least `width` numbers) whose time is in the window,
    in time order; anything else (an older node's format, a truncated row) is skipped."""
    out = []
    for row in raw if isinstance(raw, list) else ():
        if not isinstance(row, list | tuple) or len(row) < width:
            continue
        values = [_num(v) for v in row[:width]]
        if any(v is None for v in values):
            continue
        clean = [float(v) for v in values if v is not None]
        if start <= clean[0] <= end:
            out.append(clean)
    out.sort(key=lambda r: r[0])
    return out


PAUSE_GRACE_S = 0.5
"""After a node is continued, what it does for this long still carries the pause."""


def _outside(
    rows: list[list[float]],
    paused: Sequence[tuple[float, float]],
    span: Callable[[list[float]], tuple[float, float]],
) -> list[list[float]]:
    """The rows whose time span (`span(row)`: loop-lag rows end at `at` and began the probe's
    sleep plus `lag` earlier; step rows begin at `at` and last `actual`) overlaps no pause."""
    if not paused:
        return rows
    out = []
    for r in rows:
        lo, hi = span(r)
        if not any(lo < b + PAUSE_GRACE_S and hi > a for a, b in paused):
            out.append(r)
    return out


def _r(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


def _pick(values: Sequence[float], keys: Sequence[str], digits: int = 4) -> dict[str, Any]:
    p = percentiles(values)
    return {k: _r(p[k], digits) for k in keys}


def counter_share(rows: Sequence[Sequence[float]], col: int) -> float | None:
    """Growth of the cumulative seconds in column `col` per wall second between the first and
    the last row (rows: [at, ...], in the window, in order). None with fewer than two rows,
    no elapsed time, or an unknown (negative) value at either end."""
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    dt = last[0] - first[0]
    if dt <= 0 or first[col] < 0 or last[col] < 0:
        return None
    return max(0.0, (last[col] - first[col]) / dt)


def _label(key: str) -> str:
    return key.replace("/", " ")


def _process_entry(
    snap: Mapping[str, Any],
    start: float,
    end: float,
    allowance_ms: float = 0.0,
    lateness_bound: float | None = None,
    paused: Sequence[tuple[float, float]] = (),
) -> dict[str, Any]:
    part = str(snap.get("part", ""))
    lag_rows = _outside(
        _rows(snap.get("loop_lag"), 2, start, end),
        paused,
        lambda r: (r[0] - r[1] / 1e3 - 0.05, r[0]),  # the probe slept 50 ms plus its lag
    )
    lag = [r[1] for r in lag_rows]
    cpu = _rows(snap.get("cpu"), 3, start, end)
    steps = _outside(
        _rows(snap.get("steps"), 4, start, end), paused, lambda r: (r[0], r[0] + r[2] / 1e3)
    )
    entry: dict[str, Any] = {
        "process": str(snap.get("process", "")),
        "part": part,
        "pid": snap.get("pid"),
        "loop_lag_ms": {**_pick(lag, ("p50", "p99", "max"), 3), "num_samples": len(lag)},
        "cpu_share": _r(counter_share(cpu, 1)),
        "runq_wait_share": _r(counter_share(cpu, 2)),
    }
    if part == "timeline" or steps:
        rel = [max(r[3] - allowance_ms, 0.0) / r[1] for r in steps if r[1] > 0]
        late_bound = lateness_bound if lateness_bound is not None else math.inf
        entry["steps"] = {
            "num_steps": len(steps),
            "late_ms": _pick([r[3] for r in steps], ("p50", "p99", "max"), 3),
            "rel_late": _pick(rel, ("p50", "p99", "max")),
            "num_late": sum(1 for x in rel if x > late_bound),
            "planned_total_ms": round(sum(r[1] for r in steps), 3),
            "actual_total_ms": round(sum(r[2] for r in steps), 3),
        }
    gauges: dict[str, Any] = {}
    raw_gauges = snap.get("gauges")
    for name, series in sorted(raw_gauges.items() if isinstance(raw_gauges, dict) else ()):
        values = [r[1] for r in _rows(series, 2, start, end)]
        gauges[str(name)] = {
            "max": _r(max(values), 3) if values else None,
            "mean": _r(sum(values) / len(values), 3) if values else None,
            "num_samples": len(values),
        }
    entry["gauges"] = gauges
    return entry


def _is_timeline(entry: Mapping[str, Any]) -> bool:
    return entry["part"] == "timeline" or "steps" in entry


def _judge(
    key: str, entry: Mapping[str, Any], th: Thresholds, link_mbit: float | None = None
) -> list[str]:
    """Reasons (sentences) why this process says the host did not keep up."""
    who = _label(key)
    out = []
    if _is_timeline(entry):
        steps = entry["steps"]
        planned, actual = steps["planned_total_ms"], steps["actual_total_ms"]
        if planned and (actual - planned) / planned > th.timeline_drift:
            out.append(
                f"{who}: GPU time {100 * (actual - planned) / planned:.1f} % over plan "
                f"> {100 * th.timeline_drift:g} %"
            )
        p99 = steps["rel_late"]["p99"]
        # p99 of a few dozen steps is their maximum: one hiccup of the host is not a trend
        if p99 is not None and p99 > th.timeline_lateness_p99 and steps["num_late"] > 1:
            out.append(
                f"{who}: step lateness p99 {100 * p99:.1f} % of the step "
                f"> {100 * th.timeline_lateness_p99:g} %"
            )
        lag = entry["loop_lag_ms"]["p99"]
        if lag is not None and lag > th.timeline_loop_lag_p99_ms:
            out.append(
                f"{who}: event-loop lag p99 {lag:.1f} ms > {th.timeline_loop_lag_p99_ms:g} ms"
            )
    lag = entry["loop_lag_ms"]["p99"]
    if entry["part"] in ("dataplane", "storage") and lag is not None:
        bound = dataplane_lag_bound_ms(th, link_mbit)
        if lag > bound:
            out.append(f"{who}: event-loop lag p99 {lag:.1f} ms > {bound:.0f} ms")
    return out


def dataplane_lag_bound_ms(th: Thresholds, link_mbit: float | None) -> float:
    """How long a data plane may stay away from its sockets: dataplane_buffer_mib at the
    shaped rate `link_mbit`, at most dataplane_loop_lag_p99_ms."""
    if not link_mbit or link_mbit <= 0:
        return th.dataplane_loop_lag_p99_ms
    buffer_ms = th.dataplane_buffer_mib * (1 << 20) * 8 / (link_mbit * 1e6) * 1e3
    return min(th.dataplane_loop_lag_p99_ms, buffer_ms)


def _snapshots(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, Mapping)]
    return []


# -- host --------------------------------------------------------------------------------------


def host_health(samples: Sequence[Mapping[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Host CPU busy % (mean and p90 over the sample intervals) and the PSI cpu-some share
    over the window, from samples whose time is in it."""
    inside: list[tuple[float, Mapping[str, Any]]] = []
    for s in samples:
        t = _num(s.get("t"))
        if t is not None and start <= t <= end:
            inside.append((t, s))
    inside.sort(key=lambda ts: ts[0])
    busy_pct = []
    for (_, a), (_, b) in itertools.pairwise(inside):
        ba, ta = _num(a.get("cpu_busy_jiffies")), _num(a.get("cpu_total_jiffies"))
        bb, tb = _num(b.get("cpu_busy_jiffies")), _num(b.get("cpu_total_jiffies"))
        if ba is None or ta is None or bb is None or tb is None or tb - ta <= 0:
            continue
        busy_pct.append(100.0 * max(0.0, bb - ba) / (tb - ta))
    psi = [(t, v) for t, s in inside if (v := _num(s.get("psi_cpu_some_us"))) is not None]
    psi_share = None
    if len(psi) >= 2 and psi[-1][0] > psi[0][0]:
        psi_share = max(0.0, (psi[-1][1] - psi[0][1]) / 1e6 / (psi[-1][0] - psi[0][0]))
    cpus = [s.get("num_cpus") for _, s in inside if s.get("num_cpus")]
    return {
        "cpu_busy_pct": _pick(busy_pct, ("mean", "p90"), 1),
        "psi_cpu_some_share": _r(psi_share),
        "num_samples": len(inside),
        "num_cpus": cpus[-1] if cpus else None,
    }


# -- the verdict -------------------------------------------------------------------------------


def lateness_per_s(
    steps: Sequence[Sequence[float]], start: float, *, bin_s: float = LATENESS_BIN_S
) -> list[list[float]]:
    """[t, max relative lateness, number of steps] per `bin_s` of the window (t: the bin's
    middle, seconds from `start`), from [at, planned_ms, actual_ms, late_ms] rows of every
    timeline; bins without a step are left out."""
    bins: dict[int, list[float]] = {}
    for r in steps:
        if r[1] <= 0:
            continue
        bins.setdefault(int((r[0] - start) // bin_s), []).append(r[3] / r[1])
    return [
        [round((k + 0.5) * bin_s, 3), round(max(v), 4), len(v)] for k, v in sorted(bins.items())
    ]


def assess(
    health_by_process: Mapping[str, Any],
    host_samples: Sequence[Mapping[str, Any]],
    *,
    window: tuple[float, float],
    thresholds: Thresholds = Thresholds(),
    storage_mbit: Mapping[str, float] | None = None,
    paused: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> dict[str, Any]:
    """summary.json `emulation_health` from the driver's `health` ({node or process name:
    [snapshots]}) and the runner's host samples, over `window` (the driver's started_at,
    finished_at; samples outside it are ignored). `storage_mbit`: each engine node's shaped
    storage-NIC rate (none on the local backend), which bounds its data plane's loop lag.
    `paused`: per node, wall-clock intervals in which a chaos step had stopped or killed it:
    what its processes measured then is the fault injected, not the host, and is left out.

    Verdict: "host-bound" when any measure is above its threshold (every such measure is a
    reason), else "unknown" when no timeline reported a step in the window (lateness, the
    figure that matters most, was not measured), else "healthy"."""
    start, end = window
    processes, not_reported, all_steps = _collect(
        health_by_process, start, end, thresholds, paused or {}
    )
    reasons = _reasons(processes, thresholds, storage_mbit or {})
    timelines = {k: e for k, e in processes.items() if _is_timeline(e)}
    measured = {k: e for k, e in timelines.items() if e["steps"]["num_steps"]}
    verdict: Verdict = HOST_BOUND if reasons else (HEALTHY if measured else UNKNOWN)
    if verdict == UNKNOWN:
        reasons.append(
            "no timeline process reported an emulated GPU step in the measured window: "
            "step lateness was not measured"
        )
    return {
        "verdict": verdict,
        "reasons": reasons,
        "thresholds": asdict(thresholds),
        "window": {
            "started_at": start,
            "finished_at": end,
            "duration_s": round(end - start, 3),
        },
        "worst": _worst(timelines, measured),
        "host": host_health(host_samples, start, end),
        "processes": processes,
        "not_reported": not_reported,
        "lateness_per_s": lateness_per_s(all_steps, start),
    }


def _collect(
    health_by_process: Mapping[str, Any],
    start: float,
    end: float,
    thresholds: Thresholds,
    paused: Mapping[str, Sequence[tuple[float, float]]],
) -> tuple[dict[str, dict[str, Any]], list[str], list[list[float]]]:
    """Every snapshot's entry (keyed process[/part][@pid]), the processes that reported
    nothing, and the timelines' step rows in the window outside their node's pauses."""
    processes: dict[str, dict[str, Any]] = {}
    not_reported = []
    all_steps: list[list[float]] = []
    for name, value in sorted(health_by_process.items()):
        snaps = _snapshots(value)
        if not snaps:
            not_reported.append(str(name))
        for snap in snaps:
            node_paused = paused.get(str(snap.get("process", name)), ())
            entry = _process_entry(
                {"process": name, **snap},
                start,
                end,
                thresholds.timer_allowance_ms,
                thresholds.timeline_lateness_p99,
                node_paused,
            )
            processes[_entry_key(entry, processes)] = entry
            if _is_timeline(entry):
                all_steps += _outside(
                    _rows(snap.get("steps"), 4, start, end),
                    node_paused,
                    lambda r: (r[0], r[0] + r[2] / 1e3),
                )
    return processes, not_reported, all_steps


def _entry_key(entry: Mapping[str, Any], taken: Mapping[str, Any]) -> str:
    """process, process/part when the part is not the whole process, and @pid for a
    restarted process (a key already `taken`)."""
    key = str(entry["process"])
    if entry["part"] and entry["part"] != key:
        key = f"{key}/{entry['part']}"
    if key in taken:  # a restarted process: tell the two apart by pid
        key = f"{key}@{entry['pid']}"
    return key


def _reasons(
    processes: Mapping[str, Mapping[str, Any]],
    thresholds: Thresholds,
    storage_mbit: Mapping[str, float],
) -> list[str]:
    """Every measure above its threshold, each process judged against its storage NIC rate."""
    fastest = max(storage_mbit.values(), default=None)

    def rate(entry: Mapping[str, Any]) -> float | None:
        # a storage server serves every engine node: the fastest storage NIC is its bound
        return fastest if entry["part"] == "storage" else storage_mbit.get(entry["process"])

    return [
        r for key, entry in processes.items() for r in _judge(key, entry, thresholds, rate(entry))
    ]


def _worst(
    timelines: Mapping[str, Mapping[str, Any]], measured: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The timeline process with the highest p99 relative lateness, and the highest loop lag."""
    worst: dict[str, Any] = {"process": None, "rel_late_p99": None, "loop_lag_p99_ms": None}
    ranked = [(e["steps"]["rel_late"]["p99"], k) for k, e in measured.items()]
    ranked = [(v, k) for v, k in ranked if v is not None]
    if ranked:
        worst["rel_late_p99"], worst["process"] = max(ranked)
    lags = [e["loop_lag_ms"]["p99"] for e in timelines.values()]
    lags = [v for v in lags if v is not None]
    worst["loop_lag_p99_ms"] = max(lags) if lags else None
    return worst


def verdict_of(summary: Mapping[str, Any]) -> Verdict:
    """A summary's verdict; "unknown" for a summary written before emulation health."""
    eh = summary.get("emulation_health")
    v = eh.get("verdict") if isinstance(eh, Mapping) else None
    if v == HEALTHY:
        return HEALTHY
    return HOST_BOUND if v == HOST_BOUND else UNKNOWN

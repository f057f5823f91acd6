"""Per-class and queue figures from the kernel counters a run sampled: the time-series columns
(class throughput, backlog, drops per interval) and the summary's `kernel_counters` section.

Samples are the runner's (`{"t": ..., "nodes": {node: {nic: asdict(NicCounters)}}}`); nothing
here reads the kernel or a file. Pure, no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from lab.results.metrics import Sample

DIRECTIONS = ("egress", "ingress")
NIC_TOTALS = ("bytes", "packets", "drops", "overlimits")
"""Cumulative NicCounters fields (per direction) whose growth over a window is reported."""
CLASS_TOTALS = ("bytes", "packets", "drops", "overlimits")


def _nics(s: Sample) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for node, nics in s["nodes"].items():
        for nic, c in nics.items():
            yield node, nic, c


def queue_series(samples: Sequence[Sample], start: float) -> list[dict[str, Any]]:
    """One row per interval between samples (`t` relative to `start`, as throughput_series):
    per node/NIC/direction the backlog at the interval's end (`.._backlog_bytes`) and the drops
    in it (`.._drops`); per priority class the same plus its throughput (`<dir>/<class>_mbit`)."""
    rows: list[dict[str, Any]] = []
    intervals = ((a, b, b["t"] - a["t"]) for a, b in itertools.pairwise(samples))
    for prev, cur, dt in (i for i in intervals if i[2] > 0):
        row: dict[str, Any] = {"t": round(cur["t"] - start, 3)}
        for node, nic, c in _nics(cur):
            p = prev["nodes"].get(node, {}).get(nic)
            if p is None:
                continue
            for d in DIRECTIONS:
                key = f"{node}/{nic}/{d}"
                row[f"{key}_backlog_bytes"] = int(c.get(f"{d}_backlog_bytes", 0))
                row[f"{key}_drops"] = int(c.get(f"{d}_drops", 0)) - int(p.get(f"{d}_drops", 0))
                before = p.get(f"{d}_classes") or {}
                for name, cc in (c.get(f"{d}_classes") or {}).items():
                    pc = before.get(name)
                    if pc is None:
                        continue
                    ck = f"{key}/{name}"
                    row[f"{ck}_mbit"] = round((cc["bytes"] - pc["bytes"]) * 8 / dt / 1e6, 3)
                    row[f"{ck}_backlog_bytes"] = int(cc.get("backlog_bytes", 0))
                    row[f"{ck}_drops"] = int(cc["drops"]) - int(pc["drops"])
        rows.append(row)
    return rows


def merge_rows(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two series cut at the same sample times, joined column-wise (rows matched by `t`)."""
    by_t = {row["t"]: row for row in b}
    return [{**row, **by_t.get(row["t"], {})} for row in a]


def _window(samples: Sequence[Sample], start: float, end: float) -> list[Sample]:
    """The samples covering [start, end]: from the last one at or before `start` to the first
    one at or after `end` (the nearest ones inside when the samples begin late or end early)."""
    ordered = sorted(samples, key=lambda s: float(s["t"]))
    times = [float(s["t"]) for s in ordered]
    first = max((i for i, t in enumerate(times) if t <= start), default=0)
    last = min((i for i, t in enumerate(times) if t >= end), default=len(ordered) - 1)
    return ordered[first : last + 1]


def _growth(first: dict[str, Any], last: dict[str, Any], key: str) -> int:
    return int(last.get(key, 0)) - int(first.get(key, 0))


def counter_summary(samples: Sequence[Sample], start: float, end: float) -> dict[str, Any]:
    """Per node, NIC and direction over the measured window: bytes, packets, drops and
    overlimits the kernel counted, and the backlog (bytes) the samples saw, max and mean; the
    same per priority class. NICs missing from the first or last sample are left out."""
    window = _window(samples, start, end)
    if len(window) < 2:
        return {}
    first = window[0]["nodes"]
    out: dict[str, Any] = {}
    for node, nic, c in _nics(window[-1]):
        f = first.get(node, {}).get(nic)
        if f is None:
            continue
        entry: dict[str, Any] = {}
        for d in DIRECTIONS:
            seen = [
                int(s["nodes"][node][nic].get(f"{d}_backlog_bytes", 0))
                for s in window
                if nic in s["nodes"].get(node, {})
            ]
            de: dict[str, Any] = {k: _growth(f, c, f"{d}_{k}") for k in NIC_TOTALS}
            de["backlog_bytes_max"] = max(seen)
            de["backlog_bytes_mean"] = round(sum(seen) / len(seen))
            classes: dict[str, Any] = {}
            for name, cc in (c.get(f"{d}_classes") or {}).items():
                fc = (f.get(f"{d}_classes") or {}).get(name)
                if fc is None:
                    continue
                cseen = [
                    int(s["nodes"][node][nic][f"{d}_classes"][name].get("backlog_bytes", 0))
                    for s in window
                    if name in (s["nodes"].get(node, {}).get(nic, {}).get(f"{d}_classes") or {})
                ]
                ce: dict[str, Any] = {k: _growth(fc, cc, k) for k in CLASS_TOTALS}
                ce["backlog_bytes_max"] = max(cseen)
                classes[name] = ce
            if classes:
                de["classes"] = classes
            entry[d] = de
        out.setdefault(node, {})[nic] = entry
    return out

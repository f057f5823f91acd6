"""Human-facing output: the comparison table, the run summary lines and an SVG throughput plot.

Reads only summary/comparison dicts and time series; the SVG is written by hand so the lab
needs no plotting library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _snic_util(summary: dict[str, Any], node: str) -> float | None:
    nic = summary.get("nics", {}).get(node, {}).get("snic")
    return None if nic is None else nic.get("ingress_util")


def engine_nodes(summary: dict[str, Any]) -> list[str]:
    return sorted(n for n in summary.get("nics", {}) if n.startswith(("prefill", "decode")))


def _online_lines(s: dict[str, Any]) -> list[str]:
    arrival, slo = s.get("arrival", {}), s.get("slo", {})
    if arrival.get("mode") != "poisson" or slo.get("attained") is None:
        return []
    return [
        f"  online: {arrival['agents_per_s']:g} agents/s (real); "
        f"{100 * slo['attained']:.1f}% of turns within the SLO "
        f"(TTFT <= {slo['ttft_s']:g} s, TPOT <= {slo['tpot_ms']:g} ms, real-equivalent)"
    ]


def _ttft_lines(s: dict[str, Any]) -> list[str]:
    b = s.get("ttft_breakdown") or {}
    if not b.get("num_turns"):
        return []
    parts = "  ".join(
        f"{label} {_fmt(b[f'{key}_mean_s'], '.3f')} s ({100 * (b[f'{key}_share'] or 0):.0f}%)"
        for key, label in (("queue", "queued"), ("load", "KV load"), ("prefill", "prefill"))
    )
    return [f"  TTFT mean = {parts}"]


VERDICT_WORDS = {"healthy": "healthy", "host-bound": "HOST-BOUND", "unknown": "unknown"}
MAX_REASONS_SHOWN = 4


def health_lines(s: dict[str, Any]) -> list[str]:
    """One line with the emulation-health verdict, the worst timeline's step lateness p99 and
    the host's CPU use and pressure; a second with the reasons unless the run was healthy."""
    eh = s.get("emulation_health")
    if not isinstance(eh, dict):
        return []
    verdict = str(eh.get("verdict", "unknown"))
    head = VERDICT_WORDS.get(verdict, verdict)
    if s.get("allowed_host_bound"):
        head += " (accepted: --allow-host-bound)"
    parts = []
    worst = eh.get("worst") or {}
    if worst.get("rel_late_p99") is not None:
        parts.append(
            f"worst step lateness p99 {100 * worst['rel_late_p99']:.1f}% of the step "
            f"({str(worst['process']).replace('/', ' ')})"
        )
    host = eh.get("host") or {}
    busy = host.get("cpu_busy_pct") or {}
    if busy.get("mean") is not None:
        cpus = f" of {host['num_cpus']} CPUs" if host.get("num_cpus") else ""
        parts.append(f"host CPU {busy['mean']:.0f}% busy{cpus} (p90 {_fmt(busy['p90'], '.0f')}%)")
    if host.get("psi_cpu_some_share") is not None:
        parts.append(f"CPU pressure {100 * host['psi_cpu_some_share']:.0f}% of the time")
    lines = [f"  emulation: {head}" + (f"; {', '.join(parts)}" if parts else "")]
    reasons = [str(r) for r in eh.get("reasons") or ()]
    if verdict != "healthy" and reasons:
        more = len(reasons) - MAX_REASONS_SHOWN
        shown = "; ".join(reasons[:MAX_REASONS_SHOWN]) + (f"; {more} more" if more > 0 else "")
        lines.append(f"    {shown}")
    return lines


def _scaling_lines(s: dict[str, Any]) -> list[str]:
    sc = s.get("scaling")
    if not sc:
        return []
    how = f"auto ({', '.join(sc['auto'])})" if sc.get("auto") else "from the config"
    return [
        f"  scaling k {sc['bandwidth_scale']:g}, tau {sc['time_dilation']:g}: {how}",
    ]


def _fault_lines(s: dict[str, Any]) -> list[str]:
    """What the injected faults cost: bytes on pairs with a killed or restarted end, and the
    errors nodes recorded about lost peers."""
    ledger = s.get("byte_ledger") or {}
    lines = []
    if ledger.get("restarted"):
        lines.append(
            f"  restarted: {', '.join(ledger['restarted'])}; "
            f"{ledger['bytes_lost_to_faults']:,} bytes lost in flight or unreported on "
            f"{len(ledger['fault_pairs'])} pairs with a restarted end; every other pair balances"
            if ledger.get("balanced")
            else f"  restarted: {', '.join(ledger['restarted'])}"
        )
    if not ledger.get("balanced", True):
        bad = [*ledger.get("mismatched", []), *ledger.get("unmatched", [])]
        lines.append(f"  pairs that do not balance ({len(bad)}): {bad[0] if bad else ''}")
    rec = s.get("recovery")
    if rec:
        gaps = "  ".join(
            f"{n} {g:g} s" for n, g in rec["longest_read_gap_s"].items() if g is not None
        )
        lines.append(
            f"  after the first fault: longest read gap {gaps or '-'}; longest time without a "
            f"finished turn {_fmt(rec['longest_gap_between_turns_done_s'], 'g')} s"
        )
    faults = s.get("fault_errors") or {}
    if faults.get("count"):
        lines.append(f"  lost-peer errors caused by the faults: {faults['count']}")
    return lines


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [
        f"policy {s['policy']} on {s['backend']}: {s['turns_done']} turns done, "
        f"{s['turns_failed']} failed",
        f"  JCT {s['jct_s']:.2f} s (real-equivalent {s['real_jct_s']:.3f} s), "
        f"{s['throughput_tokens_per_s'] / 1000:.1f}k tokens/s",
        *_scaling_lines(s),
        f"  TTFT p50 {_fmt(s['ttft_s']['p50'], '.3f')} s  p99 {_fmt(s['ttft_s']['p99'], '.3f')} s"
        f"   TTST p50 {_fmt(s['ttst_s']['p50'], '.3f')} s"
        f"   TPOT p50 {_fmt(s['tpot_ms']['p50'], '.1f')} ms",
        *_ttft_lines(s),
        *_online_lines(s),
        f"  KV bytes: {s['bytes_storage_read']:,} read from storage + {s['bytes_relayed']:,} "
        f"relayed; {s['bytes_verified']:,} verified "
        f"({'all accounted' if s['bytes_accounted'] else 'MISMATCH'})",
        *_fault_lines(s),
    ]
    lines += [*_balance_lines(s), *_nic_lines(s), *health_lines(s)]
    if s["errors"]:
        lines.append(f"  errors ({len(s['errors'])}): {s['errors'][0]}")
    return lines


def _balance_lines(s: dict[str, Any]) -> list[str]:
    """The storage-NIC read balance and the prefill attention balance, when measured."""
    lines = []
    bal = s.get("snic_balance", {})
    if bal.get("whole_run") is not None:
        lines.append(
            f"  snic read balance (max/avg over {bal['num_nodes']} engine nodes): "
            f"{bal['whole_run']:.2f} over the run, {_fmt(bal['mean_interval'])} per interval"
        )
        if bal.get("mean_window") is not None:
            lines.append(
                f"    busy part ({_fmt(bal['busy_s'], '.1f')} s to "
                f"{100 * bal['busy_fraction']:.0f}% of the reads): "
                f"{_fmt(bal['mean_window'])} mean over {bal['num_windows']} windows of "
                f"{bal['window_s']:g} s (worst {_fmt(bal['max_window'])}), "
                f"{_fmt(bal['busy'])} over the busy part"
            )
    att = s.get("attention_balance", {})
    if att.get("mean") is not None:
        lines.append(
            f"  prefill attention max/avg across GPUs per step: early "
            f"{_fmt(att['early_all_busy_mean'])} (all GPUs busy; median "
            f"{_fmt(att.get('early_all_busy_p50'))}) / {_fmt(att['early_mean'])} "
            f"(all steps), whole run {_fmt(att['all_busy_mean'])} / {_fmt(att['mean'])}"
        )
    return lines


def _nic_lines(s: dict[str, Any]) -> list[str]:
    """Each engine node's shaped NICs' utilisation, in and out."""
    lines = []
    for node in engine_nodes(s):
        nics = s["nics"][node]
        parts = []
        for nic in ("snic", "cnic"):
            n = nics.get(nic)
            if n and n.get("rate_mbit"):
                parts.append(
                    f"{nic} in {100 * (n['ingress_util'] or 0):5.1f}% "
                    f"out {100 * (n['egress_util'] or 0):5.1f}% of {n['rate_mbit']:g} Mbit/s"
                )
        if parts:
            lines.append(f"  {node:10s} " + "   ".join(parts))
    return lines


def comparison_table(cmp: dict[str, Any]) -> str:
    runs = cmp["runs"]
    nodes = engine_nodes(runs["basic"])
    head = ["policy", "JCT s", "speedup", "tok/s", "TTFT p50 s", "TPOT p50 ms"]
    head += [f"{n} snic" for n in nodes]
    head += ["verified", "errors", "emulation"]
    rows = [head]
    base = runs["basic"]["jct_s"]
    for policy in [p for p in ("basic", "dualpath", "oracle") if p in runs]:
        s = runs[policy]
        row = [
            policy,
            f"{s['jct_s']:.2f}",
            f"{base / s['jct_s']:.2f}x",
            f"{s['throughput_tokens_per_s']:.0f}",
            _fmt(s["ttft_s"]["p50"], ".3f"),
            _fmt(s["tpot_ms"]["p50"], ".1f"),
        ]
        for n in nodes:
            u = _snic_util(s, n)
            row.append("-" if u is None else f"{100 * u:.0f}%")
        row.append("ok" if s["bytes_accounted"] else "MISMATCH")
        row.append(str(len(s["errors"])))
        verdict = (s.get("emulation_health") or {}).get("verdict", "unknown")
        accepted = " (accepted)" if s.get("allowed_host_bound") else ""
        row.append(VERDICT_WORDS.get(verdict, str(verdict)) + accepted)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = []
    for i, r in enumerate(rows):
        out.append(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    names = {
        "dualpath_over_basic": "DualPath over Basic",
        "oracle_over_basic": "Oracle over Basic",
        "oracle_over_dualpath": "Oracle over DualPath",
    }
    out.append("")
    out.append("   ".join(f"{names[k]}: {v:.2f}x" for k, v in cmp["speedup"].items() if k in names))
    return "\n".join(out)


def _engine_keys(
    series: Sequence[dict[str, Any]], suffix: str, parts: int, *, floor: float = 0.5
) -> list[str]:
    """Columns of the engine nodes' cnic/snic ending in `suffix` with `parts` path segments
    (`node/nic/direction_x`: 3, `node/nic/direction/class_x`: 4) that ever exceed `floor`."""
    keys = sorted(
        {
            k
            for row in series
            for k in row
            if k.endswith(suffix)
            and k.count("/") == parts - 1
            and k.startswith(("prefill", "decode"))
            and "/mgmt/" not in k
        }
    )
    return [k for k in keys if max(float(r.get(k, 0.0)) for r in series) > floor]


# Plot geometry: width, left/right margins (the legend sits right), top margin, panel height.
W, ML, MR, MT, PANEL_H, AXIS_H = 900, 60, 230, 30, 350, 40
BACKLOG_H = 150


def _panel(
    series: Sequence[dict[str, Any]],
    keys: Sequence[str],
    *,
    top: float,
    height: float,
    tmax: float,
    scale: float,
    unit: str,
    label: Callable[[str], str],
    bold: Callable[[str], bool] = lambda k: False,
    dashed: Callable[[str], bool] = lambda k: False,
) -> list[str]:
    """One line chart: axes, grid, a polyline per key (values divided by `scale`), legend."""
    bottom = top + height
    ymax = max((float(r.get(k, 0.0)) / scale for r in series for k in keys), default=1.0) or 1.0
    ymax *= 1.1

    def x(t: float) -> float:
        return ML + (W - ML - MR) * max(t, 0.0) / tmax

    def y(v: float) -> float:
        return bottom - height * v / ymax

    parts = [
        f'<line x1="{ML}" y1="{bottom}" x2="{W - MR}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{ML}" y1="{top}" x2="{ML}" y2="{bottom}" stroke="black"/>',
        f'<text x="{ML - 45}" y="{top - 6}">{escape(unit)}</text>',
    ]
    for i in range(6):
        v = ymax * i / 5
        parts.append(f'<text x="{ML - 5}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        parts.append(
            f'<line x1="{ML}" y1="{y(v):.1f}" x2="{W - MR}" y2="{y(v):.1f}" stroke="#eee"/>'
        )
        t = tmax * i / 5
        parts.append(f'<text x="{x(t):.1f}" y="{bottom + 15}" text-anchor="middle">{t:.0f}s</text>')
    for i, k in enumerate(keys):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(
            f"{x(float(r['t'])):.1f},{y(float(r.get(k, 0.0)) / scale):.1f}" for r in series
        )
        width = 2.5 if bold(k) else 1.0
        dash = ' stroke-dasharray="8,4"' if dashed(k) else ""
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="{width}"{dash} points="{pts}"/>'
        )
        ly = top + 14 * i + 10
        parts.append(
            f'<line x1="{W - MR + 10}" y1="{ly}" x2="{W - MR + 30}" y2="{ly}" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{W - MR + 35}" y="{ly + 4}">{escape(label(k))}</text>')
    return parts


def _queues(series: Sequence[dict[str, Any]], parts: int) -> list[str] | None:
    """The queue columns worth a line, [] when every queue stayed empty, None when the series
    has no queue columns at all (the local backend samples no counters)."""
    if not _engine_keys(series, "_backlog_bytes", parts, floor=-1.0):
        return None
    return _engine_keys(series, "_backlog_bytes", parts, floor=500.0)


def _chart(
    series: Sequence[dict[str, Any]],
    *,
    heading: str,
    keys: Sequence[str],
    backlog: Sequence[str] | None,
    bold: Callable[[str], bool],
    events: Sequence[dict[str, Any]] = (),
    latency: Sequence[dict[str, Any]] = (),
    lateness: Sequence[dict[str, Any]] = (),
) -> str:
    """An SVG of Mbit/s columns over time and, unless `backlog` is None (no queue columns in
    the series), the queues of the `backlog` columns (kB) in a panel below on the same time
    axis; then, given `latency` rows (metrics.latency_series), the turns' TTFT; given
    `lateness` rows (`lateness_rows`), the emulated GPU steps' lateness; `events` as dashed
    lines through every panel."""
    tmax = max((float(r["t"]) for r in (*series, *latency, *lateness)), default=1.0) or 1.0
    h = MT + PANEL_H + AXIS_H + (BACKLOG_H + AXIS_H if backlog is not None else 0)
    lat_top = h
    h += BACKLOG_H + AXIS_H if latency else 0
    late_top = h
    h += BACKLOG_H + AXIS_H if lateness else 0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif"'
        ' font-size="11">',
        f'<rect width="{W}" height="{h}" fill="white"/>',
        f'<text x="{ML}" y="18" font-size="13">{escape(heading)}</text>',
    ]
    parts += _panel(
        series,
        keys,
        top=MT,
        height=PANEL_H - MT,
        tmax=tmax,
        scale=1.0,
        unit="Mbit/s",
        label=lambda k: k.replace("_mbit", ""),
        bold=bold,
    )
    if backlog is not None:
        parts += _panel(
            series,
            backlog,
            top=PANEL_H + AXIS_H,
            height=BACKLOG_H,
            tmax=tmax,
            scale=1000.0,
            unit="queue kB",
            label=lambda k: k.replace("_backlog_bytes", " queue"),
        )
        if not backlog:
            parts.append(
                f'<text x="{ML + 10}" y="{PANEL_H + AXIS_H + BACKLOG_H / 2}">every shaped queue '
                "stayed under 0.5 kB at the samples</text>"
            )
    if latency:
        parts += _panel(
            latency,
            ["ttft_p50_s", "ttft_max_s"],
            top=lat_top,
            height=BACKLOG_H,
            tmax=tmax,
            scale=0.001,
            unit="TTFT ms",
            label=lambda k: {"ttft_p50_s": "TTFT p50", "ttft_max_s": "TTFT max"}[k],
            bold=lambda k: k == "ttft_p50_s",
        )
    if lateness:
        late_keys = [k for k in ("late_pct", "threshold_pct") if any(k in r for r in lateness)]
        parts += _panel(
            lateness,
            late_keys,
            top=late_top,
            height=BACKLOG_H,
            tmax=tmax,
            scale=1.0,
            unit="late %",
            label=lambda k: {
                "late_pct": "step lateness (max/s)",
                "threshold_pct": "threshold (p99)",
            }[k],
            bold=lambda k: k == "late_pct",
            dashed=lambda k: k == "threshold_pct",
        )
    if lateness:
        bottom = late_top + BACKLOG_H
    elif latency:
        bottom = lat_top + BACKLOG_H
    elif backlog is not None:
        bottom = PANEL_H + AXIS_H + BACKLOG_H
    else:
        bottom = PANEL_H
    for n, ev in enumerate(events):
        ex = ML + (W - ML - MR) * max(float(ev.get("t", ev.get("at_s", 0.0))), 0.0) / tmax
        what = ev.get("action") or ", ".join(f"{k}={v}" for k, v in ev.get("changes", {}).items())
        label = f"{ev.get('node')}{'/' + ev['nic'] if ev.get('nic') else ''} {what}"
        color = "#c00" if "error" in ev else "#555"
        parts.append(
            f'<line x1="{ex:.1f}" y1="{MT}" x2="{ex:.1f}" y2="{bottom}" stroke="{color}" '
            'stroke-dasharray="4,3"/>'
        )
        ty = MT + 12 + 12 * (n % 6)  # staggered so close events stay readable
        parts.append(f'<text x="{ex + 3:.1f}" y="{ty}" fill="{color}">{escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_plot(
    series: Sequence[dict[str, Any]],
    path: Path,
    *,
    title: str,
    events: Sequence[dict[str, Any]] = (),
    latency: Sequence[dict[str, Any]] = (),
    lateness: Sequence[Sequence[float]] = (),
    lateness_threshold: float | None = None,
) -> None:
    """Per-NIC throughput (Mbit/s) of the engine nodes over time, as an SVG line chart, with
    chaos `events` (summary.json `chaos.events`) as labelled vertical lines on the same axis;
    below it, on the same time axis, the queue each shaped NIC direction holds (kB of HTB
    backlog, sampled) when the series has backlog columns, the turns' TTFT (p50 and max
    per window of first tokens) given `latency`, and the emulated GPU steps' relative
    lateness (the most late step of every timeline per second, emulation_health
    `lateness_per_s`) against `lateness_threshold` given `lateness`."""
    svg = _chart(
        series,
        heading=f"{title}: NIC throughput from qdisc counters (Mbit/s)",
        keys=_engine_keys(series, "_mbit", 3),
        backlog=_queues(series, 3),
        bold=lambda k: "/snic/ingress" in k,  # the storage reads are the story
        events=events,
        latency=latency,
        lateness=lateness_rows(lateness, lateness_threshold),
    )
    path.write_text(svg)


def lateness_rows(
    lateness: Sequence[Sequence[float]], threshold: float | None
) -> list[dict[str, Any]]:
    """emulation_health `lateness_per_s` ([t, max late/planned, steps]) as plot rows in %,
    with the threshold as a constant column (drawn as a dashed line)."""
    rows: list[dict[str, Any]] = []
    for r in lateness:
        row: dict[str, Any] = {"t": float(r[0]), "late_pct": 100 * float(r[1])}
        if threshold is not None:
            row["threshold_pct"] = 100 * threshold
        rows.append(row)
    return rows


def write_class_plot(series: Sequence[dict[str, Any]], path: Path, *, title: str) -> bool:
    """Throughput of each cnic priority class (collective, control, kv) per engine node and
    direction, and each class's queue below it, on one time axis. False (nothing written)
    when the series has no class columns (isolation off, or the local backend)."""
    keys = _engine_keys(series, "_mbit", 4)
    if not keys:
        return False
    svg = _chart(
        series,
        heading=f"{title}: cnic priority classes from HTB class counters (Mbit/s)",
        keys=keys,
        backlog=_queues(series, 4),
        bold=lambda k: k.endswith("/collective_mbit"),
    )
    path.write_text(svg)
    return True

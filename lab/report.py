"""Human-facing output: the comparison table, the run summary lines and an SVG throughput plot.

Reads only summary/comparison dicts and time series; the SVG is written by hand so the lab
needs no plotting library.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [
        f"policy {s['policy']} on {s['backend']}: {s['turns_done']} turns done, "
        f"{s['turns_failed']} failed",
        f"  JCT {s['jct_s']:.2f} s (real-equivalent {s['real_jct_s']:.3f} s), "
        f"{s['throughput_tokens_per_s'] / 1000:.1f}k tokens/s",
        f"  TTFT p50 {_fmt(s['ttft_s']['p50'], '.3f')} s  p99 {_fmt(s['ttft_s']['p99'], '.3f')} s"
        f"   TTST p50 {_fmt(s['ttst_s']['p50'], '.3f')} s"
        f"   TPOT p50 {_fmt(s['tpot_ms']['p50'], '.1f')} ms",
        f"  KV bytes: {s['bytes_storage_read']:,} read from storage + {s['bytes_relayed']:,} "
        f"relayed; {s['bytes_verified']:,} verified "
        f"({'all accounted' if s['bytes_accounted'] else 'MISMATCH'})",
    ]
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
    if s["errors"]:
        lines.append(f"  errors ({len(s['errors'])}): {s['errors'][0]}")
    return lines


def comparison_table(cmp: dict[str, Any]) -> str:
    runs = cmp["runs"]
    nodes = engine_nodes(runs["basic"])
    head = ["policy", "JCT s", "speedup", "tok/s", "TTFT p50 s", "TPOT p50 ms"]
    head += [f"{n} snic" for n in nodes]
    head += ["verified", "errors"]
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


def write_plot(
    series: Sequence[dict[str, Any]],
    path: Path,
    *,
    title: str,
    events: Sequence[dict[str, Any]] = (),
) -> None:
    """Per-NIC throughput (Mbit/s) of the engine nodes over time, as an SVG line chart, with
    chaos `events` (summary.json `chaos.events`) as labelled vertical lines on the same axis."""
    keys = sorted(
        {
            k
            for row in series
            for k in row
            if k != "t" and k.startswith(("prefill", "decode")) and "/mgmt/" not in k
        }
    )
    keys = [k for k in keys if max(float(r.get(k, 0.0)) for r in series) > 0.5]
    w, h, ml, mr, mt, mb = 900, 420, 60, 230, 30, 40
    tmax = max((float(r["t"]) for r in series), default=1.0) or 1.0
    ymax = max((float(r.get(k, 0.0)) for r in series for k in keys), default=1.0) or 1.0
    ymax *= 1.1

    def x(t: float) -> float:
        return ml + (w - ml - mr) * max(t, 0.0) / tmax

    def y(v: float) -> float:
        return h - mb - (h - mt - mb) * v / ymax

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif"'
        ' font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{ml}" y="18" font-size="13">{escape(title)}: NIC throughput from qdisc'
        " counters (Mbit/s)</text>",
        f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
        f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>',
    ]
    for i in range(6):
        v = ymax * i / 5
        parts.append(f'<text x="{ml - 5}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        parts.append(
            f'<line x1="{ml}" y1="{y(v):.1f}" x2="{w - mr}" y2="{y(v):.1f}" stroke="#eee"/>'
        )
        t = tmax * i / 5
        parts.append(f'<text x="{x(t):.1f}" y="{h - mb + 15}" text-anchor="middle">{t:.0f}s</text>')
    for i, k in enumerate(keys):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{x(float(r['t'])):.1f},{y(float(r.get(k, 0.0))):.1f}" for r in series)
        width = 2.5 if "/snic/ingress" in k else 1.0  # the storage reads are the story
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{pts}"/>'
        )
        ly = mt + 14 * i + 10
        parts.append(
            f'<line x1="{w - mr + 10}" y1="{ly}" x2="{w - mr + 30}" y2="{ly}" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        parts.append(
            f'<text x="{w - mr + 35}" y="{ly + 4}">{escape(k.replace("_mbit", ""))}</text>'
        )
    for n, ev in enumerate(events):
        ex = x(float(ev.get("t", ev.get("at_s", 0.0))))
        what = ev.get("action") or ", ".join(f"{k}={v}" for k, v in ev.get("changes", {}).items())
        label = f"{ev.get('node')}{'/' + ev['nic'] if ev.get('nic') else ''} {what}"
        color = "#c00" if "error" in ev else "#555"
        parts.append(
            f'<line x1="{ex:.1f}" y1="{mt}" x2="{ex:.1f}" y2="{h - mb}" stroke="{color}" '
            'stroke-dasharray="4,3"/>'
        )
        ty = mt + 12 + 12 * (n % 6)  # staggered so close events stay readable
        parts.append(f'<text x="{ex + 3:.1f}" y="{ty}" fill="{color}">{escape(label)}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))

"""The HTML report of a run or a comparison: one self-contained page (plotly, with plotly.js
inline, so it opens offline and fetches nothing).

Pure apart from `write_report`, which writes the one file it is given: the run directories
are read by the caller (lab.run.rundir) into `RunRecord`s.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from lab.results.metrics import turn_latencies
from lab.results.report import VERDICT_WORDS, engine_nodes, summary_lines

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
QUEUE_FLOOR_BYTES = 500.0
"""A queue column whose backlog never reaches this gets no line."""
MBIT_FLOOR = 0.5
"""A throughput column that never exceeds this gets no line."""


@dataclass(frozen=True)
class RunRecord:
    """One run as the report draws it: `summary` (summary.json), `series` (timeseries.json
    rows), `latency` (latency.json rows) and `turns` (the driver's per-turn timings)."""

    name: str
    summary: Mapping[str, Any]
    series: Sequence[Mapping[str, Any]] = ()
    latency: Sequence[Mapping[str, Any]] = ()
    turns: Sequence[Mapping[str, Any]] = ()
    source: str = ""


@dataclass
class _Page:
    """The page being built: sections of HTML; plotly.js goes with the first figure."""

    sections: list[str] = field(default_factory=list)
    has_js: bool = False

    def figure(self, fig: go.Figure) -> str:
        text = pio.to_html(
            fig,
            full_html=False,
            include_plotlyjs=not self.has_js,  # inline, once: nothing is fetched
            include_mathjax=False,
            config=PLOT_CONFIG,
        )
        self.has_js = True
        return str(text)

    def add(self, heading: str, body: str, note: str = "") -> None:
        para = f'<p class="note">{html.escape(note)}</p>' if note else ""
        self.sections.append(f"<section><h2>{html.escape(heading)}</h2>{para}{body}</section>")


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _verdict(s: Mapping[str, Any]) -> str:
    verdict = str((s.get("emulation_health") or {}).get("verdict", "unknown"))
    return VERDICT_WORDS.get(verdict, verdict) + (
        " (accepted)" if s.get("allowed_host_bound") else ""
    )


# --- the comparison table -------------------------------------------------------------------


def _comparison(runs: Sequence[RunRecord]) -> str:
    nodes = sorted({n for r in runs for n in engine_nodes(dict(r.summary))})
    base = next((r for r in runs if r.summary.get("policy") == "basic"), runs[0])
    several = len(runs) > 1
    head = ["run", "JCT s", *([f"speedup over {base.name}"] if several else [])]
    head += ["tok/s", "TTFT p50 s", "TTFT p99 s"]
    head += ["TPOT p50 ms", *[f"{n} snic in" for n in nodes], "turns done / failed"]
    head += ["bytes", "errors", "emulation"]
    rows = []
    for r in runs:
        s = r.summary
        jct = float(s["jct_s"])
        row = [
            r.name,
            f"{jct:.2f}",
            *([f"{float(base.summary['jct_s']) / jct:.2f}x" if jct else "-"] if several else []),
            f"{float(s['throughput_tokens_per_s']):.0f}",
            _fmt(s["ttft_s"]["p50"], ".3f"),
            _fmt(s["ttft_s"].get("p99"), ".3f"),
            _fmt(s["tpot_ms"]["p50"], ".1f"),
        ]
        for n in nodes:
            nic = (s.get("nics") or {}).get(n, {}).get("snic") or {}
            util = nic.get("ingress_util")
            row.append("-" if util is None else f"{100 * util:.0f}%")
        row.append(f"{s['turns_done']} / {s['turns_failed']}")
        row.append("verified" if s["bytes_accounted"] else "MISMATCH")
        row += [str(len(s["errors"])), _verdict(s)]
        rows.append(row)
    return _table(head, rows)


def _run_details(runs: Sequence[RunRecord]) -> str:
    out = []
    for r in runs:
        text = html.escape("\n".join(summary_lines(dict(r.summary))))
        src = f" ({html.escape(r.source)})" if r.source else ""
        out.append(f"<details><summary>{html.escape(r.name)}{src}</summary><pre>{text}</pre>")
        out.append("</details>")
    return "".join(out)


# --- the time axis --------------------------------------------------------------------------


def _engine_keys(
    series: Sequence[Mapping[str, Any]], suffix: str, parts: int, *, floor: float
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


def _has_queues(series: Sequence[Mapping[str, Any]]) -> bool:
    return bool(_engine_keys(series, "_backlog_bytes", 3, floor=-1.0))


def _line(
    fig: go.Figure,
    rows: Sequence[Mapping[str, Any]],
    key: str,
    *,
    row: int,
    name: str,
    color: str,
    scale: float = 1.0,
    width: float = 1.5,
    dash: str = "solid",
    group: str = "",
) -> None:
    fig.add_trace(
        go.Scatter(
            x=[float(r["t"]) for r in rows],
            y=[float(r.get(key, 0.0)) / scale for r in rows],
            name=name,
            mode="lines",
            line={"color": color, "width": width, "dash": dash},
            legendgroup=group or name,
            legendgrouptitle_text=group or None,
            hovertemplate="%{y:.3g} at %{x:.1f} s<extra>" + html.escape(name) + "</extra>",
        ),
        row=row,
        col=1,
    )


def _event_label(ev: Mapping[str, Any]) -> str:
    what = ev.get("action") or ", ".join(f"{k}={v}" for k, v in (ev.get("changes") or {}).items())
    where = f"{ev.get('node')}{'/' + str(ev['nic']) if ev.get('nic') else ''}"
    return f"{where} {what}" + (f" (failed: {ev['error']})" if ev.get("error") else "")


def _events(s: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Chaos steps and changes made by hand, in time order."""
    evs = [*(s.get("chaos") or {}).get("events", []), *(s.get("control") or {}).get("events", [])]
    return sorted(evs, key=lambda e: float(e.get("t", e.get("at_s", 0.0))))


def _nic_colors(runs: Sequence[RunRecord]) -> dict[str, str]:
    """One colour per engine NIC direction (`node/nic/direction`), the same in every panel and
    every run of the page."""
    bases = sorted(
        {k.rsplit("_", 1)[0] for r in runs for k in _engine_keys(r.series, "_mbit", 3, floor=-1.0)}
    )
    return {b: _color(i) for i, b in enumerate(bases)}


def _timeline(r: RunRecord, tmax: float, colors: Mapping[str, str]) -> tuple[go.Figure, list[str]]:
    """Per-NIC throughput, queues, TTFT over time and the emulated steps' lateness on one time
    axis, chaos events as dashed lines through every panel; the notes on what is missing."""
    s, series = r.summary, r.series
    thr = _engine_keys(series, "_mbit", 3, floor=MBIT_FLOOR)
    queues = _engine_keys(series, "_backlog_bytes", 3, floor=QUEUE_FLOOR_BYTES)
    eh = s.get("emulation_health") or {}
    lateness = [
        {"t": float(x[0]), "late": 100 * float(x[1])} for x in eh.get("lateness_per_s") or ()
    ]
    panels: list[tuple[str, str]] = []  # (kind, y-axis title)
    notes = []
    if not series:
        notes.append(
            "No kernel counters were sampled (the local backend shapes nothing): no NIC panels."
        )
    elif thr:
        panels.append(("thr", "NIC throughput, Mbit/s"))
    else:
        notes.append("No engine NIC carried more than 0.5 Mbit/s (oracle skips all KV I/O).")
    if queues:
        panels.append(("queue", "queued, kB"))
    elif _has_queues(series):
        notes.append("Every shaped queue stayed under 0.5 kB at the samples.")
    if r.latency:
        panels.append(("lat", "TTFT, s"))
    if lateness:
        panels.append(("late", "step lateness, %"))
    if not panels:
        return go.Figure(), [*notes, "nothing was recorded over time"]
    heights = {"thr": 2.0, "queue": 1.0, "lat": 1.0, "late": 1.0}
    weights = [heights[k] for k, _ in panels]
    fig = make_subplots(
        rows=len(panels),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        row_heights=[w / sum(weights) for w in weights],
    )
    for i, (kind, title) in enumerate(panels, start=1):
        fig.update_yaxes(title_text=title, row=i, col=1, rangemode="tozero")
        if kind == "thr":
            for k in thr:
                bold = "/snic/ingress" in k  # the storage reads are the story
                _line(
                    fig,
                    series,
                    k,
                    row=i,
                    name=k.removesuffix("_mbit"),
                    color=colors.get(k.removesuffix("_mbit"), "#333"),
                    width=2.5 if bold else 1.2,
                    group="Mbit/s",
                )
        elif kind == "queue":
            for k in queues:
                _line(
                    fig,
                    series,
                    k,
                    row=i,
                    name=k.removesuffix("_backlog_bytes") + " queue",
                    color=colors.get(k.removesuffix("_backlog_bytes"), "#333"),
                    scale=1000.0,
                    group="queue kB",
                )
        elif kind == "lat":
            for key, name, width in (
                ("ttft_p50_s", "TTFT p50", 2.5),
                ("ttft_max_s", "TTFT max", 1),
            ):
                _line(
                    fig, r.latency, key, row=i, name=name, color="#333", width=width, group="TTFT"
                )
        else:
            _line(
                fig,
                lateness,
                "late",
                row=i,
                name="worst step lateness",
                color="#000",
                group="emulated GPUs",
            )
            threshold = (eh.get("thresholds") or {}).get("timeline_lateness_p99")
            if threshold is not None:
                fig.add_hline(
                    y=100 * float(threshold),
                    line={"dash": "dash", "color": "#c00", "width": 1},
                    annotation_text="host-bound threshold (p99)",
                    annotation_font_size=10,
                    row=i,
                    col=1,
                )
    for n, ev in enumerate(_events(s)):
        x = float(ev.get("t", ev.get("at_s", 0.0)))
        color = "#c00" if ev.get("error") else "#555"
        fig.add_vline(x=x, line={"dash": "dot", "color": color, "width": 1})
        fig.add_annotation(
            x=x,
            y=1.0 - 0.045 * (n % 5),  # staggered so close events stay readable
            xref="x",
            yref="paper",
            text=html.escape(_event_label(ev)),
            showarrow=False,
            xanchor="right" if x > 0.75 * tmax else "left",  # clear of the legend
            font={"size": 10, "color": color},
            bgcolor="rgba(255,255,255,0.7)",
        )
    fig.update_xaxes(range=[0, tmax])
    fig.update_xaxes(title_text="seconds since the driver started (lab clock)", row=len(panels))
    fig.update_layout(
        height=250 + 170 * sum(weights),
        margin={"l": 70, "r": 20, "t": 30, "b": 50},
        legend={"groupclick": "toggleitem", "font": {"size": 10}},
        hovermode="x unified",
        template="plotly_white",
    )
    return fig, notes


def _classes(r: RunRecord, tmax: float) -> go.Figure | None:
    """Each cnic priority class's throughput (collective, control, kv) per node and direction,
    when the series has class columns (isolation on, shaped backends)."""
    keys = _engine_keys(r.series, "_mbit", 4, floor=MBIT_FLOOR)
    if not keys:
        return None
    fig = make_subplots(rows=1, cols=1)
    for j, k in enumerate(keys):
        _line(
            fig,
            r.series,
            k,
            row=1,
            name=k.removesuffix("_mbit"),
            color=_color(j),
            width=2.5 if k.endswith("/collective_mbit") else 1.2,
        )
    fig.update_xaxes(range=[0, tmax], title_text="seconds since the driver started")
    fig.update_yaxes(title_text="Mbit/s", rangemode="tozero")
    fig.update_layout(height=300, template="plotly_white", margin={"t": 20, "b": 50})
    return fig


# --- distributions and balances -------------------------------------------------------------


def cdf_figure(runs: Sequence[RunRecord]) -> go.Figure | None:
    with_turns = [r for r in runs if r.turns]
    if not with_turns:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT", "TPOT"), horizontal_spacing=0.1)
    for i, r in enumerate(with_turns):
        finished = [t for t in r.turns if t.get("error") is None and t.get("done_at") is not None]
        for col, values in enumerate(turn_latencies(finished), start=1):
            xs = sorted(values)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[(k + 1) / len(xs) for k in range(len(xs))],
                    mode="lines",
                    line={"shape": "hv", "color": _color(i), "width": 2},
                    name=r.name,
                    legendgroup=r.name,
                    showlegend=col == 1,
                    hovertemplate="%{x:.3g}: %{y:.0%} of turns<extra>"
                    + html.escape(r.name)
                    + "</extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="TTFT, s (lab clock)", row=1, col=1)
    fig.update_xaxes(title_text="TPOT, ms (lab clock)", row=1, col=2)
    fig.update_yaxes(title_text="share of turns", tickformat=".0%", range=[0, 1.02])
    fig.update_layout(height=380, template="plotly_white", margin={"t": 40, "b": 50})
    return fig


BREAKDOWN = (("queue", "queued"), ("load", "KV load"), ("prefill", "prefill"))


def _breakdown(runs: Sequence[RunRecord]) -> go.Figure | None:
    measured = [r for r in runs if (r.summary.get("ttft_breakdown") or {}).get("num_turns")]
    if not measured:
        return None
    fig = go.Figure()
    for i, (key, label) in enumerate(BREAKDOWN):
        values = [r.summary["ttft_breakdown"].get(f"{key}_mean_s") or 0.0 for r in measured]
        shares = [r.summary["ttft_breakdown"].get(f"{key}_share") or 0.0 for r in measured]
        fig.add_trace(
            go.Bar(
                y=[r.name for r in measured],
                x=values,
                orientation="h",
                name=label,
                marker_color=_color(i),
                text=[f"{v:.3f} s ({100 * sh:.0f}%)" for v, sh in zip(values, shares, strict=True)],
                textposition="inside",
                textangle=0,
            )
        )
    fig.update_layout(
        uniformtext={"minsize": 10, "mode": "hide"},  # no label squeezed into a thin bar
        barmode="stack",
        height=140 + 60 * len(measured),
        template="plotly_white",
        xaxis_title="mean TTFT, s (lab clock)",
        margin={"t": 20, "b": 50},
    )
    return fig


BALANCES = (
    ("snic_balance", "whole_run", "snic reads, whole run"),
    ("snic_balance", "mean_interval", "snic reads, per interval"),
    ("snic_balance", "mean_window", "snic reads, busy windows"),
    ("attention_balance", "early_all_busy_mean", "attention, early (all GPUs busy)"),
    ("attention_balance", "all_busy_mean", "attention, whole run (all GPUs busy)"),
)


def _balance_value(s: Mapping[str, Any], section: str, key: str) -> Any:
    """A balance figure, none for the snic of a run that read nothing from storage."""
    if section == "snic_balance" and not s.get("bytes_storage_read"):
        return None
    return (s.get(section) or {}).get(key)


def _balance(runs: Sequence[RunRecord]) -> go.Figure | None:
    rows = [(sec, key, label) for sec, key, label in BALANCES if any(
        _balance_value(r.summary, sec, key) is not None for r in runs
    )]  # fmt: skip
    if not rows:
        return None
    fig = go.Figure()
    for i, r in enumerate(runs):
        values = [_balance_value(r.summary, sec, key) for sec, key, _ in rows]
        fig.add_trace(
            go.Bar(
                x=[label for _, _, label in rows],
                y=values,
                name=r.name,
                marker_color=_color(i),
                text=["no reads" if v is None else f"{v:.2f}" for v in values],
                textposition="outside",
            )
        )
    fig.add_hline(y=1.0, line={"dash": "dash", "color": "#555", "width": 1})
    fig.update_layout(
        barmode="group",
        height=380,
        template="plotly_white",
        yaxis_title="max / mean across nodes or GPUs (1 = even)",
        margin={"t": 20, "b": 50},
    )
    return fig


# --- tables: health, selftest, trace, events --------------------------------------------------


def _health(runs: Sequence[RunRecord]) -> str:
    head = ["run", "verdict", "worst step lateness p99", "host CPU busy", "CPU pressure"]
    head.append("reasons")
    rows = []
    for r in runs:
        eh = r.summary.get("emulation_health") or {}
        worst = eh.get("worst") or {}
        host = eh.get("host") or {}
        busy = host.get("cpu_busy_pct") or {}
        late = worst.get("rel_late_p99")
        rows.append(
            [
                r.name,
                _verdict(r.summary),
                "-" if late is None else f"{100 * late:.1f}% of the step ({worst.get('process')})",
                "-" if busy.get("mean") is None else f"{busy['mean']:.0f}% mean",
                "-"
                if host.get("psi_cpu_some_share") is None
                else f"{100 * host['psi_cpu_some_share']:.0f}% of the time",
                "; ".join(str(x) for x in eh.get("reasons") or ()) or "-",
            ]
        )
    return _table(head, rows)


def _selftest(runs: Sequence[RunRecord]) -> str:
    out = []
    for r in runs:
        st = r.summary.get("selftest")
        if not isinstance(st, Mapping):
            continue
        rows = [
            [
                f"{link.get('node')} {link.get('nic')} {link.get('direction')}",
                _fmt(link.get("expected_mbit"), ".1f"),
                _fmt(link.get("goodput_mbit"), ".1f"),
                f"{100 * float(link.get('error') or 0):+.1f}%",
                "yes" if link.get("within_tolerance") else "NO",
            ]
            for link in st.get("links") or ()
        ]
        verdict = "passed" if st.get("passed") else "FAILED"
        out.append(
            f"<h3>{html.escape(r.name)}: {verdict} "
            f"(tolerance {100 * float(st.get('tolerance') or 0):g}%)</h3>"
        )
        out.append(_table(["link", "expected Mbit/s", "measured Mbit/s", "error", "within"], rows))
    return "".join(out)


TRACE_FIELDS = (
    ("requests_replayed", "requests replayed", "d"),
    ("requests_done", "requests done", "d"),
    ("offline_prefix_hit_rate", "offline prefix-hit rate (trace blocks)", ".1%"),
    ("offline_model_prefix_hit_rate", "offline prefix-hit rate (model blocks)", ".1%"),
    ("prefix_hit_rate", "replayed prefix-hit rate (blocks served by storage)", ".1%"),
    ("assigned_hit_rate", "hit blocks the scheduler assigned", ".1%"),
    ("offline_prefix_hit_rate_per_request", "offline hit rate, mean per request", ".1%"),
    ("prefix_hit_rate_per_request", "replayed hit rate, mean per request", ".1%"),
)


def _trace(runs: Sequence[RunRecord]) -> str:
    traced = [r for r in runs if isinstance(r.summary.get("trace"), Mapping)]
    if not traced:
        return ""
    rows = [
        [label, *[_fmt(r.summary["trace"].get(key), spec) for r in traced]]
        for key, label, spec in TRACE_FIELDS
    ]
    first = traced[0].summary["trace"]
    caption = f"{first.get('file')} ({first.get('format')}, speed-up {first.get('speedup')})"
    return f"<p>{html.escape(caption)}</p>" + _table(["", *[r.name for r in traced]], rows)


def _event_table(runs: Sequence[RunRecord]) -> str:
    rows = [
        [r.name, f"{float(e.get('t', e.get('at_s', 0.0))):.1f}", _event_label(e)]
        for r in runs
        for e in _events(r.summary)
    ]
    return _table(["run", "at s", "event"], rows) if rows else ""


# --- the page ---------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1320px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
border-bottom: 1px solid #ddd; } h3 { font-size: 1em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f4f4f4; }
.note { color: #555; font-size: 0.9em; } pre { font-size: 0.85em; background: #f8f8f8;
padding: 0.6em; overflow-x: auto; }
"""


def _section(page: _Page, heading: str, make: Callable[[], go.Figure | None], note: str) -> None:
    fig = make()
    if fig is not None:
        page.add(heading, page.figure(fig), note)


def _timelines(page: _Page, runs: Sequence[RunRecord]) -> None:
    """Each run's time axis (and its cnic classes), all on the same range."""
    tmax = max(
        (float(row["t"]) for r in runs for row in (*r.series, *r.latency)),
        default=max(float(r.summary.get("jct_s") or 1.0) for r in runs),
    )
    colors = _nic_colors(runs)
    for r in runs:
        fig, notes = _timeline(r, tmax, colors)
        body = page.figure(fig) if fig.data else ""
        page.add(
            f"{r.name}: NICs, queues and latency over time",
            body,
            " ".join(
                [
                    "Bold lines: storage reads (snic ingress). Dotted verticals: chaos steps "
                    "and link changes (red: the step failed). Drag to zoom, double-click to "
                    "reset; click a legend entry to hide it.",
                    *notes,
                ]
            ),
        )
        classes = _classes(r, tmax)
        if classes is not None:
            page.add(
                f"{r.name}: cnic priority classes",
                page.figure(classes),
                "Throughput of each HTB class (collective, control, kv) of the compute NICs.",
            )


def render(runs: Sequence[RunRecord], *, title: str) -> str:
    """The whole page as HTML text."""
    if not runs:
        raise ValueError("a report needs at least one run")
    page = _Page()
    first = runs[0].summary
    scaling = first.get("scaling") or {}
    k, tau = (
        scaling.get("bandwidth_scale"),
        scaling.get("time_dilation", first.get("time_dilation")),
    )
    sub = (
        f"config {first.get('config')}, backend {first.get('backend')}, "
        f"{first.get('num_agents')} agents; bandwidth scale k {k}, time dilation tau {tau}: "
        "times are on the lab's clock (real-equivalent = lab / tau)"
    )
    base = next((r.name for r in runs if r.summary.get("policy") == "basic"), runs[0].name)
    page.add(
        "Runs" if len(runs) > 1 else "Run",
        _comparison(runs) + _run_details(runs),
        "snic in: the storage NIC's ingress bytes over the run divided by its rate."
        + (f" Speed-up: the JCT of {base} divided by each run's." if len(runs) > 1 else "")
        + " Unfold a run for its summary as the terminal printed it.",
    )
    if len(runs) == 1:  # one run: its time axis is the story
        _timelines(page, runs)
    _section(
        page,
        "TTFT and TPOT distributions",
        lambda: cdf_figure(runs),
        "Cumulative share of finished turns at or below each latency.",
    )
    _section(
        page,
        "TTFT breakdown",
        lambda: _breakdown(runs),
        "Mean time to first token split into waiting in the queue, loading KV and prefill.",
    )
    _section(
        page,
        "snic and attention balance",
        lambda: _balance(runs),
        "Storage-NIC reads across engine nodes and prefill attention across GPUs, max over "
        "mean: 1 is perfectly even.",
    )
    page.add(
        "Emulation health",
        _health(runs),
        "Did the host keep up? Host-bound figures describe this machine's CPU as much as the "
        "emulated system (docs/design.md, Emulation health).",
    )
    if len(runs) > 1:  # a comparison: the distributions first, then each run's time axis
        _timelines(page, runs)
    events = _event_table(runs)
    if events:
        page.add("Chaos steps and link changes", events)
    selftest = _selftest(runs)
    if selftest:
        page.add("Link fidelity (selftest)", selftest, "Goodput per shaped link against its rate.")
    trace = _trace(runs)
    if trace:
        page.add("Trace replay: prefix-hit rates", trace)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(sub)}</p>"
        + "".join(page.sections)
        + "</body></html>\n"
    )


def write_report(runs: Sequence[RunRecord], path: Path, *, title: str) -> Path:
    """Write the page of `runs` to `path` (the one file this module writes)."""
    path.write_text(render(runs, title=title), encoding="utf-8")
    return path

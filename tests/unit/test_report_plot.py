"""The throughput plot marks chaos events on the same time axis."""

from __future__ import annotations

from pathlib import Path

from lab.results.metrics import latency_series
from lab.results.report import write_plot


def test_chaos_events_are_drawn_and_labelled(tmp_path: Path) -> None:
    series = [{"t": float(t), "prefill-0/snic/ingress_mbit": 100.0 - 5 * t} for t in range(10)]
    events = [
        {"t": 2.0, "node": "prefill-0", "nic": "snic", "changes": {"rate_mbit": 25.0}},
        {"t": 6.0, "node": "decode-0", "action": "kill", "error": "refused"},
    ]
    out = tmp_path / "plot.svg"
    write_plot(series, out, title="t", events=events)
    svg = out.read_text()
    assert svg.count('stroke-dasharray="4,3"') == 2
    assert "prefill-0/snic rate_mbit=25.0" in svg and "decode-0 kill" in svg
    assert 'fill="#c00"' in svg  # a step that failed is drawn in red


def test_queues_are_drawn_under_the_throughput_on_the_same_time_axis(tmp_path: Path) -> None:
    series = [
        {
            "t": float(t),
            "prefill-0/cnic/ingress_mbit": 90.0,
            "prefill-0/cnic/ingress_backlog_bytes": 150_000 * (t % 3),
            "prefill-0/cnic/ingress/kv_mbit": 85.0,  # class columns stay off this plot
            "storage-0/snic/egress_backlog_bytes": 99_000,  # not an engine node
        }
        for t in range(10)
    ]
    out = tmp_path / "plot.svg"
    write_plot(series, out, title="t", events=[{"t": 3.0, "node": "decode-0", "action": "kill"}])
    svg = out.read_text()
    assert "queue kB" in svg and "prefill-0/cnic/ingress queue" in svg
    assert "storage-0" not in svg and "/kv" not in svg
    assert svg.count("<polyline") == 2
    # The event line runs down through the queue panel too.
    line = next(x for x in svg.splitlines() if 'stroke-dasharray="4,3"' in x)
    assert 'y2="540"' in line


def test_class_plot_only_when_there_are_classes(tmp_path: Path) -> None:
    from lab.results.report import write_class_plot

    plain = [{"t": float(t), "prefill-0/cnic/egress_mbit": 50.0} for t in range(5)]
    assert not write_class_plot(plain, tmp_path / "none.svg", title="t")
    assert not (tmp_path / "none.svg").exists()
    classed = [
        {
            "t": float(t),
            "prefill-0/cnic/egress/collective_mbit": 5.0,
            "prefill-0/cnic/egress/kv_mbit": 90.0,
            "prefill-0/cnic/egress/kv_backlog_bytes": 60_000,
        }
        for t in range(5)
    ]
    assert write_class_plot(classed, tmp_path / "classes.svg", title="t")
    svg = (tmp_path / "classes.svg").read_text()
    assert "prefill-0/cnic/egress/collective" in svg and "kv queue" in svg
    assert svg.count("<polyline") == 3


def test_an_empty_queue_panel_says_so(tmp_path: Path) -> None:
    series = [
        {"t": float(t), "decode-0/snic/ingress_mbit": 9.0, "decode-0/snic/ingress_backlog_bytes": 0}
        for t in range(4)
    ]
    write_plot(series, tmp_path / "p.svg", title="t")
    svg = (tmp_path / "p.svg").read_text()
    assert "queue kB" in svg and "stayed under 0.5 kB" in svg
    write_plot([{"t": 1.0, "decode-0/snic/ingress_mbit": 9.0}], tmp_path / "q.svg", title="t")
    assert "queue kB" not in (tmp_path / "q.svg").read_text()  # no counters: no panel


def test_latency_panel_under_the_queues_and_the_event_line_reaches_it(tmp_path: Path) -> None:
    series = [
        {
            "t": float(t),
            "prefill-0/snic/ingress_mbit": 90.0,
            "prefill-0/snic/ingress_backlog_bytes": 0,
        }
        for t in range(10)
    ]
    turns = [
        {"submitted_at": 100.0 + t, "first_token_at": 100.5 + t + (2.0 if t == 6 else 0.0)}
        for t in range(8)
    ]
    latency = latency_series(turns, 100.0, bin_s=2.0)
    assert [r["t"] for r in latency] == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert latency[3]["ttft_max_s"] == 0.5  # one first token, at 7.5 s, 0.5 s after its submit
    assert latency[4]["ttft_max_s"] == 2.5  # the slow turn's first token at 8.5 s
    out = tmp_path / "plot.svg"
    write_plot(
        series, out, title="t", events=[{"t": 3.0, "node": "x", "action": "kill"}], latency=latency
    )
    svg = out.read_text()
    assert "TTFT ms" in svg and "TTFT p50" in svg and "TTFT max" in svg
    line = next(x for x in svg.splitlines() if 'stroke-dasharray="4,3"' in x)
    assert 'y2="760"' in line  # below the queue panel (ends at 540), through the TTFT panel


def test_lateness_panel_with_its_threshold_under_the_other_panels(tmp_path: Path) -> None:
    series = [
        {
            "t": float(t),
            "prefill-0/snic/ingress_mbit": 90.0,
            "prefill-0/snic/ingress_backlog_bytes": 0,
        }
        for t in range(10)
    ]
    lateness = [[0.5, 0.01, 20], [1.5, 0.4, 20], [2.5, 0.02, 18]]
    out = tmp_path / "plot.svg"
    write_plot(
        series,
        out,
        title="t",
        events=[{"t": 3.0, "node": "x", "action": "kill"}],
        lateness=lateness,
        lateness_threshold=0.05,
    )
    svg = out.read_text()
    assert "late %" in svg and "step lateness (max/s)" in svg and "threshold (p99)" in svg
    threshold = next(x for x in svg.splitlines() if 'stroke-dasharray="8,4"' in x)
    ys = {p.split(",")[1] for p in threshold.split('points="')[1].rstrip('"/>').split()}
    assert len(ys) == 1  # a level line at 5 %
    line = next(x for x in svg.splitlines() if 'stroke-dasharray="4,3"' in x)
    assert 'y2="760"' in line  # the event line runs through the lateness panel (610-760)
    write_plot(series, tmp_path / "none.svg", title="t", lateness=[], lateness_threshold=0.05)
    assert "late %" not in (tmp_path / "none.svg").read_text()

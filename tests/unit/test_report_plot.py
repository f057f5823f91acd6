"""The throughput plot marks chaos events on the same time axis."""

from __future__ import annotations

from pathlib import Path

from lab.report import write_plot


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

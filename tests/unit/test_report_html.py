"""The HTML report: drawn from two recorded runs (tests/data/runs), it holds every panel, names
every run, marks chaos events on the time axis and references nothing outside the page."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from dualpath.errors import EXIT_USAGE, UsageError
from lab.cli import build_parser
from lab.results.html_report import RunRecord, cdf_figure, render
from lab.run.rundir import REPORT, RunDirError, read_run, read_runs, run_dirs

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"


class _Refs(HTMLParser):
    """Every tag's src/href attribute (script bodies are not parsed as tags) and the text of
    the h1/h2 headings."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.headings: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [(tag, v or "") for k, v in attrs if k in ("src", "href")]
        if tag in ("h1", "h2"):
            self._in_heading = True
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2"):
            self._in_heading = False

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.headings[-1] += data


def _parse(page: str) -> _Refs:
    parser = _Refs()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def runs() -> list[RunRecord]:
    return read_runs([RUNS / "basic", RUNS / "dualpath"])


def test_comparison_page_has_every_panel_and_names_every_policy(runs: list[RunRecord]) -> None:
    page = render(runs, title="laptop: basic vs dualpath")
    headings = _parse(page).headings
    assert headings == [
        "laptop: basic vs dualpath",
        "Runs",
        "TTFT and TPOT distributions",
        "TTFT breakdown",
        "snic and attention balance",
        "Emulation health",
        "basic: NICs, queues and latency over time",
        "basic: cnic priority classes",
        "dualpath: NICs, queues and latency over time",
        "dualpath: cnic priority classes",
    ]
    # the comparison table: a row per policy, the speed-up over basic from the two JCTs
    jct = {r.name: r.summary["jct_s"] for r in runs}
    assert f"<td>{jct['basic'] / jct['dualpath']:.2f}x</td>" in page
    for axis in ("NIC throughput, Mbit\\u002fs", "queued, kB", "TTFT, s", "step lateness, %"):
        assert f'"title":{{"text":"{axis}"}}' in page
    plain = page.replace("\\u002f", "/")  # plotly's JSON escapes every slash
    assert '"name":"prefill-0/snic/ingress"' in plain and '"name":"decode-0/snic/ingress"' in plain
    assert page.count("Plotly.newPlot(") == 7  # 2 x (timeline, classes) + CDFs, breakdown, balance


def test_the_page_fetches_nothing(runs: list[RunRecord]) -> None:
    page = render(runs, title="t")
    refs = _parse(page).refs
    assert not [r for r in refs if r[1].startswith(("http:", "https:", "//"))], refs
    assert "<script src" not in page.replace(" ", "").lower() and "<link" not in page
    assert page.count("plotly.js v") >= 1  # the library itself is inline, once
    assert page.count("<script>/**") == 1


def test_cdfs_count_every_finished_turn_of_each_run(runs: list[RunRecord]) -> None:
    fig = cdf_figure(runs)
    assert fig is not None
    ttft = [t for t in fig.data if t.xaxis == "x"]
    tpot = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in ttft] == ["basic", "dualpath"] == [t.name for t in tpot]
    for r, curve in zip(runs, ttft, strict=True):
        assert len(curve.x) == r.summary["turns_done"] == 160
        assert list(curve.x) == sorted(curve.x) and curve.y[-1] == 1.0
        # the median of the curve is the summary's p50 (the same turns, the same clock)
        assert curve.x[len(curve.x) // 2] == pytest.approx(r.summary["ttft_s"]["p50"], rel=0.05)
    assert cdf_figure([replace(runs[0], turns=())]) is None


def test_chaos_events_and_failed_steps_are_marked(runs: list[RunRecord]) -> None:
    summary: dict[str, Any] = {
        **runs[1].summary,
        "chaos": {
            "scenario": "s",
            "events": [
                {"t": 2.0, "node": "prefill-0", "nic": "snic", "changes": {"rate_mbit": 25.0}},
                {"t": 6.0, "node": "decode-0", "action": "kill", "error": "refused"},
            ],
        },
    }
    page = render([replace(runs[1], summary=summary)], title="t")
    assert "prefill-0/snic rate_mbit=25.0" in page.replace("\\u002f", "/")
    assert "decode-0 kill (failed: refused)" in page
    # a dotted line through each of the four panels (NICs, queues, TTFT, lateness) per event
    assert page.count('"type":"line","x0":2.0') == 4 and page.count('"x0":6.0') == 4
    assert "Chaos steps and link changes" in _parse(page).headings


def test_a_run_without_counters_notes_what_is_missing(runs: list[RunRecord]) -> None:
    local = replace(runs[0], series=(), summary={**runs[0].summary, "backend": "local"})
    page = render([local], title="t")
    assert "No kernel counters were sampled" in page
    assert "NIC throughput" not in page and '"text":"TTFT, s"' in page


def test_selftest_and_trace_sections_appear_when_recorded(runs: list[RunRecord]) -> None:
    assert "Link fidelity" not in render(runs, title="t")
    link = {"node": "prefill-0", "nic": "snic", "direction": "ingress"}
    selftest = {
        "passed": False,
        "tolerance": 0.05,
        "links": [{**link, "expected_mbit": 95.0, "goodput_mbit": 80.0, "error": -0.158}],
    }
    trace = {"file": "m.jsonl", "format": "mooncake", "speedup": 2, "prefix_hit_rate": 0.4}
    summary = {**runs[0].summary, "selftest": selftest, "trace": trace}
    page = render([replace(runs[0], summary=summary)], title="t")
    headings = _parse(page).headings
    assert "Link fidelity (selftest)" in headings
    assert "Trace replay: prefix-hit rates" in headings
    assert "-15.8%" in page and "<td>NO</td>" in page and "<td>40.0%</td>" in page


def _verb(*argv: str) -> int:
    args = build_parser().parse_args(["report", *argv])
    status: int = args.func(args)
    return status


def test_report_verb_writes_one_comparison_page(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "cmp.html"
    assert _verb(str(RUNS / "basic"), str(RUNS / "dualpath"), "-o", str(out)) == 0
    page = out.read_text()
    assert "basic vs dualpath" in page and "dualpath: NICs, queues" in page
    assert str(out) in capsys.readouterr().out


def test_report_verb_of_one_dir_writes_beside_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUNS / "dualpath", run)
    assert _verb(str(run)) == 0
    assert "dualpath: NICs, queues" in (run / REPORT).read_text()


def test_a_compare_dir_stands_for_its_policies(tmp_path: Path) -> None:
    for p in ("dualpath", "basic"):
        shutil.copytree(RUNS / p, tmp_path / p)
    (tmp_path / "comparison.json").write_text("{}")
    assert [d.name for d in run_dirs(tmp_path)] == ["basic", "dualpath"]
    same = read_runs([RUNS / "basic", RUNS / "basic"])
    assert [r.name for r in same] == ["basic (basic)", "basic (basic)"]


def test_a_dir_without_summary_exits_2_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-run"
    bad.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "lab.cli", "report", str(RUNS / "basic"), str(bad),
         "-o", str(tmp_path / "x.html")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE
    assert str(bad) in done.stderr and "summary.json" in done.stderr
    assert not (tmp_path / "x.html").exists()
    (bad / "summary.json").write_text(json.dumps({"no": "policy"}))
    with pytest.raises(RunDirError, match="not a run summary"):
        read_run(bad)
    with pytest.raises(UsageError, match="-o FILE"):
        _verb(str(RUNS / "basic"), str(RUNS / "dualpath"))

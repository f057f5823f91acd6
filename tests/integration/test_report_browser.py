"""The report opens offline: headless Chromium, every request sent to a dead proxy, draws
every figure of a comparison page from the plotly.js inside it (Makefile `system-deps`
installs chromium)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lab.results.html_report import write_report
from lab.run.rundir import read_runs

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"


def test_every_figure_is_drawn_with_the_network_unreachable(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: make system-deps installs it"
    page = write_report(
        read_runs([RUNS / "basic", RUNS / "dualpath"]), tmp_path / "r.html", title="t"
    )
    figures = page.read_text().count("Plotly.newPlot(")
    assert figures == 7
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         f"--user-data-dir={tmp_path / 'profile'}",
         "--proxy-server=http://127.0.0.1:9",  # nothing listens: a fetch would fail
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert dom.count('class="plot-container plotly"') == figures  # plotly.js ran: each drawn
    assert '<svg class="main-svg"' in dom

"""The report opens offline: headless Chromium, every request sent to a dead proxy, draws
every figure of a comparison page from the plotly.js inside it (Makefile `system-deps`
installs chromium), and takes the screenshot of it that the README shows (copied to
DUALPATH_SCREENSHOT_DIR when that is set: `docs/report.png` is made that way)."""

from __future__ import annotations

import os
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
        read_runs([RUNS / "basic", RUNS / "dualpath"]),
        tmp_path / "r.html",
        title="basic vs dualpath: examples/laptop.yaml, 32 agents, netns",
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

    # the same page offline as a picture: what a person sees first
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=http://127.0.0.1:9",
         "--window-size=1400,2400", "--virtual-time-budget=10000",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 100_000  # drawn figures, not a blank page
    if os.environ.get("DUALPATH_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["DUALPATH_SCREENSHOT_DIR"]) / "report.png")

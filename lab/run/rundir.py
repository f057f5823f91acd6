"""Run directories read back for the HTML report (lab.results.html_report): summary.json and,
when present, timeseries.json, latency.json and the driver's per-turn timings (driver.json).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dualpath.errors import UsageError
from lab.results.html_report import RunRecord, write_report

REPORT = "report.html"
"""The report's file name in a run (or comparison) directory."""


class RunDirError(UsageError):
    """A directory given as a run directory is not one; the message names it."""


def _json(path: Path, default: Any) -> Any:
    """A JSON file of the run, or `default` when it is absent."""
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: cannot be read as JSON ({exc})") from None


def run_dirs(path: Path) -> list[Path]:
    """The run directories `path` stands for: itself when it holds summary.json, else the
    per-policy directories of a comparison (comparison.json beside them)."""
    if (path / "summary.json").is_file():
        return [path]
    if (path / "comparison.json").is_file():
        subs = sorted(p for p in path.iterdir() if (p / "summary.json").is_file())
        order = {"basic": 0, "dualpath": 1, "oracle": 2}
        subs.sort(key=lambda p: (order.get(p.name, 3), p.name))
        if subs:
            return subs
    what = "does not exist" if not path.exists() else "holds no summary.json"
    raise RunDirError(f"{path}: {what} (not a run directory of dualpath run/compare/chaos)")


def read_run(path: Path, name: str | None = None) -> RunRecord:
    """One run directory as a `RunRecord` named `name` (default: its policy)."""
    summary = _json(path / "summary.json", None)
    if not isinstance(summary, dict) or "policy" not in summary:
        raise RunDirError(f"{path}: summary.json is not a run summary")
    driver = _json(path / "driver.json", {})
    turns = driver.get("turns", []) if isinstance(driver, dict) else []
    return RunRecord(
        name=name or str(summary["policy"]),
        summary=summary,
        series=_json(path / "timeseries.json", []),
        latency=_json(path / "latency.json", []),
        turns=turns,
        source=str(path),
    )


def read_runs(paths: Sequence[Path]) -> list[RunRecord]:
    """The runs of every path (run or comparison directories), each named by its policy, or by
    policy and directory when two share a policy."""
    dirs = [d for p in paths for d in run_dirs(p)]
    runs = [read_run(d) for d in dirs]
    names = [r.name for r in runs]
    return [
        replace(r, name=f"{r.name} ({d.name})") if names.count(r.name) > 1 else r
        for d, r in zip(dirs, runs, strict=True)
    ]


def report_title(runs: Sequence[RunRecord]) -> str:
    first = runs[0].summary
    if len(runs) == 1:
        return f"{first.get('config')} / {runs[0].name}: DualPath Mesh run"
    return f"{first.get('config')}: {' vs '.join(r.name for r in runs)}"


def write_run_report(paths: Sequence[Path], out: Path) -> Path:
    """The report of the runs in `paths`, written to `out`."""
    runs = read_runs(paths)
    return write_report(runs, out, title=report_title(runs))

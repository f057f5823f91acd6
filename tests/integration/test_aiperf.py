"""NVIDIA's AIPerf, unmodified, replays the first requests of the shipped Mooncake sample
against a whole cluster's OpenAI-compatible API (local backend), through bench/aiperf_replay.py.
Every request must succeed, AIPerf must count exactly the trace's input and output tokens with
the lab's tokenizer, and the lab must have served and cached what AIPerf sent. (How close the
two sides' latencies are is the bench's to report, not a test's to assert.)

Needs AIPerf in its own venv: `make aiperf`; `make clients` runs this module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.clients

REPO = Path(__file__).resolve().parents[2]
AIPERF = Path(os.environ.get("DUALPATH_AIPERF", REPO / ".venv-aiperf" / "bin" / "aiperf"))


def test_aiperf_replays_a_mooncake_trace_against_the_lab(tmp_path: Path) -> None:
    if not AIPERF.exists():
        pytest.fail(f"no AIPerf at {AIPERF}: run `make aiperf`")
    requests = 24
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "aiperf_replay.py"),
            "--out", str(tmp_path),
            "--requests", str(requests),
            "--max-input", "4096",
            "--max-output", "24",
            "--timeout", "600",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "DUALPATH_AIPERF": str(AIPERF)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["aiperf_requests"] == requests and result["aiperf_errors"] == 0
    assert result["isl_matches_trace"] and result["osl_matches_trace"]
    lab = result["lab"]
    assert lab["requests"] == requests
    # every request after the first shares the trace's block 0 (a 512-token system prompt)
    assert lab["cached_tokens"] > 0
    assert result["ttft_p50_ms"]["lab"] > 0 and result["itl_p50_ms"]["aiperf"] > 0
    assert not list(tmp_path.glob("data/*"))  # the cluster's data went with it

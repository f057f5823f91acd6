"""A run with --selftest refuses to go on from a lab whose links measured out of tolerance,
unless --allow-out-of-tolerance (lab.run.runner; the measurement itself is netns, faked here
above its interface)."""

from __future__ import annotations

from pathlib import Path

import pytest

import lab.run.runner as runner
from lab.config.models import load_config
from lab.run.runner import RunError
from lab.run.selftest import LinkResult, LinkUnderTest, SelftestOptions, SelftestReport

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _report(measured_mbit: float) -> SelftestReport:
    link = LinkUnderTest("prefill-0", "snic", "egress", 100.0, "probe-storage")
    result = LinkResult(link, goodput_mbit=measured_mbit, expected_mbit=95.6, mss=1448, mtu=1500)
    return SelftestReport("laptop", "abc123", 0.05, 0.5, (result,), rounds=1, elapsed_s=1.0)


@pytest.mark.parametrize("allow", [False, True])
def test_out_of_tolerance_stops_the_run_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allow: bool
) -> None:
    monkeypatch.setattr(runner, "run_selftest", lambda cfg, options, log: _report(100.8))
    cfg = load_config(EXAMPLES / "laptop.yaml")
    options = SelftestOptions(seconds=0.5, tolerance=0.05, allow_out_of_tolerance=allow)
    if allow:
        checked = runner._selftest(cfg, "netns", tmp_path, options, lambda m: None)
        assert checked["passed"] is False
    else:
        with pytest.raises(RunError, match=r"prefill-0\.snic\.egress"):
            runner._selftest(cfg, "netns", tmp_path, options, lambda m: None)
    assert (tmp_path / "selftest.json").exists()  # the measurement is kept either way


def test_a_lab_within_tolerance_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run_selftest", lambda cfg, options, log: _report(96.0))
    cfg = load_config(EXAMPLES / "laptop.yaml")
    options = SelftestOptions(seconds=0.5, tolerance=0.05)
    assert runner._selftest(cfg, "netns", tmp_path, options, lambda m: None)["passed"] is True

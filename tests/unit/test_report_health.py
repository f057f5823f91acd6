"""The emulation-health lines of the printed results and the comparison table's column."""

from __future__ import annotations

from typing import Any

from lab.results.health import assess
from lab.results.metrics import summarize
from lab.results.report import comparison_table, health_lines, summary_lines

T0, T1 = 0.0, 10.0


def _summary(policy: str, late_ms: float, *, psi: float = 0.1) -> dict[str, Any]:
    """A summary as the runner writes it: one timeline whose steps run `late_ms` late (of
    100 ms), a host of 2 CPUs 60 % busy with `psi` CPU pressure."""
    driver = {"started_at": T0, "finished_at": T1, "jct_s": T1 - T0, "turns": []}
    s = summarize(
        policy=policy,
        backend="local",
        config_name="x",
        time_dilation=1.0,
        driver=driver,
        samples=[],
        num_agents=0,
    )
    steps = [[0.1 * i, 100.0, 100.0 + late_ms, late_ms] for i in range(100)]
    health = {"prefill-0": [{"process": "prefill-0", "part": "timeline", "steps": steps}]}
    host = [
        {
            "t": 0.5 * i,
            "cpu_busy_jiffies": 60 * i,
            "cpu_total_jiffies": 100 * i,
            "psi_cpu_some_us": round(psi * 0.5 * i * 1e6),
            "num_cpus": 2,
        }
        for i in range(21)
    ]
    s["emulation_health"] = assess(health, host, window=(T0, T1))
    s["allowed_host_bound"] = False
    return s


def test_a_healthy_run_gets_one_line() -> None:
    lines = health_lines(_summary("dualpath", 1.0))
    assert lines == [
        "  emulation: healthy; worst step lateness p99 0.0% of the step (prefill-0 timeline), "
        "host CPU 60% busy of 2 CPUs (p90 60%), CPU pressure 10% of the time"
    ]
    assert lines[0] in summary_lines(_summary("dualpath", 1.0))


def test_a_host_bound_run_gets_its_reasons() -> None:
    s = _summary("dualpath", 9.1, psi=0.7)
    lines = health_lines(s)
    assert len(lines) == 2 and lines[0].startswith("  emulation: HOST-BOUND; worst step")
    assert lines[1] == "    prefill-0 timeline: GPU time 9.1 % over plan > 2 %"
    s["allowed_host_bound"] = True
    assert "HOST-BOUND (accepted: --allow-host-bound)" in health_lines(s)[0]


def test_unknown_says_why_and_old_summaries_print_nothing() -> None:
    s = _summary("dualpath", 1.0)
    s["emulation_health"] = assess({}, [], window=(T0, T1))
    lines = health_lines(s)
    assert lines[0] == "  emulation: unknown"
    assert "no timeline process reported" in lines[1]
    del s["emulation_health"]
    assert health_lines(s) == []


def test_the_comparison_table_shows_each_policy_verdict() -> None:
    runs = {
        "basic": _summary("basic", 1.0),
        "dualpath": _summary("dualpath", 20.0),
        "oracle": _summary("oracle", 1.0),
    }
    cmp = {"runs": runs, "speedup": {}}
    table = comparison_table(cmp).splitlines()
    assert table[0].split()[-1] == "emulation"
    verdicts = {row.split()[0]: row.split()[-1] for row in table[2:5]}
    assert verdicts == {"basic": "healthy", "dualpath": "HOST-BOUND", "oracle": "healthy"}

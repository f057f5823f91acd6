"""Emulation health: synthetic HealthMonitor snapshots and host samples in, a verdict out."""

from __future__ import annotations

from typing import Any

import pytest

from lab.results.health import (
    Thresholds,
    assess,
    counter_share,
    host_sample,
    parse_proc_stat,
    parse_psi_some_us,
    verdict_of,
)

T0, T1 = 1000.0, 1010.0  # the measured window


def _snap(
    process: str,
    part: str,
    *,
    lag_ms: float = 1.0,
    late_frac: float = 0.01,
    planned_ms: float = 100.0,
    cpu_share: float = 0.3,
    wait_share: float = 0.02,
    gauges: dict[str, list[list[float]]] | None = None,
    span: tuple[float, float] = (T0, T1),
) -> dict[str, Any]:
    """A snapshot with steady figures over `span`: loop lag every 0.05 s, cpu every 0.5 s
    (cumulative seconds growing at `cpu_share` / `wait_share`), a step every 0.1 s."""
    a, b = span
    n_lag = round((b - a) / 0.05)
    n_cpu = round((b - a) / 0.5)
    snap: dict[str, Any] = {
        "process": process,
        "part": part,
        "pid": 4242,
        "started_at": a,
        "at": b,
        "times": {"cpu_s": 1.0, "runq_wait_s": 0.1},
        "loop_lag": [[a + 0.05 * i, lag_ms] for i in range(n_lag + 1)],
        "steps": [],
        "cpu": [
            [a + 0.5 * i, 5.0 + cpu_share * 0.5 * i, 1.0 + wait_share * 0.5 * i]
            for i in range(n_cpu + 1)
        ],
        "gauges": gauges or {},
    }
    if part == "timeline":
        late = planned_ms * late_frac
        snap["steps"] = [
            [a + 0.1 * i, planned_ms, planned_ms + late, late] for i in range(round((b - a) / 0.1))
        ]
    return snap


def _healthy_lab() -> dict[str, list[dict[str, Any]]]:
    return {
        "prefill-0": [_snap("prefill-0", "timeline"), _snap("prefill-0", "dataplane")],
        "decode-0": [_snap("decode-0", "timeline"), _snap("decode-0", "dataplane")],
        "storage-0": [_snap("storage-0", "storage")],
        "scheduler": [_snap("scheduler", "scheduler")],
        "driver": [_snap("driver", "driver")],
    }


def _host(
    *, busy: float = 0.5, psi: float = 0.1, span: tuple[float, float] = (T0, T1)
) -> list[dict[str, Any]]:
    """Host samples every 0.5 s: 2 CPUs at 100 jiffies/s each, `busy` of them busy, PSI some
    growing at `psi` seconds per second."""
    a, b = span
    out = []
    for i in range(round((b - a) / 0.5) + 1):
        total = 200 * 0.5 * i
        out.append(
            {
                "t": a + 0.5 * i,
                "cpu_busy_jiffies": round(busy * total),
                "cpu_total_jiffies": round(total),
                "psi_cpu_some_us": round(psi * 0.5 * i * 1e6),
                "num_cpus": 2,
            }
        )
    return out


def test_a_lab_that_kept_up_is_healthy() -> None:
    eh = assess(_healthy_lab(), _host(), window=(T0, T1))
    assert eh["verdict"] == "healthy" and eh["reasons"] == []
    tl = eh["processes"]["prefill-0/timeline"]
    assert tl["steps"]["num_steps"] == 100
    assert tl["steps"]["rel_late"]["p99"] == 0.0  # 1 ms late: within the timer allowance
    assert tl["steps"]["late_ms"]["max"] == pytest.approx(1.0)
    assert tl["steps"]["planned_total_ms"] == pytest.approx(10_000.0)
    assert tl["steps"]["actual_total_ms"] == pytest.approx(10_100.0)
    assert tl["loop_lag_ms"]["p99"] == pytest.approx(1.0)
    assert "steps" not in eh["processes"]["prefill-0/dataplane"]
    assert set(eh["processes"]) == {
        "prefill-0/timeline", "prefill-0/dataplane", "decode-0/timeline", "decode-0/dataplane",
        "storage-0/storage", "scheduler", "driver",
    }  # fmt: skip
    assert eh["worst"]["rel_late_p99"] == 0.0
    assert eh["host"]["cpu_busy_pct"]["mean"] == pytest.approx(50.0)
    assert eh["host"]["psi_cpu_some_share"] == pytest.approx(0.1)
    assert eh["host"]["num_cpus"] == 2
    assert eh["thresholds"] == {
        "timeline_drift": 0.02,
        "timeline_lateness_p99": 0.25,
        "timer_allowance_ms": 2.0,
        "timeline_loop_lag_p99_ms": 50.0,
        "dataplane_buffer_mib": 6.0,
        "dataplane_loop_lag_p99_ms": 100.0,
    }
    assert verdict_of({"emulation_health": eh}) == "healthy"


def test_cpu_and_run_queue_shares_are_counter_growth_per_wall_second() -> None:
    lab = {"storage-0": [_snap("storage-0", "storage", cpu_share=0.42, wait_share=0.07)]}
    entry = assess(lab, [], window=(T0, T1))["processes"]["storage-0/storage"]
    assert entry["cpu_share"] == pytest.approx(0.42)
    assert entry["runq_wait_share"] == pytest.approx(0.07)
    # first and last row only; -1 (no schedstats) at either end: unknown, not zero
    assert counter_share([[0.0, 1.0, 0.5], [2.0, 2.0, 1.5]], 1) == pytest.approx(0.5)
    assert counter_share([[0.0, 1.0, -1.0], [2.0, 2.0, -1.0]], 2) is None
    assert counter_share([[0.0, 1.0, 0.0]], 1) is None


GBIT = {"prefill-0": 1000.0, "decode-0": 1000.0}
"""Shaped storage NICs of 1 Gbit/s: a data plane's loop-lag bound is 50 ms."""


def _hiccups(process: str) -> dict[str, Any]:
    """A timeline on time but for one step in fifty, 40 ms late on 100 and paid back by the
    next step: little drift, a bad p99."""
    snap = _snap(process, "timeline", late_frac=0.0)
    for i in range(0, len(snap["steps"]) - 1, 50):
        snap["steps"][i] = [snap["steps"][i][0], 100.0, 140.0, 40.0]
        snap["steps"][i + 1] = [snap["steps"][i + 1][0], 100.0, 60.0, -40.0]
    return snap


@pytest.mark.parametrize(
    ("lab_change", "reason"),
    [
        (
            {"prefill-0": [_hiccups("prefill-0")]},
            "prefill-0 timeline: step lateness p99 38.0 % of the step > 25 %",
        ),
        (
            {"prefill-0": [_snap("prefill-0", "timeline", late_frac=0.05)]},
            "prefill-0 timeline: GPU time 5.0 % over plan > 2 %",
        ),
        (
            {"decode-0": [_snap("decode-0", "timeline", lag_ms=53.4)]},
            "decode-0 timeline: event-loop lag p99 53.4 ms > 50 ms",
        ),
        (
            {"decode-0": [_snap("decode-0", "dataplane", lag_ms=80.0)]},
            "decode-0 dataplane: event-loop lag p99 80.0 ms > 50 ms",
        ),
        (
            {"storage-0": [_snap("storage-0", "storage", lag_ms=65.0)]},
            "storage-0 storage: event-loop lag p99 65.0 ms > 50 ms",
        ),
    ],
)
def test_each_threshold_alone_makes_the_run_host_bound_and_is_named(
    lab_change: dict[str, list[dict[str, Any]]], reason: str
) -> None:
    lab = _healthy_lab()
    for node, snaps in lab_change.items():
        part = snaps[0]["part"]
        lab[node] = [s for s in lab[node] if s["part"] != part] + snaps
    eh = assess(lab, _host(), window=(T0, T1), storage_mbit=GBIT)
    assert eh["verdict"] == "host-bound"
    assert eh["reasons"] == [reason]
    assert verdict_of({"emulation_health": eh}) == "host-bound"


def test_a_data_plane_may_lag_as_long_as_its_receive_buffers_cover() -> None:
    # 6 MiB at 1 Gbit/s is 50 ms; at 100 Mbit/s 503 ms, so the 100 ms ceiling applies
    lab = _healthy_lab()
    lab["decode-0"][1] = _snap("decode-0", "dataplane", lag_ms=80.0)
    assert assess(lab, [], window=(T0, T1), storage_mbit=GBIT)["verdict"] == "host-bound"
    slow = {"prefill-0": 100.0, "decode-0": 100.0}
    assert assess(lab, [], window=(T0, T1), storage_mbit=slow)["verdict"] == "healthy"
    lab["decode-0"][1] = _snap("decode-0", "dataplane", lag_ms=120.0)
    eh = assess(lab, [], window=(T0, T1), storage_mbit=slow)
    assert eh["reasons"] == ["decode-0 dataplane: event-loop lag p99 120.0 ms > 100 ms"]


def test_one_late_step_is_a_hiccup_two_are_a_trend() -> None:
    snap = _snap("prefill-0", "timeline", late_frac=0.0)
    snap["steps"] = snap["steps"][:30]  # a short run: p99 is the maximum
    snap["steps"][5] = [snap["steps"][5][0], 100.0, 140.0, 40.0]
    lab = {"prefill-0": [snap]}
    eh = assess(lab, [], window=(T0, T1))
    assert eh["processes"]["prefill-0/timeline"]["steps"]["num_late"] == 1
    assert eh["verdict"] == "healthy"
    snap["steps"][9] = [snap["steps"][9][0], 100.0, 140.0, 40.0]
    snap["steps"][10] = [snap["steps"][10][0], 100.0, 60.0, -40.0]  # paid back: no drift
    snap["steps"][6] = [snap["steps"][6][0], 100.0, 60.0, -40.0]
    eh = assess(lab, [], window=(T0, T1))
    assert eh["reasons"] == ["prefill-0 timeline: step lateness p99 38.0 % of the step > 25 %"]


def test_contention_alone_is_reported_not_judged() -> None:
    # run-queue wait, CPU pressure and the control processes' loop lag say how busy the host
    # was; what decides is whether the emulated clocks and transfers kept up
    lab = _healthy_lab()
    lab["scheduler"] = [_snap("scheduler", "scheduler", lag_ms=80.0, wait_share=0.5)]
    lab["driver"] = [_snap("driver", "driver", lag_ms=80.0, wait_share=0.5)]
    lab["prefill-0"][1] = _snap("prefill-0", "dataplane", wait_share=0.5)
    eh = assess(lab, _host(psi=0.9), window=(T0, T1))
    assert eh["verdict"] == "healthy"
    assert eh["processes"]["driver"]["loop_lag_ms"]["p99"] == pytest.approx(80.0)
    assert eh["processes"]["prefill-0/dataplane"]["runq_wait_share"] == pytest.approx(0.5)
    assert eh["host"]["psi_cpu_some_share"] == pytest.approx(0.9)


def test_thresholds_are_fields_and_are_validated() -> None:
    lab = {"prefill-0": [_snap("prefill-0", "timeline", late_frac=0.012)]}
    assert assess(lab, [], window=(T0, T1))["verdict"] == "healthy"
    strict = Thresholds(timeline_drift=0.01)
    eh = assess(lab, [], window=(T0, T1), thresholds=strict)
    assert eh["verdict"] == "host-bound"
    assert eh["reasons"] == ["prefill-0 timeline: GPU time 1.2 % over plan > 1 %"]
    assert eh["thresholds"]["timeline_drift"] == 0.01
    with pytest.raises(ValueError, match="dataplane_buffer_mib"):
        Thresholds(dataplane_buffer_mib=0)


def test_samples_outside_the_window_are_ignored() -> None:
    # Before the window a storm: late steps, loop lag, run-queue wait, host pressure.
    before = (T0 - 10, T0 - 0.5)
    storm = {
        "prefill-0": [
            _snap("prefill-0", "timeline", late_frac=0.5, lag_ms=200.0, span=before),
            _snap("prefill-0", "timeline", span=(T0, T1)),
        ]
    }
    host = _host(psi=0.95, span=before) + _host(psi=0.1)
    eh = assess(storm, host, window=(T0, T1))
    assert eh["verdict"] == "healthy", eh["reasons"]
    assert eh["host"]["psi_cpu_some_share"] == pytest.approx(0.1)
    # ... and after it (the driver's snapshot is taken well after the run finished).
    after = (T1 + 0.5, T1 + 10)
    late = {"prefill-0": [_snap("prefill-0", "timeline", late_frac=0.5, span=after)]}
    eh = assess(late, [], window=(T0, T1))
    assert eh["verdict"] == "unknown"
    assert eh["processes"]["prefill-0/timeline"]["steps"]["num_steps"] == 0


def test_a_restarted_process_is_kept_apart_by_pid() -> None:
    old = _snap("decode-0", "timeline", late_frac=0.2, span=(T0, T0 + 5))
    new = {**_snap("decode-0", "timeline", span=(T0 + 5.5, T1)), "pid": 5555}
    eh = assess({"decode-0": [old, new]}, [], window=(T0, T1))
    assert set(eh["processes"]) == {"decode-0/timeline", "decode-0/timeline@5555"}
    assert eh["reasons"] == ["decode-0 timeline: GPU time 20.0 % over plan > 2 %"]


def test_missing_data_gives_unknown_never_an_error() -> None:
    eh = assess({}, [], window=(T0, T1))
    assert eh["verdict"] == "unknown"
    assert "no timeline process reported" in eh["reasons"][0]
    assert eh["host"] == {
        "cpu_busy_pct": {"mean": None, "p90": None},
        "psi_cpu_some_share": None,
        "num_samples": 0,
        "num_cpus": None,
    }
    assert eh["lateness_per_s"] == [] and eh["worst"]["rel_late_p99"] is None
    # Nodes that reported nothing (an older engine), junk rows and a host without PSI.
    lab: dict[str, Any] = {
        "prefill-0": [],
        "storage-0": [{"process": "storage-0", "part": "storage", "cpu": [[1, "x"], None]}],
        "scheduler": None,
        "driver": [_snap("driver", "driver")],
    }
    host = [{**s, "psi_cpu_some_us": None} for s in _host()]
    eh = assess(lab, host, window=(T0, T1))
    assert eh["verdict"] == "unknown"
    assert eh["not_reported"] == ["prefill-0", "scheduler"]
    assert eh["processes"]["storage-0/storage"]["runq_wait_share"] is None
    assert eh["host"]["psi_cpu_some_share"] is None
    assert eh["host"]["cpu_busy_pct"]["mean"] == pytest.approx(50.0)
    assert verdict_of({}) == "unknown"  # a summary from before emulation health


def test_a_breach_without_any_timeline_step_is_still_host_bound() -> None:
    lab = {"storage-0": [_snap("storage-0", "storage", lag_ms=120.0)]}
    eh = assess(lab, _host(psi=0.8), window=(T0, T1))
    assert eh["verdict"] == "host-bound"
    assert eh["reasons"] == ["storage-0 storage: event-loop lag p99 120.0 ms > 100 ms"]


def test_gauges_max_and_mean_over_the_window() -> None:
    gauges = {"recv_backlog_bytes": [[T0 - 1, 1e9], [T0 + 1, 100.0], [T0 + 2, 300.0]]}
    lab = {"decode-0": [_snap("decode-0", "dataplane", gauges=gauges)]}
    g = assess(lab, [], window=(T0, T1))["processes"]["decode-0/dataplane"]["gauges"]
    assert g == {"recv_backlog_bytes": {"max": 300.0, "mean": 200.0, "num_samples": 2}}


def test_lateness_per_second_is_the_max_across_timelines() -> None:
    a = _snap("prefill-0", "timeline", late_frac=0.01)
    b = _snap("decode-0", "timeline", late_frac=0.02, planned_ms=50.0)
    b["steps"][15][3] = 20.0  # one step at T0 + 1.5 s, 40 % late
    rows = assess({"prefill-0": [a], "decode-0": [b]}, [], window=(T0, T1))["lateness_per_s"]
    assert len(rows) == 10
    assert rows[0] == [0.5, 0.02, 20]  # 10 steps of each timeline in the first second
    assert rows[1] == [1.5, 0.4, 20]


def test_host_text_parsers() -> None:
    stat = "cpu  100 5 50 800 40 3 2 10 7 0\ncpu0 50 2 25 400 20 1 1 5 3 0\nintr 1\n"
    assert parse_proc_stat(stat) == (170, 1010)  # busy = user+nice+system+irq+softirq+steal
    assert parse_proc_stat("intr 1\n") is None
    psi = "some avg10=0.03 avg60=0.72 avg300=6.94 total=71795487\nfull avg10=0.00 total=0\n"
    assert parse_psi_some_us(psi) == 71795487
    assert parse_psi_some_us("") is None
    s = host_sample(12.3456, stat_text=stat, psi_text=None, num_cpus=2)
    assert s == {
        "t": 12.346,
        "cpu_busy_jiffies": 170,
        "cpu_total_jiffies": 1010,
        "psi_cpu_some_us": None,
        "num_cpus": 2,
    }


def test_what_a_chaos_pause_did_is_left_out() -> None:
    from lab.run.runner import paused_intervals

    snap = _snap("decode-0", "timeline", late_frac=0.0)
    snap["steps"][40] = [snap["steps"][40][0], 100.0, 1100.0, 1000.0]  # stopped for 1 s
    lab = {"decode-0": [snap]}
    assert assess(lab, [], window=(T0, T1))["verdict"] == "host-bound"
    log = [
        {"t": 4.05, "node": "decode-0", "action": "stop", "result": "decode-0 stop"},
        {"t": 5.05, "node": "decode-0", "action": "cont", "result": "decode-0 cont"},
        {"t": 6.0, "node": "prefill-0", "nic": "snic", "changes": {}, "result": "set"},
        {"t": 8.0, "node": "decode-1", "action": "kill", "result": "killed"},
    ]
    paused = paused_intervals(log, T0, T1)
    assert paused == {"decode-0": [(T0 + 4.05, T0 + 5.05)], "decode-1": [(T0 + 8.0, T1)]}
    eh = assess(lab, [], window=(T0, T1), paused=paused)
    assert eh["verdict"] == "healthy"
    assert eh["processes"]["decode-0/timeline"]["steps"]["num_steps"] < 100

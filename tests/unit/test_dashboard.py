"""The live dashboard's pure parts: NIC rows from two counter samples, frames, and the
timeline's events from the step logs."""

from __future__ import annotations

from typing import Any

import pytest

from lab.run.dashboard import HOST_WINDOW_S, TimelineTap, describe, frame, nic_rows, recent_host


def _nic(egress: int, ingress: int, **extra: Any) -> dict[str, Any]:
    return {
        "egress_bytes": egress,
        "ingress_bytes": ingress,
        "egress_backlog_bytes": 0,
        "ingress_backlog_bytes": 3000,
        "egress_drops": 0,
        "ingress_drops": 2,
        "rate_mbit": 20.0,
        **extra,
    }


def _sample(t: float, snic: tuple[int, int], **extra: Any) -> dict[str, Any]:
    return {
        "t": t,
        "nodes": {
            "prefill-0": {"snic": _nic(*snic, **extra), "mgmt": _nic(9, 9, rate_mbit=None)},
        },
    }


def test_rows_are_rates_between_samples_and_leave_unshaped_nics_out() -> None:
    rows = nic_rows(_sample(10.0, (0, 1_000_000)), _sample(12.0, (250_000, 3_500_000)))
    assert [(r["node"], r["nic"]) for r in rows] == [("prefill-0", "snic")]  # no mgmt
    ingress = rows[0]["ingress"]
    assert ingress["bytes"] == 3_500_000
    assert ingress["mbit"] == pytest.approx(10.0)  # 2.5 MB in 2 s
    assert ingress["percent"] == pytest.approx(50.0)  # of 20 Mbit/s
    assert (ingress["backlog_bytes"], ingress["drops"]) == (3000, 2)
    assert rows[0]["egress"]["mbit"] == pytest.approx(1.0)


def test_a_direction_with_its_own_rate_is_judged_against_it() -> None:
    rows = nic_rows(
        _sample(0.0, (0, 0), ingress_rate_mbit=5.0),
        _sample(1.0, (0, 625_000), ingress_rate_mbit=5.0),
    )
    assert rows[0]["ingress"]["rate_mbit"] == 5.0
    assert rows[0]["ingress"]["percent"] == pytest.approx(100.0)
    assert rows[0]["egress"]["rate_mbit"] == 20.0


def test_the_first_sample_has_totals_but_no_rate_yet() -> None:
    (row,) = nic_rows(None, _sample(1.0, (10, 20)))
    assert row["ingress"]["bytes"] == 20
    assert row["ingress"]["mbit"] is None and row["ingress"]["percent"] is None


def test_a_frame_carries_the_last_sample_time_and_what_is_new() -> None:
    samples = [_sample(1.0, (0, 0)), _sample(2.0, (0, 0)), _sample(3.0, (0, 125_000))]
    f = frame(
        samples,
        now=99.0,
        origin=0.5,
        turns={"turns_done": 3},
        ttft=[(2.5, 0.1234567)],
        events=[{"wall": 2.0, "text": "x", "error": None}],
    )
    assert f["wall"] == 3.0 and f["origin"] == 0.5
    assert f["nics"][0]["ingress"]["mbit"] == pytest.approx(1.0)
    assert f["turns"] == {"turns_done": 3}
    assert f["ttft"] == [[2.5, 0.1235]]
    assert f["events"] == [{"wall": 2.0, "text": "x", "error": None}]
    empty = frame([], now=99.0, origin=0.5, turns=None)
    assert empty["wall"] == 99.0 and empty["nics"] == [] and empty["turns"] is None


def test_events_say_what_changed_where_and_by_whom() -> None:
    link = {
        "node": "prefill-0",
        "nic": "snic",
        "source": "events[2] (ramp)",
        "changes": {"rate_mbit": 12.5, "loss_pct": 5.0, "up": False},
    }
    assert describe(link, by_hand=False) == (
        "prefill-0 snic: rate 12.5 Mbit/s, loss 5%, link down (scenario events[2])"
    )
    assert describe({"node": "decode-0", "action": "kill"}, by_hand=True) == (
        "decode-0: kill (by hand)"
    )


def test_the_tap_turns_new_log_entries_into_timed_events_once() -> None:
    scenario: list[dict[str, Any]] = [
        {"t": 2.0, "node": "decode-0", "action": "stop", "source": "events[0] (node)"}
    ]
    by_hand: list[dict[str, Any]] = [
        {"wall": 1005.0, "node": "decode-0", "action": "cont", "error": "ProcessLookupError"}
    ]
    tap = TimelineTap()
    first = tap.new(scenario, 1000.0, by_hand=False) + tap.new(by_hand, 1000.0, by_hand=True)
    assert [(e["wall"], e["error"]) for e in first] == [
        (1002.0, None),
        (1005.0, "ProcessLookupError"),
    ]
    assert first[1]["text"] == "decode-0: cont (by hand)"
    assert tap.new(scenario, 1000.0, by_hand=False) == []  # seen
    scenario.append({"t": 4.0, "node": "decode-0", "action": "cont", "source": "events[1] (node)"})
    assert [e["wall"] for e in tap.new(scenario, 1000.0, by_hand=False)] == [1004.0]


def _host(t: float, busy: int, total: int, psi_us: int) -> dict[str, Any]:
    return {
        "t": t,
        "cpu_busy_jiffies": busy,
        "cpu_total_jiffies": total,
        "psi_cpu_some_us": psi_us,
        "num_cpus": 2,
    }


def test_the_host_figures_are_over_the_latest_window_only() -> None:
    old = [_host(t, 100 * t, 100 * t, 0) for t in range(10)]  # 100 % busy long ago
    recent = [
        _host(9.0 + i, 900 + 25 * i, 900 + 100 * i, 250_000 * i) for i in range(1, 6)
    ]  # then 25 % busy, stalled a quarter of the time
    figures = recent_host(old + recent)
    assert HOST_WINDOW_S == 5.0
    assert figures is not None
    assert figures["cpu_busy_pct"] == pytest.approx(25.0)
    assert figures["psi_cpu_some_share"] == pytest.approx(0.25)
    assert recent_host(recent[:1]) is None
    assert frame([], now=1.0, origin=0.0, turns=None, host=old + recent)["host"] == figures

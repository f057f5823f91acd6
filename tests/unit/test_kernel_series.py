"""Per-class and queue columns of the time series, and the summary's kernel_counters."""

from __future__ import annotations

from typing import Any

from lab.results.kernel_series import counter_summary, merge_rows, queue_series
from lab.results.metrics import throughput_series


def _cls(nbytes: int, drops: int = 0, backlog: int = 0) -> dict[str, int]:
    return {
        "bytes": nbytes,
        "packets": nbytes // 1000,
        "drops": drops,
        "backlog_bytes": backlog,
        "backlog_packets": backlog // 1514,
        "overlimits": drops * 2,
    }


def _cnic(t: int) -> dict[str, Any]:
    """A cnic whose kv class sends 1 MB/s and queues 1514 bytes more every second."""
    return {
        "egress_bytes": 1_000_000 * t + 1000 * t,
        "ingress_bytes": 10 * t,
        "egress_packets": 1000 * t,
        "ingress_packets": t,
        "egress_drops": t,
        "ingress_drops": 0,
        "egress_overlimits": 5 * t,
        "ingress_overlimits": 0,
        "egress_backlog_bytes": 1514 * t,
        "ingress_backlog_bytes": 0,
        "rate_mbit": 100.0,
        "egress_classes": {"collective": _cls(1000 * t), "kv": _cls(1_000_000 * t, t, 1514 * t)},
        "ingress_classes": {"collective": _cls(0), "kv": _cls(10 * t)},
    }


def _samples(n: int = 4) -> list[dict[str, Any]]:
    return [
        {
            "t": 100.0 + t,
            "nodes": {
                "prefill-0": {"cnic": _cnic(t)},
                "storage-0": {"snic": {"egress_bytes": 5 * t, "ingress_bytes": 0}},
            },
        }
        for t in range(n)
    ]


def test_queue_series_has_class_throughput_backlog_and_drops_per_interval() -> None:
    rows = queue_series(_samples(), start=100.0)
    assert [r["t"] for r in rows] == [1.0, 2.0, 3.0]
    last = rows[-1]
    assert last["prefill-0/cnic/egress_backlog_bytes"] == 3 * 1514
    assert last["prefill-0/cnic/egress_drops"] == 1
    assert last["prefill-0/cnic/egress/kv_mbit"] == 8.0
    assert last["prefill-0/cnic/egress/collective_mbit"] == 0.008
    assert last["prefill-0/cnic/egress/kv_backlog_bytes"] == 3 * 1514
    assert last["prefill-0/cnic/egress/kv_drops"] == 1
    # An unshaped NIC (no backlog field, no classes) reads as an empty queue.
    assert last["storage-0/snic/egress_backlog_bytes"] == 0
    assert not any(k.startswith("storage-0/snic/egress/") for k in last)


def test_merged_rows_keep_the_throughput_columns() -> None:
    samples = _samples()
    rows = merge_rows(throughput_series(samples, 100.0), queue_series(samples, 100.0))
    assert rows[0]["prefill-0/cnic/egress_mbit"] == 8.008
    assert rows[0]["prefill-0/cnic/egress/kv_mbit"] == 8.0


def test_counter_summary_gives_growth_over_the_window_and_the_backlog_seen() -> None:
    got = counter_summary(_samples(6), start=101.0, end=104.0)
    egress = got["prefill-0"]["cnic"]["egress"]
    assert egress["bytes"] == 3 * 1_001_000
    assert egress["packets"] == 3000
    assert egress["drops"] == 3
    assert egress["overlimits"] == 15
    assert egress["backlog_bytes_max"] == 4 * 1514
    assert egress["backlog_bytes_mean"] == round(1514 * (1 + 2 + 3 + 4) / 4)
    kv = egress["classes"]["kv"]
    assert (kv["bytes"], kv["drops"], kv["backlog_bytes_max"]) == (3_000_000, 3, 4 * 1514)
    assert "classes" not in got["storage-0"]["snic"]["egress"]


def test_counter_summary_reaches_past_the_edges_when_no_sample_falls_on_them() -> None:
    got = counter_summary(_samples(6), start=101.5, end=103.5)
    assert got["prefill-0"]["cnic"]["egress"]["bytes"] == 3 * 1_001_000  # samples 1 .. 4
    assert counter_summary(_samples(1), start=100.0, end=101.0) == {}

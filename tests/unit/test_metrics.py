"""summary.json arithmetic: percentiles, utilisation from counters, byte accounting."""

from __future__ import annotations

from typing import Any

import pytest

from lab.results.balance import attention_balance_summary, snic_balance
from lab.results.metrics import nic_utilisation, recovery, summarize, throughput_series
from lab.results.stats import percentiles


def sample(t: float, snic_in: int, rate: float = 100.0) -> dict[str, Any]:
    nic = {"ingress_bytes": snic_in, "egress_bytes": 0, "rate_mbit": rate}
    return {"t": t, "nodes": {"prefill-0": {"snic": nic}}}


def test_percentiles() -> None:
    p = percentiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert p["p50"] == 3.0 and p["max"] == 5.0 and p["mean"] == 3.0
    assert percentiles([])["p50"] is None


def test_utilisation_uses_counter_deltas_over_the_window() -> None:
    # 12.5 MB/s = 100 Mbit/s between t=1 and t=3; the samples outside the window are ignored
    samples = [sample(0.0, 0), sample(1.0, 1_000_000), sample(3.0, 26_000_000), sample(9.0, 0)]
    u = nic_utilisation(samples[:3], 1.0, 3.0)["prefill-0"]["snic"]
    assert u["ingress_util"] == pytest.approx(1.0)
    assert u["ingress_bytes"] == 25_000_000
    rows = throughput_series(samples[:3], 0.0)
    assert rows[-1]["prefill-0/snic/ingress_mbit"] == pytest.approx(100.0)


def _turn(**kw: Any) -> dict[str, Any]:
    base = {
        "traj_id": 0,
        "turn_index": 0,
        "prompt_tokens": 100,
        "gen_tokens": 12,
        "submitted_at": 0.0,
        "first_token_at": 1.0,
        "second_token_at": 1.5,
        "done_at": 2.5,
        "read_side": "decode",
        "error": None,
    }
    return {**base, **kw}


def _summary(driver: dict[str, Any], *, faults_injected: bool = False) -> dict[str, Any]:
    return summarize(
        policy="dualpath",
        backend="local",
        config_name="x",
        time_dilation=10.0,
        driver=driver,
        samples=[],
        num_agents=2,
        faults_injected=faults_injected,
    )


def test_summary_accounts_bytes_and_reports_failures() -> None:
    driver = {
        "started_at": 0.0,
        "finished_at": 10.0,
        "jct_s": 10.0,
        "turns": [_turn(), _turn(traj_id=1, error="decode-0: corrupt KV", done_at=None)],
        "cluster": {
            "prefill-0": {"counters": {"bytes_verified": 700, "bytes_pd_sent": 300}},
            "decode-0": {"counters": {"bytes_verified": 600, "bytes_relay_sent": 200}},
        },
        "storage_before": {"storage-0": {"bytes_read": 0}},
        "storage_after": {"storage-0": {"bytes_read": 800}},
    }
    s = _summary(driver)
    assert s["bytes_accounted"] and s["bytes_verified"] == 1300
    assert s["turns_done"] == 1 and s["turns_failed"] == 1
    assert s["errors"] == ["traj 1 turn 0: decode-0: corrupt KV"]
    assert s["real_jct_s"] == pytest.approx(1.0)
    assert s["ttft_s"]["p50"] == 1.0 and s["ttst_s"]["p50"] == 0.5
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)  # 1 s over 10 tokens
    driver["storage_after"] = {"storage-0": {"bytes_read": 900}}
    s2 = _summary(driver)
    assert not s2["bytes_accounted"]


def test_a_lost_peer_is_a_failure_unless_a_fault_was_injected() -> None:
    lost = "relay to decode-0 for t1 on prefill-0 failed: ConnectionResetError()"
    driver = {
        "started_at": 0.0,
        "finished_at": 10.0,
        "jct_s": 10.0,
        "turns": [_turn()],
        "cluster": {
            "prefill-0": {
                "boot": "p1",
                "counters": {"errors_transient": 1, "last_transient_errors": [lost]},
            },
        },
    }
    calm = _summary(driver)
    assert calm["errors"] == [f"prefill-0: {lost}"] and calm["node_errors"] == 1
    chaos = _summary(driver, faults_injected=True)
    assert chaos["errors"] == [] and chaos["node_errors"] == 0
    assert chaos["fault_errors"] == {"count": 1, "recent": [f"prefill-0: {lost}"]}


def test_slo_attainment_on_the_real_clock() -> None:
    # tau = 10: TTFT 1 s emulated = 0.1 s real; TPOT 100 ms emulated = 10 ms real -> met
    met = _turn()
    slow_first = _turn(traj_id=1, first_token_at=41.0, second_token_at=41.5, done_at=42.5)
    slow_decode = _turn(traj_id=2, done_at=1.5 + 10 * 0.6)  # TPOT 600 ms emulated = 60 ms real
    one_token = _turn(traj_id=3, gen_tokens=1, second_token_at=None, done_at=1.0)
    failed = _turn(traj_id=4, error="x", done_at=None)
    turns = [met, slow_first, slow_decode, one_token, failed]
    driver = {"started_at": 0.0, "finished_at": 50.0, "jct_s": 50.0, "turns": turns}
    slo = _summary(driver)["slo"]
    assert (slo["ttft_s"], slo["tpot_ms"]) == (4.0, 50.0)
    assert slo["attained"] == pytest.approx(2 / 5)  # met and one_token


def test_snic_balance_is_max_over_avg_of_read_bytes() -> None:

    def two(t: float, a: int, b: int) -> dict[str, Any]:
        nic = lambda v: {"snic": {"ingress_bytes": v, "egress_bytes": 0, "rate_mbit": 100.0}}  # noqa: E731
        return {"t": t, "nodes": {"prefill-0": nic(a), "decode-0": nic(b), "storage-0": nic(0)}}

    samples = [two(0.0, 0, 0), two(1.0, 300, 100), two(2.0, 400, 400)]
    bal = snic_balance(samples, 0.0, 2.0)
    assert bal["num_nodes"] == 2
    assert bal["whole_run"] == pytest.approx(1.0)  # 400 vs 400 over the run
    # interval 1: 300/200 = 1.5; interval 2: 300/200 = 1.5
    assert bal["mean_interval"] == pytest.approx(1.5)
    assert snic_balance(samples[:1], 0.0, 2.0)["whole_run"] is None


def test_attention_balance_summary_splits_early_steps_and_all_busy_steps() -> None:
    rows = [
        [100.0, 1.02, 4, 4],  # early, every GPU busy
        [101.0, 1.10, 4, 4],  # early
        [102.0, 4.00, 1, 4],  # early, three GPUs idle
        [105.0, 2.00, 2, 4],  # later, half the GPUs idle
        [109.0, 4.00, 1, 4],
        [200.0, 9.00, 1, 4],  # after the window: ignored
    ]
    out = attention_balance_summary({"prefill-0": rows}, 100.0, 110.0)
    assert out["early_window_s"] == 2.5
    assert out["early_mean"] == 2.04
    assert out["all_busy_mean"] == 1.06
    assert out["early_all_busy_mean"] == 1.06
    assert out["early_all_busy_p50"] == 1.06
    assert out["mean"] == round((1.02 + 1.10 + 4.0 + 2.0 + 4.0) / 5, 4)
    assert out["nodes"]["prefill-0"]["num_steps"] == 5


def test_attention_balance_summary_without_steps() -> None:
    out = attention_balance_summary({}, 0.0, 10.0)
    assert out["early_mean"] is None and out["mean"] is None and out["nodes"] == {}
    assert out["early_all_busy_p50"] is None


def _reads(t: float, **cum: float) -> dict[str, Any]:
    """A sample with cumulative snic read bytes per engine node (plus a storage node)."""

    def nic(v: float) -> dict[str, Any]:
        return {"snic": {"ingress_bytes": int(v), "egress_bytes": 0, "rate_mbit": 100.0}}

    nodes = {node.replace("_", "-"): nic(v) for node, v in cum.items()}
    nodes["storage-0"] = nic(10**9 * t)  # never counted: not an engine node
    return {"t": t, "nodes": nodes}


def test_snic_balance_windows_remove_burst_noise() -> None:

    # the two nodes take turns: each 0.5 s interval only one of them reads, yet over any
    # 5 s window both read exactly as much
    samples, p, d = [], 0, 0
    for k in range(21):
        samples.append(_reads(0.5 * k, prefill_0=p, decode_0=d))
        if k % 2 == 0:
            p += 100
        else:
            d += 100
    bal = snic_balance(samples, 0.0, 10.0, window_s=5.0, busy_fraction=1.0)
    assert bal["mean_interval"] == pytest.approx(2.0)
    assert bal["num_windows"] == 2
    assert bal["mean_window"] == pytest.approx(1.0)
    assert bal["max_window"] == pytest.approx(1.0)
    assert bal["busy_s"] == pytest.approx(10.0)


def test_snic_balance_busy_part_excludes_the_drain_tail() -> None:

    # both nodes read 100 B/s for 8 s, then only prefill-0 reads 50 B/s for 2 s
    samples = [
        _reads(
            float(t), prefill_0=100 * t if t <= 8 else 800 + 50 * (t - 8), decode_0=100 * min(t, 8)
        )
        for t in range(11)
    ]
    bal = snic_balance(samples, 0.0, 10.0, window_s=2.0, busy_fraction=0.9)
    assert bal["whole_run"] == pytest.approx(900 / 850, abs=1e-4)
    # 90 % of 1,700 B = 1,530 B, read at 7 + 130/200 s
    assert bal["busy_s"] == pytest.approx(7.65)
    assert bal["busy"] == pytest.approx(1.0)
    # windows [0,2] [2,4] [4,6] and the last 1.65 s (>= half a window: kept)
    assert bal["num_windows"] == 4
    assert bal["mean_window"] == pytest.approx(1.0)
    # a last piece shorter than half a window is dropped: [0,2.5] [2.5,5] [5,7.5]
    assert snic_balance(samples, 0.0, 10.0, window_s=2.5)["num_windows"] == 3
    # the whole run, tail included: the last window [8,10] is 100 B vs 0 B
    full = snic_balance(samples, 0.0, 10.0, window_s=2.0, busy_fraction=1.0)
    assert full["busy_s"] == pytest.approx(10.0)
    assert full["num_windows"] == 5
    assert full["max_window"] == pytest.approx(2.0)
    assert full["mean_window"] == pytest.approx(1.2)


def test_snic_balance_interpolates_counters_at_window_edges() -> None:

    # prefill-0 reads 100 B/s; decode-0 reads 0, then 100, then 200 B/s in 2 s steps
    samples = [
        _reads(0.0, prefill_0=0, decode_0=0),
        _reads(2.0, prefill_0=200, decode_0=0),
        _reads(4.0, prefill_0=400, decode_0=200),
        _reads(6.0, prefill_0=600, decode_0=600),
    ]
    bal = snic_balance(samples, 0.0, 6.0, window_s=3.0, busy_fraction=1.0)
    # [0,3]: 300 vs 100 -> 1.5; [3,6]: 300 vs 500 -> 1.25
    assert bal["num_windows"] == 2
    assert bal["mean_window"] == pytest.approx(1.375)
    assert bal["max_window"] == pytest.approx(1.5)
    assert bal["busy"] == pytest.approx(1.0)
    assert bal["whole_run"] == pytest.approx(1.0)


def test_snic_balance_without_reads_or_with_bad_arguments() -> None:

    idle = [_reads(float(t), prefill_0=0, decode_0=0) for t in range(5)]
    bal = snic_balance(idle, 0.0, 4.0)
    assert bal["num_nodes"] == 2
    assert bal["whole_run"] is None and bal["mean_window"] is None and bal["num_windows"] == 0
    with pytest.raises(ValueError, match="window_s"):
        snic_balance(idle, 0.0, 4.0, window_s=0.0)
    with pytest.raises(ValueError, match="busy_fraction"):
        snic_balance(idle, 0.0, 4.0, busy_fraction=1.5)


def test_utilisation_uses_the_rate_in_effect_over_time() -> None:
    """A link cut from 100 to 50 Mbit/s half-way and run full all along is 100 % busy."""
    samples = []
    for t in range(11):
        rate = 100.0 if t < 5 else 50.0
        sent = 100e6 / 8 * min(t, 5) + 50e6 / 8 * max(t - 5, 0)
        nic = {"ingress_bytes": int(sent), "egress_bytes": 0, "rate_mbit": rate}
        samples.append({"t": float(t), "nodes": {"prefill-0": {"snic": nic}}})
    u = nic_utilisation(samples, 0.0, 10.0)["prefill-0"]["snic"]
    assert u["ingress_util"] == 1.0
    assert u["ingress_mean_rate_mbit"] == 75.0 and u["rate_mbit"] == 50.0


def test_ttft_breakdown_splits_each_turn_at_its_events() -> None:
    # turn 0: queued 1, KV load 2, prefill 1 (TTFT 4)
    a = _turn(read_started_at=1.0, prefill_started_at=3.0, first_token_at=4.0, second_token_at=4.5)
    # turn 1 reads nothing (Oracle): queued until its first step (3), prefill 1
    b = _turn(
        traj_id=1, prefill_started_at=3.0, first_token_at=4.0, second_token_at=4.5, done_at=5.0
    )
    old = _turn(traj_id=2)  # a results file from before the events were recorded
    driver = {"started_at": 0.0, "finished_at": 6.0, "jct_s": 6.0, "turns": [a, b, old]}
    got = _summary(driver)["ttft_breakdown"]
    assert (got["num_turns"], got["num_without_events"]) == (2, 1)
    assert got["queue_mean_s"] == pytest.approx(2.0)
    assert got["load_mean_s"] == pytest.approx(1.0)
    assert got["prefill_mean_s"] == pytest.approx(1.0)
    assert (got["queue_share"], got["load_share"], got["prefill_share"]) == (
        pytest.approx(0.5),
        pytest.approx(0.25),
        pytest.approx(0.25),
    )
    none = _summary({**driver, "turns": [old]})["ttft_breakdown"]
    assert none["num_turns"] == 0 and none["queue_share"] is None


def test_tpot_ends_at_the_last_token_not_at_done() -> None:
    # decoding ended at 2.0; persisting the new blocks took until 2.5
    turn = _turn(last_token_at=2.0)
    s = _summary({"started_at": 0.0, "finished_at": 3.0, "jct_s": 3.0, "turns": [turn]})
    assert s["tpot_ms"]["p50"] == pytest.approx(50.0)  # 0.5 s over 10 tokens


def test_recovery_finds_the_longest_stall_after_the_fault() -> None:
    def at(t: float, p0: int, d0: int) -> dict[str, Any]:
        nic = lambda b: {"snic": {"ingress_bytes": b}}  # noqa: E731
        return {"t": t, "nodes": {"prefill-0": nic(p0), "decode-0": nic(d0), "storage-0": {}}}

    # prefill-0 reads every 0.5 s; decode-0 stalls from t=10.5 to t=14 after the fault at 10
    samples = [at(9.5 + 0.5 * i, 100 * i, 100 * min(i, 2) + 100 * max(0, i - 8)) for i in range(12)]
    turns = [_turn(done_at=t) for t in (9.0, 11.0, 12.0, 15.5)] + [_turn(done_at=None)]
    r = recovery(samples, turns, since=10.0, end=20.0)
    assert r["longest_read_gap_s"] == {"decode-0": 3.5, "prefill-0": 0.5}
    assert r["longest_gap_between_turns_done_s"] == 3.5
    assert r["longest_read_gap_while_up_s"] == r["longest_read_gap_s"]
    # decode-0 was killed 11-13 s: its stall is its own outage, not a stall while up
    r = recovery(samples, turns, since=10.0, end=20.0, down={"decode-0": [(11.0, 13.0)]})
    assert r["longest_read_gap_while_up_s"] == {"decode-0": 0.5, "prefill-0": 0.5}
    assert (
        recovery(samples, turns, since=30.0, end=40.0)["longest_gap_between_turns_done_s"] is None
    )

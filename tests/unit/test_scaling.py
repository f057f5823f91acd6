"""`scaling: auto`: parsing, and the pure choice of k and tau from a host calibration."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.config.models import ConfigError, load_config, parse_config, parse_settings
from lab.config.scaling import (
    MIN_LINK_MBIT,
    MIN_STEP_MS,
    REFERENCE_CPU_S_PER_GB,
    REFERENCE_CPUS,
    HostCalibration,
    capacity_gbit_per_s,
    choose_scaling,
    kv_gbit_per_unit_k,
    resolve,
)

REFERENCE = HostCalibration(
    cpus=REFERENCE_CPUS, cpu_s_per_gb=REFERENCE_CPU_S_PER_GB, timer_late_p99_ms=0.5, seconds=2.0
)


def test_scaling_auto_marks_both_fields() -> None:
    cfg = parse_config({"scaling": "auto"})
    assert cfg.scaling.auto == ("bandwidth_scale", "time_dilation")


def test_one_field_on_auto() -> None:
    cfg = parse_config({"scaling": {"bandwidth_scale": "auto", "time_dilation": 20}})
    assert cfg.scaling.auto == ("bandwidth_scale",)
    assert cfg.scaling.time_dilation == 20


def test_explicit_values_win_over_auto(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("scaling: auto\n")
    cfg = load_config(path, parse_settings(["scaling.bandwidth_scale=0.001"]))
    assert cfg.scaling.auto == ("time_dilation",)
    assert cfg.scaling.bandwidth_scale == 0.001


def test_a_bad_scaling_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"scaling\.bandwidth_scale"):
        parse_config({"scaling": {"bandwidth_scale": "fast"}})


def test_reference_host_gets_the_reference_capacity() -> None:
    assert capacity_gbit_per_s(REFERENCE) == pytest.approx(3.0)
    slower = HostCalibration(2, 2 * REFERENCE_CPU_S_PER_GB, 0.5, 2.0)
    assert capacity_gbit_per_s(slower) == pytest.approx(1.5)
    bigger = HostCalibration(8, REFERENCE_CPU_S_PER_GB, 0.5, 2.0)
    assert capacity_gbit_per_s(bigger) == pytest.approx(12.0)


def test_auto_k_keeps_the_peak_kv_rate_within_half_the_capacity() -> None:
    cfg = parse_config({"scaling": "auto", "cluster": {"prefill_nodes": 2, "decode_nodes": 4}})
    choice = choose_scaling(cfg, REFERENCE)
    assert choice.auto == ("bandwidth_scale", "time_dilation")
    assert choice.peak_kv_gbit_per_s <= 0.5 * choice.capacity_gbit_per_s
    # and not needlessly small: the next rounded step up would exceed it
    assert choice.peak_kv_gbit_per_s > 0.2 * choice.capacity_gbit_per_s
    assert choice.bandwidth_scale * kv_gbit_per_unit_k(cfg) == pytest.approx(
        choice.peak_kv_gbit_per_s, rel=1e-3
    )


def test_auto_tau_makes_the_shortest_step_long_enough() -> None:
    cfg = parse_config({"scaling": "auto", "model": {"prefill_base_ms": 5, "decode_base_ms": 8}})
    choice = choose_scaling(cfg, REFERENCE)
    assert choice.min_step_ms >= MIN_STEP_MS
    assert choice.time_dilation == 10  # 50 ms / 5 ms, a round value
    jittery = HostCalibration(2, REFERENCE_CPU_S_PER_GB, timer_late_p99_ms=5.0, seconds=2.0)
    assert choose_scaling(cfg, jittery).min_step_ms >= 20 * 5.0


def test_links_are_not_scaled_below_the_floor() -> None:
    cfg = parse_config({"scaling": "auto", "cluster": {"prefill_nodes": 16, "decode_nodes": 16}})
    crawling = HostCalibration(1, 100 * REFERENCE_CPU_S_PER_GB, 0.5, 2.0)
    choice = choose_scaling(cfg, crawling)
    assert cfg.cluster.snic_gbit * 1000 * choice.bandwidth_scale >= MIN_LINK_MBIT
    assert any("may not carry" in n for n in choice.notes)


def test_explicit_fields_are_kept_and_resolve_clears_auto() -> None:
    cfg = parse_config({"scaling": {"bandwidth_scale": "auto", "time_dilation": 7}})
    choice = choose_scaling(cfg, REFERENCE)
    assert choice.time_dilation == 7 and choice.auto == ("bandwidth_scale",)
    done = resolve(cfg, choice)
    assert done.scaling.auto == ()
    assert done.scaling.bandwidth_scale == choice.bandwidth_scale
    assert done.scaling.time_dilation == 7

"""§4.2 bottleneck-free P/D range: paper example, boundaries, infeasible shapes, every binding
constraint, per-resource loads, formatting and input checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.config.models import LabConfig, load_config
from scheduler.analysis import (
    Analysis,
    Resource,
    analyze,
    analyze_lab,
    format_analysis,
    format_lab_analysis,
    pd_range,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def paper(p: int, d: int) -> Analysis:
    """8 GPUs x 400 Gbit/s CNIC, one 400 Gbit/s SNIC, 500 GB/s DRAM per node (DualPath §2)."""
    return analyze(p, d, 8, 400, 400, 500)


def test_paper_example() -> None:
    r = pd_range(8, 1, 10)
    assert r.feasible
    assert r.lower == pytest.approx(1 / 7)
    assert r.upper == pytest.approx(7 / 2)
    assert dict(r.uppers) == {
        Resource.DECODE_CNIC_OUT: pytest.approx(6.0),
        Resource.DECODE_CNIC_IN: pytest.approx(3.5),
        Resource.DECODE_DRAM: pytest.approx(3.5),
    }
    # (g-s)/(2s) and (M/(Bs)-3)/2 tie at 7/2: the first is reported, a note names the other
    assert r.binding_upper is Resource.DECODE_CNIC_IN
    assert any("decode-node DRAM" in n for n in r.notes)


def test_config_figures_give_s_and_m_over_bs() -> None:
    a = paper(2, 4)
    assert a.s == 1.0 and a.m_over_bs == 10.0
    assert a.pd_range == pd_range(8, 1, 10)
    b = analyze(1, 1, 8, 200, 400, 500)  # SNIC twice a GPU's CNIC
    assert b.s == 2.0 and b.m_over_bs == 10.0


def test_paper_setups_are_inside() -> None:
    for p, d in [(2, 4), (1, 1), (1, 2), (2, 1)]:
        a = paper(p, d)
        assert a.inside and a.violated == () and a.first_saturated is None
        assert a.pd_range.contains(p / d)


def test_boundaries_are_inside_and_one_step_beyond_is_not() -> None:
    low = paper(1, 7)  # P/D = 1/7 exactly: prefill CNIC in at 100 %
    assert low.inside
    assert low.tightest.resource is Resource.PREFILL_CNIC_IN
    assert low.tightest.utilisation == pytest.approx(1.0)
    below = paper(1, 8)
    assert not below.inside
    assert below.violated == (Resource.PREFILL_CNIC_IN,)
    assert below.first_saturated is not None
    assert below.first_saturated.load_gbit_per_s == pytest.approx(400 * 9)
    assert below.first_saturated.capacity_gbit_per_s == pytest.approx(3200)

    high = paper(7, 2)  # P/D = 7/2 exactly: decode CNIC in and decode DRAM at 100 %
    assert high.inside
    above = paper(4, 1)
    assert not above.inside
    assert set(above.violated) == {Resource.DECODE_CNIC_IN, Resource.DECODE_DRAM}
    assert above.first_saturated is not None
    assert above.first_saturated.utilisation == pytest.approx(3600 / 3200)


def test_g2_s1_has_no_feasible_range() -> None:
    r = pd_range(2, 1, 10)
    assert not r.feasible
    assert r.lower == pytest.approx(1.0) and r.upper == pytest.approx(0.0)
    assert r.binding_upper is Resource.DECODE_CNIC_OUT
    assert not r.contains(1.0)
    assert any("no P/D is bottleneck-free" in n for n in r.notes)
    a = analyze(1, 1, 2, 400, 400, 500)
    assert not a.inside
    assert Resource.DECODE_CNIC_OUT in a.violated


def test_s_above_half_g_is_named() -> None:
    r = pd_range(8, 5, 10)
    assert not r.feasible
    assert any("g/2" in n and "PE-read" in n for n in r.notes)
    a = analyze(1, 1, 2, 100, 150, 500)  # s = 1.5 > g/2 = 1
    assert Resource.PREFILL_CNIC_OUT in a.violated
    assert pd_range(4, 4, 10).lower == math.inf  # s >= g: no ratio feeds the PEs
    assert not pd_range(4, 4, 10).feasible


@pytest.mark.parametrize(
    "g, s, m, binding",
    [
        (8, 2.9, 100.0, Resource.DECODE_CNIC_OUT),  # g/s in [2.62, 3): (g-2s)/s is smallest
        (8, 1.0, 20.0, Resource.DECODE_CNIC_IN),
        (8, 1.0, 5.0, Resource.DECODE_DRAM),
    ],
)
def test_each_upper_bound_can_bind(g: int, s: float, m: float, binding: Resource) -> None:
    r = pd_range(g, s, m)
    assert r.feasible
    assert r.binding_upper is binding
    assert r.upper == min(u for _, u in r.uppers)
    assert r.notes == () or all("also set by" not in n for n in r.notes)


@pytest.mark.parametrize(
    "p, d, g, cnic, snic, dram, first",
    [
        (1, 8, 8, 400, 400, 500, Resource.PREFILL_CNIC_IN),
        (4, 5, 8, 100, 290, 10_000, Resource.DECODE_CNIC_OUT),  # s = 2.9, P/D = 0.8 > 0.759
        (4, 1, 8, 400, 400, 10_000, Resource.DECODE_CNIC_IN),
        (2, 1, 8, 400, 400, 250, Resource.DECODE_DRAM),  # M/(Bs) = 5: upper 1 < 2
    ],
)
def test_each_resource_can_saturate_first(
    p: int, d: int, g: int, cnic: float, snic: float, dram: float, first: Resource
) -> None:
    a = analyze(p, d, g, cnic, snic, dram)
    assert not a.inside
    assert a.first_saturated is not None and a.first_saturated.resource is first
    assert a.notes and a.notes[0].startswith(first.label)


def test_prefill_dram_saturates_when_dram_is_below_two_snic_rates() -> None:
    a = analyze(1, 1, 8, 400, 400, 90)  # 720 Gbit/s of DRAM < 2 x 400 Gbit/s
    assert Resource.PREFILL_DRAM in a.violated
    assert a.first_saturated is not None
    assert a.first_saturated.resource is Resource.DECODE_DRAM  # decode DRAM is worse off
    assert not a.pd_range.feasible
    assert any("prefill-node DRAM" in n for n in a.pd_range.notes)


def test_loads_are_the_per_node_model() -> None:
    a = paper(2, 4)  # r = 1/2, sB = 400 Gbit/s
    loads = {x.resource: x.load_gbit_per_s for x in a.loads}
    assert loads == {
        Resource.PREFILL_CNIC_IN: pytest.approx(400 * (1 + 2)),
        Resource.PREFILL_CNIC_OUT: pytest.approx(800),
        Resource.DECODE_CNIC_OUT: pytest.approx(400 * 2.5),
        Resource.DECODE_CNIC_IN: pytest.approx(400 * 2),
        Resource.DECODE_DRAM: pytest.approx(400 * 4),
        Resource.PREFILL_DRAM: pytest.approx(800),
    }
    utils = [x.utilisation for x in a.loads]
    assert utils == sorted(utils, reverse=True)
    assert a.tightest.resource is Resource.DECODE_DRAM  # 1,600 of 4,000 Gbit/s


@given(
    st.integers(1, 64),
    st.integers(1, 64),
    st.integers(1, 16),
    st.sampled_from([100, 200, 400]),
    st.integers(25, 800),
    st.integers(10, 1000),
)
def test_resource_loads_agree_with_the_formula(
    p: int, d: int, g: int, cnic: int, snic: int, dram: int
) -> None:
    a = analyze(p, d, g, cnic, snic, dram)
    assert a.inside == a.pd_range.contains(p / d)
    assert len({x.resource for x in a.loads}) == len(Resource)
    assert set(a.violated) == {x.resource for x in a.loads if x.utilisation > 1 + 1e-9}
    if a.pd_range.feasible:
        assert 0 < a.pd_range.lower <= a.pd_range.upper * (1 + 1e-9)
        assert 2 * a.s <= g
    if not a.inside:
        assert a.first_saturated is a.loads[0] and a.loads[0].utilisation > 1
    # the prefill CNIC out and prefill DRAM loads are dominated by their decode counterparts,
    # so they are never the first to saturate (s <= g/2 is implied by r <= (g-2s)/s)
    util = {x.resource: x.utilisation for x in a.loads}
    assert util[Resource.PREFILL_CNIC_OUT] < util[Resource.DECODE_CNIC_OUT]
    assert util[Resource.PREFILL_DRAM] < util[Resource.DECODE_DRAM]
    assert format_analysis(a)  # never raises


def test_format_analysis() -> None:
    inside = format_analysis(paper(2, 4))
    assert "2P4D" in inside and "1/7" in inside and "7/2" in inside and "inside" in inside
    outside = format_analysis(paper(4, 1))
    assert "OUTSIDE" in outside
    assert Resource.DECODE_CNIC_IN.label in outside and "112%" in outside
    assert "3,600 of 3,200 Gbit/s" in outside
    none = format_analysis(analyze(1, 1, 2, 400, 400, 500))
    assert "range: none" in none
    assert len(outside.splitlines()) <= 10


def test_config_default_and_examples_are_inside() -> None:
    paths = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "outside-range.yaml")
    configs = [LabConfig(), *(load_config(p) for p in paths)]
    for cfg in configs:
        a = cfg.cluster.analysis()
        assert a.inside, format_analysis(a)


@pytest.mark.parametrize(
    "g, s, m, name",
    [
        (0, 1.0, 10.0, "g"),
        (-8, 1.0, 10.0, "g"),
        (True, 1.0, 10.0, "g"),
        (8, 0.0, 10.0, "s"),
        (8, -1.0, 10.0, "s"),
        (8, math.nan, 10.0, "s"),
        (8, math.inf, 10.0, "s"),
        (8, 1.0, 0.0, "m_over_bs"),
        (8, 1.0, -3.0, "m_over_bs"),
    ],
)
def test_pd_range_rejects_nonsense(g: int, s: float, m: float, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        pd_range(g, s, m)


@pytest.mark.parametrize(
    "args, name",
    [
        ((0, 1, 8, 400, 400, 500), "prefill_nodes"),
        ((1, 0, 8, 400, 400, 500), "decode_nodes"),
        ((1, 1, 0, 400, 400, 500), "gpus_per_node"),
        ((1, 1, 8, 0, 400, 500), "cnic_gbit_per_gpu"),
        ((1, 1, 8, 400, -1, 500), "snic_gbit"),
        ((1, 1, 8, 400, 400, math.nan), "dram_gbyte_per_s"),
    ],
)
def test_analyze_rejects_nonsense(
    args: tuple[int, int, int, float, float, float], name: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        analyze(*args)


def test_outside_range_example_is_outside_in_both_models() -> None:
    c = load_config(EXAMPLES / "outside-range.yaml").cluster
    paper, lab = c.analysis(), c.lab_analysis()
    assert not paper.inside and not lab.inside
    assert paper.tightest.resource is Resource.PREFILL_CNIC_IN
    first = lab.first_saturated
    assert first is not None and first.resource is Resource.PREFILL_CNIC_IN
    assert first.utilisation == pytest.approx(1.5)
    assert "OUTSIDE; saturates first: prefill-node CNIC in (relay in" in format_lab_analysis(lab)


@pytest.mark.parametrize(
    ("p", "d", "inside", "first"),
    [
        (1, 1, True, None),
        (1, 4, True, None),  # relay in = 4 snics = the node's cnic exactly
        (1, 5, False, Resource.PREFILL_CNIC_IN),
        (5, 1, False, Resource.DECODE_CNIC_IN),
    ],
)
def test_lab_range_is_snic_over_cnic_to_cnic_over_snic(
    p: int, d: int, inside: bool, first: Resource | None
) -> None:
    a = analyze_lab(p, d, 4, 400, 400)  # node CNIC:SNIC = 4
    assert (a.lower, a.upper) == (0.25, 4.0)
    assert a.inside is inside
    got = a.first_saturated
    assert (got.resource if got else None) is first
    assert a.inside == (a.lower <= a.pd_ratio <= a.upper)

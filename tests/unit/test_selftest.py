"""The self-test's measurement plan and verdicts (pure); the lab side is privileged."""

from __future__ import annotations

import pytest

from lab.config.models import ConfigError, LabConfig
from lab.run.selftest import (
    LinkResult,
    LinkUnderTest,
    SelftestOptions,
    SelftestReport,
    expected_goodput_mbit,
    goodput_from_marks,
    links_of,
    plan_rounds,
    rtt_verdict,
    selftest_topology,
)


def _cfg() -> LabConfig:
    return LabConfig.model_validate(
        {"cluster": {"prefill_nodes": 1, "decode_nodes": 1, "storage_servers": 2}}
    )


def test_topology_is_the_runs_plus_one_unshaped_probe_per_shaped_network() -> None:
    from lab.config.cluster import build_cluster_spec
    from lab.config.topology import topology_for

    cfg = _cfg()
    topo = selftest_topology(cfg, "abc123")
    run = topology_for(
        build_cluster_spec(
            cfg, lab_id="abc123", backend="netns", data_dir=__import__("pathlib").Path("/x")
        ),
        cfg.network.kv_min_fraction,
    )
    assert topo.hosts[: len(run.hosts)] == run.hosts
    probes = topo.hosts[len(run.hosts) :]
    assert [p.node_id for p in probes] == ["probe-compute", "probe-storage"]
    assert all(n.shape is None for p in probes for n in p.nics)
    assert [str(p.nics[0].interface) for p in probes] == ["198.18.0.254/24", "198.18.1.254/24"]


def test_links_are_every_shaped_direction_against_its_networks_probe() -> None:
    links = links_of(selftest_topology(_cfg(), "abc123"))
    names = [x.name for x in links]
    assert names == [
        f"{node}.{nic}.{d}"
        for node in ("prefill-0", "decode-0")
        for nic in ("cnic", "snic")
        for d in ("egress", "ingress")
    ]
    cnic = next(x for x in links if x.nic == "cnic")
    assert (cnic.rate_mbit, cnic.probe) == (400.0, "probe-compute")
    assert next(x for x in links if x.nic == "snic").probe == "probe-storage"


def _link(node: str, nic: str, direction: str, rate: float) -> LinkUnderTest:
    return LinkUnderTest(node, nic, direction, rate, f"probe-{nic}")


def test_rounds_never_hold_both_directions_of_a_nic_and_respect_the_budget() -> None:
    links = links_of(selftest_topology(_cfg(), "abc123"))
    rounds = plan_rounds(links, 1000)
    assert sorted(x.name for r in rounds for x in r) == sorted(x.name for x in links)
    for r in rounds:
        nics = [(x.node, x.nic) for x in r]
        assert len(nics) == len(set(nics))
        assert sum(x.rate_mbit for x in r) <= 1000
    assert len(rounds) == 2  # all egress (1000 Mbit/s) together, then all ingress
    # A link faster than the budget gets a round of its own; budget 0 measures one at a time.
    big = [_link("a", "cnic", "egress", 5000), _link("b", "cnic", "egress", 10)]
    assert [len(r) for r in plan_rounds(big, 1000)] == [1, 1]
    assert len(plan_rounds(links, 0)) == len(links)


def test_expected_goodput_is_the_payload_share_of_the_frames_htb_charges() -> None:
    assert expected_goodput_mbit(100, 1448, 1500) == pytest.approx(100 * 1448 / 1514)
    assert expected_goodput_mbit(400, 1460, 1500) == pytest.approx(400 * 1460 / 1514)


def test_goodput_is_read_after_the_warmup_over_the_measured_span() -> None:
    # 1 MB per 0.1 s, but a burst of 5 MB in the first 0.1 s (the shaper's bucket).
    marks = [(0.0, 5_000_000)] + [(0.1 * i, 5_000_000 + 1_000_000 * i) for i in range(1, 40)]
    assert goodput_from_marks(marks, warmup_s=0.5, seconds=2.0) == pytest.approx(80.0)
    assert goodput_from_marks([], 0.5, 2.0) == 0.0
    assert goodput_from_marks([(0.0, 1)], 0.5, 2.0) == 0.0


def test_rtt_verdicts() -> None:
    assert rtt_verdict(0.05, 0.0, 0.05, None) == "no delay configured"
    assert rtt_verdict(None, 20.0, 0.05, "no sch_netem") == "unavailable (no sch_netem)"
    assert rtt_verdict(20.5, 20.0, 0.05, None) == "ok"
    assert rtt_verdict(25.0, 20.0, 0.05, None) == "OUT of tolerance"
    assert rtt_verdict(1.8, 1.0, 0.05, None) == "ok"  # within the 1 ms floor


def _result(name: str, measured: float, rtt_status: str = "no delay configured") -> LinkResult:
    node, nic, direction = name.split(".")
    link = _link(node, nic, direction, 100)
    return LinkResult(link, measured, 100 * 1448 / 1514, 1448, 1500, 0.05, None, rtt_status)


def test_report_names_every_link_outside_tolerance() -> None:
    report = SelftestReport(
        "laptop",
        "abc123",
        0.05,
        2.0,
        (
            _result("prefill-0.snic.egress", 95.5),
            _result("prefill-0.snic.ingress", 90.0),
            _result("decode-0.snic.egress", 95.6, "OUT of tolerance"),
        ),
        rounds=2,
        elapsed_s=6.0,
    )
    assert not report.passed
    assert report.failures == ["prefill-0.snic.ingress", "decode-0.snic.egress"]
    text = "\n".join(report.lines())
    assert "2 link(s) outside tolerance: prefill-0.snic.ingress, decode-0.snic.egress" in text
    doc = report.as_json()
    assert [x["within_tolerance"] for x in doc["links"]] == [True, False, False]
    assert doc["links"][1]["error"] == pytest.approx(90.0 / (100 * 1448 / 1514) - 1, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tolerance": 0.0}, "--tolerance"),
        ({"tolerance": 1.5}, "--tolerance"),
        ({"seconds": 0.0}, "--selftest-seconds"),
        ({"max_concurrent_mbit": -1.0}, "--max-concurrent-mbit"),
        ({"seconds": float("nan")}, "--selftest-seconds"),
    ],
)
def test_bad_options_name_the_option(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SelftestOptions(**kwargs)  # type: ignore[arg-type]

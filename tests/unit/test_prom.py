"""The Prometheus exposition of a node's kernel counters: families, labels, values."""

from __future__ import annotations

import pytest

from netem.counters import ClassCounters, NicCounters
from services.prom import exported_nodes, metrics_url, parse_samples, render


def _cnic() -> NicCounters:
    return NicCounters(
        egress_bytes=3000,
        ingress_bytes=6000,
        egress_drops=1,
        ingress_drops=2,
        egress_backlog_bytes=1514,
        ingress_backlog_bytes=0,
        rate_mbit=400.0,
        egress_classes={
            "collective": ClassCounters(100, 1, 0),
            "kv": ClassCounters(2900, 2, 1, backlog_bytes=1514, backlog_packets=1, overlimits=7),
        },
        ingress_classes={"collective": ClassCounters(50, 1, 0), "kv": ClassCounters(5950, 4, 2)},
        ingress_rate_mbit=200.0,
        egress_packets=3,
        ingress_packets=5,
        egress_backlog_packets=1,
        egress_overlimits=9,
    )


def _mgmt() -> NicCounters:
    return NicCounters(10, 20, 0, 0, 0, 0, None, egress_packets=1, ingress_packets=2)


def test_every_counter_is_a_sample_with_node_nic_and_direction_labels() -> None:
    text = render("prefill-0", "prefill", {"cnic": _cnic(), "mgmt": _mgmt()})
    got = parse_samples(text)
    lab = 'node="prefill-0",role="prefill"'
    assert got[f'dualpath_nic_bytes_total{{{lab},nic="cnic",direction="egress"}}'] == 3000
    assert got[f'dualpath_nic_bytes_total{{{lab},nic="cnic",direction="ingress"}}'] == 6000
    assert got[f'dualpath_nic_drops_total{{{lab},nic="cnic",direction="ingress"}}'] == 2
    assert got[f'dualpath_nic_backlog_bytes{{{lab},nic="cnic",direction="egress"}}'] == 1514
    assert got[f'dualpath_nic_backlog_packets{{{lab},nic="cnic",direction="egress"}}'] == 1
    assert got[f'dualpath_nic_overlimits_total{{{lab},nic="cnic",direction="egress"}}'] == 9
    assert got[f'dualpath_nic_packets_total{{{lab},nic="mgmt",direction="ingress"}}'] == 2
    kv = f'{lab},nic="cnic",direction="egress",class="kv"'
    assert got[f"dualpath_class_bytes_total{{{kv}}}"] == 2900
    assert got[f"dualpath_class_backlog_bytes{{{kv}}}"] == 1514
    assert got[f"dualpath_class_overlimits_total{{{kv}}}"] == 7
    assert got[f"dualpath_class_drops_total{{{kv}}}"] == 1
    # Per-direction rates, in bit/s; unshaped NICs have none.
    rate = "dualpath_nic_rate_bits_per_second"
    assert got[f'{rate}{{{lab},nic="cnic",direction="egress"}}'] == 400e6
    assert got[f'{rate}{{{lab},nic="cnic",direction="ingress"}}'] == 200e6
    assert not any(k.startswith(rate) and 'nic="mgmt"' in k for k in got)


def test_each_family_has_one_help_and_type_line_before_its_samples() -> None:
    text = render("decode-0", "decode", {"cnic": _cnic(), "snic": _mgmt()})
    lines = text.splitlines()
    types = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    for i, line in enumerate(lines):
        if line.startswith("# TYPE"):
            name, kind = line.split()[2:4]
            assert lines[i - 1].startswith(f"# HELP {name} ")
            assert kind == ("counter" if name.endswith("_total") else "gauge")
        elif not line.startswith("#"):
            family = line.split("{")[0]
            declared = [t for t in types if t == family]
            assert declared, line
    assert text.endswith("\n")


def test_label_values_are_escaped() -> None:
    text = render('odd"node\\x', "prefill", {"cnic": _mgmt()})
    assert 'node="odd\\"node\\\\x"' in text


@pytest.mark.parametrize(
    ("backend", "exported"), [("netns", True), ("compose", True), ("local", False)]
)
def test_only_nodes_with_a_namespace_of_their_own_export(backend: str, exported: bool) -> None:
    assert exported_nodes(backend) is exported


def test_metrics_url() -> None:
    assert metrics_url("198.18.2.10") == "http://198.18.2.10:7600/metrics"

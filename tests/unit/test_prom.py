"""The Prometheus exposition of a node's kernel counters: families, labels, values."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netem.counters import ClassCounters, NicCounters
from services.prom import exported_nodes, metrics_url, parse_samples, render, sample_key


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


def _nic(node: str, nic: str, direction: str, **more: str) -> dict[str, str]:
    return {"node": node, "role": "prefill", "nic": nic, "direction": direction, **more}


def test_every_counter_is_a_sample_with_node_nic_and_direction_labels() -> None:
    text = render("prefill-0", "prefill", {"cnic": _cnic(), "mgmt": _mgmt()})
    got = parse_samples(text)

    def at(name: str, nic: str, direction: str, **more: str) -> float:
        return got[sample_key(name, _nic("prefill-0", nic, direction, **more))]

    assert at("dualpath_nic_bytes_total", "cnic", "egress") == 3000
    assert at("dualpath_nic_bytes_total", "cnic", "ingress") == 6000
    assert at("dualpath_nic_drops_total", "cnic", "ingress") == 2
    assert at("dualpath_nic_backlog_bytes", "cnic", "egress") == 1514
    assert at("dualpath_nic_backlog_packets", "cnic", "egress") == 1
    assert at("dualpath_nic_overlimits_total", "cnic", "egress") == 9
    assert at("dualpath_nic_packets_total", "mgmt", "ingress") == 2
    kv = {"class": "kv"}
    assert at("dualpath_class_bytes_total", "cnic", "egress", **kv) == 2900
    assert at("dualpath_class_bytes_total", "cnic", "ingress", **kv) == 5950
    assert at("dualpath_class_backlog_bytes", "cnic", "egress", **kv) == 1514
    assert at("dualpath_class_overlimits_total", "cnic", "egress", **kv) == 7
    assert at("dualpath_class_drops_total", "cnic", "egress", **kv) == 1
    # Per-direction rates, in bit/s; unshaped NICs have none.
    rate = "dualpath_nic_rate_bits_per_second"
    assert at(rate, "cnic", "egress") == 400e6
    assert at(rate, "cnic", "ingress") == 200e6
    assert not any(k.startswith(rate) and 'nic="mgmt"' in k for k in got)
    # 2 NICs x 2 directions x 6 NIC families, 2 rates, 2 classes x 2 directions x 6 families.
    assert len(got) == 24 + 2 + 24


def test_the_families_are_typed_for_prometheus_client_parser() -> None:
    families = {
        f.name: f
        for f in text_string_to_metric_families(render("decode-0", "decode", {"cnic": _cnic()}))
    }
    assert families["dualpath_nic_bytes"].type == "counter"
    assert families["dualpath_class_drops"].type == "counter"
    assert families["dualpath_nic_backlog_bytes"].type == "gauge"
    assert families["dualpath_nic_rate_bits_per_second"].type == "gauge"
    sample = families["dualpath_nic_bytes"].samples[0]
    assert sample.name == "dualpath_nic_bytes_total"
    assert sample.labels == {"node": "decode-0", "role": "decode", "nic": "cnic",
                             "direction": "egress"}  # fmt: skip
    assert "dualpath_metrics_port" not in families  # not serving: no port counters


def test_the_metrics_port_counters_follow_the_kernel_ones() -> None:
    text = render("storage-0", "storage", {"mgmt": _mgmt()}, {"connections": 3, "refused": 1})
    got = parse_samples(text)
    port = "dualpath_metrics_port"
    assert got[sample_key(port, {"node": "storage-0", "name": "connections"})] == 3
    assert got[sample_key(port, {"node": "storage-0", "name": "refused"})] == 1
    assert text.index(f"# TYPE {port} gauge") > text.index("dualpath_class_backlog_packets")


def test_sample_keys_sort_the_labels() -> None:
    assert sample_key("m", {"b": "1", "a": "2"}) == 'm{a="2",b="1"}'
    assert sample_key("m", {}) == "m"


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

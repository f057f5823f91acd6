"""Config: defaults, errors that name the dotted field, YAML loading, and the resolution into a
ClusterSpec for the netns (shaped, per-network addresses) and local (loopback) backends."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from lab.config.cluster import build_cluster_spec
from lab.config.models import ConfigError, LabConfig, load_config, parse_config, parse_settings
from services.spec import ClusterSpec, Policy, Role

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def spec_for(data: dict[str, Any], backend: str = "netns", base_port: int = 0) -> ClusterSpec:
    return build_cluster_spec(
        parse_config(data),
        lab_id="t1",
        backend=backend,
        data_dir=Path("/nonexistent/data"),
        base_port=base_port,
    )


def in_subnet(host: str, subnet: str) -> bool:
    return ipaddress.IPv4Address(host) in ipaddress.IPv4Network(subnet)


# -- validation ---------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    cfg = parse_config({})
    assert cfg == LabConfig()
    assert cfg.policy is Policy.DUALPATH
    assert cfg.workload.max_len == 65536
    assert cfg.model.layer_groups <= cfg.model.num_layers
    assert cfg.cnic_rate_mbit / cfg.snic_rate_mbit >= 2


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize(
    "data, field, fragment",
    [
        ({"cluster": {"gpus_per_node": 0}}, "cluster.gpus_per_node", "greater than or equal"),
        ({"cluster": {"prefill_nodes": 17}}, "cluster.prefill_nodes", "less than or equal"),
        ({"policy": "fastest"}, "policy", "valid: basic, dualpath, oracle"),
        ({"network": {"compute_subnet": "bogus"}}, "network.compute_subnet", "not an IPv4"),
        ({"network": {"compute_subnet": "198.18.0.1/24"}}, "network.compute_subnet", "host bits"),
        ({"network": {"mgmt_subnet": "10.0.0.0/28"}}, "network.mgmt_subnet", "too small"),
        ({"network": {"storage_subnet": "198.18.0.0/25"}}, "network", "overlap"),
        ({"network": {"kv_min_fraction": 1.0}}, "network.kv_min_fraction", "less than"),
        (
            {"cluster": {"gpus_per_node": 1, "cnic_gbit_per_gpu": 100, "snic_gbit": 400}},
            "cluster",
            "CNIC:SNIC ratio is 0.25",
        ),
        ({"model": {"num_layers": 4, "layer_groups": 5}}, "model", "layer_groups (5)"),
        ({"model": {"block_tokens": 0}}, "model.block_tokens", "greater than or equal"),
        ({"scaling": {"bandwidth_scale": 0}}, "scaling.bandwidth_scale", "greater than"),
        ({"scaling": {"time_dilation": 1e6}}, "scaling.time_dilation", "less than"),
        ({"workload": {"max_len": 40000}}, "workload.max_len", "32768, 49152 or 65536"),
        ({"workload": {"start_turn_fraction": 1.0}}, "workload.start_turn_fraction", "less"),
        ({"workload": {"gen_token_scale": 0}}, "workload.gen_token_scale", "greater than"),
        ({"scheduling": {"pull_interval_ms": 0}}, "scheduling.pull_interval_ms", "greater"),
        (
            {"scheduling": {"split_reads": True, "selector": "round_robin"}},
            "scheduling",
            "split_reads needs selector 'dualpath'",
        ),
        ({"scheduling": {"compute_quota_ms": 0}}, "scheduling.compute_quota_ms", "greater"),
        (
            {"scheduling": {"baseline_read_side": "alternate"}},
            "scheduling",
            "'alternate' needs selector 'round_robin'",
        ),
        ({"scheduling": {"baseline_read_side": "random"}}, "scheduling.baseline_read_side", "'"),
        ({"workload": {"arrival": "poisson"}}, "workload", "needs agents_per_s"),
        ({"workload": {"agents_per_s": 1.0}}, "workload", "only with arrival 'poisson'"),
        ({"workload": {"arrival": "burst"}}, "workload.arrival", "'offline' or 'poisson'"),
        ({"name": "Not A Name"}, "name", "pattern"),
        ({"cluster": {"gpus": 8}}, "cluster.gpus", "Extra inputs are not permitted"),
        ({"polcy": "basic"}, "polcy", "Extra inputs are not permitted"),
        ({"cluster": "big"}, "cluster", "valid dictionary"),
    ],
)
def test_errors_name_the_dotted_field(data: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="lab.yaml")
    message = str(info.value)
    assert message.startswith("lab.yaml: invalid config")
    assert f"\n  {field}: " in message
    assert fragment in message


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"policy": "x", "cluster": {"gpus_per_node": 0}, "extra": 1})
    message = str(info.value)
    for field in ("policy", "cluster.gpus_per_node", "extra"):
        assert f"\n  {field}: " in message


def test_boundaries_are_accepted() -> None:
    # CNIC:SNIC exactly 2 and one layer group per layer are the allowed extremes
    parse_config({"cluster": {"gpus_per_node": 1, "cnic_gbit_per_gpu": 800, "snic_gbit": 400}})
    parse_config({"model": {"num_layers": 5, "layer_groups": 5}})


@pytest.mark.parametrize("data", [[1, 2], "text", 3, None])
def test_top_level_must_be_a_mapping(data: Any) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(data)


# -- loading ------------------------------------------------------------------------------------


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cluster: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_non_mapping_top_level(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- policy: basic\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(path)


def test_load_config_non_mapping_top_level_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- policy: basic\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, {"policy": "basic"})


def test_load_config_empty_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == LabConfig()
    path.write_text("policy: oracle\nworkload:\n  num_agents: 8\n")
    cfg = load_config(path, {"policy": "basic"})
    assert cfg.policy is Policy.BASIC
    assert cfg.workload.num_agents == 8


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("cluster:\n  gpus_per_node: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid config")
    assert "cluster.gpus_per_node" in str(info.value)


# -- resolution: netns --------------------------------------------------------------------------

SHAPE: dict[str, Any] = {
    "cluster": {
        "prefill_nodes": 2,
        "decode_nodes": 3,
        "storage_servers": 2,
        "gpus_per_node": 8,
        "cnic_gbit_per_gpu": 400,
        "snic_gbit": 400,
        "dram_buffer_gb": 80,
    },
    "model": {"kv_bytes_per_token": 40960},
    "scaling": {"bandwidth_scale": 1 / 4000, "time_dilation": 20},
    "policy": "basic",
}


def test_netns_nodes_roles_and_addresses() -> None:
    cfg = parse_config(SHAPE)
    net = cfg.network
    spec = spec_for(SHAPE)
    assert spec.policy is Policy.BASIC
    assert [n.node_id for n in spec.nodes] == [
        "prefill-0",
        "prefill-1",
        "decode-0",
        "decode-1",
        "decode-2",
        "storage-0",
        "storage-1",
        "scheduler",
    ]
    engines = spec.by_role(Role.PREFILL) + spec.by_role(Role.DECODE)
    for node in engines:
        assert node.num_gpus == 8
        assert node.cnic is not None and node.snic_host is not None
        assert in_subnet(node.cnic.host, net.compute_subnet)
        assert in_subnet(node.snic_host, net.storage_subnet)
        assert in_subnet(node.mgmt.host, net.mgmt_subnet)
        assert node.storage is None
    for node in spec.storage_nodes:
        assert node.storage is not None and node.cnic is None
        assert in_subnet(node.storage.host, net.storage_subnet)
        assert in_subnet(node.mgmt.host, net.mgmt_subnet)
    (sched,) = spec.by_role(Role.SCHEDULER)
    assert in_subnet(sched.mgmt.host, net.mgmt_subnet)
    assert spec.grpc.host == spec.http.host == sched.mgmt.host
    mgmt_hosts = [n.mgmt.host for n in spec.nodes]
    assert len(set(mgmt_hosts)) == len(mgmt_hosts)
    storage_hosts = [n.snic_host for n in engines] + [
        n.storage.host for n in spec.storage_nodes if n.storage
    ]
    assert len(set(storage_hosts)) == len(storage_hosts)
    cnic_hosts = [n.cnic.host for n in engines if n.cnic]
    assert len(set(cnic_hosts)) == len(cnic_hosts)


def test_netns_custom_subnets_are_used() -> None:
    data = {
        **SHAPE,
        "network": {
            "compute_subnet": "10.1.0.0/24",
            "storage_subnet": "10.2.0.0/24",
            "mgmt_subnet": "10.3.0.0/24",
        },
    }
    spec = spec_for(data)
    (prefill0, *_) = spec.by_role(Role.PREFILL)
    assert prefill0.cnic is not None and prefill0.cnic.host.startswith("10.1.0.")
    assert prefill0.snic_host is not None and prefill0.snic_host.startswith("10.2.0.")
    assert prefill0.mgmt.host.startswith("10.3.0.")


def test_netns_emulated_rates_and_sizes() -> None:
    spec = spec_for(SHAPE)
    k, tau = 1 / 4000, 20
    for node in spec.by_role(Role.PREFILL) + spec.by_role(Role.DECODE):
        # the cnic is one interface carrying the node's 8 per-GPU CNICs
        assert node.cnic_rate_mbit == pytest.approx(8 * 400_000 * k)  # 800 Mbit/s
        assert node.snic_rate_mbit == pytest.approx(400_000 * k)  # 100 Mbit/s
        assert node.dram_buffer_bytes == pytest.approx(80e9 * k * tau, rel=1e-9)
    assert spec.profile.kv_bytes_per_token == pytest.approx(40960 * k * tau)
    assert spec.bandwidth_scale == k
    assert spec.time_dilation == tau
    # the ratios of the real system survive scaling
    prefill0 = spec.by_role(Role.PREFILL)[0]
    assert prefill0.cnic_rate_mbit is not None and prefill0.snic_rate_mbit is not None
    assert prefill0.cnic_rate_mbit / prefill0.snic_rate_mbit == pytest.approx(8)


def test_scheduling_figures() -> None:
    cfg = parse_config(SHAPE)
    # DualPath §6: alpha = tokens the node's snic reads in 3 s (real)
    assert cfg.derived_alpha_tokens() == int(3 * 400e9 / 8 / 40960)
    assert cfg.derived_beta_tokens() >= 1
    fixed = parse_config({**SHAPE, "scheduling": {"alpha_tokens": 1234, "beta_tokens": 5678}})
    spec = build_cluster_spec(fixed, lab_id="t", backend="netns", data_dir=Path("/d"))
    assert (spec.alpha_tokens, spec.beta_tokens) == (1234, 5678)
    assert spec.pull_interval_s == pytest.approx(0.001 * 20)  # real ms x tau
    assert spec.collective_bytes_per_step == 64 * 1024


def test_smallest_accepted_subnet_resolves() -> None:
    spec_for({"network": {"storage_subnet": "198.18.1.0/25", "mgmt_subnet": "198.18.2.0/25"}})


# -- resolution: local --------------------------------------------------------------------------


def test_local_is_loopback_with_distinct_ports() -> None:
    spec = spec_for(SHAPE, backend="local", base_port=20_000)
    endpoints = [spec.grpc, spec.http]
    for node in spec.nodes:
        endpoints.append(node.mgmt)
        for ep in (node.cnic, node.collective, node.storage):
            if ep is not None:
                endpoints.append(ep)
        if node.snic_host is not None:
            assert node.snic_host == "127.0.0.1"
        assert node.cnic_rate_mbit is None and node.snic_rate_mbit is None  # no shaping
    assert {ep.host for ep in endpoints} == {"127.0.0.1"}
    ports = [ep.port for ep in endpoints]
    assert len(set(ports)) == len(ports)
    assert all(20_000 <= p < 20_000 + len(ports) for p in ports)
    # sizes are still emulated, so local runs move the same bytes
    assert spec.profile.kv_bytes_per_token == pytest.approx(40960 / 4000 * 20)


def test_unknown_selector_is_named() -> None:
    with pytest.raises(ConfigError, match=r"scheduling\.selector"):
        parse_config({"scheduling": {"selector": "fastest"}})


def test_settings_override_nested_fields_and_keep_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("scheduling:\n  pull_interval_ms: 20\n  selector: round_robin\n")
    overrides = parse_settings(["scheduling.compute_quota_ms=null", "workload.num_agents=7"])
    cfg = load_config(path, overrides)
    assert cfg.scheduling.compute_quota_ms is None
    assert cfg.scheduling.pull_interval_ms == 20 and cfg.scheduling.selector == "round_robin"
    assert cfg.workload.num_agents == 7


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("scheduling", "expected KEY=VALUE"),
        ("a..b=1", "expected KEY=VALUE"),
        ("a=[1, 2]", "must be a scalar"),
        ("a=[1", "not a YAML scalar"),
    ],
)
def test_bad_settings_are_rejected_naming_them(item: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_settings([item])
    assert repr(item) in str(info.value)


def test_a_set_field_is_validated_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"scheduling\.compute_quota_ms"):
        load_config(path, parse_settings(["scheduling.compute_quota_ms=-1"]))


@pytest.mark.parametrize("isolation", [True, False])
def test_isolation_switches_the_cnic_priority_classes(isolation: bool) -> None:
    from lab.config.topology import topology_for

    cfg = parse_config({"network": {"isolation": isolation}})
    spec = build_cluster_spec(cfg, lab_id="u", backend="netns", data_dir=Path("/nonexistent"))
    topo = topology_for(spec, cfg.network.kv_min_fraction)
    for node_id in ("prefill-0", "decode-0"):
        host = topo.host(node_id)
        cnic, snic = host.nic("cnic"), host.nic("snic")
        assert cnic.shape.priority_classes is isolation
        assert snic.shape.priority_classes is False  # the snic carries storage traffic only


def test_an_unknown_policy_lists_the_systems_selectors_and_plugins() -> None:
    with pytest.raises(
        ConfigError, match="unknown policy 'fastest'; valid: basic, dualpath, oracle"
    ):
        parse_config({"policy": "fastest"})
    with pytest.raises(
        ConfigError, match=r"write policy: dualpath and scheduling\.selector: round_robin"
    ):
        parse_config({"policy": "round_robin"})

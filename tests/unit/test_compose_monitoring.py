"""The compose profile `monitoring` as rendered (compose.monitoring, compose.render): the
Prometheus service only under the profile, on mgmt at its fixed address, scraping every node's
exporter and the scheduler by service name; its recording rules and the Grafana dashboard in
compose/monitoring/ are consistent with each other and with the metric names the lab exports.
The exporter's NIC names by address (services.prom.lab_nic_names, rename_nics). No Docker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import yaml
from test_compose_render import LAPTOP, ROOT, spec_of

from compose import monitoring
from compose.render import LAB_LABEL, NODE_LABEL, Build, RenderOptions, render
from lab.config.models import load_config
from netem.counters import NicCounters
from services.prom import CLASS_FAMILIES, NIC_FAMILIES, RATE_FAMILY, lab_nic_names, rename_nics

MONITORING = ROOT / "compose" / "monitoring"


def prometheus_service(**opts: Any) -> dict[str, Any]:
    svc: dict[str, Any] = render(load_config(LAPTOP), RenderOptions(lab="lap", **opts))["services"][
        monitoring.SERVICE
    ]
    return svc


def test_prometheus_runs_only_under_the_profile_on_mgmt() -> None:
    svc = prometheus_service()
    assert svc["profiles"] == ["monitoring"]
    assert svc["image"] == "dualpath-prometheus:latest"
    assert svc["networks"] == {"mgmt": {"ipv4_address": "198.18.2.4"}}
    assert svc["labels"] == {LAB_LABEL: "lap", NODE_LABEL: "prometheus"}
    # nothing published, no secret, no NET_ADMIN, nobody waits for it
    assert not {"ports", "volumes", "cap_add", "depends_on"} & set(svc)
    assert monitoring.url("198.18.42.0/24") == "http://198.18.42.4:9090"


def test_without_monitoring_the_file_has_no_profiles() -> None:
    doc = render(load_config(LAPTOP), RenderOptions(lab="lap", monitoring=False))
    assert monitoring.SERVICE not in doc["services"]
    assert not any("profiles" in svc for svc in doc["services"].values())


def test_build_section_points_at_the_monitoring_folder() -> None:
    svc = prometheus_service(build=Build(context=".."))
    assert svc["build"]["context"] == "../compose/monitoring"
    assert svc["build"]["args"] == {
        "BASE_IMAGE": "${DUALPATH_PROMETHEUS_BASE_IMAGE:-debian:bookworm-slim}"
    }
    assert (MONITORING / "Dockerfile").is_file()


def test_the_config_in_the_environment_scrapes_every_node_and_the_scheduler() -> None:
    svc = prometheus_service()
    config = yaml.safe_load(svc["environment"]["DUALPATH_PROMETHEUS_CONFIG"])
    assert config == monitoring.prometheus_config(spec_of(), lab="lap")
    assert config["global"]["scrape_interval"] == "1s"
    assert config["rule_files"] == ["/etc/dualpath/rules.yml"]
    jobs = {j["job_name"]: j["static_configs"] for j in config["scrape_configs"]}
    assert jobs["dualpath-nodes"] == [
        {
            "targets": [
                "prefill-0:7600",
                "decode-0:7600",
                "storage-0:7600",
                "storage-1:7600",
                "scheduler:7600",
            ],
            "labels": {"lab": "lap"},
        }
    ]
    assert jobs["dualpath-scheduler"] == [{"targets": ["scheduler:7401"], "labels": {"lab": "lap"}}]
    # every target is a service of the file (Docker's DNS resolves it on mgmt)
    services = render(load_config(LAPTOP), RenderOptions(lab="lap"))["services"]
    hosts = {t.split(":")[0] for cfgs in jobs.values() for c in cfgs for t in c["targets"]}
    assert hosts <= set(services)


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _exported_names() -> set[str]:
    """Series names the nodes and the scheduler export (counters with `_total`)."""
    nodes = {
        f.name + ("_total" if f.kind == "counter" else "")
        for f in (*NIC_FAMILIES, *CLASS_FAMILIES, RATE_FAMILY)
    }
    scheduler = {
        "dualpath_queue_turns",
        "dualpath_turns_done_total",
        "dualpath_turns_failed_total",
        "dualpath_read_queue_tokens",
        "dualpath_node_counter_total",
    }
    return nodes | scheduler


def test_recording_rules_read_exported_metrics_and_are_named_by_convention() -> None:
    rules = _rules()
    assert [r["record"] for r in rules] == [
        "dualpath:nic_bits_per_second:rate5s",
        "dualpath:nic_utilisation:ratio_rate5s",
        "dualpath:snic_read_share:ratio_rate5s",
    ]
    for rule in rules:
        assert re.fullmatch(r"[a-z_]+:[a-z_0-9]+:[a-z_0-9]+", rule["record"])  # level:metric:ops
        used = set(re.findall(r"\bdualpath_[a-z_]+", rule["expr"]))
        assert used and used <= _exported_names(), used - _exported_names()


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return doc


def test_dashboard_is_in_grafanas_export_format_with_a_datasource_input() -> None:
    dash = _dashboard()
    (ds,) = dash["__inputs"]
    assert ds == {
        "name": "DS_PROMETHEUS",
        "label": "Prometheus",
        "description": ds["description"],
        "type": "datasource",
        "pluginId": "prometheus",
        "pluginName": "Prometheus",
    }
    assert {r["id"] for r in dash["__requires"]} == {"grafana", "prometheus", "timeseries"}
    assert dash["id"] is None and dash["uid"] and dash["title"]
    want = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    (lab,) = dash["templating"]["list"]
    assert lab["name"] == "lab" and lab["datasource"] == want
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == want
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs)
        assert all(t["datasource"] == want for t in panel["targets"])
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])


def test_dashboard_has_the_reports_panels_over_rules_and_exported_metrics() -> None:
    panels = _dashboard()["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    titles = {p["title"] for p in panels}
    for want in ("NIC throughput", "NIC utilisation", "Shaper backlog", "TTFT", "snic balance"):
        assert want in titles
    rules = {r["record"] for r in _rules()}
    used_rules = {n for e in exprs for n in re.findall(r"dualpath:[a-z_0-9:]+", e)}
    assert used_rules == rules  # every rule shown, none missing
    used = {n for e in exprs for n in re.findall(r"\bdualpath_[a-z_]+", e)}
    assert used <= _exported_names(), used - _exported_names()
    vllm = {n for e in exprs for n in re.findall(r"vllm:[a-z_]+", e)}
    assert "vllm:time_to_first_token_seconds_bucket" in vllm
    assert "vllm:inter_token_latency_seconds_bucket" in vllm
    # each expression selects the dashboard's lab
    assert all('lab=~"$lab"' in e for e in exprs)


def _counters(n: int) -> NicCounters:
    return NicCounters(
        egress_bytes=n,
        ingress_bytes=n,
        egress_drops=0,
        ingress_drops=0,
        egress_backlog_bytes=0,
        ingress_backlog_bytes=0,
        rate_mbit=None,
    )


def test_exporter_names_docker_interfaces_by_the_nodes_addresses() -> None:
    spec = spec_of()
    prefill = spec.node("prefill-0")
    names = lab_nic_names(prefill)
    assert sorted(names.values()) == ["cnic", "mgmt", "snic"]
    assert names[prefill.mgmt.host] == "mgmt" and names[str(prefill.snic_host)] == "snic"
    storage = lab_nic_names(spec.node("storage-0"))
    assert sorted(storage.values()) == ["mgmt", "snic"]
    by_addr = {v: k for k, v in names.items()}
    addresses = {
        "eth0": [by_addr["cnic"]],
        "eth1": ["fe80::1", by_addr["snic"]],
        "eth2": [by_addr["mgmt"]],
        "eth9": ["10.9.9.9"],
    }
    nics = {n: _counters(i) for i, n in enumerate(("eth0", "eth1", "eth2", "eth9"))}
    renamed = rename_nics(nics, addresses, names)
    assert {k: v.egress_bytes for k, v in renamed.items()} == {
        "cnic": 0,
        "snic": 1,
        "mgmt": 2,
        "eth9": 3,  # carries no lab address: keeps its own name
    }
    # a netns node's interfaces already carry the lab's names: nothing changes
    same = {"cnic": [by_addr["cnic"]], "snic": [by_addr["snic"]], "mgmt": [by_addr["mgmt"]]}
    plain = {n: _counters(1) for n in same}
    assert rename_nics(plain, same, names) == plain


def test_render_command_leaves_the_profile_out_for_swarm() -> None:
    argv = [sys.executable, "-m", "lab.cli", "compose", "render", "-c", str(LAPTOP)]
    with_it = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
    without = subprocess.run(
        [*argv, "--no-monitoring"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert "prometheus" in yaml.safe_load(with_it.stdout)["services"]
    doc = yaml.safe_load(without.stdout)
    assert "prometheus" not in doc["services"]
    assert "profiles:" not in without.stdout
    assert "render with --no-monitoring" in without.stdout  # the header says so for swarm

"""`dualpath compose render`: services, networks and addresses as the netns backend's cluster;
NET_ADMIN exactly where a node shapes; the embedded config round-trips; the checked-in laptop
file is what the renderer writes; configs a stack cannot run are refused naming the field.
Also the driver-side helpers that need no Docker (address rewrite, agent check, image hash)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from compose.agent import NicArg, net_admin_message
from compose.backend import source_hash
from compose.render import (
    LAB_LABEL,
    RenderError,
    RenderOptions,
    render,
    render_text,
)
from compose.stack import check_agent
from lab.config.cluster import build_cluster_spec
from lab.config.models import load_config, parse_config
from lab.config.topology import with_addresses
from lab.run.backends import BackendError
from netem.spec import SpecError
from services.spec import ClusterSpec

ROOT = Path(__file__).resolve().parents[2]
LAPTOP = ROOT / "examples" / "laptop.yaml"


def laptop_doc(**opts: Any) -> dict[str, Any]:
    return render(load_config(LAPTOP), RenderOptions(lab="laptop", **opts))


def spec_of(cfg_path: Path = LAPTOP) -> ClusterSpec:
    return build_cluster_spec(
        load_config(cfg_path), lab_id="t1", backend="compose", data_dir=Path("/nonexistent")
    )


def test_one_service_per_node_plus_the_driver() -> None:
    assert list(laptop_doc()["services"])[-1] == "prometheus"  # profile `monitoring`
    doc = laptop_doc(monitoring=False)
    assert list(doc["services"]) == [
        "storage-0",
        "storage-1",
        "scheduler",
        "prefill-0",
        "decode-0",
        "driver",
    ]
    for name, svc in doc["services"].items():
        assert svc["labels"][LAB_LABEL] == "laptop"
        assert svc["labels"]["com.dualpath.node"] == name
        assert svc["deploy"]["restart_policy"] == {"condition": "none"}


def test_networks_have_the_config_subnets_and_the_lab_label() -> None:
    cfg = load_config(LAPTOP, {"network": {"compute_subnet": "198.18.8.0/24"}})
    doc = render(cfg, RenderOptions(lab="x"))
    nets = doc["networks"]
    assert {n: v["ipam"]["config"][0]["subnet"] for n, v in nets.items()} == {
        "compute": "198.18.8.0/24",
        "storage": "198.18.1.0/24",
        "mgmt": "198.18.2.0/24",
    }
    assert all(v["labels"] == {LAB_LABEL: "x"} for v in nets.values())
    # nothing outside the stack routes into its networks, nor out of them
    assert all(v["internal"] is True for v in nets.values())


def test_every_service_shares_the_stack_secret_volume_and_nothing_is_published() -> None:
    doc = render(load_config(LAPTOP), RenderOptions(lab="x", monitoring=False))
    assert doc["volumes"] == {"dualpath-secret": {"labels": {LAB_LABEL: "x"}}}
    for svc in doc["services"].values():
        assert "dualpath-secret:/run/dualpath-secret" in svc["volumes"]
        assert "ports" not in svc


def test_net_admin_exactly_on_the_nodes_that_shape() -> None:
    doc = laptop_doc()
    with_cap = {n for n, s in doc["services"].items() if s.get("cap_add") == ["NET_ADMIN"]}
    assert with_cap == {"prefill-0", "decode-0"}


def test_addresses_are_the_netns_backends() -> None:
    doc = laptop_doc()
    spec = spec_of()
    for node in spec.nodes:
        nets = doc["services"][node.node_id]["networks"]
        want = {net: a.split("/")[0] for net, a in spec.addresses(node).items()}
        assert {net: v["ipv4_address"] for net, v in nets.items()} == want
    driver = doc["services"]["driver"]["networks"]
    assert list(driver) == ["mgmt"]
    used = {v["ipv4_address"] for s in doc["services"].values() for v in s["networks"].values()}
    assert len(used) == sum(len(s["networks"]) for s in doc["services"].values())


def test_node_commands_find_nics_by_subnet_and_carry_the_rates() -> None:
    cmd = laptop_doc()["services"]["prefill-0"]["command"]
    assert cmd[:3] == ["node", "--node", "prefill-0"]
    args = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert args["--cnic"] == "198.18.0.0/24@400"
    assert args["--snic"] == "198.18.1.0/24@100"
    assert args["--mgmt"] == "198.18.2.0/24"
    storage = laptop_doc()["services"]["storage-0"]["command"]
    assert "198.18.1.0/24" in storage and not any("@" in a for a in storage)
    nics = [NicArg.parse("cnic", args["--cnic"]), NicArg.parse("mgmt", args["--mgmt"])]
    assert nics[0].rate_mbit == 400.0 and nics[1].rate_mbit is None


def test_no_isolation_reaches_the_cnic() -> None:
    cfg = load_config(LAPTOP, {"network": {"isolation": False}})
    cmd = render(cfg, RenderOptions(lab="x"))["services"]["decode-0"]["command"]
    assert "--no-isolation" in cmd


def test_driver_carries_the_config_and_policies() -> None:
    doc = laptop_doc(policies=("basic", "dualpath"), out="")
    driver = doc["services"]["driver"]
    assert driver["command"] == ["driver", "--policies", "basic,dualpath", "--out", "/results"]
    assert driver["volumes"] == ["dualpath-secret:/run/dualpath-secret", "./results:/results"]
    embedded = parse_config(yaml.safe_load(driver["environment"]["DUALPATH_CONFIG"]))
    assert embedded == load_config(LAPTOP)
    assert set(driver["depends_on"]) == set(doc["services"]) - {"driver", "prometheus"}


def test_dollar_signs_are_escaped_for_compose() -> None:
    doc = laptop_doc(scenario="name: a$b\n")
    assert doc["services"]["driver"]["environment"]["DUALPATH_SCENARIO"] == "name: a$$b\n"


def test_trajectories_file_cannot_be_rendered() -> None:
    cfg = parse_config({"workload": {"trajectories_file": "/data/traj.jsonl"}})
    with pytest.raises(RenderError, match=r"workload\.trajectories_file"):
        render(cfg, RenderOptions(lab="x"))


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(RenderError, match="policies"):
        laptop_doc(policies=("fastest",))


def test_checked_in_laptop_file_is_what_render_writes() -> None:
    text = render_text(
        load_config(LAPTOP),
        config_arg="examples/laptop.yaml",
        output_arg="compose/docker-compose.yml",
        context="..",
    )
    assert (ROOT / "compose" / "docker-compose.yml").read_text() == text
    doc = yaml.safe_load(text)
    assert doc["services"]["scheduler"]["build"]["context"] == ".."


def test_render_text_is_yaml_with_literal_config_block() -> None:
    text = render_text(load_config(LAPTOP), config_arg="c.yaml", output_arg=None, context=None)
    assert text.startswith("# Generated by `dualpath compose render -c c.yaml`")
    assert "DUALPATH_CONFIG: |" in text
    assert "build" not in yaml.safe_load(text)["services"]["driver"]


# -- driver-side helpers --------------------------------------------------------------------------


def test_with_addresses_moves_every_endpoint() -> None:
    spec = spec_of()
    found: dict[str, dict[str, str]] = {}
    for i, node in enumerate(spec.nodes):
        found[node.node_id] = {
            net: str(ipaddress.IPv4Interface(a).network[200 + i])
            for net, a in spec.addresses(node).items()
        }
    moved = with_addresses(spec, found)
    for node in moved.nodes:
        got = {net: a.split("/")[0] for net, a in moved.addresses(node).items()}
        assert got == found[node.node_id]
        assert node.mgmt.port == spec.node(node.node_id).mgmt.port
    assert moved.http.host == found["scheduler"]["mgmt"] == moved.grpc.host
    assert with_addresses(spec, {n.node_id: _hosts(spec, n.node_id) for n in spec.nodes}) == spec


def _hosts(spec: ClusterSpec, node_id: str) -> dict[str, str]:
    return {net: a.split("/")[0] for net, a in spec.addresses(spec.node(node_id)).items()}


def test_check_agent_names_a_rate_mismatch() -> None:
    spec = spec_of()
    ok = {"nics": {"cnic": {"rate_mbit": 400.0}, "snic": {"rate_mbit": 100.0}, "mgmt": None}}
    check_agent(spec, "prefill-0", ok)
    check_agent(spec, "storage-0", {"nics": {"snic": None, "mgmt": None}})
    bad = {"nics": {"cnic": {"rate_mbit": 400.0}, "snic": {"rate_mbit": 50.0}}}
    with pytest.raises(BackendError, match=r"prefill-0\.snic.*50\.0.*100\.0"):
        check_agent(spec, "prefill-0", bad)


def test_net_admin_message_says_what_to_add() -> None:
    msg = net_admin_message("decode-0", [NicArg("cnic", "198.18.0.0/24", 400.0)])
    assert "CAP_NET_ADMIN" in msg and "cap_add: [NET_ADMIN]" in msg and "decode-0" in msg


def test_bad_nic_argument_names_the_flag() -> None:
    with pytest.raises(SpecError, match="--snic"):
        NicArg.parse("snic", "198.18.1.0/24@fast")


def test_source_hash_matches_the_build_script() -> None:
    done = subprocess.run(
        [str(ROOT / "compose" / "build-image.sh"), "--print-hash"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LC_ALL": "en_US.UTF-8"},
    )
    assert done.stdout.strip() == source_hash(ROOT)

"""Views of one cluster spec (lab.config.cluster.build_cluster_spec builds it once from a config):
the netem topology the netns backend and the selftest build (`topology_for`), and the spec with
the addresses a compose stack's containers really have (`with_addresses`). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netem.spec import HostSpec, LinkShape, NicSpec, TopologySpec
from services.spec import ClusterSpec


def topology_for(spec: ClusterSpec, kv_min_fraction: float) -> TopologySpec:
    """The netem topology of a cluster: which NICs each node has, their addresses and shapes."""
    hosts = []
    for node in spec.nodes:
        addrs = spec.addresses(node)
        nics = []
        if node.cnic is not None:
            shape = (
                LinkShape(
                    node.cnic_rate_mbit,
                    priority_classes=spec.isolation,
                    kv_min_fraction=kv_min_fraction,
                )
                if node.cnic_rate_mbit
                else None
            )
            nics.append(NicSpec("cnic", "compute", addrs["compute"], shape))
        if "storage" in addrs:
            shape = LinkShape(node.snic_rate_mbit) if node.snic_rate_mbit else None
            nics.append(NicSpec("snic", "storage", addrs["storage"], shape))
        nics.append(NicSpec("mgmt", "mgmt", addrs["mgmt"], None))
        hosts.append(HostSpec(node.node_id, tuple(nics)))
    return TopologySpec(spec.lab_id, tuple(hosts))


def with_addresses(spec: ClusterSpec, found: Mapping[str, Mapping[str, str]]) -> ClusterSpec:
    """The spec with every node's addresses as its container has them (node -> network ->
    address). On compose they are the rendered fixed ones; swarm assigns its own."""
    nodes = []
    for n in spec.nodes:
        a = found[n.node_id]
        update: dict[str, Any] = {"mgmt": n.mgmt.model_copy(update={"host": a["mgmt"]})}
        if n.cnic is not None:
            update["cnic"] = n.cnic.model_copy(update={"host": a["compute"]})
        if n.collective is not None:
            update["collective"] = n.collective.model_copy(update={"host": a["compute"]})
        if n.snic_host is not None:
            update["snic_host"] = a["storage"]
        if n.storage is not None:
            update["storage"] = n.storage.model_copy(update={"host": a["storage"]})
        nodes.append(n.model_copy(update=update))
    sched = found["scheduler"]["mgmt"]
    return spec.model_copy(
        update={
            "nodes": tuple(nodes),
            "grpc": spec.grpc.model_copy(update={"host": sched}),
            "http": spec.http.model_copy(update={"host": sched}),
        }
    )

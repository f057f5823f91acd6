"""The one cluster spec of a config (`build_cluster_spec`): every node's addresses, ports and
emulated sizes. The backends, the netem topology and the compose addresses
(lab.config.topology) all derive from it."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from lab.config.models import ConfigError, LabConfig
from services.spec import ClusterSpec, Endpoint, NodeSpec, ProfileSpec, Role

PORT_DATA = 7100
PORT_COLLECTIVE = 7101
PORT_STORAGE = 7200
PORT_MGMT = 7300
PORT_GRPC = 7400
PORT_HTTP = 7401
LOCAL_PORTS = 160
"""Consecutive ports the local backend needs at most: 3 per engine node (16 + 16), 2 per
storage server (16) and 3 for the scheduler."""


def _host(subnet: str, offset: int) -> str:
    return str(ipaddress.IPv4Network(subnet)[offset])


class _Addresser:
    """Hands out endpoints: one address per node per network with fixed ports, or (local)
    127.0.0.1 with consecutive ports from `base_port`, in the order they are asked for."""

    def __init__(self, *, local: bool, base_port: int) -> None:
        self.local = local
        self.next_port = base_port

    def ports(self, n: int) -> list[int]:
        """The next `n` local ports (all 0 on a shaped backend, where ports are fixed)."""
        if not self.local:
            return [0] * n
        got = list(range(self.next_port, self.next_port + n))
        self.next_port += n
        return got

    def endpoint(self, subnet: str, offset: int, port: int, local_port: int) -> Endpoint:
        if self.local:
            return Endpoint(host="127.0.0.1", port=local_port)
        return Endpoint(host=_host(subnet, offset), port=port)


def _check_backend(backend: str, base_port: int) -> None:
    if backend not in ("netns", "compose", "local"):
        raise ConfigError(f"unknown backend {backend!r}; valid backends: netns, compose, local")
    if backend == "local" and base_port < 1024:
        raise ConfigError(f"the local backend needs base_port >= 1024, got {base_port}")


def _engine_nodes(cfg: LabConfig, addr: _Addresser) -> list[NodeSpec]:
    """The prefill then decode nodes, host offsets from 10 in that order."""
    net, c, s = cfg.network, cfg.cluster, cfg.scaling
    local = addr.local
    gpu_kv_tokens = int(c.gpu_kv_capacity_gb * 1e9 / cfg.model.kv_bytes_per_token)
    nodes: list[NodeSpec] = []
    host_offset = 10
    for node_id, role, i in c.engines():
        p_data, p_coll, p_mgmt = addr.ports(3)
        nodes.append(
            NodeSpec(
                node_id=node_id,
                role=role,
                index=i,
                num_gpus=c.gpus_per_node,
                mgmt=addr.endpoint(net.mgmt_subnet, host_offset, PORT_MGMT, p_mgmt),
                cnic=addr.endpoint(net.compute_subnet, host_offset, PORT_DATA, p_data),
                collective=addr.endpoint(net.compute_subnet, host_offset, PORT_COLLECTIVE, p_coll),
                snic_host="127.0.0.1" if local else _host(net.storage_subnet, host_offset),
                cnic_rate_mbit=None if local else cfg.cnic_rate_mbit,
                snic_rate_mbit=None if local else cfg.snic_rate_mbit,
                dram_buffer_bytes=int(c.dram_buffer_gb * 1e9 * s.bandwidth_scale * s.time_dilation),
                gpu_kv_capacity_tokens=gpu_kv_tokens,
            )
        )
        host_offset += 1
    return nodes


def _storage_nodes(cfg: LabConfig, addr: _Addresser) -> list[NodeSpec]:
    """The storage servers, host offsets from 100."""
    net = cfg.network
    nodes: list[NodeSpec] = []
    for i, node_id in enumerate(cfg.cluster.storage_ids()):
        p_store, p_mgmt = addr.ports(2)
        offset = 100 + i
        nodes.append(
            NodeSpec(
                node_id=node_id,
                role=Role.STORAGE,
                index=i,
                mgmt=addr.endpoint(net.mgmt_subnet, offset, PORT_MGMT, p_mgmt),
                storage=addr.endpoint(net.storage_subnet, offset, PORT_STORAGE, p_store),
            )
        )
    return nodes


def _profile(cfg: LabConfig) -> ProfileSpec:
    """The emulated model: its layers, block size, KV bytes per token and cost model."""
    return ProfileSpec(
        name=cfg.model.name,
        max_model_len=cfg.model.max_model_len,
        num_layers=cfg.model.num_layers,
        layer_groups=cfg.model.layer_groups,
        block_tokens=cfg.model.block_tokens,
        kv_bytes_per_token=cfg.emulated_kv_bytes_per_token,
        cost=cfg.model.cost_params(),
        time_dilation=cfg.scaling.time_dilation,
    )


def build_cluster_spec(
    cfg: LabConfig, *, lab_id: str, backend: str, data_dir: Path, base_port: int = 0
) -> ClusterSpec:
    """Addresses, ports and emulated sizes for every node.

    `netns`/`compose`: one address per node per network, fixed ports. `local`: everything on
    127.0.0.1 with per-node ports starting at `base_port`, no shaping (for tests).
    """
    _check_backend(backend, base_port)
    local = backend == "local"
    addr = _Addresser(local=local, base_port=base_port)
    net, s, sched = cfg.network, cfg.scaling, cfg.scheduling
    nodes = [*_engine_nodes(cfg, addr), *_storage_nodes(cfg, addr)]
    p_grpc, p_http, p_mgmt = addr.ports(3)
    sched_mgmt = addr.endpoint(net.mgmt_subnet, 2, PORT_MGMT, p_mgmt)
    nodes.append(NodeSpec(node_id="scheduler", role=Role.SCHEDULER, index=0, mgmt=sched_mgmt))
    return ClusterSpec(
        lab_id=lab_id,
        backend=backend,
        policy=cfg.policy,
        bandwidth_scale=s.bandwidth_scale,
        time_dilation=s.time_dilation,
        profile=_profile(cfg),
        nodes=tuple(nodes),
        grpc=addr.endpoint(net.mgmt_subnet, 2, PORT_GRPC, p_grpc),
        http=addr.endpoint(net.mgmt_subnet, 2, PORT_HTTP, p_http),
        pull_interval_s=sched.pull_interval_ms / 1000.0 * s.time_dilation,
        alpha_tokens=cfg.derived_alpha_tokens(),
        beta_tokens=cfg.derived_beta_tokens(),
        collective_bytes_per_step=int(sched.collective_kbytes_per_step * 1024),
        selector=sched.selector,
        split_reads=sched.split_reads,
        baseline_read_side=sched.baseline_read_side,
        node_timeout_s=sched.node_timeout_s,
        isolation=net.isolation,
        turn_retries=cfg.workload.turn_retries,
        retry_backoff_s=cfg.workload.retry_backoff_s,
        compute_quota_s=None if sched.compute_quota_ms is None else sched.compute_quota_ms / 1000.0,
        data_dir=str(data_dir),
        subnets={}
        if local
        else {
            "compute": net.compute_subnet,
            "storage": net.storage_subnet,
            "mgmt": net.mgmt_subnet,
        },
    )

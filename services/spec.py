"""The resolved cluster spec every lab process is started with.

`lab.config.models` turns a user's YAML into one `ClusterSpec` (emulated units already applied:
bytes, bit rates and dilated times); every node process reads the same JSON file. It holds
addresses and sizes only, never behaviour, and the lab's secret: the file is written 0600.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from netem.state import write_record
from scheduler.costmodel import CostModel, CostModelParams
from services.auth import SECRET_PATTERN, new_secret

LAB_ID_PATTERN = r"^[a-z0-9]{1,8}$"
"""A lab id names namespaces, files and compose projects: the netns backend's rule
(netem.spec), checked wherever a spec is read, so no id can reach a path or a name unchecked."""
NODE_ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$"


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    STORAGE = "storage"
    SCHEDULER = "scheduler"


class Policy(StrEnum):
    BASIC = "basic"
    DUALPATH = "dualpath"
    ORACLE = "oracle"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Endpoint(_Frozen):
    host: str
    port: int


class ProfileSpec(_Frozen):
    """Model profile in emulated units (bytes already scaled by bandwidth_scale x dilation)."""

    name: str
    num_layers: int
    layer_groups: int
    max_model_len: int = 131_072
    """Longest request (prompt + generated tokens) the model serves."""
    block_tokens: int
    kv_bytes_per_token: float
    cost: CostModelParams
    time_dilation: float

    @property
    def block_bytes(self) -> int:
        """Bytes of one Full Block (all layers of `block_tokens` tokens), emulated."""
        return self.layer_group_bytes(0) * self.layer_groups

    def layer_group_bytes(self, group: int) -> int:
        """Bytes of one block's slice for one layer group (all groups the same size)."""
        del group
        per_group = self.block_tokens * self.kv_bytes_per_token / self.layer_groups
        return max(64, round(per_group))

    def cost_model(self) -> CostModel:
        return CostModel(self.cost)


class NodeSpec(_Frozen):
    node_id: str = Field(pattern=NODE_ID_PATTERN)
    role: Role
    index: int
    num_gpus: int = 0
    mgmt: Endpoint
    """Control/metrics listener on the unshaped management network."""
    cnic: Endpoint | None = None
    """KV listener on the compute network (engine nodes: the node's data-plane process)."""
    collective: Endpoint | None = None
    """Collective listener on the compute network (engine nodes: the node's timeline
    process, which hosts the emulated GPUs)."""
    snic_host: str | None = None
    """Address of the node's storage NIC (engine nodes bind outgoing storage traffic to it)."""
    storage: Endpoint | None = None
    """Block service on the storage network (storage servers)."""
    cnic_rate_mbit: float | None = None
    snic_rate_mbit: float | None = None
    dram_buffer_bytes: int = 0
    gpu_kv_capacity_tokens: int = 0


class ClusterSpec(_Frozen):
    lab_id: str = Field(pattern=LAB_ID_PATTERN)
    secret: str = Field(default_factory=new_secret, pattern=SECRET_PATTERN, repr=False)
    """The lab's secret (services.auth), required by the scheduler and the control endpoint;
    a new spec gets a fresh one, so every bring-up has its own."""
    backend: str
    policy: Policy
    bandwidth_scale: float
    time_dilation: float
    profile: ProfileSpec
    nodes: tuple[NodeSpec, ...]
    grpc: Endpoint
    """Scheduler gRPC endpoint for engine-group leaders."""
    http: Endpoint
    """Scheduler HTTP API for clients."""
    pull_interval_s: float
    alpha_tokens: int
    beta_tokens: int
    collective_bytes_per_step: int
    selector: str = "dualpath"
    """Engine selection under policy dualpath (see scheduler.dualpath_policy)."""
    split_reads: bool = False
    """Under the dualpath selector: split each turn's hit-KV read across both sides."""
    baseline_read_side: str = "shorter_queue"
    """Under the round_robin selector: shorter_queue or alternate."""
    compute_quota_s: float | None = 0.3
    """Prefill step quota on predicted attention time (real s); None: head request whole."""
    data_dir: str
    subnets: dict[str, str] = {}
    """Network name (compute, storage, mgmt) -> CIDR; empty on the local backend."""
    request_timeout_s: float = 120.0
    turn_retries: int = 8
    """Times the driver resubmits a turn that failed retryably (lost node, link or timeout)."""
    retry_backoff_s: float = 1.0
    """First backoff before a resubmission; it doubles with every attempt."""
    isolation: bool = True
    """cnic traffic isolation: DSCP priority classes (True) or one FIFO class (False)."""
    layer_timeout_s: float = 10.0
    """A prefill step waits at most this long for a turn's layer group; then the turn fails
    (retryable) and the group steps on without it."""
    node_timeout_s: float = 5.0
    """An engine node that has not fetched for this long is lost: its turns fail (retryable)."""
    max_frame_bytes: int = 64 * 1024 * 1024

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no node {node_id!r} in cluster (have: {[n.node_id for n in self.nodes]})")

    def by_role(self, role: Role) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if n.role == role)

    @property
    def storage_nodes(self) -> tuple[NodeSpec, ...]:
        return self.by_role(Role.STORAGE)

    def storage_server_for(self, traj_id: int, block: int) -> NodeSpec:
        """Striping: block i of trajectory t lives on server (t + i) mod S (like 3FS chunks)."""
        servers = self.storage_nodes
        return servers[(traj_id + block) % len(servers)]

    def addresses(self, node: NodeSpec) -> dict[str, str]:
        """The node's interface addresses with prefix length, per network it is attached to."""
        hosts = {"mgmt": node.mgmt.host}
        if node.cnic is not None:
            hosts["compute"] = node.cnic.host
        if node.snic_host is not None:
            hosts["storage"] = node.snic_host
        if node.storage is not None:
            hosts["storage"] = node.storage.host
        out = {}
        for net, host in hosts.items():
            prefix = self.subnets[net].split("/")[1]
            out[net] = f"{host}/{prefix}"
        return out

    def dump(self, path: Path) -> None:
        """Write the spec readable by its owner only (it holds the lab's secret)."""
        write_record(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> ClusterSpec:
        return cls.model_validate_json(path.read_text())

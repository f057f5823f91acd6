"""One validated YAML config per cluster, and its resolution into a `ClusterSpec`.

Fields carry their units in their names and are real-hardware figures; `scaling` turns them
into emulated ones (rate x bandwidth_scale, time x time_dilation, bytes x both). Errors name
the field and the allowed values. No file I/O happens while the models are constructed, but
for a `scheduling.selector` that is not built in: the installed policy plugins' metadata is
read to know their names (scheduler.plugins; the plugin itself is not imported here).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dualpath.errors import UsageError
from scheduler.analysis import Analysis, LabAnalysis, analyze, analyze_lab
from scheduler.costmodel import CostModel, CostModelParams
from scheduler.plugins import InstalledPolicies
from scheduler.registry import SELECTORS, UnknownPolicyError
from services.spec import Policy, Role


class ConfigError(UsageError):
    """The config is invalid; the message names the field and what is allowed."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelProfile(_Model):
    name: str = Field(
        "ds27b-like",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$",
        description="profile name shown in reports; the model id the OpenAI-compatible API serves",
    )
    max_model_len: int = Field(
        131_072,
        ge=1,
        le=10_000_000,
        description="longest request (prompt + generated tokens) the model serves",
    )
    num_layers: int = Field(30, ge=1, le=256, description="transformer layers")
    kv_bytes_per_token: float = Field(
        20480, gt=0, description="real KV bytes per token over all layers"
    )
    block_tokens: int = Field(64, ge=1, le=4096, description="tokens per Full Block")
    layer_groups: int = Field(
        5, ge=1, le=64, description="layer groups streamed one at a time (layerwise prefill)"
    )
    prefill_base_ms: float = Field(5.0, ge=0, description="fixed cost of a prefill, real ms")
    prefill_us_per_token: float = Field(10.0, ge=0, description="per new token, real us")
    attention_ns_per_token_pair: float = Field(
        0.5, ge=0, description="attention cost per (query, key) pair, real ns"
    )
    decode_base_ms: float = Field(8.0, ge=0, description="fixed cost of a decode step, real ms")
    decode_us_per_seq: float = Field(20.0, ge=0, description="per sequence in the batch, real us")
    decode_ns_per_context_token: float = Field(
        5.0, ge=0, description="per context token in the batch, real ns"
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> ModelProfile:
        if self.layer_groups > self.num_layers:
            raise ValueError(
                f"layer_groups ({self.layer_groups}) must be <= num_layers ({self.num_layers})"
            )
        return self

    def cost_params(self) -> CostModelParams:
        return CostModelParams(
            prefill_base_ms=self.prefill_base_ms,
            prefill_us_per_token=self.prefill_us_per_token,
            attention_ns_per_token_pair=self.attention_ns_per_token_pair,
            decode_base_ms=self.decode_base_ms,
            decode_us_per_seq=self.decode_us_per_seq,
            decode_ns_per_context_token=self.decode_ns_per_context_token,
        )


class ClusterShape(_Model):
    prefill_nodes: int = Field(1, ge=1, le=16, description="P, prefill nodes")
    decode_nodes: int = Field(1, ge=1, le=16, description="D, decode nodes")
    storage_servers: int = Field(2, ge=1, le=16, description="S, storage servers")
    gpus_per_node: int = Field(4, ge=1, le=16, description="g, emulated GPUs (engines) per node")
    cnic_gbit_per_gpu: float = Field(400, gt=0, description="real compute NIC rate per GPU")
    snic_gbit: float = Field(400, gt=0, description="real storage NIC rate, one per node")
    dram_buffer_gb: float = Field(80, gt=0, description="real DRAM buffer per node")
    dram_gbyte_per_s: float = Field(500, gt=0, description="real DRAM bandwidth per node")
    gpu_kv_capacity_gb: float = Field(40, gt=0, description="real HBM for KV per decode GPU")

    @model_validator(mode="after")
    def _cnic_snic_ratio(self) -> ClusterShape:
        ratio = self.gpus_per_node * self.cnic_gbit_per_gpu / self.snic_gbit
        if ratio < 2:
            raise ValueError(
                f"per-node CNIC:SNIC ratio is {ratio:.2f}; it must be >= 2 (the paper has 8, "
                "keep >= 4) or the relay itself becomes the bottleneck (DualPath §4.2)"
            )
        return self

    def engines(self) -> list[tuple[str, Role, int]]:
        """The engine nodes (id, role, index within the role), prefill then decode: the cluster
        spec, the chaos links and every other view of the cluster take them from here."""
        return [
            (f"{role}-{i}", role, i)
            for role, count in (
                (Role.PREFILL, self.prefill_nodes),
                (Role.DECODE, self.decode_nodes),
            )
            for i in range(count)
        ]

    def engine_ids(self) -> list[str]:
        """The engine nodes' ids, prefill then decode."""
        return [node_id for node_id, _, _ in self.engines()]

    def storage_ids(self) -> list[str]:
        """The storage servers' ids."""
        return [f"{Role.STORAGE}-{i}" for i in range(self.storage_servers)]

    def analysis(self) -> Analysis:
        """DualPath §4.2 for this cluster's real hardware figures."""
        return analyze(
            self.prefill_nodes,
            self.decode_nodes,
            self.gpus_per_node,
            self.cnic_gbit_per_gpu,
            self.snic_gbit,
            self.dram_gbyte_per_s,
        )

    def lab_analysis(self) -> LabAnalysis:
        """The same question for what the lab's emulated network carries."""
        return analyze_lab(
            self.prefill_nodes,
            self.decode_nodes,
            self.gpus_per_node,
            self.cnic_gbit_per_gpu,
            self.snic_gbit,
        )


AUTO = "auto"
AUTO_FIELDS = ("bandwidth_scale", "time_dilation")


class Scaling(_Model):
    bandwidth_scale: float = Field(
        0.00025, gt=0, le=1, description="k: emulated link rate = real rate x k, or auto"
    )
    time_dilation: float = Field(
        10, gt=0, le=10000, description="tau: emulated durations = real durations x tau, or auto"
    )
    auto: tuple[Literal["bandwidth_scale", "time_dilation"], ...] = Field(
        (),
        description="fields chosen at run time from a short host calibration (lab.config.scaling):"
        " `scaling: auto` or a field set to auto",
    )

    @model_validator(mode="before")
    @classmethod
    def _auto_fields(cls, data: Any) -> Any:
        """`scaling: auto` and `field: auto` become the `auto` list (the field keeps its
        default until the run chooses a value)."""
        if data == AUTO:
            data = dict.fromkeys(AUTO_FIELDS, AUTO)
        if not isinstance(data, dict):
            return data
        data = dict(data)
        auto = list(data.get("auto", ()))
        for name in AUTO_FIELDS:
            if data.get(name) == AUTO:
                del data[name]
                auto.append(name)
            elif name in data:  # an explicit value wins over auto
                auto = [a for a in auto if a != name]
        if auto or "auto" in data:
            data["auto"] = tuple(dict.fromkeys(auto))
        return data


TRACE_FORMATS = ("mooncake", "bailian")
"""Request-trace formats (lab/run/traces.py FORMATS; checked equal in the tests)."""


class TraceWorkload(_Model):
    """A public request trace to replay instead of agent trajectories (docs/design.md,
    "Replaying a trace")."""

    file: str = Field(description="the trace file (JSONL), relative to the working directory")
    format: Literal["mooncake", "bailian"] = Field("mooncake", description="mooncake or bailian")
    block_tokens: int | None = Field(
        None, ge=1, le=1 << 20, description="the trace's block size, when not its format's"
    )
    speedup: float = Field(
        1.0,
        gt=0,
        le=1_000_000,
        description="arrivals come this many times faster than the trace's timestamps x tau",
    )
    max_requests: int | None = Field(
        None, ge=1, description="replay only the first requests, in arrival order"
    )
    max_len: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="longest request (prompt + output tokens) replayed, a longer one is an"
        " error; default: model.max_model_len",
    )


class Workload(_Model):
    num_agents: int = Field(64, ge=1, le=100000, description="agents (trajectories) to replay")
    max_len: Literal[32768, 49152, 65536] = Field(
        65536, description="MaxLen of the Table 2 dataset to imitate (32768, 49152 or 65536)"
    )
    seed: int = Field(1, ge=0, description="seed of the trajectory generator")
    trajectories_file: str | None = Field(
        None, description="JSONL trajectories to replay instead of generated ones"
    )
    start_turn_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="start each agent this far into its trajectory, earlier turns' KV pre-seeded",
    )
    max_turns_per_agent: int | None = Field(
        None, ge=1, description="replay at most this many turns per agent"
    )
    turn_retries: int = Field(
        8,
        ge=0,
        le=20,
        description="resubmissions of a turn that failed retryably (lost node or link,"
        " timeout), each after a random wait of up to retry_backoff_s x 1, 2, 4, 8, 8, ...:"
        " together long enough to outlast a node's restart (~7 s in the lab)",
    )
    retry_backoff_s: float = Field(1.0, gt=0, le=600, description="first backoff, emulated s")
    arrival: Literal["offline", "poisson"] = Field(
        "offline",
        description="offline: every agent starts at once (the paper's JCT runs); poisson: agents"
        " arrive as a Poisson process at agents_per_s (the paper's online runs)",
    )
    agents_per_s: float | None = Field(
        None,
        gt=0,
        le=100000,
        description="arrival rate under arrival poisson, agents per real-equivalent second (APS)",
    )
    gen_token_scale: float = Field(
        1.0, gt=0, le=1, description="scale generated tokens per turn (decode-light demos)"
    )
    max_gen_tokens_per_turn: int | None = Field(
        None, ge=1, description="cap generated tokens per turn, after scaling"
    )
    trace: TraceWorkload | None = Field(
        None, description="replay a request trace (file, format, block_tokens, speedup)"
    )

    @model_validator(mode="after")
    def _arrival_rate(self) -> Workload:
        if self.arrival == "poisson" and self.agents_per_s is None:
            raise ValueError("arrival 'poisson' needs agents_per_s (agents per real second)")
        if self.arrival == "offline" and self.agents_per_s is not None:
            raise ValueError("agents_per_s applies only with arrival 'poisson'")
        if self.trace is not None and (self.trajectories_file or self.arrival != "offline"):
            raise ValueError(
                "trace replaces trajectories_file and arrival: a trace brings its own requests"
                " and their timestamps"
            )
        return self


class Network(_Model):
    compute_subnet: str = Field("198.18.0.0/24", description="compute network (cnic)")
    storage_subnet: str = Field("198.18.1.0/24", description="storage network (snic)")
    mgmt_subnet: str = Field("198.18.2.0/24", description="unshaped management network")
    isolation: bool = Field(
        True,
        description="traffic isolation on the cnic (DualPath §5): collective, control and kv"
        " HTB classes by DSCP; false = one FIFO class for everything",
    )
    kv_min_fraction: float = Field(
        0.05, gt=0, lt=1, description="guaranteed share of the cnic for the kv class"
    )

    @field_validator("compute_subnet", "storage_subnet", "mgmt_subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        try:
            net = ipaddress.IPv4Network(v, strict=True)
        except ValueError as exc:
            raise ValueError(f"not an IPv4 network: {exc}") from exc
        if net.num_addresses < 128:
            raise ValueError(f"{v} is too small; use a /25 or larger")
        return v

    @model_validator(mode="after")
    def _disjoint(self) -> Network:
        nets = [
            ipaddress.IPv4Network(s)
            for s in (self.compute_subnet, self.storage_subnet, self.mgmt_subnet)
        ]
        for i, a in enumerate(nets):
            for b in nets[i + 1 :]:
                if a.overlaps(b):
                    raise ValueError(f"subnets {a} and {b} overlap")
        return self


class Scheduling(_Model):
    pull_interval_ms: float = Field(
        1,
        gt=0,
        le=10000,
        description="how often engine groups pull work, real ms (emulated: x time_dilation, so"
        " the real-equivalent behaviour does not depend on tau)",
    )
    alpha_tokens: int | None = Field(
        None, ge=1, description="alpha: tokens a node's snic reads in 3 s (default: derived)"
    )
    beta_tokens: int | None = Field(
        None, ge=1, description="beta: tokens one GPU processes in 5 s (default: derived)"
    )
    collective_kbytes_per_step: float = Field(
        64, ge=0, description="emulated all-to-all bytes per prefill step to each group peer"
    )
    selector: str = Field(
        "dualpath",
        description="engine selection under policy dualpath: the paper's (Algorithm 1 + two-level"
        " DE selection), a baseline of scheduler.registry.SELECTORS (round_robin, least_tokens)"
        " or an installed policy plugin's name (`dualpath policies`)",
    )
    node_timeout_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="an engine node that has not pulled work for this long (emulated s) is lost:"
        " its unfinished turns fail as retryable and it gets no new work until it pulls again",
    )
    split_reads: bool = Field(
        False,
        description="dualpath selector: split each turn's hit-KV read across the prefill and"
        " decode nodes so both sides finish together (the paper's future work, §6)",
    )
    compute_quota_ms: float | None = Field(
        300,
        gt=0,
        le=100000,
        description="prefill step quota on predicted attention time, real ms (DualPath §6);"
        " null runs each GPU's head request whole in every step",
    )

    baseline_read_side: Literal["shorter_queue", "alternate"] = Field(
        "shorter_queue",
        description="read side under the round_robin selector: the paper's shorter-queue rule,"
        " or alternate (prefill, decode, ...) so that no decision of the baseline sees load",
    )

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, value: str) -> str:
        if value in SELECTORS:
            return value
        plugins = InstalledPolicies()
        if value not in plugins:
            raise UnknownPolicyError(value, kind="selector", valid=SELECTORS, plugins=plugins)
        return value

    @model_validator(mode="after")
    def _selector_options(self) -> Scheduling:
        if self.split_reads and self.selector != "dualpath":
            raise ValueError(
                f"split_reads needs selector 'dualpath' (the split is part of its read-side"
                f" rule), got selector {self.selector!r}"
            )
        if self.baseline_read_side == "alternate" and self.selector != "round_robin":
            raise ValueError(
                f"baseline_read_side 'alternate' needs selector 'round_robin' (it rotates with"
                f" the engine cursor), got selector {self.selector!r}"
            )
        return self


class LabConfig(_Model):
    name: str = Field("lab", pattern=r"^[a-z0-9][a-z0-9-]{0,30}$", description="config name")
    policy: Policy = Field(Policy.DUALPATH, description="basic, dualpath or oracle")
    model: ModelProfile = ModelProfile()
    cluster: ClusterShape = ClusterShape()
    scaling: Scaling = Scaling()
    workload: Workload = Workload()
    network: Network = Network()
    scheduling: Scheduling = Scheduling()

    @field_validator("policy", mode="before")
    @classmethod
    def _known_policy(cls, value: Any) -> Any:
        """A name that is not a system says which names are, and that a plugin (or a
        baseline) is chosen as `scheduling.selector` under `policy: dualpath`."""
        if isinstance(value, str) and value not in {p.value for p in Policy}:
            plugins = InstalledPolicies()
            where = (
                f"; {value!r} is a selector: write policy: dualpath and scheduling.selector:"
                f" {value}"
                if value in SELECTORS or value in plugins
                else ""
            )
            systems = ", ".join(p.value for p in Policy)
            raise ValueError(
                f"unknown policy {value!r}; valid: {systems} (selectors under dualpath: "
                f"{', '.join(sorted(SELECTORS))}; plugins: "
                f"{', '.join(sorted(plugins)) or 'none installed'}){where}"
            )
        return value

    # -- emulated figures -------------------------------------------------------------------
    @property
    def emulated_kv_bytes_per_token(self) -> float:
        s = self.scaling
        return self.model.kv_bytes_per_token * s.bandwidth_scale * s.time_dilation

    @property
    def snic_rate_mbit(self) -> float:
        return self.cluster.snic_gbit * 1000 * self.scaling.bandwidth_scale

    @property
    def cnic_rate_mbit(self) -> float:
        c = self.cluster
        return c.gpus_per_node * c.cnic_gbit_per_gpu * 1000 * self.scaling.bandwidth_scale

    def derived_alpha_tokens(self) -> int:
        """DualPath §6: alpha = tokens the node's snic reads in 3 s (real)."""
        if self.scheduling.alpha_tokens is not None:
            return self.scheduling.alpha_tokens
        bytes_per_s = self.cluster.snic_gbit * 1e9 / 8
        return max(1, int(3 * bytes_per_s / self.model.kv_bytes_per_token))

    def derived_beta_tokens(self) -> int:
        """DualPath §6: beta = tokens one GPU processes in 5 s (real), at a typical turn."""
        if self.scheduling.beta_tokens is not None:
            return self.scheduling.beta_tokens
        cost = CostModel(self.model.cost_params())
        cached = self.workload.max_len // 2
        return max(1, int(5 * cost.prefill_tokens_per_s(cached, 512)))


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_config(data: Any, *, source: str = "config") -> LabConfig:
    """Validate a parsed YAML document; raise ConfigError naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return LabConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_field_path(tuple(err['loc']))}: {msg}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """`section.field=value` strings (the CLI's --set) as a nested mapping; values are YAML
    scalars (`300`, `null`, `true`, `round_robin`)."""
    out: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.isidentifier() for p in parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not a YAML scalar") from None
        if isinstance(value, (dict, list)):
            raise ConfigError(f"--set {item!r}: value must be a scalar")
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} was already set to a value")
            node = child
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """A YAML file's document; `error` names the file when it is unreadable or not YAML."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> LabConfig:
    data = read_yaml(path, "config", ConfigError)
    if data is None:
        data = {}
    if isinstance(data, dict) and data.get("scaling") == AUTO:
        data = {**data, "scaling": dict.fromkeys(AUTO_FIELDS, AUTO)}  # --set may change one
    if overrides and isinstance(data, dict):
        data = _merge(data, overrides)
    return parse_config(data, source=str(path))

"""A lab config as a Docker Compose file: one service per node, the three networks with fixed
subnets, NET_ADMIN where a node shapes, and the driver service that runs the workload.

Pure: config in, compose document (a dict, or YAML text) out; no Docker, no files. The node
addresses are the ones `build_cluster_spec` gives the netns backend, so both backends run the
same cluster. The same file deploys with `docker compose` (v2), Debian's `docker-compose` (v1)
and `docker stack deploy` (swarm ignores `build`, `depends_on` and fixed addresses: the driver
then learns every node's address from its agent). The `prometheus` service of the profile
`monitoring` (compose.monitoring) starts only with `--profile monitoring`; swarm's schema has no
profiles, so a file for `docker stack deploy` is rendered without it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compose import monitoring
from lab.config.cluster import build_cluster_spec
from lab.config.models import ConfigError, LabConfig
from services.spec import ClusterSpec, NodeSpec, Policy, Role

LAB_LABEL = "com.dualpath.lab"
"""Every container and network of a stack carries it; cleanup removes exactly those."""
NODE_LABEL = "com.dualpath.node"
IMAGE_REPO = "dualpath-mesh"
IMAGE = f"{IMAGE_REPO}:latest"
"""What a rendered file runs; the CLI runs `dualpath-mesh:<source hash>` (compose.backend)."""
DEFAULT_BASE_IMAGE = "python:3.11-slim"
AGENT_PORT = 7500
"""Each node container's agent (compose.agent) listens here on its mgmt address."""
DRIVER_HOST_OFFSET = 3
"""The driver's mgmt address (the scheduler has 2; Docker's gateway takes 1)."""
RESULTS_MOUNT = "/results"
SECRET_VOLUME = "dualpath-secret"
"""A named volume every service of a stack mounts: the first agent (or the driver) to start
writes the stack's agent secret into it (services.auth.shared_secret), the rest read it, so
the secret is made with the stack and never leaves Docker's storage."""
SECRET_DIR = "/run/dualpath-secret"
AGENT_SECRET_FILE = f"{SECRET_DIR}/agent"
"""What every agent requires and the driver presents (Authorization: Bearer)."""
NETWORKS = {"cnic": "compute", "snic": "storage", "mgmt": "mgmt"}
"""NIC name -> network, as on the netns backend."""
ALL_POLICIES: tuple[str, ...] = tuple(p.value for p in Policy)


class RenderError(ConfigError):
    """The config cannot run as a compose stack; the message names the field."""


@dataclass(frozen=True)
class Build:
    """The `build:` section: how `docker compose up --build` makes the image."""

    context: str
    """The repository root, relative to the compose file's folder."""
    dockerfile: str = "compose/Dockerfile"
    base_image: str = DEFAULT_BASE_IMAGE


@dataclass(frozen=True)
class RenderOptions:
    lab: str
    """Value of the com.dualpath.lab label (the config name, or a run's lab id)."""
    image: str = IMAGE
    build: Build | None = None
    results: str = "./results"
    """Host folder mounted at /results in the driver (relative to the compose file)."""
    policies: tuple[str, ...] = ALL_POLICIES
    out: str | None = None
    """The driver's output folder inside /results; None: `<name>-<kind>-<time>`."""
    scenario: str | None = None
    """A chaos scenario (YAML text) the driver plays during the run."""
    header: Sequence[str] = field(default_factory=tuple)
    monitoring: bool = True
    """Add the `prometheus` service under the profile `monitoring` (off: a file for swarm)."""


def check_renderable(cfg: LabConfig) -> None:
    """Raise RenderError naming the field a compose stack cannot honour."""
    if cfg.workload.trajectories_file is not None:
        raise RenderError(
            f"workload.trajectories_file: {cfg.workload.trajectories_file!r} is a file on this "
            "host, which the driver container cannot read; a compose stack replays generated "
            "trajectories only (remove the field, or use --backend netns/local)"
        )
    for name in ("compute_subnet", "storage_subnet", "mgmt_subnet"):
        net = ipaddress.IPv4Network(getattr(cfg.network, name))
        if net.prefixlen > 25:  # the config checks this too; the offsets below rely on it
            raise RenderError(f"network.{name}: {net} is too small for the node addresses")


def _spec(cfg: LabConfig) -> ClusterSpec:
    return build_cluster_spec(
        cfg, lab_id="compose", backend="compose", data_dir=Path("/var/tmp/dualpath-compose")
    )


def _subnets(cfg: LabConfig) -> dict[str, str]:
    n = cfg.network
    return {"compute": n.compute_subnet, "storage": n.storage_subnet, "mgmt": n.mgmt_subnet}


def node_command(cfg: LabConfig, node: NodeSpec) -> list[str]:
    """The node container's arguments: its id and, per NIC, the subnet that finds it and the
    rate that shapes it (what `netem` plans for the same node on the netns backend)."""
    subnets = _subnets(cfg)
    argv = ["node", "--node", node.node_id]
    if node.cnic is not None:
        argv += ["--cnic", f"{subnets['compute']}@{node.cnic_rate_mbit:g}"]
    if node.snic_host is not None:
        argv += ["--snic", f"{subnets['storage']}@{node.snic_rate_mbit:g}"]
    elif node.storage is not None:
        argv += ["--snic", subnets["storage"]]
    argv += ["--mgmt", subnets["mgmt"]]
    if node.cnic is not None:
        if not cfg.network.isolation:
            argv.append("--no-isolation")
        argv += ["--kv-min-fraction", f"{cfg.network.kv_min_fraction:g}"]
    return argv


def _shapes(node: NodeSpec) -> bool:
    return bool(node.cnic_rate_mbit or node.snic_rate_mbit)


def _service(opts: RenderOptions, node_id: str, command: list[str]) -> dict[str, Any]:
    svc: dict[str, Any] = {"image": opts.image}
    if opts.build is not None:
        b = opts.build
        svc["build"] = {
            "context": b.context,
            "dockerfile": b.dockerfile,
            "args": {"BASE_IMAGE": f"${{DUALPATH_BASE_IMAGE:-{b.base_image}}}"},
        }
    svc["command"] = command
    svc["labels"] = {LAB_LABEL: opts.lab, NODE_LABEL: node_id}
    svc["volumes"] = [f"{SECRET_VOLUME}:{SECRET_DIR}"]
    return svc


def _deploy(*, manager: bool = False) -> dict[str, Any]:
    """Swarm: resolve the service name to the task itself (no VIP in between) and never
    restart a node or the driver (a restarted node would be a different experiment)."""
    deploy: dict[str, Any] = {"endpoint_mode": "dnsrr", "restart_policy": {"condition": "none"}}
    if manager:
        deploy["placement"] = {"constraints": ["node.role == manager"]}
    return deploy


def _config_text(cfg: LabConfig) -> str:
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data["name"] = cfg.name
    return yaml.safe_dump(data, sort_keys=False)


def _escape(text: str) -> str:
    """Compose (and swarm) interpolate `$VAR` in values: `$$` is a literal dollar."""
    return text.replace("$", "$$")


def render(cfg: LabConfig, opts: RenderOptions) -> dict[str, Any]:
    """The compose document for `cfg`."""
    check_renderable(cfg)
    unknown = [p for p in opts.policies if p not in ALL_POLICIES]
    if unknown or not opts.policies:
        raise RenderError(f"policies: {unknown or '[]'} (valid: {', '.join(ALL_POLICIES)})")
    spec = _spec(cfg)
    order = [Role.STORAGE, Role.SCHEDULER, Role.PREFILL, Role.DECODE]
    services: dict[str, Any] = {}
    for role in order:
        for node in spec.by_role(role):
            svc = _service(opts, node.node_id, node_command(cfg, node))
            if _shapes(node):
                svc["cap_add"] = ["NET_ADMIN"]
            addrs = spec.addresses(node)
            svc["networks"] = {
                net: {"ipv4_address": addrs[net].split("/")[0]}
                for net in ("compute", "storage", "mgmt")
                if net in addrs
            }
            svc["sysctls"] = {"net.ipv6.conf.all.disable_ipv6": "1"}
            svc["deploy"] = _deploy()
            services[node.node_id] = svc
    driver_argv = ["driver", "--policies", ",".join(opts.policies)]
    if opts.out is not None:
        driver_argv += ["--out", f"{RESULTS_MOUNT}/{opts.out}".rstrip("/")]
    driver = _service(opts, "driver", driver_argv)
    env = {"DUALPATH_CONFIG": _escape(_config_text(cfg))}
    if opts.scenario is not None:
        env["DUALPATH_SCENARIO"] = _escape(opts.scenario)
    driver["environment"] = env
    driver["volumes"] += [f"{opts.results}:{RESULTS_MOUNT}"]
    driver["depends_on"] = list(services)
    mgmt = ipaddress.IPv4Network(cfg.network.mgmt_subnet)
    driver["networks"] = {"mgmt": {"ipv4_address": str(mgmt[DRIVER_HOST_OFFSET])}}
    driver["deploy"] = _deploy(manager=True)
    services["driver"] = driver
    if opts.monitoring:
        services[monitoring.SERVICE] = _prometheus(cfg, spec, opts)
    # internal: no route in or out of the stack's networks (nothing in a stack needs one: the
    # host drives it with `docker exec`/`logs`, results go through the driver's bind mount)
    networks = {
        net: {
            "internal": True,
            "labels": {LAB_LABEL: opts.lab},
            "ipam": {"config": [{"subnet": subnet}]},
        }
        for net, subnet in _subnets(cfg).items()
    }
    volumes = {SECRET_VOLUME: {"labels": {LAB_LABEL: opts.lab}}}
    return {"version": "3.8", "services": services, "networks": networks, "volumes": volumes}


def _prometheus(cfg: LabConfig, spec: ClusterSpec, opts: RenderOptions) -> dict[str, Any]:
    """The Prometheus server (profile `monitoring`) on mgmt only, its scrape configuration in
    its environment (the entry point writes it to a file), so the file needs nothing beside it.
    No depends_on: the nodes' exporters come and go with each run, Prometheus keeps scraping."""
    svc: dict[str, Any] = {"image": monitoring.IMAGE, "profiles": [monitoring.PROFILE]}
    if opts.build is not None:
        svc["build"] = {
            "context": f"{opts.build.context}/{monitoring.BUILD_DIR}",
            "args": {
                "BASE_IMAGE": "${DUALPATH_PROMETHEUS_BASE_IMAGE:-"
                f"{monitoring.DEFAULT_BASE_IMAGE}}}"
            },
        }
    config = monitoring.prometheus_config(spec, lab=opts.lab)
    svc["environment"] = {monitoring.CONFIG_ENV: _escape(yaml.safe_dump(config, sort_keys=False))}
    svc["labels"] = {LAB_LABEL: opts.lab, NODE_LABEL: monitoring.SERVICE}
    svc["networks"] = {"mgmt": {"ipv4_address": monitoring.address(cfg.network.mgmt_subnet)}}
    svc["sysctls"] = {"net.ipv6.conf.all.disable_ipv6": "1"}
    return svc


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings (the embedded config) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(doc: dict[str, Any], header: Sequence[str] = ()) -> str:
    text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=200)
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return lines + text


def render_text(
    cfg: LabConfig,
    *,
    config_arg: str,
    output_arg: str | None,
    context: str | None,
    policies: Sequence[str] = ALL_POLICIES,
    results: str = "./results",
    image: str = IMAGE,
    monitoring: bool = True,
) -> str:
    """What `dualpath compose render -c CONFIG_ARG [-o OUTPUT_ARG]` writes: the compose file
    with a header saying how it was made and how to use it. `context`: the repository root
    relative to the output's folder (None: no `build:` sections). `monitoring`: the
    Prometheus service of the profile `monitoring` (off for swarm)."""
    build = Build(context=context) if context is not None else None
    opts = RenderOptions(
        lab=cfg.name,
        image=image,
        build=build,
        results=results,
        policies=tuple(policies),
        monitoring=monitoring,
    )
    where = f" -o {output_arg}" if output_arg else ""
    header = [
        f"Generated by `dualpath compose render -c {config_arg}{where}`: render it again",
        "rather than editing it (the driver checks that every container shapes its NICs as",
        "the config says). From this folder:",
        "",
        "  docker compose up --build --exit-code-from driver    # v1: docker-compose up ...",
        "  docker compose down -v      # -v: the stack's secret volume too",
        "",
        "With `--profile monitoring` (up and down) a Prometheus server scrapes every node",
        '(docs/compose.md, "Monitoring").',
        "",
        "Results: ./results/<name>-<kind>-<time>/. Swarm: render with --no-monitoring, then",
        "docker stack deploy -c FILE NAME",
        "(docs/compose.md).",
    ]
    return to_yaml(render(cfg, opts), header)


__all__ = [
    "AGENT_PORT",
    "AGENT_SECRET_FILE",
    "IMAGE",
    "LAB_LABEL",
    "NETWORKS",
    "Build",
    "RenderError",
    "RenderOptions",
    "check_renderable",
    "node_command",
    "render",
    "render_text",
    "to_yaml",
]

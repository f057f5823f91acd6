"""The compose profile `monitoring`: a Prometheus server on a stack's mgmt network that scrapes
every node's exporter (services.prom, port 7600) and the scheduler's /metrics (its HTTP API, the
vllm:* request metrics among them), with the recording rules of compose/monitoring/rules.yml.

Pure: a cluster spec in, the Prometheus configuration (a dict) out; compose.render puts it in
the `prometheus` service's environment, whose entry point writes it to a file
(compose/monitoring/entrypoint.sh). Nothing here builds an image or talks to Docker.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from services.prom import METRICS_PATH, METRICS_PORT
from services.spec import ClusterSpec

PROFILE = "monitoring"
"""`docker compose --profile monitoring up` starts the service; without it nothing changes."""
SERVICE = "prometheus"
IMAGE_REPO = "dualpath-prometheus"
IMAGE = f"{IMAGE_REPO}:latest"
"""What a rendered file runs; compose/build-monitoring-image.sh builds and tags it."""
DEFAULT_BASE_IMAGE = "debian:bookworm-slim"
BUILD_DIR = "compose/monitoring"
"""The image's build context and Dockerfile, relative to the repository root."""
PORT = 9090
HOST_OFFSET = 4
"""Prometheus's mgmt address (1: Docker's gateway, 2: the scheduler, 3: the driver)."""
CONFIG_ENV = "DUALPATH_PROMETHEUS_CONFIG"
RULES_FILE = "/etc/dualpath/rules.yml"
"""Where the image holds compose/monitoring/rules.yml."""
SCRAPE_INTERVAL_S = 1
"""A run lasts tens of seconds: a 1 s scrape gives its rate windows (5 s) five points each."""
NODES_JOB = "dualpath-nodes"
SCHEDULER_JOB = "dualpath-scheduler"


def address(mgmt_subnet: str) -> str:
    """The Prometheus server's address on the stack's mgmt network."""
    return str(ipaddress.IPv4Network(mgmt_subnet)[HOST_OFFSET])


def url(mgmt_subnet: str) -> str:
    """Its HTTP API from the host (Linux: the host has an address on each bridge)."""
    return f"http://{address(mgmt_subnet)}:{PORT}"


def scrape_targets(spec: ClusterSpec) -> dict[str, list[str]]:
    """Job -> `host:port` targets. Hosts are compose service names (the node ids), which
    Docker's DNS resolves to the node's mgmt address, the one network Prometheus is on."""
    scheduler = next(n.node_id for n in spec.nodes if n.mgmt.host == spec.http.host)
    return {
        NODES_JOB: [f"{n.node_id}:{METRICS_PORT}" for n in spec.nodes],
        SCHEDULER_JOB: [f"{scheduler}:{spec.http.port}"],
    }


def prometheus_config(spec: ClusterSpec, *, lab: str) -> dict[str, Any]:
    """prometheus.yml for the stack: both jobs every second, every series labelled `lab`."""
    interval = f"{SCRAPE_INTERVAL_S}s"
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [RULES_FILE],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": METRICS_PATH,
                "static_configs": [{"targets": targets, "labels": {"lab": lab}}],
            }
            for job, targets in scrape_targets(spec).items()
        ],
    }


__all__ = [
    "CONFIG_ENV",
    "IMAGE",
    "PORT",
    "PROFILE",
    "SERVICE",
    "address",
    "prometheus_config",
    "scrape_targets",
    "url",
]

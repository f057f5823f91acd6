"""Node entry point: `python -m services --spec SPEC.json --node NODE_ID`.

Loads the cluster spec, picks the node's role and runs it on uvloop until SIGTERM/SIGINT.
Where the node has a network namespace of its own, it also serves its kernel NIC counters as
Prometheus metrics on its management address (services.prom).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import uvloop

from services.prom import METRICS_PORT, MetricsExporter, exported_nodes, lab_nic_names
from services.spec import ClusterSpec, Role


async def _run(spec: ClusterSpec, spec_path: Path, node_id: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node = spec.node(node_id)
    role = node.role
    exporter = None
    if exported_nodes(spec.backend):
        exporter = MetricsExporter.of_this_namespace(node_id, role.value, lab_nic_names(node))
        await exporter.start(node.mgmt.host, METRICS_PORT)
    try:
        await _serve_role(spec, spec_path, node_id, role, stop)
    finally:
        if exporter is not None:
            await exporter.close()


async def _serve_role(
    spec: ClusterSpec, spec_path: Path, node_id: str, role: Role, stop: asyncio.Event
) -> None:
    if role is Role.STORAGE:
        from services.process import data_plane_process
        from services.storage import serve_storage

        # Storage servers are data plane too: on a busy host they, not the emulated GPUs,
        # give way (the run's emulation health shows it).
        data_plane_process()

        await serve_storage(spec, node_id, stop)
    elif role is Role.SCHEDULER:
        from services.scheduler.service import serve_scheduler

        await serve_scheduler(spec, node_id, stop)
    else:
        from services.engine import serve_engine

        await serve_engine(spec, node_id, stop, spec_path=spec_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="cluster spec JSON")
    parser.add_argument("--node", required=True, help="node id, e.g. prefill-0")
    args = parser.parse_args(argv)
    spec = ClusterSpec.load(args.spec)
    try:
        spec.node(args.node)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(f"[{args.node}] ready pid={os.getpid()}", flush=True)
    uvloop.run(_run(spec, args.spec, args.node))
    return 0


if __name__ == "__main__":
    sys.exit(main())

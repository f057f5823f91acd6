"""The same compose file on Docker Swarm (`docker stack deploy`, overlay networks), on a
single-node swarm: DualPath on the small config, every byte verified, then `docker stack rm`
leaves nothing of the lab. A swarm this test had to create is left again afterwards (and the
docker_gwbridge network it brought); one that was already there is not touched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack_helpers import RUN_TIMEOUT_S, need, nothing_left, render

from compose import engine
from compose.backend import ComposeError, leftovers, run_cmd

SWARM_POOL = "198.19.128.0/18"
"""Addresses swarm hands out on its own (the ingress network): inside the benchmarking range."""
FINAL = ("complete", "failed", "rejected", "shutdown")
"""Task states after which a task never runs again."""


def _swarm_state() -> str:
    with engine.engine_errors("the Docker engine"):
        return str(engine.client().info()["Swarm"]["LocalNodeState"])


def _gwbridges() -> list[str]:
    with engine.engine_errors("network docker_gwbridge"):
        found = engine.client().api.networks(names=["docker_gwbridge"])
    return [str(n["Id"]) for n in found if n["Name"] == "docker_gwbridge"]


@pytest.fixture
def swarm(compose: tuple[str, ...]) -> Iterator[None]:
    state = _swarm_state()
    had_gwbridge = bool(_gwbridges())
    created = False
    if state == "inactive":
        try:
            with engine.engine_errors("swarm init"):
                engine.client().swarm.init(
                    advertise_addr="127.0.0.1", default_addr_pool=[SWARM_POOL]
                )
        except ComposeError as exc:
            need(f"docker swarm init failed here: {exc}")
        created = True
    elif state != "active":
        need(f"this engine's swarm is {state!r}, neither inactive nor active")
    try:
        yield
    finally:
        # Leave only a swarm this test made, and only when nobody else deployed on it since
        # (another run on the same engine).
        with engine.engine_errors("swarm leave"):
            if created and not engine.client().api.services():
                engine.client().swarm.leave(force=True)
                if not had_gwbridge:
                    for ident in _gwbridges():
                        engine.remove("network", ident)


def _stack_rm(stack: str, *, timeout_s: float = 120.0) -> None:
    """`docker stack rm`, repeated while the engine still counts a stopping task on one of the
    stack's networks (Docker 20.10 answers "network ... is in use by task" and removes the
    rest; a second call after the task is gone removes the network)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run_cmd(["docker", "stack", "rm", stack])
            return
        except ComposeError as exc:
            if "is in use by task" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _driver_state(stack: str) -> str:
    """The state of the driver service's newest task ("" before it has one)."""
    with engine.engine_errors(f"service {stack}_driver"):
        tasks = engine.client().api.tasks(filters={"service": f"{stack}_driver"})
    newest = max(tasks, key=lambda t: str(t["CreatedAt"]), default=None)
    return "" if newest is None else str(newest["Status"]["State"])


def _service_logs(name: str) -> str:
    with engine.engine_errors(f"service {name}"):
        chunks = engine.client().services.get(name).logs(stdout=True, stderr=True)
        return b"".join(chunks).decode(errors="replace")


def test_stack_deploy_runs_the_workload(
    swarm: None, image: str, lab_name: str, tmp_path: Path
) -> None:
    file = tmp_path / "docker-compose.yml"
    results = tmp_path / "results"
    results.mkdir()
    # swarm's schema has no `profiles`: the file leaves out the monitoring profile's service
    render(file, lab_name, image=image, policies="dualpath", results=str(results), monitoring=False)
    try:
        run_cmd(
            ["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(file), lab_name]
        )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while _driver_state(lab_name) not in FINAL:
            assert time.monotonic() < deadline, (
                f"the driver did not finish: {_driver_state(lab_name)}"
            )
            time.sleep(2)
        final = _driver_state(lab_name)
        logs = _service_logs(f"{lab_name}_driver")
    finally:
        _stack_rm(lab_name)
        deadline = time.monotonic() + 120
        left = leftovers(lab_name)
        while (left["container"] or left["network"]) and time.monotonic() < deadline:
            time.sleep(1)
            left = leftovers(lab_name)
        # `docker stack rm` keeps named volumes (the stack's secret volume): removed by hand,
        # as docs/compose.md tells users
        for volume in left["volume"]:
            engine.remove("volume", volume)
    assert final == "complete", logs[-4000:]
    (path,) = results.glob(f"{lab_name}-dualpath-*/summary.json")
    summary = json.loads(path.read_text())
    assert summary["backend"] == "compose"
    assert summary["errors"] == [] and summary["turns_failed"] == 0 and summary["turns_done"] == 256
    assert summary["bytes_accounted"]
    # Shaped inside the tasks' containers: both storage NICs carried reads.
    for node in ("prefill-0", "decode-0"):
        assert summary["nics"][node]["snic"]["ingress_util"] > 0.2
    spec = json.loads((path.parent / "spec.json").read_text())
    assert spec["backend"] == "compose"
    nothing_left(lab_name)

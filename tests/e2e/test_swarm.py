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

from compose.backend import ComposeError, leftovers, run_cmd

SWARM_POOL = "198.19.128.0/18"
"""Addresses swarm hands out on its own (the ingress network): inside the benchmarking range."""


def _swarm_state() -> str:
    return run_cmd(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"]).strip()


@pytest.fixture
def swarm(compose: tuple[str, ...]) -> Iterator[None]:
    state = _swarm_state()
    had_gwbridge = bool(
        run_cmd(["docker", "network", "ls", "-q", "--filter", "name=^docker_gwbridge$"]).split()
    )
    created = False
    if state == "inactive":
        try:
            run_cmd(
                [
                    "docker",
                    "swarm",
                    "init",
                    "--advertise-addr",
                    "127.0.0.1",
                    "--default-addr-pool",
                    SWARM_POOL,
                ]
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
        if created and not run_cmd(["docker", "service", "ls", "-q"]).split():
            run_cmd(["docker", "swarm", "leave", "--force"])
            if not had_gwbridge:
                for ident in run_cmd(
                    ["docker", "network", "ls", "-q", "--filter", "name=^docker_gwbridge$"]
                ).split():
                    run_cmd(["docker", "network", "rm", ident])


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
    out = run_cmd(["docker", "service", "ps", "--format", "{{.CurrentState}}", f"{stack}_driver"])
    return out.strip().split(" ")[0] if out.strip() else ""


def test_stack_deploy_runs_the_workload(
    swarm: None, image: str, lab_name: str, tmp_path: Path
) -> None:
    file = tmp_path / "docker-compose.yml"
    results = tmp_path / "results"
    results.mkdir()
    render(file, lab_name, image=image, policies="dualpath", results=str(results))
    try:
        run_cmd(
            ["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(file), lab_name]
        )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while _driver_state(lab_name) not in ("Complete", "Failed", "Rejected", "Shutdown"):
            assert time.monotonic() < deadline, (
                f"the driver did not finish: {_driver_state(lab_name)}"
            )
            time.sleep(2)
        final = _driver_state(lab_name)
        logs = run_cmd(["docker", "service", "logs", "--raw", f"{lab_name}_driver"])
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
            run_cmd(["docker", "volume", "rm", volume])
    assert final == "Complete", logs[-4000:]
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

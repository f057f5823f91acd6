"""The compose backend from the host: `dualpath run/compare/chaos --backend compose`.

One run is one compose project of its own, `dualpath-<lab id>`: the image is built or reused
(labelled with the hash of the sources it holds), the config is rendered into
`OUT/docker-compose.yml` with every container and network labelled com.dualpath.lab=<lab id>,
the project comes up with the compose CLI (v2 `docker compose` or v1 `docker-compose`), and the
driver container runs the workload and collects the counters from inside the stack
(`compose.stack`) into OUT, which it has mounted. Then the project goes down and whatever
still carries the lab's label is removed, by id, and nothing else.

Only `compose up/down` runs a Docker command; everything else (the engine's version, images,
containers and what they carry, states, logs, removal, exec) goes to the engine through its
API (`compose.engine`), and so do the engine steps of the image build, a script
(compose/build-image.sh, through `compose.images`) run when the image is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import IO, Any

from compose import engine
from compose.engine import ComposeError
from compose.render import (
    IMAGE,
    IMAGE_REPO,
    LAB_LABEL,
    NODE_LABEL,
    RenderOptions,
    render,
    to_yaml,
)
from lab.config.models import LabConfig
from lab.run.backends import RunState, state_dir
from lab.run.runner import RunError
from services.spec import LAB_ID_PATTERN

SOURCE_PACKAGES = ("dualpath", "services", "scheduler", "netem", "lab", "compose")
SOURCE_FILES = ("pyproject.toml", "compose/Dockerfile")
COMPOSE_TIMEOUT_S = 300.0

Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def repo_root() -> Path | None:
    """The source tree this code runs from, when it has the compose folder (a checkout)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "compose" / "Dockerfile").is_file() else None


def source_hash(root: Path) -> str:
    """What the image label records; compose/build-image.sh computes the same (`sha256sum`
    lines of the sources in C-locale order, hashed again)."""
    files = [str(p.relative_to(root)) for d in SOURCE_PACKAGES for p in (root / d).rglob("*.py")]
    lines = "".join(
        f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}\n"
        for f in sorted([*files, *SOURCE_FILES])
    )
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def run_cmd(
    argv: Sequence[str],
    *,
    timeout_s: float = COMPOSE_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a compose (or build) command, with `env` added to our environment; its stdout, or
    ComposeError with its stderr."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env=None if env is None else {**os.environ, **env},
        )
    except FileNotFoundError:
        raise ComposeError(
            f"{argv[0]} is not installed: the compose backend needs Docker and Docker Compose "
            "(compose/ensure-docker.sh installs and starts them on Debian/Ubuntu)"
        ) from None
    except subprocess.TimeoutExpired:
        raise ComposeError(f"`{' '.join(argv)}` did not finish in {timeout_s:.0f} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ComposeError(f"`{' '.join(argv)}` exited {done.returncode}: {' | '.join(detail)}")
    return done.stdout


@cache
def compose_cli() -> tuple[str, ...]:
    """`docker compose` (v2) where the plugin is there, else Debian's `docker-compose` (v1)."""
    for argv in (("docker", "compose"), ("docker-compose",)):
        with contextlib.suppress(ComposeError):
            run_cmd([*argv, "version"], timeout_s=30)
            return argv
    raise ComposeError(
        "neither `docker compose` (v2) nor `docker-compose` (v1) works here: install one "
        "(apt-get install docker-compose, or compose/ensure-docker.sh)"
    )


def ensure_image(*, say: Say = _stderr) -> str:
    """The image to run: `dualpath-mesh:<hash of these sources>`, built with
    compose/build-image.sh when missing (`--offline` when DUALPATH_OFFLINE=1: debootstrap
    base, local wheelhouse, no network; its engine steps run compose.images on this Python).
    Without a source tree (an installed package), `latest`."""
    engine.server_version()  # EngineError, saying how to start one, when none answers
    root = repo_root()
    if root is None:
        if not engine.image_exists(IMAGE):
            raise ComposeError(
                f"image {IMAGE} does not exist and there is no source tree to build it from"
            )
        return IMAGE
    image = f"{IMAGE_REPO}:{source_hash(root)}"
    if engine.image_exists(image):
        return image
    say(f"[compose] building {image} (a few minutes the first time)")
    argv = [str(root / "compose" / "build-image.sh")]
    if os.environ.get("DUALPATH_OFFLINE") == "1":
        argv.append("--offline")
    # the script's engine steps (compose.images) run on this Python, which has the SDK
    run_cmd(argv, timeout_s=1800, env={"DUALPATH_PYTHON": sys.executable})
    return image


PROJECT_LABEL = "com.docker.compose.project"
"""What compose (v1 and v2) labels every container, network and volume of a project with."""


def lab_labels(lab_id: str, project: str | None = None) -> dict[str, str]:
    """The labels that mark the lab's objects, and with `project` that compose project's
    (an object must carry all of them)."""
    labels = {LAB_LABEL: lab_id}
    if project is not None:
        labels[PROJECT_LABEL] = project
    return labels


def leftovers(lab_id: str, project: str | None = None) -> dict[engine.Kind, list[str]]:
    """Containers, networks and volumes that carry the lab's label (ids), and with `project`
    only those of that compose project."""
    labels = lab_labels(lab_id, project)
    return {kind: engine.ids(kind, labels) for kind in engine.KINDS}


def remove_leftovers(lab_id: str, project: str | None = None) -> list[str]:
    """Remove, by id, whatever still carries the lab's label (and `project`'s); returns what
    was removed."""
    removed: list[str] = []
    for kind, ids in leftovers(lab_id, project).items():
        for ident in ids:
            with contextlib.suppress(ComposeError):
                engine.remove(kind, ident)
                removed.append(f"{kind} {ident[:12]}")
    return removed


def _containers(lab_id: str) -> dict[str, str]:
    """node id (or 'driver') -> container id, for the lab's containers."""
    return engine.labelled({LAB_LABEL: lab_id}, NODE_LABEL)


def down_stack(record: dict[str, Any]) -> list[str]:
    """Take a recorded compose lab down (`dualpath down`, or the end of a run): compose down
    of the recorded project, then remove by id whatever still carries both the lab's label
    and the project's. A record whose lab id or project is not the form a run writes
    (`dualpath-<lab id>`) is refused: it could name someone else's."""
    compose = record.get("compose", {})
    lab_id = str(record.get("lab_id"))
    project, file = compose.get("project"), compose.get("file")
    if not re.fullmatch(LAB_ID_PATTERN, lab_id) or project != f"dualpath-{lab_id}":
        raise ComposeError(
            f"refusing a compose record for lab {lab_id!r}, project {project!r}: a run "
            "records a lab id of 1-8 lower-case letters or digits and project dualpath-<id>"
        )
    removed: list[str] = []
    if file and Path(file).is_file():
        with contextlib.suppress(ComposeError):
            run_cmd(
                [
                    *compose_cli(),
                    "-p",
                    project,
                    "-f",
                    file,
                    "down",
                    "-v",
                    "--remove-orphans",
                    "-t",
                    "10",
                ]
            )
            removed.append(f"compose project {project}")
    removed += remove_leftovers(lab_id, project)
    return removed


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_stack(
    cfg: LabConfig,
    *,
    policies: Sequence[str],
    out_dir: Path,
    scenario_text: str | None = None,
    progress: bool = True,
    say: Say = _stderr,
) -> dict[str, Any]:
    """Run `policies` on one compose stack for `cfg`; returns summary.json for one policy,
    comparison.json for several (both also in `out_dir`). Raises RunError when the driver
    failed, ComposeError when Docker did."""
    image = ensure_image(say=say)
    cli = compose_cli()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    lab_id = secrets.token_hex(3)
    project = f"dualpath-{lab_id}"
    options = RenderOptions(
        lab=lab_id,
        image=image,
        results=str(out_dir),
        policies=tuple(policies),
        out="",
        scenario=scenario_text,
    )
    file = out_dir / "docker-compose.yml"
    file.write_text(
        to_yaml(
            render(cfg, options), [f"compose project {project}: dualpath {cfg.name}, lab {lab_id}"]
        )
    )
    state = RunState(lab_id, "compose", file, None)  # no data directory on the host
    state.data["compose"] = {"project": project, "file": str(file), "cli": list(cli)}
    state.save()
    say(f"[compose] lab {lab_id}: {project} up ({' '.join(cli)}), results in {out_dir}")
    status: int | None = None
    try:
        _compose_up(cfg, [*cli, "-p", project, "-f", str(file), "up", "-d", "--no-build"])
        ids = _containers(lab_id)
        state.data["compose"]["containers"] = ids
        state.save()
        status = _follow(ids, out_dir / "logs" / "driver.container.log", progress=progress)
    finally:
        _save_container_logs(lab_id, out_dir / "logs")
        _take_down(state, say)
    return _stack_result(
        out_dir, "summary.json" if len(policies) == 1 else "comparison.json", status
    )


def _compose_up(cfg: LabConfig, argv: list[str]) -> None:
    """`compose up`; a subnet another Docker network already uses is named with its setting."""
    try:
        run_cmd(argv)
    except ComposeError as exc:
        if "overlaps" not in str(exc):
            raise
        n = cfg.network
        raise ComposeError(
            f"another Docker network already uses a subnet of this config "
            f"(network.compute_subnet {n.compute_subnet}, network.storage_subnet "
            f"{n.storage_subnet}, network.mgmt_subnet {n.mgmt_subnet}): take that stack "
            "down, or give this run other subnets with --set network.<name>_subnet=..."
        ) from exc


def _save_container_logs(lab_id: str, logs: Path) -> None:
    """Every container's output to logs/NODE.container.log (a container gone is skipped)."""
    for node, cid in _containers(lab_id).items():
        with contextlib.suppress(ComposeError):
            (logs / f"{node}.container.log").write_bytes(engine.logs(cid, name=node))


def _take_down(state: RunState, say: Say) -> None:
    """Remove the stack and the lab's record; ComposeError when something of it is left."""
    lab_id = str(state.data["lab_id"])
    removed = down_stack(state.data)
    left = leftovers(lab_id)
    state.remove()
    say(f"[compose] lab {lab_id} down: removed {len(removed)} objects")
    if any(left.values()):
        raise ComposeError(f"lab {lab_id} left {left} behind after down")


def _stack_result(out_dir: Path, name: str, status: int | None) -> dict[str, Any]:
    """The driver container's result file `name`; RunError with its last words when it
    failed or wrote none."""
    result = out_dir / name
    if status != 0 or not result.exists():
        why = _tail(out_dir / "logs" / "driver.container.log")
        raise RunError(
            f"the driver exited with status {status}:\n{why}\n(logs in {out_dir / 'logs'})"
        )
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def _follow(ids: dict[str, str], log: Path, *, progress: bool) -> int:
    """Wait for the driver container to exit (its stdout to `log`, its stderr to stderr when
    `progress`, else to `log` too); a node container that exits first ends the run at once,
    naming the node and its last words. The wait follows the engine's events (`die` of the
    stack's containers), so nothing polls the engine while the workload is measured."""
    driver = ids.get("driver")
    if driver is None:
        raise ComposeError(f"the stack has no driver container (containers: {sorted(ids)})")
    with log.open("wb") as sink:
        follower = engine.LogFollower(driver, sink, sys.stderr.buffer if progress else sink)
        try:
            node, status = engine.wait_for_exit(ids)
            if node == "driver":
                return status
            words = engine.logs(ids[node], name=node, tail=5)
            text = words.decode(errors="replace").strip()
            raise ComposeError(f"{node}'s container exited with status {status}: {text}")
        finally:
            follower.close()


def recorded_stack(lab_id: str | None) -> dict[str, Any] | None:
    """The one compose lab this host brought up (or `lab_id`'s), None when there is none.
    (Inside a stack, the driver's own run record has no `compose` entry: it is not a stack.)"""
    labs = []
    sdir = state_dir()
    if sdir.is_dir():
        for path in sorted(sdir.glob("*.run.json")):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                data = json.loads(path.read_text())
                if "compose" in data and lab_id in (None, data.get("lab_id")):
                    labs.append(data)
    if len(labs) > 1:
        ids = ", ".join(str(lab["lab_id"]) for lab in labs)
        raise ComposeError(f"several compose labs are up ({ids}); choose one with --lab")
    return labs[0] if labs else None


def exec_in(
    record: dict[str, Any], node_id: str, argv: Sequence[str], *, stdin: bool = False
) -> int:
    """Run `argv` in one node's (or the driver's) container of a recorded compose lab; its
    exit status. Through the engine's API, output streamed to ours, our stdin copied to the
    command's with `stdin`; with `stdin` on a terminal (stdin and stdout both TTYs) the
    command gets a TTY of its own and our terminal talks to it in raw mode, as with
    `docker exec -it` (compose.engine.exec_tty)."""
    ids = dict(record.get("compose", {}).get("containers", {}))
    if node_id not in ids:
        raise ComposeError(f"lab {record['lab_id']} has no node {node_id!r} (have: {sorted(ids)})")
    out, err = sys.stdout.buffer, sys.stderr.buffer
    if stdin and sys.stdin.isatty() and sys.stdout.isatty():
        out.flush()
        return engine.exec_tty(
            ids[node_id], argv, name=node_id, fd_in=sys.stdin.fileno(), fd_out=out.fileno()
        )

    def write(sink: IO[bytes]) -> Callable[[bytes], None]:
        def put(data: bytes) -> None:
            sink.write(data)
            sink.flush()

        return put

    return engine.exec_in(
        ids[node_id],
        argv,
        name=node_id,
        out=write(out),
        err=write(err),
        stdin=sys.stdin.fileno() if stdin else None,
    )


__all__ = [
    "ComposeError",
    "compose_cli",
    "down_stack",
    "ensure_image",
    "exec_in",
    "lab_labels",
    "leftovers",
    "recorded_stack",
    "run_stack",
    "source_hash",
]

"""The agent that runs as the main process of every node container of a compose stack.

At start it finds the container's NICs by subnet (never by interface order) and shapes them
with the netns backend's plan (`netem.container`); then it serves the driver on its mgmt
address: start and stop the node process of one run, NIC counters, link changes, node actions
and the node's log. It acts only inside its own container and starts no process but the node.
Every request must present the stack's agent secret (`compose.stack.agent_secret`, shared by the
stack's services through a volume; services.auth); a lab id must be one (ClusterSpec), and the
only directory `/v1/stop` deletes is the data directory the agent itself made for the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from aiohttp import web

from compose.render import NETWORKS
from compose.stack import agent_secret
from dualpath.errors import DualPathError
from lab.run.backends import BackendError, ProcessHost, RunState, make_data_dir, state_dir
from netem.container import ContainerNics, find_interfaces, has_net_admin
from netem.counters import NicCounters
from netem.errors import NetemError
from netem.linkchange import Change
from netem.spec import LinkShape, NicSpec, SpecError
from services import http_bounds
from services.auth import bearer_middleware
from services.limits import AGENT_LIMITS
from services.spec import LAB_ID_PATTERN, ClusterSpec

MAX_LOG_BYTES = 1 << 20
EXIT_NO_NET_ADMIN = 3


def _log_dir() -> Path:
    return Path(os.environ.get("DUALPATH_LOG_DIR", "/var/log/dualpath"))


def _data_root() -> Path:
    """Where the agent makes each run's data directory (mkdtemp: its own, 0700)."""
    return Path(os.environ.get("DUALPATH_DATA_DIR", "/var/tmp"))


class Nics(Protocol):
    """The container's NICs as the agent uses them (netem.container.ContainerNics)."""

    @property
    def nics(self) -> dict[str, NicSpec]: ...

    def counters(self) -> dict[str, NicCounters]: ...

    def set_link(
        self,
        name: str,
        *,
        direction: Literal["egress", "ingress", "both"] = "both",
        up: bool | None = None,
        **values: float,
    ) -> tuple[Change, ...]: ...

    def close(self) -> None: ...


class AgentError(DualPathError):
    """The agent cannot do what was asked; the message says why (HTTP 409)."""


@dataclass(frozen=True)
class NicArg:
    """One `--cnic/--snic/--mgmt SUBNET[@RATE_MBIT]` argument."""

    name: str
    subnet: str
    rate_mbit: float | None = None

    @classmethod
    def parse(cls, name: str, text: str) -> NicArg:
        subnet, _, rate = text.partition("@")
        try:
            return cls(name, subnet, float(rate) if rate else None)
        except ValueError:
            raise SpecError(f"--{name}: {text!r} is not SUBNET[@RATE_MBIT]") from None


def net_admin_message(node_id: str, nics: Sequence[NicArg]) -> str:
    shaped = ", ".join(f"{a.name} at {a.rate_mbit:g} Mbit/s" for a in nics if a.rate_mbit)
    return (
        f"{node_id}: this container lacks CAP_NET_ADMIN, which shaping its NICs needs "
        f"({shaped}); add `cap_add: [NET_ADMIN]` to service {node_id} "
        "(`dualpath compose render` writes it for every node that shapes)"
    )


def container_nics(
    node_id: str, args: Sequence[NicArg], *, isolation: bool, kv_min_fraction: float
) -> tuple[ContainerNics, dict[str, str]]:
    """The node's NICs as netem specs named after the container's interfaces, found by
    subnet, shaped as `lab.config.topology.topology_for` shapes them on the netns backend; and each
    network's address ('198.18.0.10')."""
    found = find_interfaces({a.name: a.subnet for a in args})
    nics: dict[str, NicSpec] = {}
    addresses: dict[str, str] = {}
    for arg in args:
        ifname, address = found[arg.name]
        shape = None
        if arg.rate_mbit:
            classes = arg.name == "cnic"
            shape = LinkShape(
                arg.rate_mbit,
                priority_classes=classes and isolation,
                kv_min_fraction=kv_min_fraction,
            )
        nics[arg.name] = NicSpec(ifname, NETWORKS[arg.name], address, shape)
        addresses[NETWORKS[arg.name]] = address.split("/")[0]
    return ContainerNics(node_id, nics), addresses


class _NodeProcess(ProcessHost):
    """The one node process of this container for one run."""

    def start(self, node_id: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start(self.spec.node(node_id))


@dataclass
class _Run:
    spec: ClusterSpec
    host: _NodeProcess
    state: RunState


class Agent:
    """What the HTTP handlers call; every method is blocking and thread-safe."""

    def __init__(self, node_id: str, nics: Nics, addresses: dict[str, str], *, secret: str) -> None:
        """`secret`: what every request to this agent must present (`agent_secret()`)."""
        self.node_id = node_id
        self.secret = secret
        self.nics = nics
        self.addresses = addresses
        self.shaped: list[str] = []
        self._run: _Run | None = None
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        run = self._run
        return {
            "node": self.node_id,
            "addresses": self.addresses,
            "nics": {
                name: asdict(nic.shape) if nic.shape else None
                for name, nic in self.nics.nics.items()
            },
            "interfaces": {name: nic.name for name, nic in self.nics.nics.items()},
            "lab": run.spec.lab_id if run else None,
        }

    def start(self, spec_data: Any) -> dict[str, Any]:
        """Start this node's process for the lab of `spec_data` (a ClusterSpec: its lab id is
        checked there). The run's data directory is the agent's own, made here; whatever
        `data_dir` the request named is replaced, so no caller chooses a path."""
        spec = ClusterSpec.model_validate(spec_data)
        spec.node(self.node_id)  # KeyError (400) when the spec has no such node
        with self._lock:
            if self._run is not None:
                raise AgentError(f"{self.node_id} already runs lab {self._run.spec.lab_id}")
            agent_dir = state_dir() / "agent"
            agent_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            data_dir = make_data_dir(spec.lab_id, _data_root())
            spec = spec.model_copy(update={"data_dir": str(data_dir.path)})
            spec_path = agent_dir / f"{spec.lab_id}.spec.json"
            spec.dump(spec_path)
            state = RunState(spec.lab_id, "compose", spec_path, data_dir)
            host = _NodeProcess(spec, spec_path, _log_dir() / spec.lab_id, state)
            try:
                state.save()
                host.start(self.node_id)
            except BaseException:
                host.stop_nodes()
                state.remove_data_dir()
                state.remove()
                raise
            self._run = _Run(spec, host, state)
            pid = host.procs[self.node_id].pid
        print(
            f"[agent {self.node_id}] lab {spec.lab_id}: node process started (pid {pid})",
            flush=True,
        )
        return {"pid": pid}

    def _current(self) -> _Run:
        if self._run is None:
            raise AgentError(f"{self.node_id} runs no lab")
        return self._run

    def poll(self) -> dict[str, Any]:
        """Whether the node process still runs (and its exit status when not)."""
        run = self._current()
        code = run.host.procs[self.node_id].poll()
        return {"running": code is None, "exit_status": code}

    def stop(self) -> dict[str, Any]:
        with self._lock:
            run = self._current()
            removed = run.host.stop_nodes()
            removed += run.state.remove_data_dir()  # only the one made by start()
            run.state.remove()
            self._run = None
        print(f"[agent {self.node_id}] lab {run.spec.lab_id}: stopped", flush=True)
        return {"removed": removed}

    def log(self, lab_id: str) -> bytes:
        if not re.fullmatch(LAB_ID_PATTERN, lab_id):
            raise ValueError(f"lab: {lab_id!r} is not a lab id (1-8 lower-case letters or digits)")
        path = _log_dir() / lab_id / f"{self.node_id}.log"
        if not path.is_file():
            return b""
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - MAX_LOG_BYTES))
            return fh.read()

    def counters(self) -> dict[str, Any]:
        return {name: asdict(c) for name, c in self.nics.counters().items()}

    def set_link(self, nic: str, changes: dict[str, Any]) -> str:
        values = dict(changes)
        up = values.pop("up", None)
        direction = values.pop("direction", "both")
        made = self.nics.set_link(nic, direction=direction, up=up, **values)
        what = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items()
        )
        return f"{self.node_id}/{nic}: {what} ({len(made)} kernel changes in its container)"

    def node_action(self, action: str) -> str:
        with self._lock:
            return self._current().host.node_action(self.node_id, action)

    def close(self) -> None:
        with contextlib.suppress(AgentError):
            self.stop()
        self.nics.close()


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status)


async def _call(fn: Callable[[], Any]) -> web.Response:
    """Run an agent method off the event loop: its result as 200, a bad value as 400, a
    refusal as 409."""
    try:
        result = await asyncio.to_thread(fn)
    except (SpecError, KeyError, ValueError, TypeError) as exc:
        return _json(400, {"error": f"{type(exc).__name__}: {exc}"})
    except (AgentError, BackendError, Exception) as exc:
        return _json(409, {"error": f"{type(exc).__name__}: {exc}"})
    return _json(200, result if isinstance(result, dict) else {"result": result})


async def _body(request: web.Request) -> Any:
    """The request's JSON body ({} when empty); a body that is not JSON is 400."""
    raw = await request.read()
    try:
        return json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"body is not JSON: {exc}"}),
            content_type="application/json",
        ) from None


class _Routes:
    """The agent's HTTP handlers, one per route of http_app."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def info(self, request: web.Request) -> web.Response:
        return await _call(self.agent.info)

    async def poll(self, request: web.Request) -> web.Response:
        return await _call(self.agent.poll)

    async def counters(self, request: web.Request) -> web.Response:
        return await _call(self.agent.counters)

    async def log(self, request: web.Request) -> web.Response:
        try:
            data = await asyncio.to_thread(self.agent.log, request.match_info["lab"])
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        return web.Response(body=data, content_type="text/plain")

    async def start(self, request: web.Request) -> web.Response:
        data = await _body(request)
        if not isinstance(data, dict):
            return _json(400, {"error": 'body must be a JSON object {"spec": ...}'})
        spec = data.get("spec")
        return await _call(lambda: self.agent.start(spec))

    async def stop(self, request: web.Request) -> web.Response:
        return await _call(self.agent.stop)

    async def link(self, request: web.Request) -> web.Response:
        changes = await _body(request)
        if not isinstance(changes, dict):
            return _json(400, {"error": "body must be a JSON object"})
        return await _call(lambda: self.agent.set_link(request.match_info["nic"], changes))

    async def node(self, request: web.Request) -> web.Response:
        return await _call(lambda: self.agent.node_action(request.match_info["action"]))


def http_app(agent: Agent) -> web.Application:
    """GET /v1/info, /v1/poll, /v1/counters, /v1/log/{lab}; POST /v1/start {spec}, /v1/stop,
    /v1/links/{nic} {changes}, /v1/nodes/{action}. Every route requires the agent's secret
    (401 otherwise); a bad value is 400 naming it, a refused request 409; nothing is changed
    in any of these cases."""
    routes = _Routes(agent)
    app = web.Application(
        client_max_size=AGENT_LIMITS.max_payload_bytes,
        middlewares=[http_bounds.middleware, bearer_middleware(agent.secret)],
    )
    app.router.add_get("/v1/info", routes.info)
    app.router.add_get("/v1/poll", routes.poll)
    app.router.add_get("/v1/counters", routes.counters)
    app.router.add_get("/v1/log/{lab}", routes.log)
    app.router.add_post("/v1/start", routes.start)
    app.router.add_post("/v1/stop", routes.stop)
    app.router.add_post("/v1/links/{nic}", routes.link)
    app.router.add_post("/v1/nodes/{action}", routes.node)
    return app


async def serve(agent: Agent, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT (docker stop), then stop the node process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        http_app(agent), access_log=None, **http_bounds.runner_kwargs(AGENT_LIMITS)
    )
    await runner.setup()
    await http_bounds.start_site(runner, host, port, limits=AGENT_LIMITS)
    print(f"[agent {agent.node_id}] ready on {host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await asyncio.to_thread(agent.close)


def run_agent(
    node_id: str,
    nics: Sequence[NicArg],
    *,
    isolation: bool,
    kv_min_fraction: float,
    port: int,
    say: Callable[[str], None],
) -> int:
    """The node container's main: 0 after a clean stop, EXIT_NO_NET_ADMIN when a NIC must
    be shaped and the container may not, 2 when a NIC cannot be found or shaped."""
    if any(a.rate_mbit for a in nics) and not has_net_admin():
        say(f"error: {net_admin_message(node_id, nics)}")
        return EXIT_NO_NET_ADMIN
    try:
        secret = agent_secret()
        shaped, addresses = container_nics(
            node_id, nics, isolation=isolation, kv_min_fraction=kv_min_fraction
        )
        agent = Agent(node_id, shaped, addresses, secret=secret)
        agent.shaped = shaped.shape()
    except (NetemError, SpecError, BackendError) as exc:  # BackendError: the secret file
        say(f"error: {node_id}: {exc}")
        return 2
    for line in agent.shaped:
        say(f"[agent {node_id}] shaped {line}")
    import uvloop

    uvloop.run(serve(agent, addresses["mgmt"], port))
    return 0

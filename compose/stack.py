"""The compose backend as seen from inside the stack: the driver container's side.

`StackBackend` is the runner's Backend for `compose`: the node containers are already up and
each runs an agent (`compose.agent`) on its mgmt address, so bringing a lab up means asking
every agent to start its node process with the run's spec, and counters, link changes and node
actions are requests to the agents. Only the management network carries these requests.
`conduct` is the driver container's main: wait for the agents, run each policy, compare.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from compose.render import AGENT_PORT, AGENT_SECRET_FILE
from lab.config.topology import with_addresses
from lab.run.backends import BackendError, RunState
from services.auth import AUTH_HEADER, SecretError, bearer, shared_secret
from services.spec import ClusterSpec, Role

AGENT_WAIT_S = 180.0
REQUEST_TIMEOUT_S = 60.0
START_ORDER = (Role.STORAGE, Role.SCHEDULER, Role.PREFILL, Role.DECODE)


def agent_secret() -> str:
    """The stack's agent secret (`$DUALPATH_AGENT_SECRET_FILE`, by default the file on the
    stack's secret volume), made by whichever service of the stack reads it first: agents
    require it, the driver presents it. BackendError when it cannot be read or trusted."""
    path = Path(os.environ.get("DUALPATH_AGENT_SECRET_FILE", AGENT_SECRET_FILE))
    try:
        return shared_secret(path)
    except SecretError as exc:
        raise BackendError(f"the stack's agent secret: {exc}") from None


class AgentRefused(BackendError):
    """An agent refused the stack's secret: it holds another one (a multi-host swarm whose
    hosts each made their own, docs/compose.md); waiting does not help."""


class AgentClient:
    """JSON over HTTP to one node's agent; one kept-alive connection, reopened on error."""

    def __init__(self, node_id: str, host: str, port: int = AGENT_PORT, *, secret: str) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self._headers = {"Content-Type": "application/json", AUTH_HEADER: bearer(secret)}
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=REQUEST_TIMEOUT_S
                )
            try:
                self._conn.request(method, path, body=data, headers=self._headers)
                resp = self._conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt:
                    raise BackendError(
                        f"{self.node_id}: its agent at {self.host}:{self.port} did not answer "
                        f"{method} {path}: {exc}"
                    ) from exc
                continue
            if path.startswith("/v1/log/") and resp.status == 200:
                return raw.decode(errors="replace")
            try:
                reply = json.loads(raw or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                reply = {}
            if resp.status != 200:
                why = reply.get("error") or reply.get("detail") or resp.reason
                error = AgentRefused if resp.status == 401 else BackendError
                raise error(f"{self.node_id}: {why} (HTTP {resp.status})")
            return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def discover(
    node_ids: Sequence[str],
    *,
    secret: str,
    timeout_s: float = AGENT_WAIT_S,
    say: Callable[[str], None] | None = None,
) -> dict[str, tuple[AgentClient, dict[str, Any]]]:
    """Each node's agent, found by its service name on the management network (compose and
    swarm DNS), and what it reports (`/v1/info`, presenting `secret`). BackendError names the
    nodes that did not answer within `timeout_s`."""
    found: dict[str, tuple[AgentClient, dict[str, Any]]] = {}
    why: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    next_say = time.monotonic() + 10
    while True:
        for node_id in node_ids:
            if node_id in found:
                continue
            try:
                host = socket.getaddrinfo(node_id, AGENT_PORT, socket.AF_INET)[0][4][0]
                client = AgentClient(node_id, str(host), secret=secret)
                found[node_id] = (client, client.request("GET", "/v1/info"))
            except AgentRefused:
                raise
            except (OSError, BackendError) as exc:
                why[node_id] = str(exc)
        missing = [n for n in node_ids if n not in found]
        if not missing:
            return found
        if time.monotonic() > deadline:
            detail = "; ".join(f"{n}: {why.get(n, '?')}" for n in missing)
            raise BackendError(
                f"no agent answered for {', '.join(missing)} within {timeout_s:.0f} s ({detail}); "
                "did its container exit? (docker compose logs NODE)"
            )
        if say is not None and time.monotonic() > next_say:
            say(f"[driver] waiting for the agents of {', '.join(missing)}")
            next_say += 10
        time.sleep(0.5)


def check_agent(spec: ClusterSpec, node_id: str, info: Mapping[str, Any]) -> None:
    """The container shapes its NICs as the spec says (both come from one config; a compose
    file edited by hand, or rendered from another config, would not). BackendError names
    the node, the NIC and both rates."""
    node = spec.node(node_id)
    want = {"cnic": node.cnic_rate_mbit, "snic": node.snic_rate_mbit}
    for nic, rate in want.items():
        shape = (info.get("nics") or {}).get(nic)
        have = None if not shape else shape.get("rate_mbit")
        if (rate or None) != (have or None) and not (rate and have and abs(rate - have) < 1e-6):
            raise BackendError(
                f"{node_id}.{nic}: its container shapes it at {have} Mbit/s, the config says "
                f"{rate} Mbit/s; render the compose file from this config again "
                "(dualpath compose render)"
            )


class StackBackend:
    """The runner's Backend inside a compose stack (see the module docstring)."""

    name = "compose"

    def __init__(self, spec: ClusterSpec, spec_path: Path, log_dir: Path, state: RunState) -> None:
        self.spec = spec
        self.spec_path = spec_path
        self.log_dir = log_dir
        self.state = state
        self.agents: dict[str, AgentClient] = {}
        self.started: list[str] = []

    def _ordered(self) -> list[str]:
        return [n.node_id for role in START_ORDER for n in self.spec.by_role(role)]

    def up(self) -> None:
        self.state.save()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        found = discover(self._ordered(), secret=agent_secret())
        for node_id, (client, info) in found.items():
            check_agent(self.spec, node_id, info)
            self.agents[node_id] = client
        spec = with_addresses(self.spec, {n: info["addresses"] for n, (_, info) in found.items()})
        if spec != self.spec:
            self.spec = spec
            spec.dump(self.spec_path)  # the driver reads it after up()
        body = {"spec": json.loads(spec.model_dump_json())}
        for node_id in self._ordered():
            self.agents[node_id].request("POST", "/v1/start", body)
            self.started.append(node_id)
        time.sleep(0.3)
        dead = {}
        for node_id in self.started:
            status = self.agents[node_id].request("GET", "/v1/poll")
            if not status["running"]:
                dead[node_id] = status["exit_status"]
        if dead:
            self._fetch_logs()
            raise BackendError(f"node processes exited at start: {dead} (see {self.log_dir})")

    def driver_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)  # the driver container is on the management network

    def exec_argv(self, node_id: str, argv: Sequence[str]) -> list[str]:
        raise BackendError(
            f"inside the stack there is no way into {node_id}'s container: from the host, "
            f"`dualpath exec {node_id} -- CMD` (or docker exec) runs a command there"
        )

    def counters(self) -> dict[str, dict[str, dict[str, Any]]] | None:
        return {n: self.agents[n].request("GET", "/v1/counters") for n in self.started}

    def node_action(self, node_id: str, action: str) -> str:
        return str(self._agent(node_id).request("POST", f"/v1/nodes/{action}")["result"])

    def set_link(self, node_id: str, nic: str, changes: dict[str, Any]) -> str:
        return str(self._agent(node_id).request("POST", f"/v1/links/{nic}", changes)["result"])

    def _agent(self, node_id: str) -> AgentClient:
        agent = self.agents.get(node_id)
        if agent is None:
            raise BackendError(f"no node {node_id!r} in this lab")
        return agent

    def _fetch_logs(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for node_id in self.started:
            try:
                text = self.agents[node_id].request("GET", f"/v1/log/{self.spec.lab_id}")
            except BackendError as exc:
                text = f"(log not available: {exc})\n"
            (self.log_dir / f"{node_id}.log").write_text(text)

    def down(self) -> list[str]:
        self._fetch_logs()
        removed: list[str] = []
        errors: list[str] = []
        for node_id in reversed(self.started):
            try:
                reply = self.agents[node_id].request("POST", "/v1/stop")
                removed += [f"{node_id}: {item}" for item in reply["removed"]]
            except BackendError as exc:
                errors.append(str(exc))
        self.started.clear()
        for agent in self.agents.values():
            agent.close()
        removed += self.state.remove_data_dir()
        self.state.remove()
        if errors:
            raise BackendError("; ".join(errors))
        return removed

"""Fuzz every HTTP handler on live servers: the scheduler's API, the lab control endpoint, the
compose node agent and a node's /metrics exporter.

Each input is one raw HTTP/1.1 request with a fuzzed method, target, headers (the secret
presented, missing or wrong) and body. Every request must get a response within the input
bound; a 5xx is a failure (a 4xx is the server refusing, as it should), and so is a server that
then no longer answers a legitimate request.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from fuzzlib import (
    BUDGET,
    EDGES,
    client_session,
    http_exchange,
    http_requests,
    json_body,
    json_values,
    tried,
)
from hypothesis import given
from hypothesis import strategies as st

from compose.agent import Agent, http_app
from lab.run.backends import BackendError
from lab.run.chaos import ClusterLinks
from lab.run.control import ControlServer
from netem.counters import NicCounters
from netem.linkchange import Change
from netem.spec import LinkShape, NicSpec, SpecError
from services.auth import new_secret
from services.prom import METRICS_PATH, MetricsExporter
from services.spec import ClusterSpec

SECRET = new_secret()
Request = tuple[str, str, dict[str, str], bytes]


def _json_edges() -> list[Any]:
    """The fuzz dictionary's values that JSON can carry, plus numbers JSON allows and
    Python's int() and float() meet at their edges."""
    finite = [v for v in EDGES if not isinstance(v, float) or math.isfinite(v)]
    edges = [v for v in finite if not isinstance(v, bytes)]
    return [*edges, 10**30, -(10**30), 1e308, 2**53 + 1]


def _one_field_off(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """`base` with one field set to an edge value or dropped, or an unknown field added."""
    edges = st.sampled_from(_json_edges()) | json_values

    def change(name: str, value: Any, drop: bool) -> dict[str, Any]:
        body = dict(base)
        if drop:
            body.pop(name, None)
        else:
            body[name] = value
        return body

    names = st.sampled_from([*base, "extra"])
    return st.builds(change, names, edges, st.sampled_from([False, False, False, True]))


def _check(status: int | None, raw: bytes, request: Request, *, allow_501: bool = False) -> None:
    method, target = request[0], request[1]
    what = f"{method!r} {target!r} {request[2]} {request[3][:80]!r}"
    assert status is not None, f"no HTTP response to {what}: {raw[:200]!r}"
    if allow_501 and status == 501 and method not in ("GET", "POST"):
        return  # RFC 9110 §15.6.2: the answer to a method the server does not implement
    assert status < 500, f"{status} for {what}: {raw[:300]!r}"


async def _get(url: str, *, secret: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    async with (
        client_session(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


# -- scheduler ------------------------------------------------------------------------------

TURN = {"traj_id": 1, "turn_index": 0, "context_tokens": 640, "append_tokens": 64, "gen_tokens": 8}
SCHEDULER_ROUTES = ["/v1/turns", "/v1/status", "/v1/cluster", "/metrics", "/v1/health"]


@pytest.fixture
async def scheduler(
    make_spec: Callable[..., ClusterSpec], run_scheduler: Callable[[ClusterSpec], Any]
) -> AsyncIterator[ClusterSpec]:
    spec = make_spec(secret=SECRET)
    async with run_scheduler(spec):
        yield spec


@pytest.mark.fuzz_target("scheduler.http")
@BUDGET
@given(
    request=http_requests(SCHEDULER_ROUTES, SECRET, json_body(st.just(TURN) | _one_field_off(TURN)))
)
async def test_scheduler_http(scheduler: ClusterSpec, request: Request) -> None:
    tried()
    host, port = scheduler.http.host, scheduler.http.port
    status, raw = await http_exchange(host, port, *request)
    _check(status, raw, request)
    assert await _get(f"http://{host}:{port}/v1/status") == 200


# -- lab control endpoint ---------------------------------------------------------------------

LINKS = ClusterLinks(
    {"prefill-0": {"cnic": 400.0, "snic": 100.0}, "decode-0": {"cnic": 400.0, "snic": 100.0}},
    frozenset({"storage-0"}),
)
CONTROL_ROUTES = [
    "/v1/links",
    "/v1/links/prefill-0/snic",
    "/v1/links/decode-0/cnic",
    "/v1/nodes/prefill-0/kill",
    "/v1/nodes/decode-0/restart",
    "/v1/nodes/storage-0/stop",
]
LINK_CHANGE = {"rate": "50%", "loss": "1%", "delay": "5ms", "direction": "egress"}


class MemoryBackend:
    """Records what it is asked to do; refuses storage nodes (a backend's refusal)."""

    name = "memory"

    def set_link(self, node_id: str, nic: str, changes: dict[str, Any]) -> str:
        return f"{node_id}/{nic} changed"

    def node_action(self, node_id: str, action: str) -> str:
        if node_id.startswith("storage"):
            raise BackendError("storage nodes are not ours to stop here")
        return f"{node_id} {action}"


@pytest.fixture
def control() -> Iterator[ControlServer]:
    server = ControlServer(MemoryBackend(), LINKS, secret=SECRET)  # type: ignore[arg-type]
    yield server
    server.close()


@pytest.mark.fuzz_target("control.http")
@BUDGET
@given(
    request=http_requests(
        CONTROL_ROUTES, SECRET, json_body(st.just(LINK_CHANGE) | _one_field_off(LINK_CHANGE))
    )
)
async def test_control_http(control: ControlServer, request: Request) -> None:
    tried()
    port = int(control.url.rsplit(":", 1)[1])
    status, raw = await http_exchange("127.0.0.1", port, *request)
    _check(status, raw, request, allow_501=True)
    assert await _get(f"{control.url}/v1/links", secret=SECRET) == 200


# -- compose node agent -----------------------------------------------------------------------


class FakeNics:
    """The agent's NICs in memory (tests/integration/test_compose_agent.py has the same)."""

    def __init__(self) -> None:
        self.nics = {
            "snic": NicSpec("eth1", "storage", "198.18.1.100/24", LinkShape(100.0)),
            "mgmt": NicSpec("eth0", "mgmt", "198.18.2.100/24", None),
        }

    def counters(self) -> dict[str, NicCounters]:
        return {name: NicCounters(1, 2, 0, 0, 0, 0, None) for name in self.nics}

    def set_link(
        self,
        name: str,
        *,
        direction: Literal["egress", "ingress", "both"] = "both",
        up: bool | None = None,
        **values: float,
    ) -> tuple[Change, ...]:
        if name not in self.nics:
            raise SpecError(f"nic: {name!r} is not a NIC of storage-0")
        for key, value in values.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise SpecError(f"storage-0.{name}.{direction}.{key}: {value!r} is invalid")
        return ()

    def close(self) -> None:
        pass


AGENT_ROUTES = [
    "/v1/info",
    "/v1/poll",
    "/v1/counters",
    "/v1/log/it",
    "/v1/start",
    "/v1/stop",
    "/v1/links/snic",
    "/v1/nodes/stop",
]


@pytest.fixture
async def agent(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Agent, int]]:
    for name, sub in (("STATE", "state"), ("LOG", "logs"), ("DATA", "agent-data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(f"DUALPATH_{name}_DIR", str(tmp_path / sub))
    node = Agent("storage-0", FakeNics(), {"mgmt": "127.0.0.1"}, secret=SECRET)
    runner = web.AppRunner(http_app(node), access_log=None)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield node, port
    finally:
        await runner.cleanup()
        node.close()


AGENT_BODIES = st.one_of(
    st.just({"rate_mbit": 50.0}) | _one_field_off({"rate_mbit": 50.0, "up": True}),
    st.fixed_dictionaries({"spec": json_values}),
)


@pytest.mark.fuzz_target("compose_agent.http")
@BUDGET
@given(request=http_requests(AGENT_ROUTES, SECRET, json_body(AGENT_BODIES)))
async def test_compose_agent_http(agent: tuple[Agent, int], request: Request) -> None:
    tried()
    node, port = agent
    status, raw = await http_exchange("127.0.0.1", port, *request)
    _check(status, raw, request)
    assert await _get(f"http://127.0.0.1:{port}/v1/info", secret=SECRET) == 200
    assert node.info()["lab"] is None  # nothing fuzzed may start a lab


# -- /metrics exporter ------------------------------------------------------------------------


@pytest.fixture
async def exporter() -> AsyncIterator[int]:
    async def read() -> dict[str, NicCounters]:
        return {"cnic": NicCounters(10, 20, 0, 1, 0, 0, 400.0)}

    metrics = MetricsExporter("prefill-0", "prefill", read)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await metrics.start("127.0.0.1", port)
    try:
        yield port
    finally:
        await metrics.close()


@pytest.mark.fuzz_target("prom.http")
@BUDGET
@given(request=http_requests([METRICS_PATH, "/"], SECRET, json_body()))
async def test_metrics_exporter_http(exporter: int, request: Request) -> None:
    tried()
    status, raw = await http_exchange("127.0.0.1", exporter, *request)
    _check(status, raw, request)
    assert await _get(f"http://127.0.0.1:{exporter}{METRICS_PATH}") == 200

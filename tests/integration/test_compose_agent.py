"""The compose node agent's HTTP API on loopback, with a real node process (a storage server
of a local-backend spec) and in-memory NICs behind the agent's `Nics` protocol: start, poll,
link changes (a bad value is 400 naming it), node actions, stop; a second start is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from compose.agent import Agent, http_app
from netem.counters import NicCounters
from netem.linkchange import Change
from netem.spec import LinkShape, NicSpec, SpecError
from services.auth import new_secret
from services.spec import ClusterSpec

SECRET = new_secret()


class FakeNics:
    """What ContainerNics does, in memory: records link changes, validates rates."""

    def __init__(self) -> None:
        self.nics = {
            "snic": NicSpec("eth1", "storage", "198.18.1.100/24", LinkShape(100.0)),
            "mgmt": NicSpec("eth0", "mgmt", "198.18.2.100/24", None),
        }
        self.changes: list[tuple[str, str, bool | None, dict[str, float]]] = []
        self.closed = False

    def counters(self) -> dict[str, NicCounters]:
        return {
            name: NicCounters(
                egress_bytes=1,
                ingress_bytes=2,
                egress_drops=0,
                ingress_drops=0,
                egress_backlog_bytes=0,
                ingress_backlog_bytes=0,
                rate_mbit=nic.shape.rate_mbit if nic.shape else None,
            )
            for name, nic in self.nics.items()
        }

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
        rate = values.get("rate_mbit")
        if rate is not None and rate <= 0:
            raise SpecError(f"storage-0.{name}.{direction}.rate_mbit: {rate} is invalid")
        self.changes.append((name, direction, up, values))
        return ()

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALPATH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DUALPATH_LOG_DIR", str(tmp_path / "logs"))
    (tmp_path / "agent-data").mkdir()
    monkeypatch.setenv("DUALPATH_DATA_DIR", str(tmp_path / "agent-data"))


@pytest.fixture
async def agent_client(
    make_spec: Callable[..., ClusterSpec],
) -> AsyncIterator[tuple[TestClient[Any, Any], Agent, FakeNics, ClusterSpec]]:
    nics = FakeNics()
    agent = Agent(
        "storage-0", nics, {"storage": "198.18.1.100", "mgmt": "198.18.2.100"}, secret=SECRET
    )
    client = TestClient(TestServer(http_app(agent)), headers={"Authorization": f"Bearer {SECRET}"})
    await client.start_server()
    try:
        yield client, agent, nics, make_spec()
    finally:
        await client.close()
        agent.close()


async def test_info_reports_node_nics_and_no_lab(
    agent_client: tuple[TestClient[Any, Any], Agent, FakeNics, ClusterSpec],
) -> None:
    client, _, _, _ = agent_client
    info = await (await client.get("/v1/info")).json()
    assert info["node"] == "storage-0"
    assert info["lab"] is None
    assert info["interfaces"] == {"snic": "eth1", "mgmt": "eth0"}
    assert info["nics"]["snic"]["rate_mbit"] == 100.0 and info["nics"]["mgmt"] is None
    counters = await (await client.get("/v1/counters")).json()
    assert counters["snic"]["ingress_bytes"] == 2


async def test_a_run_starts_changes_and_stops_the_node(
    agent_client: tuple[TestClient[Any, Any], Agent, FakeNics, ClusterSpec],
) -> None:
    client, _, nics, spec = agent_client
    started = await client.post("/v1/start", json={"spec": spec.model_dump(mode="json")})
    assert started.status == 200, await started.text()
    again = await client.post("/v1/start", json={"spec": spec.model_dump(mode="json")})
    assert again.status == 409 and "already runs" in (await again.json())["error"]
    poll = await (await client.get("/v1/poll")).json()
    assert poll == {"running": True, "exit_status": None}
    log = ""
    for _ in range(100):  # the node's first line, once its imports are done
        log = await (await client.get(f"/v1/log/{spec.lab_id}")).text()
        if "ready" in log:
            break
        await asyncio.sleep(0.1)
    assert "[storage-0] ready" in log

    changed = await client.post("/v1/links/snic", json={"rate_mbit": 50.0, "up": False})
    assert changed.status == 200
    assert "storage-0/snic" in (await changed.json())["result"]
    assert nics.changes == [("snic", "both", False, {"rate_mbit": 50.0})]
    bad = await client.post("/v1/links/snic", json={"rate_mbit": -1.0})
    assert bad.status == 400 and "rate_mbit" in (await bad.json())["error"]
    assert len(nics.changes) == 1

    for action in ("stop", "cont"):
        done = await client.post(f"/v1/nodes/{action}")
        assert done.status == 200 and action in (await done.json())["result"]

    stopped = await (await client.post("/v1/stop")).json()
    assert any("process storage-0" in item for item in stopped["removed"])
    after = await client.get("/v1/poll")
    assert after.status == 409 and "runs no lab" in (await after.json())["error"]


async def test_a_spec_without_this_node_is_refused(
    agent_client: tuple[TestClient[Any, Any], Agent, FakeNics, ClusterSpec],
) -> None:
    client, _, _, spec = agent_client
    other = spec.model_copy(
        update={"nodes": tuple(n for n in spec.nodes if n.node_id != "storage-0")}
    )
    resp = await client.post("/v1/start", json={"spec": other.model_dump(mode="json")})
    assert resp.status == 400 and "storage-0" in (await resp.json())["error"]


ROUTES = [
    ("GET", "/v1/info"),
    ("GET", "/v1/poll"),
    ("GET", "/v1/counters"),
    ("GET", "/v1/log/itest"),
    ("POST", "/v1/start"),
    ("POST", "/v1/stop"),
    ("POST", "/v1/links/snic"),
    ("POST", "/v1/nodes/kill"),
]


@pytest.mark.parametrize("auth", [None, "Bearer", f"Bearer {new_secret()}", f"Basic {SECRET}"])
async def test_every_route_refuses_a_request_without_the_secret(
    agent_client: tuple[TestClient[Any, Any], Agent, FakeNics, ClusterSpec], auth: str | None
) -> None:
    client, agent, nics, spec = agent_client
    body = {"spec": spec.model_dump(mode="json"), "rate_mbit": 1.0}
    headers = {} if auth is None else {"Authorization": auth}
    async with aiohttp.ClientSession(headers=headers) as bare:  # no default secret
        for method, path in ROUTES:
            async with bare.request(method, client.make_url(path), json=body) as resp:
                assert resp.status == 401, (method, path)
                assert "secret" in (await resp.json(content_type=None))["detail"]
    assert agent.info()["lab"] is None  # nothing was started
    assert nics.changes == []
    started = await client.post("/v1/start", json={"spec": spec.model_dump(mode="json")})
    assert started.status == 200  # the same request with the secret
    assert (await client.post("/v1/stop")).status == 200


async def test_stop_removes_only_the_data_directory_the_agent_made(
    agent_client: tuple[TestClient[Any, Any], Agent, FakeNics, ClusterSpec], tmp_path: Path
) -> None:
    client, _, _, spec = agent_client
    victim = tmp_path / "dualpath-results"
    victim.mkdir()
    (victim / "summary.json").write_text("{}")
    aimed = spec.model_copy(update={"data_dir": str(victim)})
    started = await client.post("/v1/start", json={"spec": aimed.model_dump(mode="json")})
    assert started.status == 200, await started.text()
    made = list((tmp_path / "agent-data").glob(f"dualpath-{spec.lab_id}-*"))
    assert len(made) == 1 and made[0].stat().st_mode & 0o777 == 0o700
    stopped = await (await client.post("/v1/stop")).json()
    assert f"data dir {made[0]}" in stopped["removed"]
    assert not made[0].exists()
    assert (victim / "summary.json").read_text() == "{}"


@pytest.mark.parametrize("lab", ["..", "a.b", "UPPER", "toolongid9", "x%2F..%2Fy"])
async def test_a_lab_id_that_is_not_one_is_refused(
    agent_client: tuple[TestClient[Any, Any], Agent, FakeNics, ClusterSpec], lab: str
) -> None:
    client, agent, _, spec = agent_client
    log = await client.get(f"/v1/log/{lab}")
    assert log.status in (400, 404)
    bad = spec.model_dump(mode="json") | {"lab_id": lab}
    resp = await client.post("/v1/start", json={"spec": bad})
    assert resp.status == 400 and "lab_id" in (await resp.json())["error"]
    assert agent.info()["lab"] is None


async def test_a_body_that_is_not_json_is_400(
    agent_client: tuple[TestClient[Any, Any], Agent, FakeNics, ClusterSpec],
) -> None:
    client, agent, nics, _ = agent_client
    for path in ("/v1/start", "/v1/links/snic"):
        resp = await client.post(path, data=b"{not json", headers={"Content-Type": "x"})
        assert resp.status == 400 and "not JSON" in (await resp.json())["error"]
    assert agent.info()["lab"] is None and nics.changes == []

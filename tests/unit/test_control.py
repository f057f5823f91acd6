"""The lab control endpoint over real loopback HTTP, with an in-memory backend behind it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from lab.backends import BackendError
from lab.chaos import ClusterLinks
from lab.control import ControlServer

LINKS = ClusterLinks({"prefill-0": {"cnic": 400.0, "snic": 100.0}}, frozenset({"storage-0"}))


class MemoryBackend:
    """Records what it is asked to do; refuses to kill storage nodes."""

    name = "memory"

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def set_link(self, node_id: str, nic: str, changes: dict[str, Any]) -> str:
        self.calls.append((node_id, nic, json.dumps(changes, sort_keys=True)))
        return f"{node_id}/{nic} changed"

    def node_action(self, node_id: str, action: str) -> str:
        if node_id.startswith("storage"):
            raise BackendError("storage nodes are not ours to kill here")
        self.calls.append((node_id, action))
        return f"{node_id} {action}"


@pytest.fixture
def control() -> Iterator[tuple[ControlServer, MemoryBackend]]:
    be = MemoryBackend()
    server = ControlServer(be, LINKS)  # type: ignore[arg-type]
    yield server, be
    server.close()


def post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_link_change_is_compiled_like_a_scenario_step(
    control: tuple[ControlServer, MemoryBackend],
) -> None:
    server, be = control
    status, body = post(f"{server.url}/v1/links/prefill-0/snic", {"rate": "50%", "loss": "1%"})
    assert (status, body) == (200, {"result": "prefill-0/snic changed"})
    assert be.calls == [("prefill-0", "snic", '{"loss_pct": 1.0, "rate_mbit": 50.0}')]


@pytest.mark.parametrize(
    ("path", "body", "code", "fragment"),
    [
        ("/v1/links/prefill-0/snic", {"rate": "fast"}, 400, "rate: 'fast' is not a rate"),
        ("/v1/links/prefill-9/snic", {"rate": "1%"}, 400, "node: 'prefill-9'"),
        ("/v1/links/prefill-0/snic", {"speed": 1}, 400, "speed: unknown key"),
        ("/v1/links/prefill-0/snic", [1], 400, "JSON object"),
        ("/v1/nodes/prefill-0/explode", {}, 400, "action: 'explode' is invalid"),
        ("/v1/nodes/storage-0/kill", {}, 409, "not ours"),
        ("/v1/other/x/y", {}, 404, "no such endpoint"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(
    control: tuple[ControlServer, MemoryBackend],
    path: str,
    body: Any,
    code: int,
    fragment: str,
) -> None:
    server, be = control
    status, reply = post(server.url + path, body)
    assert status == code and fragment in reply["error"]
    assert be.calls == []


def test_node_actions_and_the_link_listing(control: tuple[ControlServer, MemoryBackend]) -> None:
    server, be = control
    assert post(f"{server.url}/v1/nodes/prefill-0/restart", {})[0] == 200
    assert be.calls == [("prefill-0", "restart")]
    with urllib.request.urlopen(f"{server.url}/v1/links", timeout=10) as resp:
        assert json.loads(resp.read())["configured_rates_mbit"]["prefill-0"]["snic"] == 100.0

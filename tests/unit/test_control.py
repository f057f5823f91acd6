"""The lab control endpoint over real loopback HTTP, with an in-memory backend behind it: every
request must present the lab's secret, bodies are bounded, and a refused request changes
nothing."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from lab.run.backends import BackendError
from lab.run.chaos import ClusterLinks
from lab.run.control import MAX_BODY_BYTES, ControlServer
from services.auth import new_secret

SECRET = new_secret()

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
    server = ControlServer(be, LINKS, secret=SECRET)  # type: ignore[arg-type]
    yield server, be
    server.close()


def post(url: str, body: Any, *, secret: str | None = SECRET) -> tuple[int, dict[str, Any]]:
    headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers=headers
    )
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
    # recorded like a scenario step: the run reports it with its faults
    (entry,) = server.applied
    assert entry["node"] == "prefill-0" and entry["nic"] == "snic" and entry["wall"] > 0
    assert entry["changes"] == {"loss_pct": 1.0, "rate_mbit": 50.0}


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
    assert be.calls == [] and server.applied == []


def test_node_actions_and_the_link_listing(control: tuple[ControlServer, MemoryBackend]) -> None:
    server, be = control
    assert post(f"{server.url}/v1/nodes/prefill-0/restart", {})[0] == 200
    assert be.calls == [("prefill-0", "restart")]
    req = urllib.request.Request(
        f"{server.url}/v1/links", headers={"Authorization": f"Bearer {SECRET}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["configured_rates_mbit"]["prefill-0"]["snic"] == 100.0


@pytest.mark.parametrize(
    "secret",
    [None, "", new_secret(), SECRET[:-1], f"{SECRET}x"],
    ids=["none", "empty", "another", "shorter", "longer"],
)
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/links/prefill-0/snic", {"rate": "50%"}), ("/v1/nodes/prefill-0/kill", {})],
)
def test_a_request_without_the_secret_is_refused_and_changes_nothing(
    control: tuple[ControlServer, MemoryBackend], secret: str | None, path: str, body: Any
) -> None:
    server, be = control
    status, reply = post(server.url + path, body, secret=secret)
    assert status == 401 and "secret" in reply["error"]
    assert be.calls == []
    assert post(server.url + path, body)[0] == 200  # the same request with it goes through
    assert len(be.calls) == 1


def test_reading_the_links_needs_the_secret_too(
    control: tuple[ControlServer, MemoryBackend],
) -> None:
    server, _ = control
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.url}/v1/links", timeout=10)
    assert refused.value.code == 401


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, str]:
    """Send a hand-made request; the status code and body of the answer (0: no answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return 0, ""
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode()


@pytest.mark.parametrize(
    ("length", "code", "fragment"),
    [
        ("-1", 400, "not a byte count"),
        ("+5", 400, "not a byte count"),
        ("1e3", 400, "not a byte count"),
        ("99999999999999999999", 400, "not a byte count"),
        (None, 411, "Content-Length is required"),
        (str(MAX_BODY_BYTES + 1), 413, "body over"),
    ],
)
def test_a_body_length_that_is_missing_negative_or_too_large_is_refused(
    control: tuple[ControlServer, MemoryBackend], length: str | None, code: int, fragment: str
) -> None:
    server, be = control
    head = (
        f"POST /v1/links/prefill-0/snic HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n"
    )
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    status, body = raw_request(server.url, head, b'{"rate": "50%"}')
    assert status == code and fragment in json.loads(body)["error"]
    assert be.calls == []


def test_a_chunked_body_is_refused(control: tuple[ControlServer, MemoryBackend]) -> None:
    server, be = control
    head = (
        "POST /v1/nodes/prefill-0/kill HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {SECRET}\r\nTransfer-Encoding: chunked\r\n"
    )
    status, _ = raw_request(server.url, head, b"2\r\n{}\r\n0\r\n\r\n")
    assert status == 411 and be.calls == []


def test_a_body_shorter_than_announced_changes_nothing(
    control: tuple[ControlServer, MemoryBackend],
) -> None:
    server, be = control
    head = (
        "POST /v1/nodes/prefill-0/kill HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {SECRET}\r\nContent-Length: 100\r\n"
    )
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n{}")
        sock.shutdown(socket.SHUT_WR)  # the sender stops short of what it announced
        answer = sock.recv(65536)
    assert answer.split()[1] == b"400"
    assert be.calls == []

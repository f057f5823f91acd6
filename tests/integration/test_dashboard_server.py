"""The live dashboard's server on a real lab (local backend: real processes, a real control
endpoint): who may read and change what, the stream a page gets, and a control from the
page reaching the lab's control endpoint. The browser test of the whole page during a chaos
run on shaped links is tests/privileged/test_dashboard_browser.py."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lab_inputs import tiny

from lab.config.models import LabConfig
from lab.run.bringup import HeldLab, held, prepare
from lab.run.dashboard import Dashboard, DashboardError, LabInfo, RunFeed


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldLab]:
    monkeypatch.setenv("DUALPATH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DUALPATH_DATA_DIR", str(tmp_path))
    cfg = LabConfig.model_validate(tiny(name="dash"))
    (tmp_path / "out").mkdir()
    prepared = prepare(cfg, backend="local", out_dir=tmp_path / "out")
    with held(prepared, dashboard_port=0) as up:
        yield up


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def _events(resp: aiohttp.ClientResponse, n: int) -> list[tuple[str, Any]]:
    """The first `n` server-sent events of a stream, as (event, data)."""
    out: list[tuple[str, Any]] = []
    kind, data = "", ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif not line and data:
            out.append((kind, json.loads(data)))
            kind, data = "", ""
            if len(out) == n:
                break
    return out


def _auth(up: HeldLab) -> dict[str, str]:
    return {"Authorization": f"Bearer {up.prepared.spec.secret}"}


async def test_the_page_holds_no_data_and_everything_else_needs_the_secret(
    lab: HeldLab, session: aiohttp.ClientSession
) -> None:
    assert lab.dashboard is not None
    base = lab.dashboard.address
    assert lab.prepared.state.data["dashboard_url"] == base
    assert lab.dashboard.url == f"{base}#token={lab.prepared.spec.secret}"
    async with session.get(base) as page:
        assert page.status == 200
        html = await page.text()
    assert "DualPath Mesh" in html and '<script src="/plotly.js">' in html
    assert lab.prepared.spec.secret not in html
    async with session.get(f"{base}plotly.js") as js:  # served here: the page needs no network
        assert js.status == 200 and len(await js.read()) > 1_000_000
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with session.get(f"{base}v1/stream", headers=headers) as resp:
            assert resp.status == 401
        async with session.post(f"{base}v1/nodes/decode-0/kill", headers=headers, json={}) as resp:
            assert resp.status == 401
    assert lab.control.applied == []  # nothing reached the lab


async def test_a_page_gets_the_history_then_each_frame_then_the_end(
    lab: HeldLab, session: aiohttp.ClientSession
) -> None:
    assert lab.dashboard is not None
    feed = RunFeed(lab.dashboard, steps=lambda: [(lab.control.applied, True)])
    feed.tick([{"t": 1.0, "nodes": {}}])  # before the driver started: no frame
    feed.on_start(1000.0)
    feed.on_progress({"turns_done": 1, "turns_total": 4, "ttft": [[1001.5, 0.25]]})
    feed.tick([{"t": 1001.0, "nodes": {}}])
    url = f"{lab.dashboard.address}v1/stream"
    async with session.get(url, headers=_auth(lab)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        (hello,) = await _events(resp, 1)
        feed.on_progress({"turns_done": 2, "turns_total": 4})
        feed.tick([{"t": 1002.0, "nodes": {}}])
        feed.finish("2/4 turns done")
        later = await _events(resp, 2)
    kind, data = hello
    assert kind == "hello"
    assert data["info"]["lab_id"] == lab.prepared.lab_id
    assert data["info"]["links"] == {"decode-0": ["cnic", "snic"], "prefill-0": ["cnic", "snic"]}
    assert [f["wall"] for f in data["history"]] == [1001.0]
    assert data["history"][0]["ttft"] == [[1001.5, 0.25]]
    assert data["history"][0]["origin"] == 1000.0
    assert [k for k, _ in later] == ["frame", "end"]
    assert later[0][1]["turns"] == {"turns_done": 2, "turns_total": 4}
    assert later[0][1]["ttft"] == []  # each point once
    assert later[1][1] == {"text": "2/4 turns done"}


async def test_controls_go_through_the_labs_control_endpoint(
    lab: HeldLab, session: aiohttp.ClientSession
) -> None:
    assert lab.dashboard is not None
    base = lab.dashboard.address
    async with session.post(
        f"{base}v1/links/prefill-0/snic", headers=_auth(lab), json={"rate": "fast"}
    ) as resp:
        assert resp.status == 400
        assert "rate: 'fast' is not a rate" in (await resp.json())["error"]
    async with session.post(
        f"{base}v1/nodes/decode-0/explode", headers=_auth(lab), json={}
    ) as resp:
        assert resp.status == 400
        assert "explode" in (await resp.json())["error"]
    # valid, but the local backend has no shaped links: the lab refuses, the page is told why
    async with session.post(
        f"{base}v1/links/prefill-0/snic", headers=_auth(lab), json={"rate": "50%"}
    ) as resp:
        assert resp.status == 409
        assert "no shaped links" in (await resp.json())["error"]
    async with session.post(f"{base}v1/nodes/decode-0/stop", headers=_auth(lab), json={}) as resp:
        assert resp.status == 200, await resp.text()
    async with session.post(f"{base}v1/nodes/decode-0/cont", headers=_auth(lab), json={}) as resp:
        assert resp.status == 200, await resp.text()
    assert [(e["node"], e["action"]) for e in lab.control.applied] == [
        ("decode-0", "stop"),
        ("decode-0", "cont"),
    ]


def test_a_taken_port_is_named_and_nothing_is_left_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        info = LabInfo("x", "local", None, 1.0, [], {})
        with pytest.raises(DashboardError, match=f"127.0.0.1:{port}"):
            Dashboard(info, control_url="http://127.0.0.1:9", secret="s", port=port)

"""The whole lab on loopback (local backend): real processes, sockets and checksummed bytes.

No shaping here, so nothing about speed is asserted: these tests check that every policy
completes every turn, that every KV byte moved is verified and accounted for, and that bad
input is refused without harming the running cluster.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_inputs import TINY

from lab.config.models import parse_config
from lab.run.runner import run_once
from services.codec import PREFIX_SIZE, decode_header, parse_prefix
from services.spec import ClusterSpec
from services.wire.frames import slice_fields


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALPATH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DUALPATH_DATA_DIR", str(tmp_path))


@pytest.mark.parametrize("policy", ["basic", "dualpath", "oracle"])
def test_policy_completes_and_accounts_every_byte(policy: str, tmp_path: Path) -> None:
    cfg = parse_config({**TINY, "policy": policy})
    res = run_once(cfg, backend="local", out_dir=tmp_path / policy, progress=False)
    s = res.summary
    assert s["errors"] == []
    assert s["turns_failed"] == 0
    assert s["turns_done"] == 6
    assert s["ttft_s"]["p50"] is not None
    assert s["bytes_accounted"], (s["bytes_verified"], s["bytes_storage_read"], s["bytes_relayed"])
    ledger = s["byte_ledger"]  # every verified byte on a pair whose two ends agree
    assert ledger["balanced"] and not ledger["fault_pairs"] and ledger["restarted"] == []
    assert ledger["bytes_whole_pairs"] == s["bytes_verified"]
    if policy == "oracle":
        assert s["bytes_storage_read"] == 0 and s["bytes_relayed"] == 0
    else:
        assert s["bytes_storage_read"] > 0
        assert s["bytes_verified"] > s["bytes_storage_read"]  # PD transfer is verified too
    if policy == "basic":
        assert set(s["read_sides"]) == {"prefill"}
    summary = json.loads((tmp_path / policy / "summary.json").read_text())
    assert summary["policy"] == policy
    page = (tmp_path / policy / "report.html").read_text()  # the run's report, beside it
    assert f"tiny / {policy}: DualPath Mesh run" in page and "No kernel counters" in page
    # nothing is left behind: no recorded lab, no data dir
    assert not list((tmp_path / "state").glob("*.run.json"))
    assert not list(tmp_path.glob("dualpath-*"))


@pytest.fixture
def local_lab(start_local_lab: Callable[..., Any]) -> Iterator[ClusterSpec]:
    with start_local_lab({**TINY, "policy": "dualpath"}, "itest") as spec:
        yield spec


def _get(spec: ClusterSpec, path: str) -> Any:
    with urllib.request.urlopen(f"http://{spec.http.host}:{spec.http.port}{path}", timeout=5) as r:
        return json.loads(r.read())


def _garbage_gets_error_frame(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 32)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break  # the node closed the connection after its error frame
            data += chunk
    hlen, _ = parse_prefix(data[:PREFIX_SIZE])
    kind, head = decode_header(data[PREFIX_SIZE : PREFIX_SIZE + hlen])
    assert kind == "error" and head["code"] == "malformed"


def test_malformed_frames_are_refused_and_nodes_keep_serving(local_lab: ClusterSpec) -> None:
    spec = local_lab
    for node in spec.nodes:
        for ep in (node.cnic, node.storage, node.mgmt if node.role != "scheduler" else None):
            if ep is not None:
                _garbage_gets_error_frame(ep.host, ep.port)
                _garbage_gets_error_frame(ep.host, ep.port)  # still serving
    assert _get(spec, "/v1/status")["ready"]


def test_corrupt_kv_frame_is_detected_and_reported(local_lab: ClusterSpec) -> None:
    from services.codec import Frame, encode_bytes
    from services.kvblocks import KvGenerator, SliceSet, crc

    spec = local_lab
    decode = spec.node("decode-0")
    assert decode.cnic is not None
    kv = KvGenerator(spec.profile.layer_group_bytes(0), spec.profile.layer_groups)
    slices = SliceSet(7, (0, 1), 0, 1)
    payload = kv.payload(slices)
    bad = bytearray(payload)
    bad[100] ^= 0xFF
    header = {"turn": "t-none", **slice_fields(slices), "crc": crc(payload)}
    frame = Frame("kv", header, bytes(bad))
    with socket.create_connection((decode.cnic.host, decode.cnic.port), timeout=5) as s:
        s.sendall(encode_bytes(frame))
    for _ in range(200):
        counters = _get(spec, "/v1/cluster").get("decode-0", {}).get("counters", {})
        if counters.get("errors", 0) >= 1:
            assert any("crc" in e for e in counters["last_errors"])
            return
        time.sleep(0.05)
    raise AssertionError("the corrupted frame was not reported")


def test_bad_turn_is_refused_with_a_problem(local_lab: ClusterSpec) -> None:
    spec = local_lab
    req = urllib.request.Request(
        f"http://{spec.http.host}:{spec.http.port}/v1/turns",
        data=json.dumps({"traj_id": 1, "turn_index": 0, "context_tokens": -5}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {spec.secret}"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 400
    assert "context_tokens" in json.loads(info.value.read())["detail"]


def test_cli_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  gpus_per_node: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lab.cli", "run", "-c", str(bad), "--backend", "local"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cluster.gpus_per_node" in proc.stderr


@pytest.mark.parametrize("selector", ["round_robin", "least_tokens"])
def test_baseline_selectors_complete(selector: str, tmp_path: Path) -> None:
    cfg = parse_config({**TINY, "policy": "dualpath", "scheduling": {"selector": selector}})
    s = run_once(cfg, backend="local", out_dir=tmp_path / selector, progress=False).summary
    assert s["errors"] == [] and s["turns_done"] == 6 and s["bytes_accounted"]


def test_round_robin_alternate_reads_on_both_sides_in_turn(tmp_path: Path) -> None:
    sched = {"selector": "round_robin", "baseline_read_side": "alternate"}
    cfg = parse_config({**TINY, "policy": "dualpath", "scheduling": sched})
    s = run_once(cfg, backend="local", out_dir=tmp_path / "alt", progress=False).summary
    assert s["errors"] == [] and s["turns_done"] == 6 and s["bytes_accounted"]
    assert s["read_sides"] == {"prefill": 3, "decode": 3}


def test_poisson_arrivals_spread_agents_over_the_run(tmp_path: Path) -> None:
    """Online mode: agents arrive at seeded Poisson offsets; the run lasts past the last
    arrival and every turn still completes with every byte accounted."""
    workload = {**TINY["workload"], "arrival": "poisson", "agents_per_s": 1.0}
    cfg = parse_config({**TINY, "policy": "dualpath", "workload": workload})
    s = run_once(cfg, backend="local", out_dir=tmp_path / "online", progress=False).summary
    assert s["errors"] == [] and s["turns_done"] == 6 and s["bytes_accounted"]
    arrival = s["arrival"]
    assert arrival["mode"] == "poisson" and arrival["agents_per_s"] == 1.0
    assert 0 < arrival["last_arrival_s"] < s["jct_s"]


def test_split_reads_read_every_hit_block_once(tmp_path: Path) -> None:
    """Split reads share one turn's hit blocks between both nodes: the same seeded workload
    reads exactly the bytes whole-request reads do, and every turn still completes."""
    runs = {}
    for split in (False, True):
        cfg = parse_config({**TINY, "policy": "dualpath", "scheduling": {"split_reads": split}})
        out = tmp_path / f"split-{split}"
        runs[split] = run_once(cfg, backend="local", out_dir=out, progress=False).summary
    whole, split_ = runs[False], runs[True]
    assert split_["errors"] == [] and split_["turns_done"] == 6 and split_["bytes_accounted"]
    assert "split" in split_["read_sides"], split_["read_sides"]
    assert "split" not in whole["read_sides"]
    assert split_["bytes_storage_read"] == whole["bytes_storage_read"] > 0


@pytest.mark.parametrize("quota_ms", [None, 0.1])
def test_prefill_steps_complete_without_quota_and_with_a_chunking_quota(
    quota_ms: float | None, tmp_path: Path
) -> None:
    """No quota runs head turns whole; a 0.1 ms quota cuts every turn into dozens of chunks. Both
    complete every turn with every byte accounted, and the step history reaches summary.json."""
    cfg = parse_config({**TINY, "policy": "dualpath", "scheduling": {"compute_quota_ms": quota_ms}})
    s = run_once(cfg, backend="local", out_dir=tmp_path / "q", progress=False).summary
    assert s["errors"] == [] and s["turns_done"] == 6 and s["bytes_accounted"]
    steps = s["attention_balance"]["nodes"]["prefill-0"]["num_steps"]
    # one whole turn per GPU per step takes at most 6 steps; 0.1 ms chunks (a few dozen
    # tokens of a turn's hundreds of new ones) need many more
    assert steps <= 6 if quota_ms is None else steps > 30
    assert s["attention_balance"]["mean"] >= 1.0


def test_decode_node_killed_and_restarted_mid_run_every_turn_completes(tmp_path: Path) -> None:
    """Chaos on real processes: the decode node is SIGKILLed mid-run and restarted. Turns it
    held fail as retryable (the scheduler sees the new process), the driver resubmits them
    with backoff, and every agent's trajectory completes with every byte verified."""
    from lab.run.chaos import cluster_links, compile_scenario

    cfg = parse_config(
        {
            **TINY,
            "policy": "dualpath",
            "workload": {**TINY["workload"], "num_agents": 6, "max_turns_per_agent": 3},
            "scheduling": {"node_timeout_s": 2.0},
        }
    )
    scenario = compile_scenario(
        {
            "name": "kill-decode",
            "events": [
                {"at": "1s", "node": {"id": "decode-0", "action": "kill"}},
                {"at": "1.5s", "node": {"id": "decode-0", "action": "restart"}},
                {"at": "2s", "set": {"node": "decode-0", "nic": "cnic", "rate": "50%"}},
            ],
        },
        cluster_links(cfg),
    )
    s = run_once(
        cfg, backend="local", out_dir=tmp_path / "chaos", progress=False, scenario=scenario
    ).summary
    assert s["turns_failed"] == 0 and s["turns_done"] == 18, s["errors"]
    # what the kill broke is the fault's doing, not a failure: nothing was corrupt or missing
    assert s["errors"] == [], s["errors"]
    assert all("Connection" in e for e in s["fault_errors"]["recent"]), s["fault_errors"]
    # the decode node's two processes each balance with every peer that lived through the run
    assert s["bytes_accounted"], s["byte_ledger"]
    assert s["byte_ledger"]["restarted"] == ["decode-0"]
    assert s["node_restarts"] == 1 and s["retries"] >= 1
    events = s["chaos"]["events"]
    assert [e.get("action") for e in events[:2]] == ["kill", "restart"]
    assert "restarted" in events[1]["result"]
    # the local backend has no shaped links: the step is recorded as an error, not skipped
    assert "no shaped links" in events[2]["error"]

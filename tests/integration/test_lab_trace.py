"""A request trace replayed by the whole lab on loopback (local backend): content-addressed
prefixes read from the trajectories of the requests that persisted them, with real processes,
sockets and checksummed bytes. A closed-loop session makes the hits exact: each request is
sent after the one before it finished, so its prefix is in storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lab_inputs import bailian_line

from lab.config.models import parse_config
from lab.run.runner import run_once
from lab.run.traces import TraceFileError


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALPATH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DUALPATH_DATA_DIR", str(tmp_path))


bailian = bailian_line


# One session of three requests, each extending the one before (16-token trace blocks), and
# an unrelated request. In 64-token model blocks: a1 spans 10 blocks and hits none; a2 spans
# 16 and hits a1's 10; a3 spans 19 and hits 15 (10 in a1's trajectory, 5 in a2's); b1 spans 5
# and hits none. 25 of 50 prompt blocks come from storage.
ROWS = [
    bailian(1, -1, 0.0, 640, list(range(40))),
    bailian(2, 1, 0.5, 1000, list(range(63))),
    bailian(3, 2, 1.0, 1200, [*range(63), *range(100, 112)]),
    bailian(4, -1, 0.1, 320, list(range(200, 220))),
]


def config(path: Path, policy: str, **scheduling: Any) -> dict[str, Any]:
    return {
        "name": "trace",
        "policy": policy,
        "cluster": {
            "prefill_nodes": 1,
            "decode_nodes": 1,
            "storage_servers": 2,
            "gpus_per_node": 2,
        },
        "scaling": {"bandwidth_scale": 0.00025, "time_dilation": 2},
        "workload": {"trace": {"file": str(path), "format": "bailian"}},
        "scheduling": scheduling,
    }


@pytest.mark.parametrize(
    ("policy", "scheduling"), [("basic", {}), ("dualpath", {"split_reads": True})]
)
def test_a_trace_replay_reads_shared_prefixes_from_where_they_live(
    policy: str, scheduling: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = parse_config(config(path, policy, **scheduling))
    s = run_once(cfg, backend="local", out_dir=tmp_path / policy, progress=False).summary
    assert s["errors"] == [] and s["turns_done"] == 4 and s["turns_failed"] == 0
    assert s["bytes_accounted"] and s["byte_ledger"]["balanced"]
    t = s["trace"]
    assert (t["prompt_blocks"], t["assigned_hit_blocks"], t["blocks_served_by_storage"]) == (
        50,
        25,
        25,
    )
    assert t["prefix_hit_rate"] == t["assigned_hit_rate"] == 0.5
    assert t["requests_replayed"] == 4 and s["arrival"]["mode"] == "trace"
    if policy == "dualpath":
        assert s["read_sides"].get("split", 0) >= 1  # the relay carried shared blocks too
    assert not list(tmp_path.glob("dualpath-*"))  # nothing left behind


def test_a_malformed_trace_line_stops_the_run_before_anything_starts(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"chat_id": 2, "timestamp": "soon"}\n')
    cfg = parse_config(config(path, "basic"))
    with pytest.raises(TraceFileError, match=rf"{path}:2: timestamp"):
        run_once(cfg, backend="local", out_dir=tmp_path / "out", progress=False)
    assert not list((tmp_path / "state").glob("*.run.json"))
    assert not list(tmp_path.glob("dualpath-*"))

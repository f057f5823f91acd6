"""Public request traces (lab.run.traces): read whole and checked, the offline prefix-hit rate,
and `dualpath trace stats`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.run.traces import (
    Trace,
    TraceFileError,
    TraceRequest,
    load_trace,
    prefix_hits,
    trace_stats,
)

SAMPLE = (
    Path(__file__).resolve().parents[1]
    / "data"
    / "traces"
    / "mooncake-conversation-first1500.jsonl"
)


def _write(tmp_path: Path, rows: list[object]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _req(t: int, ids: list[int], out: int = 10) -> dict[str, object]:
    return {"timestamp": t, "input_length": 512 * len(ids), "output_length": out, "hash_ids": ids}


def test_prefix_hits_stop_at_the_first_unseen_block() -> None:
    reqs = [
        TraceRequest(0.0, 1536, 1, (1, 2, 3)),
        TraceRequest(1.0, 2048, 1, (1, 2, 9, 3)),  # 9 is new: 3 after it does not count
        TraceRequest(2.0, 1024, 1, (4, 1)),  # the first block is new: no hit at all
        TraceRequest(3.0, 2048, 1, (1, 2, 9, 3)),
    ]
    assert prefix_hits(reqs) == [0, 2, 0, 4]


def test_stats_of_a_small_trace(tmp_path: Path) -> None:
    path = _write(tmp_path, [_req(2000, [1, 2, 3]), _req(0, [1, 2]), _req(1000, [1, 2, 3, 4])])
    trace = load_trace(path)
    assert [r.arrival_s for r in trace.requests] == [0.0, 1.0, 2.0]  # arrival order
    stats = trace_stats(trace)
    assert stats["requests"] == 3 and stats["duration_s"] == 2.0
    assert stats["arrival_rate_per_s"] == 1.0
    # [1,2] misses both; [1,2,3,4] hits 2 of 4; [1,2,3] hits all 3: 5 of 9 blocks
    assert stats["prompt_blocks"] == 9 and stats["prefix_hit_blocks"] == 5
    assert stats["prefix_hit_rate"] == round(5 / 9, 4)
    assert stats["input_tokens"]["max"] == 2048.0


def test_the_shipped_mooncake_sample() -> None:
    stats = trace_stats(load_trace(SAMPLE, "mooncake"))
    assert stats["requests"] == 1500
    assert 0.0 < stats["prefix_hit_rate"] < 1.0
    assert stats["prefix_hit_blocks"] < stats["prompt_blocks"]


def test_the_hit_rate_by_blocks_and_by_requests() -> None:
    # Two requests: the second hits 1 of its 3 blocks; the first, of 1 block, none.
    reqs = [
        TraceRequest(0.0, 512, 1, (1,)),
        TraceRequest(1.0, 1536, 1, (1, 2, 3)),
    ]
    stats = trace_stats(Trace(Path("x"), "mooncake", 512, tuple(reqs)))
    assert stats["prefix_hit_rate"] == 0.25  # 1 of 4 blocks
    assert stats["prefix_hit_rate_per_request"] == round((0 + 1 / 3) / 2, 4)


GOOD = {"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1]}


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (json.dumps({**GOOD, "timestamp": -1}), "timestamp"),
        (json.dumps({**GOOD, "input_length": "512"}), "input_length"),
        (json.dumps({**GOOD, "hash_ids": [1, 2]}), "hash_ids"),
        (json.dumps({**GOOD, "hash_ids": ["a"]}), "hash_ids"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "output_length"}), "output_length"),
        ("[1, 2]", None),
        ("{not json", None),
    ],
)
def test_a_malformed_line_names_file_line_and_field(
    tmp_path: Path, line: str, field: str | None
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_req(0, [1])) + "\n" + line + "\n")
    with pytest.raises(TraceFileError) as info:
        load_trace(path)
    assert info.value.line == 2 and info.value.field == field
    assert str(info.value).startswith(f"{path}:2: ")


def test_unknown_format_and_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path, [])
    with pytest.raises(TraceFileError, match="unknown format 'bailian2'; known: mooncake, bailian"):
        load_trace(path, "bailian2")
    with pytest.raises(TraceFileError, match="no requests"):
        load_trace(path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "lab.cli", "trace", "stats", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_cli_trace_stats(tmp_path: Path) -> None:
    path = _write(tmp_path, [_req(0, [1, 2]), _req(500, [1, 2, 3])])
    done = _cli(str(path), "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["prefix_hit_rate"] == 0.4 and stats["requests"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    done = _cli(str(bad))
    assert done.returncode == 2  # a usage error: one line, no traceback
    assert done.stderr.startswith(f"error: {bad}:1: ") and "Traceback" not in done.stderr


def _chat(chat: int, parent: int, t: float, ids: list[int] | None) -> dict[str, object]:
    row: dict[str, object] = {
        "chat_id": chat,
        "parent_chat_id": parent,
        "timestamp": t,
        "input_length": 16 * len(ids or [1]),
        "output_length": 5,
        "type": "text",
        "turn": 1,
    }
    if ids is not None:
        row["hash_ids"] = ids
    return row


def test_bailian_sessions_and_hits(tmp_path: Path) -> None:
    rows = [
        _chat(1, -1, 0.0, [10, 11]),
        _chat(2, 1, 1.5, [10, 11, 12]),  # turn 2 of session 1: its context is a hit
        _chat(3, -1, 2.0, [20]),
        _chat(5, 4, 3.0, [10, 99]),  # parent 4 is not in the file: a root of its own
        _chat(6, 2, 4.0, None),  # no block ids: lengths only
    ]
    trace = load_trace(_write(tmp_path, rows), "bailian")
    assert trace.block_tokens == 16 and trace.requests[1].parent_id == 1
    stats = trace_stats(trace)
    assert stats["sessions"] == 3 and stats["requests_without_blocks"] == 1
    # blocks: 2 + 3 + 1 + 2 = 8; hits: 0 + 2 + 0 + 1 = 3
    assert (stats["prompt_blocks"], stats["prefix_hit_blocks"]) == (8, 3)
    assert stats["prefix_hit_rate"] == round(3 / 8, 4)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"parent_chat_id": -2}, "parent_chat_id"),
        ({"parent_chat_id": 7}, "parent_chat_id"),  # its own chat_id
        ({"chat_id": "7"}, "chat_id"),
        ({"timestamp": "now"}, "timestamp"),
        ({"hash_ids": [1, None]}, "hash_ids"),
    ],
)
def test_a_bad_bailian_line_names_its_field(
    tmp_path: Path, row: dict[str, object], field: str
) -> None:
    path = _write(tmp_path, [{**_chat(7, -1, 0.0, [1]), **row}])
    with pytest.raises(TraceFileError) as info:
        load_trace(path, "bailian")
    assert info.value.line == 1 and info.value.field == field


def test_a_chat_id_twice_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, [_chat(1, -1, 0.0, [1]), _chat(1, -1, 1.0, [2])])
    with pytest.raises(TraceFileError, match="chat_id: 1 appears twice"):
        load_trace(path, "bailian")

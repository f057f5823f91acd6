"""A request trace as a replay plan (lab/run/trace_replay.py): content keys in the model's
blocks, open and closed loop, the config section, and what a bad trace or config gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lab.config.models import TRACE_FORMATS, ConfigError, parse_config
from lab.run.trace_replay import (
    KEY_BITS,
    TraceReplayOptions,
    block_keys,
    offline_model_hit_rate,
    plan_trace,
    trace_summary,
)
from lab.run.traces import FORMATS, TraceFileError, load_trace, trace_stats

SAMPLE = Path(__file__).parents[1] / "data" / "traces" / "mooncake-conversation-first1500.jsonl"


def write(tmp_path: Path, rows: list[dict[str, Any]], name: str = "t.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def keys(
    ids: list[int] | None, tokens: int, trace_bt: int = 512, model_bt: int = 64
) -> tuple[int, ...]:
    return block_keys(ids, tokens, trace_block_tokens=trace_bt, model_block_tokens=model_bt, salt=0)


def test_a_key_per_full_model_block_shared_exactly_as_far_as_the_trace_ids() -> None:
    a = keys([1, 2, 3], 1300)  # 1300 tokens: 20 full 64-token blocks, in 3 trace blocks
    b = keys([1, 2, 4], 1300)
    assert len(a) == 1300 // 64 == 20
    assert a[:16] == b[:16] and a[16] != b[16]  # trace block 2 starts at model block 16
    assert len(set(a)) == 20 and all(0 <= k < 1 << KEY_BITS for k in a)
    assert keys([1, 2, 3], 1300) == a  # the same everywhere: no randomness
    # a key names its prefix: the same trace id after a different prefix is another key
    assert keys([9, 2, 3], 1300)[8:] != a[8:]


def test_model_blocks_larger_than_the_trace_blocks_hash_every_id_they_cover() -> None:
    a = keys(list(range(8)), 128, trace_bt=16, model_bt=64)
    b = keys([0, 1, 2, 3, 4, 5, 6, 99], 128, trace_bt=16, model_bt=64)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]


def test_blocks_without_trace_ids_are_nobody_elses() -> None:
    assert keys(None, 640) != block_keys(
        None, 640, trace_block_tokens=512, model_block_tokens=64, salt=1
    )
    short = keys([1], 1024)  # one id for two trace blocks: the second one's keys are own
    assert short[:8] == keys([1, 2], 1024)[:8] and short[8:] != keys([1, 2], 1024)[8:]


def opts(**kw: Any) -> TraceReplayOptions:
    return TraceReplayOptions(**{"model_block_tokens": 64, "time_dilation": 10.0, **kw})


def test_mooncake_is_open_loop_at_its_timestamps_times_tau_over_the_speedup(
    tmp_path: Path,
) -> None:
    rows = [
        {"timestamp": 1000, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]},
        {"timestamp": 3000, "input_length": 700, "output_length": 0, "hash_ids": [1, 3]},
    ]
    trace = load_trace(write(tmp_path, rows))
    plan = plan_trace(trace, opts(speedup=4.0))
    assert [a.start_after_s for a in plan.agents] == [0.0, 5.0]  # 2 s x tau 10 / 4
    first, second = (a.turns[0] for a in plan.agents)
    assert (first.traj_id, first.context_tokens, first.append_tokens, first.gen_tokens) == (
        0,
        0,
        600,
        5,
    )
    assert second.gen_tokens == 1  # every request emits at least its first token
    assert first.block_keys[:8] == second.block_keys[:8] and len(second.block_keys) == 10


def test_bailian_sessions_are_closed_loop_agents_each_request_its_own_trajectory(
    tmp_path: Path,
) -> None:
    rows = [
        {
            "chat_id": 10,
            "timestamp": 1.0,
            "input_length": 64,
            "output_length": 2,
            "hash_ids": [1, 2, 3, 4],
        },
        {
            "chat_id": 11,
            "timestamp": 2.0,
            "input_length": 64,
            "output_length": 2,
            "hash_ids": [7, 8, 9, 6],
        },
        {
            "chat_id": 12,
            "parent_chat_id": 10,
            "timestamp": 3.0,
            "input_length": 128,
            "output_length": 2,
            "hash_ids": [1, 2, 3, 4, 5, 5, 5, 5],
        },
    ]
    plan = plan_trace(load_trace(write(tmp_path, rows), "bailian"), opts(time_dilation=1.0))
    assert [(a.traj_id, [t.traj_id for t in a.turns], a.start_after_s) for a in plan.agents] == [
        (0, [0, 2], 0.0),
        (1, [1], 1.0),
    ]
    root, child = plan.agents[0].turns
    assert child.turn_index == 1 and child.block_keys[0] == root.block_keys[0]


def test_a_request_longer_than_max_len_names_its_line_and_nothing_is_planned(
    tmp_path: Path,
) -> None:
    rows = [
        {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]},
        {"timestamp": 1, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 3]},
    ]
    path = write(tmp_path, rows)
    with pytest.raises(TraceFileError, match=rf"{path}:2: input_length: 1100 \+ 5 .* max_len 1000"):
        plan_trace(load_trace(path), opts(max_len=1000))
    assert len(plan_trace(load_trace(path), opts(max_len=1000, max_requests=1)).agents) == 1


def test_the_sample_in_model_blocks_hits_as_often_as_in_its_own() -> None:
    trace = load_trace(SAMPLE)
    plan = plan_trace(trace, opts())
    model = offline_model_hit_rate(plan, 64)
    assert model is not None
    assert abs(model - trace_stats(trace)["prefix_hit_rate"]) < 0.01


def test_the_summary_counts_blocks_the_storage_served_over_the_prompts_that_finished(
    tmp_path: Path,
) -> None:
    rows = [{"timestamp": 0, "input_length": 640, "output_length": 5, "hash_ids": [1, 2]}]
    trace = load_trace(write(tmp_path, rows))
    plan = plan_trace(trace, opts())
    turns = [
        {"error": None, "done_at": 1.0, "hit_blocks": 4, "prompt_blocks": 10},
        {"error": "x", "done_at": None, "hit_blocks": 9, "prompt_blocks": 10},
    ]
    out = trace_summary(trace, opts(), plan, turns, storage_read_bytes=3 * 1000, block_bytes=1000)
    assert (out["prompt_blocks"], out["blocks_served_by_storage"]) == (10, 3)
    assert (out["prefix_hit_rate"], out["assigned_hit_rate"]) == (0.3, 0.4)
    assert out["prefix_hit_rate_per_request"] == 0.4  # the one finished request: 4 of 10
    assert out["offline_prefix_hit_rate"] == 0.0


def test_the_config_section_and_its_errors() -> None:
    assert set(TRACE_FORMATS) == set(FORMATS)
    cfg = parse_config({"workload": {"trace": {"file": "x.jsonl", "speedup": 8}}})
    assert cfg.workload.trace is not None and cfg.workload.trace.format == "mooncake"
    with pytest.raises(ConfigError, match=r"workload\.trace\.format"):
        parse_config({"workload": {"trace": {"file": "x", "format": "sharegpt"}}})
    with pytest.raises(ConfigError, match="trace replaces trajectories_file"):
        parse_config({"workload": {"trace": {"file": "x"}, "trajectories_file": "y"}})
    with pytest.raises(ConfigError, match=r"workload\.trace\.speedup"):
        parse_config({"workload": {"trace": {"file": "x", "speedup": 0}}})

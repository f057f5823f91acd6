"""Inputs the integration tests give a whole lab: the tiny cluster config (a few seconds of
two cores per run) and Qwen-Bailian trace lines. Imported by basename, as pytest puts this
directory on sys.path."""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = {
    "name": "tiny",
    "cluster": {"prefill_nodes": 1, "decode_nodes": 1, "storage_servers": 2, "gpus_per_node": 2},
    "scaling": {"bandwidth_scale": 0.00025, "time_dilation": 2},
    "workload": {
        "num_agents": 3,
        "max_len": 32768,
        "seed": 3,
        "start_turn_fraction": 0.5,
        "max_turns_per_agent": 2,
        "gen_token_scale": 0.05,
    },
}
"""1P1D with 2 GPUs per node and 2 storage servers; 3 agents of 2 warm-started turns."""


def tiny(
    *, cluster: dict[str, Any] | None = None, workload: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """TINY with `top` fields replaced and `cluster`/`workload` fields changed."""
    return {
        **TINY,
        "cluster": {**TINY["cluster"], **(cluster or {})},
        "workload": {**TINY["workload"], **(workload or {})},
        **top,
    }


def bailian_line(
    chat: int, parent: int, at: float, tokens: int, ids: list[int], *, turn: int = 1
) -> dict[str, Any]:
    """A Qwen-Bailian trace line (16-token blocks; -1 as parent: a session's first request)."""
    return {
        "chat_id": chat,
        "parent_chat_id": parent,
        "timestamp": at,
        "input_length": tokens,
        "output_length": 3,
        "type": "text",
        "turn": turn,
        "hash_ids": ids,
    }

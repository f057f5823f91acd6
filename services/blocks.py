"""Block arithmetic of the KV wire, written once: block ids as runs, blocks per frame, chunks.

Frames name blocks as runs of consecutive ids and carry whole blocks (storage) or one layer
group of blocks (engines) in payloads of a target size; every sender and receiver counts them
here. Pure: no I/O, no bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def block_runs(blocks: Sequence[int]) -> list[list[int]]:
    """[[first, count], ...] runs of consecutive ids (numpy: no per-block Python work)."""
    if not blocks:
        return []
    ids = np.asarray(blocks, dtype=np.int64)
    starts = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate(([0], starts))
    counts = np.diff(np.concatenate((starts, [len(ids)])))
    runs: list[list[int]] = np.stack((ids[starts], counts), axis=1).tolist()
    return runs


def run_blocks(runs: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """The block ids of [first, count] runs, in order (the inverse of block_runs)."""
    return tuple(itertools.chain.from_iterable(range(f, f + c) for f, c in runs))


def per_frame(frame_bytes: int, unit_bytes: int) -> int:
    """Units (blocks or slices) of `unit_bytes` in a frame of `frame_bytes`: at least one."""
    return max(1, frame_bytes // unit_bytes)


def chunks(blocks: Sequence[int], per_chunk: int) -> list[Sequence[int]]:
    """`blocks` split into frames of `per_chunk` blocks (the last may be shorter), in order."""
    return [blocks[i : i + per_chunk] for i in range(0, len(blocks), per_chunk)]


def describe(blocks: Sequence[int]) -> str:
    """Block ids for a message: all of a few, else the first two, the last and the count."""
    if len(blocks) <= 4:
        return str(list(blocks))
    return f"[{blocks[0]}, {blocks[1]}, ..., {blocks[-1]}] ({len(blocks)})"


@dataclass(frozen=True, slots=True)
class TurnBlocks:
    """A turn's tokens in blocks of `block_tokens` (docs/design.md, "Data plane")."""

    hit: int
    """Blocks read from storage: only full blocks are persisted, the tail is recomputed."""
    prompt: int
    """Blocks the prompt spans (the last one may be partial)."""
    persist_end: int
    """After the turn, blocks [0, persist_end) are full and persisted by the decode node."""

    @classmethod
    def of(cls, context: int, prompt: int, gen: int, block_tokens: int) -> TurnBlocks:
        """`context` tokens before the turn, `prompt` = context + appended, `gen` generated."""
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {block_tokens}")
        bt = block_tokens
        return cls(context // bt, -(-prompt // bt), (prompt + gen) // bt)

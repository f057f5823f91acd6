"""Read side of a turn: which node's storage NIC reads its hit KV, whole or split.

# DualPath §6, read side; splitting one request's read across both sides is §6's future work.
Pure arithmetic on read-queue snapshots: no I/O, no state, inputs never mutated.

Decisions where the paper is silent:

- **Whole reads** go to the side whose node has the strictly shorter read queue in tokens
  (the paper's measure). Below saturation both queues are often empty when a turn is placed,
  so ties are common and their rule shows in the balance: sending every tie to the prefill
  side (whose path needs no DE → PE relay) read ~20 % more on the prefill nodes' storage NICs
  than on the decode nodes' in a 2P2D online run, and a coin flip per turn balanced the sides
  on average but left 5 s windows less even than blind rotation. So a tie goes to the node
  that has been assigned fewer read tokens so far (`NodeView.read_total_tokens`, the
  scheduler's own count: storage-NIC balance over time is what the rule is for), and only an
  exact tie of those to the side `tie_side` draws from the turn id (crc32 parity).
  A turn without hit tokens reads nothing and is marked PREFILL.
- **Split reads** choose k hit blocks for the prefill side and n - k for the decode side so
  that both sides finish as close to the same time as whole blocks allow: side finish time
  = (read_q + its blocks * block_tokens) / snic tokens per second, a side with no blocks does
  not count, and k minimises the later finish (ties: smaller gap, then smaller k). The
  prefill side reads blocks [0, k), the decode side [k, n): contiguous, each block once.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from scheduler.views import ReadSide


@dataclass(frozen=True, slots=True)
class BlockRange:
    """Hit blocks [first_block, end_block) of one turn (the storage protocol's naming)."""

    first_block: int
    end_block: int

    def __post_init__(self) -> None:
        if not 0 <= self.first_block <= self.end_block:
            raise ValueError(
                f"need 0 <= first_block <= end_block, got {self.first_block}, {self.end_block}"
            )

    @property
    def num_blocks(self) -> int:
        return self.end_block - self.first_block


@dataclass(frozen=True, slots=True)
class ReadSplit:
    prefill_blocks: BlockRange
    decode_blocks: BlockRange
    prefill_finish_s: float
    """Seconds from now until the prefill side has read its share (0 if it reads none)."""
    decode_finish_s: float
    """Seconds from now until the decode side has read its share (0 if it reads none)."""

    @property
    def major_side(self) -> ReadSide:
        """The side reading more blocks (prefill on a tie)."""
        if self.decode_blocks.num_blocks > self.prefill_blocks.num_blocks:
            return ReadSide.DECODE
        return ReadSide.PREFILL

    @property
    def finish_s(self) -> float:
        return max(self.prefill_finish_s, self.decode_finish_s)


def tie_side(turn_id: str) -> ReadSide:
    """The side a turn reads on when both queues are equal: unbiased over turns, pure."""
    return ReadSide.DECODE if zlib.crc32(turn_id.encode()) & 1 else ReadSide.PREFILL


def choose_read_side(
    *,
    hit_tokens: int,
    prefill_read_q_tokens: int,
    decode_read_q_tokens: int,
    prefill_read_total_tokens: int = 0,
    decode_read_total_tokens: int = 0,
    tie: ReadSide = ReadSide.PREFILL,
) -> ReadSide:
    """# DualPath §6: the whole request reads on the side with the shorter disk-read queue.

    Equal queues: the side whose node has read fewer tokens so far; equal again: `tie`."""
    if hit_tokens <= 0:
        return ReadSide.PREFILL
    p = (prefill_read_q_tokens, prefill_read_total_tokens)
    d = (decode_read_q_tokens, decode_read_total_tokens)
    if p == d:
        return tie
    return ReadSide.DECODE if d < p else ReadSide.PREFILL


def split_read(
    num_hit_blocks: int,
    *,
    block_tokens: int,
    prefill_read_q_tokens: int,
    decode_read_q_tokens: int,
    prefill_tokens_per_s: float,
    decode_tokens_per_s: float,
) -> ReadSplit:
    """Split blocks [0, num_hit_blocks) so both sides finish their share at the same time.

    Continuous optimum: x = (r_p (q_d + H) - r_d q_p) / (r_p + r_d) tokens on the prefill
    side equalises (q_p + x) / r_p and (q_d + H - x) / r_d; the block split is the best of
    floor/ceil of x / block_tokens and the two whole-request ends.
    """
    if num_hit_blocks < 0 or block_tokens <= 0:
        raise ValueError("num_hit_blocks must be >= 0 and block_tokens > 0")
    if prefill_tokens_per_s <= 0 or decode_tokens_per_s <= 0:
        raise ValueError("snic rates must be > 0 tokens/s")
    n = num_hit_blocks
    qp = max(0, prefill_read_q_tokens)
    qd = max(0, decode_read_q_tokens)
    rp, rd = prefill_tokens_per_s, decode_tokens_per_s

    def finish(k: int) -> tuple[float, float]:
        fp = (qp + k * block_tokens) / rp if k > 0 else 0.0
        fd = (qd + (n - k) * block_tokens) / rd if k < n else 0.0
        return fp, fd

    x_blocks = (rp * (qd + n * block_tokens) - rd * qp) / ((rp + rd) * block_tokens)
    lo = min(n, max(0, math.floor(x_blocks)))
    cands = sorted({0, n, lo, min(n, lo + 1)})
    best_k = cands[0]
    best_key: tuple[float, float, int] | None = None
    for k in cands:
        fp, fd = finish(k)
        key = (max(fp, fd), abs(fp - fd), k)
        if best_key is None or key < best_key:
            best_k, best_key = k, key
    fp, fd = finish(best_k)
    return ReadSplit(BlockRange(0, best_k), BlockRange(best_k, n), fp, fd)

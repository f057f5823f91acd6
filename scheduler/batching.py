"""Intra-engine batching: which (chunks of) queued requests one GPU runs in its next step.

Prefill GPUs pack FIFO under a compute quota on predicted attention time and cut the request
that would overflow (chunked prefill); decode GPUs run everything. # DualPath §6
Pure: frozen items in, frozen batches out; inputs are never mutated, no I/O, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.costmodel import CostModel

DEFAULT_COMPUTE_QUOTA_S = 0.300
"""DualPath §6: the predicted attention time of one prefill step stays <= 300 ms (real)."""


@dataclass(frozen=True, slots=True)
class PrefillItem:
    """A request (or what is left of it) waiting on one prefill GPU.

    `cached_tokens` have KV already (hit from storage, or earlier chunks of this request);
    `new_tokens` still have to be computed. A prefill always computes at least one token (the
    appended tool output, at least the token that yields the first logits), so an item with
    `new_tokens < 1` is a caller error.
    """

    turn_id: str
    cached_tokens: int
    new_tokens: int

    def __post_init__(self) -> None:
        if self.cached_tokens < 0:
            raise ValueError(
                f"prefill item {self.turn_id!r}: cached_tokens must be >= 0, "
                f"got {self.cached_tokens}"
            )
        if self.new_tokens < 1:
            raise ValueError(
                f"prefill item {self.turn_id!r}: new_tokens must be >= 1, got {self.new_tokens}"
            )


@dataclass(frozen=True, slots=True)
class PrefillBatch:
    """One prefill step of one GPU.

    `items` are the queue's head items in FIFO order, each with the chunk of new tokens run in
    this step (`(turn_id, cached, chunk_new)`); only the last one can be a partial chunk.
    `attention_s` is the predicted attention time (real seconds), the left-to-right sum of
    `CostModel.attention_s` over `items`. `remainder` is what is left of the last item when it
    was cut; it goes back to the head of the queue. `over_quota` is True only for the
    minimal-progress batch (see `pack_prefill_batch`).
    """

    items: tuple[PrefillItem, ...]
    attention_s: float
    remainder: PrefillItem | None = None
    over_quota: bool = False

    @property
    def num_new_tokens(self) -> int:
        return sum(i.new_tokens for i in self.items)

    @property
    def completed_turn_ids(self) -> tuple[str, ...]:
        """Turns whose last chunk runs in this step (their prefill ends with it)."""
        done = self.items if self.remainder is None else self.items[:-1]
        return tuple(i.turn_id for i in done)

    def step_s(self, cost: CostModel) -> float:
        """Predicted real seconds of this step on one GPU (0 for an empty batch)."""
        if not self.items:
            return 0.0
        return cost.prefill_step_s(self.num_new_tokens, self.attention_s)


def pack_prefill_batch(
    queue: Sequence[PrefillItem], cost: CostModel, *, quota_s: float = DEFAULT_COMPUTE_QUOTA_S
) -> PrefillBatch:
    """The next prefill step of one GPU from its FIFO `queue` (empty queue: empty batch).

    Items are taken whole, in order, while the batch's predicted attention time stays
    <= `quota_s`. The first item that would overflow is cut: a binary search on its new-token
    count finds the largest chunk that still fits (predicted attention grows monotonically
    with the chunk), and `(turn_id, cached + chunk, new - chunk)` is the remainder. The batch
    ends there even if a later, cheaper item would fit: packing is FIFO. # DualPath §6

    Minimal progress: when not even one new token of the head item fits into an *empty* batch
    (its context alone costs more than the quota: a tiny quota or an enormous context), the
    batch is exactly one token of that item and `over_quota` is True. One token is the least
    overshoot possible, so the step stays as close to the quota as it can (the quota exists to
    keep the GPUs of a group in step), and every batch makes progress, so `plan_batches`
    always terminates. Taking the whole item instead would make the overshoot unbounded.
    """
    _check_quota(quota_s)
    batch, _ = _pack(queue, 0, None, cost, quota_s)
    return batch


def head_batch(queue: Sequence[PrefillItem], cost: CostModel) -> PrefillBatch:
    """The step of a GPU without a compute quota: its head request, whole (empty queue: empty
    batch). The baseline the quota is measured against: attention per step then varies with
    each request's context, and the GPUs of a group wait for the slowest one."""
    if not queue:
        return PrefillBatch((), 0.0)
    head = queue[0]
    return PrefillBatch((head,), cost.attention_s(head.cached_tokens, head.new_tokens))


def remaining_queue(queue: Sequence[PrefillItem], batch: PrefillBatch) -> tuple[PrefillItem, ...]:
    """The queue after `batch` (made from `queue` by `pack_prefill_batch`) has run."""
    rest = tuple(queue[len(batch.items) :])
    return rest if batch.remainder is None else (batch.remainder, *rest)


def plan_batches(
    queue: Sequence[PrefillItem], cost: CostModel, *, quota_s: float = DEFAULT_COMPUTE_QUOTA_S
) -> tuple[PrefillBatch, ...]:
    """Split a whole FIFO queue into successive prefill steps (no arrivals in between).

    Equivalent to calling `pack_prefill_batch` and `remaining_queue` until the queue is empty,
    in time linear in the number of batches plus items.
    """
    _check_quota(quota_s)
    batches: list[PrefillBatch] = []
    start = 0
    head: PrefillItem | None = None
    while start < len(queue):
        batch, start = _pack(queue, start, head, cost, quota_s)
        batches.append(batch)
        head = batch.remainder
    return tuple(batches)


def _pack(
    queue: Sequence[PrefillItem],
    start: int,
    head: PrefillItem | None,
    cost: CostModel,
    quota_s: float,
) -> tuple[PrefillBatch, int]:
    """Pack from `queue[start:]`, with `head` standing in for `queue[start]` when given.

    Returns the batch and the index of the queue item the next batch starts with (the item
    whose remainder is `batch.remainder`, if any).
    """
    items: list[PrefillItem] = []
    total = 0.0
    index = start
    while index < len(queue):
        item = head if (head is not None and index == start) else queue[index]
        whole = total + cost.attention_s(item.cached_tokens, item.new_tokens)
        if whole <= quota_s:
            items.append(item)
            total = whole
            index += 1
            continue
        chunk = _largest_chunk(item, total, cost, quota_s)
        over = False
        if chunk == 0:
            if items:
                break  # the item waits, untouched, at the head of the next batch
            chunk, over = 1, True  # minimal progress, see pack_prefill_batch
        taken = PrefillItem(item.turn_id, item.cached_tokens, chunk)
        total += cost.attention_s(taken.cached_tokens, taken.new_tokens)
        items.append(taken)
        remainder = None
        if chunk < item.new_tokens:
            remainder = PrefillItem(
                item.turn_id, item.cached_tokens + chunk, item.new_tokens - chunk
            )
        else:
            index += 1  # only when a 1-token item is forced through whole
        return PrefillBatch(tuple(items), total, remainder, over), index
    return PrefillBatch(tuple(items), total), index


def _largest_chunk(item: PrefillItem, total: float, cost: CostModel, quota_s: float) -> int:
    """Largest k in [0, new_tokens) with total + attention(cached, k) <= quota_s.

    The caller has checked that k = new_tokens overflows; k = 0 always fits because the batch
    so far fits. Predicted attention is non-decreasing in k, so bisection is exact.
    """
    lo, hi = 0, item.new_tokens  # invariant: lo fits, hi overflows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total + cost.attention_s(item.cached_tokens, mid) <= quota_s:
            lo = mid
        else:
            hi = mid
    return lo


def _check_quota(quota_s: float) -> None:
    if math.isnan(quota_s) or quota_s <= 0:
        raise ValueError(f"quota_s must be > 0 real seconds, got {quota_s}")


# -- decode -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodeItem:
    """A sequence being decoded: `context_tokens` of KV on the decode GPU."""

    turn_id: str
    context_tokens: int

    def __post_init__(self) -> None:
        if self.context_tokens < 0:
            raise ValueError(
                f"decode item {self.turn_id!r}: context_tokens must be >= 0, "
                f"got {self.context_tokens}"
            )


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """One decode step of one GPU: every active sequence, in the order given."""

    items: tuple[DecodeItem, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.items)

    @property
    def context_tokens(self) -> int:
        return sum(i.context_tokens for i in self.items)

    def step_s(self, cost: CostModel) -> float:
        """Predicted real seconds of this step."""
        return cost.decode_step_s(self.num_seqs, self.context_tokens)


def decode_batch(active: Sequence[DecodeItem]) -> DecodeBatch:
    """Decode engines put all their requests in every step (no quota). # DualPath §6"""
    return DecodeBatch(tuple(active))


# -- balance across a group -------------------------------------------------------------------


def attention_balance(per_gpu_attention_s: Sequence[float]) -> float:
    """max / mean of the GPUs' attention times in one step of an engine group.

    With DP attention + EP MoE all GPUs of a group meet at every layer's all-to-all, so the
    slowest GPU sets the step and the others idle: 1.0 is perfect balance, 1.06 is what the
    paper measures early in a run (DualPath §6, §8). Equal times (all zeros included) give
    exactly 1.0; at least one GPU is required and times must be finite and >= 0.
    """
    times = tuple(per_gpu_attention_s)
    if not times:
        raise ValueError("attention_balance needs at least one GPU's attention time")
    for t in times:
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"attention times must be finite and >= 0 seconds, got {t}")
    high = max(times)
    if high == min(times):
        return 1.0
    return high / math.fsum(times) * len(times)  # not / mean: a subnormal mean can be 0

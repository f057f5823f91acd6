"""Prefill-engine selection, exactly Algorithm 1: FIFO head to the least-loaded eligible PE.

# DualPath §6, Algorithm 1 (inter-engine PE scheduling). Pure: frozen views in, a frozen
selection out; never mutates its inputs, keeps no state between calls, does no I/O.

Where the paper is silent, this module decides:

- **read_q is not updated within one fetch.** Algorithm 1 updates only `tok_e`, and the node
  that will read a turn's KV is unknown until its DE and read side are fixed (about half the
  reads go to the DE's node), so charging the PE's node here would be wrong as often as right.
  The composed policy charges the chosen read side after DE selection, and the scheduler
  service adds assigned-but-unreported reads to the next fetch's view.
- **Ties** in tok_e go to the engine whose node has the shorter read queue (Algorithm 1's
  own aim, within C2 or C3), then whose node has been assigned fewer read tokens so far
  (`read_total_tokens`: below saturation idle engines tie on every fetch, and a choice
  among them that ignores past reads left 5 s windows of storage-NIC reads less even than
  round robin), then to the next engine of a rotation of the sorted
  (node_id, engine) order that starts at an offset drawn from the fetch's head turn id
  (crc32). A fixed order would send every tie to prefill-0's engines, and below saturation,
  where idle engines tie at tok_e = 0 on every fetch, that alone loads one node's storage NIC
  more than the others. The result stays deterministic and independent of the order in which
  the views are listed.
- **Scope:** `groups=None` selects over every prefill engine (what the emulation's scheduler
  does on each fetch); `groups={node_id, ...}` restricts selection to the fetching group(s)
  (the paper's pull model, where a group's leader fetches work for its own engines).
- **Stop:** the fetch ends at the first turn with no engine at tok_e <= beta; later turns are
  not looked at (FIFO: nothing overtakes the head).
"""

from __future__ import annotations

import heapq
import itertools
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from dualpath.errors import DualPathError
from scheduler.views import NodeView, PendingTurn

ALPHA_WINDOW_S = 3.0
"""DualPath §6: alpha = tokens a node's storage NIC reads in 3 s."""
BETA_WINDOW_S = 5.0
"""DualPath §6: beta = tokens one GPU processes in 5 s."""


class UnknownGroupError(DualPathError, ValueError):
    """`groups` named a node that is not among the prefill views."""

    def __init__(self, missing: Iterable[str], known: Iterable[str]) -> None:
        self.missing = tuple(sorted(missing))
        super().__init__(
            f"unknown prefill group(s) {', '.join(self.missing)}; "
            f"prefill groups: {', '.join(sorted(known))}"
        )


class PeTier(StrEnum):
    """Which candidate set of Algorithm 1 a choice came from."""

    SHORT_READ_QUEUE = "C2"
    """tok_e <= beta and read_q(node) <= alpha: preferred."""
    LONG_READ_QUEUE = "C3"
    """tok_e <= beta and read_q(node) > alpha: used only when C2 is empty."""


@dataclass(frozen=True, slots=True)
class PeChoice:
    turn_id: str
    node_id: str
    engine: int
    tier: PeTier
    tok_before: int
    """The engine's tok_e (working copy) when it was chosen; always <= beta."""


@dataclass(frozen=True, slots=True)
class PeSelection:
    choices: tuple[PeChoice, ...]
    """One per placed turn, a FIFO prefix of the queue, in queue order."""
    stopped: bool
    """True if a turn was left unplaced because every engine had tok_e > beta."""


def alpha_tokens_for(snic_tokens_per_s: float, *, window_s: float = ALPHA_WINDOW_S) -> int:
    """alpha from a profiled storage-NIC read rate (tokens of KV per second)."""
    if snic_tokens_per_s <= 0 or window_s <= 0:
        raise ValueError("snic_tokens_per_s and window_s must be > 0")
    return max(1, int(snic_tokens_per_s * window_s))


def beta_tokens_for(gpu_tokens_per_s: float, *, window_s: float = BETA_WINDOW_S) -> int:
    """beta from a profiled per-GPU prefill rate (prompt tokens per second)."""
    if gpu_tokens_per_s <= 0 or window_s <= 0:
        raise ValueError("gpu_tokens_per_s and window_s must be > 0")
    return max(1, int(gpu_tokens_per_s * window_s))


def scoped_prefill(
    prefill: Sequence[NodeView], groups: frozenset[str] | None
) -> tuple[NodeView, ...]:
    """The prefill nodes selection runs over; raises UnknownGroupError for strangers."""
    if groups is None:
        return tuple(prefill)
    known = {n.node_id for n in prefill}
    missing = groups - known
    if missing:
        raise UnknownGroupError(missing, known)
    return tuple(n for n in prefill if n.node_id in groups)


class _Candidates:
    """Working copy of tok_e for one fetch: a min-heap per candidate set.

    Heap entries are (tok_e, read_q, read_total, rank, node_id, engine), rank being the
    engine's place in the fetch's tie rotation; an engine leaves its heap for good once its
    tok_e exceeds beta (tok_e only grows within a fetch), and since read_q is fixed within a
    fetch no engine ever moves between C2 and C3. Each pick is O(log E).
    """

    __slots__ = ("beta", "c2", "c3")

    def __init__(
        self, nodes: Iterable[NodeView], *, alpha_tokens: int, beta_tokens: int, salt: str
    ) -> None:
        self.beta = beta_tokens
        self.c2: list[tuple[int, int, int, int, str, int]] = []
        self.c3: list[tuple[int, int, int, int, str, int]] = []
        order = sorted(
            (n.node_id, e.engine, e.tok, n.read_q_tokens, n.read_total_tokens)
            for n in nodes
            for e in n.engines
        )
        offset = tie_offset(salt, len(order))
        for pos, (node_id, engine, tok, read_q, total) in enumerate(order):
            if tok > beta_tokens:
                continue
            dest = self.c2 if read_q <= alpha_tokens else self.c3
            dest.append((tok, read_q, total, (pos - offset) % len(order), node_id, engine))
        heapq.heapify(self.c2)
        heapq.heapify(self.c3)

    def assign(self, tokens: int) -> tuple[int, str, int, PeTier] | None:
        """Pick argmin tok_e in C2, else in C3, charge `tokens`; None if both are empty."""
        if self.c2:
            heap, tier = self.c2, PeTier.SHORT_READ_QUEUE
        elif self.c3:
            heap, tier = self.c3, PeTier.LONG_READ_QUEUE
        else:
            return None
        tok, read_q, total, rank, node_id, engine = heap[0]
        after = tok + tokens
        if after <= self.beta:
            heapq.heapreplace(heap, (after, read_q, total, rank, node_id, engine))
        else:
            heapq.heappop(heap)
        return tok, node_id, engine, tier


def tie_offset(salt: str, num_engines: int) -> int:
    """Where a fetch's tie rotation starts in the sorted (node_id, engine) order."""
    return zlib.crc32(salt.encode()) % num_engines if num_engines else 0


def select_prefill(
    queue: Iterable[PendingTurn],
    prefill: Sequence[NodeView],
    *,
    alpha_tokens: int,
    beta_tokens: int,
    groups: frozenset[str] | None = None,
) -> PeSelection:
    """Run Algorithm 1 over the FIFO `queue`; return the PE of each placed turn.

    # DualPath §6, Algorithm 1: C2 = {tok_e <= beta, read_q <= alpha},
    # C3 = {tok_e <= beta, read_q > alpha}; argmin tok_e in C2, else C3, else stop;
    # tok_e += len(r) (the turn's prompt tokens).
    """
    if alpha_tokens < 0 or beta_tokens < 0:
        raise ValueError("alpha_tokens and beta_tokens must be >= 0")
    scope = scoped_prefill(prefill, groups)
    turns = iter(queue)
    head = next(turns, None)
    if head is None:
        return PeSelection((), stopped=False)
    cands = _Candidates(
        scope,
        alpha_tokens=alpha_tokens,
        beta_tokens=beta_tokens,
        salt=head.turn_id,
    )
    choices: list[PeChoice] = []
    for turn in itertools.chain((head,), turns):
        picked = cands.assign(turn.prompt_tokens)
        if picked is None:
            return PeSelection(tuple(choices), stopped=True)
        tok, node_id, engine, tier = picked
        choices.append(PeChoice(turn.turn_id, node_id, engine, tier, tok))
    return PeSelection(tuple(choices), stopped=False)

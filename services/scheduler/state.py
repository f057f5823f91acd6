"""The scheduler's turn table and node reports: a state machine driven by typed messages
(services.wire.rpc) and `now`, with no I/O of its own.

Clients submit turns; leaders fetch (their report in, assignments and cancellations out) and
report turn events; the service's timer reaps lost nodes and prunes finished turns. Policy
decisions are the policy's (scheduler.registry builds it from the spec); here only what to
tell whom, and what each node's load is until its reports catch up.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dualpath.errors import DualPathError
from scheduler.dualpath_policy import SplitAssignment
from scheduler.policies import SchedulingPolicy
from scheduler.registry import NO_PLUGINS, PolicyFactory, PolicyKnobs, make_policy, policy_name
from scheduler.views import Assignment, EngineView, NodeView, PendingTurn, ReadSide
from services.blocks import TurnBlocks
from services.prefixes import PrefixCatalogue, Source
from services.spec import ClusterSpec, Role
from services.wire.rpc import (
    AssignedTurn,
    Cancellation,
    EngineStatus,
    FetchReply,
    FetchRequest,
    NodeCounters,
    NodeStatus,
    ReadRanges,
    ReportRequest,
    SchedulerStatus,
    TurnSubmission,
)

TERMINAL_EVENTS = frozenset({"done", "failed"})
FINISHED_RETENTION_S = 30.0
"""A finished turn is forgotten this long after it finished, once no node reports holding it
and no client is streaming it: nodes learn of a failure through `cancelled` meanwhile."""
MAX_RETIRED = 256
"""Last reports of replaced node processes kept for the byte accounting (oldest dropped)."""

TurnEventRecord = dict[str, Any]
"""A turn event as its client reads it: `{event, turn_id, at, **fields}` (one JSON line)."""


class SubmissionError(DualPathError, ValueError):
    """A submitted turn that decodes but does not fit the cluster; nothing was queued."""


class FetchInputError(DualPathError, ValueError):
    """A fetch that decodes but does not fit the cluster (a role that is not the node's);
    the message names the field. Nothing was changed."""


def policy_for(
    spec: ClusterSpec, plugins: Mapping[str, PolicyFactory] = NO_PLUGINS
) -> SchedulingPolicy:
    """The scheduling policy a cluster runs, from the one registry (scheduler.registry):
    `basic` or `oracle`, or under `dualpath` its selector (the paper's, a baseline, or one of
    `plugins`: scheduler.plugins.InstalledPolicies)."""
    knobs = PolicyKnobs(
        alpha_tokens=spec.alpha_tokens,
        beta_tokens=spec.beta_tokens,
        block_tokens=spec.profile.block_tokens,
        split_reads=spec.split_reads,  # every snic has the same rate: the default fits
        baseline_read_side="alternate"
        if spec.baseline_read_side == "alternate"
        else "shorter_queue",
    )
    return make_policy(policy_name(spec.policy.value, spec.selector, plugins), knobs, plugins)


def read_ranges(a: Assignment, hit_blocks: int) -> ReadRanges:
    """Hit blocks [first, end) each side reads: a split's two ranges, else all on read_side."""
    if isinstance(a, SplitAssignment):
        p, d = a.prefill_blocks, a.decode_blocks
        return ReadRanges((p.first_block, p.end_block), (d.first_block, d.end_block))
    whole, empty = (0, hit_blocks), (0, 0)
    return ReadRanges(
        whole if a.read_side is ReadSide.PREFILL else empty,
        whole if a.read_side is ReadSide.DECODE else empty,
    )


def _span(r: tuple[int, int]) -> int:
    return r[1] - r[0]


@dataclass
class TurnRecord:
    """One turn in the scheduler's table: what was submitted, where it went, what happened."""

    pending: PendingTurn
    submission: TurnSubmission
    submitted_at: float
    assignment: Assignment | None = None
    events: list[TurnEventRecord] = field(default_factory=list)
    listeners: list[Callable[[TurnEventRecord], None]] = field(default_factory=list)
    """Who streams the turn's events (a client's request); each gets every later event."""
    finished: bool = False
    hit: int | None = None
    """Content-addressed turns (`block_keys`): the persisted prefix found at submission."""
    sources: tuple[Source, ...] = ()
    """... and where its blocks live."""

    @property
    def turn_id(self) -> str:
        return self.pending.turn_id

    def blocks(self, block_tokens: int) -> TurnBlocks:
        """An agent's turn persists its whole context after decoding (the next turn's
        prefix); a content-addressed request persists its prompt's new full blocks, the
        ones its keys name."""
        s = self.submission
        if self.hit is None:
            return TurnBlocks.of(s.context_tokens, s.prompt_tokens, s.gen_tokens, block_tokens)
        full = len(s.block_keys)
        return TurnBlocks(self.hit, -(-s.prompt_tokens // block_tokens), full)

    def context_tokens(self, block_tokens: int) -> int:
        """Tokens whose KV is read, not computed: the hit prefix of a keyed request."""
        s = self.submission
        return s.context_tokens if self.hit is None else self.hit * block_tokens

    def assigned(self, block_tokens: int) -> AssignedTurn:
        """The turn as its nodes receive it (it must have been assigned)."""
        a, s = self.assignment, self.submission
        assert a is not None
        blocks = self.blocks(block_tokens)
        return AssignedTurn(
            turn_id=self.turn_id,
            traj_id=s.traj_id,
            turn_index=s.turn_index,
            context_tokens=self.context_tokens(block_tokens),
            prompt_tokens=s.prompt_tokens,
            gen_tokens=s.gen_tokens,
            hit_blocks=blocks.hit,
            prompt_blocks=blocks.prompt,
            persist_end_block=blocks.persist_end,
            prefill_node=a.prefill_node,
            prefill_engine=a.prefill_engine,
            decode_node=a.decode_node,
            decode_engine=a.decode_engine,
            read_side=a.read_side.value,
            reads=read_ranges(a, blocks.hit),
            stream_tokens=s.stream_tokens,
            sources=self.sources,
        )


@dataclass(frozen=True)
class NodeReport:
    """A node's last fetch, when it came, and the turns it held (as a set, for lookups)."""

    fetch: FetchRequest
    at: float
    held: frozenset[str]

    @property
    def node_id(self) -> str:
        return self.fetch.node_id

    def counters(self, *, retired: bool = False) -> NodeCounters:
        f = self.fetch
        return NodeCounters(role=f.role, counters=f.counters, boot=f.boot, retired=retired)


class SchedulerState:
    """All mutable scheduler state; driven by the gRPC and HTTP handlers and the timer."""

    def __init__(self, spec: ClusterSpec, policy: SchedulingPolicy) -> None:
        self.spec = spec
        self.policy = policy
        self.queue: deque[str] = deque()
        self.turns: dict[str, TurnRecord] = {}
        self.reports: dict[str, NodeReport] = {}
        self.outbox: dict[str, list[str]] = {n.node_id: [] for n in spec.nodes}
        # Turns assigned to a node that its reports do not cover yet: not delivered, or
        # delivered in the reply to its last fetch (that fetch's report predates them).
        self.uncovered: dict[str, set[str]] = {n.node_id: set() for n in spec.nodes}
        self.read_total: dict[str, int] = {n.node_id: 0 for n in spec.nodes}
        """Hit tokens assigned to each node's storage reads so far (read-side tie-break)."""
        self.delivered_last: dict[str, list[str]] = {n.node_id: [] for n in spec.nodes}
        self._next_id = 0
        self.num_done = 0
        self.num_failed = 0
        self.retired: list[NodeReport] = []
        """Last reports of node processes that were replaced by a restart."""
        self.lost: set[str] = set()
        """Engine nodes that stopped fetching for node_timeout_s; back once they fetch again."""
        self.finished: deque[tuple[float, str]] = deque()
        """(finished at, turn id) in finishing order: what `prune` may forget."""
        self.observers: list[Callable[[TurnRecord, TurnEventRecord], None]] = []
        """Who sees every turn's every event (the vLLM-named metrics)."""
        self.prefixes = PrefixCatalogue()
        """Content-addressed blocks persisted so far (turns submitted with block_keys)."""

    @property
    def block_tokens(self) -> int:
        return self.spec.profile.block_tokens

    # -- clients --------------------------------------------------------------------------
    def submit(self, s: TurnSubmission, now: float) -> TurnRecord:
        """Queue a turn. A content-addressed one (block_keys) gets the longest persisted
        prefix of its keys as its hit blocks; SubmissionError when its keys do not cover its
        prompt's full blocks."""
        bt = self.block_tokens
        hit: int | None = None
        sources: tuple[Source, ...] = ()
        if s.block_keys:
            if len(s.block_keys) != s.prompt_tokens // bt:
                raise SubmissionError(
                    f"block_keys: {len(s.block_keys)} keys for a prompt of {s.prompt_tokens} "
                    f"tokens, which has {s.prompt_tokens // bt} full blocks of {bt} tokens"
                )
            hit, sources = self.prefixes.lookup(s.block_keys)
        self._next_id += 1
        turn_id = f"t{self._next_id}"
        context = (s.context_tokens // bt) * bt if hit is None else hit * bt
        pending = PendingTurn(turn_id, s.traj_id, s.prompt_tokens, context, s.gen_tokens)
        record = TurnRecord(
            pending=pending, submission=s, submitted_at=now, hit=hit, sources=sources
        )
        self.turns[turn_id] = record
        self.queue.append(turn_id)
        self.event(turn_id, "queued", now)
        return record

    def event(self, turn_id: str, kind: str, at: float, **extra: Any) -> None:
        turn = self.turns.get(turn_id)
        if turn is None or turn.finished:
            return
        ev = {"event": kind, "turn_id": turn_id, "at": at, **extra}
        if kind != "token":  # a streamed turn's every token goes to its listeners only
            turn.events.append(ev)
        for listener in turn.listeners:
            listener(ev)
        for observe in self.observers:
            observe(turn, ev)
        if kind in TERMINAL_EVENTS:
            turn.finished = True
            self.finished.append((at, turn_id))
            if turn.assignment is None:  # failed (cancelled) while queued
                with contextlib.suppress(ValueError):
                    self.queue.remove(turn_id)
            for uncovered in self.uncovered.values():
                uncovered.discard(turn_id)
            if kind == "done":
                self.num_done += 1
                if turn.hit is not None:
                    blocks = turn.blocks(self.block_tokens)
                    keys = turn.submission.block_keys
                    self.prefixes.persisted(
                        turn.submission.traj_id, keys, range(blocks.hit, blocks.persist_end)
                    )
            else:
                self.num_failed += 1

    def cancel(self, turn_id: str, reason: str, now: float) -> None:
        """Fail a turn nobody waits for any more (its client went away), wherever it is:
        queued, it is never assigned; assigned, its nodes drop it at their next fetch."""
        self.event(turn_id, "failed", now, node="scheduler", reason=reason, retryable=False)

    # -- engine leaders ---------------------------------------------------------------------
    def fetch(self, req: FetchRequest, now: float) -> FetchReply:
        """Take a leader's report; on a prefill fetch, schedule; answer with the node's new
        assignments and the turns it should drop. KeyError for a node not in the cluster,
        FetchInputError for a role that is not its own: nothing changes then."""
        node = self.spec.node(req.node_id)
        if req.role != node.role.value:
            raise FetchInputError(
                f"role: {req.node_id} is a {node.role.value} node, got {req.role!r}"
            )
        node_id = req.node_id
        report = NodeReport(req, now, frozenset(req.turns))
        prev = self.reports.get(node_id)
        if prev is not None and prev.fetch.boot != req.boot:
            # a restarted node has lost everything it held: its turns cannot finish
            self._fail_assigned(node_id, f"node {node_id} restarted", now)
            self.retired.append(prev)  # the old process's last counters still count
            del self.retired[:-MAX_RETIRED]
        self.reports[node_id] = report
        self.uncovered[node_id].difference_update(self.delivered_last[node_id])
        self.lost.discard(node_id)
        if node.role is Role.PREFILL:
            self._schedule(now)
        ids = self.outbox[node_id]
        self.outbox[node_id] = []
        self.delivered_last[node_id] = ids
        live = [self.turns.get(t) for t in ids]
        assignments = tuple(
            t.assigned(self.block_tokens) for t in live if t is not None and not t.finished
        )
        return FetchReply(assignments, self.cancelled(node_id))

    def report(self, req: ReportRequest) -> None:
        for ev in req.events:  # all decoded and checked before any is taken
            self.event(ev.turn_id, ev.kind, ev.at, **ev.extra)

    def cancelled(self, node_id: str) -> tuple[Cancellation, ...]:
        """The turns a node reported holding that have already failed (a lost or restarted
        peer, a failure on the other node): the node drops them instead of waiting for KV
        that will never come."""
        rep = self.reports.get(node_id)
        out = []
        for turn_id in sorted(rep.held if rep is not None else ()):
            turn = self.turns.get(turn_id)
            if turn is not None and turn.finished and turn.events[-1]["event"] == "failed":
                reason = str(turn.events[-1].get("reason", "failed elsewhere"))
                out.append(Cancellation(turn_id, reason))
        return tuple(out)

    def view(self, role: Role) -> list[NodeView] | None:
        """The load view a policy sees: last reports plus assignments they do not cover yet."""
        views = []
        bt = self.block_tokens
        for node in self.spec.by_role(role):
            if node.node_id in self.lost:
                continue  # a lost node takes no new work until it fetches again
            rep = self.reports.get(node.node_id)
            if rep is None:
                return None  # wait until every node of the role has reported once
            tok = {e.engine: e.tok for e in rep.fetch.engines}
            seq = {e.engine: e.seq for e in rep.fetch.engines}
            free = {e.engine: e.free_kv_tokens for e in rep.fetch.engines}
            read_q = rep.fetch.read_q_tokens
            # Turns assigned to this node that its last report does not cover yet.
            for turn_id in self.uncovered[node.node_id]:
                turn = self.turns.get(turn_id)
                a = turn.assignment if turn is not None else None
                if turn is None or a is None or turn.finished or turn_id in rep.held:
                    continue
                p = turn.pending
                reads = read_ranges(a, turn.blocks(bt).hit)
                if a.prefill_node == node.node_id:
                    tok[a.prefill_engine] = tok.get(a.prefill_engine, 0) + p.prompt_tokens
                    seq[a.prefill_engine] = seq.get(a.prefill_engine, 0) + 1
                    read_q += _span(reads.prefill) * bt
                if a.decode_node == node.node_id:
                    tok[a.decode_engine] = tok.get(a.decode_engine, 0) + p.kv_tokens
                    seq[a.decode_engine] = seq.get(a.decode_engine, 0) + 1
                    free[a.decode_engine] = free.get(a.decode_engine, 0) - p.kv_tokens
                    read_q += _span(reads.decode) * bt
            engines = tuple(
                EngineView(node.node_id, i, seq.get(i, 0), tok.get(i, 0), free.get(i, 0))
                for i in sorted(tok)
            )
            views.append(NodeView(node.node_id, read_q, engines, self.read_total[node.node_id]))
        return views

    def _schedule(self, now: float) -> None:
        if not self.queue:
            return
        prefill = self.view(Role.PREFILL)
        decode = self.view(Role.DECODE)
        if not prefill or not decode:
            return
        pending = [self.turns[t].pending for t in self.queue]
        plan = self.policy.schedule(pending, prefill, decode, now=now)
        bt = self.block_tokens
        for a in plan.assignments:
            turn = self.turns[a.turn_id]
            turn.assignment = a
            for node_id in (a.prefill_node, a.decode_node):
                self.outbox[node_id].append(a.turn_id)
                self.uncovered[node_id].add(a.turn_id)
            blocks = turn.blocks(bt)
            reads = read_ranges(a, blocks.hit)
            self.read_total[a.prefill_node] += _span(reads.prefill) * bt
            self.read_total[a.decode_node] += _span(reads.decode) * bt
            self.event(
                a.turn_id,
                "assigned",
                now,
                prefill=f"{a.prefill_node}/{a.prefill_engine}",
                decode=f"{a.decode_node}/{a.decode_engine}",
                read_side=a.read_side.value,
                reads={"prefill": list(reads.prefill), "decode": list(reads.decode)},
                hit_blocks=blocks.hit,
                prompt_blocks=blocks.prompt,
            )
        done = plan.assigned_ids
        self.queue = deque(t for t in self.queue if t not in done)

    # -- the timer --------------------------------------------------------------------------
    def reap(self, now: float) -> list[str]:
        """Mark engine nodes that have not fetched for node_timeout_s as lost and fail, as
        retryable, every unfinished turn assigned to them; returns the newly lost nodes."""
        newly = []
        for node_id, rep in self.reports.items():
            if node_id in self.lost or now - rep.at <= self.spec.node_timeout_s:
                continue
            self.lost.add(node_id)
            newly.append(node_id)
            self._fail_assigned(
                node_id, f"node {node_id} lost: no fetch for {now - rep.at:.1f} s", now
            )
        return newly

    def prune(self, now: float) -> int:
        """Forget turns finished FINISHED_RETENTION_S ago that no node reports holding and no
        client streams; returns how many. Keeps the state bounded over a long run."""
        held = set().union(*(r.held for r in self.reports.values()))
        kept: list[tuple[float, str]] = []
        n = 0
        while self.finished and self.finished[0][0] <= now - FINISHED_RETENTION_S:
            at, turn_id = self.finished.popleft()
            turn = self.turns.get(turn_id)
            if turn is None:
                continue
            if turn_id in held or turn.listeners:
                kept.append((at, turn_id))
                continue
            del self.turns[turn_id]
            n += 1
        self.finished.extendleft(reversed(kept))
        return n

    def _fail_assigned(self, node_id: str, reason: str, now: float) -> None:
        for turn_id, turn in list(self.turns.items()):
            a = turn.assignment
            if turn.finished or a is None or node_id not in (a.prefill_node, a.decode_node):
                continue
            self.event(turn_id, "failed", now, node="scheduler", reason=reason, retryable=True)

    # -- introspection ----------------------------------------------------------------------
    def status(self, now: float) -> SchedulerStatus:
        """GET /v1/status: queue, counts, and each node's last reported loads."""
        engine_nodes = [n.node_id for n in self.spec.nodes if n.role in (Role.PREFILL, Role.DECODE)]
        return SchedulerStatus(
            policy=self.policy.name,
            queue=len(self.queue),
            turns=len(self.turns),
            done=self.num_done,
            failed=self.num_failed,
            ready=all(n in self.reports for n in engine_nodes),
            nodes={
                r.node_id: NodeStatus(
                    role=r.fetch.role,
                    age_s=round(now - r.at, 3),
                    read_q_tokens=r.fetch.read_q_tokens,
                    engines=tuple(
                        EngineStatus(e.engine, e.seq, e.tok, e.free_kv_tokens)
                        for e in r.fetch.engines
                    ),
                )
                for r in self.reports.values()
            },
        )

    def cluster(self) -> dict[str, NodeCounters]:
        """Each node's last counters and incarnation (`boot`); a node restarted by chaos also
        appears as `<node>@<old boot>` with the old process's last report (what it did after
        that report died with it: lab/metrics.py accounts for it per peer)."""
        out = {r.node_id: r.counters() for r in self.reports.values()}
        for r in self.retired:
            out[f"{r.node_id}@{r.fetch.boot}"] = r.counters(retired=True)
        return out

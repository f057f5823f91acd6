"""The central scheduler service: gRPC for engine-group leaders, HTTP for clients.

Leaders call `Fetch` every pull interval with their engines' `seq_e`/`tok_e`, their node's
`read_q` and the turns they hold; prefill fetches run the policy from `scheduler/` over the
global FIFO queue. Engines push turn events with `Report`; clients submit a turn over HTTP and
read its events as an NDJSON stream. Policy decisions live in `scheduler/`, not here.
Every gRPC call and every HTTP request but the read-only GETs must present the lab's secret
(`ClusterSpec.secret`, services.auth); anything else is refused before it is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import msgpack
from aiohttp import web
from grpc import aio

from scheduler.dualpath_policy import (
    DualPathPolicy,
    LeastTokensBaseline,
    ReadRule,
    RoundRobinPolicy,
    SplitAssignment,
)
from scheduler.policies import SchedulingPolicy, make_policy
from scheduler.views import Assignment, EngineView, NodeView, PendingTurn, ReadSide
from services import http_bounds
from services.auth import GRPC_AUTH_KEY, REFUSAL, bearer, bearer_middleware, presented
from services.health import HealthMonitor
from services.limits import (
    GRPC_LIMITS,
    HTTP_API_LIMITS,
    PortLimits,
    grpc_server_options,
    unpack_bounded,
)
from services.spec import ClusterSpec, Policy, Role

SERVICE = "dualpath.Scheduler"
TERMINAL_EVENTS = frozenset({"done", "failed"})
MAX_CONTEXT_TOKENS = 10_000_000
_U32 = 1 << 32
"""Bound of a turn's integer fields: trajectory ids are stamped as u32 into the KV bytes
(services/kvblocks.py), and an assignment must fit msgpack's integers on its way to the engines."""
FINISHED_RETENTION_S = 30.0
"""A finished turn is forgotten this long after it finished, once no node reports holding it
and no client is streaming it: nodes learn of a failure through `cancelled` meanwhile."""
MAX_RETIRED = 256
"""Last reports of replaced node processes kept for the byte accounting (oldest dropped)."""


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


class _Undecodable:
    """A request whose bytes are not msgpack: the handler refuses it as INVALID_ARGUMENT (a
    deserializer that raised would make gRPC answer UNKNOWN, as for a crash)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _unpack_request(data: bytes) -> Any:
    """A request from a leader: bounded in containers as well as bytes (GRPC_LIMITS)."""
    try:
        return unpack_bounded(data, max_containers=GRPC_LIMITS.max_header_items)
    except Exception as exc:  # msgpack raises several unrelated types
        return _Undecodable(f"not msgpack: {exc}")


def _request_map(req: Any) -> dict[str, Any]:
    """The request as a map, or TypeError (INVALID_ARGUMENT) naming what it is instead."""
    if isinstance(req, _Undecodable):
        raise TypeError(req.reason)
    if not isinstance(req, dict):
        raise TypeError(f"the request must be a map, got {type(req).__name__}")
    return req


class TurnInputError(ValueError):
    """A submitted turn is malformed; the message names the field."""


class ReportInputError(ValueError):
    """A leader's report is malformed; the message names the event. No event was taken."""


_EVENT_FIELDS = frozenset({"event", "turn_id", "at"})


def _report_events(req: dict[str, Any]) -> list[tuple[str, str, float, dict[str, Any]]]:
    """A report's events, each `[turn_id, kind, at, extra]`, checked before any is taken: an
    event's fields are streamed to the turn's client as JSON, so anything JSON cannot carry
    (bytes) would end that client's stream."""
    events = req.get("events", [])
    if not isinstance(events, list):
        raise ReportInputError(f"events: must be a list, got {type(events).__name__}")
    out = []
    for i, ev in enumerate(events):
        if not isinstance(ev, list) or len(ev) != 4:
            raise ReportInputError(f"events[{i}]: must be [turn_id, kind, at, extra], got {ev!r}")
        turn_id, kind, at, extra = ev
        if not isinstance(turn_id, str) or not isinstance(kind, str):
            raise ReportInputError(f"events[{i}]: turn_id and kind must be strings")
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise ReportInputError(f"events[{i}]: at must be a number, got {at!r}")
        if not isinstance(extra, dict) or _EVENT_FIELDS & extra.keys():
            raise ReportInputError(
                f"events[{i}]: extra must be a map without {sorted(_EVENT_FIELDS)}"
            )
        try:
            json.dumps(extra)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ReportInputError(f"events[{i}]: extra is not JSON data: {exc}") from None
        out.append((turn_id, kind, float(at), extra))
    return out


class FetchInputError(ValueError):
    """A leader's fetch is malformed; the message names the field. Nothing was changed."""


_I64 = 1 << 63


def _fetch_int(name: str, value: Any, *, lo: int = -_I64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < _I64:
        raise FetchInputError(f"{name}: must be an integer in [{lo}, 2^63), got {value!r}")
    return value


def _fetch_report(spec: ClusterSpec, req: dict[str, Any], now: float) -> NodeReport:
    """The report a fetch carries, checked whole before the scheduler's state is touched: a
    value of the wrong type would otherwise fail this fetch half-done, or be stored and break
    every later schedule, /v1/status, /v1/cluster or /metrics."""
    node_id = req.get("node_id")
    if not isinstance(node_id, str):
        raise FetchInputError(f"node_id: must be a string, got {node_id!r}")
    node = spec.node(node_id)  # KeyError for strangers
    if req.get("role") != node.role.value:
        raise FetchInputError(
            f"role: {node_id} is a {node.role.value} node, got {req.get('role')!r}"
        )
    boot = req.get("boot", "")
    if not isinstance(boot, str):
        raise FetchInputError(f"boot: must be a string, got {boot!r}")
    engines = req.get("engines")
    if not isinstance(engines, list) or not all(
        isinstance(e, list) and len(e) == 4 for e in engines
    ):
        raise FetchInputError(
            f"engines: must be a list of [engine, seq, tok, free], got {engines!r}"
        )
    loads = [
        (
            _fetch_int("engines[][0]", e[0], lo=0),
            _fetch_int("engines[][1]", e[1], lo=0),
            _fetch_int("engines[][2]", e[2], lo=0),
            _fetch_int("engines[][3]", e[3]),
        )
        for e in engines
    ]
    turns = req.get("turns", [])
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise FetchInputError("turns: must be a list of turn ids")
    counters = req.get("counters", {})
    try:  # served as JSON by /v1/cluster: bytes (or bytes keys) anywhere in them would not be
        json.dumps(counters)
    except (TypeError, ValueError, RecursionError) as exc:
        raise FetchInputError(f"counters: not JSON data: {exc}") from None
    if not isinstance(counters, dict):
        raise FetchInputError(f"counters: must be a map, got {type(counters).__name__}")
    return NodeReport(
        node_id=node_id,
        role=node.role.value,
        read_q_tokens=_fetch_int("read_q_tokens", req.get("read_q_tokens"), lo=0),
        engines=loads,
        turns=set(turns),
        counters=counters,
        at=now,
        boot=boot,
    )


@dataclass
class TurnState:
    pending: PendingTurn
    traj_id: int
    turn_index: int
    context_tokens: int
    append_tokens: int
    gen_tokens: int
    submitted_at: float
    assignment: Assignment | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    waiters: list[asyncio.Queue[dict[str, Any]]] = field(default_factory=list)
    finished: bool = False

    def wire(self, block_tokens: int) -> dict[str, Any]:
        a = self.assignment
        assert a is not None
        prompt = self.context_tokens + self.append_tokens
        return {
            "turn_id": self.pending.turn_id,
            "traj_id": self.traj_id,
            "turn_index": self.turn_index,
            "context_tokens": self.context_tokens,
            "prompt_tokens": prompt,
            "gen_tokens": self.gen_tokens,
            "hit_blocks": self.context_tokens // block_tokens,
            "prompt_blocks": -(-prompt // block_tokens),
            "persist_end_block": (prompt + self.gen_tokens) // block_tokens,
            "prefill_node": a.prefill_node,
            "prefill_engine": a.prefill_engine,
            "decode_node": a.decode_node,
            "decode_engine": a.decode_engine,
            "read_side": a.read_side.value,
            "reads": read_ranges(a, self.context_tokens // block_tokens),
        }


def read_ranges(a: Assignment, hit_blocks: int) -> dict[str, list[int]]:
    """Hit blocks [first, end) each side reads: a split's two ranges, else all on read_side."""
    if isinstance(a, SplitAssignment):
        p, d = a.prefill_blocks, a.decode_blocks
        return {"prefill": [p.first_block, p.end_block], "decode": [d.first_block, d.end_block]}
    whole, empty = [0, hit_blocks], [0, 0]
    return {
        "prefill": whole if a.read_side is ReadSide.PREFILL else empty,
        "decode": whole if a.read_side is ReadSide.DECODE else empty,
    }


@dataclass
class NodeReport:
    node_id: str
    role: str
    read_q_tokens: int
    engines: list[tuple[int, int, int, int]]
    turns: set[str]
    counters: dict[str, Any]
    at: float
    boot: str = ""
    """Identifies one run of the node's process; a new value means it restarted."""


class SchedulerState:
    """All mutable scheduler state; driven by the gRPC and HTTP handlers."""

    def __init__(self, spec: ClusterSpec, policy: SchedulingPolicy) -> None:
        self.spec = spec
        self.policy = policy
        self.queue: deque[str] = deque()
        self.turns: dict[str, TurnState] = {}
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

    # -- clients --------------------------------------------------------------------------
    def submit(self, body: dict[str, Any], now: float) -> TurnState:
        fields = {}
        for key in ("traj_id", "turn_index", "context_tokens", "append_tokens", "gen_tokens"):
            value = body.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U32:
                raise TurnInputError(f"{key}: must be an integer in [0, 2^32), got {value!r}")
            fields[key] = value
        if fields["append_tokens"] < 1 or fields["gen_tokens"] < 1:
            raise TurnInputError("append_tokens and gen_tokens must be >= 1")
        if fields["context_tokens"] + fields["append_tokens"] > MAX_CONTEXT_TOKENS:
            raise TurnInputError(f"context_tokens + append_tokens exceeds {MAX_CONTEXT_TOKENS}")
        self._next_id += 1
        turn_id = f"t{self._next_id}"
        bt = self.spec.profile.block_tokens
        hit_tokens = (fields["context_tokens"] // bt) * bt
        prompt = fields["context_tokens"] + fields["append_tokens"]
        pending = PendingTurn(turn_id, fields["traj_id"], prompt, hit_tokens, fields["gen_tokens"])
        state = TurnState(
            pending=pending,
            traj_id=fields["traj_id"],
            turn_index=fields["turn_index"],
            context_tokens=fields["context_tokens"],
            append_tokens=fields["append_tokens"],
            gen_tokens=fields["gen_tokens"],
            submitted_at=now,
        )
        self.turns[turn_id] = state
        self.queue.append(turn_id)
        self.event(turn_id, "queued", now)
        return state

    def event(self, turn_id: str, kind: str, at: float, **extra: Any) -> None:
        state = self.turns.get(turn_id)
        if state is None or state.finished:
            return
        ev = {"event": kind, "turn_id": turn_id, "at": at, **extra}
        state.events.append(ev)
        for q in state.waiters:
            q.put_nowait(ev)
        if kind in TERMINAL_EVENTS:
            state.finished = True
            self.finished.append((at, turn_id))
            if state.assignment is None:  # failed (cancelled) while queued
                with contextlib.suppress(ValueError):
                    self.queue.remove(turn_id)
            for uncovered in self.uncovered.values():
                uncovered.discard(turn_id)
            if kind == "done":
                self.num_done += 1
            else:
                self.num_failed += 1

    # -- engine leaders ---------------------------------------------------------------------
    def fetch(self, req: dict[str, Any], now: float) -> list[dict[str, Any]]:
        report = _fetch_report(self.spec, req, now)  # FetchInputError: nothing changes
        node_id, boot = report.node_id, report.boot
        prev = self.reports.get(node_id)
        if prev is not None and prev.boot != boot:
            # a restarted node has lost everything it held: its turns cannot finish
            self._fail_assigned(node_id, f"node {node_id} restarted", now)
            self.retired.append(prev)  # the old process's last counters still count
            del self.retired[:-MAX_RETIRED]
        self.reports[node_id] = report
        self.uncovered[node_id].difference_update(self.delivered_last[node_id])
        self.lost.discard(node_id)
        if report.role == Role.PREFILL.value:
            self._schedule(now)
        ids = self.outbox[node_id]
        self.outbox[node_id] = []
        self.delivered_last[node_id] = ids
        bt = self.spec.profile.block_tokens
        live = [self.turns.get(t) for t in ids]
        return [t.wire(bt) for t in live if t is not None and not t.finished]

    def view(self, role: Role) -> list[NodeView] | None:
        """The load view a policy sees: last reports plus assignments they do not cover yet."""
        views = []
        bt = self.spec.profile.block_tokens
        for node in self.spec.by_role(role):
            if node.node_id in self.lost:
                continue  # a lost node takes no new work until it fetches again
            rep = self.reports.get(node.node_id)
            if rep is None:
                return None  # wait until every node of the role has reported once
            tok = {e[0]: e[2] for e in rep.engines}
            seq = {e[0]: e[1] for e in rep.engines}
            free = {e[0]: e[3] for e in rep.engines}
            read_q = rep.read_q_tokens
            # Turns assigned to this node that its last report does not cover yet.
            for turn_id in self.uncovered[node.node_id]:
                turn = self.turns.get(turn_id)
                a = turn.assignment if turn is not None else None
                if turn is None or a is None or turn.finished or turn_id in rep.turns:
                    continue
                p = turn.pending
                reads = read_ranges(a, turn.context_tokens // bt)
                if a.prefill_node == node.node_id:
                    tok[a.prefill_engine] = tok.get(a.prefill_engine, 0) + p.prompt_tokens
                    seq[a.prefill_engine] = seq.get(a.prefill_engine, 0) + 1
                    read_q += (reads["prefill"][1] - reads["prefill"][0]) * bt
                if a.decode_node == node.node_id:
                    tok[a.decode_engine] = tok.get(a.decode_engine, 0) + p.kv_tokens
                    seq[a.decode_engine] = seq.get(a.decode_engine, 0) + 1
                    free[a.decode_engine] = free.get(a.decode_engine, 0) - p.kv_tokens
                    read_q += (reads["decode"][1] - reads["decode"][0]) * bt
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
        bt = self.spec.profile.block_tokens
        for a in plan.assignments:
            state = self.turns[a.turn_id]
            state.assignment = a
            for node_id in (a.prefill_node, a.decode_node):
                self.outbox[node_id].append(a.turn_id)
                self.uncovered[node_id].add(a.turn_id)
            reads = read_ranges(a, state.context_tokens // bt)
            self.read_total[a.prefill_node] += (reads["prefill"][1] - reads["prefill"][0]) * bt
            self.read_total[a.decode_node] += (reads["decode"][1] - reads["decode"][0]) * bt
            self.event(
                a.turn_id,
                "assigned",
                now,
                prefill=f"{a.prefill_node}/{a.prefill_engine}",
                decode=f"{a.decode_node}/{a.decode_engine}",
                read_side=a.read_side.value,
                reads=reads,
            )
        done = plan.assigned_ids
        self.queue = deque(t for t in self.queue if t not in done)

    def cancelled(self, node_id: str) -> list[list[str]]:
        """[turn_id, reason] of the turns a node reported holding that have already failed
        (a lost or restarted peer, a failure on the other node): the node drops them instead
        of waiting for KV that will never come."""
        rep = self.reports.get(node_id)
        out = []
        for turn_id in sorted(rep.turns if rep is not None else ()):
            turn = self.turns.get(turn_id)
            if turn is not None and turn.finished and turn.events[-1]["event"] == "failed":
                out.append([turn_id, str(turn.events[-1].get("reason", "failed elsewhere"))])
        return out

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

    def cancel(self, turn_id: str, reason: str, now: float) -> None:
        """Fail a turn nobody waits for any more (its client went away), wherever it is:
        queued, it is never assigned; assigned, its nodes drop it at their next fetch."""
        self.event(turn_id, "failed", now, node="scheduler", reason=reason, retryable=False)

    def prune(self, now: float) -> int:
        """Forget turns finished FINISHED_RETENTION_S ago that no node reports holding and no
        client streams; returns how many. Keeps the state bounded over a long run."""
        held = set().union(*(r.turns for r in self.reports.values())) if self.reports else set()
        kept: list[tuple[float, str]] = []
        n = 0
        while self.finished and self.finished[0][0] <= now - FINISHED_RETENTION_S:
            at, turn_id = self.finished.popleft()
            turn = self.turns.get(turn_id)
            if turn is None:
                continue
            if turn_id in held or turn.waiters:
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

    def report(self, req: dict[str, Any]) -> None:
        for turn_id, kind, at, extra in _report_events(req):  # all checked before any is taken
            self.event(turn_id, kind, at, **extra)

    # -- introspection ----------------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        engine_nodes = [n.node_id for n in self.spec.nodes if n.role in (Role.PREFILL, Role.DECODE)]
        return {
            "policy": self.policy.name,
            "queue": len(self.queue),
            "turns": len(self.turns),
            "done": self.num_done,
            "failed": self.num_failed,
            "ready": all(n in self.reports for n in engine_nodes),
            "nodes": {
                r.node_id: {
                    "role": r.role,
                    "age_s": round(now - r.at, 3),
                    "read_q_tokens": r.read_q_tokens,
                    "engines": [
                        {"engine": e[0], "seq": e[1], "tok": e[2], "free_kv_tokens": e[3]}
                        for e in r.engines
                    ],
                }
                for r in self.reports.values()
            },
        }

    def cluster(self) -> dict[str, Any]:
        """Each node's last counters and incarnation (`boot`); a node restarted by chaos also
        appears as `<node>@<old boot>` with the old process's last report (what it did after
        that report died with it: lab/metrics.py accounts for it per peer)."""
        out: dict[str, dict[str, Any]] = {
            r.node_id: {"role": r.role, "counters": r.counters, "boot": r.boot}
            for r in self.reports.values()
        }
        for r in self.retired:
            out[f"{r.node_id}@{r.boot}"] = {
                "role": r.role,
                "counters": r.counters,
                "boot": r.boot,
                "retired": True,
            }
        return out

    def prometheus(self, now: float) -> str:
        lines = [
            "# TYPE dualpath_queue_turns gauge",
            f"dualpath_queue_turns {len(self.queue)}",
            "# TYPE dualpath_turns_done_total counter",
            f"dualpath_turns_done_total {self.num_done}",
            "# TYPE dualpath_turns_failed_total counter",
            f"dualpath_turns_failed_total {self.num_failed}",
            "# TYPE dualpath_read_queue_tokens gauge",
        ]
        for r in self.reports.values():
            lines.append(f'dualpath_read_queue_tokens{{node="{r.node_id}"}} {r.read_q_tokens}')
        lines.append("# TYPE dualpath_node_counter counter")
        for r in self.reports.values():
            for key, value in sorted(r.counters.items()):
                if isinstance(value, int | float):
                    labels = f'node="{r.node_id}",name="{key}"'
                    lines.append(f"dualpath_node_counter{{{labels}}} {value}")
        return "\n".join(lines) + "\n"


# -- gRPC -----------------------------------------------------------------------------------


def _grpc_handler(state: SchedulerState, clock: Callable[[], float]) -> grpc.GenericRpcHandler:
    async def fetch(req: Any, ctx: aio.ServicerContext) -> dict[str, Any]:
        try:
            req = _request_map(req)
            assignments = state.fetch(req, clock())
            return {"assignments": assignments, "cancel": state.cancelled(str(req["node_id"]))}
        except (KeyError, ValueError, TypeError) as exc:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad fetch: {exc}")
            raise  # unreachable: abort raises

    async def report(req: Any, ctx: aio.ServicerContext) -> dict[str, Any]:
        try:
            state.report(_request_map(req))
        except (KeyError, ValueError, TypeError) as exc:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad report: {exc}")
        return {}

    async def pull(
        requests: AsyncIterator[Any], ctx: aio.ServicerContext
    ) -> AsyncIterator[dict[str, Any]]:
        """Fetch as a stream: one reply per request, half the CPU of a unary call each (a
        leader pulls every pull interval: 100 times a second per node at 10 emulated ms)."""
        async for req in requests:
            try:
                req = _request_map(req)
                assignments = state.fetch(req, clock())
                reply = {"assignments": assignments, "cancel": state.cancelled(str(req["node_id"]))}
            except (KeyError, ValueError, TypeError) as exc:
                await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad fetch: {exc}")
                raise  # unreachable: abort raises
            yield reply

    methods = {
        "Fetch": grpc.unary_unary_rpc_method_handler(
            fetch, request_deserializer=_unpack_request, response_serializer=_pack
        ),
        "Pull": grpc.stream_stream_rpc_method_handler(
            pull, request_deserializer=_unpack_request, response_serializer=_pack
        ),
        "Report": grpc.unary_unary_rpc_method_handler(
            report, request_deserializer=_unpack_request, response_serializer=_pack
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class _RequireSecret(aio.ServerInterceptor):  # type: ignore[misc]
    """Every RPC must carry `authorization: Bearer <secret>` in its metadata; any other call
    is answered UNAUTHENTICATED by a handler of the same kind that reads nothing from it."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        given = [v for k, v in details.invocation_metadata or () if k == GRPC_AUTH_KEY]
        if handler is None or (len(given) == 1 and presented(str(given[0]), self._secret)):
            return handler  # None: an unknown method, which gRPC answers UNIMPLEMENTED
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(_request: Any, ctx: aio.ServicerContext) -> None:
        await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def deny_stream(_request: Any, ctx: aio.ServicerContext) -> AsyncIterator[Any]:
        await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        yield None  # unreachable: abort raises; makes this an async generator

    # no deserializer: an unauthenticated request's bytes are never parsed
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


class SchedulerClient:
    """What an engine-group leader uses to talk to the scheduler."""

    def __init__(self, spec: ClusterSpec) -> None:
        self._channel = aio.insecure_channel(f"{spec.grpc.host}:{spec.grpc.port}")
        self._metadata = ((GRPC_AUTH_KEY, bearer(spec.secret)),)
        self._fetch = self._channel.unary_unary(
            f"/{SERVICE}/Fetch", request_serializer=_pack, response_deserializer=_unpack
        )
        self._report = self._channel.unary_unary(
            f"/{SERVICE}/Report", request_serializer=_pack, response_deserializer=_unpack
        )
        self._pull_method = self._channel.stream_stream(
            f"/{SERVICE}/Pull", request_serializer=_pack, response_deserializer=_unpack
        )
        self._pull: Any = None
        self._timeout = spec.request_timeout_s

    async def fetch(self, req: dict[str, Any]) -> tuple[list[dict[str, Any]], list[list[str]]]:
        """New assignments for the node, and [turn_id, reason] of turns it holds that have
        failed elsewhere (it should drop them). Over one Pull stream, reopened after any
        error (the next fetch then starts a new stream)."""
        if self._pull is None:
            self._pull = self._pull_method(metadata=self._metadata)
        call = self._pull
        try:
            async with asyncio.timeout(self._timeout):
                await call.write(req)
                reply = await call.read()
        except BaseException:
            self._pull = None
            call.cancel()
            raise
        if reply is aio.EOF:
            self._pull = None
            raise ConnectionError("the scheduler ended the pull stream")
        return list(reply["assignments"]), [list(c) for c in reply.get("cancel", [])]

    async def report(self, events: list[tuple[str, str, float, dict[str, Any]]]) -> None:
        await self._report(
            {"events": [list(e) for e in events]}, timeout=self._timeout, metadata=self._metadata
        )

    async def close(self) -> None:
        if self._pull is not None:
            self._pull.cancel()
            self._pull = None
        await self._channel.close()


# -- HTTP -----------------------------------------------------------------------------------


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


READ_ONLY_ROUTES = frozenset({"/v1/status", "/v1/cluster", "/metrics", "/v1/health"})
"""GETs that change nothing and may be read without the secret (a Prometheus scraper, curl
from a node); every other method and path requires it (docs/design.md, "Access control")."""


def _http_app(
    state: SchedulerState,
    clock: Callable[[], float],
    health: HealthMonitor | None = None,
    *,
    secret: str,
    port_stats: Callable[[], dict[str, int]] | None = None,
) -> web.Application:
    """The client API. `port_stats`: the HTTP port's connections and limit counters
    (http_bounds.BoundedSite.stats), added to /metrics as `dualpath_http_port`."""

    async def submit_turn(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _problem(400, "invalid JSON", "the request body is not a JSON object")
        if not isinstance(body, dict):
            return _problem(400, "invalid turn", "the request body must be a JSON object")
        try:
            turn = state.submit(body, clock())
        except TurnInputError as exc:
            return _problem(400, "invalid turn", str(exc))
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for ev in turn.events:
            queue.put_nowait(ev)
        turn.waiters.append(queue)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await resp.prepare(request)
            while True:
                ev = await queue.get()
                await resp.write(json.dumps(ev).encode() + b"\n")
                if ev["event"] in TERMINAL_EVENTS:
                    break
        finally:
            turn.waiters.remove(queue)
            if not turn.finished:  # the client went away (or gave up): nobody wants it now
                state.cancel(turn.pending.turn_id, "the client closed the request", clock())
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.json_response(state.status(clock()))

    async def cluster(request: web.Request) -> web.Response:
        return web.json_response(state.cluster())

    async def metrics(request: web.Request) -> web.Response:
        text = state.prometheus(clock())
        if port_stats is not None:
            text += "# TYPE dualpath_http_port gauge\n" + "".join(
                f'dualpath_http_port{{name="{k}"}} {v}\n' for k, v in port_stats().items()
            )
        return web.Response(text=text, content_type="text/plain")

    async def health_report(request: web.Request) -> web.Response:
        if health is None:
            return _problem(404, "no health monitor", "this scheduler measures no emulation health")
        return web.json_response(health.snapshot())

    guard = bearer_middleware(secret, open_reads=READ_ONLY_ROUTES)
    app = web.Application(
        client_max_size=HTTP_API_LIMITS.max_payload_bytes,
        middlewares=[http_bounds.middleware, guard],
    )
    app.router.add_post("/v1/turns", submit_turn)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/health", health_report)
    return app


def policy_for(spec: ClusterSpec) -> SchedulingPolicy:
    """The scheduling policy a cluster runs.

    `basic` is the paper's Basic: prefill-side reads and no DualPath scheduler (least tokens).
    `oracle` skips all reads (least tokens). `dualpath` reads on the shorter-queue side and
    selects engines with `spec.selector`: the paper's Algorithm 1 + two-level DE selection, or
    the round-robin / least-tokens baselines.
    """
    if spec.policy is not Policy.DUALPATH:
        return make_policy(spec.policy.value, beta_tokens=spec.beta_tokens)
    if spec.selector == "dualpath":
        return DualPathPolicy(
            alpha_tokens=spec.alpha_tokens,
            beta_tokens=spec.beta_tokens,
            block_tokens=spec.profile.block_tokens,
            split_reads=spec.split_reads,  # every snic has the same rate: the default fits
        )
    if spec.selector == "round_robin":
        rule: ReadRule = "alternate" if spec.baseline_read_side == "alternate" else "shorter_queue"
        return RoundRobinPolicy(beta_tokens=spec.beta_tokens, read_rule=rule)
    if spec.selector == "least_tokens":
        return LeastTokensBaseline(beta_tokens=spec.beta_tokens, read_rule="shorter_queue")
    raise ValueError(
        f"unknown selector {spec.selector!r}; valid: dualpath, round_robin, least_tokens"
    )


async def serve_scheduler(
    spec: ClusterSpec,
    node_id: str,
    stop: asyncio.Event,
    *,
    clock: Callable[[], float] = time.time,
    http_limits: PortLimits = HTTP_API_LIMITS,
) -> None:
    """Run the scheduler's gRPC and HTTP servers until `stop` is set; its emulation health
    (services.health) is measured all along and served at GET /v1/health. `http_limits`:
    the HTTP API's (services.limits; tests shrink them)."""
    state = SchedulerState(spec, policy_for(spec))
    monitor = HealthMonitor(node_id, "scheduler")
    monitor.start()
    server = aio.server(
        interceptors=(_RequireSecret(spec.secret),),
        options=grpc_server_options(GRPC_LIMITS),
        maximum_concurrent_rpcs=GRPC_LIMITS.max_connections,
    )
    server.add_generic_rpc_handlers((_grpc_handler(state, clock),))
    server.add_insecure_port(f"{spec.grpc.host}:{spec.grpc.port}")
    await server.start()

    async def reaper() -> None:
        while True:
            await asyncio.sleep(min(1.0, spec.node_timeout_s / 4))
            for lost in state.reap(clock()):
                print(f"[scheduler] {lost} lost: its unfinished turns failed", flush=True)
            state.prune(clock())

    reaping = asyncio.create_task(reaper())
    # handler_cancellation: a client that disconnects mid-turn ends its handler, which
    # cancels the turn (submit_turn), instead of leaving it to run for nobody
    sites: list[http_bounds.BoundedSite] = []
    runner = web.AppRunner(
        _http_app(
            state,
            clock,
            monitor,
            secret=spec.secret,
            port_stats=lambda: sites[0].stats() if sites else {},
        ),
        access_log=None,
        handler_cancellation=True,
        **http_bounds.runner_kwargs(http_limits),
    )
    await runner.setup()
    sites.append(
        await http_bounds.start_site(runner, spec.http.host, spec.http.port, limits=http_limits)
    )
    try:
        await stop.wait()
    finally:
        reaping.cancel()
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await server.stop(grace=0.5)
        await monitor.stop()

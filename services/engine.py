"""An engine node (prefill or decode role): the timeline process of its emulated GPUs.

This process runs the node's `EngineCore` (services/engine_core.py) on a deadline-driven
timer, pulls work from the scheduler as its group leader, reports turn events, exchanges the
GPUs' collective bursts with its same-role peers over the cnic (highest DSCP class) and serves
its management port. Every KV byte is handled by the node's data-plane process
(services/dataplane.py), which this process starts and which dies with it: the two share
nothing but a socket pair, so a busy data plane cannot move the GPUs' timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import msgspec

from services.assignment import AssignmentError
from services.codec import Frame
from services.dataplane_core import Failed, GroupReady, KvComplete, Persisted, Released
from services.engine_core import EngineCore
from services.health import HealthMonitor
from services.ipc import (
    DpEvent,
    DpStatus,
    HealthReport,
    HealthRequest,
    IpcChannel,
    Stop,
)
from services.limits import MGMT_PORT_LIMITS, collective_limits_for
from services.scheduler.client import SchedulerClient
from services.sockopts import Dscp
from services.spec import ClusterSpec, NodeSpec, Policy, Role
from services.tasks import ErrorLog, TaskSet
from services.timeline import (
    AssignKv,
    Collective,
    DropKv,
    Emit,
    Persist,
    PrefillDone,
    PrefillStepStats,
    SendGroup,
    StepTimed,
    TimelineConfig,
)
from services.transport import FrameConnection, connect
from services.transport_server import FrameServer, serve
from services.wire.frames import CollectiveAck, CollectiveBurst, FrameKind, StatsRequest, to_frame
from services.wire.rpc import FetchRequest, ReportRequest, TurnEvent

MAX_STEP_RECORDS = 20_000
MAX_REPORT_EVENTS = 2_000
"""Turn events per report to the scheduler (a backlog goes in several)."""
MAX_EVENT_BACKLOG = 100_000
"""Turn events kept while the scheduler cannot be reached."""
HEALTH_TIMEOUT_S = 5.0
DATA_PLANE_START_S = 30.0
STOP_TIMEOUT_S = 5.0


class EngineNode:
    def __init__(
        self,
        spec: ClusterSpec,
        node_id: str,
        *,
        spec_path: Path,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.spec_path = spec_path
        self.me: NodeSpec = engine_node_spec(spec, node_id)
        self.role = self.me.role
        self.peers = [n for n in spec.by_role(self.role) if n.node_id != node_id]
        self.core = EngineCore(timeline_config(spec, self.me, has_peers=bool(self.peers)))
        self.log = log or (lambda msg: None)
        self.boot = secrets.token_hex(8)
        self.health = HealthMonitor(node_id, "timeline")
        self._servers: tuple[FrameServer, ...] = ()
        self.counters: dict[str, int | float] = {
            "collective_count": 0,
            "collective_failures": 0,
            "events_dropped": 0,
            "collective_latency_sum_s": 0.0,
            "collective_latency_max_s": 0.0,
        }
        self.errors = ErrorLog(self.log)
        self.dp_status = DpStatus(0, 0)
        self._dp_ready = asyncio.Event()
        # One row per prefill step of the group: [at, attention max/avg, GPUs with work, GPUs].
        self.steps: list[tuple[float, float, int, int]] = []
        self.collective_ms: list[float] = []
        """Latency of each collective burst (all peers answered), ms; mgmt `stats` only."""
        self._events: list[tuple[str, str, float, dict[str, Any]]] = []
        self._events_ready = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks = TaskSet()
        self._coll_conns: dict[str, FrameConnection] = {}
        self._coll_locks: dict[str, asyncio.Lock] = {}
        self._payload = bytes(spec.collective_bytes_per_step)
        self._health_waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._health_ids = itertools.count(1)
        self.channel: IpcChannel | None = None
        self.scheduler: SchedulerClient | None = None
        self._dp_proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.channel = await self._start_data_plane()
        self.scheduler = SchedulerClient(self.spec)
        self._servers = await self._serve_ports()
        self.health.start()
        ipc = self._spawn(self._ipc_loop())
        await self._await_data_plane()
        self._spawn(self._pull_loop())
        self._spawn(self._event_flusher())
        try:
            await asyncio.wait(
                [asyncio.ensure_future(stop.wait()), ipc], return_when=asyncio.FIRST_COMPLETED
            )
            if ipc.done() and not stop.is_set():
                self._record_error("the data plane exited; the node stops")
        finally:
            await self._shut_down()

    async def _serve_ports(self) -> tuple[FrameServer, ...]:
        """The collective port (same-role peers' bursts) and the management port."""
        assert self.me.collective is not None
        coll_server = await serve(
            self.me.collective.host,
            self.me.collective.port,
            self._on_collective,
            dscp=Dscp.COLLECTIVE,
            limits=collective_limits_for(self.spec),
            on_error=self._record_error,
        )
        mgmt_server = await serve(
            self.me.mgmt.host,
            self.me.mgmt.port,
            self._on_mgmt,
            dscp=Dscp.CONTROL,
            limits=MGMT_PORT_LIMITS,
            on_error=self._record_error,
        )
        return (coll_server, mgmt_server)

    async def _await_data_plane(self) -> None:
        """No work before the data plane listens: a peer would find its KV port closed."""
        try:
            async with asyncio.timeout(DATA_PLANE_START_S):
                await self._dp_ready.wait()
        except TimeoutError:
            self._record_error(f"the data plane did not start within {DATA_PLANE_START_S:g} s")

    async def _shut_down(self) -> None:
        """Stop the data plane, the tasks, the ports and the connections, then reap it."""
        assert self.channel is not None and self.scheduler is not None
        if self._timer is not None:
            self._timer.cancel()
        self.channel.send(Stop())
        with contextlib.suppress(Exception):
            await self.channel.drain()
        await self._tasks.cancel_all()
        await self.health.stop()
        for server in self._servers:
            await server.close()
        for conn in self._coll_conns.values():
            await conn.close()
        await self.scheduler.close()
        await self.channel.close()
        await asyncio.to_thread(self._reap_data_plane)

    async def _start_data_plane(self) -> IpcChannel:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            sys.executable,
            "-m",
            "services.dataplane",
            "--spec",
            str(self.spec_path),
            "--node",
            self.me.node_id,
            "--ipc-fd",
            str(theirs.fileno()),
            "--boot",
            self.boot,
        ]
        self._dp_proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
        theirs.close()
        self.log(f"data plane pid={self._dp_proc.pid}")
        return await IpcChannel.open(ours)

    def _reap_data_plane(self) -> None:
        proc = self._dp_proc
        if proc is None:
            return
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro)

    def _record_error(self, msg: str, *, transient: bool = False) -> None:
        self.errors.record(msg, transient=transient)

    # -- the core --------------------------------------------------------------------------------
    def _drive(self) -> None:
        """Carry out the core's actions and arm the timer for its next deadline."""
        assert self.channel is not None
        for action in self.core.actions():
            if isinstance(action, AssignKv | SendGroup | PrefillDone | Persist | DropKv):
                self.channel.send(action)
            elif isinstance(action, Emit):
                self.emit(action.turn_id, action.kind, **action.extra)
            elif isinstance(action, Collective):
                self._spawn(self._collective(action.key))
            elif isinstance(action, StepTimed):
                self.health.lateness(
                    _wall(action.started_at), action.planned_s, action.actual_s, action.late_s
                )
            elif isinstance(action, PrefillStepStats):
                self.steps.append(
                    (
                        round(_wall(action.started_at), 3),
                        round(action.attention_balance, 4),
                        action.busy_gpus,
                        action.num_gpus,
                    )
                )
                del self.steps[:-MAX_STEP_RECORDS]
        deadline = self.core.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            delay = max(deadline - time.monotonic(), 0.0)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.on_timer(time.monotonic())
        self._drive()

    # -- data plane --------------------------------------------------------------------------------
    async def _ipc_loop(self) -> None:
        assert self.channel is not None
        while True:
            try:
                msg = await self.channel.recv()
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            now = time.monotonic()
            if isinstance(msg, GroupReady):
                self.core.on_group_ready(msg.turn_id, msg.group, now)
            elif isinstance(msg, KvComplete):
                self.core.on_kv_complete(msg.turn_id, now)
            elif isinstance(msg, Released):
                self.core.on_released(msg.turn_id, now)
            elif isinstance(msg, Persisted):
                self.core.on_persisted(msg.turn_id, now)
            elif isinstance(msg, Failed):
                if msg.report:
                    self._record_error(msg.reason, transient=msg.retryable)
                self.core.on_failed(
                    msg.turn_id, msg.reason, now, retryable=msg.retryable, report=msg.report
                )
            elif isinstance(msg, DpStatus):
                self.dp_status = msg
                self._dp_ready.set()
            elif isinstance(msg, DpEvent):
                self._events.append((msg.turn_id, msg.kind, msg.at, dict(msg.extra)))
                self._events_ready.set()
                if len(self._events) > MAX_EVENT_BACKLOG:
                    self._bound_backlog()
            elif isinstance(msg, HealthReport):
                fut = self._health_waiters.pop(msg.req, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.snapshot)
            self._drive()

    async def _data_plane_health(self) -> dict[str, Any] | None:
        assert self.channel is not None
        req = next(self._health_ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._health_waiters[req] = fut
        self.channel.send(HealthRequest(req))
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                return await fut
        except TimeoutError:
            return None
        finally:
            self._health_waiters.pop(req, None)

    # -- scheduler ---------------------------------------------------------------------------------
    def _report(self) -> FetchRequest:
        dps = self.dp_status
        return FetchRequest(
            node_id=self.me.node_id,
            boot=self.boot,
            role=self.role.value,
            read_q_tokens=dps.read_q_tokens,
            engines=tuple(self.core.engine_loads()),
            turns=tuple(self.core.turns),
            counters={
                **dps.counters,
                **self.core.counters,
                **self.counters,
                **{
                    f"{server.limits.kind}_port_{name}": value
                    for server in self._servers
                    for name, value in server.stats().items()
                },
                "errors": int(dps.counters.get("errors", 0)) + self.errors.count,
                "errors_transient": int(dps.counters.get("errors_transient", 0))
                + self.errors.transient,
                "dram_used_bytes": dps.dram_used_bytes,
                "engine_busy_s": [round(e.busy_s, 4) for e in self.core.loads],
                "last_errors": (self.errors.recent + list(dps.last_errors))[-5:],
                "last_transient_errors": (
                    self.errors.recent_transient + list(dps.last_transient_errors)
                )[-5:],
                "ledger": dps.ledger,
            },
        )

    async def _pull_loop(self) -> None:
        assert self.scheduler is not None
        failures = 0
        while True:
            try:
                reply = await self.scheduler.fetch(self._report())
                now = time.monotonic()
                for assigned in reply.assignments:
                    try:
                        self.core.assign(assigned.turn_assignment(), now)
                    except (AssignmentError, ValueError) as exc:
                        self._record_error(f"bad assignment from the scheduler: {exc}")
                for c in reply.cancel:
                    self.core.cancel(c.turn_id, c.reason, now)
                self._drive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the scheduler may not be up yet; keep pulling
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    self.log(f"fetch failed ({failures}x): {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
            else:
                failures = 0
            await asyncio.sleep(self.spec.pull_interval_s)

    def emit(self, turn_id: str, kind: str, **extra: Any) -> None:
        self._events.append((turn_id, kind, time.time(), extra))
        self._events_ready.set()
        if len(self._events) > MAX_EVENT_BACKLOG:
            self._bound_backlog()

    async def _event_flusher(self) -> None:
        assert self.scheduler is not None
        while True:
            await self._events_ready.wait()
            self._events_ready.clear()
            batch = self._events[:MAX_REPORT_EVENTS]
            if not batch:
                continue
            try:
                await self.scheduler.report(ReportRequest(tuple(TurnEvent(*e) for e in batch)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log(f"report failed, retrying: {exc!r}")
                self._bound_backlog()
                self._events_ready.set()
                await asyncio.sleep(0.2)
                continue
            del self._events[: len(batch)]
            if self._events:
                self._events_ready.set()

    def _bound_backlog(self) -> None:
        """While the scheduler is unreachable events wait; beyond MAX_EVENT_BACKLOG the oldest
        go (counted): their turns time out at the client and are retried."""
        excess = len(self._events) - MAX_EVENT_BACKLOG
        if excess > 0:
            del self._events[:excess]
            self.counters["events_dropped"] = int(self.counters.get("events_dropped", 0)) + excess

    # -- collectives -------------------------------------------------------------------------------
    async def _collective(self, key: tuple[str, int, int]) -> None:
        """One all-to-all burst to every other node of this role (highest class). A peer that
        does not answer is given up on for this burst: a dead peer must not stop this node."""
        start = time.perf_counter()
        results = await asyncio.gather(
            *(self._burst(p.node_id) for p in self.peers), return_exceptions=True
        )
        took = time.perf_counter() - start
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.counters["collective_failures"] = int(self.counters["collective_failures"]) + 1
        else:
            self.counters["collective_count"] = int(self.counters["collective_count"]) + 1
            self.counters["collective_latency_sum_s"] = (
                float(self.counters["collective_latency_sum_s"]) + took
            )
            self.counters["collective_latency_max_s"] = max(
                float(self.counters["collective_latency_max_s"]), took
            )
            self.collective_ms.append(round(took * 1000, 3))
            del self.collective_ms[:-MAX_STEP_RECORDS]
        self.core.on_collective_done(key, time.monotonic())
        self._drive()

    async def _burst(self, peer: str) -> None:
        lock = self._coll_locks.setdefault(peer, asyncio.Lock())
        async with lock:
            conn = self._coll_conns.get(peer)
            if conn is not None and (conn.is_closing() or conn.at_eof()):
                conn.abort()  # the peer closed it (restarted, or closed it idle): a new one
                conn = None
            try:
                if conn is None:
                    ep = self.spec.node(peer).collective
                    assert ep is not None
                    conn = await connect(
                        ep.host,
                        ep.port,
                        dscp=Dscp.COLLECTIVE,
                        timeout_s=self.spec.layer_timeout_s,
                        io_timeout_s=self.spec.layer_timeout_s,
                        max_payload_bytes=self.spec.max_frame_bytes,
                    )
                    self._coll_conns[peer] = conn
                await conn.send(to_frame(CollectiveBurst(), self._payload))
                await conn.recv_reply()
            except BaseException:
                dead = self._coll_conns.pop(peer, None)
                if dead is not None:
                    dead.abort()
                raise

    async def _on_collective(self, conn: FrameConnection, frame: Frame) -> None:
        if frame.kind != FrameKind.COLLECTIVE:
            raise ValueError(f"unexpected frame type {frame.kind!r} on the collective port")
        # The ack, and the TCP ACKs of the burst, go back in the collective class: in a kv
        # class they would wait behind KV traffic (DualPath §5).
        conn.mark(Dscp.COLLECTIVE)
        await conn.send(to_frame(CollectiveAck(n=len(frame.payload))))

    # -- management --------------------------------------------------------------------------------
    async def _on_mgmt(self, conn: FrameConnection, frame: Frame) -> None:
        """Management port: `stats` answers with this node's report (loads and counters) in the
        header, and its step history and health (large) msgpack-encoded in the payload."""
        if frame.kind != FrameKind.STATS:
            raise ValueError(f"unexpected frame type {frame.kind!r} on the management port")
        health = [self.health.snapshot()]
        dp_health = await self._data_plane_health()
        if dp_health is not None:
            health.append(dp_health)
        bulk = {
            "prefill_steps": [list(r) for r in self.steps],
            "collective_ms": list(self.collective_ms),
            "health": health,
        }
        payload = msgpack.packb(bulk, use_bin_type=True)
        await conn.send(Frame(FrameKind.STATS, msgspec.to_builtins(self._report()), payload))


def engine_node_spec(spec: ClusterSpec, node_id: str) -> NodeSpec:
    """`node_id`'s spec, checked to be an engine node with a cnic and a collective port."""
    me = spec.node(node_id)
    if me.role not in (Role.PREFILL, Role.DECODE):
        raise ValueError(f"{node_id} is a {me.role} node, not an engine node")
    if me.collective is None or me.cnic is None:
        raise ValueError(f"{node_id} has no cnic or collective endpoint")
    return me


def timeline_config(spec: ClusterSpec, me: NodeSpec, *, has_peers: bool) -> TimelineConfig:
    """The timeline of engine node `me` as the cluster spec sets it."""
    return TimelineConfig(
        node_id=me.node_id,
        role=me.role,
        num_gpus=me.num_gpus,
        layer_groups=spec.profile.layer_groups,
        block_tokens=spec.profile.block_tokens,
        time_dilation=spec.time_dilation,
        layerwise=spec.policy is not Policy.BASIC,
        compute_quota_s=spec.compute_quota_s,
        layer_timeout_s=spec.layer_timeout_s,
        gpu_kv_capacity_tokens=me.gpu_kv_capacity_tokens,
        collectives=has_peers and spec.collective_bytes_per_step > 0,
        cost=spec.profile.cost_model(),
    )


def _wall(monotonic_t: float) -> float:
    return time.time() - (time.monotonic() - monotonic_t)


async def engine_stats(spec: ClusterSpec, node_id: str) -> dict[str, Any]:
    """An engine node's full report from its management port: loads and counters, prefill step
    history, collective latencies and the health of its two processes (`health`: a list)."""
    ep = spec.node(node_id).mgmt
    conn = await connect(ep.host, ep.port, dscp=Dscp.CONTROL, io_timeout_s=spec.request_timeout_s)
    try:
        await conn.send(to_frame(StatsRequest()))
        reply = await conn.recv_reply()
    finally:
        await conn.close()
    if reply.kind != FrameKind.STATS:
        raise ValueError(f"{node_id} answered stats with {reply.kind!r}")
    out = dict(reply.header)
    if reply.payload:
        bulk = msgpack.unpackb(bytes(reply.payload), raw=False)
        if isinstance(bulk, dict):
            out.update(bulk)
    return out


async def serve_engine(
    spec: ClusterSpec, node_id: str, stop: asyncio.Event, *, spec_path: Path
) -> None:
    node = EngineNode(
        spec, node_id, spec_path=spec_path, log=lambda m: print(f"[{node_id}] {m}", flush=True)
    )
    await node.run(stop)


__all__ = ["EngineNode", "engine_stats", "serve_engine"]

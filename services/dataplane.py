"""An engine node's data plane: its own process, so byte handling never delays emulated GPU time.

It reads KV from storage through the node's snic, relays it and sends it to other nodes over
the cnic (DSCP kv class), verifies every KV frame it receives and persists new blocks; the
decisions are `DataPlaneCore`'s, the timeline process drives it over a socket pair
(services/ipc.py). It runs at a lower CPU priority than the timeline (DATA_PLANE_NICE), so on
a busy host the data plane slows down — which the run's health measures — instead of the GPUs.
Started by the timeline process (services/engine.py); it dies with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services import dataplane_core as dp
from services.assignment import TurnAssignment
from services.blocks import chunks, per_frame
from services.buffers import POOL
from services.codec import Frame, Payload
from services.engine_core import AssignKv, DropKv, Persist, PrefillDone, SendGroup
from services.health import HealthMonitor
from services.ipc import DpEvent, DpStatus, HealthReport, HealthRequest, IpcChannel, Stop
from services.kvblocks import KvCorruption, KvGenerator, SliceSet, crc
from services.limits import kv_limits_for
from services.process import data_plane_process, die_with_parent
from services.sockopts import Dscp
from services.spec import ClusterSpec, Policy, Role
from services.storage_client import StorageClient
from services.storage_protocol import read_chunk_blocks
from services.tasks import ErrorLog, TaskSet
from services.transport import ConnectionClosed, FrameConnection, connect
from services.transport_server import FrameServer, serve
from services.wire.frames import (
    BadMessage,
    FrameKind,
    KvDone,
    KvSlices,
    M,
    RelayGroupDone,
    RelaySlices,
    TurnFailed,
    parse,
    to_frame,
)

READ_CONCURRENCY = 2
"""Storage reads in flight per node; the rest wait in the node's read queue (FIFO)."""
MAX_LEDGER_KEYS = 4096
"""Ledger entries per data plane: peers and their incarnations are few; a bound all the same."""
KV_FRAME_BYTES = 4 << 20
"""Target payload of one kv/relay frame (at least one slice)."""
WARM_POOL_BYTES = 512 << 20
"""Receive buffers allocated and touched at start-up (at most the node's emulated DRAM buffer):
enough for a prefill node's read-ahead at snic 1 Gbit/s (measured peak ~450 MB held)."""
STATUS_INTERVAL_S = 0.05
COUNTERS_INTERVAL_S = 0.1
TICK_INTERVAL_S = 1.0
BIND_RETRY_S = 10.0
"""A restarted node's new data plane may find its port held by the old one for a moment."""


def _transient(exc: BaseException) -> bool:
    """A failure a retry can get past: a lost connection or peer, a timeout. Corrupt or missing
    KV is not (it would fail again, and must be reported)."""
    return isinstance(exc, OSError | TimeoutError | asyncio.IncompleteReadError | ConnectionClosed)


class DramBuffer:
    """The node's bounded DRAM buffer for KV in transit (bytes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int, timeout_s: float) -> int:
        """Reserve n bytes (at most the capacity: a turn larger than the buffer proceeds
        alone); TimeoutError when they do not free up within `timeout_s`."""
        n = min(n, self.capacity)
        async with asyncio.timeout(timeout_s), self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.capacity)
            self.used += n
        return n

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self.used -= n

        async def notify() -> None:
            async with self._cond:
                self._cond.notify_all()

        asyncio.get_running_loop().create_task(notify())


class DataPlane:
    def __init__(
        self,
        spec: ClusterSpec,
        node_id: str,
        channel: IpcChannel,
        *,
        boot: str = "",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.me = spec.node(node_id)
        if self.me.role not in (Role.PREFILL, Role.DECODE) or self.me.cnic is None:
            raise ValueError(f"{node_id} is a {self.me.role} node, not an engine node")
        self.role = self.me.role
        profile = spec.profile
        self.groups = profile.layer_groups
        self.block_tokens = profile.block_tokens
        self.gen = KvGenerator(profile.layer_group_bytes(0), self.groups)
        self.core = dp.DataPlaneCore(
            dp.DataPlaneConfig(
                node_id=node_id,
                role=self.role,
                layer_groups=self.groups,
                oracle=spec.policy is Policy.ORACLE,
                park_timeout_s=spec.request_timeout_s,
            )
        )
        self.channel = channel
        self.log = log or (lambda msg: None)
        self.health = HealthMonitor(node_id, "dataplane")
        self.dram = DramBuffer(self.me.dram_buffer_bytes)
        self.incarnation = f"{node_id}@{boot}"
        self.storage = StorageClient(spec, local_host=self.me.snic_host, client_id=self.incarnation)
        self.counters: dict[str, int] = {
            "bytes_storage_read": 0,
            "bytes_relay_sent": 0,
            "bytes_relay_received": 0,
            "bytes_pd_sent": 0,
            "bytes_pd_received": 0,
            "bytes_verified": 0,
            "bytes_written": 0,
            "errors": 0,
            "errors_transient": 0,
            "frames_discarded": 0,
        }
        self.ledger: dict[str, int] = {}
        """Bytes per peer, for the byte accounting across faults: `kv>NODE`/`relay>NODE` sent to
        a node, `kv<NODE@BOOT`/`relay<NODE@BOOT` verified from one incarnation of a node (the
        frame's `src`), `storage<NODE` verified from a storage server (lab/metrics.py)."""
        self.errors = ErrorLog(self.log)
        self.read_q_tokens = 0
        self._reads: deque[dp.StartRead] = deque()
        self._read_wake = asyncio.Event()
        self._chunks: dict[str, list[tuple[SliceSet, Payload]]] = {}
        self._reserved: dict[str, int] = {}
        self._peers: dict[tuple[str, Dscp], FrameConnection] = {}
        self._peer_locks: dict[tuple[str, Dscp], asyncio.Lock] = {}
        self._inbound: set[FrameConnection] = set()
        self._outq: dict[str, deque[dp.SendKv | dp.SendKvDone | dp.Relay]] = {}
        self._out_wake: dict[str, asyncio.Event] = {}
        self._sending_bytes = 0
        self._tasks = TaskSet()
        self._dirty = True
        self._server: FrameServer | None = None
        self._stop = asyncio.Event()
        self._max_slices = per_frame(spec.max_frame_bytes, self.gen.slice_bytes)
        # the timeline reports the read queue at every pull: fresher is not needed
        self._status_interval_s = min(STATUS_INTERVAL_S, spec.pull_interval_s)

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self) -> None:
        assert self.me.cnic is not None
        bb = self.spec.profile.block_bytes
        POOL.warm(
            [read_chunk_blocks(bb) * bb, KV_FRAME_BYTES + bb],
            min(self.me.dram_buffer_bytes, WARM_POOL_BYTES),
        )
        self._server = await self._listen()
        self.channel.send(self._status())  # listening: the timeline may start taking work
        self.health.gauge("recv_backlog_bytes", self._recv_backlog)
        self.health.gauge("send_backlog_bytes", self._send_backlog)
        self.health.gauge("read_queue_tokens", lambda: float(self.read_q_tokens))
        self.health.gauge("dram_used_bytes", lambda: float(self.dram.used))
        self.health.gauge("pool_free_bytes", lambda: float(POOL.free_bytes))
        self.health.gauge("pool_allocated", lambda: float(POOL.num_allocated))
        self.health.start()
        for _ in range(READ_CONCURRENCY):
            self._spawn(self._read_worker())
        self._spawn(self._status_loop())
        self._spawn(self._tick_loop())
        try:
            await self._ipc_loop()
        finally:
            await self._tasks.cancel_all()
            await self.health.stop()
            await self._server.close()
            for conn in list(self._peers.values()):
                await conn.close()
            await self.storage.close()
            await self.channel.close()

    async def _listen(self) -> FrameServer:
        assert self.me.cnic is not None
        deadline = time.monotonic() + BIND_RETRY_S
        while True:
            try:
                return await serve(
                    self.me.cnic.host,
                    self.me.cnic.port,
                    self._on_frame,
                    dscp=Dscp.KV,
                    limits=kv_limits_for(self.spec),
                    on_error=self._record_error,
                )
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro)

    def _record_error(self, msg: str, *, transient: bool = False) -> None:
        self.errors.record(msg, transient=transient)
        self.counters["errors"] = self.errors.count
        self.counters["errors_transient"] = self.errors.transient
        self._dirty = True

    def _count(self, key: str, nbytes: int) -> None:
        """Add to the ledger; a peer-chosen key beyond MAX_LEDGER_KEYS is pooled under `?`."""
        if key not in self.ledger and len(self.ledger) >= MAX_LEDGER_KEYS:
            key = key[: key.find("<") + 1] + "?"
        self.ledger[key] = self.ledger.get(key, 0) + nbytes

    # -- timeline channel -------------------------------------------------------------------------
    async def _ipc_loop(self) -> None:
        while True:
            try:
                msg = await self.channel.recv()
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the timeline is gone: so is this node
            now = time.monotonic()
            if isinstance(msg, AssignKv):
                self.core.assign(msg.assignment, now)
            elif isinstance(msg, SendGroup):
                self.core.send_group(msg.turn_id, msg.group)
            elif isinstance(msg, PrefillDone):
                self.core.prefill_done(msg.turn_id)
            elif isinstance(msg, Persist):
                self.core.persist(msg.turn_id)
            elif isinstance(msg, DropKv):
                self.core.drop(msg.turn_id, msg.reason, tell_peer=msg.tell_peer)
            elif isinstance(msg, HealthRequest):
                self.channel.send(HealthReport(msg.req, self.health.snapshot()))
            elif isinstance(msg, Stop):
                return
            self._run()

    def _port_counters(self) -> dict[str, int]:
        """The KV port's connections and what its limits refused or cut off (`kv_port_*`)."""
        if self._server is None:
            return {}
        return {f"kv_port_{k}": v for k, v in self._server.stats().items()}

    def _status(self) -> DpStatus:
        return DpStatus(
            read_q_tokens=self.read_q_tokens,
            dram_used_bytes=self.dram.used,
            counters={**self.counters, **self._port_counters()},
            last_errors=self.errors.recent[-5:],
            last_transient_errors=self.errors.recent_transient[-5:],
            ledger={
                **self.ledger,
                **{f"storage<{n}": b for n, b in self.storage.verified_from.items()},
            },
        )

    async def _status_loop(self) -> None:
        """The read queue goes to the timeline within STATUS_INTERVAL_S of a change (the
        scheduler balances on it); counters alone at most every COUNTERS_INTERVAL_S."""
        last_key: tuple[int, int, int] | None = None
        last_sent = 0.0
        while True:
            await asyncio.sleep(self._status_interval_s)
            key = (self.read_q_tokens, self.dram.used, self.counters["errors"])
            now = time.monotonic()
            if key != last_key or (self._dirty and now - last_sent >= COUNTERS_INTERVAL_S):
                self._dirty = False
                last_key, last_sent = key, now
                self.channel.send(self._status())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            self.core.tick(time.monotonic())
            self._run()

    def _event(self, turn_id: str, kind: str, **extra: Any) -> None:
        self.channel.send(DpEvent(turn_id, kind, time.time(), extra))

    # -- actions ----------------------------------------------------------------------------------
    def _run(self) -> None:
        for action in self.core.actions():
            if isinstance(action, dp.StartRead):
                self._reads.append(action)
                self.read_q_tokens += len(action.blocks) * self.block_tokens
                self._read_wake.set()
                self._dirty = True
            elif isinstance(action, dp.Relay | dp.SendKv | dp.SendKvDone):
                self._enqueue(action)
            elif isinstance(action, dp.Write):
                self._spawn(self._write(action))
            elif isinstance(action, dp.FreeBuffers):
                self._free(action.turn_id)
            elif isinstance(action, dp.TellPeer):
                self._spawn(self._tell_peer(action))
            elif isinstance(action, dp.Discarded):
                self.counters["frames_discarded"] += 1
                self._dirty = True
                if self.counters["frames_discarded"] in (1, 10, 100, 1000):
                    self.log(f"dropped a {action.kind} frame of {action.turn_id}: {action.why}")
            else:
                self.channel.send(action)

    def _free(self, turn_id: str) -> None:
        self._chunks.pop(turn_id, None)
        self.dram.release(self._reserved.pop(turn_id, 0))
        self._dirty = True

    def _fail(self, turn_id: str, what: str, exc: BaseException) -> None:
        self._record_error(
            f"{what} for {turn_id} on {self.me.node_id} failed: {exc!r}", transient=_transient(exc)
        )
        self.core.fail(
            turn_id, f"{what} on {self.me.node_id} failed: {exc!r}", retryable=_transient(exc)
        )
        self._run()

    # -- storage ----------------------------------------------------------------------------------
    async def _next_read(self) -> dp.StartRead:
        while not self._reads:
            self._read_wake.clear()
            await self._read_wake.wait()
        return self._reads.popleft()

    async def _read_worker(self) -> None:
        while True:
            job = await self._next_read()
            tokens = len(job.blocks) * self.block_tokens
            try:
                if job.turn_id in self.core.turns:
                    await self._read(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail(job.turn_id, "storage read", exc)
            finally:
                self.read_q_tokens -= tokens
                self._dirty = True

    async def _read(self, job: dp.StartRead) -> None:
        nbytes = len(job.blocks) * self.spec.profile.block_bytes
        reserved = await self.dram.acquire(nbytes, self.spec.request_timeout_s)
        if job.turn_id not in self.core.turns:  # dropped while waiting for DRAM
            self.dram.release(reserved)
            return
        self._reserved[job.turn_id] = self._reserved.get(job.turn_id, 0) + reserved
        # its turn in the node's read queue and a DRAM buffer: the read itself starts now
        self._event(job.turn_id, "read_started", node=self.me.node_id, blocks=len(job.blocks))
        chunks: list[tuple[SliceSet, Payload]] = []
        got = await self.storage.read(job.traj, job.blocks, lambda s, p: chunks.append((s, p)))
        self.counters["bytes_storage_read"] += got
        self.counters["bytes_verified"] += got
        self._dirty = True
        if job.turn_id not in self.core.turns:
            self._free(job.turn_id)
            return
        self._chunks[job.turn_id] = chunks
        self.core.on_read_done(job.turn_id)
        self._run()

    async def _write(self, job: dp.Write) -> None:
        try:
            written = await self.storage.write(job.traj, job.blocks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(job.turn_id, "persisting KV", exc)
            return
        self.counters["bytes_written"] += written  # not `+= await`: other tasks add meanwhile
        self._dirty = True
        self.core.on_written(job.turn_id)
        self._run()

    # -- KV to other nodes ------------------------------------------------------------------------
    def _group_frames(
        self, a: TurnAssignment, group: int, extra_blocks: range
    ) -> Iterator[tuple[SliceSet, memoryview]]:
        """Layer group `group` of the turn's own-read KV (regrouped from whole-block storage
        chunks) and then of `extra_blocks` (generated: the new tokens' KV), in frames of about
        KV_FRAME_BYTES, each assembled with one copy."""
        frame_slices = per_frame(KV_FRAME_BYTES, self.gen.slice_bytes)
        blocks: list[int] = []
        parts: list[npt.NDArray[np.uint8]] = []

        def frame() -> tuple[SliceSet, memoryview]:
            buf = POOL.get(len(blocks) * self.gen.slice_bytes)
            out = np.frombuffer(buf, dtype=np.uint8).reshape(len(blocks), self.gen.slice_bytes)
            np.concatenate(parts, out=out)
            return SliceSet(a.traj_id, tuple(blocks), group, group + 1), memoryview(buf)

        for s, chunk in self._chunks.get(a.turn_id, []):
            blocks.extend(s.blocks)
            parts.append(self.gen.group_view(s, chunk, group))
            if len(blocks) >= frame_slices:
                yield frame()
                blocks, parts = [], []
        for ids in chunks(extra_blocks, frame_slices):
            blocks.extend(ids)
            parts.append(self.gen.payload_array(SliceSet(a.traj_id, tuple(ids), group, group + 1)))
            if len(blocks) >= frame_slices:
                yield frame()
                blocks, parts = [], []
        if blocks:
            yield frame()

    async def _send_frames(
        self,
        node_id: str,
        message: type[KvSlices],
        turn_id: str,
        frames: Iterator[tuple[SliceSet, memoryview]],
    ) -> int:
        """Send KV frames (kv or relay); each frame counts (bytes_pd_sent or bytes_relay_sent)
        once sent, so the byte accounting holds even when a later frame fails."""
        kind = message.KIND
        key = "bytes_pd_sent" if kind is FrameKind.KV else "bytes_relay_sent"
        sent = 0
        for s, payload in frames:
            msg = message.of(turn_id, self.incarnation, s, crc(payload))
            nbytes = payload.nbytes
            self._sending_bytes += nbytes
            try:
                await self._send(node_id, to_frame(msg, payload))
            finally:
                self._sending_bytes -= nbytes
            sent += nbytes
            self.counters[key] += nbytes
            self._count(f"{kind}>{node_id}", nbytes)
            self._dirty = True
        return sent

    def _enqueue(self, job: dp.SendKv | dp.SendKvDone | dp.Relay) -> None:
        """KV goes to each peer through one queue and one sender task: frames are made right
        before they are sent, one at a time, so memory does not grow with the jobs waiting."""
        t = self.core.turns.get(job.turn_id)
        if t is None:
            return
        peer = t.a.peer(self.role)
        queue = self._outq.get(peer)
        if queue is None:
            queue = self._outq[peer] = deque()
            self._out_wake[peer] = asyncio.Event()
            self._spawn(self._sender(peer))
        queue.append(job)
        self._out_wake[peer].set()

    async def _sender(self, peer: str) -> None:
        queue, wake = self._outq[peer], self._out_wake[peer]
        while True:
            while not queue:
                wake.clear()
                await wake.wait()
            job = queue.popleft()
            t = self.core.turns.get(job.turn_id)
            if t is None:
                continue  # failed or dropped meanwhile
            try:
                if isinstance(job, dp.SendKv):
                    await self._send_kv(t.a, job.group)
                elif isinstance(job, dp.SendKvDone):
                    await self._send(peer, to_frame(KvDone(turn=job.turn_id)))
                else:
                    await self._relay(t.a)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail(job.turn_id, f"{_job_name(job)} to {peer}", exc)
                continue
            if job.turn_id not in self.core.turns:
                continue
            if isinstance(job, dp.SendKv):
                self.core.on_group_sent(job.turn_id, job.group)
            elif isinstance(job, dp.SendKvDone):
                self.core.on_kv_done_sent(job.turn_id)
            else:
                self.core.on_relayed(job.turn_id)
            self._run()

    async def _send_kv(self, a: TurnAssignment, group: int) -> None:
        """Layer group `group` of this turn's KV to its decode node: the hit KV this node read
        and the new tokens' KV (DualPath §4: the DE-read path returns only the new tokens)."""
        frames = self._group_frames(a, group, range(a.hit_blocks, a.prompt_blocks))
        await self._send_frames(a.decode_node, KvSlices, a.turn_id, frames)

    async def _relay(self, a: TurnAssignment) -> None:
        """DE read path: hit KV read through this node's snic goes to the PE per layer group."""
        for g in range(self.groups):
            frames = self._group_frames(a, g, range(0))
            await self._send_frames(a.prefill_node, RelaySlices, a.turn_id, frames)
            done = RelayGroupDone(turn=a.turn_id, group=g)
            await self._send(a.prefill_node, to_frame(done))
            if a.turn_id not in self.core.turns:
                return

    async def _tell_peer(self, action: dp.TellPeer) -> None:
        """Best effort: let the other node of the turn stop waiting for it."""
        with contextlib.suppress(Exception):
            failed = TurnFailed(turn=action.turn_id, reason=action.reason)
            await self._send(action.node_id, to_frame(failed), Dscp.CONTROL)

    async def _peer(self, node_id: str, dscp: Dscp) -> FrameConnection:
        key = (node_id, dscp)
        lock = self._peer_locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._peers.get(key)
            if conn is not None and (conn.is_closing() or conn.at_eof()):
                conn.abort()  # the peer closed it (restarted, or closed it idle): a new one
                conn = None
            if conn is None:
                ep = self.spec.node(node_id).cnic
                assert ep is not None
                conn = await connect(
                    ep.host,
                    ep.port,
                    dscp=dscp,
                    io_timeout_s=self.spec.request_timeout_s,
                    max_payload_bytes=self.spec.max_frame_bytes,
                )
                self._peers[key] = conn
            return conn

    async def _send(self, node_id: str, frame: Frame, dscp: Dscp = Dscp.KV) -> None:
        conn = await self._peer(node_id, dscp)
        try:
            await conn.send(frame)
        except BaseException:
            if self._peers.get((node_id, dscp)) is conn:
                del self._peers[(node_id, dscp)]
            conn.abort()
            raise

    # -- inbound frames ---------------------------------------------------------------------------
    async def _on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        """Every frame is handled without waiting on anything: a frame for a turn this node
        does not hold yet is parked by the core, never blocks the connection."""
        self._inbound.add(conn)
        now = time.monotonic()
        kind = frame.kind
        if kind in (FrameKind.KV, FrameKind.RELAY):
            self._on_kv(conn, frame, now)
        elif kind == FrameKind.RELAY_GROUP_DONE:
            done = _control(frame, RelayGroupDone)
            self.core.on_relay_group_done(done.turn, done.group, now)
        elif kind == FrameKind.KV_DONE:
            self.core.on_kv_done(_control(frame, KvDone).turn, now)
        elif kind == FrameKind.TURN_FAILED:
            failed = _control(frame, TurnFailed)
            self.core.on_peer_failed(failed.turn, failed.reason, now)
        else:
            raise ValueError(f"unexpected frame type {kind!r} on the KV port")
        self._run()

    def _on_kv(self, conn: FrameConnection, frame: Frame, now: float) -> None:
        """A kv or relay frame: verified whole before the core sees it; a frame that does not
        parse or verify fails its turn (corrupt KV), it is not answered."""
        message = KvSlices if frame.kind == FrameKind.KV else RelaySlices
        try:
            msg = parse(frame, message)
        except BadMessage as exc:
            turn = frame.header.get("turn")  # the turn it names, if any, fails
            turn_id = turn if isinstance(turn, str) else str(turn)
            self._corrupt(conn, frame.kind, turn_id, exc)
            return
        try:
            s = msg.slices(layer_groups=self.groups, max_slices=self._max_slices)
            got = self.gen.verify(s, frame.payload, msg.crc)
        except (KvCorruption, ValueError, TypeError) as exc:
            self._corrupt(conn, frame.kind, msg.turn, exc)
            return
        self.counters["bytes_verified"] += got
        key = "bytes_pd_received" if msg.KIND is FrameKind.KV else "bytes_relay_received"
        self.counters[key] += got
        src = msg.src if len(msg.src) <= 128 else "?"
        self._count(f"{msg.KIND}<{src}", got)
        self._dirty = True
        if msg.KIND is FrameKind.KV:
            self.core.on_kv(msg.turn, s, now)
        else:
            self.core.on_relay(msg.turn, s, now)

    def _corrupt(self, conn: FrameConnection, kind: str, turn_id: str, exc: Exception) -> None:
        self._record_error(f"{kind} for turn {turn_id} from {conn.peer}: {exc}")
        self.core.fail(turn_id, f"corrupt KV from peer: {exc}", retryable=False)

    # -- health gauges ----------------------------------------------------------------------------
    def _recv_backlog(self) -> float:
        total = 0
        for conn in list(self._inbound):
            if conn.is_closing():
                self._inbound.discard(conn)
            else:
                total += conn.unread_bytes()
        return float(total)

    def _send_backlog(self) -> float:
        total = self._sending_bytes
        for conn in list(self._peers.values()):
            total += conn.send_backlog_bytes()
        return float(total)


def _control(frame: Frame, cls: type[M]) -> M:
    """A control frame's message; one that does not parse is refused (ValueError, answered
    with an error frame by the transport), as an unexpected frame type is."""
    try:
        return parse(frame, cls)
    except BadMessage as exc:
        raise ValueError(str(exc)) from None


def _job_name(job: dp.SendKv | dp.SendKvDone | dp.Relay) -> str:
    if isinstance(job, dp.SendKv):
        return f"sending KV group {job.group}"
    return "kv_done" if isinstance(job, dp.SendKvDone) else "relay"


# -- process -------------------------------------------------------------------------------------


async def _main(spec: ClusterSpec, node_id: str, boot: str, fd: int) -> None:
    sock = socket.socket(fileno=fd)
    channel = await IpcChannel.open(sock)
    plane = DataPlane(
        spec, node_id, channel, boot=boot, log=lambda m: print(f"[{node_id}/dp] {m}", flush=True)
    )
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # the timeline stops it (Stop message); a signal from outside ends it too
        loop.add_signal_handler(sig, lambda: task.cancel() if task else None)
    with contextlib.suppress(asyncio.CancelledError):
        await plane.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.dataplane", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--ipc-fd", type=int, required=True)
    parser.add_argument(
        "--boot", default="", help="the node's incarnation (its timeline's boot id)"
    )
    args = parser.parse_args(argv)
    if not die_with_parent():  # the timeline died before prctl took effect
        return 1
    data_plane_process()
    spec = ClusterSpec.load(args.spec)
    import uvloop

    uvloop.run(_main(spec, args.node, args.boot, args.ipc_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())

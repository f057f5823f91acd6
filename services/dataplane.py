"""An engine node's data plane: its own process, so byte handling never delays emulated GPU time.

It reads KV from storage through the node's snic, relays it and sends it to other nodes over
the cnic (DSCP kv class), verifies every KV frame it receives and persists new blocks; the
decisions are `DataPlaneCore`'s, the timeline process drives it over a socket pair
(services/ipc.py). It runs at a lower CPU priority than the timeline (DATA_PLANE_NICE), so on
a busy host the data plane slows down — which the run's health measures — instead of the GPUs.
Started by the timeline process (services/engine.py); it dies with it.

This module is the process's shell: the timeline channel, the status it reports, the KV port
(every inbound frame verified before the core sees it) and the dispatch of the core's actions
to the parts that do them: services/kv_reads.py (the read queue, DRAM buffer, storage reads
and writes), services/kv_senders.py (connections to peers; KV, relay and control frames out),
services/dataplane_stats.py (counters, byte ledger, errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services import dataplane_core as dp
from services.blocks import per_frame
from services.buffers import POOL
from services.codec import Frame
from services.dataplane_stats import DataPlaneStats
from services.health import HealthMonitor
from services.ipc import DpEvent, DpStatus, HealthReport, HealthRequest, IpcChannel, Stop
from services.kv_reads import READ_CONCURRENCY, StorageIo
from services.kv_senders import KV_FRAME_BYTES, KvSenders, PeerLinks
from services.kvblocks import KvCorruption, KvGenerator
from services.limits import kv_limits_for
from services.process import data_plane_process, die_with_parent
from services.sockopts import Dscp
from services.spec import ClusterSpec, Policy, Role
from services.storage_client import StorageClient
from services.storage_protocol import read_chunk_blocks
from services.tasks import TaskSet
from services.timeline import AssignKv, DropKv, Persist, PrefillDone, SendGroup
from services.transport import ConnectionClosed, FrameConnection
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
)

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


class DataPlane:
    """The data-plane process of one engine node, thin over `DataPlaneCore`."""

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
        self.groups = spec.profile.layer_groups
        self.gen = KvGenerator(spec.profile.layer_group_bytes(0), self.groups)
        self.core = dp.DataPlaneCore(data_plane_config(spec, node_id))
        self.channel = channel
        self.log = log or (lambda msg: None)
        self.health = HealthMonitor(node_id, "dataplane")
        self.stats = DataPlaneStats(self.log)
        self.counters = self.stats.counters
        self.incarnation = f"{node_id}@{boot}"
        self.storage = StorageClient(spec, local_host=self.me.snic_host, client_id=self.incarnation)
        self._tasks = TaskSet()
        self.reads, self.links, self.senders = self._parts()
        self._inbound: set[FrameConnection] = set()
        self._server: FrameServer | None = None
        self._max_slices = per_frame(spec.max_frame_bytes, self.gen.slice_bytes)
        # the timeline reports the read queue at every pull: fresher is not needed
        self._status_interval_s = min(STATUS_INTERVAL_S, spec.pull_interval_s)

    def _parts(self) -> tuple[StorageIo, PeerLinks, KvSenders]:
        """The storage side, the peer connections and the KV senders, all feeding the core."""
        reads = StorageIo(
            self.spec,
            self.core,
            self.storage,
            self.stats,
            dram_bytes=self.me.dram_buffer_bytes,
            after=self._run,
            fail=self._fail,
            event=self._event,
        )
        links = PeerLinks(self.spec)
        senders = KvSenders(
            self.core,
            links,
            self.gen,
            reads.chunks,
            self.stats,
            incarnation=self.incarnation,
            after=self._run,
            fail=self._fail,
            spawn=self._tasks.spawn,
        )
        return reads, links, senders

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
        self.health.gauge("read_queue_tokens", lambda: float(self.reads.read_q_tokens))
        self.health.gauge("dram_used_bytes", lambda: float(self.reads.dram.used))
        self.health.gauge("pool_free_bytes", lambda: float(POOL.free_bytes))
        self.health.gauge("pool_allocated", lambda: float(POOL.num_allocated))
        self.health.start()
        for _ in range(READ_CONCURRENCY):
            self._tasks.spawn(self.reads.read_worker())
        self._tasks.spawn(self._status_loop())
        self._tasks.spawn(self._tick_loop())
        try:
            await self._ipc_loop()
        finally:
            await self._tasks.cancel_all()
            await self.health.stop()
            await self._server.close()
            await self.links.close()
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
                    on_error=self.stats.record_error,
                )
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

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
            read_q_tokens=self.reads.read_q_tokens,
            dram_used_bytes=self.reads.dram.used,
            counters={**self.counters, **self._port_counters()},
            last_errors=self.stats.errors.recent[-5:],
            last_transient_errors=self.stats.errors.recent_transient[-5:],
            ledger={
                **self.stats.ledger,
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
            key = (self.reads.read_q_tokens, self.reads.dram.used, self.counters["errors"])
            now = time.monotonic()
            if key != last_key or (self.stats.dirty and now - last_sent >= COUNTERS_INTERVAL_S):
                self.stats.dirty = False
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
                self.reads.enqueue(action)
            elif isinstance(action, dp.Relay | dp.SendKv | dp.SendKvDone):
                self.senders.enqueue(action)
            elif isinstance(action, dp.Write):
                self._tasks.spawn(self.reads.write(action))
            elif isinstance(action, dp.FreeBuffers):
                self.reads.free(action.turn_id)
            elif isinstance(action, dp.TellPeer):
                self._tasks.spawn(self.senders.tell_peer(action))
            elif isinstance(action, dp.Discarded):
                self.counters["frames_discarded"] += 1
                self.stats.dirty = True
                if self.counters["frames_discarded"] in (1, 10, 100, 1000):
                    self.log(f"dropped a {action.kind} frame of {action.turn_id}: {action.why}")
            else:
                self.channel.send(action)

    def _fail(self, turn_id: str, what: str, exc: BaseException) -> None:
        self.stats.record_error(
            f"{what} for {turn_id} on {self.me.node_id} failed: {exc!r}", transient=_transient(exc)
        )
        self.core.fail(
            turn_id, f"{what} on {self.me.node_id} failed: {exc!r}", retryable=_transient(exc)
        )
        self._run()

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
        self.stats.count(f"{msg.KIND}<{src}", got)
        self.stats.dirty = True
        if msg.KIND is FrameKind.KV:
            self.core.on_kv(msg.turn, s, now)
        else:
            self.core.on_relay(msg.turn, s, now)

    def _corrupt(self, conn: FrameConnection, kind: str, turn_id: str, exc: Exception) -> None:
        self.stats.record_error(f"{kind} for turn {turn_id} from {conn.peer}: {exc}")
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
        return float(self.senders.sending_bytes + self.links.backlog_bytes())


def _control(frame: Frame, cls: type[M]) -> M:
    """A control frame's message; one that does not parse is refused (ValueError, answered
    with an error frame by the transport), as an unexpected frame type is."""
    try:
        return parse(frame, cls)
    except BadMessage as exc:
        raise ValueError(str(exc)) from None


def data_plane_config(spec: ClusterSpec, node_id: str) -> dp.DataPlaneConfig:
    """The data plane of engine node `node_id` as the cluster spec sets it."""
    return dp.DataPlaneConfig(
        node_id=node_id,
        role=spec.node(node_id).role,
        layer_groups=spec.profile.layer_groups,
        oracle=spec.policy is Policy.ORACLE,
        park_timeout_s=spec.request_timeout_s,
    )


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

"""A data plane's way out: its connections to other nodes' KV ports and its KV senders.

`PeerLinks` keeps one connection per (node, DSCP class) over the cnic. `KvSenders` sends KV to
each peer through one queue and one task: a prefill node's layer groups and `kv_done` to the
decode node, a decode node's relayed hit KV to the prefill node, each frame assembled right
before it is sent from the chunks the storage side read (services/kv_reads.py). The decisions
are `DataPlaneCore`'s; services/dataplane.py hands this part its actions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from services import dataplane_core as dp
from services.assignment import TurnAssignment
from services.blocks import chunks, per_frame
from services.buffers import POOL
from services.codec import Frame
from services.dataplane_stats import DataPlaneStats
from services.kv_reads import Chunks
from services.kvblocks import KvGenerator, SliceSet, crc
from services.sockopts import Dscp
from services.spec import ClusterSpec, Role
from services.transport import FrameConnection, connect
from services.wire.frames import (
    FrameKind,
    KvDone,
    KvSlices,
    RelayGroupDone,
    RelaySlices,
    TurnFailed,
    to_frame,
)

KV_FRAME_BYTES = 4 << 20
"""Target payload of one kv/relay frame (at least one slice)."""

SendJob = dp.SendKv | dp.SendKvDone | dp.Relay


class PeerLinks:
    """Connections to other nodes' KV ports, one per (node, DSCP class), made when first used
    and again when the peer closed one."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self._peers: dict[tuple[str, Dscp], FrameConnection] = {}
        self._peer_locks: dict[tuple[str, Dscp], asyncio.Lock] = {}

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

    async def send(self, node_id: str, frame: Frame, dscp: Dscp = Dscp.KV) -> None:
        conn = await self._peer(node_id, dscp)
        try:
            await conn.send(frame)
        except BaseException:
            if self._peers.get((node_id, dscp)) is conn:
                del self._peers[(node_id, dscp)]
            conn.abort()
            raise

    def backlog_bytes(self) -> int:
        """Bytes written to the connections and not yet taken by the kernel."""
        return sum(conn.send_backlog_bytes() for conn in list(self._peers.values()))

    async def close(self) -> None:
        for conn in list(self._peers.values()):
            await conn.close()


class KvSenders:
    """One queue and one sender task per peer node; frames are made right before they are
    sent, one at a time, so memory does not grow with the jobs waiting.

    `after()` runs the core's new actions once this part fed it; `fail(turn_id, what, exc)`
    fails a turn; `spawn(coro)` starts a task the data plane owns."""

    def __init__(
        self,
        core: dp.DataPlaneCore,
        links: PeerLinks,
        gen: KvGenerator,
        read: dict[str, Chunks],
        stats: DataPlaneStats,
        *,
        incarnation: str,
        after: Callable[[], None],
        fail: Callable[[str, str, BaseException], None],
        spawn: Callable[[Any], asyncio.Task[Any]],
    ) -> None:
        self.core = core
        self.links = links
        self.gen = gen
        self.role: Role = core.cfg.role
        self.groups = core.cfg.layer_groups
        self.incarnation = incarnation
        self.stats = stats
        self.sending_bytes = 0
        """Payload bytes of the frames being sent right now."""
        self._read = read
        self._outq: dict[str, deque[SendJob]] = {}
        self._out_wake: dict[str, asyncio.Event] = {}
        self._after = after
        self._fail = fail
        self._spawn = spawn

    def enqueue(self, job: SendJob) -> None:
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
                    await self.links.send(peer, to_frame(KvDone(turn=job.turn_id)))
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
            self._after()

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
            await self.links.send(a.prefill_node, to_frame(done))
            if a.turn_id not in self.core.turns:
                return

    def _group_frames(
        self, a: TurnAssignment, group: int, extra_blocks: range
    ) -> Iterator[tuple[SliceSet, memoryview]]:
        """Layer group `group` of the turn's own-read KV (regrouped from whole-block storage
        chunks) and then of `extra_blocks` (generated: the new tokens' KV), in frames of about
        KV_FRAME_BYTES, each assembled with one copy. A frame holds blocks of one trajectory:
        a content-addressed prefix read from several is cut where it changes."""
        frame_slices = per_frame(KV_FRAME_BYTES, self.gen.slice_bytes)
        blocks: list[int] = []
        parts: list[npt.NDArray[np.uint8]] = []
        traj = a.traj_id

        def frame() -> tuple[SliceSet, memoryview]:
            buf = POOL.get(len(blocks) * self.gen.slice_bytes)
            out = np.frombuffer(buf, dtype=np.uint8).reshape(len(blocks), self.gen.slice_bytes)
            np.concatenate(parts, out=out)
            return SliceSet(traj, tuple(blocks), group, group + 1), memoryview(buf)

        for s, chunk in self._read.get(a.turn_id, []):
            if blocks and s.traj != traj:
                yield frame()
                blocks, parts = [], []
            traj = s.traj
            blocks.extend(s.blocks)
            parts.append(self.gen.group_view(s, chunk, group))
            if len(blocks) >= frame_slices:
                yield frame()
                blocks, parts = [], []
        if blocks and traj != a.traj_id:
            yield frame()
            blocks, parts = [], []
        traj = a.traj_id
        for ids in chunks(extra_blocks, frame_slices):
            blocks.extend(ids)
            parts.append(self.gen.payload_array(SliceSet(traj, tuple(ids), group, group + 1)))
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
            self.sending_bytes += nbytes
            try:
                await self.links.send(node_id, to_frame(msg, payload))
            finally:
                self.sending_bytes -= nbytes
            sent += nbytes
            self.stats.counters[key] += nbytes
            self.stats.count(f"{kind}>{node_id}", nbytes)
            self.stats.dirty = True
        return sent

    async def tell_peer(self, action: dp.TellPeer) -> None:
        """Best effort: let the other node of the turn stop waiting for it."""
        with contextlib.suppress(Exception):
            failed = TurnFailed(turn=action.turn_id, reason=action.reason)
            await self.links.send(action.node_id, to_frame(failed), Dscp.CONTROL)


def _job_name(job: SendJob) -> str:
    if isinstance(job, dp.SendKv):
        return f"sending KV group {job.group}"
    return "kv_done" if isinstance(job, dp.SendKvDone) else "relay"

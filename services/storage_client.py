"""Storage client of the engine nodes: striped reads and writes of Full Blocks, pooled connections.

Every chunk read is checked (the blocks asked for, in order, then KvGenerator.verify of the whole
frame against its derived crc) before the caller sees it. It does not decide what to read or
when (engines and the scheduler do), and it never retries: a connection that saw an error is
closed and the error goes to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import msgpack
import msgspec

from dualpath.errors import DualPathError
from services.blocks import chunks, describe, per_frame
from services.codec import Frame, Payload
from services.kvblocks import KvCorruption, KvGenerator, SliceSet, crc
from services.sockopts import Dscp
from services.spec import ClusterSpec, Endpoint, NodeSpec
from services.transport import FrameConnection, connect
from services.wire.frames import (
    BadMessage,
    BlocksChunk,
    FrameKind,
    Health,
    M,
    ReadDone,
    ReadRequest,
    SeedDone,
    SeedRequest,
    StatsRequest,
    StorageStats,
    WriteDone,
    WriteRequest,
    parse,
    to_frame,
)

WRITE_CHUNK_BYTES = 1 << 20
"""Target payload of one `write` frame (whole blocks, so at least one block)."""

T = TypeVar("T")
OnChunk = Callable[[SliceSet, Payload], None]
"""Gets each verified chunk of a read: whole blocks (g0=0, g1=G) and their bytes. Synchronous:
it must not block; it runs between two frames of the connection."""


class StorageClientError(DualPathError):
    """Base of the client's own errors (transport and KV errors are raised as they are)."""


class StorageProtocolError(StorageClientError):
    """A server answered with a frame the protocol does not allow here."""


class StorageClientClosed(StorageClientError):
    """The client was closed."""


class ConnectionPool:
    """Connections to one endpoint: idle ones are reused, at most `max_conns` in use at once,
    and one that saw any error (or was cancelled mid-request) is closed, not returned."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        dscp: Dscp,
        local_host: str | None,
        max_conns: int,
        timeout_s: float,
        max_payload_bytes: int,
    ) -> None:
        if max_conns < 1:
            raise ValueError(f"max_conns must be >= 1, got {max_conns}")
        self.endpoint = endpoint
        self._dscp = dscp
        self._local_host = local_host
        self._timeout_s = timeout_s
        self._max_payload = max_payload_bytes
        self._slots = asyncio.Semaphore(max_conns)
        self._idle: list[FrameConnection] = []
        self._closed = False

    def _take_idle(self) -> FrameConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if not (conn.at_eof() or conn.is_closing()):
                return conn
            conn.abort()  # the server closed it while it was idle
        return None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[FrameConnection]:
        if self._closed:
            raise StorageClientClosed(f"pool to {self.endpoint.host}:{self.endpoint.port}")
        async with self._slots:
            conn = self._take_idle() or await connect(
                self.endpoint.host,
                self.endpoint.port,
                dscp=self._dscp,
                local_host=self._local_host,
                timeout_s=self._timeout_s,
                io_timeout_s=self._timeout_s,
                max_payload_bytes=self._max_payload,
            )
            try:
                yield conn
            except BaseException:
                # Mid-request: unread replies may follow, so the connection is unusable.
                conn.abort()
                raise
            if self._closed or conn.is_closing():
                conn.abort()
            else:
                self._idle.append(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


async def _all_or_first_error(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; raise the first failure as is once every one has ended. The others
    are let finish (each is bounded by the connection's timeout) rather than cancelled: a
    read abandoned mid-stream leaves bytes its server sent that nobody verifies, which the
    per-peer byte accounting would rightly call lost."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks)
    finally:
        for t in tasks:  # only when this call itself is cancelled
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        exc = t.exception()
        if exc is not None:
            raise exc
    return [t.result() for t in tasks]


def _reply(frame: Frame, cls: type[M], req: int) -> M:
    """The reply `frame` carries, which must be a `cls` for request `req`."""
    if frame.kind != cls.KIND:
        raise StorageProtocolError(f"expected {cls.KIND!r} for req {req}, got {frame.kind!r}")
    try:
        reply = parse(frame, cls)
    except BadMessage as exc:
        raise StorageProtocolError(str(exc)) from None
    got = getattr(reply, "req", None)
    if got != req:
        raise StorageProtocolError(f"{cls.KIND!r} for req {got!r}, sent {req}")
    return reply


class StorageClient:
    """What an engine node uses to read and persist KV blocks (and to seed/inspect servers)."""

    def __init__(
        self,
        spec: ClusterSpec,
        *,
        local_host: str | None = None,
        max_conns_per_server: int = 4,
        client_id: str | None = None,
    ) -> None:
        if not spec.storage_nodes:
            raise ValueError("the cluster has no storage servers")
        if max_conns_per_server < 1:
            raise ValueError(f"max_conns_per_server must be >= 1, got {max_conns_per_server}")
        self.spec = spec
        self.local_host = local_host
        self.max_conns_per_server = max_conns_per_server
        profile = spec.profile
        self._gen = KvGenerator(
            slice_bytes=profile.layer_group_bytes(0), layer_groups=profile.layer_groups
        )
        self._block_bytes = profile.block_bytes
        self._max_slices = per_frame(spec.max_frame_bytes, self._gen.slice_bytes)
        self._write_blocks_per_frame = per_frame(
            min(WRITE_CHUNK_BYTES, spec.max_frame_bytes), self._block_bytes
        )
        self._data_pools: dict[str, ConnectionPool] = {}
        self._mgmt_pools: dict[str, ConnectionPool] = {}
        self._req_ids = itertools.count(1)
        self._closed = False
        self.bytes_read = 0
        """Payload bytes received by reads (verified or not)."""
        self.bytes_written = 0
        """Payload bytes whose write the servers acknowledged."""
        self.bytes_verified = 0
        """Payload bytes of reads that passed verification."""
        self.client_id = client_id
        """Sent with every read (`node@boot`): servers count the bytes they send per client."""
        self.verified_from: dict[str, int] = {}
        """Verified read bytes per storage server."""

    # -- pools ------------------------------------------------------------------------------

    def _pool(self, node: NodeSpec, *, mgmt: bool) -> ConnectionPool:
        if self._closed:
            raise StorageClientClosed("the storage client is closed")
        pools = self._mgmt_pools if mgmt else self._data_pools
        pool = pools.get(node.node_id)
        if pool is None:
            endpoint = node.mgmt if mgmt else node.storage
            if endpoint is None:
                raise ValueError(f"{node.node_id} has no storage endpoint")
            pool = ConnectionPool(
                endpoint,
                # Data goes over the snic: the storage network carries only storage traffic.
                # Management goes over the (unshaped) mgmt network, so it is not bound to the snic.
                dscp=Dscp.CONTROL if mgmt else Dscp.BEST_EFFORT,
                local_host=None if mgmt else self.local_host,
                max_conns=self.max_conns_per_server,
                timeout_s=self.spec.request_timeout_s,
                max_payload_bytes=self.spec.max_frame_bytes,
            )
            pools[node.node_id] = pool
        return pool

    def _stripe(self, traj: int, blocks: Sequence[int]) -> dict[str, list[int]]:
        """Blocks per owning server, each list in request order."""
        by_node: dict[str, list[int]] = {}
        for b in blocks:
            by_node.setdefault(self.spec.storage_server_for(traj, b).node_id, []).append(b)
        return by_node

    # -- reads ------------------------------------------------------------------------------

    async def read(self, traj: int, blocks: Sequence[int], on_chunk: OnChunk | None = None) -> int:
        """Read blocks from their servers concurrently; return the verified bytes.

        `on_chunk(slices, payload)` gets each verified chunk: in order per server, chunks of
        different servers interleave. Raises KvCorruption, RemoteError (e.g. code "missing"),
        ConnectionClosed, TimeoutError or StorageProtocolError.
        """
        by_node = self._stripe(traj, blocks)
        coros = [
            self._read_from(self.spec.node(node_id), traj, tuple(node_blocks), on_chunk)
            for node_id, node_blocks in by_node.items()
        ]
        return sum(await _all_or_first_error(coros)) if coros else 0

    async def _read_from(
        self, node: NodeSpec, traj: int, blocks: tuple[int, ...], on_chunk: OnChunk | None
    ) -> int:
        req = next(self._req_ids)
        groups = self._gen.layer_groups
        verified = 0
        pos = 0  # blocks[pos] is the next block the server must send
        async with self._pool(node, mgmt=False).connection() as conn:
            ask = ReadRequest(req=req, traj=traj, blocks=blocks, client=self.client_id or "?")
            await conn.send(to_frame(ask))
            while True:
                frame = await conn.recv_reply()
                if frame.kind == FrameKind.READ_DONE:
                    done = _reply(frame, ReadDone, req)
                    num_blocks, num_bytes = done.num_blocks, done.num_bytes
                    if pos != len(blocks) or num_blocks != len(blocks) or num_bytes != verified:
                        raise StorageProtocolError(
                            f"{node.node_id} read_done of {num_blocks} blocks/{num_bytes} bytes "
                            f"after {pos} of {len(blocks)} blocks/{verified} bytes"
                        )
                    return verified
                chunk = _reply(frame, BlocksChunk, req)
                try:
                    s = chunk.slices(layer_groups=groups, max_slices=self._max_slices)
                except BadMessage as exc:
                    raise StorageProtocolError(f"{node.node_id} blocks frame: {exc}") from None
                if s.traj != traj:
                    raise StorageProtocolError(f"blocks of traj {s.traj}, read traj {traj}")
                payload = frame.payload
                self.bytes_read += len(payload)
                want = blocks[pos : pos + len(s.blocks)]
                if not s.blocks or s.blocks != want or (s.g0, s.g1) != (0, groups):
                    raise KvCorruption(
                        f"traj {traj}: {node.node_id} sent blocks {describe(s.blocks)} groups "
                        f"[{s.g0}, {s.g1}), expected {describe(want or blocks[pos : pos + 1])} "
                        f"groups [0, {groups}) (whole blocks in request order)"
                    )
                verified += self._gen.verify(s, payload, chunk.crc)
                self.bytes_verified += len(payload)
                self.verified_from[node.node_id] = self.verified_from.get(node.node_id, 0) + len(
                    payload
                )
                pos += len(s.blocks)
                if on_chunk is not None:
                    on_chunk(s, payload)

    # -- writes -----------------------------------------------------------------------------

    async def write(self, traj: int, blocks: Sequence[int]) -> int:
        """Generate Full Blocks and persist each on its server; return the acknowledged bytes."""
        coros = [
            self._write_to(self.spec.node(node_id), traj, node_blocks)
            for node_id, node_blocks in self._stripe(traj, blocks).items()
        ]
        return sum(await _all_or_first_error(coros)) if coros else 0

    async def _write_to(self, node: NodeSpec, traj: int, blocks: list[int]) -> int:
        groups = self._gen.layer_groups
        per_chunk = self._write_blocks_per_frame
        written = 0
        async with self._pool(node, mgmt=False).connection() as conn:
            for ids in chunks(blocks, per_chunk):
                s = SliceSet(traj, tuple(ids), 0, groups)
                payload = self._gen.payload(s)
                req = next(self._req_ids)
                ask = WriteRequest.of(req, s, crc(payload), auth=self.spec.secret)
                await conn.send(to_frame(ask, payload))
                done = _reply(await conn.recv_reply(), WriteDone, req)
                if done.num_bytes != len(payload):
                    raise StorageProtocolError(
                        f"{node.node_id} acknowledged {done.num_bytes} of {len(payload)} bytes"
                    )
                written += len(payload)
                self.bytes_written += len(payload)
        return written

    # -- management -------------------------------------------------------------------------

    async def seed(self, traj: int, first_block: int, end_block: int) -> int:
        """Have the servers write blocks [first_block, end_block) of `traj` themselves (warm
        cache, outside the measured run); return the bytes seeded, like read() and write()."""
        if not 0 <= first_block <= end_block:
            raise ValueError(f"bad seed range [{first_block}, {end_block})")
        period = len(self.spec.storage_nodes)
        owners = {
            self.spec.storage_server_for(traj, b).node_id
            for b in range(first_block, min(end_block, first_block + period))
        }
        coros = [
            self._seed_on(self.spec.node(node_id), traj, first_block, end_block)
            for node_id in sorted(owners)
        ]
        replies = await _all_or_first_error(coros) if coros else []
        num_blocks = sum(n for n, _ in replies)
        num_bytes = sum(b for _, b in replies)
        if num_blocks != end_block - first_block or num_bytes != num_blocks * self._block_bytes:
            raise StorageProtocolError(
                f"servers seeded {num_blocks} blocks ({num_bytes} bytes) "
                f"of [{first_block}, {end_block})"
            )
        return num_bytes

    async def _seed_on(self, node: NodeSpec, traj: int, first: int, end: int) -> tuple[int, int]:
        req = next(self._req_ids)
        ask = SeedRequest(
            req=req, traj=traj, first_block=first, end_block=end, auth=self.spec.secret
        )
        async with self._pool(node, mgmt=True).connection() as conn:
            await conn.send(to_frame(ask))
            reply = await conn.recv_reply()
        done = _reply(reply, SeedDone, req)
        return done.num_blocks, done.num_bytes

    async def stats(self, node_id: str) -> dict[str, Any]:
        """A storage server's counters (read queue, bytes, blocks stored, errors), its `boot`
        (incarnation), `read_by` (bytes sent per client incarnation) and `transport` (its
        ports' connections and limit counters)."""
        req = next(self._req_ids)
        async with self._pool(self.spec.node(node_id), mgmt=True).connection() as conn:
            await conn.send(to_frame(StatsRequest(req=req)))
            reply = await conn.recv_reply()
        out: dict[str, Any] = msgspec.structs.asdict(_reply(reply, StorageStats, req))
        del out["req"]
        return out

    async def health(self, node_id: str) -> dict[str, Any]:
        """A storage server's HealthMonitor snapshot (services.health), from the reply's
        msgpack payload (its series can outgrow a frame header)."""
        req = next(self._req_ids)
        async with self._pool(self.spec.node(node_id), mgmt=True).connection() as conn:
            await conn.send(to_frame(Health(req=req)))
            reply = await conn.recv_reply()
        _reply(reply, Health, req)
        try:
            snapshot = msgpack.unpackb(reply.payload, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise StorageProtocolError(f"{node_id} health payload: {exc}") from None
        if not isinstance(snapshot, dict):
            raise StorageProtocolError(f"{node_id} health payload is a {type(snapshot).__name__}")
        return snapshot

    async def close(self) -> None:
        """Close idle connections; ones in use are closed when their request ends."""
        self._closed = True
        for pool in (*self._data_pools.values(), *self._mgmt_pools.values()):
            await pool.close()

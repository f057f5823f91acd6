"""Storage server: persists Full Blocks of KV per trajectory and streams them back to engines.

Speaks the storage protocol (v2) of docs/design.md (read/write on the storage endpoint,
stats/seed/health on the mgmt endpoint), in the typed messages of services/wire/frames.py.
It verifies every write frame before persisting it and never vouches for its own disk: a read
frame's crc is computed from the bytes read back. It does no scheduling, and it removes only
the files it created. This module is the server: its ports, dispatch, handlers and counters;
the request checks and error codes are services/storage_protocol.py (pure), the files on disk
services/storage_files.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import msgspec

from services.auth import FRAME_AUTH_FIELD, frame_presents
from services.blocks import chunks, per_frame
from services.codec import Frame
from services.health import HealthMonitor
from services.kvblocks import KvCorruption, KvGenerator, SliceSet, crc
from services.limits import MGMT_PORT_LIMITS, PortLimits, kv_limits_for
from services.sockopts import Dscp
from services.spec import ClusterSpec, NodeSpec, Role
from services.storage_files import (
    CATALOG_NAME,
    TrajectoryFiles,
    catalog_record,
    read_blocks,
    read_catalog,
    write_blocks,
)
from services.storage_protocol import (
    MUTATING_KINDS,
    MissingBlocks,
    ServerClosing,
    StorageError,
    Unauthorized,
    UnsupportedMessage,
    parse_request,
    read_chunk_blocks,
    seed_range,
    write_slices,
)
from services.transport import FrameConnection
from services.transport_server import FrameServer, Handler, serve
from services.wire.frames import (
    BlocksChunk,
    ErrorReply,
    FrameKind,
    Health,
    ReadDone,
    ReadRequest,
    SeedDone,
    SeedRequest,
    StatsRequest,
    StorageStats,
    WriteDone,
    WriteRequest,
    to_frame,
)

SEED_CHUNK_BYTES = 4 << 20
"""Seeding generates and writes this much at a time."""
INLINE_IO_BYTES = 256 << 10
"""Disk I/O up to this size runs on the event loop (page-cache speed); larger goes to a thread."""
MAX_CLIENTS = 1024
"""Clients counted apart in `read_by`; the rest are pooled under `?`."""

T = TypeVar("T")


def storage_node(spec: ClusterSpec, node_id: str) -> NodeSpec:
    """`node_id`'s spec; ValueError unless it is a storage server whose block fits a frame."""
    node = spec.node(node_id)
    if node.role != Role.STORAGE or node.storage is None:
        raise ValueError(f"{node_id} is not a storage server (role {node.role})")
    block_bytes = spec.profile.block_bytes
    if block_bytes > spec.max_frame_bytes:
        raise ValueError(
            f"a block of {block_bytes} bytes does not fit a frame of "
            f"{spec.max_frame_bytes} (max_frame_bytes)"
        )
    return node


class StorageServer:
    """The storage node: block service on `NodeSpec.storage`, stats/seed on `NodeSpec.mgmt`."""

    def __init__(
        self,
        spec: ClusterSpec,
        node_id: str,
        *,
        log: Callable[[str], None] | None = None,
        kv_limits: PortLimits | None = None,
        mgmt_limits: PortLimits = MGMT_PORT_LIMITS,
    ) -> None:
        """`kv_limits`/`mgmt_limits`: the data and management ports' (services.limits);
        the data port's default follows the spec (kv_limits_for)."""
        self.spec = spec
        self.node = storage_node(spec, node_id)
        self.node_id = node_id
        self.block_bytes = spec.profile.block_bytes
        self._log = log
        self._kv_limits = kv_limits or kv_limits_for(spec)
        self._mgmt_limits = mgmt_limits
        self._gen = KvGenerator(
            slice_bytes=spec.profile.layer_group_bytes(0), layer_groups=spec.profile.layer_groups
        )
        self._blocks_per_chunk = read_chunk_blocks(self.block_bytes)
        self._max_slices = per_frame(spec.max_frame_bytes, self._gen.slice_bytes)
        self._init_disk(Path(spec.data_dir))
        self._servers: list[FrameServer] = []
        self._executor: ThreadPoolExecutor | None = None
        self._conns: weakref.WeakSet[FrameConnection] = weakref.WeakSet()
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._closing = False
        self._started = False
        self._init_counters()
        self.health = HealthMonitor(node_id, "storage")
        self.health.gauge("read_queue_bytes", lambda: float(self._rq_bytes))

    def _init_disk(self, root: Path) -> None:
        """Where this server's files go; nothing is created before start()."""
        self._root = root
        self.directory = root / self.node_id
        self._files = TrajectoryFiles(self.directory)
        self._index: dict[int, set[int]] = {}
        self._catalog_path = self.directory / CATALOG_NAME
        self._catalog_fd = -1
        self._created_dirs: list[Path] = []

    def _init_counters(self) -> None:
        """The figures of StorageStats, from zero, under a fresh boot id."""
        self.boot = secrets.token_hex(8)
        self._rq_blocks = 0
        self._rq_bytes = 0
        self._bytes_read = 0
        self._read_by: dict[str, int] = {}
        self._bytes_written = 0
        self._num_blocks = 0
        self._num_errors = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError(f"{self.node_id} already started")
        self._started = True
        self._make_dirs()
        self._open_catalog()
        self.health.start()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{self.node_id}-io")
        storage, mgmt = self.node.storage, self.node.mgmt
        assert storage is not None  # checked in __init__
        data_handlers: dict[str, Handler] = {
            FrameKind.READ: self._on_read,
            FrameKind.WRITE: self._on_write,
        }
        mgmt_handlers: dict[str, Handler] = {
            FrameKind.STATS: self._on_stats,
            FrameKind.SEED: self._on_seed,
            FrameKind.HEALTH: self._on_health,
        }
        ports = (
            (storage, data_handlers, self._kv_limits),
            (mgmt, mgmt_handlers, self._mgmt_limits),
        )
        try:
            for ep, table, limits in ports:
                self._servers.append(
                    await serve(
                        ep.host,
                        ep.port,
                        self._dispatcher(table),
                        dscp=Dscp.BEST_EFFORT,  # the storage network carries only storage traffic
                        limits=limits,
                        on_error=self._emit,
                    )
                )
        except BaseException:
            await self.stop()
            raise
        self._emit(f"serving storage on {storage.host}:{storage.port}, mgmt on {mgmt.port}")

    def _make_dirs(self) -> None:
        missing: list[Path] = []
        for d in (self.directory, *self.directory.parents):
            if d.exists():
                break
            missing.append(d)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created_dirs = missing  # deepest first, the order rmdir needs

    async def stop(self) -> None:
        """Stop serving, end open connections, wait for disk jobs, remove what we created."""
        if self._closing:
            return
        self._closing = True
        for server in self._servers:
            await server.close()
        for conn in list(self._conns):
            conn.abort()
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._executor is not None:
            # Threads cannot be cancelled; fds must stay open until their jobs are done.
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        await self.health.stop()
        self._files.close_all()
        if self._catalog_fd >= 0:
            os.close(self._catalog_fd)
            self._catalog_fd = -1
        self._files.remove_created(self._root)
        for d in self._created_dirs:
            with contextlib.suppress(OSError):  # not empty: someone else's files are there
                d.rmdir()
        self._index.clear()
        self._emit("stopped")

    @property
    def stats(self) -> StorageStats:
        return StorageStats(
            boot=self.boot,
            read_queue_blocks=self._rq_blocks,
            read_queue_bytes=self._rq_bytes,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            num_blocks_stored=self._num_blocks,
            num_errors=self._num_errors,
            read_by=dict(self._read_by),
            transport={
                f"{server.limits.kind}_{name}": value
                for server in self._servers
                for name, value in server.stats().items()
            },
        )

    # -- request boundary -------------------------------------------------------------------

    def _emit(self, message: str) -> None:
        if self._log is not None:
            self._log(f"{self.node_id}: {message}")

    def _dispatcher(self, table: dict[str, Handler]) -> Handler:
        async def dispatch(conn: FrameConnection, frame: Frame) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            self._conns.add(conn)
            try:
                if self._closing:
                    raise ServerClosing(f"{self.node_id} is stopping")
                handler = table.get(frame.kind)
                if handler is None:
                    raise UnsupportedMessage(
                        f"{frame.kind!r} is not served here (have: {sorted(map(str, table))})"
                    )
                if frame.kind in MUTATING_KINDS and not frame_presents(
                    frame.header.get(FRAME_AUTH_FIELD), self.spec.secret
                ):
                    raise Unauthorized(f"{frame.kind!r} must present the lab's secret")
                await handler(conn, frame)
            except (ConnectionError, TimeoutError):
                raise  # the peer is gone or stuck: nobody to answer (both are OSErrors)
            except (StorageError, KvCorruption, OSError) as exc:
                await self._send_error(conn, frame, exc)

        return dispatch

    async def _send_error(self, conn: FrameConnection, frame: Frame, exc: Exception) -> None:
        if isinstance(exc, StorageError):
            code = exc.code
        elif isinstance(exc, KvCorruption):
            code = "corrupt"
        else:
            code = "io"
        self._num_errors += 1
        req = frame.header.get("req")  # echoed as it came, whatever the request's type
        self._emit(f"{frame.kind} req={req!r} from {conn.peer}: {code}: {exc}")
        await conn.send(to_frame(ErrorReply(code=code, message=str(exc), req=req)))

    # -- disk -------------------------------------------------------------------------------

    async def _io(self, nbytes: int, fn: Callable[[], T]) -> T:
        if nbytes <= INLINE_IO_BYTES or self._executor is None:
            return fn()
        job = asyncio.wrap_future(self._executor.submit(fn))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # A thread cannot be stopped and it uses a pinned fd: hold the pin until it ends.
            await asyncio.wait([job])
            raise

    def _read_frame(self, fd: int, blocks: Sequence[int]) -> tuple[bytes, int]:
        # The crc is of the bytes as read back, so the receiver catches a bad disk.
        payload = read_blocks(fd, blocks, self.block_bytes)
        return payload, crc(payload)

    def _stored(self, traj: int, blocks: Sequence[int], *, record: bool = True) -> None:
        present = self._index.setdefault(traj, set())
        before = len(present)
        present.update(blocks)
        self._num_blocks += len(present) - before
        if record and blocks and self._catalog_fd >= 0:
            # After the data (its pwrite has returned): a record names only blocks on disk.
            os.write(self._catalog_fd, catalog_record(traj, blocks))

    def _open_catalog(self) -> None:
        """Load what an earlier run of this server stored (a restart after a kill: the files
        are still there, as on a real storage server), then append to the same catalogue."""
        path = self._catalog_path
        if path.exists():
            for traj, runs in read_catalog(path.read_bytes()):
                self._stored(traj, [b for f, c in runs for b in range(f, f + c)], record=False)
            for traj in self._index:
                if self._files.path(traj).exists():
                    self._files.adopt(self._files.path(traj))
            self._emit(f"restored {self._num_blocks} blocks of {len(self._index)} trajectories")
        self._catalog_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._files.adopt(path)

    # -- handlers ---------------------------------------------------------------------------

    async def _on_read(self, conn: FrameConnection, frame: Frame) -> None:
        req = parse_request(frame, ReadRequest)
        present = self._index.get(req.traj, set())
        missing = [b for b in req.blocks if b not in present]
        if missing:
            raise MissingBlocks(
                f"traj {req.traj}: {len(missing)} of {len(req.blocks)} blocks not stored "
                f"(first: {missing[:8]})"
            )
        bb = self.block_bytes
        groups = self._gen.layer_groups
        remaining = len(req.blocks)
        client = (
            req.client if req.client in self._read_by or len(self._read_by) < MAX_CLIENTS else "?"
        )
        # The read queue the scheduler balances on: accepted, not yet handed to the network.
        self._rq_blocks += remaining
        self._rq_bytes += remaining * bb
        try:
            if req.blocks:
                with self._files.pinned(req.traj, create=False) as fd:
                    for chunk in chunks(req.blocks, self._blocks_per_chunk):
                        payload, payload_crc = await self._io(
                            len(chunk) * bb, functools.partial(self._read_frame, fd, chunk)
                        )
                        s = SliceSet(req.traj, tuple(chunk), 0, groups)
                        await conn.send(to_frame(BlocksChunk.of(req.req, s, payload_crc), payload))
                        remaining -= len(chunk)
                        self._rq_blocks -= len(chunk)
                        self._rq_bytes -= len(chunk) * bb
                        self._bytes_read += len(payload)
                        self._read_by[client] = self._read_by.get(client, 0) + len(payload)
        finally:
            self._rq_blocks -= remaining
            self._rq_bytes -= remaining * bb
        done = ReadDone(req=req.req, num_blocks=len(req.blocks), num_bytes=len(req.blocks) * bb)
        await conn.send(to_frame(done))

    async def _on_write(self, conn: FrameConnection, frame: Frame) -> None:
        gen = self._gen
        req = parse_request(frame, WriteRequest)
        slices = write_slices(req, layer_groups=gen.layer_groups, max_slices=self._max_slices)
        payload = frame.payload
        # Verified before any file is touched: a corrupt write leaves no trace (KvCorruption).
        num_bytes = await self._io(
            len(payload), functools.partial(gen.verify, slices, payload, req.crc)
        )
        blocks = slices.blocks
        if blocks:
            with self._files.pinned(slices.traj, create=True) as fd:
                await self._io(
                    num_bytes,
                    functools.partial(write_blocks, fd, blocks, payload, self.block_bytes),
                )
        self._stored(slices.traj, blocks)
        self._bytes_written += num_bytes
        await conn.send(to_frame(WriteDone(req=req.req, num_bytes=num_bytes)))

    async def _on_seed(self, conn: FrameConnection, frame: Frame) -> None:
        req = parse_request(frame, SeedRequest)
        wanted = seed_range(req)
        owned = self._owned_blocks(req.traj, wanted.start, wanted.stop)
        gen = self._gen
        per_chunk = per_frame(SEED_CHUNK_BYTES, self.block_bytes)

        def write_all(fd: int) -> None:
            for chunk in chunks(owned, per_chunk):
                write_blocks(fd, chunk, gen.full_blocks(req.traj, chunk), self.block_bytes)

        if owned:
            with self._files.pinned(req.traj, create=True) as fd:
                await self._io(len(owned) * self.block_bytes, lambda: write_all(fd))
        # Seeding is the warm cache set up before the measured run: it is not in bytes_written.
        self._stored(req.traj, owned)
        num_bytes = len(owned) * self.block_bytes
        await conn.send(to_frame(SeedDone(req=req.req, num_blocks=len(owned), num_bytes=num_bytes)))

    def _owned_blocks(self, traj: int, first: int, end: int) -> list[int]:
        # Striping is periodic in the number of servers (spec.storage_server_for): find which of
        # the first S blocks are ours, then step by S instead of asking for every block.
        period = len(self.spec.storage_nodes)
        starts = [
            b
            for b in range(first, min(end, first + period))
            if self.spec.storage_server_for(traj, b).node_id == self.node_id
        ]
        return sorted(b for s in starts for b in range(s, end, period))

    async def _on_stats(self, conn: FrameConnection, frame: Frame) -> None:
        req = parse_request(frame, StatsRequest)
        await conn.send(to_frame(msgspec.structs.replace(self.stats, req=req.req)))

    async def _on_health(self, conn: FrameConnection, frame: Frame) -> None:
        req = parse_request(frame, Health)
        # The snapshot's series can outgrow the 1 MiB header limit: it travels as the payload.
        snapshot = msgpack.packb(self.health.snapshot(), use_bin_type=True)
        await conn.send(to_frame(Health(req=req.req), snapshot))


async def serve_storage(
    spec: ClusterSpec,
    node_id: str,
    stop: asyncio.Event,
    *,
    log: Callable[[str], None] | None = None,
) -> None:
    """Run one storage server until `stop` is set."""
    server = StorageServer(spec, node_id, log=log)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()

"""A data plane's storage side: the node's read queue and DRAM buffer, reads and writes.

Reads wait in the node's FIFO read queue (READ_CONCURRENCY in flight) and for room in its
bounded DRAM buffer; the whole-block chunks a read returns stay here (`chunks`) until the
turn's KV has been sent or relayed (services/kv_senders.py) and the core frees them. The
decisions are `DataPlaneCore`'s; services/dataplane.py hands this part its actions.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from services import dataplane_core as dp
from services.codec import Payload
from services.dataplane_stats import DataPlaneStats
from services.kvblocks import SliceSet
from services.spec import ClusterSpec
from services.storage_client import StorageClient

READ_CONCURRENCY = 2
"""Storage reads in flight per node; the rest wait in the node's read queue (FIFO)."""

Chunks = list[tuple[SliceSet, Payload]]


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


class StorageIo:
    """The read queue and its workers, the DRAM buffer, and persisting new blocks.

    `after()` runs the core's new actions once this part fed it; `fail(turn_id, what, exc)`
    fails a turn; `event(turn_id, kind, **extra)` reports a turn event to the timeline."""

    def __init__(
        self,
        spec: ClusterSpec,
        core: dp.DataPlaneCore,
        storage: StorageClient,
        stats: DataPlaneStats,
        *,
        dram_bytes: int,
        after: Callable[[], None],
        fail: Callable[[str, str, BaseException], None],
        event: Callable[..., None],
    ) -> None:
        self.spec = spec
        self.node_id = core.cfg.node_id
        self.core = core
        self.storage = storage
        self.stats = stats
        self.dram = DramBuffer(dram_bytes)
        self.block_tokens = spec.profile.block_tokens
        self.read_q_tokens = 0
        self.chunks: dict[str, Chunks] = {}
        """Each turn's read KV as storage returned it (whole-block chunks), until freed."""
        self._reserved: dict[str, int] = {}
        self._reads: deque[dp.StartRead] = deque()
        self._read_wake = asyncio.Event()
        self._after = after
        self._fail = fail
        self._event = event

    def enqueue(self, job: dp.StartRead) -> None:
        self._reads.append(job)
        self.read_q_tokens += len(job.blocks) * self.block_tokens
        self._read_wake.set()
        self.stats.dirty = True

    def free(self, turn_id: str) -> None:
        self.chunks.pop(turn_id, None)
        self.dram.release(self._reserved.pop(turn_id, 0))
        self.stats.dirty = True

    async def _next_read(self) -> dp.StartRead:
        while not self._reads:
            self._read_wake.clear()
            await self._read_wake.wait()
        return self._reads.popleft()

    async def read_worker(self) -> None:
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
                self.stats.dirty = True

    async def _read(self, job: dp.StartRead) -> None:
        nbytes = len(job.blocks) * self.spec.profile.block_bytes
        reserved = await self.dram.acquire(nbytes, self.spec.request_timeout_s)
        if job.turn_id not in self.core.turns:  # dropped while waiting for DRAM
            self.dram.release(reserved)
            return
        self._reserved[job.turn_id] = self._reserved.get(job.turn_id, 0) + reserved
        # its turn in the node's read queue and a DRAM buffer: the read itself starts now
        self._event(job.turn_id, "read_started", node=self.node_id, blocks=len(job.blocks))
        chunks: Chunks = []
        got = await self.storage.read(job.traj, job.blocks, lambda s, p: chunks.append((s, p)))
        counters = self.stats.counters
        counters["bytes_storage_read"] += got
        counters["bytes_verified"] += got
        self.stats.dirty = True
        if job.turn_id not in self.core.turns:
            self.free(job.turn_id)
            return
        self.chunks.setdefault(job.turn_id, []).extend(chunks)  # a read per trajectory
        self.core.on_read_done(job.turn_id)
        self._after()

    async def write(self, job: dp.Write) -> None:
        try:
            written = await self.storage.write(job.traj, job.blocks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(job.turn_id, "persisting KV", exc)
            return
        # not `+= await`: other tasks add meanwhile
        self.stats.counters["bytes_written"] += written
        self.stats.dirty = True
        self.core.on_written(job.turn_id)
        self._after()

"""An engine node (prefill or decode role): emulated GPUs, a DRAM buffer, a traffic manager.

The leader pulls turns from the scheduler; the traffic manager reads KV from storage through
the node's snic; KV moves between nodes over the cnic marked with DSCP classes; GPUs sleep
for the cost model's time x time_dilation and exchange collective bursts with their group
peers. Every KV byte received is verified. Policy decisions are not made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.batching import (
    PrefillBatch,
    PrefillItem,
    attention_balance,
    head_batch,
    pack_prefill_batch,
)
from services.codec import Frame
from services.kvblocks import KvCorruption, KvGenerator, crc
from services.scheduler_service import SchedulerClient
from services.spec import ClusterSpec, NodeSpec, Policy, Role
from services.storage_client import StorageClient
from services.transport import (
    ConnectionClosed,
    Dscp,
    FrameConnection,
    FrameServer,
    connect,
    serve,
)

READ_CONCURRENCY = 2
KV_FRAME_SLICES = 512
MAX_STEP_RECORDS = 20_000


def _transient(exc: BaseException) -> bool:
    """A failure a retry can get past: a lost connection or peer, a timeout. Corrupt or missing
    KV is not (it would fail again, and must be reported)."""
    return isinstance(exc, OSError | TimeoutError | asyncio.IncompleteReadError | ConnectionClosed)


class TurnFailed(Exception):
    """A turn cannot complete on this node; the reason is reported to the scheduler."""


@dataclass
class Turn:
    """One turn as seen by this node (either role)."""

    turn_id: str
    traj_id: int
    prompt_tokens: int
    gen_tokens: int
    hit_blocks: int
    prompt_blocks: int
    persist_end_block: int
    prefill_node: str
    prefill_engine: int
    decode_node: str
    decode_engine: int
    read_side: str
    context_tokens: int
    prefill_read: tuple[int, int]
    """Hit blocks [first, end) the prefill node reads from storage (empty: first == end)."""
    decode_read: tuple[int, int]
    """Hit blocks [first, end) the decode node reads and relays to the prefill node."""
    # Prefill side: hit KV held in DRAM, keyed by (block, group).
    slices: dict[tuple[int, int], bytes] = field(default_factory=dict)
    groups_ready: list[asyncio.Event] = field(default_factory=list)
    # Decode side: verified (block, group) present.
    present: set[tuple[int, int]] = field(default_factory=set)
    pe_finished: asyncio.Event = field(default_factory=asyncio.Event)
    kv_complete: asyncio.Event = field(default_factory=asyncio.Event)
    # Prefill side: own read finished; layer groups whose relayed KV has all arrived.
    own_read_done: bool = False
    relayed: set[int] = field(default_factory=set)
    # Prefill side: new tokens computed so far (chunked prefill runs over several steps).
    computed_tokens: int = 0
    sends: list[asyncio.Task[int]] = field(default_factory=list)
    dram_bytes: int = 0
    failed: str | None = None

    @classmethod
    def from_wire(cls, w: dict[str, Any], layer_groups: int) -> Turn:
        t = cls(
            turn_id=str(w["turn_id"]),
            traj_id=int(w["traj_id"]),
            prompt_tokens=int(w["prompt_tokens"]),
            gen_tokens=int(w["gen_tokens"]),
            hit_blocks=int(w["hit_blocks"]),
            prompt_blocks=int(w["prompt_blocks"]),
            persist_end_block=int(w["persist_end_block"]),
            prefill_node=str(w["prefill_node"]),
            prefill_engine=int(w["prefill_engine"]),
            decode_node=str(w["decode_node"]),
            decode_engine=int(w["decode_engine"]),
            read_side=str(w["read_side"]),
            context_tokens=int(w["context_tokens"]),
            prefill_read=_block_range(w["reads"]["prefill"], int(w["hit_blocks"])),
            decode_read=_block_range(w["reads"]["decode"], int(w["hit_blocks"])),
        )
        t.groups_ready = [asyncio.Event() for _ in range(layer_groups)]
        return t

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.gen_tokens

    def read_blocks(self, role: Role) -> range:
        """The hit blocks the node of `role` reads from storage for this turn."""
        first, end = self.prefill_read if role is Role.PREFILL else self.decode_read
        return range(first, end)


def _block_range(value: Any, hit_blocks: int) -> tuple[int, int]:
    first, end = int(value[0]), int(value[1])
    if not 0 <= first <= end <= hit_blocks:
        raise ValueError(f"read range [{first}, {end}) outside the {hit_blocks} hit blocks")
    return first, end


@dataclass
class EngineLoad:
    seq: int = 0
    tok: int = 0
    kv_tokens: int = 0
    busy_s: float = 0.0
    queue: deque[str] = field(default_factory=deque)


class DramBuffer:
    """The node's bounded DRAM buffer for KV in transit (bytes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> int:
        n = min(n, self.capacity)  # a single turn larger than the buffer still proceeds alone
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.capacity)
            self.used += n
        return n

    async def release(self, n: int) -> None:
        if n <= 0:
            return
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class EngineNode:
    def __init__(
        self, spec: ClusterSpec, node_id: str, *, log: Callable[[str], None] | None = None
    ) -> None:
        self.spec = spec
        self.me: NodeSpec = spec.node(node_id)
        if self.me.role not in (Role.PREFILL, Role.DECODE):
            raise ValueError(f"{node_id} is a {self.me.role} node, not an engine node")
        self.role = self.me.role
        self.profile = spec.profile
        self.groups = spec.profile.layer_groups
        self.kv = KvGenerator(spec.profile.layer_group_bytes(0), self.groups)
        self.cost = spec.profile.cost_model()
        self.tau = spec.time_dilation
        self.oracle = spec.policy is Policy.ORACLE
        self.layerwise = spec.policy is not Policy.BASIC
        self.log = log or (lambda msg: None)
        self.turns: dict[str, Turn] = {}
        self.engines = [EngineLoad() for _ in range(self.me.num_gpus)]
        self.dram = DramBuffer(self.me.dram_buffer_bytes)
        self.read_jobs: asyncio.Queue[Turn] = asyncio.Queue()
        self.read_q_tokens = 0
        self.changed = asyncio.Event()
        self.counters: dict[str, int | float] = {
            "bytes_storage_read": 0,
            "bytes_relay_sent": 0,
            "bytes_relay_received": 0,
            "bytes_pd_sent": 0,
            "bytes_pd_received": 0,
            "bytes_verified": 0,
            "bytes_written": 0,
            "turns_prefilled": 0,
            "turns_decoded": 0,
            "errors": 0,
            "collective_count": 0,
            "collective_latency_sum_s": 0.0,
            "collective_latency_max_s": 0.0,
        }
        self.errors: list[str] = []
        self._events: list[tuple[str, str, float, dict[str, Any]]] = []
        self._events_ready = asyncio.Event()
        self._peers: dict[tuple[str, Dscp], FrameConnection] = {}
        self._peer_locks: dict[tuple[str, Dscp], asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._collective_locks: dict[str, asyncio.Lock] = {}
        self._decode_active: list[list[Turn]] = [[] for _ in range(self.me.num_gpus)]
        self._decode_wake = [asyncio.Event() for _ in range(self.me.num_gpus)]
        self.quota_s = spec.compute_quota_s
        self.boot = secrets.token_hex(8)
        # One row per prefill step of the group: [at, attention max/avg, GPUs with work, GPUs].
        self.steps: list[tuple[float, float, int, int]] = []
        self.collective_ms: list[float] = []
        """Latency of each collective burst (all peers answered), ms; mgmt `stats` only."""
        self.storage: StorageClient | None = None
        self.scheduler: SchedulerClient | None = None
        self._server: FrameServer | None = None
        self._mgmt_server: FrameServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        assert self.me.cnic is not None
        self.storage = StorageClient(self.spec, local_host=self.me.snic_host)
        self.scheduler = SchedulerClient(self.spec)
        self._server = await serve(
            self.me.cnic.host,
            self.me.cnic.port,
            self._on_frame,
            dscp=Dscp.KV,
            max_payload_bytes=self.spec.max_frame_bytes,
            on_error=self._record_error,
        )
        self._mgmt_server = await serve(
            self.me.mgmt.host,
            self.me.mgmt.port,
            self._on_mgmt,
            dscp=Dscp.CONTROL,
            max_payload_bytes=1 << 20,
            on_error=self._record_error,
        )
        self._spawn(self._pull_loop())
        self._spawn(self._event_flusher())
        for _ in range(READ_CONCURRENCY):
            self._spawn(self._read_worker())
        if self.role is Role.PREFILL:
            self._spawn(self._prefill_steps())
        else:
            for gpu in range(self.me.num_gpus):
                self._spawn(self._decode_gpu(gpu))
        try:
            await stop.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.close()
            await self._mgmt_server.close()
            for conn in self._peers.values():
                await conn.close()
            await self.storage.close()
            await self.scheduler.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _record_error(self, msg: str) -> None:
        self.counters["errors"] += 1
        self.errors.append(msg)
        del self.errors[:-50]
        self.log(f"error: {msg}")

    # -- scheduler ---------------------------------------------------------------------------
    def _report(self, *, steps: bool = False) -> dict[str, Any]:
        engines = []
        for i, e in enumerate(self.engines):
            free = self.me.gpu_kv_capacity_tokens - e.kv_tokens
            engines.append([i, e.seq, e.tok, free])
        return {
            "node_id": self.me.node_id,
            "boot": self.boot,
            "role": self.role.value,
            "read_q_tokens": self.read_q_tokens,
            "engines": engines,
            "turns": list(self.turns),
            "counters": {
                **self.counters,
                "dram_used_bytes": self.dram.used,
                "engine_busy_s": [round(e.busy_s, 4) for e in self.engines],
                "last_errors": self.errors[-5:],
            },
            # the step history is long: only the management port's `stats` carries it
            **(
                {
                    "prefill_steps": [list(r) for r in self.steps],
                    "collective_ms": list(self.collective_ms),
                }
                if steps
                else {}
            ),
        }

    async def _pull_loop(self) -> None:
        assert self.scheduler is not None
        failures = 0
        while True:
            try:
                assignments, cancel = await self.scheduler.fetch(self._report())
                for wire in assignments:
                    self._accept(wire)
                for turn_id, reason in cancel:
                    if (turn := self.turns.get(turn_id)) is not None:
                        self._fail(turn, f"cancelled by the scheduler: {reason}", report=False)
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

    async def _event_flusher(self) -> None:
        assert self.scheduler is not None
        while True:
            await self._events_ready.wait()
            self._events_ready.clear()
            batch, self._events = self._events, []
            if not batch:
                continue
            try:
                await self.scheduler.report(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log(f"report failed, retrying: {exc!r}")
                self._events = batch + self._events
                self._events_ready.set()
                await asyncio.sleep(0.2)

    def _accept(self, wire: dict[str, Any]) -> None:
        turn = Turn.from_wire(wire, self.groups)
        if turn.turn_id in self.turns:
            return
        self.turns[turn.turn_id] = turn
        if self.role is Role.PREFILL:
            eng = self.engines[turn.prefill_engine]
            eng.seq += 1
            eng.tok += turn.prompt_tokens
            eng.queue.append(turn.turn_id)
            if self.oracle or turn.hit_blocks == 0:
                for ev in turn.groups_ready:
                    ev.set()
            else:
                if turn.read_blocks(Role.PREFILL):
                    self._enqueue_read(turn)
                self._update_ready(turn)
        else:
            eng = self.engines[turn.decode_engine]
            eng.seq += 1
            eng.tok += turn.kv_tokens
            eng.kv_tokens += turn.kv_tokens
            if turn.read_blocks(Role.DECODE) and not self.oracle:
                self._enqueue_read(turn)
            self._spawn(self._decode_turn(turn))
        self.changed.set()

    # -- traffic manager: storage reads --------------------------------------------------------
    def _hit_tokens(self, turn: Turn) -> int:
        return turn.hit_blocks * self.profile.block_tokens

    def _read_tokens(self, turn: Turn) -> int:
        """Tokens of hit KV this node reads for `turn`: its share of the read queue."""
        return len(turn.read_blocks(self.role)) * self.profile.block_tokens

    def _update_ready(self, turn: Turn) -> None:
        """Prefill side: layer group g is ready once this node's own read (if any) is done
        and the decode node's relay of group g (if it reads any blocks) has arrived."""
        if turn.read_blocks(Role.PREFILL) and not turn.own_read_done:
            return
        relays = bool(turn.read_blocks(Role.DECODE))
        for g, ev in enumerate(turn.groups_ready):
            if not relays or g in turn.relayed:
                ev.set()
        self.changed.set()

    def _enqueue_read(self, turn: Turn) -> None:
        self.read_q_tokens += self._read_tokens(turn)
        self.read_jobs.put_nowait(turn)

    async def _read_worker(self) -> None:
        assert self.storage is not None
        while True:
            turn = await self.read_jobs.get()
            try:
                if turn.failed is None:
                    await self._read_turn(turn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail(
                    turn,
                    f"storage read on {self.me.node_id} failed: {exc}",
                    retryable=_transient(exc),
                )
            finally:
                self.read_q_tokens -= self._read_tokens(turn)

    async def _read_turn(self, turn: Turn) -> None:
        assert self.storage is not None
        blocks = turn.read_blocks(self.role)
        nbytes = len(blocks) * self.profile.block_bytes
        turn.dram_bytes = await self.dram.acquire(nbytes)
        # its turn in the node's read queue and a DRAM buffer: the read itself starts now
        self.emit(turn.turn_id, "read_started", node=self.me.node_id, blocks=len(blocks))
        keep = self.role is Role.PREFILL or self.layerwise
        gb = self.profile.layer_group_bytes(0)

        async def on_chunk(entries: list[list[int]], payload: bytes) -> None:
            view = memoryview(payload)
            for i, (block, group, _crc) in enumerate(entries):
                if keep:
                    turn.slices[(int(block), int(group))] = bytes(view[i * gb : (i + 1) * gb])
                turn.present.add((int(block), int(group)))

        got = await self.storage.read(turn.traj_id, blocks, on_chunk)
        self.counters["bytes_storage_read"] += got
        self.counters["bytes_verified"] += got
        if self.role is Role.PREFILL:
            turn.own_read_done = True
            self._update_ready(turn)
        else:
            self._spawn(self._relay(turn))

    # -- peers -------------------------------------------------------------------------------
    async def _peer(self, node_id: str, dscp: Dscp) -> FrameConnection:
        key = (node_id, dscp)
        lock = self._peer_locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._peers.get(key)
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
        except Exception:
            self._peers.pop((node_id, dscp), None)
            await conn.close()
            raise

    async def _send_slices(
        self, node_id: str, kind: str, turn: Turn, slices: list[tuple[int, int, bytes]]
    ) -> int:
        """Send (block, group, bytes) slices as `kind` frames; returns payload bytes sent."""
        sent = 0
        for start in range(0, len(slices), KV_FRAME_SLICES):
            part = slices[start : start + KV_FRAME_SLICES]
            entries = [[b, g, crc(data)] for b, g, data in part]
            payload = b"".join(data for _, _, data in part)
            header = {"turn": turn.turn_id, "traj": turn.traj_id, "entries": entries}
            await self._send(node_id, Frame(kind, header, payload))
            sent += len(payload)
        return sent

    async def _collective(self) -> None:
        """One all-to-all burst to every other node of this role (high priority class)."""
        peers = [n.node_id for n in self.spec.by_role(self.role) if n.node_id != self.me.node_id]
        size = self.spec.collective_bytes_per_step
        if not peers or size <= 0:
            return
        payload = bytes(size)
        start = time.perf_counter()

        async def one(peer: str) -> None:
            conn = await self._peer(peer, Dscp.COLLECTIVE)
            async with self._collective_locks.setdefault(peer, asyncio.Lock()):
                await conn.send(Frame("collective", {}, payload))
                await conn.recv_reply()

        await asyncio.gather(*(one(p) for p in peers))
        took = time.perf_counter() - start
        self.counters["collective_count"] += 1
        self.counters["collective_latency_sum_s"] += took
        self.collective_ms.append(round(took * 1000, 3))
        del self.collective_ms[:-MAX_STEP_RECORDS]
        self.counters["collective_latency_max_s"] = max(
            float(self.counters["collective_latency_max_s"]), took
        )

    async def _on_mgmt(self, conn: FrameConnection, frame: Frame) -> None:
        """Management port: `stats` answers with this node's report (loads and counters)."""
        if frame.kind != "stats":
            raise ValueError(f"unexpected frame type {frame.kind!r} on the management port")
        await conn.send(Frame("stats", self._report(steps=True)))

    # -- inbound frames ------------------------------------------------------------------------
    async def _on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        if frame.kind == "collective":
            # The ack, and the TCP ACKs of the burst, go back in the collective class: in the
            # listener's kv class they would wait behind KV traffic (DualPath §5).
            conn.mark(Dscp.COLLECTIVE)
            await conn.send(Frame("collective_ack", {"n": len(frame.payload)}))
            return
        turn_id = str(frame.header.get("turn"))
        turn = self.turns.get(turn_id)
        if frame.kind in ("kv", "relay"):
            try:
                got = self.kv.verify(
                    int(frame.header["traj"]), frame.header["entries"], frame.payload
                )
            except KvCorruption as exc:
                self._record_error(f"{frame.kind} for turn {turn_id}: {exc}")
                if turn is not None:
                    self._fail(turn, f"corrupt KV from peer: {exc}")
                return
            self.counters["bytes_verified"] += got
            key = "bytes_pd_received" if frame.kind == "kv" else "bytes_relay_received"
            self.counters[key] += got
            if turn is None:
                turn = await self._await_turn(turn_id)
            gb = self.profile.layer_group_bytes(0)
            view = memoryview(frame.payload)
            for i, (block, group, _crc) in enumerate(frame.header["entries"]):
                if frame.kind == "relay":
                    turn.slices[(int(block), int(group))] = bytes(view[i * gb : (i + 1) * gb])
                else:
                    turn.present.add((int(block), int(group)))
            return
        if frame.kind == "relay_group_done":
            turn = turn or await self._await_turn(turn_id)
            group = int(frame.header["group"])
            if not 0 <= group < self.groups:
                raise ValueError(f"relay_group_done for layer group {group} of {self.groups}")
            turn.relayed.add(group)
            self._update_ready(turn)
            return
        if frame.kind == "kv_done":
            turn = turn or await self._await_turn(turn_id)
            turn.pe_finished.set()
            return
        if frame.kind == "turn_failed":
            if turn is not None:
                self._fail(turn, str(frame.header.get("reason")), report=False)
            return
        raise ValueError(f"unexpected frame type {frame.kind!r}")

    async def _await_turn(self, turn_id: str) -> Turn:
        """Frames may overtake this node's own fetch of the assignment: wait for it."""
        async with asyncio.timeout(self.spec.request_timeout_s):
            while turn_id not in self.turns:
                self.changed.clear()
                await self.changed.wait()
        return self.turns[turn_id]

    # -- failures ------------------------------------------------------------------------------
    def _fail(
        self, turn: Turn, reason: str, *, report: bool = True, retryable: bool = False
    ) -> None:
        if turn.failed is not None:
            return
        turn.failed = reason
        if report:
            self._record_error(reason)
            self.emit(
                turn.turn_id, "failed", node=self.me.node_id, reason=reason, retryable=retryable
            )
        for ev in turn.groups_ready:
            ev.set()
        turn.pe_finished.set()
        turn.kv_complete.set()
        self.changed.set()

    async def _tell_peer(self, node_id: str, turn: Turn) -> None:
        """Best effort: let the other node of the turn stop waiting for it."""
        with contextlib.suppress(Exception):
            header = {"turn": turn.turn_id, "reason": turn.failed}
            await self._send(node_id, Frame("turn_failed", header), Dscp.CONTROL)

    # -- prefill role ----------------------------------------------------------------------------
    def _ready(self, turn: Turn) -> bool:
        if turn.failed is not None:
            return True
        if self.layerwise:
            return turn.groups_ready[0].is_set()
        return all(ev.is_set() for ev in turn.groups_ready)

    def _pack(self, gpu: int) -> tuple[PrefillBatch, list[Turn]]:
        """The next step of one GPU from the ready turns of its FIFO queue (DualPath §6:
        quota packing with a chunked cut, or the head request whole without a quota)."""
        eng = self.engines[gpu]
        ready: list[Turn] = []
        for turn_id in list(eng.queue):
            turn = self.turns[turn_id]
            if turn.failed is not None:
                eng.queue.remove(turn_id)
                self._spawn(self._finish_prefill(turn, gpu))
            elif self._ready(turn):
                ready.append(turn)
        hit = self._hit_tokens
        items = [
            PrefillItem(
                t.turn_id,
                hit(t) + t.computed_tokens,
                t.prompt_tokens - hit(t) - t.computed_tokens,
            )
            for t in ready
        ]
        if self.quota_s is None:
            batch = head_batch(items, self.cost)
        else:
            batch = pack_prefill_batch(items, self.cost, quota_s=self.quota_s)
        return batch, ready[: len(batch.items)]

    async def _prefill_steps(self) -> None:
        """All GPUs of the node step together: with DP attention and EP MoE they meet at every
        layer's all-to-all, so a step lasts as long as its slowest GPU (DualPath §6)."""
        while True:
            packed = [self._pack(gpu) for gpu in range(self.me.num_gpus)]
            if not any(batch.items for batch, _ in packed):
                self.changed.clear()
                await self.changed.wait()
                continue
            await self._prefill_step(packed)

    async def _prefill_step(self, packed: list[tuple[PrefillBatch, list[Turn]]]) -> None:
        step_s = max(batch.step_s(self.cost) for batch, _ in packed) * self.tau
        busy = [gpu for gpu, (batch, _) in enumerate(packed) if batch.items]
        self.steps.append(
            (
                round(time.time(), 3),
                round(attention_balance([b.attention_s for b, _ in packed]), 4),
                len(busy),
                len(packed),
            )
        )
        del self.steps[:-MAX_STEP_RECORDS]
        turns = [t for _, ts in packed for t in ts]
        done = {tid for batch, _ in packed for tid in batch.completed_turn_ids}
        for gpu, (_, ts) in enumerate(packed):
            for t in ts:
                if t.computed_tokens == 0:
                    self.emit(t.turn_id, "prefill_started", node=self.me.node_id, gpu=gpu)
        t0 = time.perf_counter()
        for g in range(self.groups):
            for t in turns:
                if not t.groups_ready[g].is_set():
                    try:
                        # the whole group waits at this layer: a relay that stalls must not
                        # hold every GPU for a request timeout
                        async with asyncio.timeout(self.spec.layer_timeout_s):
                            await t.groups_ready[g].wait()
                    except TimeoutError:
                        self._fail(
                            t,
                            f"layer group {g} of {t.turn_id} did not arrive within "
                            f"{self.spec.layer_timeout_s:g} s",
                            retryable=True,
                        )
            await asyncio.sleep(step_s / self.groups if self.layerwise else step_s * (g == 0))
            await self._collective()
            if self.layerwise:  # layer group g of finished turns leaves while g+1 computes
                for t in turns:
                    if t.turn_id in done and t.failed is None:
                        t.sends.append(asyncio.create_task(self._send_group(t, g)))
        took = time.perf_counter() - t0
        for gpu in busy:
            self.engines[gpu].busy_s += took
        for gpu, (batch, ts) in enumerate(packed):
            for item, t in zip(batch.items, ts, strict=True):
                t.computed_tokens += item.new_tokens
                if t.turn_id in done:
                    self.engines[gpu].queue.remove(t.turn_id)
                    if t.failed is None:
                        self.emit(t.turn_id, "first_token", node=self.me.node_id)
                        if not self.layerwise:
                            t.sends = [
                                asyncio.create_task(self._send_group(t, g))
                                for g in range(self.groups)
                            ]
                    self._spawn(self._finish_prefill(t, gpu))

    async def _finish_prefill(self, turn: Turn, gpu: int) -> None:
        """After the last chunk: wait for the KV sends, tell the decode node, free the turn."""
        eng = self.engines[gpu]
        try:
            if turn.failed is None:
                async with asyncio.timeout(self.spec.request_timeout_s):
                    sent = sum(await asyncio.gather(*turn.sends))
                    self.counters["bytes_pd_sent"] += sent
                    await self._send(turn.decode_node, Frame("kv_done", {"turn": turn.turn_id}))
                self.counters["turns_prefilled"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(
                turn, f"prefill on {self.me.node_id} failed: {exc!r}", retryable=_transient(exc)
            )
        finally:
            for task in turn.sends:
                task.cancel()
            if turn.failed is not None:
                await self._tell_peer(turn.decode_node, turn)
            eng.seq -= 1
            eng.tok -= turn.prompt_tokens
            await self.dram.release(turn.dram_bytes)
            turn.dram_bytes = 0
            turn.slices.clear()
            self.turns.pop(turn.turn_id, None)
            self.changed.set()

    async def _send_group(self, turn: Turn, group: int) -> int:
        """Layer group `group` of this turn's KV to its decode node: the hit KV this node read
        and the new tokens' KV (DualPath §4: the DE-read path returns only the new tokens)."""
        if self.oracle:
            return 0
        slices: list[tuple[int, int, bytes]] = []
        for b in turn.read_blocks(Role.PREFILL):
            slices.append((b, group, turn.slices[(b, group)]))
        for b in range(turn.hit_blocks, turn.prompt_blocks):
            slices.append((b, group, self.kv.slice(turn.traj_id, b, group)))
        return await self._send_slices(turn.decode_node, "kv", turn, slices)

    # -- decode role -----------------------------------------------------------------------------
    async def _relay(self, turn: Turn) -> None:
        """DE read path: hit KV read through this node's snic goes to the PE per layer group."""
        try:
            sent = 0
            for g in range(self.groups):
                part = [(b, g, turn.slices.pop((b, g))) for b in turn.read_blocks(Role.DECODE)]
                sent += await self._send_slices(turn.prefill_node, "relay", turn, part)
                await self._send(
                    turn.prefill_node,
                    Frame("relay_group_done", {"turn": turn.turn_id, "group": g}),
                )
            self.counters["bytes_relay_sent"] += sent
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(
                turn, f"relay from {self.me.node_id} failed: {exc!r}", retryable=_transient(exc)
            )
            await self._tell_peer(turn.prefill_node, turn)
        finally:
            await self.dram.release(turn.dram_bytes)
            turn.dram_bytes = 0

    async def _decode_turn(self, turn: Turn) -> None:
        eng = self.engines[turn.decode_engine]
        try:
            async with asyncio.timeout(self.spec.request_timeout_s):
                await turn.pe_finished.wait()
                if turn.failed is None and not self.oracle:
                    # The decode side checks the full context is present before decoding.
                    missing = [
                        (b, g)
                        for b in range(turn.prompt_blocks)
                        for g in range(self.groups)
                        if (b, g) not in turn.present
                    ]
                    if missing:
                        raise TurnFailed(
                            f"context incomplete: {len(missing)} of "
                            f"{turn.prompt_blocks * self.groups} slices missing"
                        )
                if turn.failed is not None:
                    return
                done = asyncio.Event()
                turn.kv_complete = done
                if turn.gen_tokens <= 1:  # the only token came from prefill
                    done.set()
                else:
                    self._decode_active[turn.decode_engine].append(turn)
                    self._decode_wake[turn.decode_engine].set()
                await done.wait()
                if turn.failed is not None:
                    return
                if not self.oracle and turn.persist_end_block > turn.hit_blocks:
                    assert self.storage is not None
                    blocks = range(turn.hit_blocks, turn.persist_end_block)
                    self.counters["bytes_written"] += await self.storage.write(turn.traj_id, blocks)
                self.counters["turns_decoded"] += 1
                self.emit(turn.turn_id, "done", node=self.me.node_id, tokens=turn.gen_tokens)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(
                turn, f"decode on {self.me.node_id} failed: {exc!r}", retryable=_transient(exc)
            )
        finally:
            if turn.failed is not None and turn.read_blocks(Role.DECODE):
                await self._tell_peer(turn.prefill_node, turn)
            eng.seq -= 1
            eng.tok -= turn.kv_tokens
            eng.kv_tokens -= turn.kv_tokens
            turn.present.clear()
            self.turns.pop(turn.turn_id, None)

    async def _decode_gpu(self, gpu: int) -> None:
        """Continuous batching: every active sequence advances one token per step."""
        active = self._decode_active[gpu]
        wake = self._decode_wake[gpu]
        eng = self.engines[gpu]
        emitted: dict[str, int] = {}
        while True:
            if not active:
                wake.clear()
                await wake.wait()
                continue
            batch = list(active)
            ctx = sum(t.prompt_tokens + emitted.get(t.turn_id, 1) for t in batch)
            step_s = self.cost.decode_step_s(len(batch), ctx) * self.tau
            t0 = time.perf_counter()
            await asyncio.sleep(step_s)
            await self._collective()
            eng.busy_s += time.perf_counter() - t0
            for t in batch:
                n = emitted.get(t.turn_id, 1) + 1  # the first token came from prefill
                emitted[t.turn_id] = n
                if n == 2:
                    self.emit(t.turn_id, "second_token", node=self.me.node_id)
                if n >= t.gen_tokens or t.failed is not None:
                    active.remove(t)
                    emitted.pop(t.turn_id, None)
                    t.kv_complete.set()


async def engine_stats(spec: ClusterSpec, node_id: str) -> dict[str, Any]:
    """An engine node's full report from its management port, prefill step history included."""
    ep = spec.node(node_id).mgmt
    conn = await connect(ep.host, ep.port, dscp=Dscp.CONTROL, io_timeout_s=spec.request_timeout_s)
    try:
        await conn.send(Frame("stats", {}))
        reply = await conn.recv_reply()
    finally:
        await conn.close()
    if reply.kind != "stats":
        raise ValueError(f"{node_id} answered stats with {reply.kind!r}")
    return dict(reply.header)


async def serve_engine(spec: ClusterSpec, node_id: str, stop: asyncio.Event) -> None:
    node = EngineNode(spec, node_id, log=lambda m: print(f"[{node_id}] {m}", flush=True))
    await node.run(stop)

"""Fuzz every frame port on live servers over real loopback sockets: the storage server's data
and mgmt ports, an engine node's data plane (its KV port, with the data plane run in this
process behind a real IPC socket pair) and its timeline (collective and mgmt ports).

Each input is one connection: fuzzed frames (valid structure, fuzzed fields), mutated frames or
garbage, then our EOF. The server must finish with the connection within the input bound (else
a hang), answer only with its own typed error codes (an error named after a Python exception is
a crash that reached the transport's last resort), and then still answer a legitimate request.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from fuzzlib import (
    BUDGET,
    INPUT_TIMEOUT_S,
    check_error_codes,
    edge_sweep,
    exchange,
    frames,
    no_time_wait,
    replies,
    small_uints,
    tried,
    uint_lists,
    untyped_errors,
    wire,
)
from hypothesis import given
from hypothesis import strategies as st

from services.auth import FRAME_AUTH_FIELD
from services.codec import Frame, encode_bytes
from services.dataplane import DataPlane
from services.engine import EngineNode
from services.ipc import DpStatus, HealthReport, HealthRequest, IpcChannel, Stop
from services.kvblocks import KvGenerator, SliceSet, crc
from services.spec import ClusterSpec
from services.storage import StorageServer
from services.transport import connect
from services.wire.frames import slice_fields

STORAGE_CODES = frozenset(
    {
        "bad_request",
        "unsupported",
        "missing",
        "io",
        "closing",
        "corrupt",
        "malformed",
        "unauthorized",
    }
)
DATAPLANE_CODES = frozenset({"malformed", "ValueError"})
"""The data plane refuses an unknown frame type or a bad relay group with ValueError by design
(services/dataplane.py `_on_frame`); nothing else may escape its handler."""

reqs = st.integers(min_value=0, max_value=1 << 20) | st.text(max_size=8)
runs = st.lists(st.tuples(small_uints, st.integers(min_value=0, max_value=4)).map(list), max_size=4)
slice_strategies: dict[str, st.SearchStrategy[Any]] = {
    "traj": small_uints,
    "runs": runs,
    "g0": st.integers(min_value=0, max_value=6),
    "g1": st.integers(min_value=0, max_value=6),
    "crc": st.integers(min_value=0, max_value=(1 << 32) - 1),
}


async def _ask(spec_host: str, port: int, frame: Frame) -> Frame:
    conn = await connect(spec_host, port, timeout_s=INPUT_TIMEOUT_S, io_timeout_s=INPUT_TIMEOUT_S)
    try:
        await conn.send(frame)
        return await conn.recv()
    finally:
        no_time_wait(conn.get_extra_info("socket"))
        await conn.close()


# -- storage server ---------------------------------------------------------------------------


@pytest.fixture
async def storage(make_spec: Callable[..., ClusterSpec]) -> AsyncIterator[StorageServer]:
    spec = make_spec()
    server = StorageServer(spec, "storage-0")
    await server.start()
    # Some stored blocks, so that fuzzed reads of small trajectories also find data.
    seed = Frame(
        "seed",
        {"req": 0, "traj": 1, "first_block": 0, "end_block": 16, FRAME_AUTH_FIELD: spec.secret},
    )
    assert (await _ask("127.0.0.1", server.node.mgmt.port, seed)).kind == "seed_done"
    try:
        yield server
    finally:
        await server.stop()


def _valid_write(spec: ClusterSpec) -> st.SearchStrategy[Frame]:
    """Well-formed writes of whole blocks (the accepting path), sometimes with a wrong crc."""
    p = spec.profile
    gen = KvGenerator(slice_bytes=p.layer_group_bytes(0), layer_groups=p.layer_groups)

    def build(traj: int, blocks: list[int], req: int, bad_crc: bool) -> Frame:
        s = SliceSet(traj, tuple(blocks), 0, p.layer_groups)
        payload = gen.payload(s)
        carried = crc(payload) ^ (1 if bad_crc else 0)
        head = {"req": req, **slice_fields(s), "crc": carried, FRAME_AUTH_FIELD: spec.secret}
        return Frame("write", head, payload)

    return st.builds(
        build,
        st.integers(min_value=0, max_value=4),
        st.lists(st.integers(min_value=0, max_value=32), min_size=1, max_size=3, unique=True),
        reqs,
        st.booleans(),
    )


def data_port_inputs(spec: ClusterSpec) -> st.SearchStrategy[bytes]:
    fuzzed = frames(
        {
            "read": {
                "req": reqs,
                "traj": small_uints,
                "blocks": uint_lists,
                "client": st.text(min_size=1, max_size=12),
            },
            "write": {"req": reqs, **slice_strategies, FRAME_AUTH_FIELD: st.just(spec.secret)},
        }
    )
    valid_writes = _valid_write(spec).map(encode_bytes)
    return st.one_of(wire(fuzzed), valid_writes)


def mgmt_port_inputs(secret: str) -> st.SearchStrategy[bytes]:
    # Seeding is the lab's intended bulk write (up to 2^20 blocks per request): the ranges are
    # kept short so the fuzzer does not fill the disk; everything else is fuzzed freely.
    first = st.integers(min_value=0, max_value=64)
    fuzzed = frames(
        {
            "stats": {"req": reqs},
            "health": {"req": reqs},
            "seed": {
                "req": reqs,
                "traj": small_uints,
                "first_block": first,
                "end_block": st.integers(min_value=0, max_value=80),
                FRAME_AUTH_FIELD: st.just(secret),
            },
        }
    ).filter(_short_seed)
    return wire(fuzzed)


def _short_seed(f: Frame) -> bool:
    a, b = f.header.get("first_block"), f.header.get("end_block")
    if isinstance(a, int) and isinstance(b, int) and not isinstance(b, bool):
        return b - a <= 128 or b > (1 << 32) or a >= (1 << 32)
    return True


async def _storage_alive(server: StorageServer) -> None:
    assert server.node.storage is not None
    read = Frame("read", {"req": "live", "traj": 1, "blocks": [0]})
    got = await _ask("127.0.0.1", server.node.storage.port, read)
    if got.kind == "blocks":  # block 0 of traj 1 may live on the other server
        pass
    else:
        assert got.kind == "error" and got.header["code"] == "missing", got
    stats = await _ask("127.0.0.1", server.node.mgmt.port, Frame("stats", {"req": "live"}))
    assert stats.kind == "stats", stats


@pytest.mark.fuzz_target("storage.data")
@BUDGET
@given(data=st.data())
async def test_storage_data_port(storage: StorageServer, data: st.DataObject) -> None:
    tried()
    assert storage.node.storage is not None
    sent = data.draw(data_port_inputs(storage.spec), label="sent")
    answer = await exchange("127.0.0.1", storage.node.storage.port, sent)
    check_error_codes(replies(answer), STORAGE_CODES)
    await _storage_alive(storage)


@pytest.mark.fuzz_target("storage.mgmt")
@BUDGET
@given(data=st.data())
async def test_storage_mgmt_port(storage: StorageServer, data: st.DataObject) -> None:
    tried()
    sent = data.draw(mgmt_port_inputs(storage.spec.secret), label="sent")
    answer = await exchange("127.0.0.1", storage.node.mgmt.port, sent)
    check_error_codes(replies(answer), STORAGE_CODES)
    await _storage_alive(storage)


def _kv_frame(spec: ClusterSpec, kind: str, traj: int, blocks: tuple[int, ...]) -> Frame:
    """A well-formed KV frame (storage write or engine kv/relay) with its real bytes."""
    p = spec.profile
    gen = KvGenerator(slice_bytes=p.layer_group_bytes(0), layer_groups=p.layer_groups)
    s = SliceSet(traj, blocks, 0, p.layer_groups)
    payload = gen.payload(s)
    head: dict[str, Any] = {"req": 7, **slice_fields(s), "crc": crc(payload)}
    if kind == "write":  # storage writes present the lab's secret
        head[FRAME_AUTH_FIELD] = spec.secret
    return Frame(kind, head, payload)


@pytest.mark.fuzz_target("storage.edges")
async def test_storage_one_field_off(storage: StorageServer) -> None:
    assert storage.node.storage is not None
    data_port, mgmt_port = storage.node.storage.port, storage.node.mgmt.port
    data = [
        Frame("read", {"req": 1, "traj": 1, "blocks": [0, 1], "client": "fuzz@1"}),
        _kv_frame(storage.spec, "write", 3, (0, 1)),
    ]
    mgmt = [
        Frame("stats", {"req": 1}),
        Frame("health", {"req": 1}),
        Frame(
            "seed",
            {
                "req": 1,
                "traj": 2,
                "first_block": 0,
                "end_block": 4,
                FRAME_AUTH_FIELD: storage.spec.secret,
            },
        ),
    ]
    crashes: list[str] = []
    for port, baselines in ((data_port, data), (mgmt_port, mgmt)):
        for frame in edge_sweep(baselines):
            tried()
            answer = await exchange("127.0.0.1", port, encode_bytes(frame))
            crashes += [
                f"{frame.header}: {e}" for e in untyped_errors(replies(answer), STORAGE_CODES)
            ]
        await _storage_alive(storage)
    assert not crashes, "\n".join(crashes)


# -- engine data plane ------------------------------------------------------------------------


class _Plane:
    def __init__(self, plane: DataPlane, channel: IpcChannel, task: asyncio.Task[None]) -> None:
        self.plane = plane
        self.channel = channel
        self.task = task
        self.probes = 0


@pytest.fixture
async def dataplane(make_spec: Callable[..., ClusterSpec]) -> AsyncIterator[_Plane]:
    """prefill-0's data plane, as the timeline runs it, but in this process: its KV port on
    loopback, its IPC on a socket pair whose other end is the test's."""
    spec = make_spec()
    ours, theirs = socket.socketpair()
    plane = DataPlane(spec, "prefill-0", await IpcChannel.open(theirs), boot="fuzz")
    channel = await IpcChannel.open(ours)
    task = asyncio.create_task(plane.run())
    async with asyncio.timeout(30):
        while not isinstance(await channel.recv(), DpStatus):
            pass
    try:
        yield _Plane(plane, channel, task)
    finally:
        channel.send(Stop())
        await channel.drain()
        async with asyncio.timeout(30):
            await task
        await channel.close()


async def _plane_alive(p: _Plane, port: int, n: int) -> None:
    assert not p.task.done(), "the data plane stopped"
    # The KV port still dispatches: an unknown frame type is refused by the handler.
    got = await _ask("127.0.0.1", port, Frame("ping", {"req": n}))
    assert got.kind == "error" and got.header.get("req") == n, got
    # The IPC loop still answers the timeline.
    p.channel.send(HealthRequest(n))
    async with asyncio.timeout(INPUT_TIMEOUT_S):
        while True:
            msg = await p.channel.recv()
            if isinstance(msg, HealthReport) and msg.req == n:
                break


def dataplane_inputs() -> st.SearchStrategy[bytes]:
    turns = st.sampled_from(["t1", "t2", "x"]) | st.text(max_size=8)
    kv = {"turn": turns, "src": st.text(max_size=12), **slice_strategies}
    fuzzed = frames(
        {
            "kv": kv,
            "relay": kv,
            "relay_group_done": {"turn": turns, "group": st.integers(min_value=-1, max_value=8)},
            "kv_done": {"turn": turns},
            "turn_failed": {"turn": turns, "reason": st.text(max_size=20)},
        },
        max_payload=1024,
    )
    return wire(fuzzed)


@pytest.mark.fuzz_target("dataplane.kv")
@BUDGET
@given(sent=dataplane_inputs())
async def test_dataplane_kv_port(dataplane: _Plane, sent: bytes) -> None:
    tried()
    cnic = dataplane.plane.me.cnic
    assert cnic is not None
    answer = await exchange("127.0.0.1", cnic.port, sent)
    check_error_codes(replies(answer), DATAPLANE_CODES)
    dataplane.probes += 1
    await _plane_alive(dataplane, cnic.port, dataplane.probes)


@pytest.mark.fuzz_target("dataplane.edges")
async def test_dataplane_one_field_off(dataplane: _Plane) -> None:
    cnic = dataplane.plane.me.cnic
    assert cnic is not None
    spec = dataplane.plane.spec
    kv = _kv_frame(spec, "kv", 0, (0, 1))
    kv = Frame("kv", {**kv.header, "turn": "t1", "src": "decode-0@b"}, kv.payload)
    baselines = [
        kv,
        Frame("relay", kv.header, kv.payload),
        Frame("relay_group_done", {"turn": "t1", "group": 0}),
        Frame("kv_done", {"turn": "t1"}),
        Frame("turn_failed", {"turn": "t1", "reason": "fuzz"}),
    ]
    crashes: list[str] = []
    for frame in edge_sweep(baselines):
        tried()
        answer = await exchange("127.0.0.1", cnic.port, encode_bytes(frame))
        found = untyped_errors(replies(answer), DATAPLANE_CODES)
        crashes += [f"{frame.kind} {frame.header}: {e}" for e in found]
    assert not crashes, "\n".join(crashes)
    dataplane.probes += 1
    await _plane_alive(dataplane, cnic.port, dataplane.probes)


# -- engine timeline --------------------------------------------------------------------------


@pytest.fixture
async def engine(
    make_spec: Callable[..., ClusterSpec], tmp_path: Path
) -> AsyncIterator[EngineNode]:
    """prefill-0's timeline process as the backends run it, in this process, with its data
    plane as a child process (no scheduler: its pulls fail and it keeps serving)."""
    spec = make_spec()
    spec_path = tmp_path / "spec.json"
    spec.dump(spec_path)
    node = EngineNode(spec, "prefill-0", spec_path=spec_path)
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    async with asyncio.timeout(60):
        while True:  # the mgmt port answers once the node is up
            try:
                if (await _ask("127.0.0.1", node.me.mgmt.port, Frame("stats", {}))).kind:
                    break
            except OSError:
                await asyncio.sleep(0.1)
    try:
        yield node
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await task


ENGINE_CODES = frozenset({"malformed", "ValueError"})
"""The timeline refuses a frame type its port does not serve with ValueError by design
(services/engine.py `_on_collective`, `_on_mgmt`)."""


def engine_inputs() -> st.SearchStrategy[bytes]:
    fuzzed = frames(
        {"collective": {"n": small_uints}, "stats": {"req": reqs}, "ping": {"req": reqs}},
        max_payload=4096,
    )
    return wire(fuzzed)


@pytest.mark.fuzz_target("engine.collective_mgmt")
@BUDGET
@given(sent=engine_inputs(), mgmt=st.booleans())
async def test_engine_collective_and_mgmt_ports(
    engine: EngineNode, sent: bytes, mgmt: bool
) -> None:
    tried()
    assert engine.me.collective is not None
    port = engine.me.mgmt.port if mgmt else engine.me.collective.port
    check_error_codes(replies(await exchange("127.0.0.1", port, sent)), ENGINE_CODES)
    got = await _ask("127.0.0.1", engine.me.collective.port, Frame("collective", {}, b"x" * 64))
    assert got.kind == "collective_ack" and got.header["n"] == 64, got
    stats = await _ask("127.0.0.1", engine.me.mgmt.port, Frame("stats", {}))
    assert stats.kind == "stats", stats

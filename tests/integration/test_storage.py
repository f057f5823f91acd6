"""Storage servers and the storage client over real loopback TCP, with real files on disk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.codec import Frame, FrameDecoder
from services.kvblocks import KvCorruption, KvGenerator, crc
from services.spec import ClusterSpec
from services.storage import READ_CHUNK_BYTES, StorageServer, serve_storage
from services.storage_client import StorageClient
from services.transport import FrameConnection, RemoteError, connect

TIMEOUT_S = 30.0  # a guard against hangs, not a timing assertion


@pytest.fixture
def spec(make_spec: Callable[..., ClusterSpec]) -> ClusterSpec:
    return make_spec()


@pytest.fixture
async def servers(spec: ClusterSpec) -> AsyncIterator[dict[str, StorageServer]]:
    started: dict[str, StorageServer] = {}
    try:
        for node in spec.storage_nodes:
            server = StorageServer(spec, node.node_id)
            await server.start()
            started[node.node_id] = server
        yield started
    finally:
        for server in started.values():
            await server.stop()


@pytest.fixture
async def client(
    spec: ClusterSpec, servers: dict[str, StorageServer]
) -> AsyncIterator[StorageClient]:
    c = StorageClient(spec, local_host="127.0.0.1")
    yield c
    await c.close()


def generator(spec: ClusterSpec) -> KvGenerator:
    p = spec.profile
    return KvGenerator(slice_bytes=p.layer_group_bytes(0), layer_groups=p.layer_groups)


def owned_by(spec: ClusterSpec, node_id: str, traj: int, count: int) -> list[int]:
    """The first `count` blocks of `traj` that live on `node_id`."""
    blocks: list[int] = []
    b = 0
    while len(blocks) < count:
        if spec.storage_server_for(traj, b).node_id == node_id:
            blocks.append(b)
        b += 1
    return blocks


def traj_file(spec: ClusterSpec, node_id: str, traj: int) -> Path:
    return Path(spec.data_dir) / node_id / f"traj-{traj}.kv"


async def data_conn(spec: ClusterSpec, node_id: str) -> FrameConnection:
    ep = spec.node(node_id).storage
    assert ep is not None
    return await connect(ep.host, ep.port, io_timeout_s=TIMEOUT_S)


# -- reads and writes -------------------------------------------------------------------------


async def test_write_then_read_back_striped_over_two_servers(
    spec: ClusterSpec, client: StorageClient
) -> None:
    bb = spec.profile.block_bytes
    groups = spec.profile.layer_groups
    blocks = list(range(40))
    assert await client.write(3, blocks) == 40 * bb
    assert client.bytes_written == 40 * bb

    # Striping: block b of trajectory 3 is on storage-((3 + b) % 2), in its own sparse file.
    for node in spec.storage_nodes:
        path = traj_file(spec, node.node_id, 3)
        assert path.stat().st_size == (max(owned_by(spec, node.node_id, 3, 20)) + 1) * bb
        assert (await client.stats(node.node_id))["num_blocks_stored"] == 20

    chunks: list[tuple[list[list[int]], bytes]] = []

    async def on_chunk(entries: list[list[int]], payload: bytes) -> None:
        chunks.append((entries, payload))

    assert await client.read(3, blocks, on_chunk) == 40 * bb
    assert client.bytes_read == client.bytes_verified == 40 * bb
    gen = generator(spec)
    seen: dict[int, bytes] = {}
    for entries, payload in chunks:
        assert len(payload) <= max(READ_CHUNK_BYTES, bb)  # whole blocks of ~256 KiB frames
        assert len(entries) % groups == 0
        for i in range(0, len(entries), groups):
            seen[entries[i][0]] = payload[i // groups * bb : (i // groups + 1) * bb]
    assert len(chunks) >= 6  # 20 blocks per server do not fit one frame
    assert seen == {b: gen.full_block(3, b) for b in blocks}


async def test_read_delivers_each_servers_blocks_in_request_order(
    spec: ClusterSpec, client: StorageClient
) -> None:
    blocks = [9, 2, 7, 4, 4, 0]  # out of order, with a repeat
    await client.write(1, sorted(set(blocks)))
    order: list[int] = []

    async def on_chunk(entries: list[list[int]], payload: bytes) -> None:
        order.extend(e[0] for e in entries if e[1] == 0)

    assert await client.read(1, blocks, on_chunk) == len(blocks) * spec.profile.block_bytes
    for node in spec.storage_nodes:
        mine = [b for b in blocks if spec.storage_server_for(1, b).node_id == node.node_id]
        assert [b for b in order if b in mine] == mine


async def test_empty_requests_do_nothing(client: StorageClient) -> None:
    assert await client.read(1, []) == 0
    assert await client.write(1, []) == 0
    assert await client.seed(1, 5, 5) == 0


async def test_seed_then_read(spec: ClusterSpec, client: StorageClient) -> None:
    assert await client.seed(5, 2, 15) == 13 * spec.profile.block_bytes
    assert await client.read(5, range(2, 15)) == 13 * spec.profile.block_bytes
    stats = [await client.stats(n.node_id) for n in spec.storage_nodes]
    assert sum(s["num_blocks_stored"] for s in stats) == 13
    assert all(s["bytes_written"] == 0 for s in stats)  # seeding is outside the measured run
    with pytest.raises(RemoteError) as err:
        await client.read(5, [15])
    assert err.value.code == "missing"


async def test_stats_count_bytes_and_the_read_queue_drains(
    spec: ClusterSpec, client: StorageClient, servers: dict[str, StorageServer]
) -> None:
    bb = spec.profile.block_bytes
    await client.write(2, range(10))
    await client.read(2, range(10))
    await client.read(2, [0, 1])
    for node in spec.storage_nodes:
        stats = await client.stats(node.node_id)
        assert stats == {
            "read_queue_blocks": 0,
            "read_queue_bytes": 0,
            "bytes_read": 6 * bb,
            "bytes_written": 5 * bb,
            "num_blocks_stored": 5,
            "num_errors": 0,
        }
        local = servers[node.node_id].stats
        assert local.bytes_read == stats["bytes_read"]
        assert local.read_queue_blocks == 0


async def test_read_queue_holds_blocks_not_yet_sent(
    spec: ClusterSpec, client: StorageClient
) -> None:
    # 48 MiB from one server: more than the sockets and stream buffers between the server and
    # a client that is busy in on_chunk can hold (~25 MiB), so blocks must still be queued.
    bb = spec.profile.block_bytes
    blocks = owned_by(spec, "storage-0", 0, (48 << 20) // bb)
    await client.write(0, blocks)
    queued: list[dict[str, int]] = []

    async def on_chunk(entries: list[list[int]], payload: bytes) -> None:
        if not queued:
            queued.append(await client.stats("storage-0"))

    await client.read(0, blocks, on_chunk)
    assert 0 < queued[0]["read_queue_blocks"] < len(blocks)
    assert queued[0]["read_queue_bytes"] == queued[0]["read_queue_blocks"] * bb
    after = await client.stats("storage-0")
    assert (after["read_queue_blocks"], after["read_queue_bytes"]) == (0, 0)


async def test_read_queue_empties_when_the_reader_goes_away(
    spec: ClusterSpec, client: StorageClient
) -> None:
    blocks = owned_by(spec, "storage-0", 0, (48 << 20) // spec.profile.block_bytes)
    await client.write(0, blocks)

    class Enough(Exception):
        pass

    async def on_chunk(entries: list[list[int]], payload: bytes) -> None:
        raise Enough

    with pytest.raises(Enough):
        await client.read(0, blocks, on_chunk)
    # The client closed its connection mid-stream; the server notices when its next send
    # fails. Wait for that condition through real stats round trips (no sleeps).
    async with asyncio.timeout(TIMEOUT_S):
        while (await client.stats("storage-0"))["read_queue_blocks"]:
            pass
    assert (await client.stats("storage-0"))["read_queue_bytes"] == 0


async def test_concurrent_reads_share_a_small_pool(spec: ClusterSpec, servers: object) -> None:
    c = StorageClient(spec, max_conns_per_server=2)
    try:
        await c.write(6, range(8))
        sizes = await asyncio.gather(*(c.read(6, [b, (b + 1) % 8]) for b in range(8)))
        assert sizes == [2 * spec.profile.block_bytes] * 8
        assert c.bytes_verified == 16 * spec.profile.block_bytes
    finally:
        await c.close()


# -- errors -----------------------------------------------------------------------------------


async def test_missing_block_is_an_error_and_nothing_is_sent(
    spec: ClusterSpec, client: StorageClient
) -> None:
    await client.write(4, range(4))
    with pytest.raises(RemoteError) as err:
        await client.read(4, [0, 1, 2, 99])
    assert err.value.code == "missing"
    with pytest.raises(RemoteError) as err:
        await client.read(12345, [0])
    assert err.value.code == "missing"
    stats = [await client.stats(n.node_id) for n in spec.storage_nodes]
    assert sum(s["num_errors"] for s in stats) == 2
    assert all(s["read_queue_blocks"] == 0 for s in stats)
    assert await client.read(4, range(4)) == 4 * spec.profile.block_bytes  # still serving


async def test_corruption_on_disk_is_caught_by_the_client(
    spec: ClusterSpec, client: StorageClient
) -> None:
    bb = spec.profile.block_bytes
    await client.write(7, range(6))
    victim = owned_by(spec, "storage-0", 7, 2)[1]
    path = traj_file(spec, "storage-0", 7)
    with path.open("r+b") as f:
        f.seek(victim * bb + bb // 2)
        byte = f.read(1)
        f.seek(victim * bb + bb // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    verified_before = client.bytes_verified
    with pytest.raises(KvCorruption, match="not the expected KV"):
        await client.read(7, [victim])
    assert client.bytes_verified == verified_before
    healthy = [b for b in range(6) if b != victim]
    assert await client.read(7, healthy) == len(healthy) * bb


async def test_malformed_frame_gets_an_error_and_a_closed_connection(
    spec: ClusterSpec, client: StorageClient
) -> None:
    await client.write(8, range(4))
    ep = spec.node("storage-0").storage
    assert ep is not None
    async with asyncio.timeout(TIMEOUT_S):
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        writer.write(b"GET /blocks HTTP/1.1\r\nHost: storage\r\n\r\n")
        await writer.drain()
        reply = await reader.read()  # until the server closes the connection
        writer.close()
        await writer.wait_closed()
    (frame,) = FrameDecoder().feed(reply)
    assert frame.kind == "error"
    assert frame.header["code"] == "malformed"
    assert await client.read(8, range(4)) == 4 * spec.profile.block_bytes


async def test_corrupt_write_is_rejected_and_nothing_is_stored(
    spec: ClusterSpec, client: StorageClient
) -> None:
    gen = generator(spec)
    groups = spec.profile.layer_groups
    b0, b1 = owned_by(spec, "storage-0", 9, 2)
    conn = await data_conn(spec, "storage-0")
    try:
        # A flipped bit in flight.
        entries, payload = gen.pack(9, [(b0, g) for g in range(groups)])
        damaged = bytearray(payload)
        damaged[10] ^= 1
        await conn.send(Frame("write", {"req": 1, "traj": 9, "entries": entries}, bytes(damaged)))
        with pytest.raises(RemoteError) as err:
            await conn.recv_reply()
        assert err.value.code == "corrupt"
        # Self-consistent but wrong: block b1's bytes with their own crcs, labelled b0.
        wrong = gen.full_block(9, b1)
        n = gen.slice_bytes
        relabelled = [[b0, g, crc(wrong[g * n : (g + 1) * n])] for g in range(groups)]
        await conn.send(Frame("write", {"req": 2, "traj": 9, "entries": relabelled}, wrong))
        with pytest.raises(RemoteError) as err:
            await conn.recv_reply()
        assert err.value.code == "corrupt"
        # The connection stays usable after an error reply.
        await conn.send(Frame("write", {"req": 3, "traj": 9, "entries": entries}, payload))
        reply = await conn.recv_reply()
        assert (reply.kind, reply.header["req"], reply.header["num_bytes"]) == (
            "write_done",
            3,
            len(payload),
        )
    finally:
        await conn.close()
    stats = await client.stats("storage-0")
    assert stats["num_blocks_stored"] == 1
    assert stats["num_errors"] == 2
    assert stats["bytes_written"] == len(payload)
    with pytest.raises(RemoteError) as err:
        await client.read(9, [b1])
    assert err.value.code == "missing"


async def test_corrupt_write_creates_no_file(spec: ClusterSpec, client: StorageClient) -> None:
    gen = generator(spec)
    (b0,) = owned_by(spec, "storage-1", 10, 1)
    entries, payload = gen.pack(10, [(b0, g) for g in range(spec.profile.layer_groups)])
    conn = await data_conn(spec, "storage-1")
    try:
        await conn.send(Frame("write", {"req": 1, "traj": 10, "entries": entries}, payload[:-1]))
        with pytest.raises(RemoteError) as err:
            await conn.recv_reply()
    finally:
        await conn.close()
    assert err.value.code == "corrupt"
    assert not traj_file(spec, "storage-1", 10).exists()
    assert (await client.stats("storage-1"))["num_blocks_stored"] == 0


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (Frame("read", {"req": 1, "traj": 1, "blocks": "all"}), "bad_request"),
        (Frame("read", {"req": 1, "traj": -1, "blocks": [0]}), "bad_request"),
        (Frame("read", {"req": 1, "blocks": [0]}), "bad_request"),
        (Frame("write", {"req": 1, "traj": 1, "entries": [[0, 0]]}), "bad_request"),
        (Frame("write", {"req": 1, "traj": 1, "entries": [[0, 1, 5]]}), "bad_request"),
        (Frame("stats", {"req": 1}), "unsupported"),  # stats is served on the mgmt port
        (Frame("delete", {"req": 1}), "unsupported"),
    ],
)
async def test_bad_requests_get_typed_errors_with_their_req(
    spec: ClusterSpec, servers: object, frame: Frame, code: str
) -> None:
    conn = await data_conn(spec, "storage-0")
    try:
        await conn.send(frame)
        reply = await conn.recv()
    finally:
        await conn.close()
    assert reply.kind == "error"
    assert (reply.header["code"], reply.header["req"]) == (code, 1)


# -- lifecycle --------------------------------------------------------------------------------


async def test_stop_removes_only_what_the_server_created(spec: ClusterSpec) -> None:
    node_dir = Path(spec.data_dir) / "storage-0"
    assert not Path(spec.data_dir).exists()
    server = StorageServer(spec, "storage-0")
    await server.start()
    foreign = node_dir / "notes.txt"
    foreign.write_text("not the server's")
    c = StorageClient(spec)
    try:
        blocks = owned_by(spec, "storage-0", 11, 3)
        await c.write(11, blocks)
        assert traj_file(spec, "storage-0", 11).exists()
    finally:
        await c.close()
        await server.stop()
    assert not traj_file(spec, "storage-0", 11).exists()
    assert foreign.read_text() == "not the server's"


async def test_stop_removes_the_directories_it_made_when_empty(spec: ClusterSpec) -> None:
    server = StorageServer(spec, "storage-1")
    await server.start()
    assert (Path(spec.data_dir) / "storage-1").is_dir()
    c = StorageClient(spec)
    try:
        await c.write(0, owned_by(spec, "storage-1", 0, 2))
    finally:
        await c.close()
        await server.stop()
    assert not Path(spec.data_dir).exists()


async def test_stop_ends_open_connections(spec: ClusterSpec) -> None:
    server = StorageServer(spec, "storage-0")
    await server.start()
    conn = await data_conn(spec, "storage-0")
    try:
        await conn.send(Frame("read", {"req": 1, "traj": 0, "blocks": []}))
        assert (await conn.recv_reply()).kind == "read_done"
        await server.stop()
        assert await conn.reader.read() == b""  # closed by the server
    finally:
        await conn.close()


async def test_serve_storage_runs_until_stopped(spec: ClusterSpec) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(serve_storage(spec, n.node_id, stop)) for n in spec.storage_nodes]
    c = StorageClient(spec)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while True:  # the servers are up once a stats round trip succeeds
                try:
                    for n in spec.storage_nodes:
                        await c.stats(n.node_id)
                    break
                except OSError:
                    continue
        assert await c.seed(1, 0, 4) == 4 * spec.profile.block_bytes
        assert await c.read(1, range(4)) == 4 * spec.profile.block_bytes
    finally:
        await c.close()
        stop.set()
        await asyncio.gather(*tasks)
    assert not any(t.exception() for t in tasks)


def test_a_server_needs_a_storage_node(spec: ClusterSpec) -> None:
    with pytest.raises(ValueError, match="not a storage server"):
        StorageServer(spec, "prefill-0")
    with pytest.raises(KeyError):
        StorageServer(spec, "storage-9")

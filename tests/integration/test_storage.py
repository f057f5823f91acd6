"""Storage servers and the storage client over real loopback TCP, with real files on disk."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from services.auth import FRAME_AUTH_FIELD
from services.codec import Frame, FrameDecoder
from services.kvblocks import KvCorruption, KvGenerator, SliceSet, crc
from services.spec import ClusterSpec
from services.storage import StorageServer, serve_storage
from services.storage_client import StorageClient, StorageProtocolError
from services.storage_files import CATALOG_NAME, read_catalog
from services.storage_protocol import READ_CHUNK_BYTES
from services.transport import ConnectionClosed, FrameConnection, RemoteError, connect
from services.transport_server import serve
from services.wire.frames import BlocksChunk, parse, slice_fields

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

    chunks: list[tuple[SliceSet, bytes | bytearray]] = []
    assert await client.read(3, blocks, lambda s, p: chunks.append((s, p))) == 40 * bb
    assert client.bytes_read == client.bytes_verified == 40 * bb
    gen = generator(spec)
    seen: dict[int, bytes] = {}
    for s, payload in chunks:
        assert len(payload) <= max(READ_CHUNK_BYTES, bb)  # whole blocks of ~512 KiB frames
        assert (s.traj, s.g0, s.g1) == (3, 0, groups)
        assert len(payload) == len(s.blocks) * bb
        for i, b in enumerate(s.blocks):
            seen[b] = bytes(payload[i * bb : (i + 1) * bb])
    per_frame = READ_CHUNK_BYTES // bb
    assert len(chunks) == 2 * -(-20 // per_frame)  # 20 blocks per server do not fit one frame
    assert seen == {b: gen.full_blocks(3, [b]) for b in blocks}


async def test_read_delivers_each_servers_blocks_in_request_order(
    spec: ClusterSpec, client: StorageClient
) -> None:
    blocks = [9, 2, 7, 4, 4, 0]  # out of order, with a repeat
    await client.write(1, sorted(set(blocks)))
    order: list[int] = []
    read = await client.read(1, blocks, lambda s, p: order.extend(s.blocks))
    assert read == len(blocks) * spec.profile.block_bytes
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


async def test_health_returns_the_servers_snapshot(
    spec: ClusterSpec, client: StorageClient
) -> None:
    await client.write(2, range(4))
    snapshot = await client.health("storage-1")
    assert (snapshot["process"], snapshot["part"]) == ("storage-1", "storage")
    assert "read_queue_bytes" in snapshot["gauges"]
    assert isinstance(snapshot["loop_lag"], list)
    assert snapshot["times"] is None or snapshot["times"]["cpu_s"] >= 0


async def test_stats_count_bytes_and_the_read_queue_drains(
    spec: ClusterSpec, client: StorageClient, servers: dict[str, StorageServer]
) -> None:
    bb = spec.profile.block_bytes
    await client.write(2, range(10))
    await client.read(2, range(10))
    await client.read(2, [0, 1])
    for node in spec.storage_nodes:
        stats = await client.stats(node.node_id)
        assert stats.pop("read_by") == {"?": 6 * bb}  # the client gave no client id
        assert stats.pop("boot") == servers[node.node_id].boot
        transport = stats.pop("transport")
        assert transport["kv_refused"] == transport["mgmt_refused"] == 0
        assert transport["kv_oversize"] == transport["kv_timed_out"] == 0
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
    # 48 MiB from one server to a reader that reads nothing yet: more than the sockets and
    # buffers between them hold (~25 MiB), so the server must stall with blocks still queued.
    bb = spec.profile.block_bytes
    blocks = owned_by(spec, "storage-0", 0, (48 << 20) // bb)
    await client.write(0, blocks)
    conn = await data_conn(spec, "storage-0")
    try:
        await conn.send(Frame("read", {"req": 1, "traj": 0, "blocks": blocks}))
        async with asyncio.timeout(TIMEOUT_S):  # stats round trips until it stalls, no sleeps
            while True:
                queued = await client.stats("storage-0")
                if 0 < queued["read_queue_blocks"] < len(blocks):
                    break
        assert queued["read_queue_bytes"] == queued["read_queue_blocks"] * bb
        gen = generator(spec)
        got: list[int] = []
        while (frame := await conn.recv_reply()).kind == "blocks":
            chunk = parse(frame, BlocksChunk)
            s = chunk.slices(layer_groups=gen.layer_groups, max_slices=1 << 20)
            gen.verify(s, frame.payload, chunk.crc)
            got.extend(s.blocks)
        assert frame.kind == "read_done"
        assert got == blocks
    finally:
        await conn.close()
    after = await client.stats("storage-0")
    assert (after["read_queue_blocks"], after["read_queue_bytes"]) == (0, 0)


async def test_read_queue_empties_when_the_reader_goes_away(
    spec: ClusterSpec, client: StorageClient
) -> None:
    blocks = owned_by(spec, "storage-0", 0, (48 << 20) // spec.profile.block_bytes)
    await client.write(0, blocks)

    class Enough(Exception):
        pass

    def on_chunk(s: SliceSet, payload: bytes | bytearray) -> None:
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


def write_frame(
    req: int, s: SliceSet, payload: bytes | bytearray, carried: int, *, secret: object
) -> Frame:
    """A storage write; `secret` is what its header presents (None: no auth field)."""
    head: dict[str, Any] = {"req": req, **slice_fields(s), "crc": carried}
    if secret is not None:
        head[FRAME_AUTH_FIELD] = secret
    return Frame("write", head, bytes(payload))


async def test_writes_and_seeds_without_the_labs_secret_are_refused_and_store_nothing(
    spec: ClusterSpec, client: StorageClient
) -> None:
    gen = generator(spec)
    (b0,) = owned_by(spec, "storage-0", 11, 1)
    s0 = SliceSet(11, (b0,), 0, spec.profile.layer_groups)
    payload = gen.payload(s0)
    ep = spec.node("storage-0").mgmt
    refused: list[str] = []
    for req, secret in enumerate((None, "", "x" * 43, spec.secret + "x", 7), start=1):
        conn = await data_conn(spec, "storage-0")
        mgmt = await connect(ep.host, ep.port, io_timeout_s=TIMEOUT_S)
        seed_head: dict[str, Any] = {"req": req, "traj": 12, "first_block": 0, "end_block": 8}
        if secret is not None:
            seed_head[FRAME_AUTH_FIELD] = secret
        try:
            await conn.send(write_frame(req, s0, payload, crc(payload), secret=secret))
            await mgmt.send(Frame("seed", seed_head))
            for c in (conn, mgmt):
                with pytest.raises(RemoteError) as err:
                    await c.recv_reply()
                refused.append(err.value.code)
        finally:
            await conn.close()
            await mgmt.close()
    assert refused == ["unauthorized"] * 10
    stats = await client.stats("storage-0")
    assert stats["num_blocks_stored"] == 0
    assert not traj_file(spec, "storage-0", 11).exists()
    assert not traj_file(spec, "storage-0", 12).exists()
    # The lab's own client presents the secret: the same seed is taken.
    assert await client.seed(12, 0, 8) > 0


async def test_corrupt_write_is_rejected_and_nothing_is_stored(
    spec: ClusterSpec, client: StorageClient
) -> None:
    gen = generator(spec)
    groups = spec.profile.layer_groups
    b0, b1 = owned_by(spec, "storage-0", 9, 2)
    s0 = SliceSet(9, (b0,), 0, groups)
    payload = gen.payload(s0)
    conn = await data_conn(spec, "storage-0")
    try:
        # A flipped bit in flight.
        damaged = bytearray(payload)
        damaged[10] ^= 1
        await conn.send(write_frame(1, s0, damaged, crc(payload), secret=spec.secret))
        with pytest.raises(RemoteError) as in_flight:
            await conn.recv_reply()
        assert in_flight.value.code == "corrupt"
        assert "corrupted in flight" in in_flight.value.message
        # Self-consistent but wrong: block b1's bytes with their own crc, labelled b0.
        wrong = gen.full_blocks(9, [b1])
        await conn.send(write_frame(2, s0, wrong, crc(wrong), secret=spec.secret))
        with pytest.raises(RemoteError) as wrong_content:
            await conn.recv_reply()
        assert wrong_content.value.code == "corrupt"
        assert "content is not the expected KV" in wrong_content.value.message
        # The connection stays usable after an error reply.
        await conn.send(write_frame(3, s0, payload, crc(payload), secret=spec.secret))
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
    s = SliceSet(10, (b0,), 0, spec.profile.layer_groups)
    payload = gen.payload(s)
    conn = await data_conn(spec, "storage-1")
    try:
        await conn.send(write_frame(1, s, payload[:-1], crc(payload[:-1]), secret=spec.secret))
        with pytest.raises(RemoteError) as err:
            await conn.recv_reply()
    finally:
        await conn.close()
    assert err.value.code == "corrupt"
    assert "payload of" in err.value.message
    assert not traj_file(spec, "storage-1", 10).exists()
    assert (await client.stats("storage-1"))["num_blocks_stored"] == 0


def _misbehave(
    gen: KvGenerator, how: str, traj: int, blocks: list[int]
) -> tuple[dict[str, Any], bytes]:
    """Header fields and payload of the one `blocks` frame a faulty server sends."""
    groups = gen.layer_groups
    s = SliceSet(traj, tuple(blocks), 0, groups)
    payload = gen.payload(s)
    head = {**slice_fields(s), "crc": crc(payload)}
    if how == "other_blocks":  # real blocks, correct crc, but not the ones asked for
        other = SliceSet(traj, tuple(b + 1 for b in blocks), 0, groups)
        payload = gen.payload(other)
        head = {**slice_fields(other), "crc": crc(payload)}
    elif how == "part_of_a_block":
        part = SliceSet(traj, tuple(blocks), 0, groups - 1)
        payload = gen.payload(part)
        head = {**slice_fields(part), "crc": crc(payload)}
    elif how == "flipped_bit":
        damaged = bytearray(payload)
        damaged[len(damaged) // 3] ^= 4
        payload = bytes(damaged)
    elif how == "wrong_content":  # claims the blocks asked for, carries others (own crc)
        payload = gen.payload(SliceSet(traj + 1, tuple(blocks), 0, groups))
        head["crc"] = crc(payload)
    elif how == "other_traj":  # the same blocks of another trajectory, self-consistent
        other = SliceSet(traj + 1, tuple(blocks), 0, groups)
        payload = gen.payload(other)
        head = {**slice_fields(other), "crc": crc(payload)}
    elif how == "malformed":
        head["runs"] = [[blocks[0]]]
    return head, payload


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        ("other_blocks", KvCorruption, "whole blocks in request order"),
        ("part_of_a_block", KvCorruption, "whole blocks in request order"),
        ("flipped_bit", KvCorruption, "corrupted in flight"),
        ("wrong_content", KvCorruption, "content is not the expected KV"),
        ("other_traj", StorageProtocolError, "traj 13"),
        ("malformed", StorageProtocolError, "runs"),
    ],
)
async def test_the_client_rejects_a_chunk_that_is_not_what_it_asked_for(
    spec: ClusterSpec, how: str, error: type[Exception], match: str
) -> None:
    gen = generator(spec)
    traj = 12
    blocks = owned_by(spec, "storage-0", traj, 3)

    async def faulty(conn: FrameConnection, frame: Frame) -> None:
        head, payload = _misbehave(gen, how, traj, frame.header["blocks"])
        await conn.send(Frame("blocks", {"req": frame.header["req"], **head}, payload))

    ep = spec.node("storage-0").storage
    assert ep is not None
    server = await serve(ep.host, ep.port, faulty)
    c = StorageClient(spec)
    chunks: list[SliceSet] = []
    try:
        with pytest.raises(error, match=match):
            await c.read(traj, blocks, lambda s, p: chunks.append(s))
    finally:
        await c.close()
        await server.close()
    assert chunks == []  # the caller never sees an unverified chunk
    assert c.bytes_verified == 0


BAD = "bad_request"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (Frame("read", {"req": 1, "traj": 1, "blocks": "all"}), "bad_request"),
        (Frame("read", {"req": 1, "traj": -1, "blocks": [0]}), "bad_request"),
        (Frame("read", {"req": 1, "blocks": [0]}), "bad_request"),
        (Frame("write", {"req": 1, "traj": 1, "runs": [[0]], "g0": 0, "g1": 5, "crc": 0}), BAD),
        (Frame("write", {"req": 1, "traj": 1, "runs": [[0, 1]], "g0": 0, "g1": 6, "crc": 0}), BAD),
        (Frame("write", {"req": 1, "traj": 1, "runs": [[0, 1]], "g0": 0, "g1": 1, "crc": 0}), BAD),
        (Frame("write", {"req": 1, "traj": 1, "runs": [[0, 1]], "g0": 0, "g1": 5}), BAD),
        (Frame("write", {"req": 1, "traj": 1, "entries": [[0, 1, 5]]}), BAD),  # v1
        (Frame("stats", {"req": 1}), "unsupported"),  # stats is served on the mgmt port
        (Frame("health", {"req": 1}), "unsupported"),  # so is health
        (Frame("delete", {"req": 1}), "unsupported"),
    ],
)
async def test_bad_requests_get_typed_errors_with_their_req(
    spec: ClusterSpec, servers: object, frame: Frame, code: str
) -> None:
    assert spec.profile.layer_groups == 5  # the write frames above are built for 5 groups
    if frame.kind == "write":  # authorised, so that the request itself is what is judged
        frame = Frame(frame.kind, {**frame.header, FRAME_AUTH_FIELD: spec.secret}, frame.payload)
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
        with pytest.raises(ConnectionClosed):  # closed by the server
            await conn.recv()
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


async def test_a_killed_server_restarts_with_what_it_stored(
    spec: ClusterSpec, tmp_path: Path
) -> None:
    """SIGKILL leaves the files on disk, as on a real storage server: the restarted process
    serves every block it had stored, verified, and a clean stop still removes them."""
    spec_path = tmp_path / "spec.json"
    spec.dump(spec_path)
    node = "storage-0"
    argv = [sys.executable, "-m", "services", "--spec", str(spec_path), "--node", node]

    async def started() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.DEVNULL)
        c = StorageClient(spec)
        try:
            async with asyncio.timeout(TIMEOUT_S):
                while True:  # until it answers
                    try:
                        await c.stats(node)
                        return proc
                    except OSError:
                        await asyncio.sleep(0.05)
        finally:
            await c.close()

    blocks = owned_by(spec, node, 7, 12)
    proc = await started()
    c = StorageClient(spec)
    try:
        await c.write(7, blocks)
        await c.write(8, owned_by(spec, node, 8, 3))
    finally:
        await c.close()
    proc.kill()
    await proc.wait()
    catalog = Path(spec.data_dir) / node / CATALOG_NAME
    with catalog.open("ab") as f:
        f.write(b"\x92\x07")  # [7, ... cut off by the kill

    proc = await started()
    c = StorageClient(spec)
    try:
        assert (await c.stats(node))["num_blocks_stored"] == 15
        got = await c.read(7, blocks)
        assert got == c.bytes_verified == 12 * spec.profile.block_bytes
        with pytest.raises(RemoteError, match="not stored"):
            await c.read(9, owned_by(spec, node, 9, 1))
    finally:
        await c.close()
        proc.terminate()
        assert await proc.wait() == 0
    assert not traj_file(spec, node, 7).exists() and not catalog.exists()


def test_catalog_records_survive_a_torn_or_damaged_tail() -> None:
    good = msgpack.packb([3, [[0, 4]]]) + msgpack.packb([5, [[2, 1], [9, 2]]])
    assert read_catalog(good) == [(3, [(0, 4)]), (5, [(2, 1), (9, 2)])]
    assert read_catalog(good + msgpack.packb([6, [[0, 9]]])[:-1]) == read_catalog(good)
    assert read_catalog(good + msgpack.packb(["x", 1]) + good) == read_catalog(good)
    assert read_catalog(good + msgpack.packb([6, [[-1, 2]]])) == read_catalog(good)
    assert read_catalog(b"") == []

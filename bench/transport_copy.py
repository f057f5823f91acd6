"""Bench: goodput and CPU per GB of the frame transport on loopback, in one process.

Sends --mib MiB of frames (payloads cycling 256 KiB, 512 KiB, 1 MiB, 2 MiB, 4 MiB) from
services.transport.connect() to services.transport_server.serve() over 127.0.0.1 and reports
MB/s and CPU seconds per GB (time.process_time: sender and receiver together, they share the
process). Unless --no-baseline, the same frames also go through the receive path the
transport had before (asyncio streams, StreamReader.readexactly), side by side in the same
run, so the ratio is what to read, not the absolute numbers. Reports; asserts nothing. A few
seconds at the defaults; the machine is shared, so keep --mib small.

    .venv/bin/python bench/transport_copy.py [--mib 512] [--loop both] [--verify] [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402

from services.codec import (  # noqa: E402
    PREFIX_SIZE,
    Frame,
    decode_header,
    encode,
    parse_prefix,
)
from services.transport import FrameConnection, connect  # noqa: E402
from services.transport_server import serve  # noqa: E402

HOST = "127.0.0.1"
FRAME_KIB = (256, 512, 1024, 2048, 4096)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


@dataclass(frozen=True)
class Result:
    loop: str
    path: str
    nbytes: int
    wall_s: float
    cpu_s: float

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.wall_s / 1e6

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_s / (self.nbytes / 1e9)


def plan(total_bytes: int) -> list[int]:
    """Payload sizes cycling through FRAME_KIB until `total_bytes` are covered."""
    sizes: list[int] = []
    i = 0
    while sum(sizes) < total_bytes:
        sizes.append(FRAME_KIB[i % len(FRAME_KIB)] << 10)
        i += 1
    return sizes


async def run_transport(payloads: list[bytes], verify: bool) -> tuple[float, float]:
    """The new path: BufferedProtocol receive, zero-copy send. Returns (wall_s, cpu_s)."""
    done = asyncio.Event()
    remaining = [len(payloads)]

    async def handler(conn: FrameConnection, frame: Frame) -> None:
        if verify:
            zlib.crc32(frame.payload)
        remaining[0] -= 1
        if remaining[0] == 0:
            done.set()

    server = await serve(HOST, 0, handler)
    port = int(server.sockets[0].getsockname()[1])
    conn = await connect(HOST, port)
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for payload in payloads:
            await conn.send(Frame("kv", {"n": len(payload)}, payload))
        await done.wait()
        return time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await conn.close()
        await server.close()


async def run_streams(payloads: list[bytes], verify: bool) -> tuple[float, float]:
    """The previous path, for comparison: asyncio streams, readexactly per frame part."""
    done = asyncio.Event()
    remaining = [len(payloads)]

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while remaining[0]:
                hlen, plen = parse_prefix(await reader.readexactly(PREFIX_SIZE))
                decode_header(await reader.readexactly(hlen))
                payload = await reader.readexactly(plen) if plen else b""
                if verify:
                    zlib.crc32(payload)
                remaining[0] -= 1
            done.set()
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, HOST, 0, limit=4 << 20)
    port = int(server.sockets[0].getsockname()[1])
    _reader, writer = await asyncio.open_connection(HOST, port, limit=4 << 20)
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for payload in payloads:
            writer.writelines(encode(Frame("kv", {"n": len(payload)}, payload)))
            await writer.drain()
        await done.wait()
        return time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


def measure(loop: str, path: str, payloads: list[bytes], verify: bool) -> Result:
    fn = run_transport if path == "transport" else run_streams
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(fn(payloads[:8], verify))  # warm-up: connections, allocator, caches
        wall_s, cpu_s = runner.run(fn(payloads, verify))
    return Result(loop, path, sum(len(p) for p in payloads), wall_s, cpu_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB to send per measured run")
    parser.add_argument("--loop", choices=[*LOOPS, "both"], default="both")
    parser.add_argument(
        "--verify", action="store_true", help="crc32 each payload at the receiver, as KV is"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the previous (streams) receive path"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.mib < 1:
        parser.error("--mib must be >= 1")

    pool = random.Random(args.seed).randbytes(max(FRAME_KIB) << 10)
    payloads = [pool[:size] for size in plan(args.mib << 20)]
    loops = list(LOOPS) if args.loop == "both" else [args.loop]
    paths = ["transport"] if args.no_baseline else ["transport", "streams"]

    print(
        f"{args.mib} MiB in {len(payloads)} frames of {'/'.join(map(str, FRAME_KIB))} KiB"
        f"{', crc32 at the receiver' if args.verify else ''}; one process, loopback"
    )
    head = f"{'loop':8} {'path':10} {'MB/s':>8} {'CPU s/GB':>9} {'wall s':>7}"
    print(head)
    print("-" * len(head))
    for loop in loops:
        results = [measure(loop, path, payloads, args.verify) for path in paths]
        for r in results:
            print(f"{r.loop:8} {r.path:10} {r.mb_per_s:8.0f} {r.cpu_s_per_gb:9.3f} {r.wall_s:7.2f}")
        if len(results) == 2:
            new, old = results
            print(
                f"{loop:8} {'ratio':10} {new.mb_per_s / old.mb_per_s:7.2f}x "
                f"{new.cpu_s_per_gb / old.cpu_s_per_gb:8.2f}x  (transport / streams)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

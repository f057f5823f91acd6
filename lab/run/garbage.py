"""Garbage for listening ports: random bytes, oversize length prefixes, slow senders and
floods of connections, each followed by a legitimate request that must still be answered.

Used by tests/integration/test_garbage.py against servers on loopback and by bench/garbage.py
inside a lab's namespaces (`python -m lab.run.garbage TARGETS.json`, one JSON report on stdout).
It only opens client connections to the endpoints it is given; it never touches a process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from services.codec import PREFIX, Frame
from services.transport import RemoteError, connect

Protocol = Literal["frames", "http", "grpc"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Target:
    """One listening port and how to ask it something legitimate."""

    node: str
    name: str
    """Which port of the node (kv, mgmt, collective, storage, http, grpc, metrics)."""
    host: str
    port: int
    protocol: Protocol
    probe: str = "stats"
    """frames: the frame kind to send (stats, collective, read); http: the GET path."""


@dataclass(slots=True)
class Outcome:
    """What one port did under each attack, and whether it answered afterwards."""

    node: str
    name: str
    port: int
    serves_before: bool = False
    random_closed: int = 0
    oversize_closed: int = 0
    slow_cut_after_s: float | None = None
    flood_opened: int = 0
    flood_closed_by_server: int = 0
    serves_after: bool = False
    errors: list[str] = field(default_factory=list)


# -- probes -----------------------------------------------------------------------------------


async def probe(t: Target, *, timeout_s: float = 10.0) -> bool:
    """Whether the port answers one legitimate request within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            if t.protocol == "frames":
                return await _probe_frames(t)
            if t.protocol == "http":
                return await _probe_http(t)
            return await _probe_grpc(t)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


async def _probe_frames(t: Target) -> bool:
    conn = await connect(t.host, t.port, io_timeout_s=10.0)
    try:
        if t.probe == "collective":
            frame = Frame("collective", {}, b"\0" * 64)
        elif t.probe == "read":
            frame = Frame("read", {"req": 1, "traj": 0, "blocks": []})
        else:
            frame = Frame(t.probe, {"req": 1})
        await conn.send(frame)
        with contextlib.suppress(RemoteError):  # an error frame is an answer: the handler ran
            await conn.recv_reply()
        return True
    finally:
        await conn.close()


async def _probe_http(t: Target) -> bool:
    reader, writer = await asyncio.open_connection(t.host, t.port)
    try:
        writer.write(f"GET {t.probe} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        return line.startswith(b"HTTP/1.")  # any status: the stdlib server says HTTP/1.0
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _probe_grpc(t: Target) -> bool:
    import grpc
    from grpc import aio

    async with aio.insecure_channel(f"{t.host}:{t.port}") as channel:
        call = channel.unary_unary(f"/{t.probe}", request_serializer=None)
        try:
            await call(b"\x80", timeout=5.0)
        except aio.AioRpcError as exc:
            # Any status the server chose is an answer (UNAUTHENTICATED without the secret).
            silent = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return exc.code() not in silent
        return True


# -- attacks ----------------------------------------------------------------------------------


async def _closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """Whether the server ends the connection (EOF or reset) within `timeout_s`; what it
    sends first (an error frame, a 400) is read and dropped."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(65536):
                pass
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


async def _send_then_wait(t: Target, data: bytes, timeout_s: float) -> bool:
    try:
        reader, writer = await asyncio.open_connection(t.host, t.port)
    except OSError:
        return False
    try:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(data)
            await writer.drain()
        return await _closed_within(reader, timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def random_bytes(
    t: Target, rng: random.Random, *, connections: int = 4, size: int = 64 << 10
) -> int:
    """Connections that send `size` random bytes; how many the server closed."""
    blobs = [rng.randbytes(size) for _ in range(connections)]
    results = await asyncio.gather(*(_send_then_wait(t, b, 10.0) for b in blobs))
    return sum(results)


def oversize_messages(t: Target) -> list[bytes]:
    """Length prefixes far over any limit, in the port's own protocol."""
    if t.protocol == "frames":
        return [
            PREFIX.pack(b"DP", 1, 8, 0xFFFF_FFFF) + b"\x81\xa1t\xa4read" + b"\0" * 4096,
            PREFIX.pack(b"DP", 1, 0xFFFF_FFFF, 0) + b"\0" * 4096,
            PREFIX.pack(b"DP", 1, 1 << 20, 0) + b"\xdd" + struct.pack("!I", 1 << 20),
        ]
    if t.protocol == "http":
        return [
            (
                f"POST {t.probe} HTTP/1.1\r\nHost: lab\r\nContent-Length: 1099511627776\r\n\r\n"
            ).encode()
            + b"x" * 65536,
            f"GET {t.probe} HTTP/1.1\r\nHost: lab\r\nX-Big: ".encode() + b"a" * (1 << 20),
        ]
    # HTTP/2: a DATA frame header announcing 16 MiB - 1, then a SETTINGS frame of junk.
    return [
        H2_PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"\0" * 4096,
        H2_PREFACE + b"\x00\xff\xff\x04\x00\x00\x00\x00\x00" + b"\x07" * 65535,
    ]


async def oversize(t: Target) -> int:
    """How many oversize messages made the server close the connection."""
    results = await asyncio.gather(*(_send_then_wait(t, m, 15.0) for m in oversize_messages(t)))
    return sum(results)


def slow_start(t: Target) -> bytes:
    """Bytes a slow sender trickles: the start of something legitimate that never ends."""
    if t.protocol == "frames":
        return PREFIX.pack(b"DP", 1, 200, 0) + b"\x81\xa1t\xa5stats" + b"\xc0" * 190
    if t.protocol == "http":
        return f"GET {t.probe} HTTP/1.1\r\nHost: lab\r\n".encode() + b"X-Slow: " + b"a" * 4000
    return H2_PREFACE + b"\0" * 4000


async def slow_sender(t: Target, *, interval_s: float = 1.0, max_s: float = 60.0) -> float | None:
    """Trickle one byte every `interval_s`; seconds until the server cut the connection, or
    None if it had not after `max_s`."""
    try:
        reader, writer = await asyncio.open_connection(t.host, t.port)
    except OSError:
        return 0.0
    started = time.monotonic()
    data = slow_start(t)

    async def trickle() -> None:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(interval_s)

    sender = asyncio.ensure_future(trickle())
    try:
        closed = await _closed_within(reader, max_s)
        return time.monotonic() - started if closed else None
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def flood(t: Target, n: int, *, hold_s: float = 2.0) -> tuple[int, int]:
    """Open `n` connections at once (at most 256 handshakes in flight), hold them `hold_s`
    sending nothing, then close them: (opened, closed by the server meanwhile)."""
    gate = asyncio.Semaphore(256)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        async with gate:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(10.0):
                    conns.append(await asyncio.open_connection(t.host, t.port))

    await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(hold_s)
    closed = sum(1 for r, _ in conns if r.at_eof() or _peer_gone(r))
    for _, w in conns:
        w.transport.abort()
    await asyncio.sleep(0.2)
    return len(conns), closed


def _peer_gone(reader: asyncio.StreamReader) -> bool:
    return reader.exception() is not None


async def attack(
    t: Target,
    rng: random.Random,
    *,
    flood_connections: int = 2000,
    slow_max_s: float = 60.0,
    slow_interval_s: float = 1.0,
    flood_lock: asyncio.Lock | None = None,
) -> Outcome:
    """Every attack on one port, then the probe. A flood takes `flood_lock` (one flood at a
    time keeps this process's descriptors in bounds)."""
    out = Outcome(t.node, t.name, t.port)
    out.serves_before = await probe(t)
    slow = asyncio.ensure_future(slow_sender(t, interval_s=slow_interval_s, max_s=slow_max_s))
    try:
        out.random_closed = await random_bytes(t, rng)
        out.oversize_closed = await oversize(t)
        async with flood_lock or contextlib.nullcontext():
            out.flood_opened, out.flood_closed_by_server = await flood(t, flood_connections)
        out.slow_cut_after_s = await slow
    except Exception as exc:  # a report names what broke; the other ports go on
        out.errors.append(f"{type(exc).__name__}: {exc}")
        slow.cancel()
    out.serves_after = await probe(t)
    return out


def raise_fd_limit(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def peak_rss_bytes(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process in bytes; (0, 0) when it is gone."""
    hwm = rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        return 0, 0
    return hwm, rss


async def attack_all(
    targets: Sequence[Target], *, seed: int, flood_connections: int, slow_max_s: float
) -> list[Outcome]:
    raise_fd_limit(flood_connections + 512)
    lock = asyncio.Lock()
    rng = random.Random(seed)
    return list(
        await asyncio.gather(
            *(
                attack(
                    t,
                    random.Random(rng.random()),
                    flood_connections=flood_connections,
                    slow_max_s=slow_max_s,
                    flood_lock=lock,
                )
                for t in targets
            )
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("targets", help="JSON file: a list of Target fields")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--slow-max-s", type=float, default=90.0)
    args = ap.parse_args(argv)
    with open(args.targets) as f:
        targets = [Target(**t) for t in json.load(f)]
    outcomes = asyncio.run(
        attack_all(
            targets,
            seed=args.seed,
            flood_connections=args.connections,
            slow_max_s=args.slow_max_s,
        )
    )
    json.dump([asdict(o) for o in outcomes], sys.stdout)
    return 0


def outcome_from(data: dict[str, Any]) -> Outcome:
    return Outcome(**data)


if __name__ == "__main__":
    sys.exit(main())

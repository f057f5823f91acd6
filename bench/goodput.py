"""Bench: does the lab's own data plane fill a shaped link as well as iperf3 does?

Across one shaped snic (100 Mbit/s and 1 Gbit/s, egress of the sender) it measures, in one
run, iperf3's receiver-side goodput and the goodput of a bulk sender/receiver pair built from
the lab's own transport (services.transport.connect, services.transport_server.serve,
codec Frames carrying 1 MiB KvGenerator slices that the receiver verifies), and prints the
ratio lab/iperf3 (target >= 0.95). Needs root; writes results/bench/goodput.json.

    .venv/bin/python bench/goodput.py [--seconds 5] [--rates 100,1000] [--out results/bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from netem.kernel import require_net_admin  # noqa: E402
from netem.lifecycle import down_from_state  # noqa: E402
from netem.netns import NetnsLab  # noqa: E402
from netem.spec import HostSpec, LinkShape, NicSpec, TopologySpec  # noqa: E402

TARGET_RATIO = 0.95
SLICE_BYTES = 1 << 20
"""One frame = one 1 MiB KV slice (one layer group of one block)."""
RING_BLOCKS = 16
"""The sender cycles through this many distinct blocks, generated once: like a storage
server reading from its page cache, it does not pay the generator per frame."""
PORT = 7250
MTU, ETH, IPV4, TCP, TCP_TS = 1500, 14, 20, 20, 12
RECEIVER_ADDR = "198.18.1.200"


# --- the two lab roles (run inside the namespaces) ------------------------------------------
async def _receiver(bind: str, port: int, warmup_s: float) -> dict[str, Any]:
    from services.codec import Frame
    from services.kvblocks import KvGenerator
    from services.sockopts import Dscp
    from services.transport import FrameConnection
    from services.transport_server import serve
    from services.wire.frames import KvSlices, parse

    gen = KvGenerator(slice_bytes=SLICE_BYTES, layer_groups=1)
    done = asyncio.Event()
    stats: dict[str, Any] = {"frames": 0, "verified_bytes": 0, "errors": []}
    marks: list[tuple[float, int]] = []

    async def handler(conn: FrameConnection, frame: Frame) -> None:
        if frame.kind == "kv":
            try:
                msg = parse(frame, KvSlices)
                s = msg.slices(layer_groups=1, max_slices=1)
                n = gen.verify(s, frame.payload, msg.crc)
            except Exception as exc:  # a KvCorruption is a result to report, not a crash
                stats["errors"].append(str(exc))
                raise
            stats["frames"] += 1
            stats["verified_bytes"] += n
            marks.append((time.monotonic(), stats["verified_bytes"]))
        elif frame.kind == "end":
            await conn.send(Frame("end_ack", {"verified_bytes": stats["verified_bytes"]}))
            done.set()

    server = await serve(bind, port, handler, dscp=Dscp.KV)
    print("ready", flush=True)
    try:
        await done.wait()
        # Let the sender hang up first: closing the server cancels live connections, and
        # asyncio 3.11 logs a traceback for each cancelled connection task.
        async with asyncio.timeout(10):
            while server.tasks:
                await asyncio.sleep(0.01)
    finally:
        await server.close()
    # Goodput over the window after the warm-up, like iperf3's --omit.
    start = marks[0][0] + warmup_s if marks else 0.0
    window = [m for m in marks if m[0] >= start]
    if len(window) >= 2:
        seconds = window[-1][0] - window[0][0]
        nbytes = window[-1][1] - window[0][1]
        stats["goodput_bit"] = nbytes * 8 / seconds
        stats["window_s"] = seconds
    else:
        stats["goodput_bit"] = 0.0
        stats["window_s"] = 0.0
    return stats


async def _sender(host: str, port: int, local: str, seconds: float) -> dict[str, Any]:
    from services.codec import Frame
    from services.kvblocks import KvGenerator, SliceSet, crc
    from services.sockopts import Dscp
    from services.transport import connect
    from services.wire.frames import KvSlices, to_frame

    gen = KvGenerator(slice_bytes=SLICE_BYTES, layer_groups=1)
    traj = 7
    ring = []
    for block in range(RING_BLOCKS):
        s = SliceSet(traj, (block,), 0, 1)
        payload = gen.payload(s)
        ring.append(to_frame(KvSlices.of("goodput", "goodput", s, crc(payload)), payload))
    conn = await connect(host, port, dscp=Dscp.KV, local_host=local)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await conn.send(ring[sent % RING_BLOCKS])
        sent += 1
    await conn.send(Frame("end"))
    ack = await conn.recv_reply()
    await conn.close()
    return {"frames_sent": sent, "acked_bytes": int(ack.header["verified_bytes"])}


def _role_main(args: argparse.Namespace) -> int:
    import uvloop

    if args.role == "receiver":
        result = uvloop.run(_receiver(args.bind, args.port, args.warmup))
    else:
        result = uvloop.run(_sender(args.connect, args.port, args.bind, args.seconds))
    print(json.dumps(result), flush=True)
    return 0


# --- the orchestrator ---------------------------------------------------------------------
@dataclass
class Row:
    rate_mbit: float
    wire_goodput_mbit: float
    """Rate less the Ethernet/IP/TCP headers of full-size frames (what a perfect TCP gets)."""
    iperf3_mbit: float
    lab_mbit: float
    ratio: float
    lab_verified_bytes: int
    lab_frames: int
    iperf3_retransmits: int


def _node(rate_mbit: float) -> str:
    return f"prefill-{int(rate_mbit)}"


def _spec(rates: list[float]) -> TopologySpec:
    hosts = [
        HostSpec(
            _node(rate),
            (NicSpec("snic", "storage", f"198.18.1.{10 + i}/24", LinkShape(rate)),),
        )
        for i, rate in enumerate(rates)
    ]
    hosts.append(HostSpec("storage-0", (NicSpec("snic", "storage", f"{RECEIVER_ADDR}/24"),)))
    return TopologySpec("b" + secrets.token_hex(3), tuple(hosts))


def _run(argv: list[str], timeout: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _wait_listening(lab: NetnsLab, node: str, addr: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _run(lab.exec_argv(node, ["ss", "-Hltn", f"src {addr}:{port}"]), 10).strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"iperf3 server did not start in {node}")


def _iperf3(lab: NetnsLab, sender: str, src: str, seconds: float) -> tuple[float, int]:
    server = subprocess.Popen(
        lab.exec_argv("storage-0", ["iperf3", "-s", "-1", "-B", RECEIVER_ADDR, "-p", str(PORT)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(lab, "storage-0", RECEIVER_ADDR, PORT)
        argv = ["iperf3", "-c", RECEIVER_ADDR, "-p", str(PORT), "-B", src, "-J"]
        argv += ["-t", f"{seconds:g}", "-O", "1", "--dscp", "8"]
        out = json.loads(_run(lab.exec_argv(sender, argv), seconds + 60))
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    end = out["end"]
    return float(end["sum_received"]["bits_per_second"]), int(end["sum_sent"]["retransmits"])


def _lab_bulk(lab: NetnsLab, sender: str, src: str, seconds: float) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    receiver = subprocess.Popen(
        lab.exec_argv(
            "storage-0",
            [*me, "--role", "receiver", "--bind", RECEIVER_ADDR, "--port", str(PORT), "--warmup=1"],
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("bench receiver did not start")
        sent = json.loads(
            _run(
                lab.exec_argv(
                    sender,
                    [
                        *me,
                        "--role=sender",
                        f"--connect={RECEIVER_ADDR}",
                        f"--port={PORT}",
                        f"--bind={src}",
                        f"--seconds={seconds + 1:g}",
                    ],
                ),
                seconds + 60,
            )
        )
        got: dict[str, Any] = json.loads(receiver.stdout.readline())
        receiver.wait(timeout=10)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    got.update(sent)
    return got


def _table(rows: list[Row]) -> str:
    head = f"{'link':>10} {'wire max':>10} {'iperf3':>10} {'lab':>10} {'lab/iperf3':>10}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = "ok" if r.ratio >= TARGET_RATIO else f"BELOW {TARGET_RATIO}"
        lines.append(
            f"{r.rate_mbit:>7g} Mb {r.wire_goodput_mbit:>7.1f} Mb {r.iperf3_mbit:>7.1f} Mb "
            f"{r.lab_mbit:>7.1f} Mb {r.ratio:>10.3f}  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--rates", default="100,1000", help="shaped rates, Mbit/s")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a ratio misses 0.95")
    # internal: the two lab roles, run inside the namespaces
    parser.add_argument("--role", choices=["sender", "receiver"], help=argparse.SUPPRESS)
    parser.add_argument("--bind", help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return _role_main(args)

    require_net_admin()
    if shutil.which("iperf3") is None:
        print("iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",")]
    spec = _spec(rates)
    state_dir = Path(tempfile.mkdtemp(prefix="dualpath-bench-"))
    lab = NetnsLab(spec, state_dir=state_dir)
    rows: list[Row] = []
    try:
        lab.up()
        for i, rate in enumerate(rates):
            node, src = _node(rate), f"198.18.1.{10 + i}"
            payload = MTU - IPV4 - TCP - TCP_TS
            wire = rate * payload / (MTU + ETH)
            iperf_bit, retrans = _iperf3(lab, node, src, args.seconds)
            bulk = _lab_bulk(lab, node, src, args.seconds)
            if bulk["errors"]:
                raise RuntimeError(f"KV verification failed: {bulk['errors'][:3]}")
            rows.append(
                Row(
                    rate_mbit=rate,
                    wire_goodput_mbit=wire,
                    iperf3_mbit=iperf_bit / 1e6,
                    lab_mbit=bulk["goodput_bit"] / 1e6,
                    ratio=bulk["goodput_bit"] / iperf_bit,
                    lab_verified_bytes=int(bulk["verified_bytes"]),
                    lab_frames=int(bulk["frames"]),
                    iperf3_retransmits=retrans,
                )
            )
    finally:
        lab.down()
        down_from_state(spec.lab_id, state_dir=state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "goodput",
        "target_ratio": TARGET_RATIO,
        "seconds": args.seconds,
        "frame_payload_bytes": SLICE_BYTES,
        "direction": "egress of the sender's shaped snic, DSCP 8 (kv)",
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "rows": [asdict(r) for r in rows],
        "meets_target": all(r.ratio >= TARGET_RATIO for r in rows),
    }
    path = args.out / "goodput.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(rows))
    print(f"wrote {path}")
    return 1 if args.strict and not result["meets_target"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Bench: does cnic traffic isolation keep collective latency when KV relay saturates the link?

DualPath §5: model collectives must never wait behind KV. A full lab run on a 2-core machine
measures CPU scheduling more than the network, so this bench isolates the network: per rate
and per isolation setting (`on`: the lab's DSCP priority classes; `off`: one FIFO class, as
`network.isolation: false`) it builds four nodes joined as the lab joins them (namespaces,
veths, the lab switch), every cnic shaped by the lab's own planner and applier:

    prefill-0   the loaded node: its cnic ingress takes the KV relay of decode-0 and decode-1
                (2:1 fan-in, so the ingress is the bottleneck and queues), its egress sends
                PD KV to decode-0 (plain TCP bulk, IP_TOS = DSCP 8, like the engines' KV)
    prefill-1   its collective peer
    decode-0/1  relay senders (decode-0 also receives the PD KV)

The two prefill nodes exchange collective bursts the way engine nodes do (services.transport
frames, DSCP 46, `collective_kbytes_per_step` bytes each way's request, a small ack; the
server answers in the class it was asked in) and time each round trip. Each setting is
measured idle (collectives only) and loaded (KV streams running, after a warm-up that fills
the queues), repeated with on/off interleaved, all in one run. It reports p50/p99 round trips,
the loaded/idle ratios, the KV goodput, and from the kernel's class counters that the bytes went
into the intended classes. Needs root; writes results/bench/isolation.json.

    .venv/bin/python bench/isolation.py [--rates 100,1000] [--seconds 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from netem.counters import NicCounters  # noqa: E402
from netem.kernel import require_net_admin  # noqa: E402
from netem.lifecycle import down_from_state  # noqa: E402
from netem.netns import NetnsLab  # noqa: E402
from netem.spec import HostSpec, LinkShape, NicSpec, TopologySpec  # noqa: E402

TARGET_P99_RATIO = 1.5
"""Acceptance: with isolation, loaded collective p99 within 1.5x of its idle p99."""
ECHO_PORT = 7100
SINK_PORT = 7102
KV_DSCP = 8
WARMUP_PINGS = 10
"""Round trips dropped at the start of each phase (connection set-up, slow start)."""
KV_WARMUP_S = 1.5
"""KV streams run this long before the collectives are timed, so the queues are full."""
CHUNK = 1 << 20
ROLES = ("prefill-0", "prefill-1", "decode-0", "decode-1")


# --- the roles (run inside the namespaces) ------------------------------------------------------
def _stop_on_sigterm() -> None:
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def _sink(bind: str, port: int) -> int:
    """Accept KV streams and discard them until SIGTERM."""
    _stop_on_sigterm()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(16)
    print("ready", flush=True)

    def drain(conn: socket.socket) -> None:
        buf = bytearray(CHUNK)
        with conn:
            while conn.recv_into(buf):
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def _source(host: str, port: int, bind: str, dscp: int) -> int:
    """One saturating KV stream (plain TCP, IP_TOS = dscp << 2) until SIGTERM."""
    _stop_on_sigterm()
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp << 2)
    sock.bind((bind, 0))
    sock.connect((host, port))
    print("ready", flush=True)
    data = memoryview(bytes(CHUNK))
    with sock:
        while True:
            sock.sendall(data)


async def _echo(bind: str, port: int) -> None:
    """Answer collective frames the way an engine node's cnic server does."""
    from services.codec import Frame
    from services.sockopts import Dscp
    from services.transport import FrameConnection
    from services.transport_server import serve

    async def handler(conn: FrameConnection, frame: Frame) -> None:
        if frame.kind == "collective":
            conn.mark(Dscp.COLLECTIVE)
            await conn.send(Frame("collective_ack", {"n": len(frame.payload)}))

    server = await serve(bind, port, handler, dscp=Dscp.KV)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.close()


async def _ping(
    host: str, port: int, bind: str, size: int, interval_s: float, seconds: float
) -> None:
    """Collective bursts of `size` bytes, one at a time, each awaiting its ack; prints the
    round trips (ms) as JSON."""
    from services.codec import Frame
    from services.sockopts import Dscp
    from services.transport import connect

    conn = await connect(host, port, dscp=Dscp.COLLECTIVE, local_host=bind, io_timeout_s=30)
    payload = bytes(size)
    rtts: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        await conn.send(Frame("collective", {}, payload))
        await conn.recv_reply()
        rtts.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(interval_s)
    retrans = _total_retrans(conn.get_extra_info("socket"))
    await conn.close()
    print(json.dumps({"rtt_ms": rtts, "retransmits": retrans}), flush=True)


TCPI_TOTAL_RETRANS_OFFSET = 100
"""struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_total_retrans is the 24th."""


def _total_retrans(sock: Any) -> int:
    """Segments the pinger's connection retransmitted (a loss in a queue shows here)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int.from_bytes(info[TCPI_TOTAL_RETRANS_OFFSET : TCPI_TOTAL_RETRANS_OFFSET + 4], "little")


def _role_main(args: argparse.Namespace) -> int:
    import uvloop

    if args.role == "sink":
        return _sink(args.bind, args.port)
    if args.role == "source":
        return _source(args.connect, args.port, args.bind, KV_DSCP)
    if args.role == "echo":
        uvloop.run(_echo(args.bind, args.port))
        return 0
    uvloop.run(
        _ping(args.connect, args.port, args.bind, args.size, args.interval_ms / 1000, args.seconds)
    )
    return 0


# --- the orchestrator ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One (rate, isolation) setting: four nodes of its own."""

    rate_mbit: float
    isolation: bool

    @property
    def tag(self) -> str:
        return f"r{int(self.rate_mbit)}-{'on' if self.isolation else 'off'}"

    def node(self, role: str) -> str:
        return f"{self.tag}-{role}"


def _spec(cells: Sequence[Cell]) -> TopologySpec:
    hosts = []
    for i, cell in enumerate(cells):
        for j, role in enumerate(ROLES):
            shape = LinkShape(cell.rate_mbit, priority_classes=cell.isolation)
            addr = f"198.18.0.{10 + 4 * i + j}/24"
            hosts.append(HostSpec(cell.node(role), (NicSpec("cnic", "compute", addr, shape),)))
    return TopologySpec("i" + secrets.token_hex(3), tuple(hosts))


def _addr(lab: NetnsLab, node: str) -> str:
    return str(lab.spec.host(node).nic("cnic").interface.ip)


class Procs:
    """The role processes this bench started (by Popen handle; only those are ever stopped)."""

    def __init__(self, lab: NetnsLab) -> None:
        self.lab = lab
        self.me = [sys.executable, str(Path(__file__).resolve())]
        self.running: list[subprocess.Popen[str]] = []

    def start(
        self, node: str, args: list[str], *, wait_ready: bool = True
    ) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.lab.exec_argv(node, [*self.me, *args]),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.running.append(proc)
        if wait_ready:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{args[0]} in {node} did not start ({line!r})")
        return proc

    def role(
        self,
        cell: Cell,
        role: str,
        kind: str,
        port: int,
        *,
        peer: str | None = None,
        extra: Sequence[str] = (),
        wait_ready: bool = True,
    ) -> subprocess.Popen[str]:
        """Start `kind` (sink, source, echo, ping) on `role` of `cell`: bound to its cnic
        address, connecting to `peer`'s (a role of the same cell) when given."""
        node = cell.node(role)
        args = [f"--role={kind}", f"--bind={_addr(self.lab, node)}", f"--port={port}"]
        if peer is not None:
            args.append(f"--connect={_addr(self.lab, cell.node(peer))}")
        return self.start(node, [*args, *extra], wait_ready=wait_ready)

    def stop(self, procs: Sequence[subprocess.Popen[str]]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc in self.running:
                self.running.remove(proc)

    def stop_all(self) -> None:
        self.stop(list(self.running))


@contextmanager
def _servers(procs: Procs, lab: NetnsLab, cell: Cell) -> Iterator[None]:
    started = []
    try:
        for role in ("prefill-0", "prefill-1"):
            started.append(procs.role(cell, role, "echo", ECHO_PORT))
        for role in ("prefill-0", "decode-0", "decode-1"):
            started.append(procs.role(cell, role, "sink", SINK_PORT))
        yield
    finally:
        procs.stop(started)


def _pings(
    procs: Procs, lab: NetnsLab, cell: Cell, args: argparse.Namespace
) -> tuple[list[float], int]:
    """Both prefill nodes time collective bursts to each other at once; the pooled round trips
    and the segments their connections retransmitted."""
    pair = [("prefill-0", "prefill-1"), ("prefill-1", "prefill-0")]
    pause_ms = interval_ms(args.size, cell.rate_mbit, args.collective_share)
    extra = (f"--size={args.size}", f"--interval-ms={pause_ms:g}", f"--seconds={args.seconds:g}")
    running = [
        procs.role(cell, src, "ping", ECHO_PORT, peer=dst, extra=extra, wait_ready=False)
        for src, dst in pair
    ]
    rtts: list[float] = []
    retrans = 0
    for proc in running:
        out, _ = proc.communicate(timeout=args.seconds + 60)
        procs.running.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"a collective pinger exited {proc.returncode}")
        result = json.loads(out.strip().splitlines()[-1])
        rtts += result["rtt_ms"][WARMUP_PINGS:]
        retrans += int(result["retransmits"])
    return rtts, retrans


def interval_ms(size: int, rate_mbit: float, share: float) -> float:
    """Pause between one pinger's bursts so that the bursts take `share` of the link."""
    return size * 8 / (share * rate_mbit * 1e6) * 1000


LOADED_STREAMS = (("decode-0", "prefill-0"), ("decode-1", "prefill-0"), ("prefill-0", "decode-0"))
"""Relay decode-0 -> prefill-0 and decode-1 -> prefill-0 (2:1 fan-in: prefill-0's cnic ingress
is the bottleneck), PD KV prefill-0 -> decode-0 (its egress)."""
CPU_CONTROL_STREAMS = (("decode-1", "decode-0"), ("decode-1", "decode-0"), ("decode-0", "decode-1"))
"""As many KV streams at the same rates, on links the collectives never cross: the host's CPU
is about as busy as when loaded, the collectives' links are idle. What the collectives lose
here is CPU contention, not the network."""


def _kv_streams(
    procs: Procs, lab: NetnsLab, cell: Cell, streams: Sequence[tuple[str, str]]
) -> list[subprocess.Popen[str]]:
    return [procs.role(cell, src, "source", SINK_PORT, peer=dst) for src, dst in streams]


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (as lab.results.metrics.percentiles)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(rtts: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(rtts),
        "p50_ms": round(percentile(rtts, 0.5), 3),
        "p99_ms": round(percentile(rtts, 0.99), 3),
        "max_ms": round(max(rtts), 3) if rtts else float("nan"),
    }


def _class_check(
    before: NicCounters, after: NicCounters, seconds: float, rate_mbit: float, isolation: bool
) -> dict[str, Any]:
    """Per direction of the loaded cnic: link Mbit/s and each class's bytes over the window."""
    out: dict[str, Any] = {}
    for direction in ("egress", "ingress"):
        total = getattr(after, f"{direction}_bytes") - getattr(before, f"{direction}_bytes")
        entry: dict[str, Any] = {
            "link_mbit": round(total * 8 / seconds / 1e6, 2),
            "link_util": round(total * 8 / seconds / 1e6 / rate_mbit, 4),
            "drops": getattr(after, f"{direction}_drops") - getattr(before, f"{direction}_drops"),
        }
        classes_a = getattr(after, f"{direction}_classes")
        classes_b = getattr(before, f"{direction}_classes")
        if isolation:
            entry["class_bytes"] = {
                name: classes_a[name].bytes - classes_b[name].bytes for name in classes_a
            }
        else:
            entry["class_bytes"] = {"link (one FIFO class)": total}
        out[direction] = entry
    return out


def _backlog_sampler(
    lab: NetnsLab, node: str, stop: threading.Event, into: list[tuple[int, int]]
) -> threading.Thread:
    def run() -> None:
        while not stop.wait(0.25):
            c = lab.counters([node])[node]["cnic"]
            into.append((c.egress_backlog_bytes, c.ingress_backlog_bytes))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _cpu_control(procs: Procs, lab: NetnsLab, cell: Cell, args: argparse.Namespace) -> list[float]:
    streams = _kv_streams(procs, lab, cell, CPU_CONTROL_STREAMS)
    try:
        time.sleep(KV_WARMUP_S)
        return _pings(procs, lab, cell, args)[0]
    finally:
        procs.stop(streams)


def _measure_cell(
    procs: Procs, lab: NetnsLab, cell: Cell, args: argparse.Namespace
) -> dict[str, Any]:
    loaded_node = cell.node("prefill-0")
    idle, idle_retrans = _pings(procs, lab, cell, args)
    cpu = _cpu_control(procs, lab, cell, args)
    streams = _kv_streams(procs, lab, cell, LOADED_STREAMS)
    try:
        time.sleep(KV_WARMUP_S)
        backlog: list[tuple[int, int]] = []
        stop = threading.Event()
        before = lab.counters([loaded_node])[loaded_node]["cnic"]
        t0 = time.monotonic()
        sampler = _backlog_sampler(lab, loaded_node, stop, backlog)
        loaded, loaded_retrans = _pings(procs, lab, cell, args)
        stop.set()
        sampler.join()
        after = lab.counters([loaded_node])[loaded_node]["cnic"]
        window = time.monotonic() - t0
    finally:
        procs.stop(streams)
    sent = (len(loaded) + WARMUP_PINGS * 2) * args.size
    return {
        "idle": _stats(idle),
        "cpu_control": _stats(cpu),
        "loaded": _stats(loaded),
        "idle_rtt_ms": idle,
        "cpu_control_rtt_ms": cpu,
        "loaded_rtt_ms": loaded,
        "retransmits": {"idle": idle_retrans, "loaded": loaded_retrans},
        "counters": _class_check(before, after, window, cell.rate_mbit, cell.isolation),
        "collective_payload_bytes": sent,
        "mean_backlog_bytes": {
            "egress": round(sum(b[0] for b in backlog) / max(len(backlog), 1)),
            "ingress": round(sum(b[1] for b in backlog) / max(len(backlog), 1)),
        },
        "max_backlog_bytes": {
            "egress": max((b[0] for b in backlog), default=0),
            "ingress": max((b[1] for b in backlog), default=0),
        },
    }


def _merge(reps: list[dict[str, Any]]) -> dict[str, Any]:
    idle = [x for r in reps for x in r["idle_rtt_ms"]]
    cpu = [x for r in reps for x in r["cpu_control_rtt_ms"]]
    loaded = [x for r in reps for x in r["loaded_rtt_ms"]]
    i, lo = _stats(idle), _stats(loaded)
    return {
        "idle": i,
        "cpu_control": _stats(cpu),
        "loaded": lo,
        "p50_ratio": round(lo["p50_ms"] / i["p50_ms"], 3),
        "p99_ratio": round(lo["p99_ms"] / i["p99_ms"], 3),
        "p99_ratio_per_repeat": [
            round(r["loaded"]["p99_ms"] / r["idle"]["p99_ms"], 3) for r in reps
        ],
        "repeats": [{k: v for k, v in r.items() if not k.endswith("_rtt_ms")} for r in reps],
    }


def _table(results: dict[str, Any]) -> str:
    head = (
        f"{'rate':>9} {'isol.':>5} {'idle p50':>9} {'idle p99':>9} {'load p50':>9} "
        f"{'load p99':>9} {'p50 x':>6} {'p99 x':>6} {'p99 x per rep':>14} {'cpu p99':>9}  "
        f"{'relay in':>9} {'in backlog':>10}  verdict"
    )
    lines = [head, "-" * len(head)]
    for key, r in results.items():
        rate, iso = key.split("/")
        relay = sum(x["counters"]["ingress"]["link_mbit"] for x in r["repeats"]) / len(r["repeats"])
        backlog = sum(x["mean_backlog_bytes"]["ingress"] for x in r["repeats"]) / len(r["repeats"])
        if iso == "on":
            ok = r["p99_ratio"] <= TARGET_P99_RATIO
            verdict = "ok" if ok else f"ABOVE {TARGET_P99_RATIO}x"
        else:
            verdict = "-"
        per = ",".join(f"{x:.2f}" for x in r["p99_ratio_per_repeat"])
        lines.append(
            f"{rate:>6}Mb {iso:>5} {r['idle']['p50_ms']:>7.2f}ms {r['idle']['p99_ms']:>7.2f}ms "
            f"{r['loaded']['p50_ms']:>7.2f}ms {r['loaded']['p99_ms']:>7.2f}ms "
            f"{r['p50_ratio']:>5.2f}x {r['p99_ratio']:>5.2f}x {per:>14} "
            f"{r['cpu_control']['p99_ms']:>7.2f}ms  "
            f"{relay:>6.1f}Mb {backlog / 1e3:>8.1f}kB  {verdict}"
        )
    return "\n".join(lines)


def _class_lines(results: dict[str, Any], size: int) -> str:
    lines = ["class counters on prefill-0's cnic while loaded (first repeat, bytes):"]
    for key, r in results.items():
        c = r["repeats"][0]["counters"]
        parts = []
        for direction in ("egress", "ingress"):
            classes = ", ".join(f"{k} {v:,}" for k, v in c[direction]["class_bytes"].items())
            parts.append(f"{direction}: {classes}")
        lines.append(f"  {key}: " + "; ".join(parts))
    lines.append(
        f"  (collective payload sent by the pingers per repeat ~ "
        f"{results[next(iter(results))]['repeats'][0]['collective_payload_bytes']:,} "
        f"bytes in {size}-byte bursts, half each way)"
    )
    return "\n".join(lines)


FRAME_OVERHEAD = 1.10
"""Upper bound of wire bytes per payload byte of a collective burst: Ethernet, IP and TCP
headers of full-size segments are 4.6 %; the rest covers acks and pure TCP ACKs."""


def class_check_ok(rep: dict[str, Any], isolation: bool) -> bool:
    """The loaded phase's bytes went into the intended classes. Each direction of the loaded
    cnic carries one pinger's bursts (half the payload) plus the other's small acks: the
    collective class must have counted at least that payload and at most it with its headers
    and acks (so no KV leaked into it); kv must have carried the rest of the link's bytes
    (>= 95 % of it), and control next to nothing (< 0.1 % of the link)."""
    if not isolation:
        return True
    half = rep["collective_payload_bytes"] / 2
    for direction in ("egress", "ingress"):
        cb = rep["counters"][direction]["class_bytes"]
        total = sum(cb.values())
        if not half <= cb["collective"] <= half * FRAME_OVERHEAD:
            return False
        if cb["kv"] < 0.95 * (total - cb["collective"]) or cb["control"] > 0.001 * total:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,1000", help="cnic rates, Mbit/s")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per phase")
    parser.add_argument("--repeats", type=int, default=2, help="on/off interleaved repeats")
    parser.add_argument(
        "--size", type=int, default=65536, help="collective burst bytes (the lab's default)"
    )
    parser.add_argument(
        "--collective-share",
        type=float,
        default=0.1,
        help="collective bytes as a share of the link: sets the pause between bursts per rate "
        "(engines exchange one burst per layer-group step; KV is the bulk of the link)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    # internal: the roles, run inside the namespaces
    parser.add_argument(
        "--role", choices=["sink", "source", "echo", "ping"], help=argparse.SUPPRESS
    )
    parser.add_argument("--bind", help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--interval-ms", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return _role_main(args)

    require_net_admin()
    rates = [float(r) for r in args.rates.split(",")]
    cells = [Cell(rate, iso) for rate in rates for iso in (True, False)]
    spec = _spec(cells)
    state_dir = Path(tempfile.mkdtemp(prefix="dualpath-bench-"))
    lab = NetnsLab(spec, state_dir=state_dir)
    procs = Procs(lab)
    raw: dict[str, list[dict[str, Any]]] = {}
    try:
        lab.up()
        for rate in rates:
            pair = [c for c in cells if c.rate_mbit == rate]
            with _servers(procs, lab, pair[0]), _servers(procs, lab, pair[1]):
                for rep in range(args.repeats):
                    order = pair if rep % 2 == 0 else pair[::-1]
                    for cell in order:
                        key = f"{int(rate)}/{'on' if cell.isolation else 'off'}"
                        print(f"[isolation] {key} repeat {rep + 1}/{args.repeats}", file=sys.stderr)
                        raw.setdefault(key, []).append(_measure_cell(procs, lab, cell, args))
    finally:
        procs.stop_all()
        lab.down()
        down_from_state(spec.lab_id, state_dir=state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
    results = {key: _merge(reps) for key, reps in raw.items()}
    for key, r in results.items():
        iso = key.endswith("/on")
        r["class_check_ok"] = all(class_check_ok(rep, iso) for rep in r["repeats"])
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": "isolation",
        "target_p99_ratio": TARGET_P99_RATIO,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "collective_bytes": args.size,
        "collective_share": args.collective_share,
        "interval_ms": {
            str(int(r)): round(interval_ms(args.size, r, args.collective_share), 3) for r in rates
        },
        "kv_streams": "relay decode-0 -> prefill-0 and decode-1 -> prefill-0; PD prefill-0 -> "
        "decode-0; plain TCP, DSCP 8",
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "results": results,
        "raw_rtt_ms": {
            key: [{k: r[f"{k}_rtt_ms"] for k in ("idle", "cpu_control", "loaded")} for r in reps]
            for key, reps in raw.items()
        },
    }
    path = args.out / "isolation.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(_table(results))
    print(_class_lines(results, args.size))
    verdicts = [f"{k} {'ok' if r['class_check_ok'] else 'FAILED'}" for k, r in results.items()]
    print("class check: " + ", ".join(verdicts))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fidelity self-test: does this kernel shape the lab's links as the config says?

`dualpath selftest -c CONFIG` (and `dualpath run --selftest`) builds the config's network on
the netns backend — the same plan a run gets, under a lab id of its own — plus one unshaped
probe host per shaped network, so every shaped NIC direction is measured alone: receiver-side
TCP goodput of the NIC's egress (node -> probe) and of its ingress (probe -> node), compared
with rate x MSS / (MTU + 14), the payload share of the frames HTB charges (TCP/IP/Ethernet
headers included); and the round trip node <-> probe, compared with the configured delay
where a delay is configured and the kernel can emulate it. Links that do not share a
bottleneck are measured at once. It tears down exactly the lab it made. The plan of the
measurement and the verdicts are pure; `run_selftest` does the I/O.
"""

from __future__ import annotations

import math
import secrets
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.config.cluster import build_cluster_spec
from lab.config.models import ConfigError, LabConfig
from lab.config.topology import topology_for
from lab.run.backends import state_dir as default_state_dir
from netem.kernel import require_net_admin
from netem.netns import NetnsLab
from netem.spec import HostSpec, NicSpec, TopologySpec

ETH_HEADER = 14
"""HTB charges each frame with its Ethernet header (no FCS, preamble or gap)."""
IP_MTU = 14
"""getsockopt(IPPROTO_IP, IP_MTU): the path MTU of a connected socket (linux/in.h)."""
PROBE_PREFIX = "probe-"
CHUNK = 1 << 20
RTT_PINGS = 20
RTT_MESSAGE = 64
DELAY_FLOOR_MS = 1.0
"""A delay check passes within max(tolerance x expected, this): the unimpaired veth path itself
takes tens of microseconds, and timer slack adds some."""


@dataclass(frozen=True)
class SelftestOptions:
    """How long and how strictly to measure. Values are checked when built (ConfigError
    naming the option)."""

    seconds: float = 2.0
    """Measured seconds per link and direction (after the warm-up)."""
    warmup_s: float = 0.5
    """Slow start and the shaper's initial bucket: not measured."""
    tolerance: float = 0.05
    """Allowed |measured / expected - 1| of goodput (and of the round trip over the delay)."""
    max_concurrent_mbit: float = 1000.0
    """Links are measured together while their rates add up to at most this (a 2-core machine
    moves ~1-2 Gbit/s through the shapers before the CPU, not HTB, sets the pace)."""
    allow_out_of_tolerance: bool = False
    """`run --selftest`: run the workload even when a link is outside tolerance."""

    def __post_init__(self) -> None:
        checks = (
            ("--selftest-seconds", self.seconds, 0.2, 60.0, "s"),
            ("--selftest-warmup", self.warmup_s, 0.0, 10.0, "s"),
            ("--max-concurrent-mbit", self.max_concurrent_mbit, 0.0, 1e6, "Mbit/s"),
        )
        for name, value, low, high, unit in checks:
            if not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{name}: {value!r} is invalid (must be {low:g}-{high:g} {unit})")
        if not (math.isfinite(self.tolerance) and 0 < self.tolerance < 1):
            raise ConfigError(
                f"--tolerance: {100 * self.tolerance:g} % is invalid (must be > 0 and < 100 %)"
            )


@dataclass(frozen=True)
class LinkUnderTest:
    """One shaped direction of one NIC, and the probe it is measured against."""

    node: str
    nic: str
    direction: str
    """egress: node -> probe; ingress: probe -> node."""
    rate_mbit: float
    probe: str
    delay_ms: float = 0.0
    """Configured one-way delay of this direction (netem)."""

    @property
    def name(self) -> str:
        return f"{self.node}.{self.nic}.{self.direction}"


def probe_id(network: str) -> str:
    return f"{PROBE_PREFIX}{network}"


def links_of(topology: TopologySpec) -> list[LinkUnderTest]:
    """Every shaped NIC direction of the topology, in host order, egress before ingress."""
    out: list[LinkUnderTest] = []
    for host in topology.hosts:
        if host.node_id.startswith(PROBE_PREFIX):
            continue
        for nic in host.nics:
            if nic.shape is None:
                continue
            for direction in ("egress", "ingress"):
                d = nic.shape.direction(direction)
                out.append(
                    LinkUnderTest(
                        host.node_id,
                        nic.name,
                        direction,
                        d.rate_mbit,
                        probe_id(nic.network),
                        d.delay_ms,
                    )
                )
    return out


def plan_rounds(links: Sequence[LinkUnderTest], budget_mbit: float) -> list[list[LinkUnderTest]]:
    """Group links into rounds measured at once: never two directions of one NIC together
    (each flow's TCP ACKs cross the other direction's shaper), and at most `budget_mbit` of
    configured rate per round (a link faster than that has a round of its own). First fit in
    the given order, so egress and ingress of a NIC land in different rounds."""
    rounds: list[list[LinkUnderTest]] = []
    for link in links:
        for r in rounds:
            busy = {(x.node, x.nic) for x in r}
            if (link.node, link.nic) not in busy and (
                sum(x.rate_mbit for x in r) + link.rate_mbit <= budget_mbit
            ):
                r.append(link)
                break
        else:
            rounds.append([link])
    return rounds


def expected_goodput_mbit(rate_mbit: float, mss: int, mtu: int) -> float:
    """TCP payload rate of a link shaped to `rate_mbit`: each full frame carries `mss` payload
    bytes and HTB charges mtu + 14 (1448 / 1514 with TCP timestamps on a 1500-byte MTU)."""
    return rate_mbit * mss / (mtu + ETH_HEADER)


@dataclass(frozen=True)
class LinkResult:
    link: LinkUnderTest
    goodput_mbit: float
    expected_mbit: float
    mss: int
    mtu: int
    rtt_ms: float | None = None
    """Median round trip node <-> probe (measured on every shaped NIC, both directions' delay)."""
    rtt_expected_ms: float | None = None
    rtt_status: str = "no delay configured"

    @property
    def error(self) -> float:
        return self.goodput_mbit / self.expected_mbit - 1 if self.expected_mbit else math.inf


def rtt_verdict(
    rtt_ms: float | None, expected_ms: float, tolerance: float, unemulated: str | None
) -> str:
    """'no delay configured', 'unavailable (<why>)', 'ok' or 'OUT of tolerance'."""
    if expected_ms <= 0:
        return "no delay configured"
    if unemulated is not None:
        return f"unavailable ({unemulated})"
    if rtt_ms is None:
        return "not measured"
    ok = abs(rtt_ms - expected_ms) <= max(tolerance * expected_ms, DELAY_FLOOR_MS)
    return "ok" if ok else "OUT of tolerance"


@dataclass(frozen=True)
class SelftestReport:
    """Every measured link direction of one config, the verdicts and how long it took."""

    config: str
    lab_id: str
    """The lab the measurement built (and removed): `dp-<lab_id>-*` namespaces."""
    tolerance: float
    seconds: float
    results: tuple[LinkResult, ...]
    rounds: int
    elapsed_s: float
    unemulated: tuple[str, ...] = field(default=())

    def within(self, r: LinkResult) -> bool:
        return abs(r.error) <= self.tolerance and r.rtt_status != "OUT of tolerance"

    @property
    def failures(self) -> list[str]:
        return [r.link.name for r in self.results if not self.within(r)]

    @property
    def passed(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        head = (
            f"{'node':<12} {'nic':<5} {'direction':<9} {'rate':>10} {'expected':>10} "
            f"{'measured':>10} {'error':>7}  {'rtt':>8}  {'delay':<20} verdict"
        )
        out = [head, "-" * len(head)]
        for r in self.results:
            rtt = "-" if r.rtt_ms is None else f"{r.rtt_ms:.2f}ms"
            out.append(
                f"{r.link.node:<12} {r.link.nic:<5} {r.link.direction:<9} "
                f"{r.link.rate_mbit:>6g} Mb/s {r.expected_mbit:>6.1f} Mb/s "
                f"{r.goodput_mbit:>6.1f} Mb/s {100 * r.error:>+6.2f}%  {rtt:>8}  "
                f"{r.rtt_status:<20} {'ok' if self.within(r) else 'OUT of tolerance'}"
            )
        verdict = (
            "all links within tolerance"
            if self.passed
            else f"{len(self.failures)} link(s) outside tolerance: {', '.join(self.failures)}"
        )
        out.append(
            f"{len(self.results)} link directions in {self.rounds} round(s), "
            f"{self.seconds:g} s each, {self.elapsed_s:.1f} s in all; tolerance "
            f"±{100 * self.tolerance:g} % of rate x MSS/(MTU+14): {verdict}"
        )
        out += [f"not emulated here: {u}" for u in self.unemulated]
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "lab_id": self.lab_id,
            "tolerance": self.tolerance,
            "seconds": self.seconds,
            "rounds": self.rounds,
            "elapsed_s": round(self.elapsed_s, 3),
            "passed": self.passed,
            "failures": self.failures,
            "unemulated": list(self.unemulated),
            "links": [
                {
                    **asdict(r.link),
                    "expected_mbit": round(r.expected_mbit, 3),
                    "goodput_mbit": round(r.goodput_mbit, 3),
                    "error": round(r.error, 5),
                    "mss": r.mss,
                    "mtu": r.mtu,
                    "rtt_ms": None if r.rtt_ms is None else round(r.rtt_ms, 4),
                    "rtt_expected_ms": r.rtt_expected_ms,
                    "rtt_status": r.rtt_status,
                    "within_tolerance": self.within(r),
                }
                for r in self.results
            ],
        }


def goodput_from_marks(
    marks: Sequence[tuple[float, int]], warmup_s: float, seconds: float
) -> float:
    """Receiver-side goodput, Mbit/s, from (time, cumulative bytes) marks: over the span from
    the first mark at or after first byte + warm-up to the last mark within `seconds` of it."""
    if not marks:
        return 0.0
    start = marks[0][0] + warmup_s
    window = [m for m in marks if start <= m[0] <= start + seconds]
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        return 0.0
    return (window[-1][1] - window[0][1]) * 8 / (window[-1][0] - window[0][0]) / 1e6


# --- the lab (I/O) ---------------------------------------------------------------------------
def selftest_topology(cfg: LabConfig, lab_id: str) -> TopologySpec:
    """The run's topology for `cfg` (the same NICs, addresses and shapes) plus, per network
    with a shaped NIC, an unshaped probe host on a free address of that network."""
    spec = build_cluster_spec(
        cfg, lab_id=lab_id, backend="netns", data_dir=Path(tempfile.gettempdir()), base_port=0
    )
    topo: TopologySpec = topology_for(spec, cfg.network.kv_min_fraction)
    used = {str(n.interface.ip) for h in topo.hosts for n in h.nics}
    probes = []
    for network in topo.networks:
        nics = [n for h in topo.hosts for n in h.nics if n.network == network]
        if not any(n.shape is not None for n in nics):
            continue
        subnet = nics[0].interface.network
        free = next(
            (ip for ip in reversed(list(subnet.hosts())) if str(ip) not in used),
            None,
        )
        if free is None:
            raise ConfigError(f"network.{network}_subnet: {subnet} has no free address for a probe")
        used.add(str(free))
        addr = f"{free}/{subnet.prefixlen}"
        probes.append(HostSpec(probe_id(network), (NicSpec("probe", network, addr),)))
    return TopologySpec(topo.lab_id, (*topo.hosts, *probes))


def _addr(lab: NetnsLab, node: str, network: str) -> str:
    host = lab.spec.host(node)
    return str(next(n for n in host.nics if n.network == network).interface.ip)


def _network(lab: NetnsLab, link: LinkUnderTest) -> str:
    return lab.spec.host(link.node).nic(link.nic).network


@dataclass
class _Flow:
    link: LinkUnderTest
    marks: list[tuple[float, int]] = field(default_factory=list)
    mss: int = 0
    mtu: int = 0
    error: str | None = None


def _pair(
    lab: NetnsLab, server: str, client: str, network: str
) -> tuple[socket.socket, socket.socket]:
    """A listening socket in `server`'s namespace and a client socket in `client`'s, each
    bound to the node's address on `network`; the client is connected. The caller accepts
    (`listener.accept()`) on a thread of its own and closes both."""
    srv = lab.open_socket(server)
    cli = lab.open_socket(client)
    srv.bind((_addr(lab, server, network), 0))
    srv.listen(1)
    srv.settimeout(30)
    cli.bind((_addr(lab, client, network), 0))
    return srv, cli


def _connect(srv: socket.socket, cli: socket.socket) -> None:
    cli.settimeout(30)
    cli.connect(srv.getsockname())


def _run_flow(lab: NetnsLab, flow: _Flow, duration_s: float) -> None:
    """One TCP bulk transfer over the link's direction; the receiver marks its byte count."""
    link = flow.link
    network = _network(lab, link)
    sender, receiver = (
        (link.node, link.probe)
        if link.direction == "egress"
        else (
            link.probe,
            link.node,
        )
    )
    srv, snd = _pair(lab, receiver, sender, network)
    try:

        def receive() -> None:
            conn, _ = srv.accept()
            buf = bytearray(4 * CHUNK)
            total = 0
            with conn:
                while n := conn.recv_into(buf):
                    total += n
                    flow.marks.append((time.monotonic(), total))

        rx = threading.Thread(target=receive, daemon=True)
        rx.start()
        _connect(srv, snd)
        flow.mss = snd.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        flow.mtu = snd.getsockopt(socket.IPPROTO_IP, IP_MTU)
        data = memoryview(bytes(CHUNK))
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            snd.sendall(data)
        snd.shutdown(socket.SHUT_WR)
        rx.join(timeout=30)
    except OSError as exc:
        flow.error = f"{link.name}: {exc}"
    finally:
        snd.close()
        srv.close()


def _rtt(lab: NetnsLab, node: str, nic: str, probe: str) -> float:
    """Median round trip of small TCP messages node -> probe -> node, ms."""
    srv, cli = _pair(lab, probe, node, lab.spec.host(node).nic(nic).network)
    try:

        def echo() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(RTT_MESSAGE):
                    conn.sendall(data)

        t = threading.Thread(target=echo, daemon=True)
        t.start()
        cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _connect(srv, cli)
        msg = bytes(RTT_MESSAGE)
        rtts = []
        for _ in range(RTT_PINGS):
            t0 = time.perf_counter()
            cli.sendall(msg)
            got = 0
            while got < RTT_MESSAGE:
                got += len(cli.recv(RTT_MESSAGE - got))
            rtts.append((time.perf_counter() - t0) * 1000)
        cli.shutdown(socket.SHUT_WR)
        t.join(timeout=10)
        return statistics.median(rtts[2:])
    finally:
        cli.close()
        srv.close()


def measure(
    lab: NetnsLab, options: SelftestOptions, log: Callable[[str], None] = lambda m: None
) -> tuple[list[LinkResult], int]:
    """Goodput of every shaped link direction (rounds of concurrent flows), then the round trip
    of every shaped NIC (all at once: a few small messages each)."""
    links = links_of(lab.spec)
    rounds = plan_rounds(links, options.max_concurrent_mbit)
    flows: dict[str, _Flow] = {}
    for i, r in enumerate(rounds):
        log(f"round {i + 1}/{len(rounds)}: {', '.join(x.name for x in r)}")
        flows.update(_flow_round(lab, r, options.warmup_s + options.seconds + 0.2))
    rtts = _round_trips(lab, sorted({(x.node, x.nic, x.probe) for x in links}))
    unemulated = {(u.node_id, u.nic): u.reason for u in lab.unemulated if u.feature == "delay"}
    results = []
    for link in links:
        f = flows[link.name]
        nic = lab.spec.host(link.node).nic(link.nic)
        assert nic.shape is not None
        expected_rtt = sum(nic.shape.direction(d).delay_ms for d in ("egress", "ingress"))
        rtt = rtts.get((link.node, link.nic))
        results.append(
            LinkResult(
                link=link,
                goodput_mbit=goodput_from_marks(f.marks, options.warmup_s, options.seconds),
                expected_mbit=expected_goodput_mbit(link.rate_mbit, f.mss, f.mtu),
                mss=f.mss,
                mtu=f.mtu,
                rtt_ms=rtt,
                rtt_expected_ms=expected_rtt or None,
                rtt_status=rtt_verdict(
                    rtt, expected_rtt, options.tolerance, unemulated.get((link.node, link.nic))
                ),
            )
        )
    return results, len(rounds)


def _flow_round(lab: NetnsLab, links: Sequence[LinkUnderTest], seconds: float) -> dict[str, _Flow]:
    """One round: a flow on each link at once for `seconds`; RuntimeError when one failed."""
    batch = [_Flow(link) for link in links]
    threads = [threading.Thread(target=_run_flow, args=(lab, f, seconds)) for f in batch]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in batch:
        if f.error is not None:
            raise RuntimeError(f"selftest flow failed: {f.error}")
    return {f.link.name: f for f in batch}


def _round_trips(
    lab: NetnsLab, nics: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str], float]:
    """The round trip of every (node, nic) through its probe address, all at once."""
    rtts: dict[tuple[str, str], float] = {}

    def one(node: str, nic: str, probe: str) -> None:
        rtts[(node, nic)] = _rtt(lab, node, nic, probe)

    threads = [threading.Thread(target=one, args=n) for n in nics]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rtts


def run_selftest(
    cfg: LabConfig,
    options: SelftestOptions,
    *,
    log: Callable[[str], None] = lambda m: None,
    state_dir: Path | None = None,
) -> SelftestReport:
    """Bring the config's network up (own lab id, probes added), measure, take it down."""

    require_net_admin()
    started = time.monotonic()
    topo = selftest_topology(cfg, secrets.token_hex(3))
    lab = NetnsLab(topo, state_dir=state_dir or default_state_dir(), allow_unemulated=True)
    log(f"lab {topo.lab_id}: {len(links_of(topo))} shaped link directions")
    try:
        lab.up()
        results, rounds = measure(lab, options, log)
        unemulated = tuple(str(u) for u in lab.unemulated)
    finally:
        lab.down()
    return SelftestReport(
        config=cfg.name,
        lab_id=topo.lab_id,
        tolerance=options.tolerance,
        seconds=options.seconds,
        results=tuple(results),
        rounds=rounds,
        elapsed_s=time.monotonic() - started,
        unemulated=unemulated,
    )


__all__ = [
    "LinkResult",
    "LinkUnderTest",
    "SelftestOptions",
    "SelftestReport",
    "expected_goodput_mbit",
    "goodput_from_marks",
    "links_of",
    "plan_rounds",
    "rtt_verdict",
    "run_selftest",
    "selftest_topology",
]

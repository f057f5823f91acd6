"""The emulated network as plain data: hosts, their NICs, and how each NIC is shaped.

Pure and frozen: every value is validated when it is built (`SpecError` names the field and
the allowed range), so the planner and the applier never see a bad name or rate. No I/O, no
pyroute2 here.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

from dualpath.errors import UsageError

IFNAMSIZ = 15
"""Longest Linux interface name (IFNAMSIZ - 1 for the trailing NUL)."""

IFB_PREFIX = "ifb-"
"""The IFB device that carries a NIC's ingress is `ifb-<nic>`."""

MAX_NIC_NAME = IFNAMSIZ - len(IFB_PREFIX)
"""A NIC name must leave room for its IFB's name."""

BRIDGE_PREFIX = "br-"
MAX_NETWORK_NAME = IFNAMSIZ - len(BRIDGE_PREFIX)

SWITCH_NODE_ID = "sw"
"""Reserved: the switch namespace is `dp-<lab_id>-sw`."""

MAX_RATE_MBIT = 100_000.0
"""HTB takes 64-bit rates, but nothing above 100 Gbit/s is meaningful on one host."""

_LAB_ID = re.compile(r"[a-z0-9]{1,8}")
_NODE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
_IFNAME = re.compile(r"[a-z][a-z0-9]*")
_NETWORK = re.compile(r"[a-z][a-z0-9]*")


class SpecError(UsageError, ValueError):
    """A topology spec value is out of range; the message names the field."""


def _fail(field: str, value: object, allowed: str) -> SpecError:
    return SpecError(f"{field}: {value!r} is invalid ({allowed})")


MAX_DELAY_MS = 60_000.0
"""netem keeps delays in 64-bit ns, but a minute of one-way delay is no network to emulate."""

MAX_QUEUE_LIMIT_PACKETS = 1_000_000
MIN_BURST_BYTES = 2 * 1514
"""Two full frames (MTU 1500 + Ethernet header): an HTB class must always be able to send."""
MAX_BURST_BYTES = 1 << 30

DIRECTIONS = ("egress", "ingress")
IMPAIRMENTS = ("delay", "jitter", "loss", "duplicate", "corrupt", "reorder")
"""Link features beyond rate/ceil/burst/queue limit: emulated by sch_netem where the kernel
has it (loss also by the lab switch's nftables `numgen` rule where it has not)."""


def _number(
    field: str, value: object, low: float, high: float, unit: str, *, low_open: bool
) -> None:
    """Raise SpecError unless `value` is a finite number in the range (low, high] or [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(field, value, f"a number of {unit}")
    op = ">" if low_open else ">="
    if not math.isfinite(value) or not (value > low if low_open else value >= low) or value > high:
        raise _fail(field, value, f"must be {op} {low:g} and <= {high:g} {unit}")


def _integer(field: str, value: object, low: int, high: int, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, value, f"an integer number of {unit}")
    if not low <= value <= high:
        raise _fail(field, value, f"must be >= {low} and <= {high} {unit}")


@dataclass(frozen=True)
class DirectionSpec:
    """How one direction (egress or ingress) of one NIC behaves: its rate and impairments.

    Percentages are of packets (tc's convention, `loss 5%`); 0 means off. Impairments other
    than loss need sch_netem; the planner reports what the kernel cannot emulate."""

    rate_mbit: float
    ceil_mbit: float | None = None
    """Most any leaf class may use when borrowing; None: the rate. With priority classes it
    may be lower than the rate (the classes then never fill the link); without classes the
    link class is the leaf, and the ceil must equal the rate."""
    burst_bytes: int | None = None
    """Token bucket of the link class (and each leaf's cburst); None: 5 ms of the rate."""
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    """Uniform +-jitter around delay_ms (needs delay_ms > 0). netem reorders jittered packets."""
    loss_pct: float = 0.0
    duplicate_pct: float = 0.0
    corrupt_pct: float = 0.0
    """A random bit flipped in the packet (the receiver's checksum then drops it)."""
    reorder_pct: float = 0.0
    """Packets sent at once, ahead of the delayed others (needs delay_ms > 0)."""
    queue_limit_packets: int | None = None
    """Leaf queue limit in packets; None: 1000 (plus the delay line's packets under netem)."""

    def __post_init__(self) -> None:
        _number("rate_mbit", self.rate_mbit, 0, MAX_RATE_MBIT, "Mbit/s", low_open=True)
        if self.ceil_mbit is not None:
            _number("ceil_mbit", self.ceil_mbit, 0, MAX_RATE_MBIT, "Mbit/s", low_open=True)
            if self.ceil_mbit > self.rate_mbit:
                raise _fail(
                    "ceil_mbit",
                    self.ceil_mbit,
                    f"must be <= rate_mbit ({self.rate_mbit:g}): the link class has no parent "
                    "to borrow from",
                )
        if self.burst_bytes is not None:
            _integer("burst_bytes", self.burst_bytes, MIN_BURST_BYTES, MAX_BURST_BYTES, "bytes")
        _number("delay_ms", self.delay_ms, 0, MAX_DELAY_MS, "ms", low_open=False)
        _number("jitter_ms", self.jitter_ms, 0, MAX_DELAY_MS, "ms", low_open=False)
        for name in ("loss_pct", "duplicate_pct", "corrupt_pct", "reorder_pct"):
            _number(name, getattr(self, name), 0, 100, "%", low_open=False)
        if self.jitter_ms > 0 and self.delay_ms <= 0:
            raise _fail("jitter_ms", self.jitter_ms, "needs delay_ms > 0 (jitter is around it)")
        if self.reorder_pct > 0 and self.delay_ms <= 0:
            raise _fail(
                "reorder_pct", self.reorder_pct, "needs delay_ms > 0 (reordered packets skip it)"
            )
        if self.queue_limit_packets is not None:
            _integer(
                "queue_limit_packets",
                self.queue_limit_packets,
                1,
                MAX_QUEUE_LIMIT_PACKETS,
                "packets",
            )

    @property
    def rate_bit(self) -> int:
        """The rate in bit/s, as the kernel is given it."""
        return max(8, round(self.rate_mbit * 1_000_000))

    @property
    def ceil_bit(self) -> int:
        return self.rate_bit if self.ceil_mbit is None else max(8, round(self.ceil_mbit * 1e6))

    def impairments(self) -> tuple[str, ...]:
        """The IMPAIRMENTS this direction uses (non-zero), in IMPAIRMENTS order."""
        values = {
            "delay": self.delay_ms,
            "jitter": self.jitter_ms,
            "loss": self.loss_pct,
            "duplicate": self.duplicate_pct,
            "corrupt": self.corrupt_pct,
            "reorder": self.reorder_pct,
        }
        return tuple(name for name in IMPAIRMENTS if values[name] > 0)


@dataclass(frozen=True)
class LinkShape:
    """How one NIC is shaped: per direction (`egress`, `ingress`), or the simple form
    `LinkShape(rate_mbit)` with the same plain rate both ways.

    A direction given explicitly wins; `rate_mbit` fills in a direction that is not given.
    After construction `egress` and `ingress` are always set."""

    rate_mbit: float | None = None
    priority_classes: bool = False
    """cnic: HTB classes collective/control/kv chosen by DSCP."""
    kv_min_fraction: float = 0.05
    """Guaranteed share of the kv class; it may borrow the whole link."""
    egress: DirectionSpec | None = None
    ingress: DirectionSpec | None = None

    def __post_init__(self) -> None:
        rate = self.rate_mbit
        if rate is not None:
            _number("rate_mbit", rate, 0, MAX_RATE_MBIT, "Mbit/s", low_open=True)
        frac = self.kv_min_fraction
        if isinstance(frac, bool) or not isinstance(frac, int | float):
            raise _fail("kv_min_fraction", frac, "a fraction of the link rate")
        if not math.isfinite(frac) or frac <= 0 or frac > 0.5:
            raise _fail("kv_min_fraction", frac, "must be > 0 and <= 0.5")
        for name in DIRECTIONS:
            given = getattr(self, name)
            if given is None:
                if rate is None:
                    raise _fail(name, None, "a DirectionSpec, or rate_mbit for both directions")
                object.__setattr__(self, name, DirectionSpec(rate))
            elif not isinstance(given, DirectionSpec):
                raise _fail(name, given, "a DirectionSpec or None")
            spec = self.direction(name)
            if (
                not self.priority_classes
                and spec.ceil_mbit is not None
                and spec.ceil_bit != spec.rate_bit
            ):
                raise _fail(
                    f"{name}.ceil_mbit",
                    spec.ceil_mbit,
                    "must equal rate_mbit without priority_classes (the link class is the leaf)",
                )

    def direction(self, name: str) -> DirectionSpec:
        """The resolved DirectionSpec of 'egress' or 'ingress'."""
        if name not in DIRECTIONS:
            raise _fail("direction", name, f"one of {DIRECTIONS}")
        spec = self.egress if name == "egress" else self.ingress
        assert spec is not None  # filled in by __post_init__
        return spec

    @property
    def rate_bit(self) -> int:
        """The egress rate in bit/s (both directions' in the simple form)."""
        return self.direction("egress").rate_bit


@dataclass(frozen=True)
class NicSpec:
    """One interface of a host, attached to one of the switch's bridges."""

    name: str
    """Interface name inside the node namespace: 'cnic' | 'snic' | 'mgmt'."""
    network: str
    """Bridge it attaches to: 'compute' | 'storage' | 'mgmt'."""
    address: str
    """IPv4 interface address with prefix, e.g. '198.18.0.10/24'."""
    shape: LinkShape | None = None
    """None: unshaped in both directions."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _IFNAME.fullmatch(self.name):
            raise _fail("name", self.name, "lower-case letters and digits, starting with a letter")
        if len(self.name) > MAX_NIC_NAME:
            raise _fail(
                "name",
                self.name,
                f"at most {MAX_NIC_NAME} characters, so that '{IFB_PREFIX}{self.name}' "
                f"fits the kernel's {IFNAMSIZ}-character interface names",
            )
        if not isinstance(self.network, str) or not _NETWORK.fullmatch(self.network):
            raise _fail(
                "network", self.network, "lower-case letters and digits, starting with a letter"
            )
        if len(self.network) > MAX_NETWORK_NAME:
            raise _fail(
                "network",
                self.network,
                f"at most {MAX_NETWORK_NAME} characters, so that bridge "
                f"'{BRIDGE_PREFIX}{self.network}' fits {IFNAMSIZ} characters",
            )
        self.interface  # noqa: B018 - validates the address
        if self.shape is not None and not isinstance(self.shape, LinkShape):
            raise _fail("shape", self.shape, "a LinkShape or None")

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        """The parsed address; raises SpecError when it is not 'a.b.c.d/len'."""
        if not isinstance(self.address, str) or "/" not in self.address:
            raise _fail("address", self.address, "an IPv4 address with prefix, e.g. 198.18.0.10/24")
        try:
            iface = ipaddress.IPv4Interface(self.address)
        except ValueError as exc:
            raise _fail("address", self.address, str(exc)) from None
        if iface.network.prefixlen >= 31 or iface.ip in (
            iface.network.network_address,
            iface.network.broadcast_address,
        ):
            raise _fail("address", self.address, "a host address in a subnet of /30 or larger")
        return iface


@dataclass(frozen=True)
class HostSpec:
    """One emulated machine: one namespace holding its NICs."""

    node_id: str
    """'prefill-0', 'decode-1', 'storage-0', 'scheduler'."""
    nics: tuple[NicSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not _NODE_ID.fullmatch(self.node_id):
            raise _fail(
                "node_id",
                self.node_id,
                "1-40 of lower-case letters, digits and '-', not starting or ending with '-'",
            )
        if self.node_id == SWITCH_NODE_ID:
            raise _fail("node_id", self.node_id, f"'{SWITCH_NODE_ID}' is the switch's namespace")
        if not isinstance(self.nics, tuple) or not self.nics:
            raise _fail(f"{self.node_id}.nics", self.nics, "a non-empty tuple of NicSpec")
        names = [nic.name for nic in self.nics]
        if len(set(names)) != len(names):
            raise _fail(f"{self.node_id}.nics", names, "NIC names must be unique per host")
        networks = [nic.network for nic in self.nics]
        if len(set(networks)) != len(networks):
            raise _fail(f"{self.node_id}.nics", networks, "a host has at most one NIC per network")

    def nic(self, name: str) -> NicSpec:
        for nic in self.nics:
            if nic.name == name:
                return nic
        raise KeyError(f"{self.node_id} has no NIC {name!r} (have: {[n.name for n in self.nics]})")


@dataclass(frozen=True)
class TopologySpec:
    """A whole lab: its id (part of every namespace name) and its hosts."""

    lab_id: str
    """Short id, [a-z0-9]{1,8}."""
    hosts: tuple[HostSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.lab_id, str) or not _LAB_ID.fullmatch(self.lab_id):
            raise _fail("lab_id", self.lab_id, "1-8 lower-case letters or digits")
        if not isinstance(self.hosts, tuple) or not self.hosts:
            raise _fail("hosts", self.hosts, "a non-empty tuple of HostSpec")
        ids = [h.node_id for h in self.hosts]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise _fail("hosts", dup, "node ids must be unique")
        seen: dict[str, str] = {}
        subnets: dict[str, ipaddress.IPv4Network] = {}
        for host in self.hosts:
            for nic in host.nics:
                where = f"{host.node_id}.{nic.name}"
                iface = nic.interface
                ip = str(iface.ip)
                if ip in seen:
                    raise _fail(f"{where}.address", nic.address, f"already used by {seen[ip]}")
                seen[ip] = where
                net = subnets.setdefault(nic.network, iface.network)
                if net != iface.network:
                    raise _fail(
                        f"{where}.address",
                        nic.address,
                        f"network {nic.network!r} is subnet {net}; every NIC on it must be too",
                    )
        nets = list(subnets.items())
        for i, (name_a, net_a) in enumerate(nets):
            for name_b, net_b in nets[i + 1 :]:
                if net_a.overlaps(net_b):
                    raise _fail(
                        "hosts",
                        f"{name_a}={net_a}, {name_b}={net_b}",
                        "networks must use disjoint subnets",
                    )

    def host(self, node_id: str) -> HostSpec:
        for host in self.hosts:
            if host.node_id == node_id:
                return host
        raise KeyError(f"no host {node_id!r} in lab {self.lab_id} (have: {self.node_ids})")

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(h.node_id for h in self.hosts)

    @property
    def networks(self) -> tuple[str, ...]:
        """Networks in first-use order (each one is a bridge in the switch namespace)."""
        out: list[str] = []
        for host in self.hosts:
            for nic in host.nics:
                if nic.network not in out:
                    out.append(nic.network)
        return tuple(out)

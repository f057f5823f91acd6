"""Pure planner: a TopologySpec becomes namespace, bridge and veth names and, per NIC, the exact
qdisc/class/filter operations that shape it. The applier (`netem.netns`) runs these in order
and nothing else, so every kernel object the lab makes is golden-tested here. No I/O, no pyroute2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from netem.spec import (
    BRIDGE_PREFIX,
    IFB_PREFIX,
    IFNAMSIZ,
    SWITCH_NODE_ID,
    LinkShape,
    NicSpec,
    SpecError,
    TopologySpec,
)

# --- kernel constants (include/uapi/linux/pkt_sched.h, if_ether.h) ------------------------
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


def tc_handle(major: int, minor: int) -> int:
    """tc's 'major:minor' (both hex in tc's notation) packed into one 32-bit handle."""
    if not (0 <= major <= 0xFFFF and 0 <= minor <= 0xFFFF):
        raise ValueError(f"handle {major:x}:{minor:x} out of range")
    return (major << 16) | minor


def format_handle(handle: int) -> str:
    """A handle in tc's notation: 0x10010 -> '1:10', TC_H_ROOT -> 'root'."""
    if handle == TC_H_ROOT:
        return "root"
    if handle == TC_H_INGRESS:
        return "ingress"
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}"


# --- reserved handles ------------------------------------------------------------------------
ROOT_QDISC = tc_handle(1, 0)
"""1: the HTB root on the NIC (egress) and on its IFB (ingress)."""
LINK_CLASS = tc_handle(1, 1)
"""1:1 the link: rate = ceil = the NIC's rate. It is the only (leaf) class without priorities."""
INGRESS_QDISC = tc_handle(0xFFFF, 0)
"""ffff: the ingress qdisc whose match-all filter redirects to the IFB."""

CLASS_IDS: dict[str, int] = {
    "collective": tc_handle(1, 0x10),
    "control": tc_handle(1, 0x20),
    "kv": tc_handle(1, 0x30),
}
"""Leaf classes under 1:1 with `priority_classes` (architecture: collective > control > kv)."""

CLASS_DSCP: dict[str, int] = {"collective": 46, "control": 24, "kv": 8}
"""DSCP of each class; the same values as services.transport.Dscp."""

CLASS_PRIO: dict[str, int] = {"collective": 0, "control": 1, "kv": 2}
"""HTB prio (0 = served first, also when borrowing spare link rate)."""

DEFAULT_CLASS_NAME = "kv"
"""Unmarked traffic (DSCP 0, ARP, ...) falls into kv."""

CONTROL_FRACTION = 0.05
"""Guaranteed share of the control class. Collective is guaranteed the rest after control and
kv, so guarantees sum to the link and HTB can honour all of them at once; every class may
borrow the whole link, higher prio first."""

# --- sizing --------------------------------------------------------------------------------
ETH_FRAME_MAX = 1514
"""Largest frame HTB charges per segment: MTU 1500 + 14-byte Ethernet header (no FCS)."""

BURST_TIME_S = 0.005
"""Token bucket depth in time. The kernel refills HTB tokens with ns resolution and wakes it
with an hrtimer, so HZ (250 here, often 100-1000) no longer bounds the timer; what still
costs tokens is softirq/ksoftirqd latency on a busy 2-core VM, up to about one scheduler tick
(4 ms at HZ=250). Tokens that would accrue beyond the bucket are lost, so the bucket must
cover that latency; 5 ms covers one tick at HZ >= 200 and keeps the start-of-flow overshoot
to 0.2 % of a 2.5 s measurement. tc's classic default (rate/HZ + mtu) is the same idea."""

MIN_BURST_BYTES = 2 * ETH_FRAME_MAX
"""Never less than two full frames, so a class can always send a packet after idling."""

QUANTUM_BYTES = 65536
"""Set explicitly so HTB never derives it from r2q (which logs 'quantum of class is big/small'
warnings at 10 Mbit/s and 5 Gbit/s). Every leaf has its own prio, so the quantum only matters
for DRR between equal-prio classes; one max-size GSO packet is a fair round."""

IFB_TXQUEUELEN = 1000
"""IFB devices default to 32 packets (the leaf pfifo inherits it); 1000 matches the veth, so
both directions queue alike."""


def burst_bytes(rate_bit: int) -> int:
    """Bucket size for `rate_bit`: BURST_TIME_S worth of bytes, at least MIN_BURST_BYTES."""
    return max(MIN_BURST_BYTES, math.ceil(rate_bit / 8 * BURST_TIME_S))


def dscp_key(dscp: int) -> U32Key:
    """u32 key matching DSCP in the top 6 bits of the IPv4 TOS byte (byte 1 of the header)."""
    if not 0 <= dscp <= 63:
        raise ValueError(f"dscp {dscp} outside 0..63")
    return U32Key(value=(dscp << 2) << 16, mask=0xFC << 16, offset=0)


# --- operations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkOp:
    """Create a link inside the node namespace (the IFB that carries the NIC's ingress)."""

    ifname: str
    kind: Literal["ifb"]
    txqueuelen: int


@dataclass(frozen=True)
class QdiscOp:
    dev: str
    kind: Literal["htb", "ingress"]
    parent: int
    handle: int
    default_class: int = 0
    """htb only: minor of the class that takes unclassified packets."""


@dataclass(frozen=True)
class ClassOp:
    """An HTB class. Rates in bit/s, buckets in bytes."""

    dev: str
    name: str
    parent: int
    classid: int
    rate_bit: int
    ceil_bit: int
    burst_bytes: int
    cburst_bytes: int
    prio: int
    quantum_bytes: int


@dataclass(frozen=True)
class U32Key:
    """Match (32-bit word at `offset` from the network header) & mask == value."""

    value: int
    mask: int
    offset: int


MATCH_ALL = U32Key(value=0, mask=0, offset=0)


@dataclass(frozen=True)
class MirredRedirect:
    """Redirect the packet to the egress of `dev` (the IFB)."""

    dev: str


@dataclass(frozen=True)
class FilterOp:
    """A u32 filter: packets matching every key go to `classid` (or through `action`)."""

    dev: str
    parent: int
    prio: int
    protocol: int
    keys: tuple[U32Key, ...]
    classid: int = 0
    action: MirredRedirect | None = None


Op = LinkOp | QdiscOp | ClassOp | FilterOp


def ifb_name(nic_name: str) -> str:
    return f"{IFB_PREFIX}{nic_name}"


def _htb_tree(dev: str, shape: LinkShape) -> list[Op]:
    rate = shape.rate_bit
    link_burst = burst_bytes(rate)
    default = CLASS_IDS[DEFAULT_CLASS_NAME] if shape.priority_classes else LINK_CLASS
    ops: list[Op] = [
        QdiscOp(dev, "htb", TC_H_ROOT, ROOT_QDISC, default_class=default & 0xFFFF),
        ClassOp(
            dev=dev,
            name="link",
            parent=ROOT_QDISC,
            classid=LINK_CLASS,
            rate_bit=rate,
            ceil_bit=rate,
            burst_bytes=link_burst,
            cburst_bytes=link_burst,
            prio=0,
            quantum_bytes=QUANTUM_BYTES,
        ),
    ]
    if not shape.priority_classes:
        return ops
    kv_rate = max(8, round(rate * shape.kv_min_fraction))
    control_rate = max(8, round(rate * CONTROL_FRACTION))
    guaranteed = {
        "collective": max(8, rate - kv_rate - control_rate),
        "control": control_rate,
        "kv": kv_rate,
    }
    for name, classid in CLASS_IDS.items():
        ops.append(
            ClassOp(
                dev=dev,
                name=name,
                parent=LINK_CLASS,
                classid=classid,
                rate_bit=guaranteed[name],
                ceil_bit=rate,
                burst_bytes=burst_bytes(guaranteed[name]),
                cburst_bytes=link_burst,
                prio=CLASS_PRIO[name],
                quantum_bytes=QUANTUM_BYTES,
            )
        )
    for name, classid in CLASS_IDS.items():
        ops.append(
            FilterOp(
                dev=dev,
                parent=ROOT_QDISC,
                prio=CLASS_PRIO[name] + 1,
                protocol=ETH_P_IP,
                keys=(dscp_key(CLASS_DSCP[name]),),
                classid=classid,
            )
        )
    return ops


def plan_nic(nic: NicSpec) -> tuple[Op, ...]:
    """Operations (inside the node namespace, in order) that shape `nic`; () when unshaped.

    Egress: HTB root on the NIC. Ingress: an IFB `ifb-<nic>` with the same HTB tree on its
    egress, fed by an ingress qdisc whose match-all u32 filter redirects every packet to it.
    The redirect is installed last, so no packet reaches the IFB before its tree exists.
    """
    shape = nic.shape
    if shape is None:
        return ()
    ifb = ifb_name(nic.name)
    if len(ifb) > IFNAMSIZ:
        raise SpecError(f"name: {nic.name!r} is too long for its IFB {ifb!r}")
    ops: list[Op] = [LinkOp(ifb, "ifb", IFB_TXQUEUELEN)]
    ops += _htb_tree(nic.name, shape)
    ops += _htb_tree(ifb, shape)
    ops.append(QdiscOp(nic.name, "ingress", TC_H_INGRESS, INGRESS_QDISC))
    ops.append(
        FilterOp(
            dev=nic.name,
            parent=INGRESS_QDISC,
            prio=1,
            protocol=ETH_P_ALL,
            keys=(MATCH_ALL,),
            action=MirredRedirect(ifb),
        )
    )
    return tuple(ops)


# --- topology ------------------------------------------------------------------------------
NAMESPACE_PREFIX = "dp-"


def namespace_name(lab_id: str, node_id: str) -> str:
    """`dp-<lab_id>-<node_id>`; the switch is `dp-<lab_id>-sw`."""
    return f"{NAMESPACE_PREFIX}{lab_id}-{node_id}"


def bridge_name(network: str) -> str:
    return f"{BRIDGE_PREFIX}{network}"


@dataclass(frozen=True)
class NicPlan:
    nic: NicSpec
    switch_ifname: str
    """The veth's other end, in the switch namespace, enslaved to `bridge`."""
    bridge: str
    shaping: tuple[Op, ...]


@dataclass(frozen=True)
class HostPlan:
    node_id: str
    namespace: str
    nics: tuple[NicPlan, ...]


@dataclass(frozen=True)
class TopologyPlan:
    lab_id: str
    switch_namespace: str
    bridges: tuple[tuple[str, str], ...]
    """(bridge ifname, network) in the switch namespace."""
    hosts: tuple[HostPlan, ...]

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab, in creation order (switch first)."""
        return (self.switch_namespace, *(h.namespace for h in self.hosts))

    def host(self, node_id: str) -> HostPlan:
        for host in self.hosts:
            if host.node_id == node_id:
                return host
        raise KeyError(f"no host {node_id!r} in lab {self.lab_id}")


def plan_topology(spec: TopologySpec) -> TopologyPlan:
    """Names of every namespace, bridge and veth end, and each NIC's shaping operations."""
    bridges = tuple((bridge_name(net), net) for net in spec.networks)
    hosts: list[HostPlan] = []
    for h, host in enumerate(spec.hosts):
        nics: list[NicPlan] = []
        for n, nic in enumerate(host.nics):
            switch_ifname = f"h{h}n{n}"
            if len(switch_ifname) > IFNAMSIZ:  # pragma: no cover - needs > 10**11 hosts
                raise SpecError(f"hosts: too many hosts for veth name {switch_ifname!r}")
            nics.append(NicPlan(nic, switch_ifname, bridge_name(nic.network), plan_nic(nic)))
        hosts.append(HostPlan(host.node_id, namespace_name(spec.lab_id, host.node_id), tuple(nics)))
    return TopologyPlan(
        lab_id=spec.lab_id,
        switch_namespace=namespace_name(spec.lab_id, SWITCH_NODE_ID),
        bridges=bridges,
        hosts=tuple(hosts),
    )

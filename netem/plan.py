"""Pure planner: a TopologySpec becomes namespace, bridge and veth names and, per NIC, the exact
qdisc/class/filter operations and switch loss rules that shape it. The appliers run these in
order (`netem.tc`, `netem.nft`) and nothing else, so every kernel object the lab makes is
golden-tested here; in-place changes are planned from two of these in `netem.linkchange`.
No I/O, no pyroute2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from netem.capabilities import KernelCaps, Unemulated
from netem.spec import (
    BRIDGE_PREFIX,
    DIRECTIONS,
    IFB_PREFIX,
    IFNAMSIZ,
    SWITCH_NODE_ID,
    DirectionSpec,
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
"""DSCP of each class; the same values as services.sockopts.Dscp."""

CLASS_PRIO: dict[str, int] = {"collective": 0, "control": 1, "kv": 2}
"""HTB prio (0 = served first, also when borrowing spare link rate)."""

LEAF_QDISC_MAJOR_BASE = 0x100
"""Leaf qdiscs (netem, or pfifo for a queue limit without netem) have handle
`<0x100 + leaf minor>:` — 101: under 1:1, 110:/120:/130: under 1:10/1:20/1:30."""

NUMGEN_MOD = 1_000_000
"""Loss rules draw `numgen random mod 1000000`: loss is resolved to 1 ppm (0.0001 %)."""

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

DEFAULT_QUEUE_LIMIT_PACKETS = 1000
"""A leaf's queue when the spec gives none: the veth/IFB txqueuelen, as without a leaf qdisc."""


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
class NetemParams:
    """sch_netem's options for one leaf: times in microseconds, probabilities in percent."""

    delay_us: int = 0
    jitter_us: int = 0
    loss_pct: float = 0.0
    duplicate_pct: float = 0.0
    corrupt_pct: float = 0.0
    reorder_pct: float = 0.0


@dataclass(frozen=True)
class QdiscOp:
    dev: str
    kind: Literal["htb", "ingress", "netem", "pfifo"]
    parent: int
    handle: int
    default_class: int = 0
    """htb only: minor of the class that takes unclassified packets."""
    limit_packets: int = 0
    """netem/pfifo leaves only: queue limit in packets."""
    netem: NetemParams | None = None
    """netem leaves only."""

    @property
    def is_leaf(self) -> bool:
        return self.kind in ("netem", "pfifo")


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


@dataclass(frozen=True)
class LossRuleOp:
    """Drop a random share of the frames one lab NIC sends or receives, on the lab switch.

    In the switch namespace's bridge (`bridge dualpath forward`): frames entering the bridge
    from `port` (the NIC's veth peer) are the NIC's egress, frames leaving through it its
    ingress. Dropping there, beyond the node, is loss on the wire: the sender's stack has
    accepted the packet, as with netem. (A netfilter DROP inside the node's own namespace
    would fail the sender's send() with EPERM and make TCP resend instead of losing.)"""

    port: str
    match: Literal["iifname", "oifname"]
    threshold: int
    """Drop when `numgen random mod NUMGEN_MOD` < threshold (loss in ppm)."""
    comment: str
    """`<node_id>/<nic>/<direction>`: names the rule, so set_link can find and replace it."""


@dataclass(frozen=True)
class NicShaping:
    """Everything that shapes one NIC: tc operations in its namespace (in order), loss rules
    for the lab switch, and what could not be emulated."""

    ops: tuple[Op, ...] = ()
    loss_rules: tuple[LossRuleOp, ...] = ()
    unemulated: tuple[Unemulated, ...] = ()


def ifb_name(nic_name: str) -> str:
    return f"{IFB_PREFIX}{nic_name}"


def leaf_qdisc_handle(classid: int) -> int:
    """Handle of the qdisc under leaf class `classid`: 1:1 -> 101:, 1:30 -> 130:."""
    return tc_handle(LEAF_QDISC_MAJOR_BASE + (classid & 0xFFFF), 0)


def leaf_class_ids(shape: LinkShape) -> tuple[int, ...]:
    """The HTB classes that hold packets (leaves) of one tree."""
    return tuple(CLASS_IDS.values()) if shape.priority_classes else (LINK_CLASS,)


def loss_threshold(loss_pct: float) -> int:
    return min(NUMGEN_MOD, round(loss_pct * NUMGEN_MOD / 100))


LossMechanism = Literal["nftables", "netem"]


def loss_mechanism(caps: KernelCaps, switch_port: str | None) -> LossMechanism | None:
    """Where random loss is emulated. The lab switch's nftables rule whenever there is one:
    the lost frame has used the sender's link (it is lost on the wire, after the shaper, as on
    a real link), every drop is counted per NIC and direction (`nft list`), and labs behave
    the same on kernels with and without netem. netem (which drops before the shaper) only
    where there is no lab switch or no nftables."""
    if caps.nft_numgen and switch_port is not None:
        return "nftables"
    if caps.netem:
        return "netem"
    return None


def _netem_features(d: DirectionSpec, loss: LossMechanism | None) -> tuple[str, ...]:
    """The direction's impairments that netem has to emulate."""
    return tuple(f for f in d.impairments() if f != "loss" or loss == "netem")


def _netem_params(d: DirectionSpec, loss: LossMechanism | None) -> NetemParams:
    return NetemParams(
        delay_us=round(d.delay_ms * 1000),
        jitter_us=round(d.jitter_ms * 1000),
        loss_pct=d.loss_pct if loss == "netem" else 0.0,
        duplicate_pct=d.duplicate_pct,
        corrupt_pct=d.corrupt_pct,
        reorder_pct=d.reorder_pct,
    )


def netem_limit(d: DirectionSpec) -> int:
    """netem's queue holds the delay line as well as the queue: the spec's limit, else the
    default queue plus the full frames the rate puts on the wire during delay + jitter."""
    if d.queue_limit_packets is not None:
        return d.queue_limit_packets
    in_flight_s = (d.delay_ms + d.jitter_ms) / 1000
    return DEFAULT_QUEUE_LIMIT_PACKETS + math.ceil(d.rate_bit / 8 * in_flight_s / ETH_FRAME_MAX)


def _leaf_qdiscs(
    dev: str, shape: LinkShape, d: DirectionSpec, caps: KernelCaps, loss: LossMechanism | None
) -> list[Op]:
    """netem under every leaf where the kernel has it and the direction needs it; else a pfifo
    when only a queue limit is asked for; else nothing (the kernel's default pfifo)."""
    if caps.netem and (_netem_features(d, loss) or d.queue_limit_packets is not None):
        return [
            QdiscOp(
                dev,
                "netem",
                classid,
                leaf_qdisc_handle(classid),
                limit_packets=netem_limit(d),
                netem=_netem_params(d, loss),
            )
            for classid in leaf_class_ids(shape)
        ]
    if d.queue_limit_packets is not None:
        return [
            QdiscOp(
                dev,
                "pfifo",
                classid,
                leaf_qdisc_handle(classid),
                limit_packets=d.queue_limit_packets,
            )
            for classid in leaf_class_ids(shape)
        ]
    return []


def _htb_tree(
    dev: str, shape: LinkShape, d: DirectionSpec, caps: KernelCaps, loss: LossMechanism | None
) -> list[Op]:
    rate, ceil = d.rate_bit, d.ceil_bit
    link_burst = d.burst_bytes if d.burst_bytes is not None else burst_bytes(rate)
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
        return ops + _leaf_qdiscs(dev, shape, d, caps, loss)
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
                rate_bit=min(guaranteed[name], ceil),
                ceil_bit=ceil,
                burst_bytes=burst_bytes(guaranteed[name]),
                cburst_bytes=link_burst,
                prio=CLASS_PRIO[name],
                quantum_bytes=QUANTUM_BYTES,
            )
        )
    ops += _leaf_qdiscs(dev, shape, d, caps, loss)
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


NO_SWITCH_REASON = (
    "no sch_netem, and no lab switch to drop on (a netfilter DROP in the NIC's own namespace "
    "fails the sender's send() instead of losing the packet)"
)


def _unemulated_and_loss(
    nic: NicSpec, caps: KernelCaps, node_id: str, switch_port: str | None
) -> tuple[list[LossRuleOp], list[Unemulated]]:
    shape = nic.shape
    assert shape is not None
    loss = loss_mechanism(caps, switch_port)
    rules: list[LossRuleOp] = []
    missing: list[Unemulated] = []
    for direction in DIRECTIONS:
        d = shape.direction(direction)
        for feature in d.impairments():
            if feature == "loss" and loss == "nftables":
                assert switch_port is not None
                rules.append(
                    LossRuleOp(
                        port=switch_port,
                        match="iifname" if direction == "egress" else "oifname",
                        threshold=loss_threshold(d.loss_pct),
                        comment=f"{node_id}/{nic.name}/{direction}",
                    )
                )
            elif feature == "loss" and loss is None:
                reason = NO_SWITCH_REASON if switch_port is None else "no sch_netem, no nft numgen"
                missing.append(Unemulated(node_id, nic.name, direction, feature, reason))
            elif feature != "loss" and not caps.netem:
                missing.append(Unemulated(node_id, nic.name, direction, feature, "no sch_netem"))
    return rules, missing


def shape_nic(
    nic: NicSpec,
    caps: KernelCaps,
    *,
    node_id: str = "",
    switch_port: str | None = None,
) -> NicShaping:
    """Everything that shapes `nic` on a kernel with `caps`.

    Egress: HTB root on the NIC. Ingress: an IFB `ifb-<nic>` with the direction's HTB tree on
    its egress, fed by an ingress qdisc whose match-all u32 filter redirects every packet to it.
    The redirect is installed last, so no packet reaches the IFB before its tree exists.
    Delay, jitter, duplicate, corrupt and reorder go into netem under each HTB leaf; loss
    becomes a LossRuleOp on `switch_port` (the NIC's veth peer on the lab switch) wherever
    nftables is there (see `loss_mechanism`), else netem loss. What the kernel cannot do is
    reported in `unemulated`, never silently left out.
    """
    shape = nic.shape
    if shape is None:
        return NicShaping()
    ifb = ifb_name(nic.name)
    if len(ifb) > IFNAMSIZ:
        raise SpecError(f"name: {nic.name!r} is too long for its IFB {ifb!r}")
    loss = loss_mechanism(caps, switch_port)
    ops: list[Op] = [LinkOp(ifb, "ifb", IFB_TXQUEUELEN)]
    ops += _htb_tree(nic.name, shape, shape.direction("egress"), caps, loss)
    ops += _htb_tree(ifb, shape, shape.direction("ingress"), caps, loss)
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
    rules, missing = _unemulated_and_loss(nic, caps, node_id, switch_port)
    return NicShaping(tuple(ops), tuple(rules), tuple(missing))


def plan_nic(nic: NicSpec, caps: KernelCaps | None = None) -> tuple[Op, ...]:
    """The tc operations (inside the node namespace, in order) that shape `nic`; () when
    unshaped. `caps` defaults to a kernel with netem; see `shape_nic` for what is left out."""
    return shape_nic(nic, caps or KernelCaps.with_netem()).ops


def expected_qdiscs(ops: tuple[Op, ...]) -> dict[str, set[tuple[str, int, int]]]:
    """dev -> {(kind, parent, handle)} of every qdisc the plan creates: exactly what a
    qdisc dump of a lab NIC and its IFB must show (the kernel's default leaf pfifos are
    hidden from dumps), so anything else there is foreign."""
    out: dict[str, set[tuple[str, int, int]]] = {}
    for op in ops:
        if isinstance(op, LinkOp):
            out.setdefault(op.ifname, set())
        elif isinstance(op, QdiscOp):
            out.setdefault(op.dev, set()).add((op.kind, op.parent, op.handle))
    return out


def expected_classes(ops: tuple[Op, ...]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for op in ops:
        if isinstance(op, ClassOp):
            out.setdefault(op.dev, set()).add(op.classid)
    return out


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
    loss_rules: tuple[LossRuleOp, ...] = ()
    unemulated: tuple[Unemulated, ...] = ()
    offloads_off: bool = False
    """TSO and GSO off on this NIC: its network has per-packet impairments (see
    `PER_PACKET_IMPAIRMENTS`), so every skb the NIC sends must be one wire frame."""

    @property
    def shaped(self) -> NicShaping:
        return NicShaping(self.shaping, self.loss_rules, self.unemulated)


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
    def loss_rules(self) -> tuple[LossRuleOp, ...]:
        """Every loss rule of the lab switch (empty unless loss falls back to nftables)."""
        return tuple(r for h in self.hosts for n in h.nics for r in n.loss_rules)

    @property
    def unemulated(self) -> tuple[Unemulated, ...]:
        return tuple(u for h in self.hosts for n in h.nics for u in n.unemulated)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab, in creation order (switch first)."""
        return (self.switch_namespace, *(h.namespace for h in self.hosts))

    def host(self, node_id: str) -> HostPlan:
        for host in self.hosts:
            if host.node_id == node_id:
                return host
        raise KeyError(f"no host {node_id!r} in lab {self.lab_id}")


PER_PACKET_IMPAIRMENTS = ("loss", "duplicate", "corrupt", "reorder")
"""netem and the nftables rules act per skb; with TSO/GSO one TCP skb can be a 64 KB burst of
~44 frames, lost or duplicated as a whole (measured: 2 drops of 34-60 KB instead of ~1 % of
1,400 frames). On a network with any of these, senders emit one frame per skb."""


def has_per_packet_impairments(nic: NicSpec) -> bool:
    """Whether some direction of `nic` has a per-packet impairment."""
    if nic.shape is None:
        return False
    used = (f for d in DIRECTIONS for f in nic.shape.direction(d).impairments())
    return any(f in PER_PACKET_IMPAIRMENTS for f in used)


def impaired_networks(spec: TopologySpec) -> frozenset[str]:
    """Networks where some NIC direction has a per-packet impairment."""
    return frozenset(
        nic.network for host in spec.hosts for nic in host.nics if has_per_packet_impairments(nic)
    )


def plan_topology(spec: TopologySpec, caps: KernelCaps | None = None) -> TopologyPlan:
    """Names of every namespace, bridge and veth end, and each NIC's shaping on a kernel with
    `caps` (default: one with netem)."""
    caps = caps or KernelCaps.with_netem()
    impaired = impaired_networks(spec)
    bridges = tuple((bridge_name(net), net) for net in spec.networks)
    hosts: list[HostPlan] = []
    for h, host in enumerate(spec.hosts):
        nics: list[NicPlan] = []
        for n, nic in enumerate(host.nics):
            switch_ifname = f"h{h}n{n}"
            if len(switch_ifname) > IFNAMSIZ:  # pragma: no cover - needs > 10**11 hosts
                raise SpecError(f"hosts: too many hosts for veth name {switch_ifname!r}")
            shaped = shape_nic(nic, caps, node_id=host.node_id, switch_port=switch_ifname)
            nics.append(
                NicPlan(
                    nic,
                    switch_ifname,
                    bridge_name(nic.network),
                    shaped.ops,
                    shaped.loss_rules,
                    shaped.unemulated,
                    offloads_off=nic.network in impaired,
                )
            )
        hosts.append(HostPlan(host.node_id, namespace_name(spec.lab_id, host.node_id), tuple(nics)))
    return TopologyPlan(
        lab_id=spec.lab_id,
        switch_namespace=namespace_name(spec.lab_id, SWITCH_NODE_ID),
        bridges=bridges,
        hosts=tuple(hosts),
    )

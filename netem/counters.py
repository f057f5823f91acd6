"""Kernel byte/packet/drop/backlog counters of the lab's NICs, read over an open netlink handle:
the shaping qdiscs and classes for shaped directions, link statistics otherwise. Reads only;
nothing here creates, changes or deletes a kernel object. `discover_sources` finds a
namespace's NICs and their shaping from the kernel alone, for a node exporting its own counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from netem.errors import NetemError
from netem.plan import CLASS_IDS, LINK_CLASS, ROOT_QDISC, TC_H_ROOT, HostPlan, ifb_name
from netem.spec import IFB_PREFIX

# Byte accounting: counts include the 14-byte Ethernet header of every frame and nothing below
# it (no FCS, preamble or inter-frame gap), because that is what HTB charges against the rate:
# qdisc_pkt_len() counts a GSO super-packet as the frames it will become (headers once per
# segment). So for a shaped direction, bytes / rate is exact. Unshaped directions come from the
# veth's link statistics, which count a GSO super-packet once with a single set of headers:
# up to ~4 % fewer header bytes than the same frames would carry on a wire.


@dataclass(frozen=True)
class ClassCounters:
    """One HTB leaf class: cumulative bytes/packets sent (frames, headers included), drops at
    its leaf queue and overlimits (times it had to wait for tokens); backlog is what its leaf
    queue holds at the moment of the snapshot."""

    bytes: int
    packets: int
    drops: int
    backlog_bytes: int = 0
    backlog_packets: int = 0
    overlimits: int = 0


@dataclass(frozen=True)
class NicCounters:
    """Cumulative counters of one NIC (both directions) since the lab came up."""

    egress_bytes: int
    ingress_bytes: int
    egress_drops: int
    ingress_drops: int
    egress_backlog_bytes: int
    ingress_backlog_bytes: int
    rate_mbit: float | None
    """The configured egress rate (both directions' in the simple LinkShape form); None when
    unshaped. Per direction: `egress_rate_mbit`, `ingress_rate_mbit`."""
    egress_classes: dict[str, ClassCounters] = field(default_factory=dict)
    ingress_classes: dict[str, ClassCounters] = field(default_factory=dict)
    """'collective', 'control', 'kv' when the NIC has priority classes, else empty."""
    ingress_rate_mbit: float | None = None
    """The configured ingress rate when it differs from `rate_mbit` (per-direction specs or
    set_link), else None; use `direction_rate_mbit`."""
    egress_packets: int = 0
    ingress_packets: int = 0
    egress_backlog_packets: int = 0
    ingress_backlog_packets: int = 0
    egress_overlimits: int = 0
    ingress_overlimits: int = 0
    """Times the root HTB found no class allowed to send (shaped directions; 0 otherwise)."""

    def direction_rate_mbit(self, direction: str) -> float | None:
        """The configured rate of 'egress' or 'ingress' when the snapshot was taken."""
        if direction == "ingress" and self.ingress_rate_mbit is not None:
            return self.ingress_rate_mbit
        return self.rate_mbit


@dataclass(frozen=True)
class NicSource:
    """Where one NIC's counters live inside its namespace."""

    name: str
    ifb: str | None
    """The IFB carrying the NIC's shaped ingress; None when unshaped."""
    rate_mbit: float | None
    """Egress rate."""
    classes: tuple[tuple[str, int], ...] = ()
    """(class name, classid) of the leaf classes, both trees."""
    ingress_rate_mbit: float | None = None
    """None: the same as `rate_mbit`."""


def nic_sources(host: HostPlan) -> list[NicSource]:
    """Where the counters of each NIC of `host` live, as its plan shapes it."""
    sources: list[NicSource] = []
    for nic_plan in host.nics:
        nic = nic_plan.nic
        shape = nic.shape
        if shape is None:
            sources.append(NicSource(name=nic.name, ifb=None, rate_mbit=None))
            continue
        egress = shape.direction("egress").rate_mbit
        ingress = shape.direction("ingress").rate_mbit
        classes = tuple(CLASS_IDS.items()) if shape.priority_classes else ()
        sources.append(
            NicSource(
                name=nic.name,
                ifb=ifb_name(nic.name),
                rate_mbit=egress,
                classes=classes,
                ingress_rate_mbit=None if ingress == egress else ingress,
            )
        )
    return sources


@dataclass(frozen=True)
class _Stats:
    bytes: int
    packets: int
    drops: int
    backlog: int
    qlen: int = 0
    overlimits: int = 0

    def as_class(self) -> ClassCounters:
        return ClassCounters(
            self.bytes, self.packets, self.drops, self.backlog, self.qlen, self.overlimits
        )


def _stats_of(msg: Any) -> _Stats:
    """Basic + queue stats of a qdisc or class message (TCA_STATS2, else legacy TCA_STATS,
    which carries both in one map)."""
    stats2 = msg.get_attr("TCA_STATS2")
    if stats2 is not None:
        basic = stats2.get_attr("TCA_STATS_BASIC") or {}
        queue = stats2.get_attr("TCA_STATS_QUEUE") or {}
    else:
        basic = queue = msg.get_attr("TCA_STATS") or {}
    return _Stats(
        bytes=int(basic.get("bytes", 0)),
        packets=int(basic.get("packets", 0)),
        drops=int(queue.get("drops", 0)),
        backlog=int(queue.get("backlog", 0)),
        qlen=int(queue.get("qlen", 0)),
        overlimits=int(queue.get("overlimits", 0)),
    )


def _root_htb(qdiscs: Iterable[Any], index: int) -> _Stats | None:
    for msg in qdiscs:
        if (
            msg["index"] == index
            and msg["parent"] == TC_H_ROOT
            and msg["handle"] == ROOT_QDISC
            and msg.get_attr("TCA_KIND") == "htb"
        ):
            return _stats_of(msg)
    return None


def _classes(ipr: Any, index: int, wanted: Sequence[tuple[str, int]]) -> dict[str, ClassCounters]:
    if not wanted:
        return {}
    by_id = {int(msg["handle"]): _stats_of(msg) for msg in ipr.get_classes(index=index)}
    out: dict[str, ClassCounters] = {}
    for name, classid in wanted:
        st = by_id.get(classid)
        if st is None:
            raise NetemError(f"class {classid >> 16:x}:{classid & 0xFFFF:x} ({name}) is missing")
        out[name] = st.as_class()
    return out


def read_nics(ipr: Any, namespace: str, sources: Sequence[NicSource]) -> dict[str, NicCounters]:
    """One snapshot of every NIC of one namespace: one link dump, one qdisc dump, and one
    class dump per classed tree. `ipr` is a pyroute2 IPRoute bound to `namespace`."""
    links: dict[str, tuple[int, dict[str, Any]]] = {}
    for msg in ipr.get_links():
        stats = msg.get_attr("IFLA_STATS64") or msg.get_attr("IFLA_STATS") or {}
        links[str(msg.get_attr("IFLA_IFNAME"))] = (int(msg["index"]), stats)
    qdiscs = list(ipr.get_qdiscs()) if any(s.ifb for s in sources) else []
    out: dict[str, NicCounters] = {}
    for src in sources:
        if src.name not in links:
            raise NetemError(f"{namespace}: NIC {src.name} is missing", operation="read counters")
        index, link = links[src.name]
        if src.ifb is None:
            out[src.name] = NicCounters(
                egress_bytes=int(link.get("tx_bytes", 0)),
                ingress_bytes=int(link.get("rx_bytes", 0)),
                egress_drops=int(link.get("tx_dropped", 0)),
                ingress_drops=int(link.get("rx_dropped", 0)),
                egress_backlog_bytes=0,
                ingress_backlog_bytes=0,
                rate_mbit=None,
                egress_packets=int(link.get("tx_packets", 0)),
                ingress_packets=int(link.get("rx_packets", 0)),
            )
            continue
        if src.ifb not in links:
            raise NetemError(f"{namespace}: IFB {src.ifb} is missing", operation="read counters")
        ifb_index = links[src.ifb][0]
        egress = _root_htb(qdiscs, index)
        ingress = _root_htb(qdiscs, ifb_index)
        if egress is None or ingress is None:
            where = src.name if egress is None else src.ifb
            raise NetemError(
                f"{namespace}: the shaping HTB on {where} is missing", operation="read counters"
            )
        out[src.name] = NicCounters(
            egress_bytes=egress.bytes,
            ingress_bytes=ingress.bytes,
            egress_drops=egress.drops,
            ingress_drops=ingress.drops,
            egress_backlog_bytes=egress.backlog,
            ingress_backlog_bytes=ingress.backlog,
            rate_mbit=src.rate_mbit,
            egress_classes=_classes(ipr, index, src.classes),
            ingress_classes=_classes(ipr, ifb_index, src.classes),
            ingress_rate_mbit=src.ingress_rate_mbit,
            egress_packets=egress.packets,
            ingress_packets=ingress.packets,
            egress_backlog_packets=egress.qlen,
            ingress_backlog_packets=ingress.qlen,
            egress_overlimits=egress.overlimits,
            ingress_overlimits=ingress.overlimits,
        )
    return out


def _link_class_rate_mbit(ipr: Any, index: int) -> float | None:
    """The rate of class 1:1 (the link) as the kernel holds it, Mbit/s."""
    for msg in ipr.get_classes(index=index):
        if int(msg["handle"]) != LINK_CLASS:
            continue
        opts = msg.get_attr("TCA_OPTIONS")
        if opts is None:
            return None
        rate64 = opts.get_attr("TCA_HTB_RATE64")
        parms = opts.get_attr("TCA_HTB_PARMS") or {}
        byte_rate = int(rate64) if rate64 else int(parms.get("rate", 0))
        return byte_rate * 8 / 1e6 if byte_rate else None
    return None


def discover_sources(ipr: Any) -> list[NicSource]:
    """Every NIC of the namespace `ipr` is bound to (not loopback, not an IFB), and how the lab
    shaped it, read from the kernel alone: a NIC is shaped when it and its `ifb-<nic>` carry the
    lab's HTB root; its classes are the lab's leaf classes present on it; its rates are those of
    the link classes (so a rate set_link changed is the one reported). For a node process that
    exports its own namespace's counters without knowing the lab's plan."""
    names: dict[str, int] = {}
    for msg in ipr.get_links():
        names[str(msg.get_attr("IFLA_IFNAME"))] = int(msg["index"])
    roots = {
        int(msg["index"])
        for msg in ipr.get_qdiscs()
        if msg["parent"] == TC_H_ROOT
        and msg["handle"] == ROOT_QDISC
        and msg.get_attr("TCA_KIND") == "htb"
    }
    sources: list[NicSource] = []
    for name, index in sorted(names.items()):
        if name == "lo" or name.startswith(IFB_PREFIX):
            continue
        ifb = ifb_name(name)
        if index not in roots or names.get(ifb) not in roots:
            sources.append(NicSource(name=name, ifb=None, rate_mbit=None))
            continue
        have = {int(msg["handle"]) for msg in ipr.get_classes(index=index)}
        classes = tuple((n, c) for n, c in CLASS_IDS.items() if c in have)
        egress = _link_class_rate_mbit(ipr, index)
        ingress = _link_class_rate_mbit(ipr, names[ifb])
        sources.append(
            NicSource(
                name=name,
                ifb=ifb,
                rate_mbit=egress,
                classes=classes,
                ingress_rate_mbit=None if ingress == egress else ingress,
            )
        )
    return sources

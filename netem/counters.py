"""Kernel byte/packet/drop counters of the lab's NICs, read over an open netlink handle: the
shaping qdiscs and classes for shaped directions, link statistics otherwise. Reads only;
nothing here creates, changes or deletes a kernel object.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from netem.errors import NetemError
from netem.plan import ROOT_QDISC, TC_H_ROOT

# Byte accounting: counts include the 14-byte Ethernet header of every frame and nothing below
# it (no FCS, preamble or inter-frame gap), because that is what HTB charges against the rate:
# qdisc_pkt_len() counts a GSO super-packet as the frames it will become (headers once per
# segment). So for a shaped direction, bytes / rate is exact. Unshaped directions come from the
# veth's link statistics, which count a GSO super-packet once with a single set of headers:
# up to ~4 % fewer header bytes than the same frames would carry on a wire.


@dataclass(frozen=True)
class ClassCounters:
    bytes: int
    packets: int
    drops: int


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


@dataclass(frozen=True)
class _Stats:
    bytes: int
    packets: int
    drops: int
    backlog: int


def _stats_of(msg: Any) -> _Stats:
    """Basic + queue stats of a qdisc or class message (TCA_STATS2, else legacy TCA_STATS)."""
    stats2 = msg.get_attr("TCA_STATS2")
    if stats2 is not None:
        basic = stats2.get_attr("TCA_STATS_BASIC") or {}
        queue = stats2.get_attr("TCA_STATS_QUEUE") or {}
        return _Stats(
            bytes=int(basic.get("bytes", 0)),
            packets=int(basic.get("packets", 0)),
            drops=int(queue.get("drops", 0)),
            backlog=int(queue.get("backlog", 0)),
        )
    legacy = msg.get_attr("TCA_STATS") or {}
    return _Stats(
        bytes=int(legacy.get("bytes", 0)),
        packets=int(legacy.get("packets", 0)),
        drops=int(legacy.get("drops", 0)),
        backlog=int(legacy.get("backlog", 0)),
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
        out[name] = ClassCounters(bytes=st.bytes, packets=st.packets, drops=st.drops)
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
        )
    return out

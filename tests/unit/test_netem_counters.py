"""Counter snapshots from netlink messages, with an in-memory fake of the netlink handle."""

from __future__ import annotations

from typing import Any

import pytest

from netem.counters import ClassCounters, NicCounters, NicSource, read_nics
from netem.errors import NetemError
from netem.plan import CLASS_IDS, ROOT_QDISC, TC_H_INGRESS, TC_H_ROOT, tc_handle


class Msg:
    def __init__(self, fields: dict[str, Any], attrs: dict[str, Any]) -> None:
        self.fields = fields
        self.attrs = attrs

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def stats2(nbytes: int, packets: int, drops: int = 0, backlog: int = 0) -> Msg:
    return Msg(
        {},
        {
            "TCA_STATS_BASIC": {"bytes": nbytes, "packets": packets},
            "TCA_STATS_QUEUE": {"drops": drops, "backlog": backlog, "qlen": 0},
        },
    )


def link(index: int, name: str, **stats: int) -> Msg:
    return Msg({"index": index}, {"IFLA_IFNAME": name, "IFLA_STATS64": stats})


def qdisc(index: int, kind: str, parent: int, handle: int, st: Msg) -> Msg:
    return Msg(
        {"index": index, "parent": parent, "handle": handle},
        {"TCA_KIND": kind, "TCA_STATS2": st},
    )


class FakeNetlink:
    def __init__(self, links: list[Msg], qdiscs: list[Msg], classes: dict[int, list[Msg]]):
        self.links, self.qdiscs, self.classes = links, qdiscs, classes

    def get_links(self) -> list[Msg]:
        return self.links

    def get_qdiscs(self) -> list[Msg]:
        return self.qdiscs

    def get_classes(self, index: int) -> list[Msg]:
        return self.classes.get(index, [])


def leaf(classid: int, nbytes: int) -> Msg:
    return Msg({"handle": classid}, {"TCA_STATS2": stats2(nbytes, nbytes // 1514, 1)})


def test_shaped_directions_come_from_the_htb_roots_and_classes() -> None:
    fake = FakeNetlink(
        links=[
            link(1, "lo"),
            link(2, "cnic", tx_bytes=7, rx_bytes=7),
            link(3, "ifb-cnic"),
            link(4, "mgmt", tx_bytes=100, rx_bytes=200, tx_dropped=1, rx_dropped=2),
        ],
        qdiscs=[
            qdisc(2, "htb", TC_H_ROOT, ROOT_QDISC, stats2(3000, 2, drops=1, backlog=1514)),
            qdisc(2, "ingress", TC_H_INGRESS, tc_handle(0xFFFF, 0), stats2(9, 9)),
            qdisc(3, "htb", TC_H_ROOT, ROOT_QDISC, stats2(6000, 4)),
        ],
        classes={
            2: [leaf(cid, 1000 * (i + 1)) for i, cid in enumerate(CLASS_IDS.values())],
            3: [leaf(cid, 2000 * (i + 1)) for i, cid in enumerate(CLASS_IDS.values())],
        },
    )
    got = read_nics(
        fake,
        "dp-x-prefill-0",
        [
            NicSource("cnic", "ifb-cnic", 400.0, tuple(CLASS_IDS.items())),
            NicSource("mgmt", None, None),
        ],
    )
    assert got["cnic"] == NicCounters(
        egress_bytes=3000,
        ingress_bytes=6000,
        egress_drops=1,
        ingress_drops=0,
        egress_backlog_bytes=1514,
        ingress_backlog_bytes=0,
        rate_mbit=400.0,
        egress_classes={
            "collective": ClassCounters(1000, 0, 1),
            "control": ClassCounters(2000, 1, 1),
            "kv": ClassCounters(3000, 1, 1),
        },
        ingress_classes={
            "collective": ClassCounters(2000, 1, 1),
            "control": ClassCounters(4000, 2, 1),
            "kv": ClassCounters(6000, 3, 1),
        },
        egress_packets=2,
        ingress_packets=4,
    )
    assert got["mgmt"] == NicCounters(100, 200, 1, 2, 0, 0, None)


def test_a_missing_shaping_qdisc_is_an_error_not_a_silent_fallback() -> None:
    fake = FakeNetlink([link(2, "snic"), link(3, "ifb-snic")], [], {})
    with pytest.raises(NetemError, match="the shaping HTB on snic is missing"):
        read_nics(fake, "ns", [NicSource("snic", "ifb-snic", 50.0)])
    with pytest.raises(NetemError, match="NIC cnic is missing"):
        read_nics(fake, "ns", [NicSource("cnic", None, None)])


def test_backlog_packets_and_overlimits_come_from_the_queue_stats() -> None:
    def st(nbytes: int, packets: int, backlog: int, qlen: int, overlimits: int) -> Msg:
        return Msg(
            {},
            {
                "TCA_STATS_BASIC": {"bytes": nbytes, "packets": packets},
                "TCA_STATS_QUEUE": {
                    "drops": 3, "backlog": backlog, "qlen": qlen, "overlimits": overlimits
                },
            },
        )  # fmt: skip

    kv = CLASS_IDS["kv"]
    fake = FakeNetlink(
        links=[link(2, "cnic"), link(3, "ifb-cnic")],
        qdiscs=[
            qdisc(2, "htb", TC_H_ROOT, ROOT_QDISC, st(9000, 6, 3028, 2, 11)),
            qdisc(3, "htb", TC_H_ROOT, ROOT_QDISC, st(1000, 1, 0, 0, 0)),
        ],
        classes={
            2: [Msg({"handle": kv}, {"TCA_STATS2": st(8000, 5, 1514, 1, 4)})],
            3: [Msg({"handle": kv}, {"TCA_STATS2": st(1000, 1, 0, 0, 0)})],
        },
    )
    got = read_nics(fake, "ns", [NicSource("cnic", "ifb-cnic", 100.0, (("kv", kv),))])["cnic"]
    assert (got.egress_packets, got.egress_backlog_packets, got.egress_overlimits) == (6, 2, 11)
    assert got.egress_backlog_bytes == 3028
    assert got.egress_classes["kv"] == ClassCounters(8000, 5, 3, 1514, 1, 4)


class Opts:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def htb_class(classid: int, byte_rate: int, rate64: int | None = None) -> Msg:
    attrs: dict[str, Any] = {"TCA_HTB_PARMS": {"rate": byte_rate}}
    if rate64 is not None:
        attrs["TCA_HTB_RATE64"] = rate64
    return Msg({"handle": classid}, {"TCA_OPTIONS": Opts(attrs), "TCA_STATS2": stats2(0, 0)})


def test_discover_sources_reads_the_shaping_from_the_kernel() -> None:
    from netem.counters import discover_sources
    from netem.plan import LINK_CLASS

    fake = FakeNetlink(
        links=[
            link(1, "lo"),
            link(2, "cnic"),
            link(3, "ifb-cnic"),
            link(4, "snic"),
            link(5, "ifb-snic"),
            link(6, "mgmt"),
            link(7, "eth9"),
            link(8, "ifb-eth9"),
        ],
        qdiscs=[
            qdisc(i, "htb", TC_H_ROOT, ROOT_QDISC, stats2(0, 0)) for i in (2, 3, 4, 5, 7)
        ],  # eth9's IFB has no tree: not the lab's shaping, read as unshaped
        classes={
            2: [htb_class(LINK_CLASS, 50_000_000), *(htb_class(c, 1) for c in CLASS_IDS.values())],
            3: [htb_class(LINK_CLASS, 25_000_000)],
            4: [htb_class(LINK_CLASS, 0, rate64=12_500_000_000)],
            5: [htb_class(LINK_CLASS, 0, rate64=12_500_000_000)],
        },
    )
    got = {s.name: s for s in discover_sources(fake)}
    assert set(got) == {"cnic", "snic", "mgmt", "eth9"}
    assert got["cnic"] == NicSource(
        "cnic", "ifb-cnic", 400.0, tuple(CLASS_IDS.items()), ingress_rate_mbit=200.0
    )
    assert got["snic"] == NicSource("snic", "ifb-snic", 100_000.0, ())
    assert got["mgmt"] == NicSource("mgmt", None, None)
    assert got["eth9"] == NicSource("eth9", None, None)

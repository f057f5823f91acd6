"""Golden plans of the pure netem planner, and spec validation messages."""

from __future__ import annotations

import math

import pytest

from netem.plan import (
    CLASS_IDS,
    ETH_P_ALL,
    ETH_P_IP,
    INGRESS_QDISC,
    LINK_CLASS,
    MATCH_ALL,
    ROOT_QDISC,
    TC_H_INGRESS,
    TC_H_ROOT,
    ClassOp,
    FilterOp,
    LinkOp,
    MirredRedirect,
    QdiscOp,
    U32Key,
    burst_bytes,
    dscp_key,
    format_handle,
    plan_nic,
    plan_topology,
    tc_handle,
)
from netem.spec import HostSpec, LinkShape, NicSpec, SpecError, TopologySpec


def htb_class(
    dev: str, name: str, parent: int, classid: int, rate: int, ceil: int, burst: int, cburst: int,
    prio: int,
) -> ClassOp:  # fmt: skip
    return ClassOp(dev, name, parent, classid, rate, ceil, burst, cburst, prio, 65536)


def test_handles_are_tc_notation() -> None:
    assert format_handle(ROOT_QDISC) == "1:0"
    assert format_handle(LINK_CLASS) == "1:1"
    assert [format_handle(h) for h in CLASS_IDS.values()] == ["1:10", "1:20", "1:30"]
    assert format_handle(INGRESS_QDISC) == "ffff:0"
    assert format_handle(TC_H_ROOT) == "root"
    assert format_handle(TC_H_INGRESS) == "ingress"
    assert tc_handle(0xFFFF, 0) == 0xFFFF0000
    with pytest.raises(ValueError, match="out of range"):
        tc_handle(0x10000, 0)


def test_dscp_key_matches_the_top_six_bits_of_the_tos_byte() -> None:
    # TOS is byte 1 of the IPv4 header: bits 16..23 of the first 32-bit word.
    assert dscp_key(46) == U32Key(value=0x00B80000, mask=0x00FC0000, offset=0)
    assert dscp_key(24) == U32Key(value=0x00600000, mask=0x00FC0000, offset=0)
    assert dscp_key(8) == U32Key(value=0x00200000, mask=0x00FC0000, offset=0)
    with pytest.raises(ValueError, match=r"outside 0\.\.63"):
        dscp_key(64)


def test_burst_is_five_ms_of_rate_with_a_two_frame_floor() -> None:
    assert burst_bytes(10_000_000) == 6250
    assert burst_bytes(1_000_000_000) == 625_000
    assert burst_bytes(5_000_000_000) == 3_125_000
    assert burst_bytes(1_000_000) == 2 * 1514


def test_unshaped_nic_has_no_operations() -> None:
    assert plan_nic(NicSpec("mgmt", "mgmt", "198.18.2.1/24")) == ()


def test_shaped_snic_golden() -> None:
    nic = NicSpec("snic", "storage", "198.18.1.10/24", LinkShape(rate_mbit=1000))
    rate, burst = 1_000_000_000, 625_000
    assert plan_nic(nic) == (
        LinkOp("ifb-snic", "ifb", 1000),
        QdiscOp("snic", "htb", TC_H_ROOT, ROOT_QDISC, default_class=0x1),
        htb_class("snic", "link", ROOT_QDISC, LINK_CLASS, rate, rate, burst, burst, 0),
        QdiscOp("ifb-snic", "htb", TC_H_ROOT, ROOT_QDISC, default_class=0x1),
        htb_class("ifb-snic", "link", ROOT_QDISC, LINK_CLASS, rate, rate, burst, burst, 0),
        QdiscOp("snic", "ingress", TC_H_INGRESS, INGRESS_QDISC),
        FilterOp("snic", INGRESS_QDISC, 1, ETH_P_ALL, (MATCH_ALL,), 0, MirredRedirect("ifb-snic")),
    )


def _class_tree(dev: str) -> list[object]:
    link = 100_000_000
    return [
        QdiscOp(dev, "htb", TC_H_ROOT, ROOT_QDISC, default_class=0x30),
        htb_class(dev, "link", ROOT_QDISC, LINK_CLASS, link, link, 62_500, 62_500, 0),
        htb_class(dev, "collective", LINK_CLASS, tc_handle(1, 0x10), 90_000_000, link, 56_250,
                  62_500, 0),
        htb_class(dev, "control", LINK_CLASS, tc_handle(1, 0x20), 5_000_000, link, 3125, 62_500,
                  1),
        htb_class(dev, "kv", LINK_CLASS, tc_handle(1, 0x30), 5_000_000, link, 3125, 62_500, 2),
        FilterOp(dev, ROOT_QDISC, 1, ETH_P_IP, (U32Key(0x00B80000, 0x00FC0000, 0),),
                 tc_handle(1, 0x10)),
        FilterOp(dev, ROOT_QDISC, 2, ETH_P_IP, (U32Key(0x00600000, 0x00FC0000, 0),),
                 tc_handle(1, 0x20)),
        FilterOp(dev, ROOT_QDISC, 3, ETH_P_IP, (U32Key(0x00200000, 0x00FC0000, 0),),
                 tc_handle(1, 0x30)),
    ]  # fmt: skip


def test_cnic_with_classes_golden() -> None:
    nic = NicSpec(
        "cnic", "compute", "198.18.0.10/24", LinkShape(rate_mbit=100, priority_classes=True)
    )
    assert list(plan_nic(nic)) == [
        LinkOp("ifb-cnic", "ifb", 1000),
        *_class_tree("cnic"),
        *_class_tree("ifb-cnic"),
        QdiscOp("cnic", "ingress", TC_H_INGRESS, INGRESS_QDISC),
        FilterOp("cnic", INGRESS_QDISC, 1, ETH_P_ALL, (MATCH_ALL,), 0, MirredRedirect("ifb-cnic")),
    ]


def test_class_guarantees_sum_to_the_link_and_all_may_borrow_it() -> None:
    nic = NicSpec(
        "cnic",
        "compute",
        "198.18.0.10/24",
        LinkShape(rate_mbit=3000, priority_classes=True, kv_min_fraction=0.2),
    )
    leaves = [op for op in plan_nic(nic) if isinstance(op, ClassOp) and op.dev == "cnic"][1:]
    assert [op.name for op in leaves] == ["collective", "control", "kv"]
    assert sum(op.rate_bit for op in leaves) == 3_000_000_000
    assert leaves[2].rate_bit == 600_000_000
    assert all(op.ceil_bit == 3_000_000_000 for op in leaves)
    assert [op.prio for op in leaves] == [0, 1, 2]


def test_redirect_is_the_last_operation() -> None:
    # No packet may reach the IFB before its HTB tree exists.
    ops = plan_nic(NicSpec("snic", "storage", "198.18.1.10/24", LinkShape(10)))
    assert isinstance(ops[-1], FilterOp) and ops[-1].action == MirredRedirect("ifb-snic")


def _spec() -> TopologySpec:
    return TopologySpec(
        "t1",
        (
            HostSpec(
                "prefill-0",
                (
                    NicSpec("cnic", "compute", "198.18.0.1/24", LinkShape(400, True)),
                    NicSpec("snic", "storage", "198.18.1.1/24", LinkShape(50)),
                    NicSpec("mgmt", "mgmt", "198.18.2.1/24"),
                ),
            ),
            HostSpec("storage-0", (NicSpec("snic", "storage", "198.18.1.100/24"),)),
        ),
    )


def test_topology_names() -> None:
    plan = plan_topology(_spec())
    assert plan.namespaces == ("dp-t1-sw", "dp-t1-prefill-0", "dp-t1-storage-0")
    assert plan.bridges == (
        ("br-compute", "compute"),
        ("br-storage", "storage"),
        ("br-mgmt", "mgmt"),
    )
    pre, sto = plan.hosts
    assert [(n.nic.name, n.switch_ifname, n.bridge) for n in pre.nics] == [
        ("cnic", "h0n0", "br-compute"),
        ("snic", "h0n1", "br-storage"),
        ("mgmt", "h0n2", "br-mgmt"),
    ]
    assert [(n.switch_ifname, n.bridge, n.shaping) for n in sto.nics] == [
        ("h1n0", "br-storage", ())
    ]
    assert plan.host("storage-0") is sto
    with pytest.raises(KeyError):
        plan.host("nope")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LinkShape(0), r"rate_mbit: 0 is invalid \(must be > 0"),
        (lambda: LinkShape(-5.0), r"rate_mbit: -5.0 is invalid"),
        (lambda: LinkShape(math.nan), r"rate_mbit: nan is invalid"),
        (lambda: LinkShape(1e6), r"rate_mbit: .* <= 100000 Mbit/s"),
        (lambda: LinkShape(100, True, 0.0), r"kv_min_fraction: 0.0 is invalid \(must be > 0"),
        (lambda: LinkShape(100, True, 0.75), r"kv_min_fraction: 0.75 is invalid"),
        (lambda: NicSpec("CNIC", "compute", "198.18.0.1/24"), r"name: 'CNIC' is invalid"),
        (lambda: NicSpec("c-nic", "compute", "198.18.0.1/24"), r"name: 'c-nic' is invalid"),
        (
            lambda: NicSpec("computenic01", "compute", "198.18.0.1/24"),
            r"name: 'computenic01' is invalid \(at most 11 characters, so that "
            r"'ifb-computenic01' fits the kernel's 15-character interface names\)",
        ),
        (
            lambda: NicSpec("cnic", "computenetwork", "198.18.0.1/24"),
            r"network: 'computenetwork' is invalid \(at most 12 characters",
        ),
        (lambda: NicSpec("cnic", "compute", "198.18.0.1"), r"address: '198.18.0.1' is invalid"),
        (lambda: NicSpec("cnic", "compute", "198.18.0.300/24"), r"address: '198.18.0.300/24'"),
        (lambda: NicSpec("cnic", "compute", "198.18.0.0/24"), r"a host address"),
        (lambda: HostSpec("Prefill", (NicSpec("m", "mgmt", "198.18.2.1/24"),)), r"node_id"),
        (lambda: HostSpec("sw", (NicSpec("m", "mgmt", "198.18.2.1/24"),)), r"switch's namespace"),
        (lambda: HostSpec("p-0", ()), r"p-0.nics: \(\) is invalid"),
        (
            lambda: HostSpec(
                "p-0", (NicSpec("a", "mgmt", "198.18.2.1/24"), NicSpec("a", "x", "198.18.3.1/24"))
            ),
            r"NIC names must be unique",
        ),
        (lambda: TopologySpec("Lab", _spec().hosts), r"lab_id: 'Lab' is invalid"),
        (lambda: TopologySpec("toolongid", _spec().hosts), r"lab_id: 'toolongid'"),
        (lambda: TopologySpec("t1", ()), r"hosts: \(\) is invalid"),
        (
            lambda: TopologySpec("t1", (_spec().hosts[1], _spec().hosts[1])),
            r"node ids must be unique",
        ),
        (
            lambda: TopologySpec(
                "t1",
                (
                    HostSpec("a", (NicSpec("snic", "storage", "198.18.1.1/24"),)),
                    HostSpec("b", (NicSpec("snic", "storage", "198.18.1.1/24"),)),
                ),
            ),
            r"b.snic.address: '198.18.1.1/24' is invalid \(already used by a.snic\)",
        ),
        (
            lambda: TopologySpec(
                "t1",
                (
                    HostSpec("a", (NicSpec("snic", "storage", "198.18.1.1/24"),)),
                    HostSpec("b", (NicSpec("snic", "storage", "198.18.9.1/24"),)),
                ),
            ),
            r"network 'storage' is subnet 198.18.1.0/24",
        ),
        (
            lambda: TopologySpec(
                "t1",
                (
                    HostSpec("a", (NicSpec("snic", "storage", "198.18.1.1/24"),)),
                    HostSpec("b", (NicSpec("mgmt", "mgmt", "198.18.1.2/16"),)),
                ),
            ),
            r"networks must use disjoint subnets",
        ),
    ],
)
def test_validation_errors_name_the_field(build: object, message: str) -> None:
    assert callable(build)
    with pytest.raises(SpecError, match=message):
        build()

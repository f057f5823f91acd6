"""Golden plans of the pure netem planner, and spec validation messages."""

from __future__ import annotations

import math

import pytest

from netem.capabilities import KernelCaps
from netem.linkchange import RuleChange, TcChange, plan_change
from netem.nft import nft_rule, nft_setup
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
    LossRuleOp,
    MirredRedirect,
    NetemParams,
    QdiscOp,
    U32Key,
    burst_bytes,
    dscp_key,
    expected_classes,
    expected_qdiscs,
    format_handle,
    impaired_networks,
    loss_threshold,
    plan_nic,
    plan_topology,
    shape_nic,
    tc_handle,
)
from netem.spec import DirectionSpec, HostSpec, LinkShape, NicSpec, SpecError, TopologySpec


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


# --- per-direction specs, impairments and kernel capabilities -------------------------------
NETEM = KernelCaps.with_netem()
NO_NETEM = KernelCaps.without_netem()
NOTHING = KernelCaps(netem=False, nft_numgen=False)


def _impaired_snic() -> NicSpec:
    return NicSpec(
        "snic",
        "storage",
        "198.18.1.10/24",
        LinkShape(
            egress=DirectionSpec(
                100,
                delay_ms=10,
                jitter_ms=2,
                loss_pct=5,
                duplicate_pct=1,
                corrupt_pct=0.5,
                reorder_pct=25,
            ),
            ingress=DirectionSpec(50, loss_pct=1.5, queue_limit_packets=200),
        ),
    )


def test_simple_form_fills_both_directions() -> None:
    shape = LinkShape(100)
    assert shape.egress == shape.ingress == DirectionSpec(100)
    assert shape.direction("ingress").rate_bit == 100_000_000
    mixed = LinkShape(100, ingress=DirectionSpec(20, loss_pct=1))
    assert mixed.direction("egress") == DirectionSpec(100)
    assert mixed.direction("ingress").impairments() == ("loss",)


def _netem_tree(e_loss: float, i_loss: float) -> tuple[object, ...]:
    e_rate, i_rate = 100_000_000, 50_000_000
    return (
        LinkOp("ifb-snic", "ifb", 1000),
        QdiscOp("snic", "htb", TC_H_ROOT, ROOT_QDISC, default_class=0x1),
        htb_class("snic", "link", ROOT_QDISC, LINK_CLASS, e_rate, e_rate, 62_500, 62_500, 0),
        QdiscOp(
            "snic", "netem", LINK_CLASS, tc_handle(0x101, 0), limit_packets=1000 + 100,
            netem=NetemParams(10_000, 2_000, e_loss, 1, 0.5, 25),
        ),
        QdiscOp("ifb-snic", "htb", TC_H_ROOT, ROOT_QDISC, default_class=0x1),
        htb_class("ifb-snic", "link", ROOT_QDISC, LINK_CLASS, i_rate, i_rate, 31_250, 31_250, 0),
        QdiscOp(
            "ifb-snic", "netem", LINK_CLASS, tc_handle(0x101, 0), limit_packets=200,
            netem=NetemParams(loss_pct=i_loss),
        ),
        QdiscOp("snic", "ingress", TC_H_INGRESS, INGRESS_QDISC),
        FilterOp("snic", INGRESS_QDISC, 1, ETH_P_ALL, (MATCH_ALL,), 0, MirredRedirect("ifb-snic")),
    )  # fmt: skip


LOSS_RULES = (
    LossRuleOp("h0n1", "iifname", 50_000, "prefill-0/snic/egress"),
    LossRuleOp("h0n1", "oifname", 15_000, "prefill-0/snic/ingress"),
)


def test_impaired_nic_with_netem_golden() -> None:
    """netem sits under the HTB leaf, so it acts on the shaped stream; its limit covers the
    queue plus the frames in the delay line (100 Mbit/s x 12 ms / 1514 B = 100). Loss is the
    lab switch's nftables rule (lost on the wire, after the shaper), the same as without
    netem; the ingress netem only holds the queue limit."""
    shaped = shape_nic(_impaired_snic(), NETEM, node_id="prefill-0", switch_port="h0n1")
    assert shaped.ops == _netem_tree(0, 0)
    assert shaped.loss_rules == LOSS_RULES
    assert shaped.unemulated == ()


def test_loss_goes_to_netem_without_nftables_or_a_lab_switch() -> None:
    netem_only = KernelCaps(netem=True, nft_numgen=False)
    shaped = shape_nic(_impaired_snic(), netem_only, node_id="prefill-0", switch_port="h0n1")
    assert shaped.ops == _netem_tree(5, 1.5)
    assert shaped.loss_rules == shaped.unemulated == ()
    # apply_shaping on an existing interface has no lab switch to drop on.
    assert plan_nic(_impaired_snic(), NETEM) == _netem_tree(5, 1.5)


def test_impaired_nic_without_netem_golden() -> None:
    """No netem: loss becomes nftables rules on the switch port, the queue limit a pfifo, and
    delay/jitter/duplicate/corrupt/reorder are reported, not silently dropped."""
    e_rate, i_rate = 100_000_000, 50_000_000
    shaped = shape_nic(_impaired_snic(), NO_NETEM, node_id="prefill-0", switch_port="h0n1")
    assert shaped.ops == (
        LinkOp("ifb-snic", "ifb", 1000),
        QdiscOp("snic", "htb", TC_H_ROOT, ROOT_QDISC, default_class=0x1),
        htb_class("snic", "link", ROOT_QDISC, LINK_CLASS, e_rate, e_rate, 62_500, 62_500, 0),
        QdiscOp("ifb-snic", "htb", TC_H_ROOT, ROOT_QDISC, default_class=0x1),
        htb_class("ifb-snic", "link", ROOT_QDISC, LINK_CLASS, i_rate, i_rate, 31_250, 31_250, 0),
        QdiscOp("ifb-snic", "pfifo", LINK_CLASS, tc_handle(0x101, 0), limit_packets=200),
        QdiscOp("snic", "ingress", TC_H_INGRESS, INGRESS_QDISC),
        FilterOp("snic", INGRESS_QDISC, 1, ETH_P_ALL, (MATCH_ALL,), 0, MirredRedirect("ifb-snic")),
    )
    assert shaped.loss_rules == LOSS_RULES
    assert [str(u) for u in shaped.unemulated] == [
        "prefill-0.snic egress delay: no sch_netem",
        "prefill-0.snic egress jitter: no sch_netem",
        "prefill-0.snic egress duplicate: no sch_netem",
        "prefill-0.snic egress corrupt: no sch_netem",
        "prefill-0.snic egress reorder: no sch_netem",
    ]


def test_loss_without_netem_or_nftables_is_unemulated() -> None:
    nic = NicSpec(
        "snic", "storage", "198.18.1.10/24", LinkShape(10, egress=DirectionSpec(10, loss_pct=2))
    )
    assert [u.feature for u in shape_nic(nic, NOTHING, switch_port="h0n0").unemulated] == ["loss"]
    # No lab switch (apply_shaping on an existing interface): nowhere faithful to drop.
    outside = shape_nic(nic, NO_NETEM)
    assert outside.loss_rules == ()
    assert "no lab switch" in outside.unemulated[0].reason


def test_priority_classes_get_one_netem_per_leaf_and_the_ceil() -> None:
    nic = NicSpec(
        "cnic",
        "compute",
        "198.18.0.10/24",
        LinkShape(
            priority_classes=True,
            egress=DirectionSpec(100, ceil_mbit=80, delay_ms=1),
            ingress=DirectionSpec(100),
        ),
    )
    ops = plan_nic(nic, NETEM)
    leaves = [op for op in ops if isinstance(op, QdiscOp) and op.is_leaf]
    assert [(op.dev, format_handle(op.parent), format_handle(op.handle)) for op in leaves] == [
        ("cnic", "1:10", "110:0"),
        ("cnic", "1:20", "120:0"),
        ("cnic", "1:30", "130:0"),
    ]
    classes = [op for op in ops if isinstance(op, ClassOp) and op.dev == "cnic"]
    assert [op.ceil_bit for op in classes] == [100_000_000] + [80_000_000] * 3
    # The leaves come after their classes and before the filters that feed them.
    kinds = [type(op).__name__ for op in ops if getattr(op, "dev", "") == "cnic"]
    assert kinds.index("FilterOp") > max(i for i, k in enumerate(kinds) if k == "QdiscOp" and i < 8)


def test_plans_without_impairments_do_not_depend_on_the_kernel() -> None:
    spec = _spec()
    assert plan_topology(spec, NETEM) == plan_topology(spec, NO_NETEM) == plan_topology(spec)


def test_topology_collects_loss_rules_and_unemulated() -> None:
    host = HostSpec(
        "decode-0",
        (
            NicSpec(
                "snic",
                "storage",
                "198.18.1.2/24",
                LinkShape(
                    egress=DirectionSpec(50, loss_pct=1, delay_ms=5), ingress=DirectionSpec(50)
                ),
            ),
        ),
    )
    plan = plan_topology(TopologySpec("t1", (*_spec().hosts, host)), NO_NETEM)
    assert plan.loss_rules == (LossRuleOp("h2n0", "iifname", 10_000, "decode-0/snic/egress"),)
    assert [str(u) for u in plan.unemulated] == ["decode-0.snic egress delay: no sch_netem"]


def test_plan_change_is_in_place() -> None:
    old_nic = NicSpec("snic", "storage", "198.18.1.10/24", LinkShape(100, True))
    new_nic = NicSpec(
        "snic",
        "storage",
        "198.18.1.10/24",
        LinkShape(
            priority_classes=True, egress=DirectionSpec(50, loss_pct=2), ingress=DirectionSpec(100)
        ),
    )
    old = shape_nic(old_nic, NO_NETEM, node_id="p", switch_port="h0n0")
    new = shape_nic(new_nic, NO_NETEM, node_id="p", switch_port="h0n0")
    changes = plan_change(old, new)
    assert [
        (c.verb, c.op.dev, format_handle(c.op.classid))
        for c in changes
        if isinstance(c, TcChange) and isinstance(c.op, ClassOp)
    ] == [
        ("change", "snic", "1:1"),
        ("change", "snic", "1:10"),
        ("change", "snic", "1:20"),
        ("change", "snic", "1:30"),
    ]
    assert changes[-1] == RuleChange("add", LossRuleOp("h0n0", "iifname", 20_000, "p/snic/egress"))
    assert plan_change(new, new) == ()
    back = plan_change(new, old)
    assert back[-1] == RuleChange("delete", new.loss_rules[0])
    # With netem, an impairment grafts a netem leaf under the existing class, and removing
    # every impairment deletes it again (the class gets the kernel's pfifo back).
    graft = plan_change(shape_nic(old_nic, NETEM), shape_nic(new_nic, NETEM))
    assert [
        (c.verb, format_handle(c.op.handle))
        for c in graft
        if isinstance(c, TcChange) and isinstance(c.op, QdiscOp)
    ] == [
        ("replace", "110:0"),
        ("replace", "120:0"),
        ("replace", "130:0"),
    ]
    undo = plan_change(shape_nic(new_nic, NETEM), shape_nic(old_nic, NETEM))
    assert {c.verb for c in undo if isinstance(c, TcChange)} == {
        "change",
        "delete",
    }
    with pytest.raises(ValueError, match="in place"):
        plan_change(
            old, shape_nic(NicSpec("snic", "storage", "198.18.1.10/24", LinkShape(100)), NO_NETEM)
        )


def test_expected_tree_lists_every_planned_qdisc_and_class() -> None:
    ops = plan_nic(_impaired_snic(), NETEM)
    assert expected_qdiscs(ops) == {
        "snic": {
            ("htb", TC_H_ROOT, ROOT_QDISC),
            ("netem", LINK_CLASS, tc_handle(0x101, 0)),
            ("ingress", TC_H_INGRESS, INGRESS_QDISC),
        },
        "ifb-snic": {("htb", TC_H_ROOT, ROOT_QDISC), ("netem", LINK_CLASS, tc_handle(0x101, 0))},
    }
    assert expected_classes(ops) == {"snic": {LINK_CLASS}, "ifb-snic": {LINK_CLASS}}


def test_nft_rule_document() -> None:
    rule = LossRuleOp("h0n1", "oifname", 15_000, "prefill-0/snic/ingress")
    assert nft_rule(rule, handle=7) == {
        "rule": {
            "family": "bridge",
            "table": "dualpath",
            "chain": "forward",
            "comment": "prefill-0/snic/ingress",
            "handle": 7,
            "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "h0n1"}},
                {
                    "match": {
                        "op": "<",
                        "left": {"numgen": {"mode": "random", "mod": 1_000_000, "offset": 0}},
                        "right": 15_000,
                    }
                },
                {"counter": None},
                {"drop": None},
            ],
        }
    }
    assert [next(iter(c)) for c in nft_setup()] == ["create", "create"]
    assert loss_threshold(5) == 50_000 and loss_threshold(100) == 1_000_000


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: DirectionSpec(10, loss_pct=101),
            r"loss_pct: 101 is invalid \(must be >= 0 and <= 100 %\)",
        ),
        (lambda: DirectionSpec(10, loss_pct=-1), r"loss_pct: -1 is invalid"),
        (lambda: DirectionSpec(10, duplicate_pct=math.inf), r"duplicate_pct: inf is invalid"),
        (
            lambda: DirectionSpec(10, delay_ms=-1),
            r"delay_ms: -1 is invalid \(must be >= 0 and <= 60000 ms\)",
        ),
        (lambda: DirectionSpec(10, jitter_ms=1), r"jitter_ms: 1 is invalid \(needs delay_ms > 0"),
        (
            lambda: DirectionSpec(10, reorder_pct=5),
            r"reorder_pct: 5 is invalid \(needs delay_ms > 0",
        ),
        (
            lambda: DirectionSpec(10, ceil_mbit=20),
            r"ceil_mbit: 20 is invalid \(must be <= rate_mbit \(10\)",
        ),
        (
            lambda: DirectionSpec(10, burst_bytes=100),
            r"burst_bytes: 100 is invalid \(must be >= 3028",
        ),
        (
            lambda: DirectionSpec(10, burst_bytes=5000.0),  # type: ignore[arg-type]
            r"burst_bytes: 5000.0 is invalid \(an integer",
        ),
        (lambda: DirectionSpec(10, queue_limit_packets=0), r"queue_limit_packets: 0 is invalid"),
        (lambda: DirectionSpec(0), r"rate_mbit: 0 is invalid"),
        (lambda: DirectionSpec("10"), r"rate_mbit: '10' is invalid \(a number of Mbit/s\)"),  # type: ignore[arg-type]
        (lambda: LinkShape(), r"egress: None is invalid \(a DirectionSpec, or rate_mbit"),
        (lambda: LinkShape(egress=DirectionSpec(10)), r"ingress: None is invalid"),
        (
            lambda: LinkShape(10, egress=DirectionSpec(10, ceil_mbit=5)),
            r"egress.ceil_mbit: 5 is invalid \(must equal rate_mbit without priority_classes",
        ),
        (lambda: LinkShape(10, ingress=10), r"ingress: 10 is invalid \(a DirectionSpec or None\)"),  # type: ignore[arg-type]
        (lambda: LinkShape(10).direction("both"), r"direction: 'both' is invalid"),
    ],
)
def test_direction_validation_names_the_field_and_range(build: object, message: str) -> None:
    assert callable(build)
    with pytest.raises(SpecError, match=message):
        build()


def test_networks_with_per_packet_impairments_send_one_frame_per_skb() -> None:
    lossy = HostSpec(
        "decode-0",
        (
            NicSpec(
                "snic",
                "storage",
                "198.18.1.2/24",
                LinkShape(50, ingress=DirectionSpec(50, loss_pct=0.1)),
            ),
            NicSpec(
                "cnic",
                "compute",
                "198.18.0.2/24",
                LinkShape(50, egress=DirectionSpec(50, delay_ms=1)),
            ),
        ),
    )
    spec = TopologySpec("t1", (*_spec().hosts, lossy))
    assert impaired_networks(spec) == {"storage"}  # delay alone keeps offloads on
    plan = plan_topology(spec, NETEM)
    offloads = {(h.node_id, n.nic.name): n.offloads_off for h in plan.hosts for n in h.nics}
    assert offloads == {
        ("prefill-0", "cnic"): False,
        ("prefill-0", "snic"): True,
        ("prefill-0", "mgmt"): False,
        ("storage-0", "snic"): True,
        ("decode-0", "snic"): True,
        ("decode-0", "cnic"): False,
    }


def test_switching_corrupt_off_swaps_only_the_leaf_qdisc() -> None:
    def nic(corrupt: float) -> NicSpec:
        egress = DirectionSpec(10, delay_ms=5, corrupt_pct=corrupt)
        return NicSpec("snic", "storage", "198.18.1.10/24", LinkShape(10, egress=egress))

    on, off = shape_nic(nic(1), NETEM), shape_nic(nic(0), NETEM)
    changes = plan_change(on, off)
    assert [
        (c.verb, c.op.kind)
        for c in changes
        if isinstance(c, TcChange) and isinstance(c.op, QdiscOp)
    ] == [
        ("delete", "netem"),
        ("replace", "netem"),
    ]
    assert [c.verb for c in plan_change(off, on) if isinstance(c, TcChange)] == ["change"]

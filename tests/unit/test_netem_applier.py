"""What the applier hands pyroute2 for a netem leaf, checked against pyroute2's own encoder
(so the netem path is verified on kernels without sch_netem too)."""

from __future__ import annotations

from pyroute2.netlink.rtnl.tcmsg import sched_netem
from pyroute2.netlink.rtnl.tcmsg.common import percent2u32, time2tick

from netem.plan import LINK_CLASS, NetemParams, QdiscOp, tc_handle
from netem.tc import netem_arguments


def test_netem_leaf_arguments_encode_as_tc_would() -> None:
    op = QdiscOp(
        "snic", "netem", LINK_CLASS, tc_handle(0x101, 0), limit_packets=1100,
        netem=NetemParams(10_000, 2_000, 5, 1, 0.5, 25),
    )  # fmt: skip
    encoded = sched_netem.get_parameters(netem_arguments(op))
    assert encoded["delay"] == time2tick(10_000)
    assert encoded["jitter"] == time2tick(2_000)
    assert encoded["limit"] == 1100
    assert encoded["loss"] == percent2u32(5)
    assert encoded["duplicate"] == percent2u32(1)
    assert encoded["gap"] == 1, "reordering needs gap 1, as `tc ... reorder` sets it"
    attrs = dict(encoded["attrs"])
    assert attrs["TCA_NETEM_REORDER"]["prob_reorder"] == percent2u32(25)
    assert attrs["TCA_NETEM_CORRUPT"]["prob_corrupt"] == percent2u32(0.5)


def test_a_change_back_to_zero_switches_the_feature_off() -> None:
    op = QdiscOp("snic", "netem", LINK_CLASS, tc_handle(0x101, 0), limit_packets=1000,
                 netem=NetemParams())  # fmt: skip
    encoded = sched_netem.get_parameters(netem_arguments(op))
    assert (encoded["delay"], encoded["loss"], encoded["duplicate"], encoded["attrs"]) == (
        0, 0, 0, [],
    )  # fmt: skip

"""apply_shaping: the same plan applied to an existing interface (the compose backend's path),
failing closed on an interface that already has qdiscs of its own."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from netem_helpers import ROOT_REASON, engine_host, run, storage_host, tc_show

from netem.errors import NetemError
from netem.netns import NetnsLab, apply_shaping
from netem.plan import plan_nic
from netem.spec import LinkShape, NicSpec, TopologySpec

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
]


def test_shapes_an_existing_interface_once_and_then_fails_closed(
    make_lab: Callable[[TopologySpec], NetnsLab], lab_id: str
) -> None:
    lab = make_lab(
        TopologySpec(
            lab_id,
            (engine_host("prefill-0", 0, cnic_mbit=None, snic_mbit=None), storage_host("s-0", 0)),
        )
    )
    lab.up()
    ns = lab.namespace("s-0")
    nic = NicSpec("snic", "storage", "198.18.1.200/24", LinkShape(20, priority_classes=True))
    assert apply_shaping(nic, netns=ns) == plan_nic(nic)
    shaped = {dev: tc_show(ns, "class", dev) for dev in ("snic", "ifb-snic")}
    assert "class htb 1:10 parent 1:1 prio 0 rate 18Mbit ceil 20Mbit" in shaped["ifb-snic"]
    with pytest.raises(NetemError, match="ip link add ifb-snic") as info:
        apply_shaping(nic, netns=ns)
    assert info.value.errno == 17
    assert {dev: tc_show(ns, "class", dev) for dev in ("snic", "ifb-snic")} == shaped

    # An interface that already has a root qdisc of its own: refused, and nothing is left.
    other = lab.namespace("prefill-0")
    run(["tc", "-n", other, "qdisc", "add", "dev", "snic", "root", "handle", "7:", "htb"])
    before = tc_show(other, "qdisc", "snic")
    with pytest.raises(NetemError, match="tc qdisc add dev snic root handle 1:0 htb"):
        apply_shaping(NicSpec("snic", "storage", "198.18.1.10/24", LinkShape(20)), netns=other)
    assert tc_show(other, "qdisc", "snic") == before
    assert "ifb-snic" not in run(["ip", "-n", other, "-br", "link"])
    assert apply_shaping(NicSpec("mgmt", "mgmt", "198.18.2.10/24"), netns=other) == ()

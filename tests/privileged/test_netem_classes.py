"""cnic priority classes: the HTB trees exist on both directions, and DSCP marks choose the
class (46 -> collective, 24 -> control, 8 and unmarked -> kv) on egress and on ingress."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest
from netem_helpers import ROOT_REASON, engine_host, run, send_marked

from netem.netns import NetnsLab
from netem.spec import TopologySpec

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
]

MakeLab = Callable[[TopologySpec], NetnsLab]
NBYTES = 1_000_000


@pytest.fixture
def lab(make_lab: MakeLab, lab_id: str) -> NetnsLab:
    spec = TopologySpec(
        lab_id,
        (
            engine_host("prefill-0", 0, cnic_mbit=200, snic_mbit=50),
            engine_host("decode-0", 1, cnic_mbit=200, snic_mbit=50),
        ),
    )
    lab = make_lab(spec)
    lab.up()
    return lab


def test_class_trees_exist_on_both_directions(lab: NetnsLab) -> None:
    ns = lab.namespace("prefill-0")
    for dev in ("cnic", "ifb-cnic"):
        classes = run(["tc", "-n", ns, "class", "show", "dev", dev])
        found = {
            m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r"class htb (1:\w+) parent 1:1 prio (\d) rate (\S+)", classes)
        }
        assert found == {
            "1:10": ("0", "180Mbit"),
            "1:20": ("1", "10Mbit"),
            "1:30": ("2", "10Mbit"),
        }, classes
        assert "class htb 1:1 root rate 200Mbit ceil 200Mbit" in classes
        qdiscs = run(["tc", "-n", ns, "qdisc", "show", "dev", dev])
        assert "qdisc htb 1: root" in qdiscs and "default 0x30" in qdiscs
    filters = run(["tc", "-n", ns, "filter", "show", "dev", "cnic", "ingress"])
    assert "mirred (Egress Redirect to device ifb-cnic)" in filters


@pytest.mark.parametrize(
    ("dscp", "klass"), [(46, "collective"), (24, "control"), (8, "kv"), (0, "kv")]
)
def test_dscp_chooses_the_class_both_ways(lab: NetnsLab, dscp: int, klass: str) -> None:
    before = lab.counters()
    got = send_marked(
        lab,
        sender="prefill-0",
        receiver="decode-0",
        nic="cnic",
        dscp=dscp,
        nbytes=NBYTES,
        port=7100,
    )
    assert got == NBYTES
    after = lab.counters()
    others = {"collective", "control", "kv"} - {klass}

    def grew(node: str, side: str, name: str) -> int:
        nic_before, nic_after = before[node]["cnic"], after[node]["cnic"]
        old = getattr(nic_before, f"{side}_classes")[name].bytes
        return int(getattr(nic_after, f"{side}_classes")[name].bytes - old)

    for node, side in (("prefill-0", "egress"), ("decode-0", "ingress")):
        # every data byte, plus its headers, went through the marked class ...
        assert grew(node, side, klass) >= NBYTES, (node, side)
        # ... and nothing of it through the others (they see a few ARP frames at most).
        for name in others:
            assert grew(node, side, name) < NBYTES // 100, (node, side, name)
    # The root counts what the leaves count: the NIC totals grew by at least the payload.
    assert after["prefill-0"]["cnic"].egress_bytes - before["prefill-0"]["cnic"].egress_bytes >= (
        NBYTES
    )
    assert after["decode-0"]["cnic"].ingress_bytes - before["decode-0"]["cnic"].ingress_bytes >= (
        NBYTES
    )

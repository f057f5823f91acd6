"""Faithful, inspectable links: random loss as configured, in-place changes with set_link,
fail-closed ownership checks, the unemulated-feature gate, and cleanup of everything a lab
made (qdiscs, nftables rules) — with and without sch_netem (netem cases skip without it)."""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from netem_helpers import (
    ROOT_REASON,
    address,
    host_snapshot,
    netns_names,
    nft_counters,
    run,
    send_marked,
    storage_host,
    tc_show,
    udp_flood,
    udp_receive_errors,
    wait_listening,
)

from netem.capabilities import KernelCaps
from netem.doctor import PROBE_PREFIX, probe
from netem.errors import NetemError
from netem.lifecycle import down_from_state, recorded_labs
from netem.linkchange import RuleChange, TcChange
from netem.netns import NetnsLab, apply_shaping
from netem.spec import DirectionSpec, HostSpec, LinkShape, NicSpec, SpecError, TopologySpec

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
]

MakeLab = Callable[..., NetnsLab]

LOSS_PCT = 5.0
LOSS_TOLERANCE_PCT = 1.5
NUM_PACKETS = 20_000


@functools.cache
def host_caps() -> KernelCaps:
    return probe().caps


@pytest.fixture
def make(lab_id: str, state_dir: Path) -> MakeLab:
    labs: list[NetnsLab] = []

    def build(spec: TopologySpec, **kwargs: object) -> NetnsLab:
        lab = NetnsLab(spec, state_dir=state_dir, **kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        return lab

    yield build  # type: ignore[misc]
    for lab in labs:
        lab.down()
    down_from_state(lab_id, state_dir=state_dir)


def snic_host(node_id: str, index: int, shape: LinkShape | None) -> HostSpec:
    return HostSpec(node_id, (NicSpec("snic", "storage", f"198.18.1.{10 + index}/24", shape),))


def loss_spec(lab_id: str, direction: str) -> TopologySpec:
    """prefill-0 loses LOSS_PCT in `direction`; both ends' egress (20 Mbit/s) is slower than
    both ingresses (50 Mbit/s), so no queue anywhere overflows: loss is only the rule's."""
    lossy = LOSS_PCT if direction == "egress" else 0.0
    return TopologySpec(
        lab_id,
        (
            snic_host(
                "prefill-0",
                0,
                LinkShape(
                    egress=DirectionSpec(20, loss_pct=lossy),
                    ingress=DirectionSpec(50, loss_pct=LOSS_PCT - lossy),
                ),
            ),
            snic_host(
                "storage-0", 1, LinkShape(egress=DirectionSpec(20), ingress=DirectionSpec(50))
            ),
        ),
    )


@pytest.mark.parametrize("direction", ["egress", "ingress"])
@pytest.mark.parametrize("mechanism", ["nftables", "netem"])
def test_random_loss_matches_the_spec(
    make: MakeLab, lab_id: str, mechanism: str, direction: str
) -> None:
    if mechanism == "netem":
        if not host_caps().netem:
            pytest.skip("this kernel has no sch_netem (see `dualpath doctor`)")
        caps = KernelCaps(netem=True, nft_numgen=False)  # loss in netem, not on the switch
    else:
        if not host_caps().nft_numgen:
            pytest.skip("nftables with bridge numgen is not available here")
        caps = KernelCaps.without_netem()
    lab = make(loss_spec(lab_id, direction), caps=caps)
    lab.up()
    sender, receiver = (
        ("prefill-0", "storage-0") if direction == "egress" else ("storage-0", "prefill-0")
    )
    # Resolve ARP both ways first (TCP retries through the loss): a lost ARP request would
    # otherwise park the flood in the neighbour queue, which drops all but ~100 packets.
    assert (
        send_marked(
            lab, sender=sender, receiver=receiver, nic="snic", dscp=0, nbytes=10_000, port=7101
        )
        == 10_000
    )
    rules_before = nft_counters(lab)
    before = lab.counters()
    received = udp_flood(lab, sender=sender, receiver=receiver, nic="snic", count=NUM_PACKETS)
    lost = NUM_PACKETS - received
    fraction = 100 * lost / NUM_PACKETS
    print(f"{mechanism} {direction}: lost {lost} of {NUM_PACKETS} = {fraction:.2f} %")
    assert abs(fraction - LOSS_PCT) <= LOSS_TOLERANCE_PCT
    # Every lost packet is accounted for by the loss mechanism, none by a full queue.
    assert udp_receive_errors(lab, receiver) == 0
    after = lab.counters()

    def drops(node: str, which: str) -> int:
        key = f"{which}_drops"
        return int(getattr(after[node]["snic"], key) - getattr(before[node]["snic"], key))

    rule = f"prefill-0/snic/{direction}"
    if mechanism == "nftables":
        assert set(nft_counters(lab)) == {rule}
        assert nft_counters(lab)[rule] - rules_before.get(rule, 0) == lost
        assert drops("prefill-0", "egress") == drops("prefill-0", "ingress") == 0
    else:
        assert drops("prefill-0", direction) == lost
    assert drops("storage-0", "egress") == drops("storage-0", "ingress") == 0


def test_tcp_loses_single_frames_not_tso_bursts(make: MakeLab, lab_id: str) -> None:
    """A network with loss sends one frame per skb (TSO/GSO off), so each drop is one frame
    and TCP sees ordinary losses it recovers from."""
    if not host_caps().nft_numgen:
        pytest.skip("nftables with bridge numgen is not available here")
    lab = make(loss_spec(lab_id, "egress"), caps=KernelCaps.without_netem())
    lab.up()
    nbytes = 4_000_000
    got = send_marked(
        lab, sender="prefill-0", receiver="storage-0", nic="snic", dscp=0, nbytes=nbytes, port=7400
    )
    assert got == nbytes
    out = run(
        ["ip", "netns", "exec", lab.switch_namespace, "nft", "-j", "list", "table", "bridge",
         "dualpath"]
    )  # fmt: skip
    rule = next(i["rule"] for i in json.loads(out)["nftables"] if "rule" in i)
    counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
    frames = nbytes / 1448
    print(f"TCP: {counter['packets']} drops of {counter['bytes']} bytes, ~{frames:.0f} frames")
    assert counter["packets"] > 0.02 * frames, "about 5 % of the data frames are lost"
    assert counter["bytes"] <= counter["packets"] * 1500, "every drop is a single frame"


_TIMED_SENDER = """
import socket, sys, time
s = socket.socket()
s.connect((sys.argv[1], int(sys.argv[2])))
end = time.monotonic() + float(sys.argv[3])
chunk = bytes(65536)
total = 0
while time.monotonic() < end:
    total += s.send(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(total, flush=True)
"""

_RECEIVER = """
import socket, sys
srv = socket.socket()
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
conn, _ = srv.accept()
total = 0
while True:
    data = conn.recv(1 << 20)
    if not data:
        break
    total += len(data)
conn.close()
print(total, flush=True)
"""

SAMPLE_S = 0.1
BEFORE_MBIT, AFTER_MBIT = 40.0, 10.0


def test_rate_change_in_place_shows_within_a_second_without_a_gap(
    make: MakeLab, lab_id: str
) -> None:
    lab = make(
        TopologySpec(
            lab_id,
            (snic_host("prefill-0", 0, LinkShape(BEFORE_MBIT)), storage_host("storage-0", 0)),
        )
    )
    lab.up()
    ns = lab.namespace("prefill-0")
    tree = (tc_show(ns, "qdisc", "snic"), tc_show(ns, "qdisc", "ifb-snic"))
    dst, port = address(lab, "storage-0", "snic"), 7200
    rx = subprocess.Popen(
        lab.exec_argv("storage-0", [sys.executable, "-c", _RECEIVER, dst, str(port)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_listening(lab, "storage-0", dst, port)
    tx = subprocess.Popen(
        lab.exec_argv("prefill-0", [sys.executable, "-c", _TIMED_SENDER, dst, str(port), "4.5"]),
        stdout=subprocess.PIPE,
        text=True,
    )
    samples: list[tuple[float, int]] = []
    changed_at = 0.0
    try:
        start = time.monotonic()
        while tx.poll() is None and time.monotonic() - start < 4.3:
            now = time.monotonic()
            samples.append((now, lab.counters()["prefill-0"]["snic"].egress_bytes))
            if not changed_at and now - start >= 2.0:
                changed_at = time.monotonic()
                changes = lab.set_link(
                    "prefill-0", "snic", direction="egress", rate_mbit=AFTER_MBIT
                )
            time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - now)))
        sent = int(tx.communicate(timeout=30)[0])
        received = int(rx.communicate(timeout=30)[0])
    finally:
        for proc in (tx, rx):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert received == sent, "the flow survived the change intact"
    assert [type(c) for c in changes] == [TcChange]
    assert changes[0].verb == "change"
    # In place: same qdiscs (handles and kinds), the class rate is the new one, and the
    # cumulative counters never went back (a rebuilt tree would start again from zero).
    assert (tc_show(ns, "qdisc", "snic"), tc_show(ns, "qdisc", "ifb-snic")) == tree
    assert "rate 10Mbit ceil 10Mbit" in tc_show(ns, "class", "snic")
    assert "rate 40Mbit ceil 40Mbit" in tc_show(ns, "class", "ifb-snic")
    assert all(b1 >= b0 for (_, b0), (_, b1) in itertools.pairwise(samples))
    rates = [
        (t1, (b1 - b0) * 8 / (t1 - t0) / 1e6) for (t0, b0), (t1, b1) in itertools.pairwise(samples)
    ]
    steady = [(t, r) for t, r in rates if t - samples[0][0] > 0.3]
    assert all(r > 0 for _, r in steady), f"a sampling interval without traffic: {rates}"
    before = [r for t, r in steady if t < changed_at]
    assert abs(sum(before) / len(before) / BEFORE_MBIT - 1) < 0.1
    after = [(t, r) for t, r in rates if t - SAMPLE_S >= changed_at]
    first = next(t for t, r in after if r <= AFTER_MBIT * 1.15)
    latency = first - changed_at
    print(f"rate {BEFORE_MBIT:g} -> {AFTER_MBIT:g} Mbit/s visible after {latency * 1000:.0f} ms")
    assert latency <= 1.0
    assert all(r <= AFTER_MBIT * 1.15 for t, r in after if t >= first)


def test_set_link_validates_and_fails_closed_on_a_foreign_qdisc(make: MakeLab, lab_id: str) -> None:
    shape = LinkShape(priority_classes=True, egress=DirectionSpec(50), ingress=DirectionSpec(30))
    lab = make(
        TopologySpec(lab_id, (snic_host("prefill-0", 0, shape), storage_host("storage-0", 0))),
        caps=KernelCaps.without_netem(),
    )
    lab.up()
    ns = lab.namespace("prefill-0")

    def trees() -> tuple[str, ...]:
        devs = ("snic", "ifb-snic")
        return tuple(tc_show(ns, what, dev) for what in ("qdisc", "class") for dev in devs)

    before = trees()
    with pytest.raises(SpecError, match=r"prefill-0\.snic\.egress\.loss_pct: 150 is invalid"):
        lab.set_link("prefill-0", "snic", direction="egress", loss_pct=150)
    with pytest.raises(SpecError, match=r"rate_mbit: -1 is invalid"):
        lab.set_link("prefill-0", "snic", rate_mbit=-1)
    with pytest.raises(NetemError, match=r"prefill-0\.snic egress delay: no sch_netem"):
        lab.set_link("prefill-0", "snic", delay_ms=5)
    assert trees() == before and nft_counters(lab) == {}

    # A qdisc someone else grafted under one of the lab's classes: set_link refuses to touch
    # the NIC, and leaves that qdisc (and everything else) as it was.
    run(["tc", "-n", ns, "qdisc", "add", "dev", "ifb-snic", "parent", "1:30", "handle", "55:",
         "pfifo", "limit", "7"])  # fmt: skip
    foreign = trees()
    with pytest.raises(NetemError, match=r"ifb-snic .* is not the lab's \(not planned: pfifo 55:0"):
        lab.set_link("prefill-0", "snic", rate_mbit=10, loss_pct=1)
    assert trees() == foreign
    assert nft_counters(lab) == {}, "no loss rule was added either"
    run(["tc", "-n", ns, "qdisc", "del", "dev", "ifb-snic", "parent", "1:30", "handle", "55:"])

    # The tree is the lab's again: the same change now goes through, in place.
    changes = lab.set_link("prefill-0", "snic", rate_mbit=10, loss_pct=1)
    assert {type(c) for c in changes} == {TcChange, RuleChange}
    assert "class htb 1:30 parent 1:1 prio 2 rate 500Kbit ceil 10Mbit" in tc_show(
        ns, "class", "snic"
    )
    assert set(nft_counters(lab)) == {"prefill-0/snic/egress", "prefill-0/snic/ingress"}
    assert lab.counters()["prefill-0"]["snic"].direction_rate_mbit("ingress") == 10

    # Link down and up again, in place.
    lab.set_link("prefill-0", "snic", up=False)
    assert "state DOWN" in run(lab.exec_argv("prefill-0", ["ip", "link", "show", "snic"]))
    lab.set_link("prefill-0", "snic", up=True, loss_pct=0)
    assert nft_counters(lab) == {}
    lab.set_link("prefill-0", "snic", direction="ingress", loss_pct=2)  # the table is reused
    assert set(nft_counters(lab)) == {"prefill-0/snic/ingress"}
    lab.set_link("prefill-0", "snic", direction="ingress", loss_pct=0)
    got = send_marked(
        lab, sender="prefill-0", receiver="storage-0", nic="snic", dscp=0, nbytes=50_000, port=7300
    )
    assert got == 50_000


def test_up_and_apply_shaping_fail_closed_on_what_they_cannot_do(
    make: MakeLab, lab_id: str, state_dir: Path
) -> None:
    impaired = LinkShape(
        egress=DirectionSpec(20, delay_ms=10, loss_pct=1), ingress=DirectionSpec(20)
    )
    spec = TopologySpec(lab_id, (snic_host("prefill-0", 0, impaired), storage_host("storage-0", 0)))
    lab = make(spec, caps=KernelCaps.without_netem())
    with pytest.raises(NetemError, match=r"prefill-0\.snic egress delay: no sch_netem") as info:
        lab.up()
    assert "--allow-unemulated" in str(info.value)
    assert not {n for n in netns_names() if n.startswith(f"dp-{lab_id}-")}
    assert recorded_labs(state_dir) == []

    allowed = make(spec, caps=KernelCaps.without_netem(), allow_unemulated=True)
    allowed.up()
    assert [str(u) for u in allowed.unemulated] == ["prefill-0.snic egress delay: no sch_netem"]
    assert set(nft_counters(allowed)) == {"prefill-0/snic/egress"}

    # apply_shaping on an interface with a foreign ingress qdisc: refused, left as it was.
    ns = allowed.namespace("storage-0")
    run(["tc", "-n", ns, "qdisc", "add", "dev", "snic", "ingress"])
    before = tc_show(ns, "qdisc", "snic")
    nic = NicSpec("snic", "storage", "198.18.1.200/24", LinkShape(20))
    with pytest.raises(
        NetemError, match=r"already has a qdisc this lab did not plan \(ingress ffff:0"
    ):
        apply_shaping(nic, netns=ns)
    assert tc_show(ns, "qdisc", "snic") == before
    assert "ifb-snic" not in run(["ip", "-n", ns, "-br", "link"])


def test_cleanup_leaves_the_host_as_it_was(make: MakeLab, lab_id: str, state_dir: Path) -> None:
    before = host_snapshot()
    lab = make(loss_spec(lab_id, "egress"), caps=KernelCaps.without_netem())
    lab.up()
    lab.set_link("storage-0", "snic", direction="ingress", rate_mbit=30, loss_pct=2)
    during = host_snapshot()
    assert set(nft_counters(lab)) == {"prefill-0/snic/egress", "storage-0/snic/ingress"}
    record = (state_dir / f"{lab_id}.json").read_text()
    assert "storage-0/snic/ingress" in record and "tc class add dev ifb-snic" in record
    assert "ethtool -K snic tso off gso off" in record
    for snap in (during,):
        assert snap.links == before.links
        assert snap.qdiscs == before.qdiscs
        assert snap.iptables == before.iptables, "the host's iptables must not change"
        assert snap.nftables == before.nftables, "the host's nftables must not change"
    lab.down()
    after = host_snapshot()
    assert not {n for n in after.namespaces if n.startswith(f"dp-{lab_id}-")}
    assert (after.links, after.qdiscs, after.iptables, after.nftables, after.bridge_nf) == (
        before.links, before.qdiscs, before.iptables, before.nftables, before.bridge_nf,
    )  # fmt: skip
    assert recorded_labs(state_dir) == []


def test_doctor_probes_in_a_namespace_of_its_own() -> None:
    before = host_snapshot()
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "lab.cli", "doctor"],
        capture_output=True, text=True, timeout=60, check=False, cwd=repo,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.strip().startswith("rate/ceil/burst: HTB") for line in lines)
    loss = next(line.strip() for line in lines if line.strip().startswith("loss:"))
    delay = next(line.strip() for line in lines if line.strip().startswith("delay/jitter:"))
    if host_caps().netem:
        assert delay == "delay/jitter: netem under each HTB leaf"
    else:
        assert delay == "delay/jitter: unavailable (no sch_netem)"
        assert loss.startswith("loss: nftables numgen") or loss.startswith("loss: unavailable")
    after = host_snapshot()
    assert not {n for n in after.namespaces if n.startswith(PROBE_PREFIX)}
    assert (after.links, after.qdiscs, after.iptables, after.nftables) == (
        before.links, before.qdiscs, before.iptables, before.nftables,
    )  # fmt: skip

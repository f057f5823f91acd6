"""netns lab lifecycle: up/down leaves the host as it was, crashes are recoverable from the
state file, and up() fails closed instead of touching what it did not create."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from netem_helpers import (
    ROOT_REASON,
    address,
    engine_host,
    host_snapshot,
    netns_names,
    ns_sysctl,
    run,
    send_marked,
    storage_host,
    tc_show,
)

from netem.errors import NetemError, NetemPermissionError
from netem.lifecycle import down_from_state, recorded_labs
from netem.netns import NetnsLab
from netem.spec import TopologySpec

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
]

MakeLab = Callable[[TopologySpec], NetnsLab]


def small_spec(lab_id: str) -> TopologySpec:
    return TopologySpec(
        lab_id,
        (
            engine_host("prefill-0", 0, cnic_mbit=400, snic_mbit=100),
            engine_host("decode-0", 1, cnic_mbit=400, snic_mbit=100),
            storage_host("storage-0", 0),
        ),
    )


def test_up_down_leaves_the_host_as_it_was(make_lab: MakeLab, lab_id: str, state_dir: Path) -> None:
    before = host_snapshot()
    lab = make_lab(small_spec(lab_id))
    lab.up()
    during = host_snapshot()
    ours = {n for n in netns_names() if n.startswith(f"dp-{lab_id}-")}
    assert (
        ours
        == set(lab.namespaces)
        == {
            f"dp-{lab_id}-sw",
            f"dp-{lab_id}-prefill-0",
            f"dp-{lab_id}-decode-0",
            f"dp-{lab_id}-storage-0",
        }
    )
    assert during.links == before.links, "up() must not create links in the host namespace"
    assert during.qdiscs == before.qdiscs
    assert during.bridge_nf == before.bridge_nf
    assert before.namespaces <= during.namespaces
    assert recorded_labs(state_dir) == [lab_id]
    record = json.loads((state_dir / f"{lab_id}.json").read_text())
    assert record["namespaces"] == list(lab.namespaces)

    removed = lab.down()
    assert sorted(removed) == sorted(lab.namespaces)
    assert lab.down() == [], "down() is idempotent"
    after = host_snapshot()
    assert not {n for n in after.namespaces if n.startswith(f"dp-{lab_id}-")}
    assert before.namespaces <= after.namespaces, "down() removed a namespace it did not create"
    assert after.links == before.links
    assert after.qdiscs == before.qdiscs
    assert recorded_labs(state_dir) == []


def test_nodes_reach_each_other_only_through_the_lab_switch(make_lab: MakeLab, lab_id: str) -> None:
    lab = make_lab(small_spec(lab_id))
    lab.up()
    # Bridge netfilter is off inside the switch namespace, and its (empty) FORWARD chain
    # accepts, whatever the host's Docker has done to its own namespace.
    assert ns_sysctl(lab, None, "net.bridge.bridge-nf-call-iptables") == "0"
    assert ns_sysctl(lab, "prefill-0", "net.ipv6.conf.all.disable_ipv6") == "1"
    addrs = run(lab.exec_argv("prefill-0", ["ip", "-4", "-br", "addr", "show", "dev", "cnic"]))
    assert address(lab, "prefill-0", "cnic") in addrs
    for sender, receiver, nic in (
        ("prefill-0", "decode-0", "cnic"),
        ("decode-0", "storage-0", "snic"),
        ("storage-0", "prefill-0", "mgmt"),
    ):
        got = send_marked(
            lab, sender=sender, receiver=receiver, nic=nic, dscp=0, nbytes=100_000, port=7001
        )
        assert got == 100_000


def test_counters_work_from_asyncio_code(make_lab: MakeLab, lab_id: str) -> None:
    lab = make_lab(small_spec(lab_id))
    lab.up()

    async def sample() -> dict[str, object]:
        await asyncio.sleep(0)
        return dict(lab.counters())  # called on the event loop's thread, as a sampler would

    snap = asyncio.run(sample())
    assert set(snap) == {"prefill-0", "decode-0", "storage-0"}
    pre = lab.counters()["prefill-0"]
    assert set(pre) == {"cnic", "snic", "mgmt"}
    assert pre["cnic"].rate_mbit == 400
    assert set(pre["cnic"].egress_classes) == {"collective", "control", "kv"}
    assert pre["snic"].rate_mbit == 100 and pre["snic"].egress_classes == {}
    assert pre["mgmt"].rate_mbit is None


def test_crash_recovery_from_the_state_file(lab_id: str, state_dir: Path) -> None:
    # A process builds the lab and dies without cleaning up (SIGKILL: no finally, no atexit).
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "sys.path[:0] = [sys.argv[3], sys.argv[4]]\n"
        "from netem_helpers import engine_host, storage_host\n"
        "from netem.netns import NetnsLab\n"
        "from netem.spec import TopologySpec\n"
        "spec = TopologySpec(sys.argv[1], (engine_host('prefill-0', 0, cnic_mbit=100,"
        " snic_mbit=50), storage_host('storage-0', 0)))\n"
        "NetnsLab(spec, state_dir=Path(sys.argv[2])).up()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        [sys.executable, "-c", code, lab_id, str(state_dir), str(here), str(here.parents[1])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = {n for n in netns_names() if n.startswith(f"dp-{lab_id}-")}
    try:
        assert left == {f"dp-{lab_id}-sw", f"dp-{lab_id}-prefill-0", f"dp-{lab_id}-storage-0"}
        assert recorded_labs(state_dir) == [lab_id]
    finally:
        removed = down_from_state(state_dir=state_dir)
    assert set(removed) == left
    assert not {n for n in netns_names() if n.startswith(f"dp-{lab_id}-")}
    assert recorded_labs(state_dir) == []
    assert down_from_state(lab_id, state_dir=state_dir) == []


def trees(ns: str) -> dict[tuple[str, str], str]:
    devs = ("cnic", "ifb-cnic", "snic", "ifb-snic")
    return {(what, dev): tc_show(ns, what, dev) for what in ("qdisc", "class") for dev in devs}


def test_up_fails_closed_when_the_lab_is_already_recorded(
    make_lab: MakeLab, lab_id: str, state_dir: Path
) -> None:
    first = make_lab(small_spec(lab_id))
    first.up()
    ns = first.namespace("prefill-0")
    before = trees(ns)
    second = make_lab(small_spec(lab_id))
    with pytest.raises(NetemError, match=f"lab '{lab_id}' is already recorded") as info:
        second.up()
    assert info.value.errno == 17
    assert second.down() == [], "a lab whose up() failed owns nothing"
    assert trees(ns) == before
    assert set(first.namespaces) <= netns_names()
    assert recorded_labs(state_dir) == [lab_id]


def test_up_refuses_a_namespace_it_did_not_create(
    make_lab: MakeLab, lab_id: str, state_dir: Path
) -> None:
    foreign = f"dp-{lab_id}-storage-0"
    run(["ip", "netns", "add", foreign])
    try:
        run(["ip", "-n", foreign, "link", "add", "d0", "type", "ifb"])
        run(["tc", "-n", foreign, "qdisc", "add", "dev", "d0", "root", "handle", "5:", "htb"])
        foreign_tree = tc_show(foreign, "qdisc", "d0")
        lab = make_lab(small_spec(lab_id))
        with pytest.raises(NetemError, match=f"namespace {foreign} already exists") as info:
            lab.up()
        assert info.value.errno == 17
        assert f"ip netns add {foreign}" in str(info.value)
        # Everything up() made before the clash is gone; the foreign namespace is intact.
        assert {n for n in netns_names() if n.startswith(f"dp-{lab_id}-")} == {foreign}
        assert tc_show(foreign, "qdisc", "d0") == foreign_tree
        assert recorded_labs(state_dir) == []
        assert down_from_state(state_dir=state_dir) == []
        assert foreign in netns_names()
    finally:
        run(["ip", "netns", "delete", foreign])


def test_non_root_gets_a_clear_permission_error(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        "from netem.errors import NetemPermissionError\n"
        "from netem.kernel import require_net_admin\n"
        "try:\n"
        "    require_net_admin()\n"
        "except NetemPermissionError as exc:\n"
        "    print(exc.message)\n"
    )
    done = subprocess.run(
        # still uid 0 (the checkout may sit in a directory only root can enter), but with an
        # empty capability bounding set: no CAP_NET_ADMIN, no CAP_SYS_ADMIN
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=False, cwd=repo,
        env={"PYTHONPATH": str(repo), "PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    if done.returncode != 0 and "Permission denied" in done.stderr:
        pytest.skip(f"cannot run without capabilities: {done.stderr.strip()[-200:]}")
    assert done.stdout.strip() == (
        "the netns backend needs root or CAP_NET_ADMIN: run with sudo, "
        "or use --backend local (unshaped, on loopback)"
    )
    assert issubclass(NetemPermissionError, NetemError)

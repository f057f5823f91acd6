"""Helpers of the privileged netem tests: topologies, host snapshots, iperf3 and marked flows.

Everything runs inside namespaces the tests' labs created (`ip netns exec`); the host is only
read, never changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netem.lifecycle import down_from_state
from netem.netns import NetnsLab
from netem.spec import HostSpec, LinkShape, NicSpec, TopologySpec

ROOT_REASON = (
    "needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) to create network namespaces; "
    "run `sudo make privileged`"
)
requires_root = pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)
requires_iperf3 = pytest.mark.skipif(
    shutil.which("iperf3") is None, reason="iperf3 is not installed (apt-get install iperf3)"
)

TINY_LAB: dict[str, Any] = {
    "name": "lifecycle",
    "cluster": {"prefill_nodes": 1, "decode_nodes": 1, "storage_servers": 1, "gpus_per_node": 2},
    "scaling": {"bandwidth_scale": 0.00025, "time_dilation": 2},
    "workload": {
        "num_agents": 4,
        "max_len": 32768,
        "seed": 5,
        "start_turn_fraction": 0.5,
        "max_turns_per_agent": 2,
        "gen_token_scale": 0.05,
    },
}
"""A lab config small enough for lifecycle tests: 1P1D, one storage server, 8 turns."""

# Wire accounting of one full-size TCP segment, as HTB charges it (see netem/counters.py).
MTU = 1500
ETH_HEADER = 14
IPV4_HEADER = 20
TCP_HEADER = 20
TCP_TIMESTAMP_OPTION = 12  # 10 bytes + 2 NOP padding, on every segment when timestamps are on


def run(argv: list[str], *, timeout: float = 30.0) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def netns_names() -> set[str]:
    return {line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line}


@dataclass(frozen=True)
class HostSnapshot:
    """What the host namespace looks like: the tests assert a lab leaves it as it was."""

    namespaces: frozenset[str]
    links: tuple[str, ...]
    qdiscs: tuple[str, ...]
    bridge_nf: str
    iptables: tuple[str, ...] = ()
    """`iptables-save` without its timestamped comment lines and chain counters."""
    nftables: str = ""


def host_snapshot() -> HostSnapshot:
    links = tuple(
        sorted(
            f"{link['ifindex']}:{link['ifname']}:{link.get('master', '')}"
            for link in json.loads(run(["ip", "-j", "link", "show"]))
        )
    )
    qdiscs = tuple(sorted(run(["tc", "qdisc", "show"]).splitlines()))
    nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    iptables: tuple[str, ...] = ()
    if shutil.which("iptables-save"):
        saved = run(["iptables-save"]).splitlines()
        # chain counters ([packets:bytes]) move with any traffic on the host: not compared
        iptables = tuple(
            re.sub(r"\[\d+:\d+\]", "[-]", line) for line in saved if not line.startswith("#")
        )
    # -s (stateless): rules without their counters, which move with any traffic on the host
    nftables = run(["nft", "-s", "list", "ruleset"]) if shutil.which("nft") else ""
    return HostSnapshot(
        frozenset(netns_names()),
        links,
        qdiscs,
        nf.read_text().strip() if nf.exists() else "-",
        iptables,
        nftables,
    )


def tc_show(namespace: str, what: str, dev: str) -> str:
    """`tc class/qdisc show` without statistics, for before/after comparisons."""
    return run(["tc", "-n", namespace, what, "show", "dev", dev])


def ns_sysctl(lab: NetnsLab, node_id: str | None, key: str) -> str:
    ns = lab.switch_namespace if node_id is None else lab.namespace(node_id)
    return run(["ip", "netns", "exec", ns, "sysctl", "-n", key]).strip()


@contextlib.contextmanager
def lab_up(spec: TopologySpec, state_dir: Path) -> Iterator[NetnsLab]:
    """A lab that is always taken down, plus whatever its record still lists."""
    lab = NetnsLab(spec, state_dir=state_dir)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
        down_from_state(spec.lab_id, state_dir=state_dir)


def engine_host(
    node_id: str, index: int, *, cnic_mbit: float | None, snic_mbit: float | None
) -> HostSpec:
    """An engine node: cnic (with priority classes), snic and mgmt on 198.18.{0,1,2}.0/24."""
    return HostSpec(
        node_id,
        (
            NicSpec(
                "cnic",
                "compute",
                f"198.18.0.{10 + index}/24",
                LinkShape(cnic_mbit, priority_classes=True) if cnic_mbit else None,
            ),
            NicSpec(
                "snic",
                "storage",
                f"198.18.1.{10 + index}/24",
                LinkShape(snic_mbit) if snic_mbit else None,
            ),
            NicSpec("mgmt", "mgmt", f"198.18.2.{10 + index}/24"),
        ),
    )


def storage_host(node_id: str, index: int) -> HostSpec:
    """A storage server: unshaped snic and mgmt (engine snics are the bottleneck)."""
    return HostSpec(
        node_id,
        (
            NicSpec("snic", "storage", f"198.18.1.{200 + index}/24"),
            NicSpec("mgmt", "mgmt", f"198.18.2.{200 + index}/24"),
        ),
    )


def address(lab: NetnsLab, node_id: str, nic: str) -> str:
    return str(lab.spec.host(node_id).nic(nic).interface.ip)


def wait_listening(lab: NetnsLab, node_id: str, addr: str, port: int) -> None:
    argv = lab.exec_argv(node_id, ["ss", "-Hltn", f"src {addr}:{port}"])
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if run(argv).strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {addr}:{port} in {lab.namespace(node_id)}")


@dataclass(frozen=True)
class Iperf:
    goodput_bit: float
    """Receiver-side goodput (iperf3's sum_received, omitted warm-up excluded)."""
    mss: int
    retransmits: int


def iperf3(
    lab: NetnsLab,
    *,
    sender: str,
    receiver: str,
    nic: str,
    seconds: float,
    omit_s: int = 1,
    port: int = 5201,
) -> Iperf:
    dst = address(lab, receiver, nic)
    server = subprocess.Popen(
        lab.exec_argv(receiver, ["iperf3", "-s", "-1", "-B", dst, "-p", str(port)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(lab, receiver, dst, port)
        argv = ["iperf3", "-c", dst, "-p", str(port), "-B", address(lab, sender, nic)]
        argv += ["-t", str(seconds), "-O", str(omit_s), "-J"]
        out = json.loads(run(lab.exec_argv(sender, argv), timeout=seconds + omit_s + 30))
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if "error" in out:
        raise AssertionError(f"iperf3: {out['error']}")
    end = out["end"]
    return Iperf(
        goodput_bit=float(end["sum_received"]["bits_per_second"]),
        mss=int(out["start"]["tcp_mss_default"]),
        retransmits=int(end["sum_sent"].get("retransmits", 0)),
    )


def payload_per_frame(lab: NetnsLab, node_id: str) -> tuple[int, int]:
    """(TCP payload, bytes HTB charges) of one full-size segment sent from `node_id`."""
    timestamps = ns_sysctl(lab, node_id, "net.ipv4.tcp_timestamps") != "0"
    payload = MTU - IPV4_HEADER - TCP_HEADER - (TCP_TIMESTAMP_OPTION if timestamps else 0)
    return payload, MTU + ETH_HEADER


_SENDER = """
import socket, sys
host, port, tos, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket()
s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
s.connect((host, port))
chunk = bytes(65536)
left = nbytes
while left:
    left -= s.send(chunk[: min(left, len(chunk))])
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
"""

_RECEIVER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("ready", flush=True)
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


def send_marked(
    lab: NetnsLab, *, sender: str, receiver: str, nic: str, dscp: int, nbytes: int, port: int
) -> int:
    """Send `nbytes` over TCP with IP_TOS = dscp << 2; return the bytes the receiver read.

    When this returns, every data byte has been through the sender's egress tree and the
    receiver's ingress tree."""
    dst = address(lab, receiver, nic)
    rx = subprocess.Popen(
        lab.exec_argv(receiver, [sys.executable, "-c", _RECEIVER, dst, str(port)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert rx.stdout is not None
        assert rx.stdout.readline().strip() == "ready"
        run(
            lab.exec_argv(
                sender, [sys.executable, "-c", _SENDER, dst, str(port), str(dscp << 2), str(nbytes)]
            )
        )
        received = int(rx.stdout.readline())
        rx.wait(timeout=10)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return received


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


_UDP_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE (root): no receiver drops
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(30.0)
seen = set()
while True:
    try:
        data = s.recv(4096)
    except socket.timeout:
        break
    seen.add(int.from_bytes(data[:4], "big"))
    s.settimeout(float(sys.argv[3]))
print(len(seen), flush=True)
"""

_UDP_SENDER = """
import socket, sys
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pad = bytes(size - 4)
for i in range(count):
    s.sendto(i.to_bytes(4, "big") + pad, (host, port))  # blocks on a full socket buffer
print(count, flush=True)
"""


def udp_flood(
    lab: NetnsLab,
    *,
    sender: str,
    receiver: str,
    nic: str,
    count: int,
    size: int = 200,
    port: int = 7100,
    idle_s: float = 1.0,
) -> int:
    """Send `count` numbered datagrams; return how many distinct ones arrived. The sender
    blocks on its socket buffer, so a shaped egress paces it without local drops (a send
    error would fail the sender, not pass as loss)."""
    dst = address(lab, receiver, nic)
    rx = subprocess.Popen(
        lab.exec_argv(receiver, [sys.executable, "-c", _UDP_RECEIVER, dst, str(port), str(idle_s)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert rx.stdout is not None
        assert rx.stdout.readline().strip() == "ready"
        sent = run(
            lab.exec_argv(
                sender, [sys.executable, "-c", _UDP_SENDER, dst, str(port), str(count), str(size)]
            ),
            timeout=120,
        )
        assert int(sent) == count
        received = int(rx.stdout.readline())
        rx.wait(timeout=10)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return received


def udp_receive_errors(lab: NetnsLab, node_id: str) -> int:
    """RcvbufErrors of the node's UDP stack (/proc/net/snmp is per namespace)."""
    lines = [
        line.split()
        for line in run(lab.exec_argv(node_id, ["cat", "/proc/net/snmp"])).splitlines()
        if line.startswith("Udp:")
    ]
    header, values = lines[0], lines[1]
    return int(values[header.index("RcvbufErrors")])


def nft_counters(lab: NetnsLab) -> dict[str, int]:
    """comment -> packets dropped, of the lab switch's loss rules ({} when there are none)."""
    done = subprocess.run(
        ["ip", "netns", "exec", lab.switch_namespace, "nft", "-j", "list", "table", "bridge",
         "dualpath"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return {}
    out: dict[str, int] = {}
    for item in json.loads(done.stdout)["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        packets = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        out[rule["comment"]] = int(packets)
    return out

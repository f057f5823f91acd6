"""The applier for a node that already has a namespace of its own (a compose container): finds
its NICs by subnet, shapes them with the same plan as the netns backend, reads their counters
and changes them in place. It works only in this process's namespace, creates nothing but the
planned IFBs and qdiscs there, and needs CAP_NET_ADMIN only (no CAP_SYS_ADMIN, no setns).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Mapping
from functools import partial
from typing import Any

from pyroute2 import IPRoute

from netem.capabilities import KernelCaps, needs_caps
from netem.counters import NicCounters, nic_sources, read_nics
from netem.errors import NetemError
from netem.kernel import CAP_NET_ADMIN, NetlinkThread, has_cap, offloads_off, wrap
from netem.linkchange import Change, Direction, changed_nic, check_request, plan_link_change
from netem.netns import apply_shaping
from netem.plan import has_per_packet_impairments, plan_topology, shape_nic
from netem.spec import HostSpec, NicSpec, SpecError, TopologySpec
from netem.tc import apply_tc_changes, check_ours

WHERE = "this container"


def has_net_admin() -> bool:
    """Whether this process may shape its NICs (a container needs `cap_add: [NET_ADMIN]`)."""
    return has_cap(CAP_NET_ADMIN)


def find_interfaces(subnets: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """name -> (kernel interface name, 'address/prefix') of the one interface of this
    namespace with an IPv4 address in each subnet. Interface order and names (eth0, eth1, ...)
    depend on the container runtime; subnets do not. NetemError names the subnet that has no
    interface, or several."""
    with IPRoute() as ipr:
        names = {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()}
        addrs = [
            (names.get(int(m["index"]), "?"), f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
            for m in ipr.get_addr(family=socket.AF_INET)
        ]
    out: dict[str, tuple[str, str]] = {}
    for name, subnet in subnets.items():
        net = ipaddress.IPv4Network(subnet)
        hits = [(ifname, a) for ifname, a in addrs if ipaddress.IPv4Interface(a).ip in net]
        if len(hits) != 1:
            have = ", ".join(f"{i} {a}" for i, a in addrs) or "none"
            count = "no interface" if not hits else f"{len(hits)} interfaces"
            raise NetemError(
                f"{name}: {count} with an address in {subnet} here (interfaces: {have}); "
                f"is the container attached to that network?",
                operation=f"find {name} by subnet",
            )
        out[name] = hits[0]
    return out


def probe_netem_here() -> bool:
    """Whether sch_netem exists, probed on a throw-away veth pair inside this namespace (the
    doctor's probe needs a namespace of its own, which a container may not create)."""
    with IPRoute() as ipr:
        ipr.link("add", ifname="dpprobe0", kind="veth", peer="dpprobe1")
        try:
            index = ipr.link_lookup(ifname="dpprobe0")[0]
            try:
                ipr.tc("add", "netem", index=index, handle=0x10000, parent=0xFFFFFFFF, delay=1000)
            except Exception:
                return False
            return True
        finally:
            ipr.link("del", ifname="dpprobe0")


class ContainerNics:
    """The NICs of one node in its own namespace, by their lab names (`cnic`, `snic`, `mgmt`).

    `nics` are NicSpecs named after the kernel's interfaces (`eth1`), as `find_interfaces`
    found them; `names` maps each lab name to one of them. `shape()` applies the netns
    backend's plan to every shaped NIC; `counters()` and `set_link()` work like NetnsLab's.
    """

    def __init__(
        self,
        node_id: str,
        nics: Mapping[str, NicSpec],
        *,
        caps: KernelCaps | None = None,
        allow_unemulated: bool = False,
    ) -> None:
        self.node_id = node_id
        self.nics = dict(nics)
        self.allow_unemulated = allow_unemulated
        self._caps = caps
        self._lock = threading.Lock()
        self._thread: NetlinkThread | None = None
        self._ipr: Any = None
        self._offloaded: set[str] = set()

    def _host(self) -> HostSpec:
        return HostSpec(self.node_id, tuple(self.nics.values()))

    def _resolve_caps(self, nics: tuple[NicSpec, ...]) -> KernelCaps:
        """The caps the plan needs: probed here only when some NIC has impairments."""
        if self._caps is None and needs_caps(TopologySpec("c", (HostSpec("c", nics),))):
            self._caps = KernelCaps(netem=probe_netem_here(), nft_numgen=False)
        return self._caps or KernelCaps.with_netem()

    def shape(self) -> list[str]:
        """Shape every shaped NIC (fail closed, as `netem.netns.apply_shaping`); returns one
        line per NIC saying what was done."""
        caps = self._resolve_caps(tuple(self.nics.values()))
        done = []
        for name, nic in self.nics.items():
            if nic.shape is None:
                continue
            ops = apply_shaping(nic, caps=caps, allow_unemulated=self.allow_unemulated)
            if has_per_packet_impairments(nic):
                self._offloads(nic.name)
            done.append(f"{name} ({nic.name}): {len(ops)} tc operations")
        self._thread = NetlinkThread(f"netem-{self.node_id}")
        self._ipr = self._thread.call(IPRoute)
        return done

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.call(self._ipr.close)
            thread.close()

    def _call(self, what: str, fn: Any) -> Any:
        thread = self._thread
        if thread is None:
            raise NetemError(f"{self.node_id}: NICs are not shaped yet", operation=what)
        return thread.call(fn)

    def counters(self) -> dict[str, NicCounters]:
        """Lab NIC name -> cumulative counters, as NetnsLab.counters gives them per node."""
        host = plan_topology(TopologySpec("c", (self._host(),))).host(self.node_id)
        sources = nic_sources(host)
        raw = self._call("read counters", lambda: read_nics(self._ipr, WHERE, sources))
        return {name: raw[nic.name] for name, nic in self.nics.items()}

    def _nic(self, name: str) -> NicSpec:
        nic = self.nics.get(name)
        if nic is None:
            raise SpecError(
                f"nic: {name!r} is not a NIC of {self.node_id} (have: {list(self.nics)})"
            )
        return nic

    def _offloads(self, ifname: str) -> None:
        if ifname not in self._offloaded:
            wrap(f"ethtool -K {ifname} tso off gso off ({WHERE})", partial(offloads_off, ifname))
            self._offloaded.add(ifname)

    def set_link(
        self,
        name: str,
        *,
        direction: Direction = "both",
        up: bool | None = None,
        **values: float,
    ) -> tuple[Change, ...]:
        """Change NIC `name` in place, as NetnsLab.set_link does (same values, same checks,
        nothing changed on any error). Loss needs sch_netem here: a container has no lab
        switch to drop on."""
        check_request(direction, up)
        with self._lock:
            old = self._nic(name)
            new = changed_nic(old, f"{self.node_id}.{name}", direction, values) if values else old
            caps = self._resolve_caps((new,))
            link = plan_link_change(
                shape_nic(old, caps),
                shape_nic(new, caps),
                node_id=self.node_id,
                nic=name,
                dev=old.name,
                up=up,
                allow_unemulated=self.allow_unemulated,
            )

            def apply() -> None:
                check_ours(self._ipr, WHERE, link.before.ops)
                if has_per_packet_impairments(new):
                    self._offloads(new.name)
                apply_tc_changes(self._ipr, WHERE, link.tc_changes, link.undo)

            self._call("set_link", apply)
            self.nics[name] = new
            return link.changes

"""The emulated network as plain data: hosts, their NICs, and how each NIC is shaped.

Pure and frozen: every value is validated when it is built (`SpecError` names the field and
the allowed range), so the planner and the applier never see a bad name or rate. No I/O, no
pyroute2 here.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

IFNAMSIZ = 15
"""Longest Linux interface name (IFNAMSIZ - 1 for the trailing NUL)."""

IFB_PREFIX = "ifb-"
"""The IFB device that carries a NIC's ingress is `ifb-<nic>`."""

MAX_NIC_NAME = IFNAMSIZ - len(IFB_PREFIX)
"""A NIC name must leave room for its IFB's name."""

BRIDGE_PREFIX = "br-"
MAX_NETWORK_NAME = IFNAMSIZ - len(BRIDGE_PREFIX)

SWITCH_NODE_ID = "sw"
"""Reserved: the switch namespace is `dp-<lab_id>-sw`."""

MAX_RATE_MBIT = 100_000.0
"""HTB takes 64-bit rates, but nothing above 100 Gbit/s is meaningful on one host."""

_LAB_ID = re.compile(r"[a-z0-9]{1,8}")
_NODE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
_IFNAME = re.compile(r"[a-z][a-z0-9]*")
_NETWORK = re.compile(r"[a-z][a-z0-9]*")


class SpecError(ValueError):
    """A topology spec value is out of range; the message names the field."""


def _fail(field: str, value: object, allowed: str) -> SpecError:
    return SpecError(f"{field}: {value!r} is invalid ({allowed})")


@dataclass(frozen=True)
class LinkShape:
    """How one NIC is shaped, the same rate in both directions."""

    rate_mbit: float
    priority_classes: bool = False
    """cnic: HTB classes collective/control/kv chosen by DSCP."""
    kv_min_fraction: float = 0.05
    """Guaranteed share of the kv class; it may borrow the whole link."""

    def __post_init__(self) -> None:
        rate = self.rate_mbit
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise _fail("rate_mbit", rate, "a number of Mbit/s")
        if not math.isfinite(rate) or rate <= 0 or rate > MAX_RATE_MBIT:
            raise _fail("rate_mbit", rate, f"must be > 0 and <= {MAX_RATE_MBIT:g} Mbit/s")
        frac = self.kv_min_fraction
        if isinstance(frac, bool) or not isinstance(frac, int | float):
            raise _fail("kv_min_fraction", frac, "a fraction of the link rate")
        if not math.isfinite(frac) or frac <= 0 or frac > 0.5:
            raise _fail("kv_min_fraction", frac, "must be > 0 and <= 0.5")

    @property
    def rate_bit(self) -> int:
        """The link rate in bit/s, as the kernel is given it."""
        return max(8, round(self.rate_mbit * 1_000_000))


@dataclass(frozen=True)
class NicSpec:
    """One interface of a host, attached to one of the switch's bridges."""

    name: str
    """Interface name inside the node namespace: 'cnic' | 'snic' | 'mgmt'."""
    network: str
    """Bridge it attaches to: 'compute' | 'storage' | 'mgmt'."""
    address: str
    """IPv4 interface address with prefix, e.g. '198.18.0.10/24'."""
    shape: LinkShape | None = None
    """None: unshaped in both directions."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _IFNAME.fullmatch(self.name):
            raise _fail("name", self.name, "lower-case letters and digits, starting with a letter")
        if len(self.name) > MAX_NIC_NAME:
            raise _fail(
                "name",
                self.name,
                f"at most {MAX_NIC_NAME} characters, so that '{IFB_PREFIX}{self.name}' "
                f"fits the kernel's {IFNAMSIZ}-character interface names",
            )
        if not isinstance(self.network, str) or not _NETWORK.fullmatch(self.network):
            raise _fail(
                "network", self.network, "lower-case letters and digits, starting with a letter"
            )
        if len(self.network) > MAX_NETWORK_NAME:
            raise _fail(
                "network",
                self.network,
                f"at most {MAX_NETWORK_NAME} characters, so that bridge "
                f"'{BRIDGE_PREFIX}{self.network}' fits {IFNAMSIZ} characters",
            )
        self.interface  # noqa: B018 - validates the address
        if self.shape is not None and not isinstance(self.shape, LinkShape):
            raise _fail("shape", self.shape, "a LinkShape or None")

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        """The parsed address; raises SpecError when it is not 'a.b.c.d/len'."""
        if not isinstance(self.address, str) or "/" not in self.address:
            raise _fail("address", self.address, "an IPv4 address with prefix, e.g. 198.18.0.10/24")
        try:
            iface = ipaddress.IPv4Interface(self.address)
        except ValueError as exc:
            raise _fail("address", self.address, str(exc)) from None
        if iface.network.prefixlen >= 31 or iface.ip in (
            iface.network.network_address,
            iface.network.broadcast_address,
        ):
            raise _fail("address", self.address, "a host address in a subnet of /30 or larger")
        return iface


@dataclass(frozen=True)
class HostSpec:
    """One emulated machine: one namespace holding its NICs."""

    node_id: str
    """'prefill-0', 'decode-1', 'storage-0', 'scheduler'."""
    nics: tuple[NicSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not _NODE_ID.fullmatch(self.node_id):
            raise _fail(
                "node_id",
                self.node_id,
                "1-40 of lower-case letters, digits and '-', not starting or ending with '-'",
            )
        if self.node_id == SWITCH_NODE_ID:
            raise _fail("node_id", self.node_id, f"'{SWITCH_NODE_ID}' is the switch's namespace")
        if not isinstance(self.nics, tuple) or not self.nics:
            raise _fail(f"{self.node_id}.nics", self.nics, "a non-empty tuple of NicSpec")
        names = [nic.name for nic in self.nics]
        if len(set(names)) != len(names):
            raise _fail(f"{self.node_id}.nics", names, "NIC names must be unique per host")
        networks = [nic.network for nic in self.nics]
        if len(set(networks)) != len(networks):
            raise _fail(f"{self.node_id}.nics", networks, "a host has at most one NIC per network")

    def nic(self, name: str) -> NicSpec:
        for nic in self.nics:
            if nic.name == name:
                return nic
        raise KeyError(f"{self.node_id} has no NIC {name!r} (have: {[n.name for n in self.nics]})")


@dataclass(frozen=True)
class TopologySpec:
    """A whole lab: its id (part of every namespace name) and its hosts."""

    lab_id: str
    """Short id, [a-z0-9]{1,8}."""
    hosts: tuple[HostSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.lab_id, str) or not _LAB_ID.fullmatch(self.lab_id):
            raise _fail("lab_id", self.lab_id, "1-8 lower-case letters or digits")
        if not isinstance(self.hosts, tuple) or not self.hosts:
            raise _fail("hosts", self.hosts, "a non-empty tuple of HostSpec")
        ids = [h.node_id for h in self.hosts]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise _fail("hosts", dup, "node ids must be unique")
        seen: dict[str, str] = {}
        subnets: dict[str, ipaddress.IPv4Network] = {}
        for host in self.hosts:
            for nic in host.nics:
                where = f"{host.node_id}.{nic.name}"
                iface = nic.interface
                ip = str(iface.ip)
                if ip in seen:
                    raise _fail(f"{where}.address", nic.address, f"already used by {seen[ip]}")
                seen[ip] = where
                net = subnets.setdefault(nic.network, iface.network)
                if net != iface.network:
                    raise _fail(
                        f"{where}.address",
                        nic.address,
                        f"network {nic.network!r} is subnet {net}; every NIC on it must be too",
                    )
        nets = list(subnets.items())
        for i, (name_a, net_a) in enumerate(nets):
            for name_b, net_b in nets[i + 1 :]:
                if net_a.overlaps(net_b):
                    raise _fail(
                        "hosts",
                        f"{name_a}={net_a}, {name_b}={net_b}",
                        "networks must use disjoint subnets",
                    )

    def host(self, node_id: str) -> HostSpec:
        for host in self.hosts:
            if host.node_id == node_id:
                return host
        raise KeyError(f"no host {node_id!r} in lab {self.lab_id} (have: {self.node_ids})")

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(h.node_id for h in self.hosts)

    @property
    def networks(self) -> tuple[str, ...]:
        """Networks in first-use order (each one is a bridge in the switch namespace)."""
        out: list[str] = []
        for host in self.hosts:
            for nic in host.nics:
                if nic.network not in out:
                    out.append(nic.network)
        return tuple(out)

"""What a host's kernel can emulate, as plain data: the planner's input (`KernelCaps`), what a
plan could not emulate (`Unemulated`), whether a spec depends on the kernel at all
(`needs_caps`), and the doctor's report (`DoctorReport`, `FeatureSupport`). Pure: the probes
that fill these in live in `netem.doctor`; nothing here imports pyroute2 or runs a command.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from netem.errors import NetemError
from netem.spec import DIRECTIONS, TopologySpec

Probe = Literal["yes", "no", "unknown"]


@dataclass(frozen=True)
class KernelCaps:
    """The kernel features the planner chooses between. Rate, ceil, burst, queue limits and
    priority classes need only HTB, FIFO, ingress, IFB, mirred and u32, which the lab requires
    everywhere; the rest depends on the host."""

    netem: bool
    """sch_netem: delay, jitter, loss, duplicate, corrupt, reorder under the HTB leaves."""
    nft_numgen: bool
    """nftables with the bridge family and `numgen random`: loss on the lab switch's ports
    (preferred over netem loss, see plan.loss_mechanism)."""

    @classmethod
    def with_netem(cls) -> KernelCaps:
        """A kernel with everything (a typical laptop)."""
        return cls(netem=True, nft_numgen=True)

    @classmethod
    def without_netem(cls) -> KernelCaps:
        """The CI machines: no sch_netem, nftables present."""
        return cls(netem=False, nft_numgen=True)


def needs_caps(spec: TopologySpec) -> bool:
    """Whether the plan depends on the kernel (impairments or queue limits somewhere); a spec
    without them plans the same everywhere and is never probed."""
    for host in spec.hosts:
        for nic in host.nics:
            if nic.shape is None:
                continue
            for direction in DIRECTIONS:
                d = nic.shape.direction(direction)
                if d.impairments() or d.queue_limit_packets is not None:
                    return True
    return False


@dataclass(frozen=True)
class Unemulated:
    """A feature of a NIC direction this kernel cannot emulate; the caller decides whether
    that is an error (`NetnsLab(..., allow_unemulated=True)` accepts it)."""

    node_id: str
    nic: str
    direction: str
    feature: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.node_id}.{self.nic}" if self.node_id else self.nic
        return f"{where} {self.direction} {self.feature}: {self.reason}"


def unemulated_error(missing: Sequence[Unemulated], operation: str) -> NetemError:
    """The error raised, before anything changes, for features this kernel cannot emulate."""
    return NetemError(
        "this kernel cannot emulate "
        + "; ".join(str(m) for m in missing)
        + " (see `dualpath doctor`; pass allow_unemulated=True / --allow-unemulated to "
        "run without them)",
        operation=operation,
    )


@dataclass(frozen=True)
class FeatureSupport:
    """How one link feature will be emulated on this host, or why it cannot be."""

    feature: str
    """'rate/ceil/burst', 'priority classes', 'delay', 'jitter', 'loss', ..."""
    mechanism: str | None
    """e.g. 'HTB (+IFB for ingress)', 'netem'; None: unavailable."""
    reason: str = ""
    """Why not (when mechanism is None), or a caveat."""

    def line(self) -> str:
        if self.mechanism is None:
            return f"{self.feature}: unavailable ({self.reason})"
        suffix = f" ({self.reason})" if self.reason else ""
        return f"{self.feature}: {self.mechanism}{suffix}"


@dataclass(frozen=True)
class DoctorReport:
    """Everything `dualpath doctor` found on this host. Each probe is 'yes', 'no' or 'unknown'
    (could not be probed, e.g. without CAP_NET_ADMIN); `errors` says why a probe failed."""

    kernel: str
    cap_net_admin: bool
    cap_sys_admin: bool
    user_namespaces: Probe
    htb: Probe
    tbf: Probe
    fifo: Probe
    ingress: Probe
    ifb: Probe
    mirred: Probe
    u32: Probe
    netem: Probe
    nft_numgen: Probe
    iptables_statistic: Probe
    errors: tuple[str, ...] = ()

    @property
    def caps(self) -> KernelCaps:
        """What the planner may use: only features probed 'yes'."""
        return KernelCaps(netem=self.netem == "yes", nft_numgen=self.nft_numgen == "yes")

    @property
    def can_shape(self) -> bool:
        """Everything the netns backend needs for rate limits and priority classes."""
        needed = (self.htb, self.ingress, self.ifb, self.mirred, self.u32)
        return all(p == "yes" for p in needed)

    def features(self) -> tuple[FeatureSupport, ...]:
        """Per link feature, how it will be emulated (the lines `dualpath doctor` prints)."""
        out: list[FeatureSupport] = []
        if self.can_shape:
            out.append(FeatureSupport("rate/ceil/burst", "HTB egress, HTB on an IFB for ingress"))
            out.append(FeatureSupport("priority classes", "HTB classes, u32 DSCP filters"))
            out.append(
                FeatureSupport(
                    "queue limit",
                    "netem limit under each HTB leaf" if self.netem == "yes" else "pfifo leaf",
                )
            )
        else:
            missing = [
                name
                for name, p in (
                    ("htb", self.htb),
                    ("ingress", self.ingress),
                    ("ifb", self.ifb),
                    ("mirred", self.mirred),
                    ("u32", self.u32),
                )
                if p != "yes"
            ]
            why = f"{', '.join(missing)}: not found or not probed"
            out += [
                FeatureSupport(f, None, why)
                for f in ("rate/ceil/burst", "priority classes", "queue limit")
            ]
        netem_why = "no sch_netem" if self.netem == "no" else "sch_netem not probed"
        for feature in ("delay/jitter", "duplicate", "corrupt", "reorder"):
            if self.netem == "yes":
                out.append(FeatureSupport(feature, "netem under each HTB leaf"))
            else:
                out.append(FeatureSupport(feature, None, netem_why))
        if self.nft_numgen == "yes":
            caveat = "apply_shaping, without a lab switch: " + (
                "netem" if self.netem == "yes" else f"unavailable, {netem_why}"
            )
            out.append(
                FeatureSupport("loss", "nftables numgen on the lab switch's bridge ports", caveat)
            )
        elif self.netem == "yes":
            out.append(FeatureSupport("loss", "netem under each HTB leaf", "no nftables numgen"))
        else:
            nft_why = "no nftables numgen" if self.nft_numgen == "no" else "nft not probed"
            out.append(FeatureSupport("loss", None, f"{netem_why}, {nft_why}"))
        return tuple(out)

    def lines(self) -> list[str]:
        yes_no = {True: "yes", False: "no"}
        head = [
            f"kernel {self.kernel}",
            f"CAP_NET_ADMIN: {yes_no[self.cap_net_admin]}, "
            f"CAP_SYS_ADMIN: {yes_no[self.cap_sys_admin]}, "
            f"user namespaces: {self.user_namespaces}",
            "probed: "
            + ", ".join(
                f"{name} {getattr(self, name)}"
                for name in (
                    "htb",
                    "tbf",
                    "fifo",
                    "ingress",
                    "ifb",
                    "mirred",
                    "u32",
                    "netem",
                    "nft_numgen",
                    "iptables_statistic",
                )
            ),
            "link features:",
        ]
        body = [f"  {f.line()}" for f in self.features()]
        tail = [f"note: {e}" for e in self.errors]
        return head + body + tail

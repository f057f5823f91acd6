"""Bottleneck-free P/D range: at which prefill:decode node ratios neither a compute NIC nor a
node's DRAM saturates before the storage NICs do. # DualPath §4.2
Pure arithmetic on real (unscaled) hardware figures; for `dualpath analyze`. No I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

# The paper states only the inequality
#     s/(g-s) <= P/D <= min{ (g-2s)/s, (g-s)/(2s), (M/(B*s) - 3)/2 }.
# The per-resource model below is our reading of it; it reproduces every term. Every SNIC
# runs at its full rate s*B (the storage-bound regime); the P prefill nodes' reads (P*s*B)
# go PE buffer -> PE GPU -> decode nodes, the D decode nodes' reads (D*s*B) go DE buffer ->
# PE GPU (relay) and DE buffer -> DE GPU. Every byte into or out of a GPU goes through that
# GPU's CNIC (DualPath §5), so a DRAM -> GPU copy loads a CNIC twice: it reads DRAM ("out")
# and writes the GPU ("in"); each direction of the node's g CNICs carries g*B. With r = P/D,
# per node, in units of B:
#   prefill CNIC in : s (buffer -> GPU) + s/r (relay in)            <= g  ->  r >= s/(g-s)
#   prefill CNIC out: s (buffer -> GPU) + s (KV out to the DE)      <= g  ->  s <= g/2
#   decode CNIC out : s (relay out) + s + r*s (buffer -> GPU)       <= g  ->  r <= (g-2s)/s
#   decode CNIC in  : r*s (KV in) + r*s + s (buffer -> GPU)         <= g  ->  r <= (g-s)/(2s)
#   decode DRAM     : 3s (SNIC in, relay out, -> GPU) + 2r*s (KV in, -> GPU) <= M/B
#                                                                         ->  r <= (M/(Bs)-3)/2
#   prefill DRAM    : 2s (SNIC in, -> GPU)                          <= M/B  (implied by the
#                                                                    decode DRAM bound)
# The prefill CNIC out and prefill DRAM loads are always below their decode counterparts, so
# they never saturate first; s <= g/2 is also implied by r <= (g-2s)/s with r > 0.
# The new tokens' KV (PE -> DE on the DE-read path, write-back to storage; ~1 % of the read
# volume) is left out, as the paper's bound does.

_EPS = 1e-9  # relative tolerance: a ratio exactly on a bound is inside


class Resource(StrEnum):
    """A per-node link direction or memory that the KV traffic loads."""

    PREFILL_CNIC_IN = "prefill_cnic_in"
    PREFILL_CNIC_OUT = "prefill_cnic_out"
    DECODE_CNIC_OUT = "decode_cnic_out"
    DECODE_CNIC_IN = "decode_cnic_in"
    DECODE_DRAM = "decode_dram"
    PREFILL_DRAM = "prefill_dram"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Resource.PREFILL_CNIC_IN: "prefill-node CNIC in (buffer->GPU copies + relay in)",
    Resource.PREFILL_CNIC_OUT: "prefill-node CNIC out (buffer->GPU reads + KV out to decode)",
    Resource.DECODE_CNIC_OUT: "decode-node CNIC out (relay out + buffer->GPU reads)",
    Resource.DECODE_CNIC_IN: "decode-node CNIC in (KV in from prefill + buffer->GPU copies)",
    Resource.DECODE_DRAM: "decode-node DRAM",
    Resource.PREFILL_DRAM: "prefill-node DRAM",
}

_UPPER_TERMS = {
    Resource.DECODE_CNIC_OUT: "(g-2s)/s",
    Resource.DECODE_CNIC_IN: "(g-s)/(2s)",
    Resource.DECODE_DRAM: "(M/(B*s)-3)/2",
}


@dataclass(frozen=True, slots=True)
class PdRange:
    """`lower <= P/D <= upper` keeps every CNIC and DRAM below saturation.

    `uppers` holds the three upper-bound terms; `binding_upper` is the smallest (the first in
    `uppers` order on a tie, which a note names). `lower` is inf when s >= g. Bounds are
    reported as computed, so an infeasible range can have `upper < lower` or `upper < 0`.
    """

    lower: float
    upper: float
    binding_upper: Resource
    feasible: bool
    uppers: tuple[tuple[Resource, float], ...]
    notes: tuple[str, ...] = ()

    def contains(self, pd_ratio: float) -> bool:
        return self.feasible and _le(self.lower, pd_ratio) and _le(pd_ratio, self.upper)


def pd_range(g: int, s: float, m_over_bs: float) -> PdRange:
    """The bottleneck-free P/D range for g GPUs (CNICs) per node, SNIC = s x CNIC and
    DRAM = m_over_bs x SNIC bandwidth. # DualPath §4.2 (g=8, s=1, M/(Bs)=10: [1/7, 7/2])
    """
    _check_int("g", g)
    _check_positive("s", s)
    _check_positive("m_over_bs", m_over_bs)
    lower = s / (g - s) if s < g else math.inf
    uppers = (
        (Resource.DECODE_CNIC_OUT, (g - 2 * s) / s),
        (Resource.DECODE_CNIC_IN, (g - s) / (2 * s)),
        (Resource.DECODE_DRAM, (m_over_bs - 3) / 2),
    )
    binding, upper = min(uppers, key=lambda ru: ru[1])  # min keeps the first on a tie
    notes: list[str] = []
    ties = [r for r, u in uppers if r is not binding and math.isclose(u, upper, rel_tol=_EPS)]
    if ties:
        also = ", ".join(r.label for r in ties)
        notes.append(f"the upper bound {_num(upper)} is also set by {also}")
    if 2 * s > g:
        notes.append(
            f"s = {_num(s)} > g/2 = {_num(g / 2)}: the PE-read step alone (buffer->GPU reads + "
            f"KV out = 2s) saturates the prefill-node CNICs; keep CNIC:SNIC per node "
            f"g/s >= 2 (the paper has 8, keep >= 4)"
        )
    if m_over_bs < 2:
        notes.append(
            f"M/(B*s) = {_num(m_over_bs)} < 2: prefill-node DRAM saturates on the PE-read path"
        )
    if m_over_bs <= 3:
        notes.append(
            f"M/(B*s) = {_num(m_over_bs)} <= 3: decode-node DRAM saturates at any P/D "
            "(it needs 3 SNIC rates before any KV comes from prefill)"
        )
    feasible = 2 * s <= g and m_over_bs >= 2 and upper > 0 and _le(lower, upper)
    if not feasible:
        notes.append(
            f"no P/D is bottleneck-free: the lower bound s/(g-s) = {_num(lower)} "
            f"({Resource.PREFILL_CNIC_IN.label}) exceeds the upper bound "
            f"{_UPPER_TERMS[binding]} = {_num(upper)} ({binding.label})"
        )
    elif g < 4 * s:
        notes.append(
            f"CNIC:SNIC per node g/s = {_num(g / s)} < 4: the range is narrow; "
            "the paper keeps 8 (DualPath §4.2)"
        )
    return PdRange(lower, upper, binding, feasible, uppers, tuple(notes))


@dataclass(frozen=True, slots=True)
class ResourceLoad:
    """Per-node KV traffic on one resource with every SNIC saturated, in Gbit/s."""

    resource: Resource
    load_gbit_per_s: float
    capacity_gbit_per_s: float

    @property
    def utilisation(self) -> float:
        return self.load_gbit_per_s / self.capacity_gbit_per_s

    @property
    def saturated(self) -> bool:
        return not _le(self.load_gbit_per_s, self.capacity_gbit_per_s)


@dataclass(frozen=True, slots=True)
class Analysis:
    """Where a cluster's P/D sits against the bottleneck-free range, and why.

    `loads` are per-node loads with every SNIC at full rate, highest utilisation first;
    `violated` lists the saturated resources in that order, and the first of them is the one
    that saturates first as storage traffic ramps up (`first_saturated`). `tightest` is the
    most loaded resource whether or not it saturates. `notes` has one line per broken
    constraint, in the same order.
    """

    prefill_nodes: int
    decode_nodes: int
    gpus_per_node: int
    cnic_gbit_per_gpu: float
    snic_gbit: float
    dram_gbyte_per_s: float
    s: float
    m_over_bs: float
    pd_range: PdRange
    loads: tuple[ResourceLoad, ...]
    notes: tuple[str, ...] = ()

    @property
    def pd_ratio(self) -> float:
        return self.prefill_nodes / self.decode_nodes

    @property
    def violated(self) -> tuple[Resource, ...]:
        return tuple(x.resource for x in self.loads if x.saturated)

    @property
    def inside(self) -> bool:
        return not self.violated

    @property
    def tightest(self) -> ResourceLoad:
        return self.loads[0]

    @property
    def first_saturated(self) -> ResourceLoad | None:
        return self.loads[0] if self.loads[0].saturated else None


def analyze(
    prefill_nodes: int,
    decode_nodes: int,
    gpus_per_node: int,
    cnic_gbit_per_gpu: float,
    snic_gbit: float,
    dram_gbyte_per_s: float,
) -> Analysis:
    """Check P/D against the §4.2 range from real hardware figures (a config's `cluster`).

    B = `cnic_gbit_per_gpu`, s = `snic_gbit` / B, M/(B*s) = `dram_gbyte_per_s` x 8 / `snic_gbit`.
    """
    _check_int("prefill_nodes", prefill_nodes)
    _check_int("decode_nodes", decode_nodes)
    _check_int("gpus_per_node", gpus_per_node)
    _check_positive("cnic_gbit_per_gpu", cnic_gbit_per_gpu)
    _check_positive("snic_gbit", snic_gbit)
    _check_positive("dram_gbyte_per_s", dram_gbyte_per_s)
    s = snic_gbit / cnic_gbit_per_gpu
    dram_gbit = dram_gbyte_per_s * 8
    m_over_bs = dram_gbit / snic_gbit
    bounds = pd_range(gpus_per_node, s, m_over_bs)
    r = prefill_nodes / decode_nodes
    cnic = gpus_per_node * cnic_gbit_per_gpu
    sb = snic_gbit
    raw = (
        ResourceLoad(Resource.PREFILL_CNIC_IN, sb * (1 + 1 / r), cnic),
        ResourceLoad(Resource.PREFILL_CNIC_OUT, 2 * sb, cnic),
        ResourceLoad(Resource.DECODE_CNIC_OUT, sb * (2 + r), cnic),
        ResourceLoad(Resource.DECODE_CNIC_IN, sb * (1 + 2 * r), cnic),
        ResourceLoad(Resource.DECODE_DRAM, sb * (3 + 2 * r), dram_gbit),
        ResourceLoad(Resource.PREFILL_DRAM, 2 * sb, dram_gbit),
    )
    loads = tuple(sorted(raw, key=lambda x: -x.utilisation))  # stable: ties keep table order
    notes: list[str] = []
    for x in loads:
        if x.saturated:
            notes.append(f"{x.resource.label}: {_constraint(x.resource, bounds, r)}")
    return Analysis(
        prefill_nodes=prefill_nodes,
        decode_nodes=decode_nodes,
        gpus_per_node=gpus_per_node,
        cnic_gbit_per_gpu=cnic_gbit_per_gpu,
        snic_gbit=snic_gbit,
        dram_gbyte_per_s=dram_gbyte_per_s,
        s=s,
        m_over_bs=m_over_bs,
        pd_range=bounds,
        loads=loads,
        notes=tuple(notes),
    )


def format_analysis(a: Analysis) -> str:
    """A few human-readable lines (for `dualpath analyze -c CONFIG`)."""
    b = a.pd_range
    ratio = f"P/D = {a.prefill_nodes}/{a.decode_nodes} = {_num(a.pd_ratio)}"
    lines = [
        f"DualPath §4.2 bottleneck-free analysis: {a.prefill_nodes}P{a.decode_nodes}D, "
        f"g = {a.gpus_per_node} GPUs per node",
        f"  s = SNIC/CNIC = {_num(a.snic_gbit)}/{_num(a.cnic_gbit_per_gpu)} Gbit/s = {_num(a.s)}; "
        f"M/(B*s) = {_num(a.dram_gbyte_per_s)} GB/s x 8 / {_num(a.snic_gbit)} Gbit/s "
        f"= {_num(a.m_over_bs)}",
    ]
    if b.feasible:
        lines.append(
            f"  range: {_num(b.lower)} <= P/D <= {_num(b.upper)} "
            f"(upper bound {_UPPER_TERMS[b.binding_upper]}: {b.binding_upper.label})"
        )
    else:
        lines.append("  range: none, no P/D ratio is bottleneck-free for this node shape")
    lines.extend(f"  note: {n}" for n in b.notes)
    top = a.tightest
    if a.inside:
        lines.append(f"  {ratio}: inside; tightest: {top.resource.label} at {_load(top)}")
    else:
        lines.append(f"  {ratio}: OUTSIDE; saturates first: {top.resource.label} at {_load(top)}")
        lines.extend(f"  broken: {n}" for n in a.notes)
    return "\n".join(lines)


# -- the lab's own network ---------------------------------------------------------------------
# The lab moves between nodes only what crosses the network in the paper too: storage reads on
# the snics, the DE -> PE relay and the PE -> DE KV on the cnics. A node's DRAM buffer -> GPU
# copies stay inside the node process (they load no emulated NIC and DRAM bandwidth is not
# emulated), so the lab's CNIC loads with every SNIC at full rate s*B are, per node:
#   prefill CNIC in : relay in from the decode nodes' reads = s*D/P     <= g  ->  P/D >= s/g
#   prefill CNIC out: KV of its own reads to the decode nodes = s       <= g  (g/s >= 2 here)
#   decode CNIC out : relay of its reads to the prefill nodes = s       <= g
#   decode CNIC in  : KV from the prefill nodes' reads = s*P/D          <= g  ->  P/D <= g/s
# `analyze_lab` checks a config against these, so a lab run can be compared with it: the
# first resource it saturates is what the lab's kernel counters show at ~100 %.

_LAB_LABELS = {
    Resource.PREFILL_CNIC_IN: "prefill-node CNIC in (relay in from decode nodes)",
    Resource.PREFILL_CNIC_OUT: "prefill-node CNIC out (KV out to decode nodes)",
    Resource.DECODE_CNIC_OUT: "decode-node CNIC out (relay out)",
    Resource.DECODE_CNIC_IN: "decode-node CNIC in (KV in from prefill nodes)",
}


@dataclass(frozen=True, slots=True)
class LabAnalysis:
    """The lab's CNIC loads with every SNIC at full rate; `lower <= P/D <= upper` keeps them
    below saturation. Loads are highest utilisation first, like `Analysis.loads`."""

    prefill_nodes: int
    decode_nodes: int
    cnic_over_snic: float
    lower: float
    upper: float
    loads: tuple[ResourceLoad, ...]

    @property
    def pd_ratio(self) -> float:
        return self.prefill_nodes / self.decode_nodes

    @property
    def inside(self) -> bool:
        return not any(x.saturated for x in self.loads)

    @property
    def first_saturated(self) -> ResourceLoad | None:
        return self.loads[0] if self.loads[0].saturated else None


def analyze_lab(
    prefill_nodes: int,
    decode_nodes: int,
    gpus_per_node: int,
    cnic_gbit_per_gpu: float,
    snic_gbit: float,
) -> LabAnalysis:
    """The P/D range of what the lab's network carries (see the comment above)."""
    _check_int("prefill_nodes", prefill_nodes)
    _check_int("decode_nodes", decode_nodes)
    _check_int("gpus_per_node", gpus_per_node)
    _check_positive("cnic_gbit_per_gpu", cnic_gbit_per_gpu)
    _check_positive("snic_gbit", snic_gbit)
    cnic = gpus_per_node * cnic_gbit_per_gpu
    sb = snic_gbit
    r = prefill_nodes / decode_nodes
    raw = (
        ResourceLoad(Resource.PREFILL_CNIC_IN, sb / r, cnic),
        ResourceLoad(Resource.PREFILL_CNIC_OUT, sb, cnic),
        ResourceLoad(Resource.DECODE_CNIC_OUT, sb, cnic),
        ResourceLoad(Resource.DECODE_CNIC_IN, sb * r, cnic),
    )
    loads = tuple(sorted(raw, key=lambda x: -x.utilisation))
    return LabAnalysis(prefill_nodes, decode_nodes, cnic / sb, sb / cnic, cnic / sb, loads)


def format_lab_analysis(a: LabAnalysis) -> str:
    """Lines for `dualpath analyze`: the same question for the lab's emulated network."""
    ratio = f"P/D = {a.prefill_nodes}/{a.decode_nodes} = {_num(a.pd_ratio)}"
    top = a.loads[0]
    where = f"{_LAB_LABELS[top.resource]} at {_load(top)}"
    lines = [
        "In this lab (KV between nodes only; buffer->GPU copies stay in the node process):",
        f"  range: {_num(a.lower)} <= P/D <= {_num(a.upper)} "
        f"(node CNIC:SNIC = {_num(a.cnic_over_snic)})",
    ]
    if a.inside:
        lines.append(f"  {ratio}: inside; tightest: {where}")
    else:
        lines.append(f"  {ratio}: OUTSIDE; saturates first: {where}")
    return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------


def _constraint(resource: Resource, bounds: PdRange, r: float) -> str:
    if resource is Resource.PREFILL_CNIC_IN:
        return f"P/D = {_num(r)} < s/(g-s) = {_num(bounds.lower)}"
    if resource is Resource.PREFILL_CNIC_OUT:
        return "2s > g: the PE-read step needs s <= g/2"
    if resource is Resource.PREFILL_DRAM:
        return "M/(B*s) < 2"
    upper = dict(bounds.uppers)[resource]
    return f"P/D = {_num(r)} > {_UPPER_TERMS[resource]} = {_num(upper)}"


def _load(x: ResourceLoad) -> str:
    if x.resource in (Resource.DECODE_DRAM, Resource.PREFILL_DRAM):
        used, cap, unit = x.load_gbit_per_s / 8, x.capacity_gbit_per_s / 8, "GB/s"
    else:
        used, cap, unit = x.load_gbit_per_s, x.capacity_gbit_per_s, "Gbit/s"
    return f"{x.utilisation:.0%} ({_num(used)} of {_num(cap)} {unit} per node)"


def _num(x: float) -> str:
    """3 significant decimals, plus the fraction when it is a small one (1/7, 7/2)."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = f"{x:,.3f}".rstrip("0").rstrip(".")
    frac = Fraction(x).limit_denominator(16)
    if frac.denominator != 1 and math.isclose(float(frac), x, rel_tol=1e-12):
        text += f" ({frac})"
    return text


def _le(a: float, b: float) -> bool:
    return a <= b + _EPS * max(1.0, abs(b))


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

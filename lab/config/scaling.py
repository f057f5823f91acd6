"""`scaling: auto`: choose bandwidth_scale (k) and time_dilation (tau) that fit this host.

The real-equivalent results of a config do not depend on k and tau while the host keeps up
(docs/design.md, "Scaling model"); what does depend on them is the host's load. k sets the
bytes per second the data plane moves, tau how short the emulated GPU steps are. So:

- tau is the smallest value that makes every emulated GPU step long against the event loop's
  timer resolution and the host's wake-up jitter (a step of MIN_STEP_MS or more), and that
  keeps the cluster's control work — scheduler pulls, GPU steps and their collective bursts,
  all of which happen per emulated second, so 1/tau as often — within CONTROL_SHARE of the
  host's CPUs (costs per event measured on the reference host, scaled by the calibration);
- k is the largest value whose aggregate KV rate (every engine storage NIC saturated, and each
  byte it reads forwarded once more over the compute network) stays within a share of the
  host's data-plane capacity, estimated from a short calibration of the lab's own transport on
  this host (lab.run.calibrate) against the same measure on the machine the envelope was measured
  on. Links never go below MIN_LINK_MBIT, where shaping and packetisation stop being faithful.

Explicit values in the config win over auto. Pure: a config and a calibration in, a choice out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lab.config.models import AUTO_FIELDS, LabConfig

MIN_STEP_MS = 50.0
"""The shortest emulated GPU step auto scaling allows: timers fire within ~1 ms and the health
check allows 2 ms + 5 % of a step, so a 50 ms step keeps timer slack under 5 %."""
JITTER_STEPS = 20.0
"""A step must also be this many times the host's measured wake-up lateness (p99)."""
MIN_LINK_MBIT = 10.0
"""Slowest shaped link auto scaling allows (the privileged shaping tests hold 2 % there)."""
LOAD_SHARE = 0.5
"""Share of the estimated capacity a run may use at full load: headroom for the timelines,
the scheduler, the driver, bursts and the rest of the machine."""

CONTROL_SHARE = 0.15
"""Share of the host's CPUs the control work of a cluster at full tilt may take."""
PULL_CPU_S = 300e-6
"""CPU per scheduler pull, both ends (gRPC stream message and report), reference host."""
STEP_CPU_S = 100e-6
"""CPU per emulated GPU step of a timeline, reference host."""
BURST_CPU_S = 400e-6
"""CPU per collective burst to one peer and its ack (both ends and the kernel's shaping)."""

REFERENCE_CAPACITY_GBIT = 3.0
"""Aggregate verified KV (emulated Gbit/s) the reference host carried within 5 % of its
low-rate JCT (bench/invariance.py on examples/laptop.yaml; docs/design.md)."""
REFERENCE_CPU_S_PER_GB = 0.45
"""lab.run.calibrate's cost on that host (CPU seconds per GB through the lab's transport,
verified)."""
REFERENCE_CPUS = 2


@dataclass(frozen=True)
class HostCalibration:
    """What lab.run.calibrate measured on this host."""

    cpus: int
    cpu_s_per_gb: float
    """CPU seconds per GB of KV moved through the lab's transport on loopback and verified."""
    timer_late_p99_ms: float
    """How late a short event-loop sleep wakes up, p99."""
    seconds: float


@dataclass(frozen=True)
class ScalingChoice:
    bandwidth_scale: float
    time_dilation: float
    auto: tuple[str, ...]
    """The fields this choice set (the others came from the config)."""
    capacity_gbit_per_s: float
    """Estimated aggregate verified-KV rate this host carries inside the envelope."""
    peak_kv_gbit_per_s: float
    """Aggregate verified-KV rate of the run at full load, at the chosen k."""
    min_step_ms: float
    """The shortest emulated GPU step at the chosen tau."""
    notes: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def capacity_gbit_per_s(cal: HostCalibration) -> float:
    """This host's data-plane capacity: the reference's, scaled by CPUs and by the measured
    cost per byte of the lab's own transport."""
    cost = max(cal.cpu_s_per_gb, 1e-6)
    return REFERENCE_CAPACITY_GBIT * (cal.cpus / REFERENCE_CPUS) * (REFERENCE_CPU_S_PER_GB / cost)


def kv_gbit_per_unit_k(cfg: LabConfig) -> float:
    """Aggregate verified KV at full load for k = 1 (real Gbit/s): every engine node's storage
    NIC saturated, and each byte read forwarded once more (relay or PD transfer)."""
    c = cfg.cluster
    return 2.0 * (c.prefill_nodes + c.decode_nodes) * c.snic_gbit


def control_cpu_s_per_s(cfg: LabConfig, cal: HostCalibration) -> float:
    """CPU seconds per real second the cluster's control work costs at full tilt (every GPU
    stepping at its shortest step): divide by tau for emulated time."""
    c, m = cfg.cluster, cfg.model
    nodes = c.prefill_nodes + c.decode_nodes
    pulls = nodes * 1000.0 / cfg.scheduling.pull_interval_ms
    collectives = cfg.scheduling.collective_kbytes_per_step > 0
    decode_steps = c.decode_nodes * c.gpus_per_node / (max(m.decode_base_ms, 1e-3) / 1000.0)
    prefill_steps = c.prefill_nodes * m.layer_groups / (max(m.prefill_base_ms, 1e-3) / 1000.0)
    burst = BURST_CPU_S if collectives else 0.0
    cost = (
        pulls * PULL_CPU_S
        + decode_steps * (STEP_CPU_S + (c.decode_nodes - 1) * burst)
        + prefill_steps * (STEP_CPU_S + (c.prefill_nodes - 1) * burst)
    )
    return cost * cal.cpu_s_per_gb / REFERENCE_CPU_S_PER_GB


def shortest_step_ms(cfg: LabConfig) -> float:
    """The shortest real GPU step the cost model can produce (its fixed costs)."""
    m = cfg.model
    return max(min(m.prefill_base_ms, m.decode_base_ms), 1e-3)


def _round_up(x: float) -> float:
    """Up to 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10^n (a value people can read and repeat)."""
    exp = math.floor(math.log10(x))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * 10**exp >= x * (1 - 1e-9):
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


def _round_down(x: float) -> float:
    exp = math.floor(math.log10(x))
    for m in (10, 5, 2.5, 2, 1):
        if m * 10**exp <= x * (1 + 1e-9):
            return float(m * 10**exp)
    return float(10 ** (exp - 1))


def choose_scaling(cfg: LabConfig, cal: HostCalibration) -> ScalingChoice:
    s = cfg.scaling
    auto = tuple(f for f in AUTO_FIELDS if f in s.auto)
    notes: list[str] = []
    tau = s.time_dilation
    if "time_dilation" in auto:
        need_ms = max(MIN_STEP_MS, JITTER_STEPS * cal.timer_late_p99_ms)
        for_steps = need_ms / shortest_step_ms(cfg)
        control = control_cpu_s_per_s(cfg, cal)
        for_control = control / (CONTROL_SHARE * cal.cpus)
        tau = _round_up(max(for_steps, for_control))
        notes.append(
            f"tau {tau:g}: the shortest GPU step ({shortest_step_ms(cfg):g} ms real) lasts "
            f">= {need_ms:g} ms emulated, and the control work (pulls, steps, collectives; "
            f"{control:.2f} CPU-s per real second at full tilt) takes <= "
            f"{100 * control / tau / cal.cpus:.0f} % of {cal.cpus} CPUs"
        )
    capacity = capacity_gbit_per_s(cal)
    per_k = kv_gbit_per_unit_k(cfg)
    k = s.bandwidth_scale
    if "bandwidth_scale" in auto:
        k = _round_down(LOAD_SHARE * capacity / per_k)
        floor = MIN_LINK_MBIT / (cfg.cluster.snic_gbit * 1000)
        if k < floor:
            notes.append(
                f"k {k:g} would shape the storage NICs below {MIN_LINK_MBIT:g} Mbit/s; using "
                f"{_round_up(floor):g}: this host may not carry the config inside the envelope"
            )
            k = _round_up(floor)
        k = min(k, 1.0)
        notes.append(
            f"k {k:g}: storage NICs at {cfg.cluster.snic_gbit * 1000 * k:g} Mbit/s, "
            f"{per_k * k:.2f} Gbit/s of KV at full load, {LOAD_SHARE:.0%} of the estimated "
            f"{capacity:.2f} Gbit/s this host carries"
        )
    return ScalingChoice(
        bandwidth_scale=k,
        time_dilation=tau,
        auto=auto,
        capacity_gbit_per_s=round(capacity, 3),
        peak_kv_gbit_per_s=round(per_k * k, 3),
        min_step_ms=round(shortest_step_ms(cfg) * tau, 3),
        notes=tuple(notes),
    )


def resolve(cfg: LabConfig, choice: ScalingChoice) -> LabConfig:
    """The config with the chosen scaling, nothing left on auto."""
    scaling = cfg.scaling.model_copy(
        update={
            "bandwidth_scale": choice.bandwidth_scale,
            "time_dilation": choice.time_dilation,
            "auto": (),
        }
    )
    return cfg.model_copy(update={"scaling": scaling})

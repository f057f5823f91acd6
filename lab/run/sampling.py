"""What the runner samples every tick while the driver runs: every node's kernel counters
(through the backend) and the host's CPU figures, at the same moment (lab.results.health
judges them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lab.results.health import HostSample, host_sample
from lab.results.metrics import Sample
from lab.run.backends import Backend

PROC_STAT = Path("/proc/stat")
PROC_PSI_CPU = Path("/proc/pressure/cpu")
"""Both host-wide (a container sees the host's, unless something like lxcfs masks them)."""


def _read_text(path: Path) -> str | None:
    """A /proc file's text, None when the kernel has no such file (no PSI before 4.20, or
    psi=0) or it cannot be read: host figures are then missing, never an error."""
    try:
        return path.read_text()
    except OSError:
        return None


def sample_host(now: float) -> HostSample:
    """The host's CPU busy jiffies and CPU pressure (PSI some) at `now` (lab.results.health)."""
    return host_sample(
        now,
        stat_text=_read_text(PROC_STAT),
        psi_text=_read_text(PROC_PSI_CPU),
        num_cpus=os.cpu_count(),
    )


def sample(be: Backend, samples: list[Sample], host: list[HostSample]) -> None:
    """One tick: every node's kernel counters (when the backend has them) and the host's CPU
    figures (always), at the same moment."""
    counters = be.counters()
    now = time.time()
    if counters is not None:
        samples.append({"t": now, "nodes": counters})
    host.append(sample_host(now))

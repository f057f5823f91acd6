"""Emulation health of one lab process: event-loop lag, timeline lateness, CPU and run-queue wait.

Every lab process (engine timeline, engine data plane, storage server, scheduler, driver) owns a
`HealthMonitor` and reports `snapshot()` with its other stats; the lab decides from them whether
the host kept up (lab.results.health). Samples are time-stamped so the lab can cut them to the
measured window. This module measures; it never judges and never changes what it measures.
"""

from __future__ import annotations

import asyncio
import os
import time
from array import array
from collections.abc import Callable
from typing import Any

LOOP_PROBE_INTERVAL_S = 0.05
"""How often the loop-lag probe asks to be woken: 20 samples a second."""
GAUGE_INTERVAL_S = 0.5
MAX_SAMPLES = 60_000
"""Per series; beyond it every other sample is dropped (the series keeps its whole span)."""

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_times() -> dict[str, float] | None:
    """This process's CPU seconds (user + system) and run-queue wait seconds (time it was
    runnable but not running: CPU contention), from /proc; None where /proc has no answer."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None
    wait_s = None
    try:
        with open("/proc/self/schedstat") as f:
            run_ns, wait_ns, _ = (int(x) for x in f.read().split()[:3])
        wait_s = wait_ns / 1e9
        cpu_s = run_ns / 1e9  # nanosecond resolution where the kernel keeps schedstats
    except (OSError, ValueError):
        pass
    out = {"cpu_s": round(cpu_s, 4)}
    if wait_s is not None:
        out["runq_wait_s"] = round(wait_s, 4)
    return out


class Series:
    """A bounded time series of (at, value...) rows of floats; halves itself when full."""

    def __init__(self, width: int, *, max_rows: int = MAX_SAMPLES) -> None:
        self.width = width
        self.max_rows = max_rows
        self._data = array("d")

    def add(self, *row: float) -> None:
        if len(row) != self.width:
            raise ValueError(f"row of {len(row)} values in a series of width {self.width}")
        self._data.extend(row)
        if len(self._data) >= self.max_rows * self.width:
            w = self.width
            rows = [self._data[i : i + w] for i in range(0, len(self._data), 2 * w)]
            self._data = array("d")
            for r in rows:
                self._data.extend(r)

    def __len__(self) -> int:
        return len(self._data) // self.width

    def rows(self, *, digits: int = 3) -> list[list[float]]:
        w = self.width
        d = self._data
        return [[round(d[i + j], digits) for j in range(w)] for i in range(0, len(d), w)]


class HealthMonitor:
    """Measures one process. `start()` in its event loop; `lateness()` from timeline code;
    `gauge()` for a data-plane backlog; `snapshot()` whenever the process reports."""

    def __init__(self, process: str, part: str) -> None:
        self.process = process
        """Node id, e.g. prefill-0, storage-1, scheduler, driver."""
        self.part = part
        """timeline, dataplane, storage, scheduler or driver."""
        self.started_at = time.time()
        self.loop_lag = Series(2)
        """(at, lag_ms): how late the probe woke after asking for LOOP_PROBE_INTERVAL_S."""
        self.steps = Series(4)
        """(at, planned_ms, actual_ms, late_ms) of every emulated compute sleep."""
        self.times = Series(3)
        """(at, cpu_s, runq_wait_s) every GAUGE_INTERVAL_S: this process's CPU use and CPU
        contention over any window (runq_wait_s is -1 without schedstats)."""
        self.gauges: dict[str, Series] = {}
        self._gauge_fns: dict[str, Callable[[], float]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- recording ---------------------------------------------------------------------------
    def lateness(self, at: float, planned_s: float, actual_s: float, late_s: float) -> None:
        """One emulated compute interval that started at `at` (wall clock): planned and actual
        duration, and how late it ended against its deadline."""
        self.steps.add(at, planned_s * 1e3, actual_s * 1e3, late_s * 1e3)

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        """Sample `fn()` every GAUGE_INTERVAL_S (e.g. bytes waiting in the data plane)."""
        self._gauge_fns[name] = fn
        self.gauges[name] = Series(2)

    # -- probes ------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._probe_loop()))
        self._tasks.append(asyncio.create_task(self._sample_gauges()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(LOOP_PROBE_INTERVAL_S)
            lag = loop.time() - asked - LOOP_PROBE_INTERVAL_S
            self.loop_lag.add(time.time(), max(lag, 0.0) * 1e3)

    async def _sample_gauges(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_INTERVAL_S)
            now = time.time()
            self._sample_times(now)
            for name, fn in self._gauge_fns.items():
                try:
                    value = float(fn())
                except Exception:  # a gauge must never take its process down
                    continue
                self.gauges[name].add(now, value)

    def _sample_times(self, now: float) -> None:
        t = process_times()
        if t is not None:
            self.times.add(now, t["cpu_s"], t.get("runq_wait_s", -1.0))

    # -- report ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """JSON-able: identity, CPU and run-queue wait so far, and every series."""
        self._sample_times(time.time())
        return {
            "process": self.process,
            "part": self.part,
            "pid": os.getpid(),
            "started_at": round(self.started_at, 3),
            "at": round(time.time(), 3),
            "times": process_times(),
            "loop_lag": self.loop_lag.rows(),
            "steps": self.steps.rows(),
            "cpu": self.times.rows(digits=4),
            "gauges": {name: s.rows() for name, s in self.gauges.items()},
        }

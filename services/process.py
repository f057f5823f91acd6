"""Set-up of the lab's node processes: CPU priority, allocator, lifetime tied to a parent.

The data-plane processes (engine data planes, storage servers) give way to the timelines on a
busy host and keep their large receive buffers in the heap; an engine's data plane dies with
the timeline that started it. Best effort everywhere: where a call is not available, nothing
changes and nothing fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
from collections.abc import Mapping

DATA_PLANE_NICE = 5
"""Niceness of data-plane processes: the emulated GPUs' timelines (nice 0) run first when the
host is short of CPU, so the host slows transfers (which emulation health measures), not the
GPU clock."""

GC_THRESHOLD = 20_000
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_BYTES = 32 << 20
"""Allocations up to this size come from the heap and freed memory is kept there: without it
every received megabyte-sized payload is a fresh mmap, paid again in page faults (measured:
100 us per 1 MiB buffer against 24 us)."""


GLIBC_TUNABLES = f"glibc.malloc.mmap_threshold={HEAP_BYTES}:glibc.malloc.trim_threshold={1 << 30}"
"""The same allocator settings from the start of a process (they can only be set in its
environment): on this VM a first touch costs ~3 us per 4 KiB page, and a data plane's buffers
grow to hundreds of megabytes. Not glibc.malloc.hugetlb: with THP in `madvise` mode its huge
page faults compact memory and made an allocation-heavy loop 2.8x slower here."""


def node_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment a node process is started with."""
    env = {**base, "PYTHONUNBUFFERED": "1"}
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    return env


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def tune_allocator() -> None:
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    with contextlib.suppress(Exception):
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def lower_priority(nice: int = DATA_PLANE_NICE) -> None:
    with contextlib.suppress(OSError):
        os.nice(nice)


def die_with_parent() -> bool:
    """PR_SET_PDEATHSIG: this process gets SIGKILL when its parent dies (even by SIGKILL).
    False when the parent is already gone."""
    libc = _libc()
    if libc is not None and hasattr(libc, "prctl"):
        with contextlib.suppress(Exception):
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    return os.getppid() != 1


def data_plane_process() -> None:
    """What every data-plane process does first. The cyclic garbage collector runs less often:
    a data plane makes thousands of short-lived headers a second and almost no cycles."""
    tune_allocator()
    lower_priority()
    gc.set_threshold(GC_THRESHOLD)


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (its main thread's), from /proc; none if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []

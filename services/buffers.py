"""Receive buffers for frame payloads, recycled instead of allocated afresh.

A data plane receives hundreds of megabyte-sized payloads a second. A fresh buffer for each one
costs a zero-fill and, once the allocator's heap fragments under the megabytes a node keeps in
flight, page faults on every first touch: measured here at 50-100 us per MiB, a quarter of a
data plane's CPU. So payload memory comes from per-size-class free lists and goes back there
when the last reference to the payload is gone (a weakref finalizer: nothing still reading it
can see it reused). Small payloads are plain bytearrays. No I/O.
"""

from __future__ import annotations

import weakref

import numpy as np
import numpy.typing as npt

POOLED_MIN_BYTES = 64 << 10
"""Smaller payloads are plain bytearrays: the pool would cost more than it saves."""
CLASS_BYTES = 64 << 10
"""Sizes round up to a multiple of this, so a freed buffer fits the next frame of its class."""
MAX_FREE_BYTES = 256 << 20
"""Free memory the pool keeps at most; beyond it freed buffers go back to the allocator."""


class PayloadPool:
    def __init__(self, *, max_free_bytes: int = MAX_FREE_BYTES) -> None:
        self.max_free_bytes = max_free_bytes
        self._free: dict[int, list[npt.NDArray[np.uint8]]] = {}
        self.free_bytes = 0
        self.num_reused = 0
        self.num_allocated = 0

    def get(self, nbytes: int) -> bytearray | memoryview:
        """A writable buffer of exactly `nbytes` (contents undefined for pooled ones)."""
        if nbytes < POOLED_MIN_BYTES:
            return bytearray(nbytes)
        size = -(-nbytes // CLASS_BYTES) * CLASS_BYTES
        free = self._free.get(size)
        if free:
            base = free.pop()
            self.free_bytes -= size
            self.num_reused += 1
        else:
            base = np.empty(size, dtype=np.uint8)
            self.num_allocated += 1
        view = base[:nbytes]
        weakref.finalize(view, self._put, base)
        return view.data

    def _put(self, base: npt.NDArray[np.uint8]) -> None:
        size = base.nbytes
        if self.free_bytes + size > self.max_free_bytes:
            return
        self._free.setdefault(size, []).append(base)
        self.free_bytes += size


POOL = PayloadPool()
"""The process's pool (each node process has its own)."""

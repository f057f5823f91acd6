"""Receive buffers for frame payloads, recycled instead of allocated afresh.

A data plane receives hundreds of megabyte-sized payloads a second. A fresh buffer for each one
costs a zero-fill and, once the allocator's heap fragments under the megabytes a node keeps in
flight, page faults on every first touch: measured here at 50-100 us per MiB, a quarter of a
data plane's CPU. So payload memory comes from per-size-class free lists and goes back there
when the last reference to the payload is gone (a weakref finalizer: nothing still reading it
can see it reused). Small payloads are plain bytearrays. No I/O.

A data plane's working set still grows over a run (a prefill node holds hundreds of megabytes
of KV read ahead of its GPUs), and on this VM a page touched for the first time costs 7-18 us:
a data plane that grew its memory on the data path spent a quarter of its CPU in the kernel
zeroing pages. `warm` pays that at start-up, as the real system registers its DRAM buffers
with the NIC before serving.
"""

from __future__ import annotations

import weakref

import numpy as np
import numpy.typing as npt

POOLED_MIN_BYTES = 64 << 10
"""Smaller payloads are plain bytearrays: the pool would cost more than it saves."""
STEPS_PER_OCTAVE = 4
"""Size classes: every power of two split in this many steps (at most 25 % slack per buffer).
Frames come in many sizes (a read's last chunk, frames regrouped from chunks): exact-size
classes filled the pool with buffers no later frame fitted, and every new one was faulted in."""
LOOKAHEAD_CLASSES = 2 * STEPS_PER_OCTAVE
"""A request may take a free buffer up to this many classes larger (at most four times its size)."""
MAX_FREE_BYTES = 1 << 30
"""Free memory the pool keeps at most; beyond it freed buffers go back to the allocator."""
PAGE_BYTES = 4096


def class_size(nbytes: int) -> int:
    """The size of the buffer that serves a request of `nbytes` (>= POOLED_MIN_BYTES)."""
    if nbytes <= POOLED_MIN_BYTES:
        return POOLED_MIN_BYTES
    octave = (nbytes - 1).bit_length() - 1  # 2**octave < nbytes <= 2**(octave + 1)
    step = max(1, (1 << octave) // STEPS_PER_OCTAVE)
    return -(-nbytes // step) * step


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
        size = class_size(nbytes)
        base = self._take(size)
        if base is None:
            base = np.empty(size, dtype=np.uint8)
            self.num_allocated += 1
        else:
            self.num_reused += 1
        view = base[:nbytes]
        weakref.finalize(view, self._put, base)
        return view.data

    def warm(self, sizes: list[int], budget_bytes: int) -> int:
        """Fill the free lists up front with buffers for requests of `sizes` (round robin),
        every page touched, up to `budget_bytes` (and the pool's limit): their first-touch
        page faults are paid now instead of on the data path. Returns the bytes added."""
        classes = [class_size(n) for n in sizes if n >= POOLED_MIN_BYTES]
        added = 0
        budget = min(budget_bytes, self.max_free_bytes - self.free_bytes)
        while classes:
            for size in classes:
                if added + size > budget:
                    return added
                base = np.empty(size, dtype=np.uint8)
                base[::PAGE_BYTES] = 0
                self._free.setdefault(size, []).append(base)
                self.free_bytes += size
                self.num_allocated += 1
                added += size
        return added

    def _take(self, size: int) -> npt.NDArray[np.uint8] | None:
        for _ in range(LOOKAHEAD_CLASSES + 1):
            free = self._free.get(size)
            if free:
                base = free.pop()
                self.free_bytes -= base.nbytes
                return base
            size = class_size(size + 1)
        return None

    def _put(self, base: npt.NDArray[np.uint8]) -> None:
        size = base.nbytes
        if self.free_bytes + size > self.max_free_bytes:
            return
        self._free.setdefault(size, []).append(base)
        self.free_bytes += size


POOL = PayloadPool()
"""The process's pool (each node process has its own)."""

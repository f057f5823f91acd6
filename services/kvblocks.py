"""Deterministic KV bytes and their checksums.

Every (trajectory, block, layer group) slice is the same bytes wherever it is made, so any
receiver can check what it got against what it should have got: a crc32 carried in the frame
must match both the payload and the independently derived expectation. Pure, no I/O.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

POOL_BYTES = 4 << 20
_POOL = random.Random(0x5EED).randbytes(POOL_BYTES)
_STAMP = struct.Struct("!4sIII")  # b"KVB1", trajectory, block, layer group
_MASK64 = (1 << 64) - 1


class KvCorruption(Exception):
    """A KV slice failed verification: wrong length, payload crc or expected content."""


def _mix(traj: int, block: int, group: int) -> int:
    # splitmix64 of the identity: cheap, well spread offsets into the pool.
    z = traj * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + group * 0x94D049BB133111EB
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SliceId:
    traj: int
    block: int
    group: int


@dataclass(frozen=True, slots=True)
class KvGenerator:
    """Makes the bytes of layer-group slices of `slice_bytes` each (>= 64)."""

    slice_bytes: int
    layer_groups: int

    def __post_init__(self) -> None:
        if self.slice_bytes < _STAMP.size:
            raise ValueError(f"slice_bytes must be >= {_STAMP.size}, got {self.slice_bytes}")
        if self.layer_groups < 1:
            raise ValueError(f"layer_groups must be >= 1, got {self.layer_groups}")

    def slice(self, traj: int, block: int, group: int) -> bytes:
        n = self.slice_bytes
        if n > POOL_BYTES - _STAMP.size:
            raise ValueError(f"slice of {n} bytes exceeds the generator pool")
        off = _mix(traj, block, group) % (POOL_BYTES - n)
        return _STAMP.pack(b"KVB1", traj, block, group) + _POOL[off + _STAMP.size : off + n]

    def expected_crc(self, traj: int, block: int, group: int) -> int:
        return crc(self.slice(traj, block, group))

    def full_block(self, traj: int, block: int) -> bytes:
        """A Full Block: the block's layer-group slices in layer order."""
        return b"".join(self.slice(traj, block, g) for g in range(self.layer_groups))

    def pack(self, traj: int, ids: Iterable[tuple[int, int]]) -> tuple[list[list[int]], bytes]:
        """Slices for (block, group) pairs: ([[block, group, crc], ...], payload)."""
        entries: list[list[int]] = []
        parts: list[bytes] = []
        for block, group in ids:
            data = self.slice(traj, block, group)
            entries.append([block, group, crc(data)])
            parts.append(data)
        return entries, b"".join(parts)

    def verify(self, traj: int, entries: Sequence[Sequence[int]], payload: bytes) -> int:
        """Check every slice of a payload; return the verified byte count or raise."""
        n = self.slice_bytes
        if len(payload) != n * len(entries):
            raise KvCorruption(
                f"traj {traj}: payload of {len(payload)} bytes for {len(entries)} slices of {n}"
            )
        view = memoryview(payload)
        for i, entry in enumerate(entries):
            try:
                block, group, carried = int(entry[0]), int(entry[1]), int(entry[2])
                if not (0 <= block < 1 << 32 and 0 <= group < self.layer_groups):
                    raise ValueError("block or group out of range")
            except (IndexError, TypeError, ValueError) as exc:
                raise KvCorruption(f"traj {traj}: malformed slice entry {entry!r}: {exc}") from None
            got = crc(view[i * n : (i + 1) * n])
            if got != carried:
                raise KvCorruption(
                    f"traj {traj} block {block} group {group}: "
                    f"crc {got:08x} != carried {carried:08x}"
                )
            if carried != self.expected_crc(traj, block, group):
                raise KvCorruption(
                    f"traj {traj} block {block} group {group}: content is not the expected KV"
                )
        return len(payload)

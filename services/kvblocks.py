"""Deterministic KV bytes (content format v2) and their per-frame checksums.

Every (trajectory, block, layer group) slice is the same bytes wherever it is made, so any
receiver can check a whole frame of slices against what it should hold: the CRC-32C carried in
the frame must match both the payload and an expectation *derived* from the slice identities
(CRC algebra over GF(2)), never by generating the bytes again. Pure, no I/O; numpy does the work.
"""

from __future__ import annotations

import random
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import crc32c as _crc32c
import numpy as np
import numpy.typing as npt

from dualpath.errors import DualPathError
from services.blocks import describe

U32Array = npt.NDArray[np.uint32]

POOL_BYTES: Final = 4 << 20
"""The pseudo-random pool every slice body is cut from (treated as cyclic)."""
NUM_BODIES: Final = 1024
"""K: a slice body starts at one of K fixed offsets, `BODY_STRIDE` apart, in the pool."""
BODY_STRIDE: Final = POOL_BYTES // NUM_BODIES
STAMP: Final = struct.Struct("!4sIII")  # b"KVB2", trajectory, block, layer group
STAMP_BYTES: Final = STAMP.size
MAGIC: Final = b"KVB2"
_MAGIC_U32: Final = int.from_bytes(MAGIC, "big")
MIN_SLICE_BYTES: Final = 64
_CACHED_GROUPS: Final = 256
MAX_CACHED_SIZES: Final = 8
"""Per-slice-size tables kept (LRU); a process normally uses one or two sizes."""

_POOL = np.frombuffer(random.Random(0x5EED).randbytes(POOL_BYTES), dtype=np.uint8)
_U32_LIMIT: Final = 1 << 32
_MASK32: Final = 0xFFFFFFFF
_MASK64: Final = (1 << 64) - 1
_MIX_T, _MIX_B, _MIX_G = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MIX_1, _MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MIX_B64, _MIX_G64, _MIX_164, _MIX_264 = (np.uint64(c) for c in (_MIX_B, _MIX_G, _MIX_1, _MIX_2))
_RADIX: Final = 16
"""Fan-in of one fold level: 512 slices fold in 3 numpy passes instead of 9 pairwise ones."""
_LANE_BASE = (np.arange(4) * 256).astype(np.uint16)  # flat table index of byte lane j
_BLOCK_CODE = next(c for c in "ILH" if array(c).itemsize == 4)  # u32 in the array module


class KvCorruption(DualPathError):
    """KV bytes failed verification: wrong length, payload crc or expected content. (A slice
    set on the wire that does not parse is services.wire.frames.BadMessage.)"""


def crc(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of `data`: hardware-assisted where the CPU has it."""
    return _crc32c.crc32c(data)


# -- CRC-32C algebra ---------------------------------------------------------------------------
# S(M) is the raw register after feeding M from 0 (reflected, no final xor). It is linear in M,
# and S(A‖B) = Z^|B|(S(A)) ^ S(B), where Z (feed one zero byte) is a linear map of the register.
# A linear map of u32 is kept two ways: its 32 column images (to compose maps) and four
# 256-entry tables, one per byte of the input (to apply it to a numpy array in one gather).


def _make_crc_table() -> U32Array:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table[i] = c
    return table


_CRC_TABLE = _make_crc_table()


def _raw(data: bytes | bytearray | memoryview, state: int = 0) -> int:
    """S(data) continued from raw register `state` (the package keeps the register inverted)."""
    return _crc32c.crc32c(data, state ^ _MASK32) ^ _MASK32


def _bytes_le(x: U32Array) -> npt.NDArray[np.uint8]:
    """(..., 4) view of u32 values as their little-endian bytes (lane j = bits 8j..8j+7)."""
    le = x.astype("<u4", copy=False)
    return np.ascontiguousarray(le).view(np.uint8).reshape(*x.shape, 4)


def _tables(cols: U32Array) -> U32Array:
    """(4, 256) tables of the map with column images `cols`: tables[j][v] = map(v << 8j)."""
    tabs = np.zeros((4, 256), dtype=np.uint32)
    by_lane = cols.reshape(4, 8)
    for bit in range(8):
        w = 1 << bit
        tabs[:, w : 2 * w] = tabs[:, :w] ^ by_lane[:, bit : bit + 1]
    return tabs


def _apply(tabs: U32Array, x: U32Array) -> U32Array:
    """The linear map given by (4, 256) tables, applied to every element of `x`: one gather
    from the flattened tables (lane j's entries start at 256 j), then xor of the lanes."""
    looked_up: U32Array = tabs.reshape(-1).take(_bytes_le(x) + _LANE_BASE)
    return looked_up[..., 0] ^ looked_up[..., 1] ^ looked_up[..., 2] ^ looked_up[..., 3]


def _compose(outer_tabs: U32Array, inner_cols: U32Array) -> U32Array:
    """Columns of outer ∘ inner."""
    return _apply(outer_tabs, inner_cols)


_IDENTITY = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
_Z1 = (_CRC_TABLE[_IDENTITY & 0xFF] ^ (_IDENTITY >> 8)).astype(np.uint32)


class _ZeroPowers:
    """Z^z for any z >= 0, from cached Z^(2^j) by binary exponentiation."""

    def __init__(self) -> None:
        self._cols: list[U32Array] = [_Z1]
        self._tabs: list[U32Array] = [_tables(_Z1)]
        self._lock = threading.Lock()  # storage verifies in worker threads too

    def _ensure(self, bits: int) -> None:
        with self._lock:
            while len(self._cols) < bits:
                squared = _compose(self._tabs[-1], self._cols[-1])
                self._cols.append(squared)
                self._tabs.append(_tables(squared))

    def cols(self, z: int) -> U32Array:
        if z < 0:
            raise ValueError(f"negative shift {z}")
        self._ensure(z.bit_length())
        out = _IDENTITY
        for j in range(z.bit_length()):
            if z >> j & 1:
                out = _compose(self._tabs[j], out)  # powers of Z commute: order is free
        return out

    def tabs(self, z: int) -> U32Array:
        return _tables(self.cols(z))


# -- slice identities --------------------------------------------------------------------------


def _body_indices(
    traj: int, blocks: npt.NDArray[np.uint64], groups: npt.NDArray[np.uint64]
) -> npt.NDArray[np.intp]:
    """(blocks, groups) body indices; uint64 arithmetic wraps exactly like `& _MASK64`."""
    zb = blocks * _MIX_B64 + np.uint64((traj * _MIX_T) & _MASK64)
    z = zb[:, None] + groups * _MIX_G64
    z = (z ^ (z >> 30)) * _MIX_164
    z = (z ^ (z >> 27)) * _MIX_264
    z ^= z >> 31
    index: npt.NDArray[np.intp] = (z & (NUM_BODIES - 1)).astype(np.intp)
    return index


@dataclass(frozen=True, slots=True)
class SliceSet:
    """The slices of one frame, in payload order: `for b in blocks: for g in range(g0, g1)`."""

    traj: int
    blocks: tuple[int, ...]
    g0: int
    g1: int

    @property
    def num_slices(self) -> int:
        return len(self.blocks) * (self.g1 - self.g0)


# -- per slice size tables ---------------------------------------------------------------------


_ZPOW = _ZeroPowers()


def _field_tables() -> tuple[int, U32Array]:
    """S of the stamp = const ^ (traj, block, group) contributions, each linear in its u32.

    Returns S(b"KVB2" + 12 zero bytes) and (3, 4, 256) tables indexed [field, LE byte, value]:
    the byte of LE lane j of field f sits at stamp offset 4 + 4f + 3 - j (big-endian fields)."""
    const = _raw(MAGIC + bytes(12))
    fields = np.zeros((3, 4, 256), dtype=np.uint32)
    for f in range(3):
        for j in range(4):
            pos = 4 + 4 * f + 3 - j
            fields[f, j] = _apply(_ZPOW.tabs(STAMP_BYTES - 1 - pos), _CRC_TABLE)
    return const, fields


_STAMP_CONST, _STAMP_FIELDS = _field_tables()


class _Source:
    """The cyclic pool laid out so row k of a (K, n) strided view is 16 spare bytes followed by
    body k: one numpy gather then yields whole slices, and only the stamps are written after."""

    def __init__(self) -> None:
        self.array = self._build(BODY_STRIDE)

    @staticmethod
    def _build(body_bytes: int) -> npt.NDArray[np.uint8]:
        extended = np.resize(_POOL, (NUM_BODIES - 1) * BODY_STRIDE + body_bytes)
        return np.concatenate((_POOL[-STAMP_BYTES:], extended))

    def at_least(self, body_bytes: int) -> npt.NDArray[np.uint8]:
        capacity = len(self.array) - STAMP_BYTES - (NUM_BODIES - 1) * BODY_STRIDE
        if capacity < body_bytes:
            self.array = self._build(max(body_bytes, 2 * capacity))
        return self.array


class _Layout:
    """Everything derived once per slice size n: the gather view, the shifted stamp tables,
    S of each of the K bodies, and the fold tables (built lazily, level by level)."""

    def __init__(self, n: int, source: npt.NDArray[np.uint8]) -> None:
        body = n - STAMP_BYTES
        self.n = n
        self.rows = np.lib.stride_tricks.as_strided(
            source, shape=(NUM_BODIES, n), strides=(BODY_STRIDE, 1), writeable=False
        )
        shift = _ZPOW.tabs(body)  # a stamp is followed by n-16 body bytes: S(stamp) moves on
        stamp_const = int(_apply(shift, np.array([_STAMP_CONST], dtype=np.uint32))[0])
        traj_tabs, self.block_tabs, group_tabs = _apply(shift, _STAMP_FIELDS)
        self.traj_tabs = traj_tabs.tolist()
        self.groups = _apply(group_tabs, np.arange(_CACHED_GROUPS, dtype=np.uint32))
        self.group_tabs = group_tabs
        self.bodies = self._body_states(source, body, shift)
        # Standard CRC starts from 0xFFFFFFFF: that is the same as xoring Z^n(0xFFFFFFFF) into
        # the first slice's state, which the fold then carries across the rest of the frame.
        self.init_fold = int(_apply(_ZPOW.tabs(n), np.array([_MASK32], dtype=np.uint32))[0])
        self.stamp_const = stamp_const
        self._levels: list[U32Array] = []
        self._lock = threading.Lock()

    @staticmethod
    def _body_states(source: npt.NDArray[np.uint8], body: int, shift: U32Array) -> U32Array:
        # S(E[a:a+L]) = S(E[:a+L]) ^ Z^L(S(E[:a])): two running prefixes over the pool, so the
        # cost is one pass over the pool whatever the body length (not K x L bytes).
        view = memoryview(source.data)[STAMP_BYTES:]
        heads = np.zeros(NUM_BODIES, dtype=np.uint32)
        tails = np.zeros(NUM_BODIES, dtype=np.uint32)
        head, tail = 0, _raw(view[:body])
        for k in range(NUM_BODIES):
            heads[k], tails[k] = head, tail
            if k + 1 < NUM_BODIES:
                a = k * BODY_STRIDE
                head = _raw(view[a : a + BODY_STRIDE], head)
                tail = _raw(view[a + body : a + body + BODY_STRIDE], tail)
        return tails ^ _apply(shift, heads)

    def traj_state(self, traj: int) -> int:
        t = self.traj_tabs
        return int(
            t[0][traj & 255] ^ t[1][traj >> 8 & 255] ^ t[2][traj >> 16 & 255] ^ t[3][traj >> 24]
        )

    def group_states(self, g0: int, g1: int) -> U32Array:
        if g1 <= _CACHED_GROUPS:
            return self.groups[g0:g1]
        return _apply(self.group_tabs, np.arange(g0, g1, dtype=np.uint32))

    def level(self, i: int) -> U32Array:
        """Flattened (RADIX, 4, 256) tables of Z^(j · RADIX^i · n), j in [0, RADIX)."""
        with self._lock:
            while len(self._levels) <= i:
                step = _ZPOW.cols(self.n * _RADIX ** len(self._levels))
                step_tabs = _tables(step)
                cols = [_IDENTITY]
                for _ in range(_RADIX - 1):
                    cols.append(_compose(step_tabs, cols[-1]))
                self._levels.append(np.stack([_tables(c) for c in cols]).reshape(-1))
            return self._levels[i]


class _Layouts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._source = _Source()
        self._by_size: OrderedDict[int, _Layout] = OrderedDict()

    def get(self, n: int) -> _Layout:
        with self._lock:
            layout = self._by_size.get(n)
            if layout is None:
                layout = _Layout(n, self._source.at_least(n - STAMP_BYTES))
                self._by_size[n] = layout
                while len(self._by_size) > MAX_CACHED_SIZES:
                    self._by_size.popitem(last=False)
            self._by_size.move_to_end(n)
            return layout


_LAYOUTS = _Layouts()
# Flat index base in a level's tables of (position p in a group of w, byte lane): the input at
# p is shifted by (w - 1 - p) slices of the level.
_FOLD_BASE = {
    w: (((w - 1 - np.arange(w))[:, None] * 4 + np.arange(4)) * 256).astype(np.uint16)
    for w in (2, 4, 8, _RADIX)
}


def _fold(layout: _Layout, states: U32Array) -> int:
    """S of the concatenation of equal-size slices whose raw states are `states`, in order;
    len(states) must be a power of two (pad zeros at the FRONT: they leave S unchanged).

    Each level merges groups of up to RADIX neighbours (a tree with fan-in RADIX): the j-th
    from the right is shifted by j times the length each of them covers."""
    level = 0
    while len(states) > 1:
        w = min(_RADIX, len(states))
        lanes = _bytes_le(states).reshape(-1, w, 4) + _FOLD_BASE[w]
        looked_up = layout.level(level).take(lanes.reshape(len(lanes), 4 * w))
        states = np.bitwise_xor.reduce(looked_up, axis=1)
        level += 1
    return int(states[0])


# -- the generator -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KvGenerator:
    """Makes and checks the bytes of layer-group slices of `slice_bytes` each (>= 64)."""

    slice_bytes: int
    layer_groups: int

    def __post_init__(self) -> None:
        if self.slice_bytes < MIN_SLICE_BYTES:
            raise ValueError(f"slice_bytes must be >= {MIN_SLICE_BYTES}, got {self.slice_bytes}")
        if self.layer_groups < 1:
            raise ValueError(f"layer_groups must be >= 1, got {self.layer_groups}")

    def _blocks(self, s: SliceSet) -> U32Array:
        """The block ids as u32 (the array module converts a tuple ~3x faster than numpy)."""
        if not 0 <= s.traj < _U32_LIMIT:
            raise ValueError(f"trajectory {s.traj} is not a u32")
        if not 0 <= s.g0 < s.g1 <= self.layer_groups:
            raise ValueError(f"groups [{s.g0}, {s.g1}) not within [0, {self.layer_groups}]")
        try:
            return np.frombuffer(array(_BLOCK_CODE, s.blocks), dtype=np.uint32)
        except OverflowError:
            raise ValueError(f"block ids of traj {s.traj} must be u32") from None

    def _body_indices(self, s: SliceSet, blocks: U32Array) -> npt.NDArray[np.intp]:
        groups = np.arange(s.g0, s.g1, dtype=np.uint64)
        return _body_indices(s.traj, blocks.astype(np.uint64), groups)

    def payload(self, s: SliceSet) -> bytes:
        """The slices' bytes in payload order."""
        return self.payload_array(s).tobytes()

    def payload_array(self, s: SliceSet) -> npt.NDArray[np.uint8]:
        """`payload(s)` as a fresh uint8 array of shape (slices, slice_bytes): senders that
        assemble a frame from several parts copy it once more, not twice."""
        blocks = self._blocks(s)
        if not len(blocks):
            return np.empty((0, self.slice_bytes), dtype=np.uint8)
        layout = _LAYOUTS.get(self.slice_bytes)
        nb, ng, n = len(blocks), s.g1 - s.g0, self.slice_bytes
        # One gather copies every slice's 16 spare bytes and body; the stamps overwrite the
        # spare bytes in place, as big-endian u32 words.
        out = layout.rows[self._body_indices(s, blocks).reshape(-1)]
        stamps = out.reshape(nb, ng, n)[:, :, :STAMP_BYTES].view(">u4")
        stamps[..., 0] = _MAGIC_U32
        stamps[..., 1] = s.traj
        stamps[..., 2] = blocks[:, None]
        stamps[..., 3] = np.arange(s.g0, s.g1, dtype=np.uint32)
        return out

    def full_blocks(self, traj: int, blocks: Sequence[int]) -> bytes:
        """Full Blocks: each block's layer-group slices in layer order, blocks in order."""
        return self.payload(SliceSet(traj, tuple(blocks), 0, self.layer_groups))

    def slice(self, traj: int, block: int, group: int) -> bytes:
        """One slice (tests and tools; frames go through `payload`)."""
        return self.payload(SliceSet(traj, (block,), group, group + 1))

    def expected_crc(self, s: SliceSet) -> int:
        """crc(payload(s)), derived from the identities without making the bytes."""
        blocks = self._blocks(s)
        if not len(blocks):
            return 0
        layout = _LAYOUTS.get(self.slice_bytes)
        nb, ng = len(blocks), s.g1 - s.g0
        m = nb * ng
        padded = np.zeros(1 << (m - 1).bit_length(), dtype=np.uint32)
        states = padded[len(padded) - m :].reshape(nb, ng)
        # S(slice) = Z^(n-16)(S(stamp)) ^ S(body); the stamp part splits by field.
        constant = layout.stamp_const ^ layout.traj_state(s.traj)
        np.bitwise_xor(
            _apply(layout.block_tabs, blocks)[:, None],
            layout.group_states(s.g0, s.g1) ^ np.uint32(constant),
            out=states,
        )
        states ^= layout.bodies[self._body_indices(s, blocks)]
        states[0, 0] ^= np.uint32(layout.init_fold)
        return _fold(layout, padded) ^ _MASK32

    def verify(self, s: SliceSet, payload: bytes | bytearray | memoryview, carried_crc: int) -> int:
        """Check a frame: its length, its bytes against the carried crc, and the carried crc
        against the derived expectation. Returns the verified byte count or raises."""
        n = self.slice_bytes
        m = s.num_slices
        size = memoryview(payload).nbytes
        where = f"traj {s.traj} blocks {describe(s.blocks)} groups [{s.g0}, {s.g1})"
        if size != m * n:
            raise KvCorruption(f"{where}: payload of {size} bytes for {m} slices of {n}")
        got = crc(payload)
        if got != carried_crc:
            raise KvCorruption(
                f"{where}: crc {got:08x} != carried {carried_crc:08x} (corrupted in flight)"
            )
        if carried_crc != self.expected_crc(s):
            raise KvCorruption(f"{where}: content is not the expected KV")
        return size

    def group_slices(self, s: SliceSet, payload: bytes | bytearray | memoryview, g: int) -> bytes:
        """From a whole-block frame, group `g` of every block in block order (one strided
        copy): how engines regroup storage reads into per-layer-group sends."""
        return self.group_view(s, payload, g).tobytes()

    def group_view(
        self, s: SliceSet, payload: bytes | bytearray | memoryview, g: int
    ) -> npt.NDArray[np.uint8]:
        """`group_slices` without the copy: a strided (blocks, slice_bytes) view of `payload`."""
        groups = self.layer_groups
        if (s.g0, s.g1) != (0, groups):
            raise ValueError(f"groups [{s.g0}, {s.g1}) are not whole blocks of {groups}")
        if not 0 <= g < groups:
            raise ValueError(f"group {g} not in [0, {groups})")
        n = self.slice_bytes
        size = memoryview(payload).nbytes
        if size != s.num_slices * n:
            raise KvCorruption(
                f"traj {s.traj}: payload of {size} bytes for {s.num_slices} slices of {n}"
            )
        frame = np.frombuffer(payload, dtype=np.uint8).reshape(len(s.blocks), groups, n)
        return frame[:, g, :]

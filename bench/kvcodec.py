"""Bench: CPU cost of the KV content codec (services/kvblocks.py, format v2) per frame.

For each slice size and frame size, times on this machine: generating a frame's payload
(`payload`), deriving its crc from the slice identities (`expected_crc`), verifying a received
frame (`verify`: length, one CRC-32C pass, the derivation), and two references measured side by
side: a plain copy of the frame (`copy`) and one CRC-32C pass over it (`crc32c`). Prints µs per
frame, ns per byte and GB/s; asserts nothing (the unit tests check correctness). The first call
for a slice size builds its tables: that one-off cost is printed separately.

    .venv/bin/python bench/kvcodec.py [--slice-bytes 64 655 ...] [--frame-bytes 262144 ...]
                                      [--groups 1] [--min-time 0.03]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import crc32c  # noqa: E402

from services.kvblocks import KvGenerator, SliceSet, crc  # noqa: E402

DEFAULT_SLICE_BYTES = (64, 655, 4096, 65_536, 1 << 20)
DEFAULT_FRAME_BYTES = (64 << 10, 256 << 10, 1 << 20)
FIRST_BLOCK = 4_000_000_000  # large ids, as a long trajectory would have them


def best_seconds(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call: the best of three batches, each at least min_time / 3 long."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / 3:
            break
        number *= 2 if elapsed <= 0 else max(2, min(10, int(min_time / 3 / elapsed) + 1))
    best = elapsed / number
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def frame_for(slice_bytes: int, frame_bytes: int, groups: int) -> SliceSet:
    """Whole blocks of `groups` slices each, as many as fit `frame_bytes` (at least one)."""
    num_blocks = max(1, frame_bytes // (slice_bytes * groups))
    return SliceSet(7, tuple(range(FIRST_BLOCK, FIRST_BLOCK + num_blocks)), 0, groups)


def run(
    slice_sizes: Sequence[int], frame_sizes: Sequence[int], groups: int, min_time: float
) -> None:
    print(f"crc32c hardware_based={crc32c.hardware_based}, groups per block={groups}")
    print(
        f"{'slice B':>8} {'frame B':>9} {'slices':>6} {'op':>13} "
        f"{'us/frame':>9} {'ns/B':>7} {'GB/s':>7}"
    )
    for n in slice_sizes:
        gen = KvGenerator(slice_bytes=n, layer_groups=groups)
        start = time.perf_counter()
        gen.expected_crc(frame_for(n, n * groups, groups))
        setup_ms = 1e3 * (time.perf_counter() - start)
        print(f"{n:>8} (first call for this slice size builds its tables: {setup_ms:.1f} ms)")
        timed: set[SliceSet] = set()
        for frame_bytes in frame_sizes:
            s = frame_for(n, frame_bytes, groups)
            if s in timed:  # frames smaller than a block all become the same one-block frame
                continue
            timed.add(s)
            payload = gen.payload(s)
            carried = crc(payload)
            ops: list[tuple[str, Callable[[], object]]] = [
                ("payload", functools.partial(gen.payload, s)),
                ("expected_crc", functools.partial(gen.expected_crc, s)),
                ("verify", functools.partial(gen.verify, s, payload, carried)),
                ("ref: copy", functools.partial(bytearray, payload)),
                ("ref: crc32c", functools.partial(crc, payload)),
            ]
            for name, fn in ops:
                sec = best_seconds(fn, min_time)
                size = len(payload)
                print(
                    f"{n:>8} {size:>9} {s.num_slices:>6} {name:>13} "
                    f"{sec * 1e6:>9.1f} {sec * 1e9 / size:>7.3f} {size / sec / 1e9:>7.2f}"
                )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--slice-bytes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SLICE_BYTES),
        help="slice sizes to time (>= 64)",
    )
    parser.add_argument(
        "--frame-bytes",
        type=int,
        nargs="+",
        default=list(DEFAULT_FRAME_BYTES),
        help="target frame payloads (whole blocks; at least one block per frame)",
    )
    parser.add_argument(
        "--groups",
        type=int,
        default=1,
        help="layer groups per block: 1 = engine per-group frames, G = storage whole blocks",
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.03,
        help="seconds spent per measurement (three batches); keep it short on a shared host",
    )
    args = parser.parse_args(argv)
    if min(args.slice_bytes) < 64 or args.groups < 1 or args.min_time <= 0:
        parser.error("slice sizes must be >= 64, --groups >= 1 and --min-time > 0")
    run(args.slice_bytes, args.frame_bytes, args.groups, args.min_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())

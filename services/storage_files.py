"""A storage server's files: one sparse file per trajectory (a bounded cache of open fds,
read-ahead off), exact positional reads and writes of whole-block runs, and the catalogue that
records what was stored. Blocking calls; the server (services/storage.py) decides whether they
run on the event loop or in a thread."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgpack

from services.blocks import block_runs
from services.codec import Payload
from services.storage_protocol import StorageIOError

CATALOG_NAME = "catalog.msgpack"
"""Per server directory: one msgpack record [traj, [[first, count], ...]] per stored write, so a
restarted server knows what its files hold."""
MAX_OPEN_FILES = 256
"""Cached trajectory fds; the least recently used unpinned one is closed beyond this."""


def pread_exact(fd: int, offset: int, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            raise StorageIOError(f"short read at offset {offset + got}: file truncated?")
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def pwrite_all(fd: int, offset: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def read_catalog(data: bytes) -> list[tuple[int, list[tuple[int, int]]]]:
    """The (trajectory, [(first block, count), ...]) records of a catalogue, in order. A torn
    last record (the server was killed while appending it) and anything malformed after the
    last good record are ignored: those blocks count as not stored."""
    out: list[tuple[int, list[tuple[int, int]]]] = []
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        for rec in unpacker:
            traj, runs = rec
            parsed = [(int(f), int(c)) for f, c in runs]
            if not isinstance(traj, int) or any(f < 0 or c < 0 for f, c in parsed):
                break
            out.append((traj, parsed))
    except (ValueError, TypeError):  # msgpack's format errors are ValueErrors
        pass
    return out


def no_readahead(fd: int) -> None:
    """Reads name exact block ranges of a sparse file: read-ahead would only zero-fill the holes
    past them (measured: 7 % of a storage server's CPU in memset under page_cache_ra)."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


class TrajectoryFiles:
    """One sparse file per trajectory under `directory`: a bounded LRU of open fds, pinned
    while in use, and a record of which files this server created (only those are removed)."""

    def __init__(self, directory: Path, *, max_open: int = MAX_OPEN_FILES) -> None:
        self.directory = directory
        self._max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._created: set[Path] = set()

    def path(self, traj: int) -> Path:
        return self.directory / f"traj-{traj}.kv"

    def _open(self, traj: int, *, create: bool) -> int:
        path = self.path(traj)
        fd = -1
        if create:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                self._created.add(path)
        if fd < 0:
            fd = os.open(path, os.O_RDWR)
        no_readahead(fd)
        return fd

    @contextlib.contextmanager
    def pinned(self, traj: int, *, create: bool) -> Iterator[int]:
        """The trajectory's fd, kept open until the block exits."""
        fd = self._fds.get(traj)
        if fd is None:
            fd = self._open(traj, create=create)
            self._fds[traj] = fd
        self._fds.move_to_end(traj)
        self._pins[traj] = self._pins.get(traj, 0) + 1
        try:
            yield fd
        finally:
            self._pins[traj] -= 1
            if not self._pins[traj]:
                del self._pins[traj]
            self._evict()

    def _evict(self) -> None:
        for traj in list(self._fds):
            if len(self._fds) <= self._max_open:
                return
            if traj not in self._pins:
                os.close(self._fds.pop(traj))

    def close_all(self) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pins.clear()

    def adopt(self, path: Path) -> None:
        """Count a file an earlier run of this server created (a restart after a crash) as
        created here, so a clean stop removes it too."""
        self._created.add(path)

    def remove_created(self, root: Path) -> list[Path]:
        """Unlink the files this object created, if they lie under `root`."""
        removed: list[Path] = []
        root = root.resolve()
        for path in sorted(self._created):
            if path.resolve().is_relative_to(root):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path)
        self._created.clear()
        return removed


def read_blocks(fd: int, blocks: Sequence[int], block_bytes: int) -> bytes:
    """The bytes of `blocks` (in order) of a trajectory's file."""
    parts = [
        pread_exact(fd, first * block_bytes, n * block_bytes) for first, n in block_runs(blocks)
    ]
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_blocks(fd: int, blocks: Sequence[int], payload: Payload, block_bytes: int) -> None:
    """Write `payload`, the bytes of `blocks` in order, at their places in the file."""
    view = memoryview(payload)
    pos = 0
    for first, n in block_runs(blocks):
        pwrite_all(fd, first * block_bytes, view[pos : pos + n * block_bytes])
        pos += n * block_bytes


def catalog_record(traj: int, blocks: Sequence[int]) -> bytes:
    """The catalogue record of a stored write (read back by read_catalog)."""
    record: bytes = msgpack.packb([traj, block_runs(blocks)])
    return record

"""The storage protocol's server side, pure: its error codes and the checks that turn a request
frame into a bounded request (services/wire/frames.py holds the messages). No I/O; the server is
services/storage.py, its files services/storage_files.py."""

from __future__ import annotations

from dualpath.errors import DualPathError
from services.blocks import per_frame
from services.codec import Frame
from services.kvblocks import SliceSet
from services.wire.frames import (
    BadMessage,
    FrameKind,
    M,
    SeedRequest,
    WriteRequest,
    parse,
)

READ_CHUNK_BYTES = 2 << 20
"""Target payload of one `blocks` frame (whole blocks, so at least one block)."""
MAX_SEED_BLOCKS = 1 << 20


# -- errors: each maps to one protocol error code --------------------------------------------


class StorageError(DualPathError):
    """A request failed; `code` is the protocol error code sent back to the client."""

    code = "storage"


class BadRequest(StorageError):
    code = "bad_request"


class UnsupportedMessage(StorageError):
    code = "unsupported"


class MissingBlocks(StorageError):
    code = "missing"


class StorageIOError(StorageError):
    code = "io"


class ServerClosing(StorageError):
    code = "closing"


class Unauthorized(StorageError):
    code = "unauthorized"


MUTATING_KINDS = frozenset({FrameKind.WRITE, FrameKind.SEED})
"""Requests that change what a server stores: each must present the lab's secret
(services.auth.FRAME_AUTH_FIELD); reads, stats and health need none."""


# -- requests -----------------------------------------------------------------------------


def parse_request(frame: Frame, cls: type[M]) -> M:
    """The request `frame` carries (services/wire/frames.py); BadRequest names a bad field."""
    try:
        return parse(frame, cls)
    except BadMessage as exc:
        raise BadRequest(str(exc)) from None


def write_slices(req: WriteRequest, *, layer_groups: int, max_slices: int) -> SliceSet:
    """The whole blocks a write carries (all layer groups), bounded; BadRequest if not."""
    try:
        slices = req.slices(layer_groups=layer_groups, max_slices=max_slices)
    except BadMessage as exc:
        raise BadRequest(str(exc)) from None
    if (slices.g0, slices.g1) != (0, layer_groups):
        raise BadRequest(
            f"groups [{slices.g0}, {slices.g1}): writes carry whole blocks, "
            f"all {layer_groups} groups"
        )
    return slices


def seed_range(req: SeedRequest) -> range:
    """The blocks a seed asks for: at most MAX_SEED_BLOCKS, in order; BadRequest if not."""
    first, end = req.first_block, req.end_block
    if end < first or end - first > MAX_SEED_BLOCKS:
        raise BadRequest(f"seed range [{first}, {end}) is empty-reversed or over {MAX_SEED_BLOCKS}")
    return range(first, end)


def read_chunk_blocks(block_bytes: int) -> int:
    """Whole blocks per `blocks` frame of a read: READ_CHUNK_BYTES of them, at least one."""
    return per_frame(READ_CHUNK_BYTES, block_bytes)

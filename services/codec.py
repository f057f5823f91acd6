"""Sans-I/O frame codec of the lab's data plane: bytes in, frames out; no sockets.

A frame is a 12-byte prefix (magic, version, kind-agnostic lengths), a msgpack header (a map
with a string "t" naming the message) and raw payload bytes; the typed message each kind carries
is services/wire/frames.py's, this layer moves any kind. Every length is bounded so a
malformed or hostile peer costs at most one error frame and a closed connection. Payloads are
never copied on the way out (encode() hands them back as they are) and are written in place on
the way in (FrameReceiver hands out the buffer the next bytes belong in).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgpack

from dualpath.errors import DualPathError
from services.buffers import POOL

MAGIC = b"DP"
VERSION = 1
PREFIX = struct.Struct("!2sBxII")  # magic, version, pad, header_len, payload_len
PREFIX_SIZE = PREFIX.size
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_HEADER_ITEMS = 1 << 16
"""Longest array, largest map, str or bin in a decoded header unless a port says otherwise:
msgpack's own bounds grow with the buffer, so that 1 MiB of empty arrays unpacked to ~64 MB."""
DEFAULT_MAX_PAYLOAD_BYTES = 64 << 20
MAX_WIRE_PAYLOAD_BYTES = 0xFFFF_FFFF  # payload_len is a u32 on the wire
SCRATCH_BYTES = 64 << 10

Payload: TypeAlias = bytes | bytearray | memoryview
"""What a frame carries: anything bytes-like and contiguous; never copied by the codec."""


class FrameError(DualPathError):
    """The peer sent bytes that are not a valid frame; the connection must be closed.

    `frames` holds the whole, valid frames that came before the garbage in the same buffer
    (FrameReceiver.buffer_updated): they arrived in order and should be handled first.
    """

    def __init__(self, message: str, *, frames: list[Frame] | None = None) -> None:
        super().__init__(message)
        self.frames: list[Frame] = frames if frames is not None else []


class OversizeFrame(FrameError):
    """A prefix announced a header or payload longer than the receiver takes."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: str
    header: dict[str, Any] = field(default_factory=dict)
    payload: Payload = b""


def encode_prefix(header_len: int, payload_len: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, header_len, payload_len)


def _byte_view(payload: Payload) -> Payload:
    """`payload` itself, or for a memoryview of wider items a flat byte view of it (no copy).
    A non-contiguous memoryview has no single buffer to send: ValueError."""
    if isinstance(payload, memoryview):
        if not payload.c_contiguous:
            raise ValueError("a memoryview payload must be C-contiguous")
        if payload.ndim != 1 or payload.itemsize != 1:
            return payload.cast("B")
    return payload


def encode(frame: Frame) -> list[Payload]:
    """Encode as a list of buffers (prefix+header, payload) so payloads are never copied."""
    head = dict(frame.header)
    head["t"] = frame.kind
    packed = msgpack.packb(head, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}")
    payload = _byte_view(frame.payload)
    if len(payload) > MAX_WIRE_PAYLOAD_BYTES:
        raise FrameError(f"payload of {len(payload)} bytes exceeds {MAX_WIRE_PAYLOAD_BYTES}")
    parts: list[Payload] = [encode_prefix(len(packed), len(payload)) + packed]
    if payload:
        parts.append(payload)
    return parts


def encode_bytes(frame: Frame) -> bytes:
    return b"".join(encode(frame))


def _check_prefix(
    magic: bytes,
    version: int,
    header_len: int,
    payload_len: int,
    max_payload_bytes: int,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> None:
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (expected {VERSION})")
    if header_len == 0:
        raise FrameError(f"header length 0 outside 1..{max_header_bytes}")
    if header_len > max_header_bytes:
        raise OversizeFrame(f"header length {header_len} outside 1..{max_header_bytes}")
    if payload_len > max_payload_bytes:
        raise OversizeFrame(f"payload length {payload_len} exceeds limit {max_payload_bytes}")


def parse_prefix(
    prefix: bytes | bytearray | memoryview, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[int, int]:
    """Validate a 12-byte prefix and return (header_len, payload_len)."""
    if len(prefix) != PREFIX_SIZE:
        raise FrameError(f"short frame prefix ({len(prefix)} of {PREFIX_SIZE} bytes)")
    magic, version, header_len, payload_len = PREFIX.unpack(prefix)
    _check_prefix(magic, version, header_len, payload_len, max_payload_bytes)
    return header_len, payload_len


def decode_header(
    raw: bytes | bytearray | memoryview, *, max_items: int = DEFAULT_MAX_HEADER_ITEMS
) -> tuple[str, dict[str, Any]]:
    """Decode a msgpack header map. Its values are new objects: nothing refers to `raw`.
    No array or map in it may hold more than `max_items` elements (str and bin cost only their
    own bytes, bounded by the header's length)."""
    try:
        head = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_array_len=max_items,
            max_map_len=max_items,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(head, dict):
        raise FrameError(f"header must be a map, got {type(head).__name__}")
    kind = head.pop("t", None)
    if not isinstance(kind, str) or not kind:
        raise FrameError("header has no message type 't'")
    return kind, head


class FrameReceiver:
    """Incremental receiver that fills each payload in place (asyncio.BufferedProtocol style).

    Loop: `buf = rx.get_buffer()`, write up to len(buf) bytes of the stream into `buf`, then
    `frames = rx.buffer_updated(nbytes)`. Prefixes and headers go into a small scratch buffer;
    each payload goes into its own fresh `bytearray(payload_len)`, which the returned Frame
    carries: one copy (kernel -> payload) for the bytes that land there directly.

    Read sizing (why get_buffer hands out what it does): a read into the scratch buffer may
    also take the start of a payload, which then costs one more copy. For small frames that is
    the cheap way to take many frames per read. When frames are large (the previous payload
    was >= scratch_bytes/4) the scratch is offered only for the prefix and the header the
    previous frame had, and then exactly for the rest of the header, so a large payload lands
    entirely in its own buffer at the price of one or two small reads.

    buffer_updated raises FrameError on garbage with the messages of parse_prefix and
    decode_header, as soon as the prefix (or the header) is complete; the whole frames that
    preceded the garbage in the same buffer are in the error's `frames`. After an error the
    receiver stays failed: get_buffer gives a scratch area to discard into and buffer_updated
    raises again (with no frames).
    """

    def __init__(
        self,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        scratch_bytes: int = SCRATCH_BYTES,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_header_items: int = DEFAULT_MAX_HEADER_ITEMS,
    ) -> None:
        if not 0 <= max_payload_bytes <= MAX_WIRE_PAYLOAD_BYTES:
            raise ValueError(
                f"max_payload_bytes must be in 0..{MAX_WIRE_PAYLOAD_BYTES}, got {max_payload_bytes}"
            )
        if scratch_bytes < 4 * PREFIX_SIZE:
            raise ValueError(f"scratch_bytes must be >= {4 * PREFIX_SIZE}, got {scratch_bytes}")
        if not 1 <= max_header_bytes <= MAX_HEADER_BYTES:
            raise ValueError(
                f"max_header_bytes must be in 1..{MAX_HEADER_BYTES}, got {max_header_bytes}"
            )
        self._max_header = max_header_bytes
        self._max_items = max(1, max_header_items)
        self._max_payload = max_payload_bytes
        self._scratch_bytes = scratch_bytes
        self._large_payload = scratch_bytes // 4
        self._buf = bytearray(scratch_bytes)
        self._view = memoryview(self._buf)
        self._start = 0  # unparsed scratch bytes are _buf[_start:_end]
        self._end = 0
        self._offered = 0  # length of the last buffer handed out
        # The frame being received: header_len/payload_len once its prefix is parsed (else -1).
        self._hlen = -1
        self._plen = -1
        self._head_bytes = 0  # prefix and header bytes of it already consumed from scratch
        self._kind = ""
        self._header: dict[str, Any] = {}
        self._payload: bytearray | memoryview | None = None  # set while the payload is being filled
        self._filled = 0
        # Sizing hints taken from the previous frame.
        self._expect_large = False
        self._last_hlen = 0
        self._error: FrameError | None = None
        self.last_frame_bytes: list[int] = []
        """Wire sizes (prefix + header + payload) of the frames the last buffer_updated
        returned (or carried in its FrameError), in the same order."""

    @property
    def max_payload_bytes(self) -> int:
        return self._max_payload

    @property
    def buffered_bytes(self) -> int:
        """Bytes received that are not yet part of a returned frame (an unfinished frame,
        possibly followed by the start of the next ones); 0 at a frame boundary."""
        return self._head_bytes + (self._end - self._start) + self._filled

    @property
    def failed(self) -> bool:
        return self._error is not None

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes of the stream go; never empty. `sizehint` (the loop's
        suggestion) is ignored: the receiver knows how much the current frame still needs."""
        if self._payload is not None and self._error is None:
            view = memoryview(self._payload)[self._filled :]
        elif self._error is not None:
            view = self._view  # failed: whatever comes is discarded
        else:
            avail = self._end - self._start
            if self._hlen < 0:
                need = PREFIX_SIZE - avail
                exact = self._expect_large
                if exact:
                    need += self._last_hlen
            else:
                need = self._hlen - avail
                exact = self._plen >= self._large_payload
            need = max(need, 1)
            if exact:
                self._make_room(need)
                view = self._view[self._end : self._end + need]
            else:
                self._make_room(max(need, self._scratch_bytes // 4))
                view = self._view[self._end :]
        self._offered = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Account for `nbytes` written at the start of the last buffer; return whole frames."""
        if not 0 <= nbytes <= self._offered:
            raise ValueError(f"nbytes {nbytes} outside 0..{self._offered} (the buffer handed out)")
        self._offered = 0
        self.last_frame_bytes = []
        if self._error is not None:
            raise FrameError(str(self._error))
        if self._payload is not None:
            self._filled += nbytes
            if self._filled < len(self._payload):
                return []
            return [self._finish(self._payload)]
        self._end += nbytes
        frames: list[Frame] = []
        try:
            self._parse(frames)
        except FrameError as exc:
            self._error = exc
            exc.frames = frames
            raise
        finally:
            if self._start == self._end:
                self._start = self._end = 0
                if len(self._buf) != self._scratch_bytes:  # a big header made it grow
                    self._buf = bytearray(self._scratch_bytes)
                    self._view = memoryview(self._buf)
        return frames

    def _parse(self, frames: list[Frame]) -> None:
        view = self._view
        while True:
            if self._hlen < 0:
                if self._end - self._start < PREFIX_SIZE:
                    return
                magic, version, hlen, plen = PREFIX.unpack_from(self._buf, self._start)
                _check_prefix(magic, version, hlen, plen, self._max_payload, self._max_header)
                self._start += PREFIX_SIZE
                self._head_bytes = PREFIX_SIZE
                self._hlen, self._plen = hlen, plen
            if self._end - self._start < self._hlen:
                return
            hend = self._start + self._hlen
            self._kind, self._header = decode_header(
                view[self._start : hend], max_items=self._max_items
            )
            self._start = hend
            self._head_bytes += self._hlen
            if self._plen == 0:
                frames.append(self._finish(b""))
                continue
            payload = POOL.get(self._plen)
            take = min(self._end - self._start, self._plen)
            if take:
                payload[:take] = view[self._start : self._start + take]
                self._start += take
            if take == self._plen:
                frames.append(self._finish(payload))
                continue
            self._payload = payload  # the scratch is empty now: the payload gets the reads
            self._filled = take
            return

    def _finish(self, payload: Payload) -> Frame:
        frame = Frame(self._kind, self._header, payload)
        self.last_frame_bytes.append(PREFIX_SIZE + self._hlen + self._plen)
        self._expect_large = self._plen >= self._large_payload
        self._last_hlen = self._hlen
        self._hlen = self._plen = -1
        self._head_bytes = 0
        self._kind, self._header = "", {}
        self._payload = None
        self._filled = 0
        return frame

    def _make_room(self, need: int) -> None:
        """At least `need` free bytes after _end: compact the scratch, or grow it for a header
        larger than it (shrunk back once empty)."""
        if len(self._buf) - self._end >= need:
            return
        avail = self._end - self._start
        size = max(self._scratch_bytes, avail + need)
        if size == len(self._buf):
            self._view[:avail] = self._view[self._start : self._end]  # overlap-safe
        else:
            new = bytearray(size)
            new[:avail] = self._view[self._start : self._end]
            self._buf, self._view = new, memoryview(new)
        self._start, self._end = 0, avail


class FrameDecoder:
    """Feed-style decoder over FrameReceiver: feed() bytes, get complete frames. Raises
    FrameError on garbage. Copies what it is fed; the transport uses FrameReceiver directly."""

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self._rx = FrameReceiver(max_payload_bytes=max_payload_bytes)

    def feed(self, data: Payload) -> list[Frame]:
        src = memoryview(_byte_view(data))
        frames: list[Frame] = []
        pos = 0
        while pos < len(src):
            buf = self._rx.get_buffer(len(src) - pos)
            n = min(len(buf), len(src) - pos)
            buf[:n] = src[pos : pos + n]
            pos += n
            try:
                frames += self._rx.buffer_updated(n)
            except FrameError as exc:
                exc.frames = frames + exc.frames
                raise
        return frames

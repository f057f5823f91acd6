"""Sans-I/O frame codec of the lab's data plane: bytes in, frames out; no sockets.

A frame is a 12-byte prefix (magic, version, kind-agnostic lengths), a msgpack header (a map
with a string "t" naming the message) and raw payload bytes. Every length is bounded so a
malformed or hostile peer costs at most one error frame and a closed connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

MAGIC = b"DP"
VERSION = 1
PREFIX = struct.Struct("!2sBxII")  # magic, version, pad, header_len, payload_len
PREFIX_SIZE = PREFIX.size
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 64 << 20


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: str
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


def encode_prefix(header_len: int, payload_len: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, header_len, payload_len)


def encode(frame: Frame) -> list[bytes]:
    """Encode as a list of buffers (prefix+header, payload) so payloads are never copied."""
    head = dict(frame.header)
    head["t"] = frame.kind
    packed = msgpack.packb(head, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}")
    parts = [encode_prefix(len(packed), len(frame.payload)) + packed]
    if frame.payload:
        parts.append(frame.payload)
    return parts


def encode_bytes(frame: Frame) -> bytes:
    return b"".join(encode(frame))


def parse_prefix(
    prefix: bytes, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[int, int]:
    """Validate a 12-byte prefix and return (header_len, payload_len)."""
    if len(prefix) != PREFIX_SIZE:
        raise FrameError(f"short frame prefix ({len(prefix)} of {PREFIX_SIZE} bytes)")
    magic, version, header_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (expected {VERSION})")
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise FrameError(f"header length {header_len} outside 1..{MAX_HEADER_BYTES}")
    if payload_len > max_payload_bytes:
        raise FrameError(f"payload length {payload_len} exceeds limit {max_payload_bytes}")
    return header_len, payload_len


def decode_header(raw: bytes) -> tuple[str, dict[str, Any]]:
    try:
        head = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(head, dict):
        raise FrameError(f"header must be a map, got {type(head).__name__}")
    kind = head.pop("t", None)
    if not isinstance(kind, str) or not kind:
        raise FrameError("header has no message type 't'")
    return kind, head


class FrameDecoder:
    """Incremental decoder: feed() bytes, get complete frames. Raises FrameError on garbage."""

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload_bytes

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= PREFIX_SIZE:
            hlen, plen = parse_prefix(
                bytes(self._buf[:PREFIX_SIZE]), max_payload_bytes=self._max_payload
            )
            total = PREFIX_SIZE + hlen + plen
            if len(self._buf) < total:
                break
            kind, head = decode_header(bytes(self._buf[PREFIX_SIZE : PREFIX_SIZE + hlen]))
            payload = bytes(self._buf[PREFIX_SIZE + hlen : total])
            del self._buf[:total]
            frames.append(Frame(kind, head, payload))
        return frames


def error_frame(code: str, message: str, *, req: Any = None) -> Frame:
    header: dict[str, Any] = {"code": code, "message": message}
    if req is not None:
        header["req"] = req
    return Frame("error", header)

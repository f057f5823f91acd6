"""The channel between an engine node's two processes: its timeline and its data plane.

Messages are the cores' own action dataclasses (services.timeline → data plane, dataplane_core →
timeline) plus a few of the shells' (status, events, health), as msgpack maps tagged with the
class name, each behind a 4-byte length on a Unix socket pair. Only this module knows the
encoding; a message of an unknown kind or with bad fields raises IpcError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dualpath.errors import DualPathError
from services.assignment import AssignmentError, TurnAssignment
from services.dataplane_core import Failed, GroupReady, KvComplete, Persisted, Released
from services.timeline import AssignKv, DropKv, Persist, PrefillDone, SendGroup

_LEN = struct.Struct("!I")
MAX_MESSAGE_BYTES = 256 << 20


class IpcError(DualPathError):
    """A malformed message between a node's timeline and data plane."""


@dataclass(frozen=True, slots=True)
class DpStatus:
    """Data plane → timeline: what the scheduler report needs from the data plane."""

    read_q_tokens: int
    dram_used_bytes: int
    counters: dict[str, int] = field(default_factory=dict)
    last_errors: list[str] = field(default_factory=list)
    last_transient_errors: list[str] = field(default_factory=list)
    ledger: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DpEvent:
    """Data plane → timeline: a turn event to forward to the scheduler (e.g. read_started)."""

    turn_id: str
    kind: str
    at: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HealthRequest:
    req: int


@dataclass(frozen=True, slots=True)
class HealthReport:
    req: int
    snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Stop:
    """Timeline → data plane: finish and exit."""


Message = (
    AssignKv
    | SendGroup
    | PrefillDone
    | Persist
    | DropKv
    | GroupReady
    | KvComplete
    | Released
    | Persisted
    | Failed
    | DpStatus
    | DpEvent
    | HealthRequest
    | HealthReport
    | Stop
)

_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        AssignKv,
        SendGroup,
        PrefillDone,
        Persist,
        DropKv,
        GroupReady,
        KvComplete,
        Released,
        Persisted,
        Failed,
        DpStatus,
        DpEvent,
        HealthRequest,
        HealthReport,
        Stop,
    )
}


def encode(msg: Message) -> bytes:
    if isinstance(msg, AssignKv):
        body: dict[str, Any] = {"assignment": msg.assignment.to_wire()}
    else:
        body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    body["k"] = type(msg).__name__
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return _LEN.pack(len(data)) + data


def decode(data: bytes) -> Message:
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise IpcError(f"not msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise IpcError("message is not a map")
    kind = body.pop("k", None)
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise IpcError(f"unknown message kind {kind!r} (have: {sorted(_TYPES)})")
    try:
        if cls is AssignKv:
            return AssignKv(TurnAssignment.from_wire(body["assignment"]))
        msg: Message = cls(**body)
    except (TypeError, KeyError, AssignmentError) as exc:
        raise IpcError(f"{kind}: {exc}") from exc
    return msg


class IpcChannel:
    """One end of the socket pair: send() queues a message, recv() returns the next one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: list[bytes] = []

    @classmethod
    async def open(cls, sock: socket.socket) -> IpcChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def send(self, msg: Message) -> None:
        """Queue without waiting: the messages are small and the peer always reads. The
        messages of one event-loop iteration leave in one write (one system call)."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(encode(msg))

    def _flush(self) -> None:
        data, self._pending = self._pending, []
        if data and not self._writer.is_closing():
            self._writer.write(b"".join(data))

    async def drain(self) -> None:
        self._flush()
        await self._writer.drain()

    async def recv(self) -> Message:
        """The next message; asyncio.IncompleteReadError when the other process is gone."""
        (n,) = _LEN.unpack(await self._reader.readexactly(_LEN.size))
        if n > MAX_MESSAGE_BYTES:
            raise IpcError(f"message of {n} bytes exceeds {MAX_MESSAGE_BYTES}")
        return decode(await self._reader.readexactly(n))

    async def close(self) -> None:
        self._flush()
        self._writer.close()
        try:
            async with asyncio.timeout(2.0):
                await self._writer.wait_closed()
        except (TimeoutError, OSError):
            pass

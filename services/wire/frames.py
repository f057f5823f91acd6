"""The typed messages of the data plane's frames: one msgspec Struct per frame kind.

A frame's header (services/codec.py: a msgpack map, `t` naming its kind) is the fields of one
message below; `to_frame` makes the frame of a message, `parse` validates a received frame's
header against the message its receiver expects (types, u32 bounds, required fields) and turns
anything else into `BadMessage`, which names the field: each port maps it to its own typed
error (storage: `bad_request`; data plane: a corrupt frame). Pure: no sockets, no payload bytes.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, TypeVar

import msgspec

from dualpath.errors import DualPathError
from services.auth import FRAME_AUTH_FIELD
from services.blocks import block_runs, run_blocks
from services.codec import Frame, Payload
from services.kvblocks import SliceSet

U32_MAX: Final = (1 << 32) - 1
"""Trajectory and block ids are stamped as u32 into the KV bytes; crcs are u32."""
MAX_CLIENT_ID = 128

U32 = Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Req = int | str | None
"""A request id the client picks; echoed in the reply (not a bool)."""


class FrameKind(StrEnum):
    """Every frame kind the lab's ports speak (the header's `t`)."""

    # storage data port
    READ = "read"
    BLOCKS = "blocks"
    READ_DONE = "read_done"
    WRITE = "write"
    WRITE_DONE = "write_done"
    # storage mgmt port (stats also on an engine's mgmt port)
    SEED = "seed"
    SEED_DONE = "seed_done"
    STATS = "stats"
    HEALTH = "health"
    # engine data planes (KV port)
    KV = "kv"
    RELAY = "relay"
    RELAY_GROUP_DONE = "relay_group_done"
    KV_DONE = "kv_done"
    TURN_FAILED = "turn_failed"
    # engine timelines (collective port)
    COLLECTIVE = "collective"
    COLLECTIVE_ACK = "collective_ack"
    # any port
    ERROR = "error"


class BadMessage(DualPathError, ValueError):
    """A frame's header is not the message its kind must carry; the text names the field."""


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of the frame messages: `KIND` is the frame kind that carries it."""

    KIND: ClassVar[FrameKind]


M = TypeVar("M", bound=Message)
MAX_EXPLAIN_CHARS = 200
"""A BadMessage quotes at most this much of what the peer sent (its kind, a bad value)."""

_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")


def _explain(kind: str, exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int` >= 0 - at `$.runs[0][1]`" as "... field 'runs[0][1]': ..."."""
    text = str(exc)
    what, at, where = text.rpartition(" - at `$")
    path = where[:-1].lstrip(".") if at and where.endswith("`") else None
    if path is None:
        what = text
    missing = _MISSING.match(what)
    if missing:
        name = missing.group("name")
        path = f"{path}.{name}" if path else name
        what = "missing"
    what, path = what[:MAX_EXPLAIN_CHARS], path and path[:MAX_EXPLAIN_CHARS]
    return f"{kind} frame field {path!r}: {what}" if path else f"{kind} frame: {what}"


def parse(frame: Frame, cls: type[M]) -> M:
    """The message of `cls` that `frame` carries; BadMessage when its kind or fields are not.
    Fields the message does not know are ignored (a newer peer may add some)."""
    if frame.kind != cls.KIND:
        raise BadMessage(f"expected a {cls.KIND} frame, got {frame.kind[:MAX_EXPLAIN_CHARS]!r}")
    try:
        return msgspec.convert(frame.header, cls)
    except msgspec.ValidationError as exc:
        raise BadMessage(_explain(frame.kind, exc)) from None


_AS_IS = (bytes, bytearray, memoryview)
"""Kept as they are in a header (msgpack bin), not turned into base64 text."""


def to_frame(msg: Message, payload: Payload = b"") -> Frame:
    """The frame carrying `msg` (and `payload`, which is not copied)."""
    header: dict[str, Any] = msgspec.to_builtins(msg, builtin_types=_AS_IS)
    return Frame(str(msg.KIND), header, payload)  # a plain str, as decoded frames have


# -- slice sets on the wire -------------------------------------------------------------------


class SliceFields(Message, frozen=True, kw_only=True):
    """The slices a KV payload holds (kvblocks.SliceSet: `runs` of block ids, layer groups
    [g0, g1)) and one CRC-32C of the whole payload."""

    traj: U32
    runs: list[tuple[U32, U32]]
    g0: Count
    g1: Count
    crc: U32

    def slices(self, *, layer_groups: int, max_slices: int) -> SliceSet:
        """The slice set, bounded by the receiver: groups within `layer_groups`, at most
        `max_slices` slices, no block id past the last u32; BadMessage names the field."""
        g0, g1 = self.g0, self.g1
        if g0 >= layer_groups:
            raise BadMessage(f"{self.KIND} frame field 'g0': {g0} not in [0, {layer_groups})")
        if not g0 < g1 <= layer_groups:
            raise BadMessage(f"{self.KIND} frame field 'g1': {g1} not in ({g0}, {layer_groups}]")
        width = g1 - g0
        num_blocks = 0
        for i, (first, count) in enumerate(self.runs):
            if count > U32_MAX + 1 - first:
                raise BadMessage(
                    f"{self.KIND} frame field 'runs[{i}][1]': {count} blocks from {first} "
                    "run past the last u32 block id"
                )
            num_blocks += count
            if num_blocks * width > max_slices:
                raise BadMessage(
                    f"{self.KIND} frame field 'runs[{i}][1]' brings the frame to "
                    f"{num_blocks * width} slices, over the limit of {max_slices}"
                )
        return SliceSet(self.traj, run_blocks(self.runs), g0, g1)


def slice_fields(s: SliceSet) -> dict[str, Any]:
    """The SliceFields of `s` but its crc, as header fields: {"traj", "runs", "g0", "g1"}."""
    return {"traj": s.traj, "runs": block_runs(s.blocks), "g0": s.g0, "g1": s.g1}


# -- storage data port --------------------------------------------------------------------------


class ReadRequest(Message, frozen=True, kw_only=True):
    """Read whole blocks of one trajectory; answered by BlocksChunk frames, then ReadDone."""

    KIND = FrameKind.READ
    req: Req = None
    traj: U32
    blocks: tuple[U32, ...]
    client: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CLIENT_ID)] = "?"
    """Who reads (`node@boot`), for the per-client byte accounting; `?` when not given."""


class BlocksChunk(SliceFields, frozen=True, kw_only=True):
    """Whole blocks of a read, in request order, as read back from disk (the payload)."""

    KIND = FrameKind.BLOCKS
    req: Req = None

    @classmethod
    def of(cls, req: Req, s: SliceSet, crc: int) -> BlocksChunk:
        return cls(req=req, crc=crc, **slice_fields(s))


class BlocksDone(Message, frozen=True, kw_only=True):
    """A request that moved whole blocks ended: how many, and their bytes."""

    req: Req = None
    num_blocks: Count
    num_bytes: Count


class ReadDone(BlocksDone, frozen=True, kw_only=True):
    """The last frame of a read, after its BlocksChunks."""

    KIND = FrameKind.READ_DONE


class WriteRequest(SliceFields, frozen=True, kw_only=True):
    """Persist whole blocks (the payload); it must present the lab's secret (`auth`)."""

    KIND = FrameKind.WRITE
    req: Req = None
    auth: str | None = msgspec.field(default=None, name=FRAME_AUTH_FIELD)
    """The lab's secret."""

    @classmethod
    def of(cls, req: Req, s: SliceSet, crc: int, *, auth: str) -> WriteRequest:
        return cls(req=req, crc=crc, auth=auth, **slice_fields(s))


class WriteDone(Message, frozen=True, kw_only=True):
    KIND = FrameKind.WRITE_DONE
    req: Req = None
    num_bytes: Count


# -- storage mgmt port --------------------------------------------------------------------------


class SeedRequest(Message, frozen=True, kw_only=True):
    """Have the server write deterministic blocks [first_block, end_block) itself."""

    KIND = FrameKind.SEED
    req: Req = None
    traj: U32
    first_block: U32
    end_block: Annotated[int, msgspec.Meta(ge=0, le=U32_MAX + 1)]
    auth: str | None = msgspec.field(default=None, name=FRAME_AUTH_FIELD)
    """The lab's secret."""


class SeedDone(BlocksDone, frozen=True, kw_only=True):
    KIND = FrameKind.SEED_DONE


class StatsRequest(Message, frozen=True, kw_only=True):
    """Ask a storage server (or an engine's mgmt port) for its counters."""

    KIND = FrameKind.STATS
    req: Req = None


class StorageStats(Message, frozen=True, kw_only=True):
    """A storage server's answer to StatsRequest."""

    KIND = FrameKind.STATS
    req: Req = None
    boot: str = ""
    """This server process's incarnation: a restarted server has a new one."""
    read_queue_blocks: Count
    read_queue_bytes: Count
    bytes_read: Count
    bytes_written: Count
    num_blocks_stored: Count
    num_errors: Count
    read_by: dict[str, int] = {}
    """Bytes sent by reads, per client incarnation (the read request's `client`)."""
    transport: dict[str, int] = {}
    """Per listening port (`kv_`, `mgmt_`): live connections and what its limits refused or
    cut off (transport.SERVER_COUNTERS), e.g. `kv_refused`, `mgmt_timed_out`."""


class Health(Message, frozen=True, kw_only=True):
    """A health request, and its reply: the reply's payload is the server's HealthMonitor
    snapshot, msgpack-encoded (its series can outgrow the header limit)."""

    KIND = FrameKind.HEALTH
    req: Req = None


# -- engine data planes -------------------------------------------------------------------------


class KvSlices(SliceFields, frozen=True, kw_only=True):
    """Prefill -> decode: one layer group of a turn's KV (hit KV and new tokens' KV)."""

    KIND = FrameKind.KV
    turn: str
    src: str = "?"
    """The sender's incarnation (`node@boot`), for the per-peer byte accounting."""

    @classmethod
    def of(cls, turn: str, src: str, s: SliceSet, crc: int) -> KvSlices:
        return cls(turn=turn, src=src, crc=crc, **slice_fields(s))


class RelaySlices(KvSlices, frozen=True, kw_only=True):
    """Decode -> prefill: one layer group of the hit KV the decode node read (DE read path)."""

    KIND = FrameKind.RELAY


class RelayGroupDone(Message, frozen=True, kw_only=True):
    """Every relay frame of layer group `group` was sent."""

    KIND = FrameKind.RELAY_GROUP_DONE
    turn: str
    group: int


class KvDone(Message, frozen=True, kw_only=True):
    """Every kv frame of the turn was sent."""

    KIND = FrameKind.KV_DONE
    turn: str


class TurnFailed(Message, frozen=True, kw_only=True):
    """The turn failed on the sender: the receiver stops waiting for it."""

    KIND = FrameKind.TURN_FAILED
    turn: str
    reason: str = ""


# -- engine timelines ---------------------------------------------------------------------------


class CollectiveBurst(Message, frozen=True, kw_only=True):
    """One collective burst (the payload) between same-role engine nodes."""

    KIND = FrameKind.COLLECTIVE


class CollectiveAck(Message, frozen=True, kw_only=True):
    KIND = FrameKind.COLLECTIVE_ACK
    n: Count
    """Payload bytes of the burst it acknowledges."""


# -- any port -----------------------------------------------------------------------------------


class ErrorReply(Message, frozen=True, kw_only=True):
    """A request failed (`code` names why; each port has its own codes) or a frame was
    malformed (`malformed`, and the connection closes). `req` echoes the request's, as sent."""

    KIND = FrameKind.ERROR
    code: str
    message: str
    req: Any = None


def error_frame(code: str, message: str, *, req: Any = None) -> Frame:
    return to_frame(ErrorReply(code=code, message=message, req=req))

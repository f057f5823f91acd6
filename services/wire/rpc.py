"""Typed messages between the scheduler and its peers: the engines' Fetch/Pull and Report
RPCs (msgpack over gRPC) and the turn a client submits over HTTP (JSON).

Each message is a msgspec Struct whose field names and shapes are the wire format (maps, and
arrays for the positional rows: engine loads, events, cancellations). `decode_as` turns a
decoded msgpack or JSON value into its message or raises `MessageError` naming the message and
the field; nothing is half-taken. Pure: no I/O, no state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec

from dualpath.errors import DualPathError
from services.assignment import TurnAssignment
from services.limits import GRPC_LIMITS, unpack_bounded

SERVICE = "dualpath.Scheduler"
"""The gRPC service name; methods `Fetch`, `Pull` (Fetch as a stream) and `Report`."""

MAX_CONTEXT_TOKENS = 10_000_000
"""Bound of a submitted turn's prompt (context + append tokens)."""
U32_MAX = (1 << 32) - 1
"""Bound of a submitted turn's integers: trajectory ids are stamped as u32 into the KV bytes
(services/kvblocks.py), and an assignment must fit msgpack's integers on its way to the engines."""
I64_MAX = (1 << 63) - 1

Count = Annotated[int, msgspec.Meta(ge=0, le=I64_MAX)]
Signed = Annotated[int, msgspec.Meta(ge=-I64_MAX - 1, le=I64_MAX)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
Positive32 = Annotated[int, msgspec.Meta(ge=1, le=U32_MAX)]
BlockKey = Annotated[int, msgspec.Meta(ge=0, le=I64_MAX)]
"""A content-addressed block's key: 63 bits (msgpack and msgspec bound integers to int64)."""
Name = Annotated[str, msgspec.Meta(min_length=1)]

EVENT_FIELDS = frozenset({"event", "turn_id", "at"})
"""Keys of a turn event the scheduler sets itself; a reported event's extra may not hold them."""


class MessageError(DualPathError, ValueError):
    """A message that is not what its type says; the text names the message and the field."""


M = TypeVar("M", bound=msgspec.Struct)


def decode_as(value: Any, kind: type[M]) -> M:
    """`value` (decoded msgpack or JSON) as message `kind`, or MessageError."""
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise MessageError(f"{kind.__name__}: {exc}") from None


def require_json(what: str, value: Any) -> None:
    """A value the scheduler serves as JSON (counters, event fields) must be JSON data:
    bytes anywhere in it would break /v1/cluster or a client's event stream later."""
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not JSON data: {exc}") from None


# -- Fetch / Pull ---------------------------------------------------------------------------


class EngineLoadReport(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One engine's load as its leader reports it, `[engine, seq, tok, free]` (DualPath §6)."""

    engine: Count
    seq: Count
    """Unfinished requests on the engine (`seq_e`)."""
    tok: Count
    """Their tokens (`tok_e`)."""
    free_kv_tokens: Signed
    """GPU KV memory still free, in tokens (decode engines; negative when overcommitted)."""


class FetchRequest(msgspec.Struct, frozen=True):
    """A leader's pull: its node's loads, the turns it holds and its counters."""

    node_id: str
    role: str
    read_q_tokens: Count
    engines: tuple[EngineLoadReport, ...]
    boot: str = ""
    """Identifies one run of the node's process; a new value means it restarted."""
    turns: tuple[str, ...] = ()
    counters: dict[str, Any] = {}

    def __post_init__(self) -> None:
        require_json("counters", self.counters)


class ReadRanges(msgspec.Struct, frozen=True):
    """Hit blocks [first, end) each side of a turn reads from storage (empty: first == end)."""

    prefill: tuple[Count, Count]
    decode: tuple[Count, Count]


class AssignedTurn(msgspec.Struct, frozen=True):
    """A turn as the scheduler placed it, sent to both of its nodes."""

    turn_id: Name
    traj_id: Count
    turn_index: Count
    context_tokens: Count
    prompt_tokens: Count
    gen_tokens: Count
    hit_blocks: Count
    prompt_blocks: Count
    persist_end_block: Count
    prefill_node: Name
    prefill_engine: Count
    decode_node: Name
    decode_engine: Count
    read_side: Name
    reads: ReadRanges
    stream_tokens: bool = False
    """Report every generated token (`token` events) for a client that streams them."""
    sources: tuple[tuple[U32, Count, Count], ...] = ()
    """Where hit blocks persisted by other requests live: (trajectory, first, end) runs
    tiling [0, hit_blocks); empty when they are all the turn's own (TurnAssignment.sources)."""

    def turn_assignment(self) -> TurnAssignment:
        """What the engine node works from. Built through `TurnAssignment.from_wire`, the one
        place that checks an assignment's blocks and ranges against each other (it also reads
        the copy the timeline hands its data plane): AssignmentError when they do not fit."""
        return TurnAssignment.from_wire(msgspec.to_builtins(self))


class Cancellation(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """A turn the node holds that failed elsewhere: drop it. `[turn_id, reason]`."""

    turn_id: str
    reason: str


class FetchReply(msgspec.Struct, frozen=True):
    assignments: tuple[AssignedTurn, ...] = ()
    cancel: tuple[Cancellation, ...] = ()


# -- Report ---------------------------------------------------------------------------------


class TurnEvent(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One event of a turn as an engine reports it, `[turn_id, kind, at, extra]`; the
    scheduler streams it to the turn's client as `{event, turn_id, at, **extra}`."""

    turn_id: str
    kind: str
    at: float
    extra: dict[str, Any]

    def __post_init__(self) -> None:
        if EVENT_FIELDS & self.extra.keys():
            raise ValueError(f"extra must be a map without {sorted(EVENT_FIELDS)}")
        require_json("extra", self.extra)


class ReportRequest(msgspec.Struct, frozen=True):
    events: tuple[TurnEvent, ...] = ()


class ReportReply(msgspec.Struct, frozen=True):
    pass


# -- HTTP: POST /v1/turns -------------------------------------------------------------------


class TurnSubmission(msgspec.Struct, frozen=True):
    """A client's turn: which trajectory, and its token counts.

    With `block_keys` the turn is a request whose prompt is content-addressed: one key per
    full block of the prompt (a block's key names it and everything before it), context 0.
    The scheduler then finds the longest prefix of the keys already persisted, by whichever
    request, and the turn reads those blocks from where they live; its own trajectory id
    only names where its new blocks go."""

    traj_id: U32
    turn_index: U32
    context_tokens: U32
    append_tokens: Positive32
    gen_tokens: Positive32
    block_keys: tuple[BlockKey, ...] = ()
    stream_tokens: bool = False
    """The client streams tokens as they come: the decode node reports each one."""

    def __post_init__(self) -> None:
        if self.context_tokens + self.append_tokens > MAX_CONTEXT_TOKENS:
            raise ValueError(f"context_tokens + append_tokens exceeds {MAX_CONTEXT_TOKENS}")
        if self.block_keys and self.context_tokens:
            raise ValueError("a turn with block_keys has context_tokens 0: its keys say the rest")

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens + self.append_tokens


# -- HTTP: GET /v1/status, GET /v1/cluster ----------------------------------------------------


class EngineStatus(msgspec.Struct, frozen=True):
    """One engine's last reported load, as /v1/status shows it: EngineLoadReport's fields as
    a map (the array form is for the pull, 100 times a second per node; this is for people)."""

    engine: int
    seq: int
    tok: int
    free_kv_tokens: int


class NodeStatus(msgspec.Struct, frozen=True):
    role: str
    age_s: float
    """Seconds since the node's last fetch."""
    read_q_tokens: int
    engines: tuple[EngineStatus, ...]


class SchedulerStatus(msgspec.Struct, frozen=True):
    """GET /v1/status: the queue, the turn table's size and outcomes, each node's loads.
    `ready` once every engine node has reported (the driver waits for it)."""

    policy: str
    queue: int
    turns: int
    done: int
    failed: int
    ready: bool
    nodes: dict[str, NodeStatus]


class NodeCounters(msgspec.Struct, frozen=True, omit_defaults=True):
    """One process's last counters in GET /v1/cluster (keyed by node, or `node@boot` for a
    process a restart replaced: `retired`)."""

    role: str
    counters: dict[str, Any]
    boot: str
    retired: bool = False


def json_body(message: msgspec.Struct | dict[str, NodeCounters]) -> Any:
    """A message as the JSON data an HTTP reply carries."""
    return msgspec.to_builtins(message)


# -- gRPC (de)serializers -------------------------------------------------------------------


class Undecodable:
    """A request that is not its message: the handler refuses it as INVALID_ARGUMENT (a
    deserializer that raised would make gRPC answer UNKNOWN, as for a crash)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def request_decoder(kind: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A gRPC request deserializer: msgpack bounded in containers as well as bytes
    (GRPC_LIMITS), then the message `kind`; anything else comes back Undecodable."""

    def decode(data: bytes) -> M | Undecodable:
        try:
            value = unpack_bounded(data, max_containers=GRPC_LIMITS.max_header_items)
        except Exception as exc:  # msgpack raises several unrelated types
            return Undecodable(f"not msgpack: {exc}")
        try:
            return decode_as(value, kind)
        except MessageError as exc:
            return Undecodable(str(exc))

    return decode


def reply_decoder(kind: type[M]) -> Callable[[bytes], M]:
    """A gRPC reply deserializer for a client (msgspec.DecodeError on a bad reply)."""
    return msgspec.msgpack.Decoder(kind).decode


def encode(message: msgspec.Struct) -> bytes:
    """A message as msgpack: the serializer of every request and reply."""
    return msgspec.msgpack.encode(message)

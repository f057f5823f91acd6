"""What one listening port allows a peer: connections, idle and frame time, header and payload
bytes, header container lengths. Pure data and arithmetic; servers apply it (transport.serve,
services.http_bounds, the scheduler's gRPC options).

The values are the largest legitimate use found in the code plus headroom, so a hostile or
broken peer costs a bounded amount of memory per connection and a bounded number of slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import msgpack

from dualpath.errors import DualPathError
from services.codec import MAX_HEADER_BYTES, MAX_WIRE_PAYLOAD_BYTES

if TYPE_CHECKING:
    from services.spec import ClusterSpec

MAX_CONTEXT_TOKENS = 65536
"""The longest context a lab replays (lab.config.models `workload.max_len`, Table 2's MaxLen): a
read request lists at most this many tokens' worth of blocks."""

MAX_BLOCK_ID_BYTES = 5
"""A block id on the wire: a msgpack uint up to 2**32 - 1 is at most 5 bytes."""

HEADER_SLACK_BYTES = 4 << 10
"""The fixed fields of any header (type, req, traj, crc, client, turn, reason...)."""

MIN_HEADER_ITEMS = 1024


@dataclass(frozen=True, slots=True)
class PortLimits:
    """Limits of one listening port. Times in seconds, sizes in bytes."""

    kind: str
    """Which port kind these are (kv, collective, mgmt, http, grpc): names counters and docs."""
    max_connections: int
    """Connections served at once; one more is accepted and closed at once, and counted."""
    idle_timeout_s: float
    """A connection with no frame (request) in progress is closed after this long."""
    frame_timeout_s: float
    """A frame (request headers) whose first byte arrived must be complete within this long:
    a sender that trickles bytes is cut off however steadily it trickles."""
    max_header_bytes: int
    """A frame's msgpack header, or an HTTP request's header block."""
    max_payload_bytes: int
    """A frame's payload, or an HTTP request's body."""
    max_header_items: int = MIN_HEADER_ITEMS
    """The longest array or largest map inside a header: with max_header_bytes
    it bounds what decoding one header allocates (msgpack's own defaults scale with the
    buffer, so a 1 MiB header of empty arrays became ~64 MB of lists)."""

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, float, float, float], ...] = (
            ("max_connections", self.max_connections, 1, 1 << 20),
            ("idle_timeout_s", self.idle_timeout_s, 0.001, 86400.0),
            ("frame_timeout_s", self.frame_timeout_s, 0.001, 86400.0),
            ("max_header_bytes", self.max_header_bytes, 16, MAX_HEADER_BYTES),
            ("max_payload_bytes", self.max_payload_bytes, 0, MAX_WIRE_PAYLOAD_BYTES),
            ("max_header_items", self.max_header_items, 1, MAX_HEADER_BYTES),
        )
        for name, value, lo, hi in checks:
            if not lo <= value <= hi:
                raise ValueError(
                    f"{self.kind} port limits: {name} must be in {lo}..{hi}, got {value}"
                )

    def with_(self, **changes: Any) -> PortLimits:
        """A copy with `changes` (validated again): tests shrink the timeouts."""
        return replace(self, **changes)


def max_blocks_per_read(block_tokens: int) -> int:
    """The most blocks one read (or relay) header can list for a context of MAX_CONTEXT_TOKENS."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    return math.ceil(MAX_CONTEXT_TOKENS / block_tokens)


def kv_header_bytes(block_tokens: int) -> int:
    """Header bytes a KV port must take: a read request listing every block of four times
    the longest context (reads of a whole trajectory, tests' bulk reads), plus the fixed
    fields; at least 64 KiB (1,535 blocks of 32 KiB, a 48 MiB read, take ~5 KiB)."""
    need = 4 * max_blocks_per_read(block_tokens) * MAX_BLOCK_ID_BYTES + HEADER_SLACK_BYTES
    return min(MAX_HEADER_BYTES, max(64 << 10, need))


def kv_port_limits(
    *, block_tokens: int, max_frame_bytes: int, request_timeout_s: float
) -> PortLimits:
    """The KV ports: the storage servers' data port and the engines' data-plane port (cnic).

    - 256 connections: the largest lab (32 engine nodes) opens 4 storage connections per
      engine node per server, and 2 per peer (kv, control) to a data plane.
    - idle 600 s: pooled connections wait between turns; a server that closed one while its
      client reused it would lose the frame, so only connections idle far longer than any gap
      between turns are closed.
    - frame request_timeout_s: a client gives up on a request after it; a frame taking longer
      serves nobody.
    - header: a read listing every block of four longest contexts (kv_header_bytes); a
      header's arrays and maps are bounded by its bytes (each element costs one at least).
    - payload max_frame_bytes: reads, writes and relays are cut into frames of at most that.
    """
    return PortLimits(
        kind="kv",
        max_connections=256,
        idle_timeout_s=600.0,
        frame_timeout_s=request_timeout_s,
        max_header_bytes=kv_header_bytes(block_tokens),
        max_payload_bytes=max_frame_bytes,
        # Every element costs at least a byte: the header's bytes are the bound that matters.
        max_header_items=kv_header_bytes(block_tokens),
    )


def collective_port_limits(*, collective_bytes: int, layer_timeout_s: float) -> PortLimits:
    """The engines' collective port (timeline process): one connection per same-role peer
    (at most 15), one burst of collective_bytes per step, answered at once. A burst that is not
    in within layer_timeout_s has already failed the step on the sending side."""
    return PortLimits(
        kind="collective",
        max_connections=64,
        idle_timeout_s=600.0,
        frame_timeout_s=layer_timeout_s,
        max_header_bytes=4 << 10,
        max_payload_bytes=max(collective_bytes, 64 << 10),
    )


def kv_limits_for(spec: ClusterSpec) -> PortLimits:
    """A lab's KV ports (kv_port_limits with the spec's block size, frame size, timeout)."""
    return kv_port_limits(
        block_tokens=spec.profile.block_tokens,
        max_frame_bytes=spec.max_frame_bytes,
        request_timeout_s=spec.request_timeout_s,
    )


def collective_limits_for(spec: ClusterSpec) -> PortLimits:
    """A lab's collective ports (collective_port_limits with the spec's burst and timeout)."""
    return collective_port_limits(
        collective_bytes=spec.collective_bytes_per_step, layer_timeout_s=spec.layer_timeout_s
    )


MGMT_PORT_LIMITS = PortLimits(
    kind="mgmt",
    max_connections=32,
    idle_timeout_s=120.0,
    frame_timeout_s=10.0,
    max_header_bytes=4 << 10,
    max_payload_bytes=1 << 20,
    max_header_items=64,
)
"""Frame management ports (storage `stats`/`seed`/`health`, engine `stats`): the runner and
the health probes send small headers and no payload (replies are large, requests never); one
runner per lab, a few probes. 1 MiB of payload is headroom, not a need; 10 s for a frame of a
few hundred bytes on the unshaped mgmt network."""

HTTP_API_LIMITS = PortLimits(
    kind="http",
    max_connections=4096,
    idle_timeout_s=75.0,
    frame_timeout_s=10.0,
    max_header_bytes=16 << 10,
    max_payload_bytes=1 << 20,
)
"""The scheduler's HTTP API: each agent of the driver holds one streaming request per turn
and the driver pools nothing away (TCPConnector(limit=0)), so the cap is the paper's largest
agent count (4,096 agents in its offline runs; examples run up to 1,024 with --set).
Bodies are turn submissions (token counts, a few hundred bytes); request headers must be in
within 10 s; a keep-alive connection idle 75 s (aiohttp's default) is closed."""

METRICS_LIMITS = PortLimits(
    kind="metrics",
    max_connections=16,
    idle_timeout_s=30.0,
    frame_timeout_s=10.0,
    max_header_bytes=8 << 10,
    max_payload_bytes=0,
)
"""A node's GET /metrics: one scraper (the runner or Prometheus); requests have no body."""

AGENT_LIMITS = PortLimits(
    kind="agent",
    max_connections=32,
    idle_timeout_s=75.0,
    frame_timeout_s=10.0,
    max_header_bytes=16 << 10,
    max_payload_bytes=1 << 20,
)
"""A compose node agent (port 7500): the driver container polls it and starts the node with
the cluster spec in the body (tens of KB for the largest lab)."""

CONTROL_LIMITS = PortLimits(
    kind="control",
    max_connections=16,
    idle_timeout_s=10.0,
    frame_timeout_s=60.0,
    max_header_bytes=16 << 10,
    max_payload_bytes=64 << 10,
)
"""The lab's control endpoint (lab.run.control, a threaded HTTP/1.0 server on 127.0.0.1): one
user drives the lab; a link or node change is a few hundred bytes. frame_timeout_s is the
whole connection's deadline there (one request per connection)."""

GRPC_LIMITS = PortLimits(
    kind="grpc",
    max_connections=128,
    idle_timeout_s=600.0,
    frame_timeout_s=10.0,
    max_header_bytes=16 << 10,
    max_payload_bytes=4 << 20,
    max_header_items=1 << 16,
)
"""The scheduler's gRPC port: one leader per engine node (at most 32) fetches and reports.
A fetch carries the node's report (loads, turn ids, ledger: tens of KB at most); 4 MiB is
gRPC's own default, made explicit. A message may hold at most max_header_items arrays and
maps in all (unpack_bounded): 4 MiB of empty arrays would otherwise unpack to ~256 MB."""


class TooManyContainers(DualPathError, ValueError):
    """A msgpack message holds more arrays and maps than its port allows."""


def unpack_bounded(data: bytes, *, max_containers: int) -> Any:
    """msgpack.unpackb of a message that may hold at most `max_containers` arrays and maps in
    all (and none longer than that): what one message can allocate is bounded by its bytes
    plus `max_containers` containers, however they nest."""
    left = max_containers

    def count(obj: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise TooManyContainers(f"more than {max_containers} arrays and maps")
        return obj

    return msgpack.unpackb(
        data,
        raw=False,
        max_array_len=max_containers,
        max_map_len=max_containers,
        max_ext_len=0,
        list_hook=count,
        object_hook=count,
    )


def grpc_server_options(limits: PortLimits) -> list[tuple[str, int]]:
    """grpc.aio.server options for `limits` (gRPC core channel arguments)."""
    return [
        ("grpc.max_receive_message_length", limits.max_payload_bytes),
        ("grpc.max_metadata_size", limits.max_header_bytes),
        ("grpc.max_concurrent_streams", 16),
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.server_handshake_timeout_ms", int(limits.frame_timeout_s * 1000)),
    ]

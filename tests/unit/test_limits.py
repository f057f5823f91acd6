"""Port limits: values, validation, and the bounded decoders they drive (pure)."""

from __future__ import annotations

from typing import get_args

import msgpack
import pytest

from lab.config.models import Workload
from services.codec import (
    Frame,
    FrameError,
    FrameReceiver,
    OversizeFrame,
    decode_header,
    encode_bytes,
    encode_prefix,
)
from services.limits import (
    GRPC_LIMITS,
    MAX_CONTEXT_TOKENS,
    MGMT_PORT_LIMITS,
    PortLimits,
    TooManyContainers,
    kv_header_bytes,
    kv_port_limits,
    max_blocks_per_read,
    unpack_bounded,
)


def feed(rx: FrameReceiver, data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    view = memoryview(data)
    while view:
        buf = rx.get_buffer()
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        frames += rx.buffer_updated(n)
    return frames


def test_the_longest_context_is_the_configs_longest() -> None:
    lengths = get_args(Workload.model_fields["max_len"].annotation)
    assert max(lengths) <= MAX_CONTEXT_TOKENS


def test_a_kv_port_takes_a_read_of_every_block_of_the_longest_context() -> None:
    for block_tokens in (1, 16, 64, 4096):
        blocks = list(range(max_blocks_per_read(block_tokens)))
        header = {"t": "read", "req": 2**31, "traj": 2**31, "blocks": blocks, "client": "x" * 64}
        raw = msgpack.packb(header)
        limits = kv_port_limits(
            block_tokens=block_tokens, max_frame_bytes=64 << 20, request_timeout_s=120.0
        )
        assert len(raw) <= limits.max_header_bytes
        assert len(blocks) <= limits.max_header_items
        assert decode_header(raw, max_items=limits.max_header_items)[0] == "read"


def test_kv_header_bytes_have_a_floor_and_grow_with_small_blocks() -> None:
    assert kv_header_bytes(64) == 64 << 10
    assert kv_header_bytes(1) > kv_header_bytes(16) >= 64 << 10


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_connections", 0),
        ("idle_timeout_s", 0.0),
        ("frame_timeout_s", -1.0),
        ("max_header_bytes", 2 << 20),
        ("max_payload_bytes", -1),
        ("max_header_items", 0),
    ],
)
def test_limits_out_of_range_are_refused_with_their_name(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        MGMT_PORT_LIMITS.with_(**{field: value})


def test_limits_are_frozen() -> None:
    with pytest.raises(AttributeError):
        MGMT_PORT_LIMITS.max_connections = 1  # type: ignore[misc]
    assert isinstance(MGMT_PORT_LIMITS.with_(max_connections=1), PortLimits)


def test_a_header_over_the_ports_limit_is_oversize_at_its_prefix() -> None:
    rx = FrameReceiver(max_header_bytes=MGMT_PORT_LIMITS.max_header_bytes)
    with pytest.raises(OversizeFrame, match="header length"):
        feed(rx, encode_prefix(MGMT_PORT_LIMITS.max_header_bytes + 1, 0))


def test_a_payload_over_the_ports_limit_is_oversize_at_its_prefix() -> None:
    rx = FrameReceiver(max_payload_bytes=100)
    with pytest.raises(OversizeFrame, match="payload length"):
        feed(rx, encode_prefix(10, 101))


def test_a_header_with_a_long_array_is_refused_not_unpacked() -> None:
    rx = FrameReceiver(max_header_items=MGMT_PORT_LIMITS.max_header_items)
    frame = Frame("stats", {"x": [[]] * (MGMT_PORT_LIMITS.max_header_items + 1)})
    with pytest.raises(FrameError, match="not valid msgpack") as info:
        feed(rx, encode_bytes(frame))
    assert not isinstance(info.value, OversizeFrame)
    ok = Frame("stats", {"x": [[]] * MGMT_PORT_LIMITS.max_header_items})
    assert feed(FrameReceiver(max_header_items=64), encode_bytes(ok)) == [ok]


def test_unpack_bounded_counts_containers_however_they_nest() -> None:
    nested = [[[] for _ in range(100)] for _ in range(100)]  # 10,101 containers, 30 KB
    raw = msgpack.packb(nested)
    assert unpack_bounded(raw, max_containers=10_101) == nested
    with pytest.raises(TooManyContainers):
        unpack_bounded(raw, max_containers=10_100)
    assert GRPC_LIMITS.max_header_items >= 1 << 16

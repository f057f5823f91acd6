"""What the fuzz targets share: the budget, the per-target tally, input strategies, and the raw
socket exchange whose time bound turns a hang into a failure.

A target is one protocol surface of one live server (or of the codec). Every input a target
tries is counted (`tried`), so a run reports how many inputs each target took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from services.codec import Frame, FrameDecoder, FrameError, encode_bytes

CI_EXAMPLES = 300
LONG_FACTOR = 10
_examples = os.environ.get("DUALPATH_FUZZ_EXAMPLES")
_common: dict[str, Any] = {
    "deadline": None,  # each input is bounded by INPUT_TIMEOUT_S instead
    "database": None,
    "print_blob": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,  # one live server serves every input of a target
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
}
settings.register_profile(
    "ci", max_examples=int(_examples) if _examples else CI_EXAMPLES, derandomize=True, **_common
)
settings.register_profile(
    "long", max_examples=int(_examples) if _examples else CI_EXAMPLES * LONG_FACTOR, **_common
)
PROFILE = os.environ.get("DUALPATH_FUZZ_PROFILE", "ci")
BUDGET = settings.get_profile(PROFILE)
"""Applied to each fuzz test (`@BUDGET`), not loaded globally: the unit tests' Hypothesis
settings stay their own. `ci`: derandomized and without an example database, so every run
tries the same inputs; `long`: 10x the inputs, random (`make fuzz-long`)."""

INPUT_TIMEOUT_S = float(os.environ.get("DUALPATH_FUZZ_INPUT_TIMEOUT_S", "10"))
"""What one input (send, the server's answer, the liveness check) may take. Generous for a
shared 2-core machine: a hang is unbounded, a slow input is seconds at most."""

COUNTS: dict[str, int] = {}
"""Inputs tried per target, over the session."""
FAILURES: dict[str, int] = {}
"""Failed tests per target."""
CURRENT: list[str] = []
"""The target of the running test (set by conftest from its `fuzz_target` marker)."""


def tried(n: int = 1) -> None:
    """Count `n` inputs for the running test's target."""
    if not CURRENT:
        raise RuntimeError("a fuzz test needs @pytest.mark.fuzz_target(name)")
    COUNTS[CURRENT[-1]] = COUNTS.get(CURRENT[-1], 0) + n


# -- sockets --------------------------------------------------------------------------------

_LINGER_OFF = struct.pack("ii", 1, 0)


def no_time_wait(sock: Any) -> None:
    """Close `sock` with a reset, not a FIN: thousands of inputs would otherwise leave as many
    TIME_WAIT ports behind, and a shared machine's other tests find no free ports for a minute."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)


def _lingerless(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    no_time_wait(sock)
    return sock


def client_session(**kwargs: Any) -> Any:
    """An aiohttp client session whose sockets close with a reset (no_time_wait)."""
    import aiohttp

    connector = aiohttp.TCPConnector(socket_factory=_lingerless)
    return aiohttp.ClientSession(connector=connector, **kwargs)


# -- bounded time ---------------------------------------------------------------------------


@contextlib.contextmanager
def bounded(seconds: float = INPUT_TIMEOUT_S, *, what: str = "input") -> Iterator[None]:
    """Fail a synchronous step that does not return within `seconds` (SIGALRM: the codec is
    pure Python, so the alarm interrupts any loop it could be stuck in)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"hang: the {what} took over {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


async def exchange(host: str, port: int, data: bytes) -> bytes:
    """Send `data` on a new connection, end our side, and return all the server sends until
    it closes. The server must close within INPUT_TIMEOUT_S once we have finished sending:
    otherwise the test fails as a hang. A reset by the server is an answer (it refused)."""
    try:
        async with asyncio.timeout(INPUT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            out = bytearray()
            try:
                with contextlib.suppress(ConnectionError):
                    writer.write(data)
                    await writer.drain()
                    writer.write_eof()
                with contextlib.suppress(ConnectionError):
                    while chunk := await reader.read(1 << 16):
                        out += chunk
            finally:
                no_time_wait(writer.get_extra_info("socket"))
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            return bytes(out)
    except TimeoutError:
        pytest.fail(f"hang: {host}:{port} did not finish an input in {INPUT_TIMEOUT_S} s")


def replies(data: bytes) -> list[Frame]:
    """The whole frames in a server's answer (a connection it reset may end mid-frame)."""
    decoder = FrameDecoder(max_payload_bytes=1 << 30)
    try:
        return decoder.feed(data)
    except FrameError as exc:  # a server's own frames are valid: this is a finding
        pytest.fail(f"the server answered with bytes that are not frames: {exc}")


def untyped_errors(frames: list[Frame], allowed: frozenset[str]) -> list[str]:
    """A crash shows as an error frame named after an unexpected exception (the transport's
    last resort, e.g. 'TypeError'): every error must carry one of the server's own codes."""
    return [
        f"untyped error {f.header.get('code')!r}: {f.header.get('message')!r}"
        for f in frames
        if f.kind == "error" and f.header.get("code") not in allowed
    ]


def check_error_codes(frames: list[Frame], allowed: frozenset[str]) -> None:
    found = untyped_errors(frames, allowed)
    assert not found, found[0]


# -- strategies -----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
msgpack_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)
"""Anything a msgpack header can hold (maps with string keys, as the codec requires)."""

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=15,
)

small_uints = st.integers(min_value=0, max_value=64)
uint_lists = st.lists(small_uints, max_size=8)


EDGES: list[Any] = [0, -1, 1 << 31, 1 << 32, 1 << 63, -(1 << 63), (1 << 64) - 1, 0.5, -0.0]
EDGES += [float("inf"), float("-inf"), float("nan"), "", "0", "x" * 300, True, False, None]
EDGES += [b"", b"\xff", [], [0], [[0, 1]], [-1], {}, {"": 0}]
edge_values = st.sampled_from(EDGES)
"""A fuzzer's dictionary: values at the edges of what fields are parsed into."""

_DROP = object()


def edge_sweep(baselines: list[Frame]) -> Iterator[Frame]:
    """Each well-formed frame of `baselines` with one field at a time set to each edge value,
    or dropped, and with an unknown field added: the one-field-off inputs random generation
    reaches only rarely (a field checked last needs every field before it right)."""
    for base in baselines:
        for name in base.header:
            for value in [*EDGES, _DROP]:
                head = dict(base.header)
                if value is _DROP:
                    del head[name]
                else:
                    head[name] = value
                yield Frame(base.kind, head, base.payload)
        yield Frame(base.kind, {**base.header, "zz": EDGES}, base.payload)


def field_values(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right shape (so parsing gets past the first field), sometimes an
    edge value or anything at all."""
    return st.one_of(plausible, plausible, plausible, edge_values, msgpack_values)


@st.composite
def _one_field_off(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """Every known field well-formed but one or two: edge values, anything, or missing. This
    is what reaches the checks after the first few fields."""
    head = {k: draw(v) for k, v in fields.items()}
    names = sorted(fields)
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)):
        choice = draw(st.sampled_from(["edge", "edge", "any", "drop"]))
        if choice == "drop":
            del head[name]
        else:
            head[name] = draw(edge_values if choice == "edge" else msgpack_values)
    return head


def headers(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A header with some of the known `fields` (each fuzzed) and maybe unknown keys."""
    known = st.fixed_dictionaries({}, optional={k: field_values(v) for k, v in fields.items()})
    extra = st.dictionaries(
        st.text(max_size=6).filter(lambda k: k != "t"), msgpack_values, max_size=2
    )
    return st.one_of(
        st.fixed_dictionaries({k: v for k, v in fields.items()}),
        _one_field_off(fields),
        _one_field_off(fields),
        st.builds(lambda a, b: {**b, **a}, known, extra),
    )


def frames(
    kinds: dict[str, dict[str, st.SearchStrategy[Any]]], *, max_payload: int = 256
) -> st.SearchStrategy[Frame]:
    """Frames of the known kinds, each with its own fields fuzzed, and of unknown kinds with
    any of the fields."""
    payloads = st.binary(max_size=max_payload)
    known = [
        st.builds(Frame, st.just(kind), headers(fields), payloads) for kind, fields in kinds.items()
    ]
    every = {k: v for fields in kinds.values() for k, v in fields.items()}
    other = st.builds(Frame, st.text(min_size=1, max_size=10), headers(every), payloads)
    return st.one_of(*known, other)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with a few bytes flipped, cut, dropped or inserted."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "drop", "insert"]))
        pos = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDC, 0xDD, 0xDF]))
        elif op == "cut":
            del data[pos:]
        elif op == "drop" and data:
            del data[pos : pos + draw(st.integers(min_value=1, max_value=8))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def wire(frames_: st.SearchStrategy[Frame]) -> st.SearchStrategy[bytes]:
    """What a fuzzed peer sends: valid frames (1-3 in a row), mutated ones, or raw garbage
    (sometimes behind the frame magic so the prefix checks are reached)."""
    valid = st.lists(frames_, min_size=1, max_size=3).map(
        lambda fs: b"".join(encode_bytes(f) for f in fs)
    )
    garbage = st.binary(max_size=128) | st.binary(max_size=64).map(lambda b: b"DP\x01\x00" + b)
    return st.one_of(valid, valid, valid, mutated(valid), garbage)


# -- HTTP -----------------------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


async def http_exchange(
    host: str, port: int, method: str, target: str, headers: dict[str, str], body: bytes
) -> tuple[int | None, bytes]:
    """One raw HTTP/1.1 request (Connection: close) and the server's status and response.

    Written by hand so that methods, targets and headers reach the server as fuzzed. Our side
    is not half-closed (a server may take that for a client that went away); a 200 event
    stream (a submitted turn) is read up to its headers, anything else until the server closes.
    """
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    data = head.encode("utf-8", "surrogateescape") + b"\r\n" + body
    try:
        async with asyncio.timeout(INPUT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            out = bytearray()
            try:
                with contextlib.suppress(ConnectionError):
                    writer.write(data)
                    await writer.drain()
                with contextlib.suppress(ConnectionError):
                    while chunk := await reader.read(1 << 16):
                        out += chunk
                        end = out.find(b"\r\n\r\n")
                        if (
                            end >= 0
                            and out.startswith(b"HTTP/1.1 200")
                            and (b"application/x-ndjson" in out[:end])
                        ):
                            break
            finally:
                no_time_wait(writer.get_extra_info("socket"))
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except TimeoutError:
        pytest.fail(f"hang: {method} {target!r} on {host}:{port} took over {INPUT_TIMEOUT_S} s")
    status = None
    if out.startswith(b"HTTP/1.") and len(out) >= 12 and out[9:12].isdigit():
        status = int(out[9:12])
    elif found := re.search(rb"<p>Error code: (\d{3})</p>", out[:1024]):
        # http.server answers a request line it cannot parse the HTTP/0.9 way: the error
        # page without a status line (its code is in the page)
        status = int(found.group(1))
    return status, bytes(out)


header_names = st.sampled_from(
    [
        *("Content-Type", "Accept", "Accept-Encoding", "Expect", "Range", "Cookie", "Origin"),
        *("X-Forwarded-For", "Upgrade", "If-None-Match", "User-Agent"),
    ]
) | st.from_regex(r"\AX-[A-Za-z0-9-]{1,12}\Z")
header_values = st.sampled_from(
    [
        *("application/json", "text/plain", "application/x-www-form-urlencoded", "*/*", "gzip"),
        *("100-continue", "bytes=0-1", "websocket", "", "a" * 200),
    ]
) | st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
extra_headers = st.dictionaries(header_names, header_values, max_size=3)


def targets(known: list[str]) -> st.SearchStrategy[str]:
    """Request targets: the routes, routes with something appended, and strange paths."""
    piece = st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.sampled_from("é€"),
        max_size=16,
    )
    odd = st.sampled_from(
        [
            *("*", "/", "//", "/..", "/v1/../metrics", "/%2e%2e/", "/%00", "/v1/turns?x=1"),
            *("?a", "http://h/v1/status", "/v1/status#f", "/v1/" + "a" * 300, "/v1/links/%ff"),
        ]
    )
    return st.one_of(
        st.sampled_from(known),
        st.sampled_from(known),
        st.builds(lambda k, p: k + p, st.sampled_from(known), piece),
        st.builds(lambda p: "/" + p, piece),
        odd,
    )


def json_body(plausible: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[bytes]:
    import json

    values = json_values if plausible is None else st.one_of(plausible, plausible, json_values)
    return st.one_of(
        values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
        st.just(b""),
        st.sampled_from([b"{", b"[1,", b'{"a":NaN}', b"\xff\xfe", b"null", b"1e999"]),
    )


@st.composite
def http_requests(
    draw: st.DrawFn,
    known: list[str],
    secret: str,
    bodies: st.SearchStrategy[bytes],
    *,
    methods: list[str] = METHODS,
) -> tuple[str, str, dict[str, str], bytes]:
    """(method, target, headers, body): with the secret, without it, or with a wrong one."""
    method = draw(
        st.one_of(
            st.sampled_from(methods),
            st.sampled_from(methods),
            st.from_regex(r"\A[A-Z]{1,10}\Z"),
            st.sampled_from(["get", "G ET", "", "\x00"]),
        )
    )
    target = draw(targets(known))
    auth = draw(
        st.sampled_from(
            [
                *(f"Bearer {secret}", f"Bearer {secret}", None, "Bearer", f"bearer {secret}"),
                *(f"Bearer {secret}x", f"Bearer  {secret}", "Basic YTpi", "Bearer " + "z" * 64),
            ]
        )
    )
    headers = dict(draw(extra_headers))
    if auth is not None:
        headers["Authorization"] = auth
    body = draw(bodies) if method != "GET" or draw(st.booleans()) else b""
    length = draw(st.sampled_from(["exact", "exact", "exact", "none", "garbage", "shorter"]))
    if length == "exact" and (body or method == "POST"):
        headers["Content-Length"] = str(len(body))
    elif length == "garbage":
        headers["Content-Length"] = draw(st.sampled_from(["abc", "-1", "1 2", "+0", "0x10", ""]))
    elif length == "shorter" and body:
        headers["Content-Length"] = str(draw(st.integers(min_value=0, max_value=len(body) - 1)))
    return method, target, headers, body

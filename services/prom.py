"""A node's kernel NIC counters as Prometheus metrics: HTTP `GET /metrics` on the node's
management address, text exposition format 0.0.4.

The node reads its own network namespace with pyroute2 (`netem.counters`: the shaping HTB
roots and leaf classes, link statistics for unshaped NICs), so every figure is the kernel's.
Rendering is pure (`render`); only `KernelCounterReader` and `MetricsExporter` do I/O. Nothing
here changes a kernel object, and a failed read answers 500 instead of stale numbers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from netem.counters import ClassCounters, NicCounters, discover_sources, read_nics
from services import http_bounds
from services.limits import METRICS_LIMITS, PortLimits

METRICS_PORT = 7600
"""On every node's mgmt address (the lab's other ports are 7100-7401, the compose agent's 7500)."""
METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DIRECTIONS = ("egress", "ingress")


@dataclass(frozen=True)
class _Family:
    name: str
    kind: str
    help: str
    field: str
    """NicCounters field (`{direction}_` + this) or ClassCounters field."""


NIC_FAMILIES = (
    _Family(
        "dualpath_nic_bytes_total",
        "counter",
        "Bytes through the NIC, Ethernet headers included (shaped directions: the HTB root).",
        "bytes",
    ),
    _Family("dualpath_nic_packets_total", "counter", "Frames through the NIC.", "packets"),
    _Family("dualpath_nic_drops_total", "counter", "Frames dropped by the NIC's qdiscs.", "drops"),
    _Family(
        "dualpath_nic_overlimits_total",
        "counter",
        "Times the shaper had a frame but no class could send (shaped directions).",
        "overlimits",
    ),
    _Family(
        "dualpath_nic_backlog_bytes", "gauge", "Bytes queued in the NIC's shaper.", "backlog_bytes"
    ),
    _Family(
        "dualpath_nic_backlog_packets",
        "gauge",
        "Frames queued in the NIC's shaper.",
        "backlog_packets",
    ),
)
CLASS_FAMILIES = (
    _Family(
        "dualpath_class_bytes_total",
        "counter",
        "Bytes sent by a cnic priority class (collective, control, kv).",
        "bytes",
    ),
    _Family(
        "dualpath_class_packets_total", "counter", "Frames sent by a priority class.", "packets"
    ),
    _Family(
        "dualpath_class_drops_total",
        "counter",
        "Frames dropped at a priority class's queue.",
        "drops",
    ),
    _Family(
        "dualpath_class_overlimits_total",
        "counter",
        "Times a priority class had to wait for tokens.",
        "overlimits",
    ),
    _Family(
        "dualpath_class_backlog_bytes",
        "gauge",
        "Bytes queued in a priority class.",
        "backlog_bytes",
    ),
    _Family(
        "dualpath_class_backlog_packets",
        "gauge",
        "Frames queued in a priority class.",
        "backlog_packets",
    ),
)
RATE_FAMILY = _Family(
    "dualpath_nic_rate_bits_per_second",
    "gauge",
    "The rate the NIC direction is shaped to, as the kernel holds it (shaped NICs only).",
    "rate",
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _nic_field(c: NicCounters, direction: str, field: str) -> int:
    """A NicCounters figure by the exporter's field name ('backlog_bytes', 'packets', ...)."""
    return int(getattr(c, f"{direction}_{field}"))


def render(node_id: str, role: str, nics: Mapping[str, NicCounters]) -> str:
    """One scrape in the text exposition format: every family once, its samples together."""
    lines: list[str] = []
    base = {"node": node_id, "role": role}
    for fam in NIC_FAMILIES:
        lines += [f"# HELP {fam.name} {fam.help}", f"# TYPE {fam.name} {fam.kind}"]
        for nic, c in sorted(nics.items()):
            for direction in DIRECTIONS:
                labels = _labels({**base, "nic": nic, "direction": direction})
                lines.append(f"{fam.name}{labels} {_nic_field(c, direction, fam.field)}")
    fam = RATE_FAMILY
    lines += [f"# HELP {fam.name} {fam.help}", f"# TYPE {fam.name} {fam.kind}"]
    for nic, c in sorted(nics.items()):
        for direction in DIRECTIONS:
            rate = c.direction_rate_mbit(direction)
            if rate is not None:
                labels = _labels({**base, "nic": nic, "direction": direction})
                lines.append(f"{fam.name}{labels} {_number(round(rate * 1e6))}")
    for fam in CLASS_FAMILIES:
        lines += [f"# HELP {fam.name} {fam.help}", f"# TYPE {fam.name} {fam.kind}"]
        for nic, c in sorted(nics.items()):
            for direction in DIRECTIONS:
                classes: Mapping[str, ClassCounters] = getattr(c, f"{direction}_classes")
                for name, cc in classes.items():
                    labels = _labels({**base, "nic": nic, "direction": direction, "class": name})
                    lines.append(f"{fam.name}{labels} {int(getattr(cc, fam.field))}")
    return "\n".join(lines) + "\n"


def parse_samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample line of an exposition (for tests and tools)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


class KernelCounterReader:
    """Reads this process's network namespace: the NICs and their shaping are discovered from
    the kernel at every read (a rate changed by `dualpath link set` shows at once).

    pyroute2's synchronous API runs an event loop of its own, which cannot run in a thread
    whose loop is already running: every netlink call happens on one private thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prom-netlink")
        self._ipr: Any = None

    def _read(self) -> dict[str, NicCounters]:
        from pyroute2 import IPRoute

        if self._ipr is None:
            self._ipr = IPRoute()
        return read_nics(self._ipr, "this namespace", discover_sources(self._ipr))

    async def read(self) -> dict[str, NicCounters]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._read)

    def close(self) -> None:
        def shut() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        self._pool.submit(shut).result()
        self._pool.shutdown(wait=True)


ReadCounters = Callable[[], Awaitable[Mapping[str, NicCounters]]]


class MetricsExporter:
    """`GET /metrics` for one node; `read` returns (awaitably) NIC name -> NicCounters."""

    def __init__(
        self,
        node_id: str,
        role: str,
        read: ReadCounters,
        *,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.node_id = node_id
        self.role = role
        self._read = read
        self._on_close = on_close
        self._runner: web.AppRunner | None = None
        self.site: http_bounds.BoundedSite | None = None

    @classmethod
    def of_this_namespace(cls, node_id: str, role: str) -> MetricsExporter:
        """Serving the kernel counters of the namespace this process runs in."""
        reader = KernelCounterReader()
        return cls(node_id, role, reader.read, on_close=reader.close)

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            nics = await self._read()
        except Exception as exc:  # reported to the scraper, never stale figures
            return web.Response(status=500, text=f"reading kernel counters failed: {exc}\n")
        body = render(self.node_id, self.role, nics)
        if self.site is not None:  # this port's own connections and limit counters
            body += "# TYPE dualpath_metrics_port gauge\n" + "".join(
                f'dualpath_metrics_port{{node="{self.node_id}",name="{k}"}} {v}\n'
                for k, v in self.site.stats().items()
            )
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def start(
        self, host: str, port: int = METRICS_PORT, *, limits: PortLimits = METRICS_LIMITS
    ) -> None:
        app = web.Application(
            client_max_size=max(1, limits.max_payload_bytes),
            middlewares=[http_bounds.middleware],
        )
        app.router.add_get(METRICS_PATH, self._metrics)
        self._runner = web.AppRunner(app, access_log=None, **http_bounds.runner_kwargs(limits))
        await self._runner.setup()
        self.site = await http_bounds.start_site(self._runner, host, port, limits=limits)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._on_close()


def metrics_url(host: str, port: int = METRICS_PORT) -> str:
    return f"http://{host}:{port}{METRICS_PATH}"


def exported_nodes(backend: str) -> bool:
    """Whether nodes of `backend` export /metrics: only where each node has a network namespace
    of its own (netns, compose). On `local` every node shares the host's loopback, whose
    counters belong to no node."""
    return backend != "local"


__all__: Sequence[str] = (
    "METRICS_PORT",
    "KernelCounterReader",
    "MetricsExporter",
    "exported_nodes",
    "metrics_url",
    "parse_samples",
    "render",
)

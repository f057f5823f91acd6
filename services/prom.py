"""A node's kernel NIC counters as Prometheus metrics: HTTP `GET /metrics` on the node's
management address, text exposition format 0.0.4 written by `prometheus_client`.

The node reads its own network namespace with pyroute2 (`netem.counters`: the shaping HTB
roots and leaf classes, link statistics for unshaped NICs), so every figure is the kernel's.
`NodeCollector` turns one read into metric families (a `prometheus_client` custom collector),
`render` exposes them; only `KernelCounterReader` and `MetricsExporter` do I/O. Nothing here
changes a kernel object, and a failed read answers 500 instead of stale numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from netem.counters import ClassCounters, NicCounters, discover_sources, read_nics
from services import http_bounds
from services.limits import METRICS_LIMITS, PortLimits
from services.spec import NodeSpec

METRICS_PORT = 7600
"""On every node's mgmt address (the lab's other ports are 7100-7401, the compose agent's 7500)."""
METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of what `generate_latest` writes (text format 0.0.4)."""
DIRECTIONS = ("egress", "ingress")
NIC_LABELS = ("node", "role", "nic", "direction")
CLASS_LABELS = (*NIC_LABELS, "class")


@dataclass(frozen=True)
class _Family:
    name: str
    """The family's name; a counter's samples are this name + `_total` (prometheus_client's
    convention), a gauge's this name."""
    kind: str
    help: str
    field: str
    """NicCounters field (`{direction}_` + this) or ClassCounters field."""

    def make(self, labels: Sequence[str]) -> CounterMetricFamily | GaugeMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=labels)
        return GaugeMetricFamily(self.name, self.help, labels=labels)


NIC_FAMILIES = (
    _Family(
        "dualpath_nic_bytes",
        "counter",
        "Bytes through the NIC, Ethernet headers included (shaped directions: the HTB root).",
        "bytes",
    ),
    _Family("dualpath_nic_packets", "counter", "Frames through the NIC.", "packets"),
    _Family("dualpath_nic_drops", "counter", "Frames dropped by the NIC's qdiscs.", "drops"),
    _Family(
        "dualpath_nic_overlimits",
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
        "dualpath_class_bytes",
        "counter",
        "Bytes sent by a cnic priority class (collective, control, kv).",
        "bytes",
    ),
    _Family("dualpath_class_packets", "counter", "Frames sent by a priority class.", "packets"),
    _Family(
        "dualpath_class_drops",
        "counter",
        "Frames dropped at a priority class's queue.",
        "drops",
    ),
    _Family(
        "dualpath_class_overlimits",
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
PORT_FAMILY = _Family(
    "dualpath_metrics_port",
    "gauge",
    "This metrics port's open connections and the connections its limits refused or cut.",
    "",
)


def _nic_field(c: NicCounters, direction: str, field: str) -> int:
    """A NicCounters figure by the exporter's field name ('backlog_bytes', 'packets', ...)."""
    return int(getattr(c, f"{direction}_{field}"))


class NodeCollector(Collector):
    """One read of a node's kernel counters as metric families: every family once, its
    samples together (NICs sorted, egress before ingress). `port_stats`: the metrics port's
    own connection and limit counters (`http_bounds.BoundedSite.stats`), when serving."""

    def __init__(
        self,
        node_id: str,
        role: str,
        nics: Mapping[str, NicCounters],
        port_stats: Mapping[str, int] | None = None,
    ) -> None:
        self.node_id = node_id
        self.role = role
        self.nics = nics
        self.port_stats = port_stats

    def _directions(self) -> Iterator[tuple[str, NicCounters, str, list[str]]]:
        for nic, c in sorted(self.nics.items()):
            for direction in DIRECTIONS:
                yield nic, c, direction, [self.node_id, self.role, nic, direction]

    def collect(self) -> Iterator[Metric]:
        for fam in NIC_FAMILIES:
            metric = fam.make(NIC_LABELS)
            for _, c, direction, labels in self._directions():
                metric.add_metric(labels, _nic_field(c, direction, fam.field))
            yield metric
        rates = RATE_FAMILY.make(NIC_LABELS)
        for _, c, direction, labels in self._directions():
            rate = c.direction_rate_mbit(direction)
            if rate is not None:
                rates.add_metric(labels, round(rate * 1e6))
        yield rates
        for fam in CLASS_FAMILIES:
            metric = fam.make(CLASS_LABELS)
            for _, c, direction, labels in self._directions():
                classes: Mapping[str, ClassCounters] = getattr(c, f"{direction}_classes")
                for name, cc in classes.items():
                    metric.add_metric([*labels, name], int(getattr(cc, fam.field)))
            yield metric
        if self.port_stats is not None:
            port = PORT_FAMILY.make(("node", "name"))
            for key, value in self.port_stats.items():
                port.add_metric([self.node_id, key], value)
            yield port


def exposition(*collectors: Collector) -> str:
    """The collectors' metrics in the text exposition format 0.0.4 (`generate_latest` over a
    registry of their own, so nothing process-wide is exported)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry).decode()


def render(
    node_id: str,
    role: str,
    nics: Mapping[str, NicCounters],
    port_stats: Mapping[str, int] | None = None,
) -> str:
    """One scrape in the text exposition format: every family once, its samples together."""
    return exposition(NodeCollector(node_id, role, nics, port_stats))


def sample_key(name: str, labels: Mapping[str, str]) -> str:
    """A sample's key in `parse_samples`: `name{k="v",...}`, the labels sorted by name (the
    order prometheus_client writes them in), the values as they are."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def parse_samples(text: str) -> dict[str, float]:
    """`sample_key` -> value of every sample of an exposition (for tests and tools), read with
    prometheus_client's parser."""
    return {
        sample_key(s.name, s.labels): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def lab_nic_names(node: NodeSpec) -> dict[str, str]:
    """Address -> the lab's name of the NIC that carries it on `node` (lab.config.topology's
    names: cnic on compute, snic on storage, mgmt)."""
    names = {node.mgmt.host: "mgmt"}
    if node.cnic is not None:
        names[node.cnic.host] = "cnic"
    snic = node.snic_host or (node.storage.host if node.storage is not None else None)
    if snic is not None:
        names[snic] = "snic"
    return names


def rename_nics(
    nics: Mapping[str, NicCounters],
    addresses: Mapping[str, Sequence[str]],
    names: Mapping[str, str],
) -> dict[str, NicCounters]:
    """`nics` keyed by the lab's NIC names where an interface carries one of the node's
    addresses (`addresses`: interface -> its addresses; `names`: lab_nic_names). A compose
    container's interfaces are Docker's eth0, eth1, ... in an order of Docker's choosing, a
    netns node's already cnic, snic, mgmt; an interface with no lab address keeps its name."""
    lab = {
        iface: names[addr] for iface, addrs in addresses.items() for addr in addrs if addr in names
    }
    return {lab.get(iface, iface): c for iface, c in nics.items()}


class KernelCounterReader:
    """Reads this process's network namespace: the NICs and their shaping are discovered from
    the kernel at every read (a rate changed by `dualpath link set` shows at once). `names`
    (lab_nic_names): NICs are reported under the lab's names, found by address.

    pyroute2's synchronous API runs an event loop of its own, which cannot run in a thread
    whose loop is already running: every netlink call happens on one private thread."""

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prom-netlink")
        self._ipr: Any = None
        self._names = dict(names or {})

    def _read(self) -> dict[str, NicCounters]:
        from pyroute2 import IPRoute

        if self._ipr is None:
            self._ipr = IPRoute()
        nics = read_nics(self._ipr, "this namespace", discover_sources(self._ipr))
        if not self._names:
            return nics
        ifnames = {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in self._ipr.get_links()}
        addresses: dict[str, list[str]] = {}
        for msg in self._ipr.get_addr():
            iface = ifnames.get(int(msg["index"]))
            if iface is not None:
                addresses.setdefault(iface, []).append(str(msg.get_attr("IFA_ADDRESS")))
        return rename_nics(nics, addresses, self._names)

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
    def of_this_namespace(
        cls, node_id: str, role: str, names: Mapping[str, str] | None = None
    ) -> MetricsExporter:
        """Serving the kernel counters of the namespace this process runs in (`names`: see
        KernelCounterReader)."""
        reader = KernelCounterReader(names)
        return cls(node_id, role, reader.read, on_close=reader.close)

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            nics = await self._read()
        except Exception as exc:  # reported to the scraper, never stale figures
            return web.Response(status=500, text=f"reading kernel counters failed: {exc}\n")
        stats = self.site.stats() if self.site is not None else None
        body = render(self.node_id, self.role, nics, stats)
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
    "NodeCollector",
    "exported_nodes",
    "exposition",
    "lab_nic_names",
    "metrics_url",
    "parse_samples",
    "rename_nics",
    "render",
    "sample_key",
)

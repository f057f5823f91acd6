"""The live dashboard: `dualpath run|chaos|up --dashboard [PORT]` serves a page, on 127.0.0.1
only, that follows a lab while it runs: per-NIC throughput, share of the shaped rate and queue
backlog from the kernel counters the runner samples, turns done and in flight, every turn's
TTFT as it finishes, and the chaos timeline (scenario steps and changes made by hand); its
controls change a link or stop/cont/kill/restart a node.

The server is aiohttp on an event loop of its own thread, so the runner's sampling loop and
the lab's control endpoint go on as before. The page and plotly.js are served by it (nothing
is fetched from elsewhere). Data goes to the page as server-sent events (`GET /v1/stream`):
the history so far on connect, then one frame per sample.

Access: the page itself holds no data. Everything under /v1/ needs the lab's secret
(`Authorization: Bearer`, the same one the control endpoint takes); the URL printed carries it
in its fragment (`#token=`), which a browser never sends to a server, and the page presents
it from there. A control from the page is forwarded to the lab's control endpoint with that
secret, so it is validated, serialised and recorded (summary.json `control`) exactly as
`dualpath link set`/`dualpath node` are.

`frame` and `nic_rows` are pure (tests/unit/test_dashboard.py); the rest is I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from dualpath.errors import DualPathError
from lab.results.health import HostSample, host_health
from lab.results.metrics import Sample
from lab.run.sampling import sample_host
from services.auth import AUTH_HEADER, bearer, presented

DEFAULT_PORT = 8765
"""`--dashboard` without a port; 0 takes any free port (the URL is printed and recorded)."""
HOST = "127.0.0.1"
HISTORY_FRAMES = 7200
"""Frames kept for a page that connects late (an hour at the runner's 0.5 s ticks); older
ones are dropped from the history, never from the run's own record."""
KEEPALIVE_S = 15.0
"""An SSE comment this often, so proxies and the browser keep an idle stream open."""
CLIENT_QUEUE = 256
"""Frames queued per page; a page that falls this far behind is disconnected (it reconnects
and gets the history)."""
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=60)
"""A control step can take a while (a node restart waits for readiness)."""
STATUS_TIMEOUT_S = 2.0
"""The scheduler's status, asked once a second by a watch, must answer within this."""
DIRECTIONS = ("egress", "ingress")
HOST_WINDOW_S = 5.0
"""The host's CPU figures on the page are over this much of the latest samples."""


class DashboardError(DualPathError):
    """The dashboard cannot be served (its port is taken, or the address is refused): the
    run stops before its lab comes up (exit 1)."""


@dataclass(frozen=True)
class LabInfo:
    """What the page shows about the lab and offers in its controls."""

    lab_id: str
    backend: str
    policy: str | None
    time_dilation: float
    nodes: list[str]
    links: dict[str, list[str]]
    """node -> its NICs that can be changed (the control endpoint's own list)."""


def _direction(
    prev: Mapping[str, Any] | None, c: Mapping[str, Any], d: str, dt: float
) -> dict[str, Any]:
    rate = c.get("ingress_rate_mbit") if d == "ingress" else None
    rate = rate or c.get("rate_mbit")
    total = int(c[f"{d}_bytes"])
    mbit = None if prev is None else (total - int(prev[f"{d}_bytes"])) * 8 / dt / 1e6
    return {
        "bytes": total,
        "mbit": None if mbit is None else round(mbit, 3),
        "rate_mbit": rate,
        "percent": None if mbit is None or not rate else round(100 * mbit / rate, 1),
        "backlog_bytes": int(c.get(f"{d}_backlog_bytes", 0)),
        "drops": int(c.get(f"{d}_drops", 0)),
    }


def nic_rows(prev: Sample | None, cur: Sample) -> list[dict[str, Any]]:
    """Every shaped NIC of every node in `cur` (unshaped ones, the management network, are
    left out): per direction the cumulative bytes, Mbit/s since `prev`, its share of the
    configured rate, queue backlog and drops."""
    dt = max(float(cur["t"]) - float(prev["t"]), 1e-9) if prev is not None else 1.0
    rows: list[dict[str, Any]] = []
    for node, nics in sorted(cur["nodes"].items()):
        for nic, c in sorted(nics.items()):
            if not (c.get("rate_mbit") or c.get("ingress_rate_mbit")):
                continue
            before = None if prev is None else prev["nodes"].get(node, {}).get(nic)
            row: dict[str, Any] = {"node": node, "nic": nic}
            for d in DIRECTIONS:
                row[d] = _direction(before, c, d, dt)
            rows.append(row)
    return rows


def frame(
    samples: Sequence[Sample],
    *,
    now: float,
    origin: float,
    turns: Mapping[str, Any] | None,
    ttft: Sequence[Sequence[float]] = (),
    events: Sequence[Mapping[str, Any]] = (),
    host: Sequence[HostSample] = (),
) -> dict[str, Any]:
    """One update of the page: the NIC rows of the last two counter samples (their wall time
    as `wall`), the run's turn figures, the TTFT points [first-token wall time, s] and the
    timeline events [{wall, text, error}] that are new since the last frame. `origin`: the
    wall time the page's time axis starts at (the run's start, or the watch's). `host`: the
    host samples so far; the frame carries the host's CPU busy share and CPU pressure over the
    last HOST_WINDOW_S of them (what the run's emulation-health verdict judges at its end)."""
    cur = samples[-1] if samples else None
    prev = samples[-2] if len(samples) >= 2 else None
    return {
        "wall": round(float(cur["t"]) if cur is not None else now, 3),
        "origin": round(origin, 3),
        "nics": nic_rows(prev, cur) if cur is not None else [],
        "turns": dict(turns) if turns is not None else None,
        "ttft": [[round(float(t), 3), round(float(v), 4)] for t, v in ttft],
        "events": list(events),
        "host": recent_host(host),
    }


def recent_host(host: Sequence[HostSample]) -> dict[str, Any] | None:
    """The host's CPU busy % and PSI cpu-some share over the last HOST_WINDOW_S of `host`."""
    if len(host) < 2:
        return None
    end = float(host[-1]["t"])
    figures = host_health(host[-200:], end - HOST_WINDOW_S, end)
    busy = figures["cpu_busy_pct"]
    return {
        "cpu_busy_pct": busy.get("mean") if isinstance(busy, dict) else None,
        "psi_cpu_some_share": figures["psi_cpu_some_share"],
    }


_CHANGE_TEXT: dict[str, Callable[[Any], str]] = {
    "rate_mbit": lambda v: f"rate {float(v):g} Mbit/s",
    "loss_pct": lambda v: f"loss {float(v):g}%",
    "delay_ms": lambda v: f"delay {float(v):g} ms",
    "jitter_ms": lambda v: f"jitter {float(v):g} ms",
    "up": lambda v: "link up" if v else "link down",
}


def describe(entry: Mapping[str, Any], *, by_hand: bool) -> str:
    """A timeline event's text: what was changed where, and whether by the scenario (its
    step) or by hand (a request to the control endpoint: the dashboard or `link set`)."""
    where = entry.get("node", "?")
    if "nic" in entry:
        changes = dict(entry.get("changes") or {})
        text = ", ".join(
            _CHANGE_TEXT[k](v) if k in _CHANGE_TEXT else f"{k} {v}" for k, v in changes.items()
        )
        what = f"{where} {entry['nic']}: {text}"
    else:
        what = f"{where}: {entry.get('action', '?')}"
    if by_hand:
        return f"{what} (by hand)"
    step = str(entry.get("source") or "?").split(" ")[0]  # "events[2] (ramp)": its index
    return f"{what} (scenario {step})"


StepLogs = Callable[[], Sequence[tuple[Sequence[Mapping[str, Any]], bool]]]
"""The step logs a timeline follows, each with whether its steps are made by hand (the
control endpoint's) or by the scenario (the chaos player's)."""


class TimelineTap:
    """New entries of append-only step logs (the chaos player's, the control endpoint's), as
    timeline events with a wall time; `started_at` turns a log's relative `t` into one."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def new(
        self, log: Sequence[Mapping[str, Any]], started_at: float | None, *, by_hand: bool
    ) -> list[dict[str, Any]]:
        key = id(log)
        start = self.seen.get(key, 0)
        out: list[dict[str, Any]] = []
        for entry in log[start:]:
            if "wall" in entry:
                wall = float(entry["wall"])
            elif started_at is not None and "t" in entry:
                wall = started_at + float(entry["t"])
            else:
                wall = time.time()
            text = describe(entry, by_hand=by_hand)
            error = entry.get("error")
            out.append({"wall": round(wall, 3), "text": text, "error": error})
        self.seen[key] = len(log)
        return out


PageQueue = asyncio.Queue[tuple[str, Any] | None]
"""One connected page: the events it has yet to be sent (None: close its stream)."""


class Dashboard:
    """The dashboard's server, from a daemon thread until `close()`. `publish` (any thread)
    sends a frame to every page; `finish` tells them the run is over."""

    def __init__(
        self,
        info: LabInfo,
        *,
        control_url: str,
        secret: str,
        port: int = DEFAULT_PORT,
        host: str = HOST,
    ) -> None:
        self.info = info
        self.control_url = control_url.rstrip("/")
        self.secret = secret
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_FRAMES)
        self.events: list[dict[str, Any]] = []
        self.ended: str | None = None
        self.pages: set[PageQueue] = set()
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.port = 0
        self.thread = threading.Thread(
            target=self._serve, args=(host, port), name="dashboard", daemon=True
        )
        self.thread.start()
        self._ready.wait(timeout=30)
        if self._failed is not None:
            self.thread.join(timeout=5)
            raise DashboardError(f"dashboard: cannot serve on {host}:{port}: {self._failed}")
        if not self.port:
            raise DashboardError(f"dashboard: {host}:{port} did not start within 30 s")
        self.address = f"http://{host}:{self.port}/"

    @property
    def url(self) -> str:
        """The page's URL, the secret in its fragment (never sent to a server)."""
        return f"{self.address}#token={self.secret}"

    # -- the thread ------------------------------------------------------------------------

    def _serve(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start(host, port))
        except BaseException as exc:  # the port is taken, or the address refused
            self._failed = exc
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self._stop())
            self.loop.close()

    async def _start(self, host: str, port: int) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/", self._page)
        app.router.add_get("/plotly.js", self._plotly)
        app.router.add_get("/v1/stream", self._stream)
        app.router.add_post("/v1/links/{node}/{nic}", self._forward)
        app.router.add_post("/v1/nodes/{node}/{action}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=False)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port

    async def _stop(self) -> None:
        for page in list(self.pages):
            with contextlib.suppress(asyncio.QueueFull):
                page.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def close(self) -> None:
        """Stop serving: every page's stream ends (the page keeps what it drew)."""
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    # -- feeding ---------------------------------------------------------------------------

    def publish(self, update: dict[str, Any]) -> None:
        """Send one frame (`frame`) to every page and keep it for pages that come later."""
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            self.loop.call_soon_threadsafe(self._fanout, "frame", update)

    def finish(self, text: str) -> None:
        """Tell every page the run is over and why (`text`); the lab may go down next."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._fanout, "end", {"text": text})

    def _fanout(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "frame":
            self.history.append(data)
        else:
            self.ended = str(data.get("text"))
        for page in list(self.pages):
            try:
                page.put_nowait((kind, data))
            except asyncio.QueueFull:  # too far behind: drop it, it reconnects
                self.pages.discard(page)
                with contextlib.suppress(asyncio.QueueFull):
                    page.put_nowait(None)

    # -- handlers --------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return presented(request.headers.get(AUTH_HEADER), self.secret)

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.json_response(
            {"error": "the lab's secret is required (Authorization: Bearer ...)"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="dualpath"'},
        )

    async def _page(self, request: web.Request) -> web.Response:
        page = resources.files("lab.run").joinpath("dashboard.html").read_text()
        return web.Response(
            text=page,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
        )

    async def _plotly(self, request: web.Request) -> web.Response:
        from plotly.offline import get_plotlyjs

        return web.Response(
            text=get_plotlyjs(),
            content_type="application/javascript",
            headers={"Cache-Control": "max-age=3600"},
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        page: PageQueue = asyncio.Queue(maxsize=CLIENT_QUEUE)
        hello = {"info": asdict(self.info), "history": list(self.history), "ended": self.ended}
        self.pages.add(page)
        try:
            await resp.write(_event("hello", hello))
            while True:
                try:
                    item = await asyncio.wait_for(page.get(), timeout=KEEPALIVE_S)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if item is None:
                    break
                await resp.write(_event(*item))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.pages.discard(page)
        return resp

    async def _forward(self, request: web.Request) -> web.Response:
        """A control from the page, sent on to the lab's control endpoint with the secret."""
        if not self._authorized(request):
            return self._unauthorized()
        body = await request.read()
        try:
            async with (
                aiohttp.ClientSession(timeout=FORWARD_TIMEOUT) as session,
                session.post(
                    f"{self.control_url}{request.path}",
                    data=body or b"{}",
                    headers={AUTH_HEADER: bearer(self.secret), "Content-Type": "application/json"},
                ) as resp,
            ):
                text = await resp.text()
                return web.Response(status=resp.status, text=text, content_type="application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.json_response(
                {"error": f"the lab's control endpoint did not answer: {exc}"}, status=502
            )


def _event(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class RunFeed:
    """Feeds a dashboard from a run: `on_progress` with each driver progress message (its
    reader thread), `tick` with the counter samples at every runner tick, `finish` at the end."""

    def __init__(
        self,
        dashboard: Dashboard,
        *,
        steps: StepLogs,
    ) -> None:
        """`steps`: the step logs to put on the timeline (chaos player's, control's)."""
        self.dashboard = dashboard
        self.steps = steps
        self.progress: dict[str, Any] | None = None
        self.started_at: float | None = None
        self.ttft: list[list[float]] = []
        self.tap = TimelineTap()
        self.lock = threading.Lock()

    def on_start(self, started_at: float) -> None:
        self.started_at = started_at

    def on_progress(self, progress: Mapping[str, Any]) -> None:
        with self.lock:
            self.progress = {k: v for k, v in progress.items() if k != "ttft"}
            self.ttft.extend(progress.get("ttft") or [])

    def tick(self, samples: Sequence[Sample], host: Sequence[HostSample] = ()) -> None:
        """A frame of the samples so far; none before the driver started (the page's time
        axis starts there)."""
        if self.started_at is None:
            return
        with self.lock:
            turns, ttft = self.progress, self.ttft
            self.ttft = []
        events: list[dict[str, Any]] = []
        for log, by_hand in self.steps():
            events += self.tap.new(log, self.started_at, by_hand=by_hand)
        self.dashboard.publish(
            frame(
                samples[-2:],
                now=time.time(),
                origin=self.started_at,
                turns=turns,
                ttft=ttft,
                events=events,
                host=host[-40:],
            )
        )

    def finish(self, text: str) -> None:
        self.dashboard.finish(text)


def scheduler_status(
    open_socket: Callable[[], socket.socket], host: str, port: int
) -> dict[str, Any] | None:
    """The scheduler's `/v1/status` as turn figures, over a socket from `open_socket` (one
    made inside the lab's network on netns, where the host has no route to it); None when it
    does not answer (a restart, say)."""
    sock = open_socket()
    try:
        sock.settimeout(STATUS_TIMEOUT_S)
        sock.connect((host, port))
        conn = http.client.HTTPConnection(host, port, timeout=STATUS_TIMEOUT_S)
        conn.sock = sock
        conn.request("GET", "/v1/status")
        resp = conn.getresponse()
        st = json.loads(resp.read()) if resp.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        sock.close()
    if not isinstance(st, dict):
        return None
    return {
        "in_flight": st.get("turns"),
        "queue": st.get("queue"),
        "turns_done": st.get("done"),
        "turns_failed": st.get("failed"),
    }


class LabWatch:
    """Feeds a dashboard from a lab that is up without a run of its own (`dualpath up`):
    counters every `interval_s`, the scheduler's own turn figures (`status`, e.g.
    `scheduler_status`), and the changes made through the control endpoint."""

    def __init__(
        self,
        dashboard: Dashboard,
        counters: Callable[[], dict[str, dict[str, dict[str, Any]]] | None],
        *,
        status: Callable[[], dict[str, Any] | None],
        steps: StepLogs,
        interval_s: float = 1.0,
    ) -> None:
        self.dashboard = dashboard
        self.counters = counters
        self.status = status
        self.steps = steps
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.tap = TimelineTap()
        self.thread = threading.Thread(target=self._run, name="dashboard-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        samples: list[Sample] = []
        host: list[HostSample] = []
        origin = time.time()
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # a node restarting: the next tick reads it
                nodes = self.counters()
                if nodes is not None:
                    samples = [*samples[-1:], {"t": time.time(), "nodes": nodes}]
            host = [*host[-10:], sample_host(time.time())]
            events: list[dict[str, Any]] = []
            for log, by_hand in self.steps():
                events += self.tap.new(log, None, by_hand=by_hand)
            self.dashboard.publish(
                frame(
                    samples,
                    now=time.time(),
                    origin=origin,
                    turns=self.status(),
                    events=events,
                    host=host,
                )
            )
            self.stop.wait(self.interval_s)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


__all__ = [
    "DEFAULT_PORT",
    "Dashboard",
    "DashboardError",
    "LabInfo",
    "LabWatch",
    "RunFeed",
    "frame",
    "nic_rows",
]

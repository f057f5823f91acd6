"""The lab's HTTP control endpoint: change links and nodes of a running lab while traffic flows.

The process that owns a lab (the runner of `dualpath run`/`chaos`) serves, on 127.0.0.1 only:

    POST /v1/links/<node>/<nic>    {"rate": "50%", "loss": "5%", "delay": "10ms", "up": false}
    POST /v1/nodes/<node>/<action> stop | cont | kill | restart
    GET  /v1/links                 the nodes and NICs that can be changed

Link bodies use the chaos scenario syntax and are validated by the same compiler, so a bad value
is refused with its name (400) and nothing changes; a change the backend or kernel cannot make
is 409. Every request must present the lab's secret (`Authorization: Bearer`, services.auth),
or it is refused (401) before its body is read; bodies are bounded (a missing, negative or
oversized Content-Length is 411/400/413), so are connections and their idle time. The URL and
the secret are in the lab's run-state file (0600), where `dualpath link set` finds them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lab.run.backends import Backend
from lab.run.chaos import ClusterLinks, LinkStep, NodeStep, ScenarioError, compile_scenario
from services.auth import AUTH_HEADER, presented
from services.limits import CONTROL_LIMITS

MAX_BODY_BYTES = CONTROL_LIMITS.max_payload_bytes
MAX_CONNECTIONS = CONTROL_LIMITS.max_connections
"""Connections served at once; more are closed at once (one user drives the lab)."""
IO_TIMEOUT_S = CONTROL_LIMITS.idle_timeout_s
"""A connection that sends nothing for this long is closed."""
CONNECTION_DEADLINE_S = CONTROL_LIMITS.frame_timeout_s
"""A connection is closed this long after it was accepted, whatever it is doing: one request
per connection (HTTP/1.0), so a sender that trickles bytes holds its slot no longer. A change
the backend is making meanwhile still completes; only its reply is lost."""


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most MAX_CONNECTIONS threads: a connection over the cap is
    closed unanswered instead of taking a thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(CONNECTION_DEADLINE_S, _hang_up, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self.slots.release()


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def apply_step(be: Backend, step: LinkStep | NodeStep) -> str:
    """Carry out one scenario or control step on the backend; returns what was done."""
    if isinstance(step, LinkStep):
        return be.set_link(step.node, step.nic, dict(step.changes))
    return be.node_action(step.node, step.action)


def step_entry(step: LinkStep | NodeStep) -> dict[str, Any]:
    """A step as the run's fault log records it (summary.json `chaos.events`)."""
    entry: dict[str, Any] = {"node": step.node, "source": step.source}
    if isinstance(step, LinkStep):
        entry |= {"nic": step.nic, "changes": dict(step.changes)}
    else:
        entry["action"] = step.action
    return entry


class ControlServer:
    """Serves the control endpoint from a daemon thread until `close()`."""

    def __init__(self, be: Backend, links: ClusterLinks, *, secret: str) -> None:
        """`secret`: what every request must present (the lab's, `ClusterSpec.secret`)."""
        self.be = be
        self.links = links
        self.secret = secret
        self.lock = threading.Lock()  # one change at a time, in arrival order
        self.applied: list[dict[str, Any]] = []
        """The changes made, as chaos log entries with their wall-clock time (`wall`): a run
        reports them with its own faults."""
        handler = _handler(self)
        self.httpd = _BoundedServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="control", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def apply(self, path: str, body: Any) -> tuple[HTTPStatus, dict[str, Any]]:
        parts = [p for p in path.split("/") if p]
        if len(parts) != 4 or parts[:2] not in (["v1", "links"], ["v1", "nodes"]):
            return HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path}"}
        _, kind, node, what = parts
        if kind == "links":
            if not isinstance(body, dict):
                return HTTPStatus.BAD_REQUEST, {"error": "body must be a JSON object"}
            event: dict[str, Any] = {"set": {"node": node, "nic": what, **body}}
        else:
            event = {"node": {"id": node, "action": what}}
        try:
            (step,) = compile_scenario({"events": [event]}, self.links, source="request").steps
        except ScenarioError as exc:  # name the field as the request gave it
            msg = str(exc).removeprefix("request: ")
            msg = msg.removeprefix("events[0].set.").removeprefix("events[0].node.")
            return HTTPStatus.BAD_REQUEST, {"error": msg}
        entry = step_entry(step)
        try:
            with self.lock:
                entry["wall"] = time.time()
                entry["result"] = result = apply_step(self.be, step)
                self.applied.append(entry)
        except Exception as exc:  # the backend or kernel refused: nothing was changed
            return HTTPStatus.CONFLICT, {"error": f"{type(exc).__name__}: {exc}"}
        return HTTPStatus.OK, {"result": result}


def _content_length(value: str | None) -> tuple[int, HTTPStatus | None, str]:
    """The body length a request announced, or the status and reason to refuse it with."""
    if value is None:
        return 0, HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"
    text = value.strip()
    if not text.isdigit() or len(text) > 9:  # no sign, no blanks, no 10-digit sizes
        return 0, HTTPStatus.BAD_REQUEST, f"Content-Length {value!r} is not a byte count"
    length = int(text)
    if length > MAX_BODY_BYTES:
        return 0, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes"
    return length, None, ""


class _ControlHandler(BaseHTTPRequestHandler):
    """GET /v1/links and POST /v1/... for `control` (bound by _handler); every request
    needs the lab's secret, a body is read only up to its announced Content-Length."""

    control: ControlServer
    timeout = IO_TIMEOUT_S  # socket timeout for every read and write of the connection

    def _reply(self, status: HTTPStatus, body: dict[str, Any], *, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status is HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="dualpath"')
        if close:  # the unread body (if any) must not be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if presented(self.headers.get(AUTH_HEADER), self.control.secret):
            return True
        self._reply(
            HTTPStatus.UNAUTHORIZED,
            {"error": "the lab's secret is required (Authorization: Bearer ...)"},
            close=True,
        )
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/links":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.path}"})
            return
        links = {n: dict(nics) for n, nics in self.control.links.rates_mbit.items()}
        self._reply(HTTPStatus.OK, {"configured_rates_mbit": links})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        raw = self._read_body()
        if raw is None:
            return
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"})
            return
        self._reply(*self.control.apply(self.path, body))

    def _read_body(self) -> bytes | None:
        """The request's body, exactly Content-Length bytes; None when it was refused (the
        reply is sent) or the sender went silent."""
        if self.headers.get("Transfer-Encoding"):
            self._reply(
                HTTPStatus.LENGTH_REQUIRED,
                {"error": "Transfer-Encoding is not accepted: send Content-Length"},
                close=True,
            )
            return None
        length, refusal, why = _content_length(self.headers.get("Content-Length"))
        if refusal is not None:
            self._reply(refusal, {"error": why}, close=True)
            return None
        try:
            raw = self.rfile.read(length) if length else b"{}"
        except OSError:  # a timeout included
            self.close_connection = True
            return None  # the sender went silent: nothing was changed
        if len(raw) < length:
            self._reply(
                HTTPStatus.BAD_REQUEST, {"error": "body shorter than Content-Length"}, close=True
            )
            return None
        return raw

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the runner's progress lines are the log


def _handler(server: ControlServer) -> type[BaseHTTPRequestHandler]:
    """The handler class of `server`'s HTTP endpoint."""

    class Handler(_ControlHandler):
        control = server

    return Handler

"""The lab's HTTP control endpoint: change links and nodes of a running lab while traffic flows.

The process that owns a lab (the runner of `dualpath run`/`chaos`) serves, on 127.0.0.1 only:

    POST /v1/links/<node>/<nic>    {"rate": "50%", "loss": "5%", "delay": "10ms", "up": false}
    POST /v1/nodes/<node>/<action> stop | cont | kill | restart
    GET  /v1/links                 the nodes and NICs that can be changed

Link bodies use the chaos scenario syntax and are validated by the same compiler, so a bad value
is refused with its name (400) and nothing changes; a change the backend or kernel cannot make
is 409. The URL is recorded in the lab's run-state file, where `dualpath link set` finds it.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lab.backends import Backend
from lab.chaos import ClusterLinks, LinkStep, NodeStep, ScenarioError, compile_scenario

MAX_BODY_BYTES = 64 * 1024


def apply_step(be: Backend, step: LinkStep | NodeStep) -> str:
    """Carry out one scenario or control step on the backend; returns what was done."""
    if isinstance(step, LinkStep):
        return be.set_link(step.node, step.nic, dict(step.changes))
    return be.node_action(step.node, step.action)


class ControlServer:
    """Serves the control endpoint from a daemon thread until `close()`."""

    def __init__(self, be: Backend, links: ClusterLinks) -> None:
        self.be = be
        self.links = links
        self.lock = threading.Lock()  # one change at a time, in arrival order
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
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
        try:
            with self.lock:
                result = apply_step(self.be, step)
        except Exception as exc:  # the backend or kernel refused: nothing was changed
            return HTTPStatus.CONFLICT, {"error": f"{type(exc).__name__}: {exc}"}
        return HTTPStatus.OK, {"result": result}


def _handler(server: ControlServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/links":
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.path}"})
                return
            links = {n: dict(nics) for n, nics in server.links.rates_mbit.items()}
            self._reply(HTTPStatus.OK, {"configured_rates_mbit": links})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return
            raw = self.rfile.read(length) if length else b"{}"
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError as exc:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"})
                return
            self._reply(*server.apply(self.path, body))

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the runner's progress lines are the log

    return Handler

"""The Docker engine through its API (the Docker SDK for Python, `docker` on PyPI).

Everything the lab asks of the engine itself goes through here: is it up, does an image
exist, which containers, networks and volumes carry a label, their states, logs, removal, a
container run detached from a spec (the fresh-machine tier's), a command run in a container,
with or without a TTY (the terminal's side of a TTY session is compose.terminal's). Only
`compose up/down` stays on the CLI: a compose file becomes containers in the compose tool,
not in the engine (docs/compose.md).

Every engine error leaves as `EngineError`, whose message names the object (container
`prefill-0` (3f2a…), network …) and the engine's cause; an engine that does not answer at
all says so and how to start one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import IO, Any, Literal

import docker
import docker.errors
from docker import DockerClient
from docker.utils.socket import STDOUT, frames_iter

from compose import terminal
from lab.run.backends import BackendError

Kind = Literal["container", "network", "volume"]
KINDS: tuple[Kind, ...] = ("container", "network", "volume")
ENGINE_TIMEOUT_S = 120
"""Per API call (not for followed logs or exec output, which the SDK streams untimed)."""


class ComposeError(BackendError):
    """Docker or compose refused or failed; the message says which command or object and why."""


class EngineError(ComposeError):
    """The Docker engine refused a request or did not answer; names the object and the cause."""


def describe_engine_error(what: str, exc: Exception) -> EngineError:
    """The lab's error for an exception of the SDK (or of the HTTP client under it, whose
    errors are OSErrors) on `what` (`container prefill-0 (3f2a…)`, `image dualpath-mesh:…`)."""
    if isinstance(exc, docker.errors.NotFound):
        return EngineError(f"{what}: the Docker engine has no such object ({_cause(exc)})")
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code
        return EngineError(
            f"{what}: the Docker engine refused (HTTP {status}): {_cause(exc)}"
            if status is not None
            else f"{what}: the Docker engine refused: {_cause(exc)}"
        )
    if isinstance(exc, docker.errors.DockerException | OSError):
        return EngineError(
            f"{what}: no Docker engine answers ({exc}); start one (compose/ensure-docker.sh "
            "on Debian/Ubuntu) or point DOCKER_HOST at one"
        )
    return EngineError(f"{what}: {type(exc).__name__}: {exc}")


def _cause(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation).strip() if explanation else str(exc)


@contextlib.contextmanager
def engine_errors(what: str) -> Iterator[None]:
    """Turn the SDK's errors inside the block into EngineError about `what`."""
    try:
        yield
    except (docker.errors.DockerException, OSError) as exc:
        raise describe_engine_error(what, exc) from exc


@cache
def client() -> DockerClient:
    """The engine of DOCKER_HOST (or the local socket), API version negotiated; EngineError
    when none answers."""
    with engine_errors("the Docker engine"):
        return docker.from_env(timeout=ENGINE_TIMEOUT_S)


def server_version() -> str:
    """The engine's version; EngineError when none answers."""
    with engine_errors("the Docker engine"):
        return str(client().version().get("Version", "?"))


def describe_engine() -> str:
    """`<version>, storage driver <driver>, cgroup <version>` of the engine that answers;
    EngineError when none does."""
    with engine_errors("the Docker engine"):
        info = client().info()
    return (
        f"{info.get('ServerVersion', '?')}, storage driver {info.get('Driver', '?')}, "
        f"cgroup {info.get('CgroupVersion', '?')}"
    )


def image_exists(name: str) -> bool:
    """Whether the engine has image `name` (a tag or id)."""
    with engine_errors(f"image {name}"):
        try:
            client().images.get(name)
        except docker.errors.ImageNotFound:
            return False
    return True


def label_filters(labels: Mapping[str, str]) -> dict[str, list[str]]:
    """The engine's filter for objects carrying every one of `labels` (the engine ANDs label
    filters): {"label": ["key=value", ...]}."""
    if not labels:
        raise ValueError("a label filter needs at least one label (it would match everything)")
    return {"label": [f"{key}={value}" for key, value in labels.items()]}


def ids(kind: Kind, labels: Mapping[str, str]) -> list[str]:
    """Ids of the containers (stopped ones too), networks or volumes carrying all `labels`."""
    filters = label_filters(labels)
    what = f"{kind}s labelled {', '.join(filters['label'])}"
    api = client().api
    with engine_errors(what):
        if kind == "container":
            return [str(c["Id"]) for c in api.containers(all=True, filters=filters)]
        if kind == "network":
            return [str(n["Id"]) for n in api.networks(filters=filters)]
        volumes = api.volumes(filters=filters).get("Volumes") or []
        return [str(v["Name"]) for v in volumes]


def labelled(labels: Mapping[str, str], key: str) -> dict[str, str]:
    """Value of label `key` -> container id, for the containers carrying all `labels`."""
    filters = label_filters(labels)
    with engine_errors(f"containers labelled {', '.join(filters['label'])}"):
        found = client().api.containers(all=True, filters=filters)
    return {str(c["Labels"][key]): str(c["Id"]) for c in found if key in (c.get("Labels") or {})}


def remove(kind: Kind, ident: str) -> None:
    """Remove one object by id (a container even when running)."""
    api = client().api
    with engine_errors(f"{kind} {ident[:12]}"):
        if kind == "container":
            api.remove_container(ident, force=True)
        elif kind == "network":
            api.remove_network(ident)
        else:
            api.remove_volume(ident)


@dataclass(frozen=True)
class Bind:
    """A host path mounted into a container (`-v SOURCE:TARGET[:ro]`)."""

    source: str
    target: str
    read_only: bool = False

    def option(self) -> str:
        return f"{self.source}:{self.target}{':ro' if self.read_only else ''}"


@dataclass(frozen=True)
class ContainerSpec:
    """A container for `run_detached`: the options of `docker run -d`, as data. Capability
    names as in linux/capability.h without `CAP_` (or `ALL`)."""

    image: str
    command: tuple[str, ...]
    network_mode: str | None = None
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    """What the engine reads itself (`seccomp=unconfined`, `apparmor=unconfined`)."""
    unconfined_system_paths: bool = False
    """/proc and /sys neither masked nor read-only: the CLI's `--security-opt
    systempaths=unconfined`, which it sends as empty MaskedPaths and ReadonlyPaths."""
    binds: tuple[Bind, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    entrypoint: tuple[str, ...] | None = None
    """In place of the image's (None: the image's own)."""

    def cli_options(self) -> list[str]:
        """The same container as `docker run -d` options (for logs and people)."""
        opts: list[str] = []
        if self.network_mode:
            opts += ["--network", self.network_mode]
        opts += [o for cap in self.cap_add for o in ("--cap-add", cap)]
        opts += [o for cap in self.cap_drop for o in ("--cap-drop", cap)]
        opts += [o for sec in self.security_opt for o in ("--security-opt", sec)]
        if self.unconfined_system_paths:
            opts += ["--security-opt", "systempaths=unconfined"]
        opts += [o for bind in self.binds for o in ("-v", bind.option())]
        opts += [o for key, value in self.environment.items() for o in ("-e", f"{key}={value}")]
        opts += [o for key, value in self.labels.items() for o in ("--label", f"{key}={value}")]
        if self.working_dir:
            opts += ["-w", self.working_dir]
        if self.entrypoint is not None:  # the CLI takes one word; the rest go before the command
            opts += ["--entrypoint", self.entrypoint[0] if self.entrypoint else ""]
        return opts


def run_detached(spec: ContainerSpec, *, name: str) -> str:
    """Create and start a container as `spec` says, as `docker run -d` does (the image must
    be there: nothing is pulled); its id. A container created but refused its start is
    removed again before the error leaves."""
    api = client().api
    with engine_errors(f"container {name} (image {spec.image})"):
        host_config = api.create_host_config(
            network_mode=spec.network_mode,
            cap_add=[_capability(cap) for cap in spec.cap_add] or None,
            cap_drop=[_capability(cap) for cap in spec.cap_drop] or None,
            security_opt=list(spec.security_opt) or None,
            binds=[bind.option() for bind in spec.binds] or None,
        )
        if spec.unconfined_system_paths:
            host_config["MaskedPaths"] = []
            host_config["ReadonlyPaths"] = []
        created = api.create_container(
            spec.image,
            list(spec.command),
            detach=True,
            environment=dict(spec.environment) or None,
            labels=dict(spec.labels) or None,
            working_dir=spec.working_dir,
            entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None,
            host_config=host_config,
        )
    cid = str(created["Id"])
    try:
        with engine_errors(f"container {name} ({cid[:12]}, image {spec.image})"):
            api.start(cid)
    except EngineError:
        with contextlib.suppress(EngineError):
            remove("container", cid)
        raise
    return cid


def _capability(name: str) -> str:
    """`NET_ADMIN` -> `CAP_NET_ADMIN` (the engine's spelling); `ALL` stays."""
    return name if name == "ALL" or name.startswith("CAP_") else f"CAP_{name}"


def states(names: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Name -> the State of its container (Running, ExitCode, ...), for name -> container id."""
    api = client().api
    out: dict[str, dict[str, Any]] = {}
    for name, cid in names.items():
        with engine_errors(f"container {name} ({cid[:12]})"):
            out[name] = dict(api.inspect_container(cid)["State"])
    return out


def wait_for_exit(names: Mapping[str, str]) -> tuple[str, int]:
    """Block until one of the containers (name -> id) is not running, and say which and its
    exit status. It follows the engine's event stream (`die` events of these containers)
    instead of polling: no request per container and interval while the lab runs. A
    container that exited before the stream was open is found by one look at the states made
    after opening it."""
    by_id = {cid: name for name, cid in names.items()}
    what = f"containers {', '.join(sorted(names))}"
    with engine_errors(what):
        stream = client().events(
            filters={"type": "container", "event": "die", "container": list(by_id)},
            decode=True,
        )
    try:
        for name, st in states(names).items():
            if not st.get("Running"):
                return name, int(st.get("ExitCode", 1))
        with engine_errors(what):
            for event in stream:
                actor = event.get("Actor") or {}
                cid = str(event.get("id") or actor.get("ID") or "")
                if cid in by_id:
                    code = (actor.get("Attributes") or {}).get("exitCode", 1)
                    return by_id[cid], int(code)
    finally:
        stream.close()
    raise EngineError(f"{what}: the engine's event stream ended before any of them exited")


def logs(cid: str, *, name: str | None = None, tail: int | None = None) -> bytes:
    """The container's output so far (stdout and stderr interleaved), or its last `tail`
    lines."""
    with engine_errors(f"container {name or cid[:12]} ({cid[:12]})"):
        out = client().api.logs(
            cid, stdout=True, stderr=True, stream=False, tail="all" if tail is None else tail
        )
    return bytes(out)


class LogFollower:
    """A container's output as it comes: stdout to `out`, stderr to `err` (the same stream
    when they are the same object), each on a thread of its own until the container stops
    or `close()`."""

    def __init__(self, cid: str, out: IO[bytes], err: IO[bytes]) -> None:
        self._streams: list[Any] = []
        self._threads: list[threading.Thread] = []
        api = client().api
        pairs = [(True, True, out)] if out is err else [(True, False, out), (False, True, err)]
        with engine_errors(f"container {cid[:12]}"):
            for stdout, stderr, sink in pairs:
                stream = api.logs(cid, stdout=stdout, stderr=stderr, stream=True, follow=True)
                self._streams.append(stream)
                thread = threading.Thread(target=_copy, args=(stream, sink), daemon=True)
                thread.start()
                self._threads.append(thread)

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait up to `timeout_s` for the output to end, then stop following."""
        for thread in self._threads:
            thread.join(timeout_s)
        for stream in self._streams:
            with contextlib.suppress(Exception):
                stream.close()
        for thread in self._threads:
            thread.join(timeout_s)


def _copy(chunks: Iterable[bytes], sink: IO[bytes]) -> None:
    # the stream ends when the container stops; closing it from the other side raises here
    with contextlib.suppress(Exception):
        for chunk in chunks:
            sink.write(chunk)
            sink.flush()


def exec_in(
    cid: str,
    argv: Sequence[str],
    *,
    name: str,
    out: Callable[[bytes], object],
    err: Callable[[bytes], object],
    stdin: int | None = None,
) -> int:
    """Run `argv` in the container (no TTY), its stdout and stderr handed to `out` and `err`
    as they come; its exit status. With `stdin` (a file descriptor), what it reads is copied
    to the command's stdin, which sees end-of-file when the descriptor does."""
    api = client().api
    with engine_errors(f"container {name} ({cid[:12]})"):
        exec_id = api.exec_create(
            cid, list(argv), stdout=True, stderr=True, stdin=stdin is not None
        )["Id"]
        if stdin is None:
            for stdout, stderr in api.exec_start(exec_id, stream=True, demux=True):
                if stdout:
                    out(stdout)
                if stderr:
                    err(stderr)
        else:
            # The attached connection itself: stdin goes in on it, then the engine's frames
            # (stream id, bytes) come back until the command has exited.
            conn = api.exec_start(exec_id, socket=True)
            sock = _attached_socket(conn, name)
            threading.Thread(target=_feed, args=(stdin, sock), daemon=True).start()
            frames: Iterable[tuple[int, bytes]] = frames_iter(conn, tty=False)  # type: ignore[no-untyped-call]
            for stream, data in frames:
                (out if stream == STDOUT else err)(data)
            sock.close()
    return _exit_code(exec_id, what=f"container {name} ({cid[:12]})")


def exec_tty(cid: str, argv: Sequence[str], *, name: str, fd_in: int, fd_out: int) -> int:
    """Run `argv` in the container on a TTY of its own, as `docker exec -it` does: the
    terminal on `fd_in` in raw mode (restored on return, also on an error), the exec's TTY
    sized like the terminal on `fd_out` and resized when it changes (SIGWINCH, main thread),
    keys copied in and the TTY's output copied out until the command ends; its exit status."""
    api = client().api
    what = f"container {name} ({cid[:12]})"
    with engine_errors(what):
        exec_id = api.exec_create(cid, list(argv), stdin=True, stdout=True, stderr=True, tty=True)[
            "Id"
        ]

    sent: tuple[int, int] | None = None

    def sync_size() -> None:
        nonlocal sent
        size = terminal.window_size(fd_out)
        if size is None or size == sent:
            return
        # the command may have ended meanwhile: the session then ends by itself
        with contextlib.suppress(EngineError), engine_errors(f"{what}, TTY resize"):
            api.exec_resize(exec_id, height=size[0], width=size[1])
            sent = size

    with terminal.resize_signals() as resized, terminal.raw_mode(fd_in):
        with engine_errors(what):
            conn = api.exec_start(exec_id, tty=True, socket=True)
        sock = _attached_socket(conn, name)
        try:
            sync_size()  # the engine waits for the exec to have started before it resizes
            terminal.relay(fd_in, fd_out, sock, resized=resized, sync_size=sync_size)
        except OSError as exc:  # the engine's connection or our terminal broke
            raise EngineError(f"{what}: the terminal session broke off ({exc})") from exc
        finally:
            sock.close()
    return _exit_code(exec_id, what=what)


def _attached_socket(conn: Any, name: str) -> socket.socket:
    """The socket under an exec's attached connection (exec_start(socket=True)), blocking
    with no timeout: a command may be quiet for longer than a request may."""
    sock = getattr(conn, "_sock", conn)
    if not isinstance(sock, socket.socket):  # an ssh:// engine: a channel, no socket
        raise EngineError(
            f"container {name}: input cannot be copied over this engine's connection "
            f"({type(conn).__name__}); run the command without stdin and not on a terminal"
        )
    sock.settimeout(None)
    return sock


EXIT_WAIT_S = 10.0


def _exit_code(exec_id: str, *, what: str) -> int:
    """The exit status of a finished exec. Its output may end a moment before the engine
    has recorded the exit, so a still-running exec is asked again, for up to EXIT_WAIT_S."""
    deadline = time.monotonic() + EXIT_WAIT_S
    with engine_errors(f"{what}, exec {exec_id[:12]}"):
        found = client().api.exec_inspect(exec_id)
        while found.get("Running") and time.monotonic() < deadline:
            time.sleep(0.05)
            found = client().api.exec_inspect(exec_id)
    code = found.get("ExitCode")
    # None: the engine lost track of the process (the container went away meanwhile)
    return 1 if code is None else int(code)


def _feed(fd: int, sock: socket.socket) -> None:
    """Copy `fd` into the exec's connection, then half-close it (end-of-file for the
    command); the command may exit first, closing the connection under us."""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 65536):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m compose.engine describe` (compose/ensure-docker.sh): the engine's line on
    stdout and 0, or why no engine answers on stderr and 1."""
    parser = argparse.ArgumentParser(prog="python -m compose.engine")
    parser.add_argument("verb", choices=["describe"])
    parser.parse_args(argv)
    try:
        print(describe_engine())
    except EngineError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


__all__ = [
    "KINDS",
    "Bind",
    "ComposeError",
    "ContainerSpec",
    "EngineError",
    "Kind",
    "LogFollower",
    "client",
    "describe_engine",
    "describe_engine_error",
    "engine_errors",
    "exec_in",
    "exec_tty",
    "ids",
    "image_exists",
    "label_filters",
    "labelled",
    "logs",
    "main",
    "remove",
    "run_detached",
    "server_version",
    "states",
]

if __name__ == "__main__":
    sys.exit(main())

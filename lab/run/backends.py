"""Backends that host a lab's node processes: `netns` (shaped namespaces) and `local` (loopback).

A backend brings the network up, starts one process per node, runs the driver where the
management network reaches, samples kernel counters, and removes exactly what it created.
Every process it starts is recorded in a run-state file first, so `dualpath down` can finish
the job after a crash.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from dualpath.errors import DualPathError
from lab.config.topology import topology_for
from netem.errors import NetemError
from netem.kernel import require_net_admin
from netem.lifecycle import down_from_state, recorded_labs
from netem.netns import NetnsLab
from netem.state import default_state_dir, ensure_state_dir, write_record
from services.process import node_environment
from services.spec import ClusterSpec, NodeSpec, Role

STOP_GRACE_S = 5.0
PROCESS_MARKER = "services"


BACKENDS = ("netns", "compose", "local")
"""What `--backend` takes: network namespaces, a Docker Compose stack, or plain processes."""


class BackendError(DualPathError):
    """The backend could not start or stop the lab; the message says what and why."""


def state_dir() -> Path:
    """This user's state directory (`netem.state.default_state_dir`), read at each call."""
    return default_state_dir()


def _python() -> str:
    return sys.executable


class Backend(Protocol):
    name: str

    def up(self) -> None: ...

    def driver_argv(self, argv: Sequence[str]) -> list[str]: ...

    def exec_argv(self, node_id: str, argv: Sequence[str]) -> list[str]: ...

    def counters(self) -> dict[str, dict[str, dict[str, Any]]] | None: ...

    def node_action(self, node_id: str, action: str) -> str: ...

    def set_link(self, node_id: str, nic: str, changes: dict[str, Any]) -> str: ...

    def down(self) -> list[str]: ...


OWNER_MARK = ".dualpath-owner"
"""A file in each data directory a lab makes, holding a random token its record keeps too."""


@dataclass(frozen=True)
class DataDir:
    """A directory a lab made: its path, the identity (device, inode) it had when it was made
    and a random token written into it then (OWNER_MARK). It is removed only while the path
    is still that directory and holds that token, so a record can never make `down` delete
    anything else: a results folder, a link, or a directory made later where one was (the
    token tells it apart from one that got the same inode back)."""

    path: Path
    dev: int
    ino: int
    token: str

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "dev": self.dev, "ino": self.ino, "token": self.token}

    @classmethod
    def from_json(cls, data: Any) -> DataDir | None:
        """The recorded directory, None when the record holds none (or not in this form)."""
        if not isinstance(data, dict):
            return None
        path, dev, ino, token = (data.get(k) for k in ("path", "dev", "ino", "token"))
        if not isinstance(path, str) or not os.path.isabs(path):
            return None
        if not isinstance(dev, int) or not isinstance(ino, int):
            return None
        if not isinstance(token, str) or len(token) < 16:
            return None
        return cls(Path(path), dev, ino, token)

    def is_ours(self) -> bool:
        """The path is still the directory this lab made (a directory, not a link, the same
        device and inode, holding the token)."""
        try:
            st = self.path.lstat()
            if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != (self.dev, self.ino):
                return False
            fd = os.open(self.path / OWNER_MARK, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as fh:
                return secrets.compare_digest(fh.read(128), self.token)
        except (OSError, UnicodeDecodeError):
            return False

    def remove(self) -> bool:
        """Delete the directory and everything in it if `is_ours()`; False when it is not."""
        if not self.is_ours():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return not self.path.exists()


def make_data_dir(lab_id: str, base: Path | None = None) -> DataDir:
    """A new data directory for a lab's storage servers: `tempfile.mkdtemp` (an unpredictable
    name, mode 0700, created by this call and by no one else) under `base`, by default
    `$DUALPATH_DATA_DIR` or /var/tmp, marked with a fresh token. Made before any record names
    it. BackendError naming the directory when it cannot be made."""
    root = base if base is not None else Path(os.environ.get("DUALPATH_DATA_DIR", "/var/tmp"))
    token = secrets.token_hex(16)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"dualpath-{lab_id}-", dir=root))
        st = path.lstat()
        fd = os.open(path / OWNER_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
    except OSError as exc:
        raise BackendError(
            f"cannot make a data directory in {root} ({exc.strerror or exc}): set "
            "DUALPATH_DATA_DIR to a directory you can write"
        ) from None
    return DataDir(path, st.st_dev, st.st_ino, token)


class RunState:
    """The record of processes a lab started (`<state_dir>/<lab_id>.run.json`, 0600): their
    pids, the spec they run, the data directory the lab made (if any) and the lab's secret,
    which the CLI presents to the lab's control endpoint."""

    def __init__(
        self,
        lab_id: str,
        backend: str,
        spec_path: Path,
        data_dir: DataDir | None,
        *,
        secret: str | None = None,
    ) -> None:
        self.path = state_dir() / f"{lab_id}.run.json"
        self.data: dict[str, Any] = {
            "lab_id": lab_id,
            "backend": backend,
            "spec": str(spec_path),
            "data_dir": data_dir.to_json() if data_dir is not None else None,
            "pids": {},
            "created_at": time.time(),
        }
        if secret is not None:
            self.data["secret"] = secret

    def save(self) -> None:
        try:
            ensure_state_dir(self.path.parent)
        except NetemError as exc:
            raise BackendError(str(exc)) from None
        write_record(self.path, json.dumps(self.data, indent=2))

    def add_pid(self, name: str, pid: int) -> None:
        self.data["pids"][name] = pid
        self.save()

    def remove_data_dir(self) -> list[str]:
        """Delete the data directory this lab recorded making (nothing else); what went."""
        return remove_data_dir(self.data)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def remove_data_dir(record: dict[str, Any]) -> list[str]:
    """Delete the data directory a run-state record says its lab made, if the path still is
    that directory (DataDir.remove); never a path by its name alone."""
    made = DataDir.from_json(record.get("data_dir"))
    if made is not None and made.remove():
        return [f"data dir {made.path}"]
    return []


def _is_ours(pid: int, spec_path: str) -> bool:
    """Only signal a recorded pid if it still runs our command line (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    return spec_path in args


def stop_pids(pids: dict[str, int], spec_path: str) -> list[str]:
    """SIGTERM, then SIGKILL after a grace period, the recorded pids that are still ours."""
    live = {name: pid for name, pid in pids.items() if _is_ours(pid, spec_path)}
    for pid in live.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_is_ours(p, spec_path) for p in live.values()):
        time.sleep(0.05)
        for pid in live.values():  # reap our own children
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
    for pid in live.values():
        if _is_ours(pid, spec_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in live.values():
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    return [f"process {name} (pid {pid})" for name, pid in live.items()]


def _signal_node(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal a node and the processes it started (an engine node's data plane): each node
    runs in a session, so a process group, of its own."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
            return
    except ProcessLookupError:
        return
    proc.send_signal(sig)


class ProcessHost:
    """Starts node processes (through `wrap`), records them, stops them."""

    def __init__(self, spec: ClusterSpec, spec_path: Path, log_dir: Path, state: RunState) -> None:
        self.spec = spec
        self.spec_path = spec_path
        self.log_dir = log_dir
        self.state = state
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def wrap(self, node_id: str, argv: list[str]) -> list[str]:
        return argv

    def start_nodes(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        order = [Role.STORAGE, Role.SCHEDULER, Role.PREFILL, Role.DECODE]
        for role in order:
            for node in self.spec.by_role(role):
                self._start(node)
        time.sleep(0.3)
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            logs = "; ".join(f"{n}: see {self.log_dir / (n + '.log')}" for n in dead)
            raise BackendError(f"node processes exited at start: {dead} ({logs})")

    def _start(self, node: NodeSpec) -> None:
        argv = [_python(), "-m", "services", "--spec", str(self.spec_path), "--node", node.node_id]
        log = (self.log_dir / f"{node.node_id}.log").open("ab")
        self._logs.append(log)
        env = node_environment(os.environ)
        proc = subprocess.Popen(
            self.wrap(node.node_id, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the runner, which stops nodes in order
        )
        self.procs[node.node_id] = proc
        self.state.add_pid(node.node_id, proc.pid)

    def node_action(self, node_id: str, action: str) -> str:
        """stop (SIGSTOP), cont (SIGCONT), kill (SIGKILL) or restart one node's process; returns
        what was done. Only the process this lab started (and recorded) is ever signalled."""
        proc = self.procs.get(node_id)
        if proc is None:
            raise BackendError(f"no node {node_id!r} in this lab")
        running = proc.poll() is None
        if action == "restart":
            if running:
                _signal_node(proc, signal.SIGKILL)
                proc.wait()
            self._start(self.spec.node(node_id))
            return f"{node_id} restarted (pid {self.procs[node_id].pid})"
        sig = {"stop": signal.SIGSTOP, "cont": signal.SIGCONT, "kill": signal.SIGKILL}.get(action)
        if sig is None:
            raise BackendError(f"unknown node action {action!r} (stop, cont, kill or restart)")
        if not running:
            return f"{node_id} is not running (exit status {proc.returncode}): {action} skipped"
        _signal_node(proc, sig)
        if sig is signal.SIGKILL:
            proc.wait()
        return f"{node_id} {action} (pid {proc.pid})"

    def stop_nodes(self) -> list[str]:
        for proc in self.procs.values():  # a stopped process cannot handle SIGTERM
            if proc.poll() is None:
                _signal_node(proc, signal.SIGCONT)
        removed = stop_pids({n: p.pid for n, p in self.procs.items()}, str(self.spec_path))
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        for log in self._logs:
            log.close()
        return removed


class LocalBackend(ProcessHost):
    """Every node on 127.0.0.1, unshaped: for tests and machines without CAP_NET_ADMIN."""

    name = "local"

    def up(self) -> None:
        self.state.save()
        self.start_nodes()

    def driver_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def exec_argv(self, node_id: str, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def counters(self) -> dict[str, dict[str, dict[str, Any]]] | None:
        return None

    def set_link(self, node_id: str, nic: str, changes: dict[str, Any]) -> str:
        raise BackendError("the local backend has no shaped links: use --backend netns")

    def down(self) -> list[str]:
        removed = self.stop_nodes()
        removed += self.state.remove_data_dir()
        self.state.remove()
        return removed


class NetnsBackend(ProcessHost):
    """One network namespace per node, bridges in a switch namespace, HTB/IFB shaping."""

    name = "netns"

    def __init__(
        self,
        spec: ClusterSpec,
        spec_path: Path,
        log_dir: Path,
        state: RunState,
        *,
        kv_min_fraction: float,
        allow_unemulated: bool = False,
    ) -> None:
        """`allow_unemulated`: bring the lab up even when a link feature (e.g. delay on a
        kernel without sch_netem) cannot be emulated; otherwise `up` fails naming it."""
        super().__init__(spec, spec_path, log_dir, state)
        require_net_admin()
        if shutil.which("ip") is None:
            raise BackendError("the netns backend needs iproute2 ('ip'): apt-get install iproute2")
        self.lab = NetnsLab(
            topology_for(spec, kv_min_fraction),
            state_dir=state_dir(),
            allow_unemulated=allow_unemulated,
        )

    def wrap(self, node_id: str, argv: list[str]) -> list[str]:
        return self.lab.exec_argv(node_id, argv)

    def up(self) -> None:
        self.state.save()
        self.lab.up()
        self.start_nodes()

    def driver_argv(self, argv: Sequence[str]) -> list[str]:
        return self.lab.exec_argv("scheduler", argv)

    def exec_argv(self, node_id: str, argv: Sequence[str]) -> list[str]:
        return self.lab.exec_argv(node_id, argv)

    def counters(self) -> dict[str, dict[str, dict[str, Any]]] | None:
        from dataclasses import asdict

        raw = self.lab.counters()
        return {node: {nic: asdict(c) for nic, c in nics.items()} for node, nics in raw.items()}

    def set_link(self, node_id: str, nic: str, changes: dict[str, Any]) -> str:
        """Change one NIC in place (netem.netns.NetnsLab.set_link); returns what changed."""
        made = self.lab.set_link(node_id, nic, **changes)
        what = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items()
        )
        return f"{node_id}/{nic}: {what} ({len(made)} kernel changes)"

    def down(self) -> list[str]:
        removed = self.stop_nodes()
        removed += self.lab.down()
        removed += self.state.remove_data_dir()
        self.state.remove()
        return removed


PORT_FLOOR = 10000
"""Local labs listen above this port and below the kernel's ephemeral range."""


def ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def ports_free(base: int, count: int) -> bool:
    """Each port bindable as the servers bind (SO_REUSEADDR, as asyncio, aiohttp and gRPC do):
    a port whose only sockets are in TIME_WAIT is free to them, so it is free here."""
    for port in range(base, base + count):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port_base(count: int) -> int:
    """A base port with `count` consecutive free TCP ports on 127.0.0.1, drawn below the
    ephemeral range: there no outgoing connection takes a lab's port while a node is down (a
    restarting node rebinds it), and earlier runs' clients leave no TIME_WAIT sockets."""
    low = ephemeral_low()
    rng = random.Random()
    if low - count > PORT_FLOOR:
        for _ in range(200):
            base = rng.randrange(PORT_FLOOR, low - count)
            if ports_free(base, count):
                return base
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count < 65000 and ports_free(base, count):
            return base
    raise BackendError(f"no {count} consecutive free ports on 127.0.0.1")


CONTROLLER_GRACE_S = 60.0
"""How long `down` waits for a lab's controller to take the lab down itself."""


def _is_controller(pid: int, lab_id: str) -> bool:
    """The recorded pid still runs `dualpath up --lab-id <lab_id>` (pids get reused)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a == b"--lab-id" and b == lab_id.encode() for a, b in itertools.pairwise(args))


def stop_controller(pid: int, lab_id: str) -> bool:
    """SIGTERM a lab's controller and wait until it has taken its lab down (True), or give
    up after CONTROLLER_GRACE_S and SIGKILL it (False: the caller cleans up from the record)."""
    if not _is_controller(pid, lab_id):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + CONTROLLER_GRACE_S
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if not _is_controller(pid, lab_id):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return False


def down_recorded(
    lab_id: str | None = None,
    *,
    down_stack: Callable[[dict[str, Any]], list[str]] | None = None,
) -> list[str]:
    """Stop every recorded lab's processes and remove its network (used by `dualpath down`).
    A compose stack's record is taken down by `down_stack` (compose.backend.down_stack).

    A lab brought up by `dualpath up` has a controller process that owns it: it is asked to
    take its lab down first; whatever a crashed controller left is removed from the record."""
    removed: list[str] = []
    sdir = state_dir()
    if sdir.is_dir():
        for path in sorted(sdir.glob("*.run.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if lab_id is not None and data.get("lab_id") != lab_id:
                continue
            ctl = data.get("controller_pid")
            if isinstance(ctl, int) and stop_controller(ctl, str(data.get("lab_id"))):
                removed.append(
                    f"lab {data.get('lab_id')} (taken down by its controller, pid {ctl})"
                )
                if not path.exists():
                    continue
                with contextlib.suppress(OSError, json.JSONDecodeError):
                    data = json.loads(path.read_text())
            if data.get("backend") == "compose" and down_stack is not None:
                removed += down_stack(data)
            removed += stop_pids(dict(data.get("pids", {})), str(data.get("spec")))
            removed += remove_data_dir(data)
            path.unlink(missing_ok=True)
    if lab_id is not None:
        if lab_id in recorded_labs(sdir):
            removed += down_from_state(lab_id, state_dir=sdir)
    elif recorded_labs(sdir):
        removed += down_from_state(None, state_dir=sdir)
    return removed

"""The netns applier: builds a TopologyPlan as namespaces, veths, bridges, IFBs and HTB trees
with pyroute2, recording each namespace before creating it, and removes exactly those. It never
touches the host's namespace (the bridges live in `dp-<lab>-sw`) and never builds tc command
strings; its only subprocesses are `ip netns exec <lab namespace> sysctl`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from errno import EEXIST, ENOENT
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from netem.counters import NicCounters, NicSource, read_nics
from netem.errors import NetemError, NetemPermissionError
from netem.plan import (
    CLASS_IDS,
    ClassOp,
    HostPlan,
    LinkOp,
    Op,
    QdiscOp,
    TopologyPlan,
    U32Key,
    format_handle,
    ifb_name,
    plan_nic,
    plan_topology,
)
from netem.spec import NicSpec, TopologySpec
from netem.state import LabState, recorded_paths, state_path

__all__ = [
    "DEFAULT_STATE_DIR",
    "NetemError",
    "NetemPermissionError",
    "NetnsLab",
    "apply_shaping",
    "down_from_state",
    "recorded_labs",
    "require_net_admin",
]

DEFAULT_STATE_DIR = Path(os.environ.get("DUALPATH_STATE_DIR", "/run/dualpath"))
NETNS_RUN_DIR = Path(pr_netns.NETNS_RUN_DIR)

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
"""Creating a namespace is unshare(CLONE_NEWNET) + a bind mount: both need CAP_SYS_ADMIN."""

PERMISSION_MESSAGE = (
    "the netns backend needs root or CAP_NET_ADMIN: run with sudo, "
    "or use --backend local (unshaped, on loopback)"
)

SWITCH_SYSCTLS = (
    # Bridge netfilter is per namespace and on by default when br_netfilter is loaded; the
    # switch namespace has no rules, but skipping the hooks costs nothing and makes the
    # switch immune to whatever a later kernel or tool loads (`-e`: absent keys are fine).
    "net.bridge.bridge-nf-call-iptables=0",
    "net.bridge.bridge-nf-call-ip6tables=0",
    "net.bridge.bridge-nf-call-arptables=0",
)
NODE_SYSCTLS = (
    # The lab is IPv4 only; without IPv6 no router solicitations, MLD reports or DAD probes
    # show up in the counters or the kv class.
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
)

T = TypeVar("T")


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _require_caps(*caps: tuple[int, str]) -> None:
    have = _effective_caps()
    missing = [name for bit, name in caps if not have >> bit & 1]
    if missing:
        raise NetemPermissionError(
            PERMISSION_MESSAGE, operation=f"capability check (missing {', '.join(missing)})"
        )


def require_net_admin() -> None:
    """Raise NetemPermissionError unless this process may create namespaces and shape links."""
    _require_caps((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))


def _wrap(operation: str, fn: Callable[[], T]) -> T:
    """Run one kernel operation; any failure becomes a NetemError naming it (and its errno)."""
    try:
        return fn()
    except NetemError:
        raise
    except NetlinkError as exc:
        # The kernel's extended ack (when it sends one) says more than the errno.
        detail = exc.args[1] if len(exc.args) > 1 and exc.args[1] else os.strerror(exc.code)
        raise NetemError(
            f"{operation} failed: {detail}", operation=operation, errno=exc.code
        ) from exc
    except OSError as exc:
        raise NetemError(
            f"{operation} failed: {exc.strerror or exc}", operation=operation, errno=exc.errno
        ) from exc


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _thread_setns(fd: int) -> None:
    """Move only the calling thread into the namespace `fd` refers to (setns(2) is per task)."""
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def _thread_in_netns(name: str) -> Iterator[None]:
    """Run a block with this thread inside netns `name`, then come back.

    pyroute2's `netns=` handles and `netns.create()` fork a helper process per call; forking a
    process that has other threads can deadlock the child on a lock some thread held at fork
    time (seen here as a hung `up()`). Sockets keep the namespace they were created in, so
    entering the namespace on this one thread, opening the socket and leaving needs no fork.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
        try:
            _thread_setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _thread_setns(home)
    finally:
        os.close(home)


def _create_netns(name: str) -> None:
    """Create and bind-mount a named namespace without forking (see `_thread_in_netns`)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(_CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        try:
            # /proc/thread-self, not /proc/self: only this thread is in the new namespace.
            pr_netns.attach(name, "thread-self")
        finally:
            _thread_setns(home)
    finally:
        os.close(home)


class _NetlinkThread:
    """One thread that owns every pyroute2 handle of a lab.

    pyroute2's synchronous API runs its own event loop, which cannot run inside a thread whose
    loop is already running; confining all netlink work to this thread makes `up`, `down` and
    `counters` callable from plain code and from asyncio code alike.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident = self._pool.submit(threading.get_ident).result()

    def call(self, fn: Callable[[], T]) -> T:
        if threading.get_ident() == self._ident:
            return fn()
        return self._pool.submit(fn).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _describe(op: Op) -> str:
    """The operation in tc/ip vocabulary, for error messages only (never executed)."""
    if isinstance(op, LinkOp):
        return f"ip link add {op.ifname} type {op.kind} txqueuelen {op.txqueuelen}"
    if isinstance(op, QdiscOp):
        return (
            f"tc qdisc add dev {op.dev} {format_handle(op.parent)} "
            f"handle {format_handle(op.handle)} {op.kind}"
        )
    if isinstance(op, ClassOp):
        return (
            f"tc class add dev {op.dev} parent {format_handle(op.parent)} "
            f"classid {format_handle(op.classid)} htb rate {op.rate_bit}bit ceil {op.ceil_bit}bit"
        )
    target = f"redirect to {op.action.dev}" if op.action else f"flowid {format_handle(op.classid)}"
    return (
        f"tc filter add dev {op.dev} parent {format_handle(op.parent)} prio {op.prio} u32 {target}"
    )


def _u32_key(key: U32Key) -> str:
    """pyroute2's u32 key notation `value/mask+offset` (a library argument, not a tc command).

    pyroute2 derives the byte offset of the match from the leading zero bytes of the mask as
    written, so the mask is always written with all 8 hex digits; it also requires the set
    bytes of the mask to be contiguous, which is checked here."""
    if key.mask == 0:
        return f"0x0/0x0+{key.offset}"
    mask_bytes = key.mask.to_bytes(4, "big")
    used = [i for i, b in enumerate(mask_bytes) if b]
    if used != list(range(used[0], used[-1] + 1)) or key.value & ~key.mask:
        raise ValueError(f"u32 key {key} needs a contiguous mask covering its value")
    return f"0x{key.value:08x}/0x{key.mask:08x}+{key.offset}"


def _link_index(ipr: Any, where: str, ifname: str) -> int:
    found = _wrap(f"ip link show {ifname} ({where})", partial(ipr.link_lookup, ifname=ifname))
    if not found:
        raise NetemError(f"{where}: no interface {ifname}", operation=f"ip link show {ifname}")
    return int(found[0])


def _link_up(ipr: Any, where: str, ifname: str, **extra: int) -> None:
    index = _link_index(ipr, where, ifname)
    _wrap(
        f"ip link set {ifname} up ({where})",
        partial(ipr.link, "set", index=index, state="up", **extra),
    )


def _apply_op(ipr: Any, where: str, op: Op) -> None:
    """Execute one planned operation with `ipr` (create-exclusive: never replaces anything)."""
    what = f"{_describe(op)} ({where})"
    if isinstance(op, LinkOp):
        _wrap(what, partial(ipr.link, "add", ifname=op.ifname, kind=op.kind, txqlen=op.txqueuelen))
        _link_up(ipr, where, op.ifname)
        return
    index = _link_index(ipr, where, op.dev)
    if isinstance(op, QdiscOp):
        if op.kind == "htb":
            call = partial(
                ipr.tc,
                "add",
                "htb",
                index=index,
                handle=op.handle,
                parent=op.parent,
                default=op.default_class,
            )
        else:
            call = partial(ipr.tc, "add", "ingress", index=index)
        _wrap(what, call)
    elif isinstance(op, ClassOp):
        _wrap(
            what,
            partial(
                ipr.tc,
                "add-class",
                "htb",
                index=index,
                handle=op.classid,
                parent=op.parent,
                rate=op.rate_bit // 8,
                ceil=op.ceil_bit // 8,
                burst=op.burst_bytes,
                cburst=op.cburst_bytes,
                prio=op.prio,
                quantum=op.quantum_bytes,
            ),
        )
    else:
        extra: dict[str, Any] = {}
        if op.action is not None:
            extra["action"] = {
                "kind": "mirred",
                "direction": "egress",
                "action": "redirect",
                "ifindex": _link_index(ipr, where, op.action.dev),
            }
        _wrap(
            what,
            partial(
                ipr.tc,
                "add-filter",
                "u32",
                index=index,
                parent=op.parent,
                prio=op.prio,
                protocol=op.protocol,
                target=op.classid,
                keys=[_u32_key(k) for k in op.keys],
                **extra,
            ),
        )


def _undo(ipr: Any, where: str, done: Sequence[Op]) -> None:
    """Best-effort removal of what `done` created (classes and filters go with their qdisc)."""
    for op in reversed(done):
        with contextlib.suppress(NetemError):
            if isinstance(op, LinkOp):
                index = _link_index(ipr, where, op.ifname)
                _wrap(f"ip link del {op.ifname} ({where})", partial(ipr.link, "del", index=index))
            elif isinstance(op, QdiscOp):
                index = _link_index(ipr, where, op.dev)
                _wrap(
                    f"tc qdisc del dev {op.dev} {format_handle(op.parent)} ({where})",
                    partial(
                        ipr.tc, "del", op.kind, index=index, handle=op.handle, parent=op.parent
                    ),
                )


def _nic_sources(host: HostPlan) -> list[NicSource]:
    sources: list[NicSource] = []
    for nic_plan in host.nics:
        nic = nic_plan.nic
        shape = nic.shape
        classes: tuple[tuple[str, int], ...] = ()
        if shape is not None and shape.priority_classes:
            classes = tuple(CLASS_IDS.items())
        sources.append(
            NicSource(
                name=nic.name,
                ifb=ifb_name(nic.name) if shape is not None else None,
                rate_mbit=shape.rate_mbit if shape is not None else None,
                classes=classes,
            )
        )
    return sources


def _remove_namespace(name: str) -> bool:
    """Unmount and unlink one named namespace; False if it was already gone."""
    if not (NETNS_RUN_DIR / name).exists():
        return False
    try:
        _wrap(f"ip netns delete {name}", lambda: pr_netns.remove(name))
    except NetemError as exc:
        if exc.errno == ENOENT:
            return False
        raise
    return True


def _remove_recorded(state: LabState) -> list[str]:
    """Remove every namespace in the record (last created first), then the record itself.

    A namespace that cannot be removed stays in the record so `down` can be retried."""
    removed: list[str] = []
    failed: list[NetemError] = []
    if any((NETNS_RUN_DIR / name).exists() for name in state.record.namespaces):
        require_net_admin()
    for name in reversed(list(state.record.namespaces)):
        try:
            if _remove_namespace(name):
                removed.append(name)
        except NetemError as exc:
            failed.append(exc)
            continue
        state.discard_namespace(name)
    if failed:
        raise NetemError(
            f"could not remove {len(failed)} namespace(s) of lab {state.record.lab_id}: "
            + "; ".join(str(e) for e in failed),
            operation=failed[0].operation,
            errno=failed[0].errno,
        )
    state.delete()
    return removed


class NetnsLab:
    """One lab on the netns backend: `up()` builds it, `down()` removes what `up()` made."""

    def __init__(self, spec: TopologySpec, *, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.spec = spec
        self.plan: TopologyPlan = plan_topology(spec)
        self.state_dir = Path(state_dir)
        self._state: LabState | None = None
        self._thread: _NetlinkThread | None = None
        self._handles: dict[str, Any] = {}
        self._sources = {h.node_id: _nic_sources(h) for h in self.plan.hosts}
        self._lock = threading.Lock()

    # --- names ---------------------------------------------------------------------------
    @property
    def lab_id(self) -> str:
        return self.spec.lab_id

    @property
    def switch_namespace(self) -> str:
        return self.plan.switch_namespace

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab (switch first)."""
        return self.plan.namespaces

    @property
    def state_file(self) -> Path:
        return state_path(self.state_dir, self.lab_id)

    def namespace(self, node_id: str) -> str:
        return self.plan.host(node_id).namespace

    def exec_argv(self, node_id: str, argv: Sequence[str]) -> list[str]:
        """argv that runs `argv` inside the node's namespace (for subprocess)."""
        return ["ip", "netns", "exec", self.namespace(node_id), *argv]

    # --- lifecycle -----------------------------------------------------------------------
    def up(self) -> None:
        """Create the lab. Raises NetemError if a lab with this id is already recorded; on
        any failure removes what it made so far and re-raises."""
        require_net_admin()
        with self._lock:
            if self._state is not None:
                raise NetemError(f"lab {self.lab_id} is already up", operation="up")
            self._thread = _NetlinkThread(f"netem-{self.lab_id}")
            try:
                self._thread.call(self._up)
            except BaseException:
                self._thread.close()
                self._thread = None
                raise

    def down(self) -> list[str]:
        """Remove exactly the namespaces this lab recorded; return their names. Idempotent:
        a lab that is not up (or whose up() failed before claiming its id) removes nothing."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return []
            try:
                return thread.call(self._down)
            finally:
                thread.close()

    def counters(self) -> dict[str, dict[str, NicCounters]]:
        """node_id -> NIC name -> cumulative counters (one netlink round per namespace)."""
        thread = self._thread
        if thread is None:
            raise NetemError(f"lab {self.lab_id} is not up", operation="read counters")
        try:
            return thread.call(self._read_counters)
        except RuntimeError as exc:  # down() shut the netlink thread while we were queued
            raise NetemError(f"lab {self.lab_id} is not up", operation="read counters") from exc

    # --- on the netlink thread -----------------------------------------------------------
    def _up(self) -> None:
        state = LabState.create(self.state_dir, self.lab_id)
        self._state = state
        try:
            self._build(state)
        except BaseException:
            # The record keeps whatever could not be removed; the first error is the one raised.
            with contextlib.suppress(NetemError):
                self._down()
            raise

    def _down(self) -> list[str]:
        for handle in self._handles.values():
            with contextlib.suppress(Exception):  # a socket whose namespace is gone
                handle.close()
        self._handles.clear()
        state, self._state = self._state, None
        if state is None:
            return []
        if not state.path.exists():
            return []  # down_from_state already removed this lab
        current = LabState.load(state.path)
        if current.record.token != state.record.token:
            return []  # the record is another lab's now (ours was removed and the id reused)
        return _remove_recorded(current)

    def _ipr(self, namespace: str) -> Any:
        handle = self._handles.get(namespace)
        if handle is None:
            # flags=0: never create a namespace as a side effect of opening a handle.
            handle = _wrap(
                f"open netlink socket in netns {namespace}",
                lambda: self._open_ipr(namespace),
            )
            self._handles[namespace] = handle
        return handle

    @staticmethod
    def _open_ipr(namespace: str) -> Any:
        with _thread_in_netns(namespace):
            return IPRoute()

    def _index(self, namespace: str, ifname: str) -> int:
        return _link_index(self._ipr(namespace), f"netns {namespace}", ifname)

    def _create_namespace(self, state: LabState, name: str) -> None:
        state.add_namespace(name)  # recorded before it exists: a crash leaves a record
        try:
            _create_netns(name)
        except FileExistsError:
            state.discard_namespace(name)
            raise NetemError(
                f"namespace {name} already exists and this lab did not create it; "
                "refusing to touch it",
                operation=f"ip netns add {name}",
                errno=EEXIST,
            ) from None
        except OSError as exc:
            raise NetemError(
                f"ip netns add {name} failed", operation=f"ip netns add {name}", errno=exc.errno
            ) from exc

    def _sysctl(self, namespace: str, settings: Sequence[str]) -> None:
        argv = ["ip", "netns", "exec", namespace, "sysctl", "-q", "-e", "-w", *settings]
        operation = " ".join(argv)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetemError(f"{operation} failed: {exc}", operation=operation) from exc
        if done.returncode != 0:
            raise NetemError(
                f"{operation} exited {done.returncode}: {done.stderr.strip()}", operation=operation
            )

    def _set_up(self, namespace: str, ifname: str, **extra: int) -> None:
        _link_up(self._ipr(namespace), f"netns {namespace}", ifname, **extra)

    def _build(self, state: LabState) -> None:
        plan = self.plan
        for name in plan.namespaces:
            self._create_namespace(state, name)
        sw_ns = plan.switch_namespace
        self._sysctl(sw_ns, (*SWITCH_SYSCTLS, *NODE_SYSCTLS))
        for host in plan.hosts:
            self._sysctl(host.namespace, NODE_SYSCTLS)
        for name in plan.namespaces:
            self._set_up(name, "lo")
        sw = self._ipr(sw_ns)
        for bridge, _network in plan.bridges:
            _wrap(
                f"ip -n {sw_ns} link add {bridge} type bridge",
                partial(sw.link, "add", ifname=bridge, kind="bridge"),
            )
            self._set_up(sw_ns, bridge)
        for host in plan.hosts:
            self._build_host(host)

    def _build_host(self, host: HostPlan) -> None:
        sw_ns, ns = self.plan.switch_namespace, host.namespace
        sw, ipr = self._ipr(sw_ns), self._ipr(ns)
        for nic_plan in host.nics:
            nic = nic_plan.nic
            fd = _wrap(f"open netns {ns}", lambda: os.open(NETNS_RUN_DIR / ns, os.O_RDONLY))
            try:
                _wrap(
                    f"ip -n {sw_ns} link add {nic_plan.switch_ifname} type veth "
                    f"peer name {nic.name} netns {ns}",
                    partial(
                        sw.link,
                        "add",
                        ifname=nic_plan.switch_ifname,
                        kind="veth",
                        peer={"ifname": nic.name, "net_ns_fd": fd},
                    ),
                )
            finally:
                os.close(fd)
            master = self._index(sw_ns, nic_plan.bridge)
            self._set_up(sw_ns, nic_plan.switch_ifname, master=master)
            iface = nic.interface
            index = self._index(ns, nic.name)
            _wrap(
                f"ip -n {ns} addr add {nic.address} dev {nic.name}",
                partial(
                    ipr.addr,
                    "add",
                    index=index,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                ),
            )
            self._set_up(ns, nic.name)
            for op in nic_plan.shaping:
                self._apply(ns, op)

    def _apply(self, ns: str, op: Op) -> None:
        _apply_op(self._ipr(ns), f"netns {ns}", op)

    def _read_counters(self) -> dict[str, dict[str, NicCounters]]:
        out: dict[str, dict[str, NicCounters]] = {}
        for host in self.plan.hosts:
            ipr = self._ipr(host.namespace)
            out[host.node_id] = _wrap(
                f"read counters in netns {host.namespace}",
                partial(read_nics, ipr, host.namespace, self._sources[host.node_id]),
            )
        return out


def apply_shaping(nic: NicSpec, *, netns: str | None = None) -> tuple[Op, ...]:
    """Shape an existing interface `nic.name` with `plan_nic(nic)`; return the operations.

    For backends that do not build namespaces, e.g. a compose container's entrypoint shaping
    its own eth1 (`netns=None`: this process's namespace; needs CAP_NET_ADMIN only). Fails
    closed: if the interface already has a qdisc of its own, or `ifb-<nic>` exists, nothing is
    changed and NetemError is raised; on a failure half-way, what this call added is removed.
    """
    ops = plan_nic(nic)
    if not ops:
        return ops
    caps = [(CAP_NET_ADMIN, "CAP_NET_ADMIN")]
    if netns is not None:
        caps.append((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))  # setns() into a named namespace
    _require_caps(*caps)
    where = f"netns {netns}" if netns is not None else "this namespace"

    def shape() -> None:
        ipr = _wrap(
            f"open netlink socket ({where})",
            partial(IPRoute, netns=netns, flags=0) if netns is not None else IPRoute,
        )
        done: list[Op] = []
        try:
            for op in ops:
                _apply_op(ipr, where, op)
                done.append(op)
        except BaseException:
            _undo(ipr, where, done)
            raise
        finally:
            ipr.close()

    thread = _NetlinkThread("netem-shape")
    try:
        thread.call(shape)
    finally:
        thread.close()
    return ops


def recorded_labs(state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
    """Ids of every lab with a record in `state_dir` (up, or left behind by a crash)."""
    return [p.stem for p in recorded_paths(Path(state_dir))]


def down_from_state(lab_id: str | None = None, *, state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
    """Remove the namespaces recorded for `lab_id` (None: every recorded lab), then the records.

    For `dualpath down` after a crash: it needs nothing but the state files. Returns the names
    removed. Names outside `dp-<lab_id>-` in a record are refused, never deleted."""
    state_dir = Path(state_dir)
    if lab_id is None:
        paths = recorded_paths(state_dir)
    else:
        path = state_path(state_dir, lab_id)
        paths = [path] if path.exists() else []
    if not paths:
        return []
    removed: list[str] = []
    errors: list[NetemError] = []
    for path in paths:
        try:
            state = LabState.load(path)
            if state.record.lab_id != path.stem:
                raise NetemError(
                    f"{path}: records lab {state.record.lab_id!r}, not {path.stem!r}",
                    operation=f"read {path}",
                )
            removed += _remove_recorded(state)
        except NetemError as exc:
            errors.append(exc)
    if errors:
        raise NetemError(
            "; ".join(str(e) for e in errors), operation=errors[0].operation, errno=errors[0].errno
        )
    return removed

"""Kernel plumbing shared by the appliers and the doctor: capability checks, entering a named
network namespace on one thread (setns, unshare, no fork), the netlink thread, per-namespace
pyroute2 handles, link lookups, the ethtool offload ioctl and `sysctl` inside a namespace.
It knows nothing of plans or labs; every failure becomes a NetemError naming the operation.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from errno import ENOENT
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from netem.errors import NetemError, NetemPermissionError

NETNS_RUN_DIR = Path(pr_netns.NETNS_RUN_DIR)

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
"""Creating a namespace is unshare(CLONE_NEWNET) + a bind mount: both need CAP_SYS_ADMIN."""

PERMISSION_MESSAGE = (
    "the netns backend needs root or CAP_NET_ADMIN: run with sudo, "
    "or use --backend local (unshaped, on loopback)"
)

T = TypeVar("T")


# --- capabilities ----------------------------------------------------------------------------
def effective_caps() -> int:
    """This process's effective capability bits (CapEff); 0 when unreadable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_cap(bit: int) -> bool:
    return bool(effective_caps() >> bit & 1)


def require_caps(*caps: tuple[int, str]) -> None:
    """Raise NetemPermissionError naming every (bit, name) this process lacks."""
    have = effective_caps()
    missing = [name for bit, name in caps if not have >> bit & 1]
    if missing:
        raise NetemPermissionError(
            PERMISSION_MESSAGE, operation=f"capability check (missing {', '.join(missing)})"
        )


def require_net_admin() -> None:
    """Raise NetemPermissionError unless this process may create namespaces and shape links."""
    require_caps((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))


# --- errors ----------------------------------------------------------------------------------
def wrap(operation: str, fn: Callable[[], T]) -> T:
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


# --- namespaces ------------------------------------------------------------------------------
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _thread_setns(fd: int) -> None:
    """Move only the calling thread into the namespace `fd` refers to (setns(2) is per task)."""
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def thread_in_netns(name: str) -> Iterator[None]:
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


def create_netns(name: str) -> None:
    """Create and bind-mount a named namespace without forking (see `thread_in_netns`)."""
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


def remove_namespace(name: str) -> bool:
    """Unmount and unlink one named namespace; False if it was already gone."""
    if not (NETNS_RUN_DIR / name).exists():
        return False
    try:
        wrap(f"ip netns delete {name}", lambda: pr_netns.remove(name))
    except NetemError as exc:
        if exc.errno == ENOENT:
            return False
        raise
    return True


def open_iproute(namespace: str) -> Any:
    """An IPRoute socket inside netns `namespace`, opened without a fork."""
    with thread_in_netns(namespace):
        return IPRoute()


def sysctl(namespace: str, settings: Sequence[str]) -> None:
    """`sysctl -q -e -w SETTINGS` inside `namespace` (an argv, never a shell)."""
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


class NetlinkThread:
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


class NetnsHandles:
    """The pyroute2 handles of a lab, one per namespace, opened on first use (on the netlink
    thread: a handle is only ever used from the thread that opened it)."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def get(self, namespace: str) -> Any:
        handle = self._handles.get(namespace)
        if handle is None:
            # Opened by setns, never with pyroute2's netns= (which could create a namespace).
            handle = wrap(
                f"open netlink socket in netns {namespace}", partial(open_iproute, namespace)
            )
            self._handles[namespace] = handle
        return handle

    def index(self, namespace: str, ifname: str) -> int:
        return link_index(self.get(namespace), f"netns {namespace}", ifname)

    def set_up(self, namespace: str, ifname: str, **extra: int) -> None:
        link_up(self.get(namespace), f"netns {namespace}", ifname, **extra)

    def close(self) -> None:
        for handle in self._handles.values():
            with contextlib.suppress(Exception):  # a socket whose namespace is gone
                handle.close()
        self._handles.clear()


# --- links -----------------------------------------------------------------------------------
def link_index(ipr: Any, where: str, ifname: str) -> int:
    found = wrap(f"ip link show {ifname} ({where})", partial(ipr.link_lookup, ifname=ifname))
    if not found:
        raise NetemError(f"{where}: no interface {ifname}", operation=f"ip link show {ifname}")
    return int(found[0])


def link_up(ipr: Any, where: str, ifname: str, **extra: int) -> None:
    index = link_index(ipr, where, ifname)
    wrap(
        f"ip link set {ifname} up ({where})",
        partial(ipr.link, "set", index=index, state="up", **extra),
    )


def set_link_state(ipr: Any, where: str, ifname: str, up: bool) -> None:
    """`ip link set IFNAME up|down` (the veth peer of a NIC set down loses carrier)."""
    index = link_index(ipr, where, ifname)
    state = "up" if up else "down"
    wrap(
        f"ip link set {ifname} {state} ({where})",
        partial(ipr.link, "set", index=index, state=state),
    )


SIOCETHTOOL = 0x8946
ETHTOOL_STSO = 0x1F
ETHTOOL_SGSO = 0x24
"""Legacy ethtool set-TSO / set-GSO commands (struct ethtool_value): every kernel has them."""


def offloads_off(ifname: str, namespace: str | None = None) -> None:
    """`ethtool -K <ifname> tso off gso off`, by ioctl (no ethtool binary, no fork), in
    `namespace` (None: this thread's own): a socket opened in a namespace addresses that
    namespace's devices."""
    if namespace is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        with thread_in_netns(namespace):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for cmd in (ETHTOOL_STSO, ETHTOOL_SGSO):
            value = array.array("I", [cmd, 0])
            ifreq = struct.pack("16sP", ifname.encode(), value.buffer_info()[0])
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    finally:
        sock.close()

"""The netns applier: builds a TopologyPlan as namespaces, veths, bridges, IFBs, HTB trees and
netem leaves with pyroute2, recording each namespace before creating it, and removes exactly
those; changes a running lab's links in place (`NetnsLab.set_link`) after checking they are
still the lab's. It never touches the host's namespace (the bridges live in `dp-<lab>-sw`) and
never builds tc command strings; its only subprocesses are argv lists run with `ip netns exec
<lab namespace>`: `sysctl`, and `nft -j` fed JSON documents the planner built.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from errno import EEXIST, ENOENT
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from netem.capabilities import KernelCaps
from netem.counters import NicCounters, NicSource, read_nics
from netem.errors import NetemError, NetemPermissionError
from netem.plan import (
    CLASS_IDS,
    NFT_CHAIN,
    NFT_FAMILY,
    NFT_TABLE,
    NUMGEN_MOD,
    Change,
    ClassOp,
    HostPlan,
    LinkOp,
    LinkStateOp,
    LossRuleOp,
    NetemParams,
    NicShaping,
    Op,
    QdiscOp,
    RuleChange,
    TcChange,
    TopologyPlan,
    U32Key,
    Unemulated,
    expected_classes,
    expected_qdiscs,
    format_handle,
    ifb_name,
    impaired_networks,
    nft_batch,
    nft_rule,
    nft_setup,
    plan_change,
    plan_topology,
    shape_nic,
)
from netem.spec import (
    DIRECTIONS,
    DirectionSpec,
    HostSpec,
    NicSpec,
    SpecError,
    TopologySpec,
)
from netem.state import LabState, default_state_dir, recorded_paths, state_path

__all__ = [
    "DEFAULT_STATE_DIR",
    "NetemError",
    "NetemPermissionError",
    "NetnsLab",
    "apply_shaping",
    "down_from_state",
    "namespace_holders",
    "recorded_labs",
    "require_net_admin",
]

DEFAULT_STATE_DIR = default_state_dir()
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


SIOCETHTOOL = 0x8946
ETHTOOL_STSO = 0x1F
ETHTOOL_SGSO = 0x24
"""Legacy ethtool set-TSO / set-GSO commands (struct ethtool_value): every kernel has them."""


def _offloads_off(namespace: str, ifname: str) -> None:
    """`ethtool -K <ifname> tso off gso off` inside `namespace`, by ioctl (no ethtool binary,
    no fork): a socket opened in the namespace addresses that namespace's devices."""
    with _thread_in_netns(namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for cmd in (ETHTOOL_STSO, ETHTOOL_SGSO):
            value = array.array("I", [cmd, 0])
            ifreq = struct.pack("16sP", ifname.encode(), value.buffer_info()[0])
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    finally:
        sock.close()


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


def _describe(op: Op, verb: str = "add") -> str:
    """The operation in tc/ip vocabulary, for error messages and the lab record only (never
    executed)."""
    if isinstance(op, LinkOp):
        return f"ip link {verb} {op.ifname} type {op.kind} txqueuelen {op.txqueuelen}"
    if isinstance(op, QdiscOp):
        text = (
            f"tc qdisc {verb} dev {op.dev} {format_handle(op.parent)} "
            f"handle {format_handle(op.handle)} {op.kind}"
        )
        if op.kind == "pfifo":
            text += f" limit {op.limit_packets}"
        if op.netem is not None:
            n = op.netem
            text += (
                f" limit {op.limit_packets} delay {n.delay_us}us {n.jitter_us}us"
                f" loss {n.loss_pct:g}% duplicate {n.duplicate_pct:g}%"
                f" corrupt {n.corrupt_pct:g}% reorder {n.reorder_pct:g}%"
            )
        return text
    if isinstance(op, ClassOp):
        return (
            f"tc class {verb} dev {op.dev} parent {format_handle(op.parent)} "
            f"classid {format_handle(op.classid)} htb rate {op.rate_bit}bit ceil {op.ceil_bit}bit"
        )
    target = f"redirect to {op.action.dev}" if op.action else f"flowid {format_handle(op.classid)}"
    return (
        f"tc filter {verb} dev {op.dev} parent {format_handle(op.parent)} prio {op.prio} u32 "
        f"{target}"
    )


def _describe_rule(rule: LossRuleOp) -> str:
    return (
        f"nft rule {NFT_FAMILY} {NFT_TABLE} {NFT_CHAIN} {rule.match} {rule.port} "
        f"numgen random mod {NUMGEN_MOD} < {rule.threshold} counter drop "
        f'comment "{rule.comment}"'
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


def _tc_qdisc(
    ipr: Any, what: str, index: int, op: QdiscOp, verb: Literal["add", "change", "replace", "del"]
) -> None:
    """One qdisc request. `change` keeps the qdisc (and its queue), `replace` grafts a new
    leaf qdisc under an existing class."""
    if op.kind == "ingress":
        _wrap(what, partial(ipr.tc, verb, "ingress", index=index))
        return
    args: dict[str, Any] = {"index": index, "handle": op.handle, "parent": op.parent}
    if verb == "del":
        _wrap(what, partial(ipr.tc, "del", op.kind, **args))
        return
    if op.kind == "htb":
        args["default"] = op.default_class
    elif op.kind == "pfifo":
        args["limit"] = op.limit_packets
    elif op.kind == "netem":
        args.update(netem_arguments(op))
    _wrap(what, partial(ipr.tc, verb, op.kind, **args))


def netem_arguments(op: QdiscOp) -> dict[str, Any]:
    """pyroute2's netem options for `op` (its units: microseconds and percent). A change
    sends all of them, so a field set back to 0 is switched off, not left as it was."""
    n = op.netem or NetemParams()
    args: dict[str, Any] = {
        "limit": op.limit_packets,
        "delay": n.delay_us,
        "jitter": n.jitter_us,
        "loss": n.loss_pct,
        "duplicate": n.duplicate_pct,
    }
    if n.corrupt_pct:
        args["prob_corrupt"] = n.corrupt_pct
    if n.reorder_pct:
        args["prob_reorder"] = n.reorder_pct
    return args


def _tc_class(
    ipr: Any, what: str, index: int, op: ClassOp, verb: Literal["add-class", "change-class"]
) -> None:
    _wrap(
        what,
        partial(
            ipr.tc,
            verb,
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


def _apply_op(ipr: Any, where: str, op: Op) -> None:
    """Execute one planned operation with `ipr` (create-exclusive: never replaces anything)."""
    what = f"{_describe(op)} ({where})"
    if isinstance(op, LinkOp):
        _wrap(what, partial(ipr.link, "add", ifname=op.ifname, kind=op.kind, txqlen=op.txqueuelen))
        _link_up(ipr, where, op.ifname)
        return
    index = _link_index(ipr, where, op.dev)
    if isinstance(op, QdiscOp):
        _tc_qdisc(ipr, what, index, op, "add")
    elif isinstance(op, ClassOp):
        _tc_class(ipr, what, index, op, "add-class")
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


# --- ownership checks ----------------------------------------------------------------------
def _dump_qdiscs(ipr: Any, where: str, index: int) -> set[tuple[str, int, int]]:
    msgs = _wrap(f"tc qdisc show ({where})", partial(ipr.get_qdiscs, index=index))
    return {
        (str(m.get_attr("TCA_KIND")), int(m["parent"]), int(m["handle"]))
        for m in msgs
        if int(m["index"]) == index
    }


def _dump_classes(ipr: Any, where: str, index: int) -> set[int]:
    msgs = _wrap(f"tc class show ({where})", partial(ipr.get_classes, index=index))
    return {int(m["handle"]) for m in msgs if int(m["index"]) == index}


def _fmt_qdiscs(qdiscs: set[tuple[str, int, int]]) -> str:
    return ", ".join(
        f"{kind} {format_handle(handle)} parent {format_handle(parent)}"
        for kind, parent, handle in sorted(qdiscs)
    )


def _check_pristine(ipr: Any, where: str, ops: Sequence[Op]) -> None:
    """Before shaping: the IFB must not exist and the NIC may carry only the kernel's own
    default qdisc (handle 0:). Anything else belongs to someone else: fail closed."""
    for op in ops:
        if isinstance(op, LinkOp) and ipr.link_lookup(ifname=op.ifname):
            raise NetemError(
                f"{op.ifname} already exists ({where}) and this lab did not create it; "
                f"refusing to run {_describe(op)}",
                operation=_describe(op),
                errno=EEXIST,
            )
    for dev in expected_qdiscs(tuple(ops)):
        if any(isinstance(op, LinkOp) and op.ifname == dev for op in ops):
            continue
        index = _link_index(ipr, where, dev)
        foreign = {q for q in _dump_qdiscs(ipr, where, index) if q[2] >> 16 != 0}
        if foreign:
            first = next(op for op in ops if isinstance(op, QdiscOp) and op.dev == dev)
            raise NetemError(
                f"{dev} ({where}) already has a qdisc this lab did not plan "
                f"({_fmt_qdiscs(foreign)}); refusing to run {_describe(first)}",
                operation=_describe(first),
                errno=EEXIST,
            )


def _check_ours(ipr: Any, where: str, ops: Sequence[Op]) -> None:
    """Before an in-place change: every qdisc and class on the NIC and its IFB must be exactly
    the planned ones (kinds and handles). A foreign or missing one: raise, change nothing."""
    want_q = expected_qdiscs(tuple(ops))
    want_c = expected_classes(tuple(ops))
    for dev, qdiscs in want_q.items():
        index = _link_index(ipr, where, dev)
        have_q = _dump_qdiscs(ipr, where, index)
        have_c = _dump_classes(ipr, where, index)
        if have_q != qdiscs or have_c != want_c.get(dev, set()):
            extra, missing = have_q - qdiscs, qdiscs - have_q
            detail = []
            if extra:
                detail.append(f"not planned: {_fmt_qdiscs(extra)}")
            if missing:
                detail.append(f"missing: {_fmt_qdiscs(missing)}")
            if have_c != want_c.get(dev, set()):
                detail.append(
                    "classes "
                    + ", ".join(format_handle(c) for c in sorted(have_c))
                    + " instead of "
                    + ", ".join(format_handle(c) for c in sorted(want_c.get(dev, set())))
                )
            raise NetemError(
                f"the qdisc tree of {dev} ({where}) is not the lab's ({'; '.join(detail)}); "
                "refusing to change it",
                operation=f"tc qdisc show dev {dev}",
            )


# --- nftables (random loss on the lab switch) -------------------------------------------------
def _nft(namespace: str, args: Sequence[str], document: dict[str, object] | None = None) -> str:
    """Run `nft -j ARGS` inside `namespace` (an argv, never a shell); JSON in on stdin."""
    argv = ["ip", "netns", "exec", namespace, "nft", "-j", *args]
    operation = " ".join(argv)
    payload = json.dumps(document) if document is not None else None
    try:
        done = subprocess.run(
            argv, input=payload, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetemError(f"{operation} failed: {exc}", operation=operation) from exc
    if done.returncode != 0:
        detail = done.stderr.strip() or f"exit status {done.returncode}"
        if payload is not None:
            detail += f" (input: {payload})"
        raise NetemError(f"{operation} failed: {detail}", operation=operation)
    return done.stdout


def _add(obj: dict[str, object]) -> dict[str, object]:
    return {"add": obj}


def _nft_rule_handles(namespace: str) -> dict[str, int]:
    """comment -> rule handle of the lab's loss chain. A rule without one of the lab's
    comments is foreign: raise."""
    out = _nft(namespace, ["-a", "list", "chain", NFT_FAMILY, NFT_TABLE, NFT_CHAIN])
    handles: dict[str, int] = {}
    for item in json.loads(out).get("nftables", []):
        rule = item.get("rule")
        if rule is None:
            continue
        comment = rule.get("comment")
        if not isinstance(comment, str) or comment in handles:
            raise NetemError(
                f"the nft chain {NFT_FAMILY} {NFT_TABLE} {NFT_CHAIN} in {namespace} has a rule "
                f"this lab did not make (handle {rule.get('handle')}); refusing to change it",
                operation=f"nft list chain {NFT_FAMILY} {NFT_TABLE} {NFT_CHAIN}",
            )
        handles[comment] = int(rule["handle"])
    return handles


def _apply_rule_changes(namespace: str, changes: Sequence[RuleChange]) -> None:
    """One nft transaction: all the rule changes happen, or none."""
    if not changes:
        return
    handles = _nft_rule_handles(namespace)
    commands: list[dict[str, object]] = []
    for change in changes:
        rule = change.rule
        handle = handles.get(rule.comment)
        if change.verb == "add":
            if handle is not None:
                raise NetemError(f"nft rule {rule.comment!r} already exists in {namespace}")
            commands.append({"add": nft_rule(rule)})
            continue
        if handle is None:
            raise NetemError(
                f"nft rule {rule.comment!r} is missing in {namespace}; refusing to change it",
                operation=f"nft list chain {NFT_FAMILY} {NFT_TABLE} {NFT_CHAIN}",
            )
        if change.verb == "replace":
            commands.append({"replace": nft_rule(rule, handle=handle)})
        else:
            commands.append(
                {
                    "delete": {
                        "rule": {
                            "family": NFT_FAMILY,
                            "table": NFT_TABLE,
                            "chain": NFT_CHAIN,
                            "handle": handle,
                        }
                    }
                }
            )
    _nft(namespace, ["-f", "-"], nft_batch(commands))


def _apply_tc_change(ipr: Any, where: str, change: TcChange | LinkStateOp) -> None:
    if isinstance(change, LinkStateOp):
        index = _link_index(ipr, where, change.dev)
        state = "up" if change.up else "down"
        _wrap(
            f"ip link set {change.dev} {state} ({where})",
            partial(ipr.link, "set", index=index, state=state),
        )
        return
    op = change.op
    index = _link_index(ipr, where, op.dev)
    verb = "del" if change.verb == "delete" else change.verb
    what = f"{_describe(op, verb)} ({where})"
    if isinstance(op, ClassOp):
        _tc_class(ipr, what, index, op, "change-class")
    else:
        _tc_qdisc(ipr, what, index, op, verb)


def _needs_caps(spec: TopologySpec) -> bool:
    """Whether the plan depends on the kernel (impairments or queue limits somewhere)."""
    for host in spec.hosts:
        for nic in host.nics:
            if nic.shape is None:
                continue
            for direction in DIRECTIONS:
                d = nic.shape.direction(direction)
                if d.impairments() or d.queue_limit_packets is not None:
                    return True
    return False


def _unemulated_error(missing: Sequence[Unemulated], operation: str) -> NetemError:
    return NetemError(
        "this kernel cannot emulate "
        + "; ".join(str(m) for m in missing)
        + " (see `dualpath doctor`; pass allow_unemulated=True / --allow-unemulated to "
        "run without them)",
        operation=operation,
    )


def probe_caps() -> KernelCaps:
    """What this kernel can emulate, probed in a throw-away namespace (see netem.doctor)."""
    from netem.doctor import probe

    caps: KernelCaps = probe().caps
    return caps


def _nic_sources(host: HostPlan) -> list[NicSource]:
    sources: list[NicSource] = []
    for nic_plan in host.nics:
        nic = nic_plan.nic
        shape = nic.shape
        if shape is None:
            sources.append(NicSource(name=nic.name, ifb=None, rate_mbit=None))
            continue
        egress = shape.direction("egress").rate_mbit
        ingress = shape.direction("ingress").rate_mbit
        classes = tuple(CLASS_IDS.items()) if shape.priority_classes else ()
        sources.append(
            NicSource(
                name=nic.name,
                ifb=ifb_name(nic.name),
                rate_mbit=egress,
                classes=classes,
                ingress_rate_mbit=None if ingress == egress else ingress,
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


PROCESS_GRACE_S = 2.0
"""How long a process left in a lab's namespace has after SIGTERM before SIGKILL."""
PROCESS_ROUNDS = 3
"""Scans for processes in a lab's namespaces: a daemon may fork while it is being ended."""


def _namespace_ids(names: Sequence[str]) -> dict[tuple[int, int], str]:
    """(device, inode) of each named namespace that still exists -> its name: what
    /proc/<pid>/ns/net of a process inside it stats to."""
    ids: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(NETNS_RUN_DIR / name)
        except OSError:
            continue
        ids[(st.st_dev, st.st_ino)] = name
    return ids


def _holding(pid: int, ids: dict[tuple[int, int], str]) -> str | None:
    """The namespace of `ids` that process `pid` holds: one of its threads is inside it, or
    it has a file descriptor open on it; None when it holds none (or is gone)."""
    base = Path(f"/proc/{pid}")
    try:
        links = [t / "ns" / "net" for t in (base / "task").iterdir()]
        links += list((base / "fd").iterdir())
    except OSError:
        return None  # gone, or not ours to look at
    for link in links:
        try:
            st = os.stat(link)
        except OSError:
            continue
        name = ids.get((st.st_dev, st.st_ino))
        if name is not None:
            return name
    return None


def namespace_holders(names: Sequence[str]) -> dict[int, str]:
    """pid -> namespace, for every process but this one that holds one of the named
    namespaces (a task inside it, or a descriptor open on it): what would keep a namespace
    alive after its name is removed."""
    ids = _namespace_ids(names)
    if not ids:
        return {}
    me = os.getpid()
    out: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        name = _holding(int(entry.name), ids)
        if name is not None:
            out[int(entry.name)] = name
    return out


def _end_processes(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """End every process still inside (or holding) the named namespaces: SIGTERM (and SIGCONT,
    a stopped process cannot act on it), PROCESS_GRACE_S, then SIGKILL. Each process is
    signalled through a pidfd opened while it was seen holding the namespace, so a pid reused
    meanwhile is never signalled. Returns (what was ended, what survived SIGKILL)."""
    ended: list[str] = []
    ids = _namespace_ids(names)
    for _ in range(PROCESS_ROUNDS):
        held = namespace_holders(names)
        if not held:
            return ended, []
        pidfds: dict[int, tuple[int, str]] = {}
        for pid in held:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            name = _holding(pid, ids)  # the pid the fd refers to, checked after it was opened
            if name is None:
                os.close(fd)
                continue
            pidfds[pid] = (fd, name)
        try:
            for sig in (signal.SIGTERM, signal.SIGCONT):
                for fd, _name in pidfds.values():
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(fd, sig)
            live = _wait_exit([fd for fd, _ in pidfds.values()], PROCESS_GRACE_S)
            for fd in live:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            _wait_exit(live, PROCESS_GRACE_S)
        finally:
            for fd, _name in pidfds.values():
                os.close(fd)
        ended += [f"process {pid} in {name}" for pid, (_fd, name) in pidfds.items()]
    survivors = namespace_holders(names)
    return ended, [f"process {pid} in {name}" for pid, name in sorted(survivors.items())]


def _wait_exit(pidfds: Sequence[int], timeout_s: float) -> list[int]:
    """Wait until every pidfd's process has exited or `timeout_s` passed; the ones still
    running. (A pidfd becomes readable when its process exits, reaped or not.)"""
    waiting = set(pidfds)
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    while waiting:
        left_ms = int(1000 * (deadline - time.monotonic()))
        if left_ms <= 0:
            break
        for fd, _events in poller.poll(left_ms):
            waiting.discard(fd)
            poller.unregister(fd)
    return [fd for fd in pidfds if fd in waiting]


def _remove_recorded(state: LabState) -> list[str]:
    """End every process still in the recorded namespaces, remove each namespace (last created
    first), then the record itself.

    A namespace that cannot be removed stays in the record so `down` can be retried; a process
    that outlived SIGKILL is an error naming it (its namespace lives on without a name)."""
    removed: list[str] = []
    failed: list[NetemError] = []
    if any((NETNS_RUN_DIR / name).exists() for name in state.record.namespaces):
        require_net_admin()
    ended, survivors = _end_processes(state.record.namespaces)
    removed += ended
    if survivors:
        failed.append(
            NetemError(
                f"{', '.join(survivors)} outlived SIGKILL and keeps its namespace alive",
                operation="kill",
            )
        )
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

    def __init__(
        self,
        spec: TopologySpec,
        *,
        state_dir: Path = DEFAULT_STATE_DIR,
        caps: KernelCaps | None = None,
        allow_unemulated: bool = False,
    ) -> None:
        """`caps`: what the kernel can emulate; None: probed by `up()` when the spec needs it
        (impairments or queue limits). `allow_unemulated`: let `up()`/`set_link()` go on when
        a feature cannot be emulated here (they are then listed in `self.unemulated`);
        otherwise they raise NetemError naming the NIC and the feature."""
        self.spec = spec
        self._caps = caps
        self.allow_unemulated = allow_unemulated
        self.plan: TopologyPlan = plan_topology(spec, caps)
        self.state_dir = Path(state_dir)
        self._state: LabState | None = None
        self._thread: _NetlinkThread | None = None
        self._handles: dict[str, Any] = {}
        self._sources = {h.node_id: _nic_sources(h) for h in self.plan.hosts}
        self._offloaded: set[tuple[str, str]] = set()
        self._nft_table = False
        """Whether this lab made its nft table in the switch namespace (kept until down)."""
        """(namespace, NIC) with TSO/GSO turned off by this lab."""
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

    def open_socket(
        self, node_id: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket inside the node's namespace (a socket keeps the namespace it was made in),
        made without a fork or a subprocess: for measurements run from the lab's own process."""
        ns = self.namespace(node_id)
        with _thread_in_netns(ns):
            return _wrap(f"socket in netns {ns}", partial(socket.socket, family, kind))

    @property
    def unemulated(self) -> tuple[Unemulated, ...]:
        """Features of the current plan this kernel does not emulate (allowed ones)."""
        return self.plan.unemulated

    @property
    def caps(self) -> KernelCaps | None:
        """The kernel capabilities the plan was made for (None: not probed, not needed)."""
        return self._caps

    def _resolve_caps(self) -> KernelCaps:
        if self._caps is None:
            self._caps = probe_caps()
        return self._caps

    # --- lifecycle -----------------------------------------------------------------------
    def up(self) -> None:
        """Create the lab. Raises NetemError if a lab with this id is already recorded, or
        (before creating anything) if a NIC asks for a feature this kernel cannot emulate and
        `allow_unemulated` is False; on any failure removes what it made so far and re-raises."""
        require_net_admin()
        if _needs_caps(self.spec):
            self.plan = plan_topology(self.spec, self._resolve_caps())
            self._sources = {h.node_id: _nic_sources(h) for h in self.plan.hosts}
        if self.plan.unemulated and not self.allow_unemulated:
            raise _unemulated_error(self.plan.unemulated, f"up lab {self.lab_id}")
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

    def counters(self, nodes: Sequence[str] | None = None) -> dict[str, dict[str, NicCounters]]:
        """node_id -> NIC name -> cumulative counters (one netlink round per namespace), of
        every node, or of `nodes` only (a sampler watching one node need not read them all)."""
        thread = self._thread
        if thread is None:
            raise NetemError(f"lab {self.lab_id} is not up", operation="read counters")
        if nodes is not None:
            unknown = set(nodes) - self._node_ids()
            if unknown:
                raise SpecError(f"nodes: {sorted(unknown)} are not nodes of lab {self.lab_id}")
        try:
            return thread.call(partial(self._read_counters, nodes))
        except RuntimeError as exc:  # down() shut the netlink thread while we were queued
            raise NetemError(f"lab {self.lab_id} is not up", operation="read counters") from exc

    def set_link(
        self,
        node_id: str,
        nic: str,
        *,
        direction: Literal["egress", "ingress", "both"] = "both",
        up: bool | None = None,
        rate_mbit: float | None = None,
        ceil_mbit: float | None = None,
        delay_ms: float | None = None,
        jitter_ms: float | None = None,
        loss_pct: float | None = None,
        duplicate_pct: float | None = None,
        corrupt_pct: float | None = None,
        reorder_pct: float | None = None,
    ) -> tuple[Change, ...]:
        """Change one NIC of a running lab in place and return the changes made.

        Values are those of DirectionSpec (None: leave as is) and apply to `direction`
        ('both' by default); `up` sets the NIC administratively up or down. Rates become
        `tc class change` on the HTB classes (queues and counters are kept), impairments
        `netem change` (or a netem graft under a leaf that had none), loss an added, replaced
        or deleted nft rule on the lab switch (netem loss where there is no nftables). The HTB
        root and classes are never deleted and re-added.

        Everything is validated first: an invalid value raises SpecError naming
        `<node>.<nic>.<direction>.<field>`, a feature this kernel cannot emulate raises
        NetemError (unless allow_unemulated), and a qdisc tree or nft chain that is not
        exactly the lab's raises NetemError: in each case nothing is changed."""
        if direction not in ("egress", "ingress", "both"):
            raise SpecError(f"direction: {direction!r} is invalid (egress, ingress or both)")
        if up is not None and not isinstance(up, bool):
            raise SpecError(f"up: {up!r} is invalid (True, False or None)")
        values = {
            "rate_mbit": rate_mbit,
            "ceil_mbit": ceil_mbit,
            "delay_ms": delay_ms,
            "jitter_ms": jitter_ms,
            "loss_pct": loss_pct,
            "duplicate_pct": duplicate_pct,
            "corrupt_pct": corrupt_pct,
            "reorder_pct": reorder_pct,
        }
        changes_wanted = {k: v for k, v in values.items() if v is not None}
        with self._lock:  # one change at a time, each from the spec the last one left
            thread = self._thread
            if thread is None:
                raise NetemError(f"lab {self.lab_id} is not up", operation="set_link")
            host = self.spec.host(node_id) if node_id in self._node_ids() else None
            if host is None:
                raise SpecError(f"node_id: {node_id!r} is not a node of lab {self.lab_id}")
            try:
                old_nic = host.nic(nic)
            except KeyError:
                raise SpecError(
                    f"nic: {nic!r} is not a NIC of {node_id} (have: {[n.name for n in host.nics]})"
                ) from None
            new_nic = old_nic
            if changes_wanted:
                new_nic = self._changed_nic(node_id, old_nic, direction, changes_wanted)
            return thread.call(partial(self._set_link, node_id, old_nic, new_nic, up))

    def _node_ids(self) -> set[str]:
        return {h.node_id for h in self.spec.hosts}

    def _changed_nic(
        self, node_id: str, nic: NicSpec, direction: str, values: dict[str, float]
    ) -> NicSpec:
        """`nic` with `values` applied to `direction`; SpecError naming the field if invalid."""
        shape = nic.shape
        if shape is None:
            raise SpecError(
                f"{node_id}.{nic.name}: unshaped, so only up/down can change in place "
                "(give it a LinkShape in the spec)"
            )
        directions = DIRECTIONS if direction == "both" else (direction,)
        new_dirs: dict[str, DirectionSpec] = {}
        for name in DIRECTIONS:
            d = shape.direction(name)
            if name in directions:
                fields = dict(values)
                if "rate_mbit" in fields and "ceil_mbit" not in fields and d.ceil_mbit is not None:
                    fields["ceil_mbit"] = min(d.ceil_mbit, fields["rate_mbit"])
                try:
                    d = dataclasses.replace(d, **fields)  # type: ignore[arg-type]
                except SpecError as exc:
                    raise SpecError(f"{node_id}.{nic.name}.{name}.{exc}") from None
            new_dirs[name] = d
        try:
            new_shape = dataclasses.replace(
                shape, rate_mbit=None, egress=new_dirs["egress"], ingress=new_dirs["ingress"]
            )
        except SpecError as exc:
            raise SpecError(f"{node_id}.{nic.name}.{exc}") from None
        return dataclasses.replace(nic, shape=new_shape)

    def _shaping(self, node_id: str, nic: NicSpec, caps: KernelCaps | None) -> NicShaping:
        nic_plan = next(n for n in self.plan.host(node_id).nics if n.nic.name == nic.name)
        return shape_nic(
            nic,
            caps or KernelCaps.with_netem(),
            node_id=node_id,
            switch_port=nic_plan.switch_ifname,
        )

    def _set_link(
        self, node_id: str, old_nic: NicSpec, new_nic: NicSpec, up: bool | None
    ) -> tuple[Change, ...]:
        if self._state is None:
            raise NetemError(f"lab {self.lab_id} is not up", operation="set_link")
        caps = self._caps
        needs = TopologySpec(self.lab_id, (HostSpec(node_id, (new_nic,)),))
        if caps is None and _needs_caps(needs):
            caps = self._resolve_caps()
        old = self._shaping(node_id, old_nic, caps)
        new = self._shaping(node_id, new_nic, caps)
        added = [u for u in new.unemulated if u not in old.unemulated]
        if added and not self.allow_unemulated:
            raise _unemulated_error(added, f"set_link {node_id} {old_nic.name}")
        try:
            changes: list[Change] = list(plan_change(old, new))
        except ValueError as exc:
            raise NetemError(f"{node_id}.{old_nic.name}: {exc}", operation="set_link") from exc
        if up is not None:
            changes.append(LinkStateOp(old_nic.name, up))
        ns = self.namespace(node_id)
        where = f"netns {ns}"
        ipr = self._ipr(ns)
        # Ownership first, for everything this change touches: nothing changes otherwise.
        _check_ours(ipr, where, old.ops)
        rule_changes = [c for c in changes if isinstance(c, RuleChange)]
        if old.loss_rules or rule_changes:
            self._check_rules(old.loss_rules)
        done: list[TcChange | LinkStateOp] = []
        try:
            self._offloads_for(node_id, new_nic)
            for change in changes:
                if isinstance(change, TcChange | LinkStateOp):
                    _apply_tc_change(ipr, where, change)
                    done.append(change)
            if rule_changes:
                self._ensure_nft_table()
                _apply_rule_changes(self.switch_namespace, rule_changes)
        except BaseException:
            # Put back what was changed (best effort); the first error is the one raised.
            undo = [c for c in plan_change(new, old) if isinstance(c, TcChange)]
            for change in undo:
                if any(isinstance(d, TcChange) and d.op.dev == change.op.dev for d in done):
                    with contextlib.suppress(NetemError):
                        _apply_tc_change(ipr, where, change)
            raise
        self._commit_nic(node_id, new_nic)
        return tuple(changes)

    def _offloads_for(self, node_id: str, new_nic: NicSpec) -> None:
        """A network that gets its first per-packet impairment: TSO/GSO off on every NIC of
        it (new connections then send one frame per skb; established ones are segmented by
        the veth). They stay off until `down`: turning them on again gains nothing here."""
        hosts = tuple(
            dataclasses.replace(
                h, nics=tuple(new_nic if n.name == new_nic.name else n for n in h.nics)
            )
            if h.node_id == node_id
            else h
            for h in self.spec.hosts
        )
        impaired = impaired_networks(dataclasses.replace(self.spec, hosts=hosts))
        for host in self.plan.hosts:
            for nic_plan in host.nics:
                key = (host.namespace, nic_plan.nic.name)
                if nic_plan.nic.network in impaired and key not in self._offloaded:
                    _wrap(
                        f"ethtool -K {key[1]} tso off gso off (netns {key[0]})",
                        partial(_offloads_off, *key),
                    )
                    self._offloaded.add(key)

    def _check_rules(self, rules: Sequence[LossRuleOp]) -> None:
        """The lab's nft chain holds exactly the lab's rules (by comment)."""
        have = self._nft_handles()
        want = {r.comment for r in self.plan.loss_rules}
        if set(have) != want:
            raise NetemError(
                f"the nft chain in {self.switch_namespace} has rules {sorted(have)}, "
                f"the lab planned {sorted(want)}; refusing to change it",
                operation=f"nft list chain {NFT_FAMILY} {NFT_TABLE} {NFT_CHAIN}",
            )

    def _nft_handles(self) -> dict[str, int]:
        if not self._nft_table:
            return {}
        return _nft_rule_handles(self.switch_namespace)

    def _ensure_nft_table(self) -> None:
        """Create the lab's nft table the first time a loss rule is needed."""
        if not self._nft_table:
            _nft(self.switch_namespace, ["-f", "-"], nft_batch(nft_setup()))
            self._nft_table = True

    def _commit_nic(self, node_id: str, new_nic: NicSpec) -> None:
        """The changed NIC becomes part of the spec, the plan, the counters and the record."""
        hosts = tuple(
            dataclasses.replace(
                h, nics=tuple(new_nic if n.name == new_nic.name else n for n in h.nics)
            )
            if h.node_id == node_id
            else h
            for h in self.spec.hosts
        )
        self.spec = dataclasses.replace(self.spec, hosts=hosts)
        self.plan = plan_topology(self.spec, self._caps)
        self._sources = {h.node_id: _nic_sources(h) for h in self.plan.hosts}
        state = self._state
        if state is not None:
            host = self.plan.host(node_id)
            state.set_objects(host.namespace, self._objects(host))
            state.set_objects(self.switch_namespace, self._switch_objects())

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
            state.set_objects(host.namespace, self._objects(host))
        if plan.loss_rules:
            # One transaction: the table, its chain and every rule, or nothing.
            _nft(
                sw_ns,
                ["-f", "-"],
                nft_batch(nft_setup() + [_add(nft_rule(r)) for r in plan.loss_rules]),
            )
            self._nft_table = True
        state.set_objects(sw_ns, self._switch_objects())

    def _objects(self, host: HostPlan) -> list[str]:
        items = [
            f"ethtool -K {n.nic.name} tso off gso off"
            for n in host.nics
            if (host.namespace, n.nic.name) in self._offloaded
        ]
        return items + [_describe(op) for n in host.nics for op in n.shaping]

    def _switch_objects(self) -> list[str]:
        plan = self.plan
        items = [f"bridge {bridge}" for bridge, _net in plan.bridges]
        items += [f"veth {n.switch_ifname}" for h in plan.hosts for n in h.nics]
        if self._nft_table:
            items.append(f"nft table {NFT_FAMILY} {NFT_TABLE}, chain {NFT_CHAIN}")
            items += [_describe_rule(r) for r in plan.loss_rules]
        return items

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
            if nic_plan.offloads_off:
                _wrap(
                    f"ethtool -K {nic.name} tso off gso off (netns {ns})",
                    partial(_offloads_off, ns, nic.name),
                )
                self._offloaded.add((ns, nic.name))
            _check_pristine(ipr, f"netns {ns}", nic_plan.shaping)
            for op in nic_plan.shaping:
                self._apply(ns, op)

    def _apply(self, ns: str, op: Op) -> None:
        _apply_op(self._ipr(ns), f"netns {ns}", op)

    def _read_counters(
        self, nodes: Sequence[str] | None = None
    ) -> dict[str, dict[str, NicCounters]]:
        out: dict[str, dict[str, NicCounters]] = {}
        for host in self.plan.hosts:
            if nodes is not None and host.node_id not in nodes:
                continue
            ipr = self._ipr(host.namespace)
            out[host.node_id] = _wrap(
                f"read counters in netns {host.namespace}",
                partial(read_nics, ipr, host.namespace, self._sources[host.node_id]),
            )
        return out


def apply_shaping(
    nic: NicSpec,
    *,
    netns: str | None = None,
    caps: KernelCaps | None = None,
    allow_unemulated: bool = False,
) -> tuple[Op, ...]:
    """Shape an existing interface `nic.name`; return the tc operations applied.

    For backends that do not build namespaces, e.g. a compose container's entrypoint shaping
    its own eth1 (`netns=None`: this process's namespace; needs CAP_NET_ADMIN only). Fails
    closed: if the interface already has a qdisc of its own, or `ifb-<nic>` exists, nothing is
    changed and NetemError is raised; on a failure half-way, what this call added is removed.
    There is no lab switch here, so without netem loss is unemulated too; an unemulated
    feature raises NetemError unless `allow_unemulated`. `caps` None: probed when needed.
    """
    if (
        caps is None
        and nic.shape is not None
        and _needs_caps(TopologySpec("x", (HostSpec("x", (nic,)),)))
    ):
        caps = probe_caps()
    shaped = shape_nic(nic, caps or KernelCaps.with_netem())
    if shaped.unemulated and not allow_unemulated:
        raise _unemulated_error(shaped.unemulated, f"shape {nic.name}")
    ops = shaped.ops
    if not ops:
        return ops
    needed = [(CAP_NET_ADMIN, "CAP_NET_ADMIN")]
    if netns is not None:
        needed.append((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))  # setns() into a named namespace
    _require_caps(*needed)
    where = f"netns {netns}" if netns is not None else "this namespace"

    def shape() -> None:
        ipr = _wrap(
            f"open netlink socket ({where})",
            partial(IPRoute, netns=netns, flags=0) if netns is not None else IPRoute,
        )
        done: list[Op] = []
        try:
            _check_pristine(ipr, where, ops)
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

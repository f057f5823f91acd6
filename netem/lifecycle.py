"""The lab lifecycle on the netns backend: build a TopologyPlan's namespaces, veths, bridges
and shaping (each namespace recorded before it exists, every object it makes written to the
lab record), and remove exactly what a record names: first the processes still inside, then
the namespaces, then the record (`down_from_state`, also after a crash). It never touches the
host's namespace and never adopts or deletes a name the lab did not record.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from errno import EEXIST
from functools import partial
from pathlib import Path

from netem.errors import NetemError
from netem.kernel import (
    NETNS_RUN_DIR,
    NetnsHandles,
    create_netns,
    offloads_off,
    remove_namespace,
    require_net_admin,
    sysctl,
    wrap,
)
from netem.nft import create_table, describe_table
from netem.plan import HostPlan, TopologyPlan
from netem.state import LabState, default_state_dir, recorded_paths, state_path
from netem.tc import apply_op, check_pristine, describe

DEFAULT_STATE_DIR = default_state_dir()

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


@dataclass
class LabObjects:
    """What a lab made beyond its plan's tc operations, kept until `down` (its namespaces
    take them along), and the record lines of everything it made."""

    offloaded: set[tuple[str, str]] = field(default_factory=set)
    """(namespace, NIC) with TSO/GSO turned off by this lab."""
    nft_table: bool = False
    """Whether this lab made its nft table in the switch namespace."""

    def offloads_off(self, namespace: str, ifname: str) -> None:
        """TSO/GSO off on one NIC, once (turning them on again gains nothing here)."""
        if (namespace, ifname) in self.offloaded:
            return
        wrap(
            f"ethtool -K {ifname} tso off gso off (netns {namespace})",
            partial(offloads_off, ifname, namespace),
        )
        self.offloaded.add((namespace, ifname))

    def ensure_nft_table(self, namespace: str) -> None:
        """Create the lab's nft table the first time a loss rule is needed."""
        if not self.nft_table:
            create_table(namespace)
            self.nft_table = True

    def host_objects(self, host: HostPlan) -> list[str]:
        items = [
            f"ethtool -K {n.nic.name} tso off gso off"
            for n in host.nics
            if (host.namespace, n.nic.name) in self.offloaded
        ]
        return items + [describe(op) for n in host.nics for op in n.shaping]

    def switch_objects(self, plan: TopologyPlan) -> list[str]:
        items = [f"bridge {bridge}" for bridge, _net in plan.bridges]
        items += [f"veth {n.switch_ifname}" for h in plan.hosts for n in h.nics]
        if self.nft_table:
            items += describe_table(plan.loss_rules)
        return items

    def record(self, state: LabState, plan: TopologyPlan, host: HostPlan) -> None:
        """Write what the lab made in `host`'s namespace and the switch's into the record."""
        state.set_objects(host.namespace, self.host_objects(host))
        state.set_objects(plan.switch_namespace, self.switch_objects(plan))


# --- build -----------------------------------------------------------------------------------
def create_namespace(state: LabState, name: str) -> None:
    """Record `name`, then create it; a name that already exists is never adopted."""
    state.add_namespace(name)  # recorded before it exists: a crash leaves a record
    try:
        create_netns(name)
    except FileExistsError:
        state.discard_namespace(name)
        raise NetemError(
            f"namespace {name} already exists and this lab did not create it; refusing to touch it",
            operation=f"ip netns add {name}",
            errno=EEXIST,
        ) from None
    except OSError as exc:
        raise NetemError(
            f"ip netns add {name} failed", operation=f"ip netns add {name}", errno=exc.errno
        ) from exc


def build(plan: TopologyPlan, state: LabState, handles: NetnsHandles, made: LabObjects) -> None:
    """Create every namespace, bridge, veth, address and shaping of `plan` (on the netlink
    thread), recording each as it goes. On failure the caller removes what the record names."""
    for name in plan.namespaces:
        create_namespace(state, name)
    sw_ns = plan.switch_namespace
    sysctl(sw_ns, (*SWITCH_SYSCTLS, *NODE_SYSCTLS))
    for host in plan.hosts:
        sysctl(host.namespace, NODE_SYSCTLS)
    for name in plan.namespaces:
        handles.set_up(name, "lo")
    sw = handles.get(sw_ns)
    for bridge, _network in plan.bridges:
        wrap(
            f"ip -n {sw_ns} link add {bridge} type bridge",
            partial(sw.link, "add", ifname=bridge, kind="bridge"),
        )
        handles.set_up(sw_ns, bridge)
    for host in plan.hosts:
        _build_host(plan, host, handles, made)
        state.set_objects(host.namespace, made.host_objects(host))
    if plan.loss_rules:
        # One transaction: the table, its chain and every rule, or nothing.
        create_table(sw_ns, plan.loss_rules)
        made.nft_table = True
    state.set_objects(sw_ns, made.switch_objects(plan))


def _build_host(
    plan: TopologyPlan, host: HostPlan, handles: NetnsHandles, made: LabObjects
) -> None:
    sw_ns, ns = plan.switch_namespace, host.namespace
    sw, ipr = handles.get(sw_ns), handles.get(ns)
    for nic_plan in host.nics:
        nic = nic_plan.nic
        fd = wrap(f"open netns {ns}", lambda: os.open(NETNS_RUN_DIR / ns, os.O_RDONLY))
        try:
            wrap(
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
        master = handles.index(sw_ns, nic_plan.bridge)
        handles.set_up(sw_ns, nic_plan.switch_ifname, master=master)
        iface = nic.interface
        index = handles.index(ns, nic.name)
        wrap(
            f"ip -n {ns} addr add {nic.address} dev {nic.name}",
            partial(
                ipr.addr,
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            ),
        )
        handles.set_up(ns, nic.name)
        if nic_plan.offloads_off:
            made.offloads_off(ns, nic.name)
        where = f"netns {ns}"
        check_pristine(ipr, where, nic_plan.shaping)
        for op in nic_plan.shaping:
            apply_op(ipr, where, op)


def teardown(state: LabState) -> list[str]:
    """`down` of a lab that made `state`: remove what the record names, unless the record is
    gone (`down_from_state` removed the lab) or is another lab's now (the id was reused)."""
    if not state.path.exists():
        return []
    current = LabState.load(state.path)
    if current.record.token != state.record.token:
        return []
    return remove_recorded(current)


# --- removal (also after a crash) ------------------------------------------------------------
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


def remove_recorded(state: LabState) -> list[str]:
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
            if remove_namespace(name):
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
            removed += remove_recorded(state)
        except NetemError as exc:
            errors.append(exc)
    if errors:
        raise NetemError(
            "; ".join(str(e) for e in errors), operation=errors[0].operation, errno=errors[0].errno
        )
    return removed

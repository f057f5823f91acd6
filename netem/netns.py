"""The netns applier: `NetnsLab` builds a TopologyPlan as namespaces (netem.lifecycle), reads
its counters, and changes a running lab's links in place (`set_link`: planned by
netem.linkchange, executed by netem.tc and netem.nft after checking the objects are still the
lab's); `apply_shaping` shapes one existing interface. All netlink work runs on one thread per
lab. It never touches the host's namespace and never builds tc command strings.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from pyroute2 import IPRoute

from netem.capabilities import KernelCaps, Unemulated, needs_caps, unemulated_error
from netem.counters import NicCounters, nic_sources, read_nics
from netem.doctor import probe
from netem.errors import NetemError
from netem.kernel import (
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    NetlinkThread,
    NetnsHandles,
    require_caps,
    require_net_admin,
    thread_in_netns,
    wrap,
)
from netem.lifecycle import DEFAULT_STATE_DIR, LabObjects, build, teardown
from netem.linkchange import (
    LINK_FIELDS,
    Change,
    Direction,
    LinkChange,
    changed_nic,
    check_request,
    plan_link_change,
    with_nic,
)
from netem.nft import apply_rule_changes, check_rules
from netem.plan import NicShaping, Op, TopologyPlan, plan_topology, shape_nic
from netem.spec import HostSpec, NicSpec, SpecError, TopologySpec
from netem.state import LabState, state_path
from netem.tc import apply_ops, apply_tc_changes, check_ours, put_back

__all__ = ["NetnsLab", "apply_shaping", "probe_caps"]


def probe_caps() -> KernelCaps:
    """What this kernel can emulate, probed in a throw-away namespace (see netem.doctor)."""
    return probe().caps


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
        self._thread: NetlinkThread | None = None
        self._handles = NetnsHandles()
        self._sources = {h.node_id: nic_sources(h) for h in self.plan.hosts}
        self._made = LabObjects()
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
        with thread_in_netns(ns):
            return wrap(f"socket in netns {ns}", partial(socket.socket, family, kind))

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

    def _replan(self, spec: TopologySpec) -> None:
        self.spec = spec
        self.plan = plan_topology(spec, self._caps)
        self._sources = {h.node_id: nic_sources(h) for h in self.plan.hosts}

    # --- lifecycle -----------------------------------------------------------------------
    def up(self) -> None:
        """Create the lab. Raises NetemError if a lab with this id is already recorded, or
        (before creating anything) if a NIC asks for a feature this kernel cannot emulate and
        `allow_unemulated` is False; on any failure removes what it made so far and re-raises."""
        require_net_admin()
        if needs_caps(self.spec):
            self._resolve_caps()
            self._replan(self.spec)
        if self.plan.unemulated and not self.allow_unemulated:
            raise unemulated_error(self.plan.unemulated, f"up lab {self.lab_id}")
        with self._lock:
            if self._state is not None:
                raise NetemError(f"lab {self.lab_id} is already up", operation="up")
            self._thread = NetlinkThread(f"netem-{self.lab_id}")
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
        direction: Direction = "both",
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
        check_request(direction, up)
        given = (
            rate_mbit, ceil_mbit, delay_ms, jitter_ms, loss_pct, duplicate_pct, corrupt_pct,
            reorder_pct,
        )  # fmt: skip
        values = {k: v for k, v in zip(LINK_FIELDS, given, strict=True) if v is not None}
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
            if values:
                new_nic = changed_nic(old_nic, f"{node_id}.{old_nic.name}", direction, values)
            return thread.call(partial(self._set_link, node_id, old_nic, new_nic, up))

    def _node_ids(self) -> set[str]:
        return {h.node_id for h in self.spec.hosts}

    def _shaping(self, node_id: str, nic: NicSpec, caps: KernelCaps | None) -> NicShaping:
        nic_plan = next(n for n in self.plan.host(node_id).nics if n.nic.name == nic.name)
        return shape_nic(
            nic,
            caps or KernelCaps.with_netem(),
            node_id=node_id,
            switch_port=nic_plan.switch_ifname,
        )

    # --- on the netlink thread -----------------------------------------------------------
    def _set_link(
        self, node_id: str, old_nic: NicSpec, new_nic: NicSpec, up: bool | None
    ) -> tuple[Change, ...]:
        if self._state is None:
            raise NetemError(f"lab {self.lab_id} is not up", operation="set_link")
        caps = self._caps
        needs = TopologySpec(self.lab_id, (HostSpec(node_id, (new_nic,)),))
        if caps is None and needs_caps(needs):
            caps = self._resolve_caps()
        link = plan_link_change(
            self._shaping(node_id, old_nic, caps),
            self._shaping(node_id, new_nic, caps),
            node_id=node_id,
            nic=old_nic.name,
            dev=old_nic.name,
            up=up,
            allow_unemulated=self.allow_unemulated,
        )
        new_spec = with_nic(self.spec, node_id, new_nic)
        self._apply_link_change(node_id, link, plan_topology(new_spec, caps))
        self._replan(new_spec)
        state = self._state
        if state is not None:
            self._made.record(state, self.plan, self.plan.host(node_id))
        return link.changes

    def _apply_link_change(self, node_id: str, link: LinkChange, new_plan: TopologyPlan) -> None:
        ns = self.namespace(node_id)
        where = f"netns {ns}"
        ipr = self._handles.get(ns)
        # Ownership first, for everything this change touches: nothing changes otherwise.
        check_ours(ipr, where, link.before.ops)
        if link.before.loss_rules or link.rule_changes:
            check_rules(
                self.switch_namespace, self.plan.loss_rules, table_made=self._made.nft_table
            )
        # A network that gets its first per-packet impairment: TSO/GSO off on every NIC of it
        # (new connections then send one frame per skb; established ones are segmented by
        # the veth). They stay off until `down`.
        for host in new_plan.hosts:
            for nic_plan in host.nics:
                if nic_plan.offloads_off:
                    self._made.offloads_off(host.namespace, nic_plan.nic.name)
        apply_tc_changes(ipr, where, link.tc_changes, link.undo)
        if link.rule_changes:
            try:
                self._made.ensure_nft_table(self.switch_namespace)
                apply_rule_changes(self.switch_namespace, link.rule_changes)
            except BaseException:
                # Put back what was changed (best effort); the first error is the one raised.
                put_back(ipr, where, link.tc_changes, link.undo)
                raise

    def _up(self) -> None:
        state = LabState.create(self.state_dir, self.lab_id)
        self._state = state
        try:
            build(self.plan, state, self._handles, self._made)
        except BaseException:
            # The record keeps whatever could not be removed; the first error is the one raised.
            with contextlib.suppress(NetemError):
                self._down()
            raise

    def _down(self) -> list[str]:
        self._handles.close()
        state, self._state = self._state, None
        if state is None:
            return []
        return teardown(state)

    def _read_counters(
        self, nodes: Sequence[str] | None = None
    ) -> dict[str, dict[str, NicCounters]]:
        out: dict[str, dict[str, NicCounters]] = {}
        for host in self.plan.hosts:
            if nodes is not None and host.node_id not in nodes:
                continue
            ipr = self._handles.get(host.namespace)
            out[host.node_id] = wrap(
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
        and needs_caps(TopologySpec("x", (HostSpec("x", (nic,)),)))
    ):
        caps = probe_caps()
    shaped = shape_nic(nic, caps or KernelCaps.with_netem())
    if shaped.unemulated and not allow_unemulated:
        raise unemulated_error(shaped.unemulated, f"shape {nic.name}")
    ops = shaped.ops
    if not ops:
        return ops
    needed = [(CAP_NET_ADMIN, "CAP_NET_ADMIN")]
    if netns is not None:
        needed.append((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))  # setns() into a named namespace
    require_caps(*needed)
    where = f"netns {netns}" if netns is not None else "this namespace"

    def shape() -> None:
        ipr = wrap(
            f"open netlink socket ({where})",
            partial(IPRoute, netns=netns, flags=0) if netns is not None else IPRoute,
        )
        try:
            apply_ops(ipr, where, ops)
        finally:
            ipr.close()

    thread = NetlinkThread("netem-shape")
    try:
        thread.call(shape)
    finally:
        thread.close()
    return ops

"""Pure set-link planner: a running NIC's new values (`rate_mbit=50`, `loss_pct=1`, `up=False`)
become a new NicSpec, then the in-place changes between its old and new shaping (class and
netem `change`, leaf grafts, nft rule add/replace/delete, link up/down) and their undo.
Both appliers (`netem.netns.NetnsLab.set_link`, `netem.container.ContainerNics.set_link`)
plan here and only execute what this returns. No I/O, no pyroute2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from netem.capabilities import unemulated_error
from netem.errors import NetemError
from netem.plan import ClassOp, LinkOp, LossRuleOp, NicShaping, Op, QdiscOp
from netem.spec import DIRECTIONS, DirectionSpec, NicSpec, SpecError, TopologySpec

Direction = Literal["egress", "ingress", "both"]

LINK_FIELDS = (
    "rate_mbit",
    "ceil_mbit",
    "delay_ms",
    "jitter_ms",
    "loss_pct",
    "duplicate_pct",
    "corrupt_pct",
    "reorder_pct",
)
"""The DirectionSpec fields a running link may change."""


@dataclass(frozen=True)
class TcChange:
    """Change a class or leaf qdisc in place: `change` (same object, new parameters),
    `replace` (graft a leaf qdisc under an existing class) or `delete` (a leaf qdisc; the
    class gets the kernel's default pfifo back). The HTB root and classes are never deleted."""

    verb: Literal["change", "replace", "delete"]
    op: ClassOp | QdiscOp


@dataclass(frozen=True)
class RuleChange:
    verb: Literal["add", "replace", "delete"]
    rule: LossRuleOp


@dataclass(frozen=True)
class LinkStateOp:
    """Set a NIC administratively up or down (its veth peer loses carrier)."""

    dev: str
    up: bool


Change = TcChange | RuleChange | LinkStateOp


def _key(op: Op) -> tuple[object, ...]:
    if isinstance(op, LinkOp):
        return ("link", op.ifname)
    if isinstance(op, ClassOp):
        return ("class", op.dev, op.classid)
    if isinstance(op, QdiscOp):
        return ("qdisc", op.dev, op.parent) if op.is_leaf else ("qdisc", op.dev, op.handle)
    return ("filter", op.dev, op.parent, op.prio)


def _switches_off_sticky(before: QdiscOp, after: QdiscOp) -> bool:
    """netem options a `change` cannot reset to 0 (their attributes are only sent when set)."""
    if before.netem is None or after.netem is None:
        return False
    old, new = before.netem, after.netem
    return (old.corrupt_pct > 0 and new.corrupt_pct == 0) or (
        old.reorder_pct > 0 and new.reorder_pct == 0
    )


def plan_change(old: NicShaping, new: NicShaping) -> tuple[Change, ...]:
    """The in-place changes that turn a NIC shaped by `old` into one shaped by `new`.

    Only class parameters, leaf qdiscs and loss rules may differ; anything else (another
    tree, other classes or filters) raises ValueError: that is a rebuild, not a change."""
    old_ops = {_key(op): op for op in old.ops}
    new_ops = {_key(op): op for op in new.ops}
    changes: list[Change] = []
    for key, op in new_ops.items():
        before = old_ops.get(key)
        if before == op:
            continue
        if isinstance(op, ClassOp) and isinstance(before, ClassOp):
            changes.append(TcChange("change", op))
        elif isinstance(op, QdiscOp) and op.is_leaf:
            if before is None:
                changes.append(TcChange("replace", op))
            elif isinstance(before, QdiscOp) and _switches_off_sticky(before, op):
                # The kernel keeps an omitted corrupt/reorder on `change` (tc behaves the
                # same), so turning one off swaps the leaf qdisc; the HTB class stays.
                changes += [TcChange("delete", before), TcChange("replace", op)]
            elif isinstance(before, QdiscOp) and before.kind == op.kind:
                changes.append(TcChange("change", op))
            else:
                raise ValueError(f"cannot change {before} into {op} in place")
        else:
            raise ValueError(f"cannot change {before} into {op} in place")
    for key, op in old_ops.items():
        if key in new_ops:
            continue
        if isinstance(op, QdiscOp) and op.is_leaf:
            changes.append(TcChange("delete", op))
        else:
            raise ValueError(f"cannot remove {op} in place")
    old_rules = {r.comment: r for r in old.loss_rules}
    new_rules = {r.comment: r for r in new.loss_rules}
    for comment, rule in new_rules.items():
        if comment not in old_rules:
            changes.append(RuleChange("add", rule))
        elif old_rules[comment] != rule:
            changes.append(RuleChange("replace", rule))
    changes += [RuleChange("delete", r) for c, r in old_rules.items() if c not in new_rules]
    return tuple(changes)


# --- the set-link request ------------------------------------------------------------------
def check_request(direction: str, up: object) -> None:
    """SpecError unless `direction` is egress/ingress/both and `up` True/False/None."""
    if direction not in ("egress", "ingress", "both"):
        raise SpecError(f"direction: {direction!r} is invalid (egress, ingress or both)")
    if up is not None and not isinstance(up, bool):
        raise SpecError(f"up: {up!r} is invalid (True, False or None)")


def changed_nic(nic: NicSpec, where: str, direction: str, values: Mapping[str, float]) -> NicSpec:
    """`nic` with `values` (DirectionSpec fields) set on `direction` ('both': each one); a
    rate without a ceil lowers the ceil to it. SpecError names `<where>.<direction>.<field>`."""
    shape = nic.shape
    if shape is None:
        raise SpecError(
            f"{where}: unshaped, so only up/down can change in place "
            "(give it a LinkShape in the spec)"
        )
    new_dirs: dict[str, DirectionSpec] = {}
    for name in DIRECTIONS:
        d = shape.direction(name)
        if direction in (name, "both"):
            fields = dict(values)
            if "rate_mbit" in fields and "ceil_mbit" not in fields and d.ceil_mbit is not None:
                fields["ceil_mbit"] = min(d.ceil_mbit, fields["rate_mbit"])
            try:
                d = dataclasses.replace(d, **fields)  # type: ignore[arg-type]
            except (SpecError, TypeError) as exc:
                raise SpecError(f"{where}.{name}.{exc}") from None
        new_dirs[name] = d
    try:
        new_shape = dataclasses.replace(
            shape, rate_mbit=None, egress=new_dirs["egress"], ingress=new_dirs["ingress"]
        )
    except SpecError as exc:
        raise SpecError(f"{where}.{exc}") from None
    return dataclasses.replace(nic, shape=new_shape)


@dataclass(frozen=True)
class LinkChange:
    """What one set_link does to a NIC shaped `before`, to leave it shaped `after`."""

    before: NicShaping
    after: NicShaping
    changes: tuple[Change, ...]

    @property
    def tc_changes(self) -> tuple[TcChange | LinkStateOp, ...]:
        """The changes made in the NIC's namespace, in order."""
        return tuple(c for c in self.changes if isinstance(c, TcChange | LinkStateOp))

    @property
    def rule_changes(self) -> tuple[RuleChange, ...]:
        """The changes to the lab switch's loss rules (one nft transaction)."""
        return tuple(c for c in self.changes if isinstance(c, RuleChange))

    @property
    def undo(self) -> tuple[TcChange, ...]:
        """The tc changes that put the NIC back as `before` (to undo a half-made change)."""
        return tuple(c for c in plan_change(self.after, self.before) if isinstance(c, TcChange))


def plan_link_change(
    before: NicShaping,
    after: NicShaping,
    *,
    node_id: str,
    nic: str,
    dev: str,
    up: bool | None,
    allow_unemulated: bool,
) -> LinkChange:
    """The in-place change from `before` to `after` of NIC `nic` (kernel name `dev`) of
    `node_id`, then `up` (None: leave the link state). NetemError when it needs a feature
    `before` did not and the kernel cannot emulate (unless `allow_unemulated`), or when it is
    not a change in place."""
    added = [u for u in after.unemulated if u not in before.unemulated]
    if added and not allow_unemulated:
        raise unemulated_error(added, f"set_link {node_id} {nic}")
    try:
        changes: list[Change] = list(plan_change(before, after))
    except ValueError as exc:
        raise NetemError(f"{node_id}.{nic}: {exc}", operation="set_link") from exc
    if up is not None:
        changes.append(LinkStateOp(dev, up))
    return LinkChange(before, after, tuple(changes))


def with_nic(spec: TopologySpec, node_id: str, nic: NicSpec) -> TopologySpec:
    """`spec` with the NIC of `node_id` named `nic.name` replaced by `nic`."""
    hosts = tuple(
        dataclasses.replace(h, nics=tuple(nic if n.name == nic.name else n for n in h.nics))
        if h.node_id == node_id
        else h
        for h in spec.hosts
    )
    return dataclasses.replace(spec, hosts=hosts)

"""Planned tc operations as pyroute2 calls on one netlink handle: create (`apply_op`), undo,
change in place (`apply_tc_change`), and the fail-closed ownership checks that come before
(`check_pristine`, `check_ours`). Each call says in tc words what it did (`describe`, for
errors and the lab record only); no tc command string is ever executed. Which operations to
run is the planner's business (netem.plan, netem.linkchange), not this module's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from errno import EEXIST
from functools import partial
from typing import Any, Literal

from netem.errors import NetemError
from netem.kernel import link_index, link_up, set_link_state, wrap
from netem.linkchange import LinkStateOp, TcChange
from netem.plan import (
    ClassOp,
    LinkOp,
    NetemParams,
    Op,
    QdiscOp,
    U32Key,
    expected_classes,
    expected_qdiscs,
    format_handle,
)


def describe(op: Op, verb: str = "add") -> str:
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


def u32_key(key: U32Key) -> str:
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


def _tc_qdisc(
    ipr: Any, what: str, index: int, op: QdiscOp, verb: Literal["add", "change", "replace", "del"]
) -> None:
    """One qdisc request. `change` keeps the qdisc (and its queue), `replace` grafts a new
    leaf qdisc under an existing class."""
    if op.kind == "ingress":
        wrap(what, partial(ipr.tc, verb, "ingress", index=index))
        return
    args: dict[str, Any] = {"index": index, "handle": op.handle, "parent": op.parent}
    if verb == "del":
        wrap(what, partial(ipr.tc, "del", op.kind, **args))
        return
    if op.kind == "htb":
        args["default"] = op.default_class
    elif op.kind == "pfifo":
        args["limit"] = op.limit_packets
    elif op.kind == "netem":
        args.update(netem_arguments(op))
    wrap(what, partial(ipr.tc, verb, op.kind, **args))


def _tc_class(
    ipr: Any, what: str, index: int, op: ClassOp, verb: Literal["add-class", "change-class"]
) -> None:
    wrap(
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


def apply_op(ipr: Any, where: str, op: Op) -> None:
    """Execute one planned operation with `ipr` (create-exclusive: never replaces anything)."""
    what = f"{describe(op)} ({where})"
    if isinstance(op, LinkOp):
        wrap(what, partial(ipr.link, "add", ifname=op.ifname, kind=op.kind, txqlen=op.txqueuelen))
        link_up(ipr, where, op.ifname)
        return
    index = link_index(ipr, where, op.dev)
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
                "ifindex": link_index(ipr, where, op.action.dev),
            }
        wrap(
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
                keys=[u32_key(k) for k in op.keys],
                **extra,
            ),
        )


def undo(ipr: Any, where: str, done: Sequence[Op]) -> None:
    """Best-effort removal of what `done` created (classes and filters go with their qdisc)."""
    for op in reversed(done):
        with contextlib.suppress(NetemError):
            if isinstance(op, LinkOp):
                index = link_index(ipr, where, op.ifname)
                wrap(f"ip link del {op.ifname} ({where})", partial(ipr.link, "del", index=index))
            elif isinstance(op, QdiscOp):
                index = link_index(ipr, where, op.dev)
                wrap(
                    f"tc qdisc del dev {op.dev} {format_handle(op.parent)} ({where})",
                    partial(
                        ipr.tc, "del", op.kind, index=index, handle=op.handle, parent=op.parent
                    ),
                )


def apply_ops(ipr: Any, where: str, ops: Sequence[Op]) -> None:
    """Shape one NIC: check it is pristine, run `ops` in order; on a failure half-way remove
    what was added and re-raise."""
    done: list[Op] = []
    try:
        check_pristine(ipr, where, ops)
        for op in ops:
            apply_op(ipr, where, op)
            done.append(op)
    except BaseException:
        undo(ipr, where, done)
        raise


def apply_tc_change(ipr: Any, where: str, change: TcChange | LinkStateOp) -> None:
    """One in-place change: a class or leaf qdisc `change`/`replace`/`delete`, or link up/down."""
    if isinstance(change, LinkStateOp):
        set_link_state(ipr, where, change.dev, change.up)
        return
    op = change.op
    index = link_index(ipr, where, op.dev)
    verb = "del" if change.verb == "delete" else change.verb
    what = f"{describe(op, verb)} ({where})"
    if isinstance(op, ClassOp):
        _tc_class(ipr, what, index, op, "change-class")
    else:
        _tc_qdisc(ipr, what, index, op, verb)


def apply_tc_changes(
    ipr: Any,
    where: str,
    changes: Sequence[TcChange | LinkStateOp],
    undo_changes: Sequence[TcChange],
) -> None:
    """Run `changes` in order. If one fails, the `undo_changes` of every device already
    changed are run (best effort) and the first error is re-raised."""
    done: list[TcChange | LinkStateOp] = []
    try:
        for change in changes:
            apply_tc_change(ipr, where, change)
            done.append(change)
    except BaseException:
        put_back(ipr, where, done, undo_changes)
        raise


def put_back(
    ipr: Any,
    where: str,
    done: Sequence[TcChange | LinkStateOp],
    undo_changes: Sequence[TcChange],
) -> None:
    """Best effort: run the `undo_changes` of every device some change in `done` touched."""
    changed = {d.op.dev for d in done if isinstance(d, TcChange)}
    for change in undo_changes:
        if change.op.dev in changed:
            with contextlib.suppress(NetemError):
                apply_tc_change(ipr, where, change)


# --- ownership checks ----------------------------------------------------------------------
def _dump_qdiscs(ipr: Any, where: str, index: int) -> set[tuple[str, int, int]]:
    msgs = wrap(f"tc qdisc show ({where})", partial(ipr.get_qdiscs, index=index))
    return {
        (str(m.get_attr("TCA_KIND")), int(m["parent"]), int(m["handle"]))
        for m in msgs
        if int(m["index"]) == index
    }


def _dump_classes(ipr: Any, where: str, index: int) -> set[int]:
    msgs = wrap(f"tc class show ({where})", partial(ipr.get_classes, index=index))
    return {int(m["handle"]) for m in msgs if int(m["index"]) == index}


def _fmt_qdiscs(qdiscs: set[tuple[str, int, int]]) -> str:
    return ", ".join(
        f"{kind} {format_handle(handle)} parent {format_handle(parent)}"
        for kind, parent, handle in sorted(qdiscs)
    )


def check_pristine(ipr: Any, where: str, ops: Sequence[Op]) -> None:
    """Before shaping: the IFB must not exist and the NIC may carry only the kernel's own
    default qdisc (handle 0:). Anything else belongs to someone else: fail closed."""
    for op in ops:
        if isinstance(op, LinkOp) and ipr.link_lookup(ifname=op.ifname):
            raise NetemError(
                f"{op.ifname} already exists ({where}) and this lab did not create it; "
                f"refusing to run {describe(op)}",
                operation=describe(op),
                errno=EEXIST,
            )
    for dev in expected_qdiscs(tuple(ops)):
        if any(isinstance(op, LinkOp) and op.ifname == dev for op in ops):
            continue
        index = link_index(ipr, where, dev)
        foreign = {q for q in _dump_qdiscs(ipr, where, index) if q[2] >> 16 != 0}
        if foreign:
            first = next(op for op in ops if isinstance(op, QdiscOp) and op.dev == dev)
            raise NetemError(
                f"{dev} ({where}) already has a qdisc this lab did not plan "
                f"({_fmt_qdiscs(foreign)}); refusing to run {describe(first)}",
                operation=describe(first),
                errno=EEXIST,
            )


def check_ours(ipr: Any, where: str, ops: Sequence[Op]) -> None:
    """Before an in-place change: every qdisc and class on the NIC and its IFB must be exactly
    the planned ones (kinds and handles). A foreign or missing one: raise, change nothing."""
    want_q = expected_qdiscs(tuple(ops))
    want_c = expected_classes(tuple(ops))
    for dev, qdiscs in want_q.items():
        index = link_index(ipr, where, dev)
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

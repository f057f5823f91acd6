"""Byte accounting per pair of peers, across faults: every verified KV byte has a sender.

Each engine incarnation (`node@boot`: a restarted node is a new one) keeps a ledger of the KV
bytes it sent to each node (`kv>NODE`, `relay>NODE`), verified from each sender incarnation
(`kv<NODE@BOOT`, `relay<NODE@BOOT`: the frame's `src`) and verified from each storage server
(`storage<NODE`); each storage server counts the bytes its reads sent per client incarnation
(`read_by`). A pair balances when both ends counted the same bytes.

A pair is *whole* when both of its ends lived through the run: the sender incarnation is still
the node's process at the end, and the receiving node (or storage server) ran as one process
throughout. Whole pairs must balance exactly. A pair with a killed or restarted end cannot: the
bytes in flight died with the process, and its last report predates its death. Those pairs are
reported — sent, received, and the difference as bytes lost to faults — and do not make the run
unaccounted. Bytes a receiver attributes to no known sender are never accounted.

Pure: the scheduler's `/v1/cluster` and the storage servers' stats, before and after the run, in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

KV_KINDS = ("kv", "relay")
MAX_LISTED_PAIRS = 50


@dataclass(frozen=True, slots=True)
class Incarnation:
    node: str
    boot: str
    whole: bool
    """Still the node's process when the run ended."""
    ledger: dict[str, int]
    """Ledger counts of the run only (after minus before, for a process that predates it)."""

    @property
    def name(self) -> str:
        return f"{self.node}@{self.boot}"


def _ledger(entry: Mapping[str, Any]) -> dict[str, int]:
    raw = (entry.get("counters") or {}).get("ledger") or {}
    return {str(k): int(v) for k, v in raw.items() if isinstance(v, int | float)}


def _by_incarnation(cluster: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    out: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for key, entry in cluster.items():
        node = key.split("@", 1)[0] if entry.get("retired") else key
        out[f"{node}@{entry.get('boot', '')}"] = (node, entry)
    return out


def incarnations(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Incarnation]:
    """Every engine incarnation the scheduler heard from, with its run-only ledger."""
    prior = {name: _ledger(e) for name, (_, e) in _by_incarnation(before).items()}
    out: dict[str, Incarnation] = {}
    for name, (node, entry) in _by_incarnation(after).items():
        base = prior.get(name, {})
        ledger = {k: v - base.get(k, 0) for k, v in _ledger(entry).items()}
        ledger = {k: v for k, v in ledger.items() if v}
        out[name] = Incarnation(node, str(entry.get("boot", "")), not entry.get("retired"), ledger)
    return out


def storage_reads(
    before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, dict[str, int]], set[str]]:
    """Per storage server, the bytes its reads sent per client during the run; and the servers
    that restarted (their earlier process's counts died with it)."""
    reads: dict[str, dict[str, int]] = {}
    restarted: set[str] = set()
    for node, now in after.items():
        then = before.get(node)
        same = then is not None and then.get("boot") == now.get("boot")
        if then is not None and not same:
            restarted.add(node)
        base = then.get("read_by", {}) if then is not None and same else {}
        counts = {c: int(n) - int(base.get(c, 0)) for c, n in (now.get("read_by") or {}).items()}
        reads[node] = {c: n for c, n in counts.items() if n}
    return reads, restarted


@dataclass(slots=True)
class _Pair:
    kind: str
    sender: str
    receiver: str
    sent: int = 0
    received: int = 0
    whole: bool = True

    def wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "from": self.sender,
            "to": self.receiver,
            "sent": self.sent,
            "received": self.received,
        }


def _stable(node: str, incs: Iterable[Incarnation]) -> bool:
    """The node ran as one process through the run: none of its incarnations died."""
    return all(i.whole for i in incs if i.node == node)


def account(
    cluster_before: Mapping[str, Any],
    cluster_after: Mapping[str, Any],
    storage_before: Mapping[str, Mapping[str, Any]],
    storage_after: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """summary.json `byte_ledger`: `balanced` when every whole pair balances and no byte is
    without a known sender; the pairs that do not balance, and the bytes lost to faults."""
    incs = incarnations(cluster_before, cluster_after)
    reads, restarted = storage_reads(storage_before, storage_after)
    pairs = [*_storage_pairs(incs, reads, restarted), *_kv_pairs(incs)]
    unmatched = [*_unknown_storage_clients(incs, reads), *_unknown_kv_senders(incs)]
    mismatched = [p for p in pairs if p.whole and p.sent != p.received]
    faulted = [p for p in pairs if not p.whole]
    return {
        "balanced": not mismatched and not unmatched,
        "bytes_whole_pairs": sum(p.received for p in pairs if p.whole),
        "bytes_lost_to_faults": sum(max(0, p.sent - p.received) for p in faulted),
        "bytes_received_beyond_report": sum(max(0, p.received - p.sent) for p in faulted),
        "num_pairs": len(pairs),
        "mismatched": [p.wire() for p in mismatched][:MAX_LISTED_PAIRS],
        "unmatched": unmatched[:MAX_LISTED_PAIRS],
        "fault_pairs": [p.wire() for p in faulted][:MAX_LISTED_PAIRS],
        "restarted": sorted({i.node for i in incs.values() if not i.whole} | restarted),
    }


def _unknown_storage_clients(
    incs: Mapping[str, Incarnation], reads: Mapping[str, Mapping[str, int]]
) -> list[dict[str, Any]]:
    """Bytes a storage server sent to a client incarnation the scheduler never heard from."""
    return [
        {"kind": "storage", "from": node, "to": client, "bytes": n}
        for node, by_client in reads.items()
        for client, n in by_client.items()
        if client not in incs
    ]


def _unknown_kv_senders(incs: Mapping[str, Incarnation]) -> list[dict[str, Any]]:
    """KV bytes an engine verified from a sender incarnation nobody knows."""
    out = []
    for inc in incs.values():
        for key, n in inc.ledger.items():
            for kind in KV_KINDS:
                if key.startswith(f"{kind}<") and key[len(kind) + 1 :] not in incs:
                    out.append(
                        {"kind": kind, "from": key[len(kind) + 1 :], "to": inc.name, "bytes": n}
                    )
    return out


def _storage_pairs(
    incs: Mapping[str, Incarnation],
    reads: Mapping[str, Mapping[str, int]],
    restarted: set[str],
) -> list[_Pair]:
    """(storage server, engine incarnation) pairs: bytes the server's reads sent against the
    bytes the engine verified from it."""
    pairs = []
    for storage in sorted(
        set(reads) | {k[8:] for i in incs.values() for k in i.ledger if k.startswith("storage<")}
    ):
        for inc in incs.values():
            got = inc.ledger.get(f"storage<{storage}", 0)
            served = reads.get(storage, {}).get(inc.name, 0)
            if got or served:
                whole = inc.whole and storage not in restarted
                pairs.append(_Pair("storage", storage, inc.name, served, got, whole))
    return pairs


def _receivers(sender: Incarnation, incs: Mapping[str, Incarnation]) -> set[tuple[str, str]]:
    """(kind, node) the sender says it sent to, or that say they received from it."""
    receivers = {
        (kind, key[len(kind) + 1 :])
        for key in sender.ledger
        for kind in KV_KINDS
        if key.startswith(f"{kind}>")
    }
    receivers |= {
        (kind, r.node)
        for r in incs.values()
        for kind in KV_KINDS
        if f"{kind}<{sender.name}" in r.ledger
    }
    return receivers


def _kv_pairs(incs: Mapping[str, Incarnation]) -> list[_Pair]:
    """(sender incarnation, receiving node) pairs of KV and relay bytes: sent against the
    bytes every incarnation of the receiver verified from that sender."""
    pairs = []
    for sender in incs.values():
        for kind, node in sorted(_receivers(sender, incs)):
            received = sum(
                r.ledger.get(f"{kind}<{sender.name}", 0) for r in incs.values() if r.node == node
            )
            whole = sender.whole and _stable(node, incs.values())
            sent = sender.ledger.get(f"{kind}>{node}", 0)
            pairs.append(_Pair(kind, sender.name, node, sent, received, whole))
    return pairs

"""Byte accounting per pair of peers (lab/results/ledger.py): whole pairs balance exactly, pairs
with a killed or restarted end are reported, bytes from nowhere are never accounted."""

from __future__ import annotations

from typing import Any

from lab.results.ledger import account, incarnations, storage_reads


def node(boot: str, ledger: dict[str, int], *, retired: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": "prefill", "boot": boot, "counters": {"ledger": ledger}}
    if retired:
        entry["retired"] = True
    return entry


def storage(boot: str, read_by: dict[str, int]) -> dict[str, Any]:
    return {"boot": boot, "bytes_read": sum(read_by.values()), "read_by": read_by}


# A 1P1D run: decode-0 reads 100 from storage-0 and relays them to prefill-0; prefill-0 reads
# 50 itself and sends 70 (hit KV and new tokens) to decode-0.
HEALTHY = {
    "prefill-0": node("p1", {"storage<storage-0": 50, "relay<decode-0@d1": 100, "kv>decode-0": 70}),
    "decode-0": node(
        "d1", {"storage<storage-0": 100, "relay>prefill-0": 100, "kv<prefill-0@p1": 70}
    ),
}
STORAGE = {"storage-0": storage("s1", {"prefill-0@p1": 50, "decode-0@d1": 100})}


def test_a_healthy_run_balances_every_pair() -> None:
    out = account({}, HEALTHY, {}, STORAGE)
    assert out["balanced"]
    assert out["num_pairs"] == 4
    assert out["bytes_whole_pairs"] == 50 + 100 + 100 + 70
    assert out["bytes_lost_to_faults"] == 0
    assert out["restarted"] == []


def test_a_byte_missing_on_a_whole_pair_is_a_mismatch() -> None:
    cluster = {
        **HEALTHY,
        "decode-0": node(
            "d1", {**HEALTHY["decode-0"]["counters"]["ledger"], "kv<prefill-0@p1": 69}
        ),
    }
    out = account({}, cluster, {}, STORAGE)
    assert not out["balanced"]
    assert out["mismatched"] == [
        {"kind": "kv", "from": "prefill-0@p1", "to": "decode-0", "sent": 70, "received": 69}
    ]


def test_storage_bytes_the_server_did_not_send_are_a_mismatch() -> None:
    out = account(
        {}, HEALTHY, {}, {"storage-0": storage("s1", {"prefill-0@p1": 50, "decode-0@d1": 90})}
    )
    assert not out["balanced"]
    assert out["mismatched"][0]["kind"] == "storage"


def test_bytes_from_an_unknown_sender_are_never_accounted() -> None:
    ledger = {**HEALTHY["prefill-0"]["counters"]["ledger"], "kv<mallory@x": 5}
    out = account({}, {**HEALTHY, "prefill-0": node("p1", ledger)}, {}, STORAGE)
    assert not out["balanced"]
    assert out["unmatched"] == [
        {"kind": "kv", "from": "mallory@x", "to": "prefill-0@p1", "bytes": 5}
    ]


def test_a_killed_prefill_node_makes_its_pairs_fault_pairs_not_mismatches() -> None:
    # prefill-0's first process sent 70 to decode-0, which verified 60 before the kill: the rest
    # died in flight. The new process then sent 30, all received.
    cluster = {
        "prefill-0@p1": node("p1", {"storage<storage-0": 50, "kv>decode-0": 70}, retired=True),
        "prefill-0": node("p2", {"kv>decode-0": 30}),
        "decode-0": node("d1", {"kv<prefill-0@p1": 60, "kv<prefill-0@p2": 30}),
    }
    reads = {"storage-0": storage("s1", {"prefill-0@p1": 52})}  # sent after its last report
    out = account({}, cluster, {}, reads)
    assert out["balanced"]
    assert out["restarted"] == ["prefill-0"]
    assert out["bytes_lost_to_faults"] == 10 + 2  # in flight to decode-0; read, never reported
    assert out["bytes_received_beyond_report"] == 0
    assert {(p["kind"], p["from"]) for p in out["fault_pairs"]} == {
        ("kv", "prefill-0@p1"),
        ("storage", "storage-0"),
    }
    # the new process's pair is whole: had it lost a byte, that would be a mismatch
    cluster["decode-0"] = node("d1", {"kv<prefill-0@p1": 60, "kv<prefill-0@p2": 29})
    assert not account({}, cluster, {}, reads)["balanced"]


def test_sends_to_a_restarted_receiver_are_fault_pairs() -> None:
    cluster = {
        "prefill-0": node("p1", {"kv>decode-0": 100}),
        "decode-0@d1": node("d1", {"kv<prefill-0@p1": 40}, retired=True),
        "decode-0": node("d2", {"kv<prefill-0@p1": 50}),
    }
    out = account({}, cluster, {}, {})
    assert out["balanced"]
    assert out["fault_pairs"] == [
        {"kind": "kv", "from": "prefill-0@p1", "to": "decode-0", "sent": 100, "received": 90}
    ]
    assert out["bytes_lost_to_faults"] == 10


def test_a_restarted_storage_server_counts_only_its_new_process() -> None:
    before = {"storage-0": storage("s1", {"decode-0@d1": 1000})}
    after = {"storage-0": storage("s2", {"decode-0@d1": 40})}
    reads, restarted = storage_reads(before, after)
    assert reads == {"storage-0": {"decode-0@d1": 40}} and restarted == {"storage-0"}
    cluster = {"decode-0": node("d1", {"storage<storage-0": 90})}
    out = account({"decode-0": node("d1", {})}, cluster, before, after)
    assert out["balanced"] and out["restarted"] == ["storage-0"]
    assert out["bytes_received_beyond_report"] == 50


def test_counts_before_the_run_are_subtracted() -> None:
    before_cluster = {"decode-0": node("d1", {"storage<storage-0": 7})}
    after_cluster = {"decode-0": node("d1", {"storage<storage-0": 17})}
    before = {"storage-0": storage("s1", {"decode-0@d1": 7})}
    after = {"storage-0": storage("s1", {"decode-0@d1": 17})}
    incs = incarnations(before_cluster, after_cluster)
    assert incs["decode-0@d1"].ledger == {"storage<storage-0": 10}
    out = account(before_cluster, after_cluster, before, after)
    assert out["balanced"] and out["bytes_whole_pairs"] == 10

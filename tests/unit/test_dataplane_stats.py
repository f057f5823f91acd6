"""A data plane's counters and byte ledger (services/dataplane_stats.py)."""

from __future__ import annotations

from services.dataplane_stats import MAX_LEDGER_KEYS, DataPlaneStats


def test_the_ledger_adds_per_key_and_pools_keys_beyond_its_bound() -> None:
    stats = DataPlaneStats(lambda msg: None)
    stats.count("kv>decode-0", 10)
    stats.count("kv>decode-0", 5)
    assert stats.ledger == {"kv>decode-0": 15}
    for i in range(MAX_LEDGER_KEYS):
        stats.count(f"relay<decode-{i}@b", 1)
    stats.count("relay<decode-x@b", 1)
    assert len(stats.ledger) == MAX_LEDGER_KEYS + 1
    assert stats.ledger["relay<?"] == 2  # the two keys beyond the bound
    stats.count("kv>decode-0", 1)  # a key it already has still counts on its own
    assert stats.ledger["kv>decode-0"] == 16


def test_errors_are_counted_apart_by_kind_and_mark_the_status_dirty() -> None:
    logged: list[str] = []
    stats = DataPlaneStats(logged.append)
    stats.dirty = False
    stats.record_error("corrupt")
    stats.record_error("peer lost", transient=True)
    assert stats.counters["errors"] == 1
    assert stats.counters["errors_transient"] == 1
    assert stats.dirty
    assert len(logged) == 2

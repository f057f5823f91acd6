"""A data plane's counters, byte ledger and errors, and whether its status changed since the
timeline last heard it.

Shared by the parts of the data-plane process (services/dataplane.py, kv_reads.py,
kv_senders.py): each adds what it moved and sets `dirty`, the shell's status loop sends it.
"""

from __future__ import annotations

from collections.abc import Callable

from services.tasks import ErrorLog

MAX_LEDGER_KEYS = 4096
"""Ledger entries per data plane: peers and their incarnations are few; a bound all the same."""


class DataPlaneStats:
    def __init__(self, log: Callable[[str], None]) -> None:
        self.counters: dict[str, int] = {
            "bytes_storage_read": 0,
            "bytes_relay_sent": 0,
            "bytes_relay_received": 0,
            "bytes_pd_sent": 0,
            "bytes_pd_received": 0,
            "bytes_verified": 0,
            "bytes_written": 0,
            "errors": 0,
            "errors_transient": 0,
            "frames_discarded": 0,
        }
        self.ledger: dict[str, int] = {}
        """Bytes per peer, for the byte accounting across faults: `kv>NODE`/`relay>NODE` sent to
        a node, `kv<NODE@BOOT`/`relay<NODE@BOOT` verified from one incarnation of a node (the
        frame's `src`), `storage<NODE` verified from a storage server (lab/metrics.py)."""
        self.errors = ErrorLog(log)
        self.dirty = True
        """Something changed that the timeline has not been told yet."""

    def record_error(self, msg: str, *, transient: bool = False) -> None:
        self.errors.record(msg, transient=transient)
        self.counters["errors"] = self.errors.count
        self.counters["errors_transient"] = self.errors.transient
        self.dirty = True

    def count(self, key: str, nbytes: int) -> None:
        """Add to the ledger; a peer-chosen key beyond MAX_LEDGER_KEYS is pooled under `?`."""
        if key not in self.ledger and len(self.ledger) >= MAX_LEDGER_KEYS:
            key = key[: key.find("<") + 1] + "?"
        self.ledger[key] = self.ledger.get(key, 0) + nbytes

"""The run's progress line on stderr while the driver replays the workload."""

from __future__ import annotations

import sys
import time
from typing import Any

from lab.results.metrics import Sample


class Progress:
    """Prints one status line every ~2 s: turns, agents, tokens/s, storage NIC use."""

    def __init__(self, policy: str, enabled: bool) -> None:
        self.policy = policy
        self.enabled = enabled
        self.last_print = 0.0
        self.progress: dict[str, Any] = {}

    def update(self, samples: list[Sample]) -> None:
        if not self.enabled or time.monotonic() - self.last_print < 2.0 or not self.progress:
            return
        self.last_print = time.monotonic()
        p = self.progress
        tok_s = p["tokens_done"] / max(p["elapsed_s"], 1e-9)
        nic = ""
        if len(samples) >= 2:
            a, b = samples[-2], samples[-1]
            dt = max(b["t"] - a["t"], 1e-9)
            parts = []
            for node, nics in sorted(b["nodes"].items()):
                c = nics.get("snic")
                prev = a["nodes"].get(node, {}).get("snic")
                if c is None or prev is None or not c.get("rate_mbit"):
                    continue
                if not node.startswith(("prefill", "decode")):
                    continue
                mbit = (c["ingress_bytes"] - prev["ingress_bytes"]) * 8 / dt / 1e6
                parts.append(f"{node} snic {100 * mbit / c['rate_mbit']:3.0f}%")
            nic = "  " + "  ".join(parts)
        line = (
            f"[{self.policy}] {p['elapsed_s']:6.1f}s  turns {p['turns_done']}/{p['turns_total']}"
            f"  agents {p['agents_done']}  {tok_s / 1000:7.1f}k tok/s{nic}"
        )
        if p.get("turns_failed"):
            line += f"  FAILED {p['turns_failed']}"
        print(line, file=sys.stderr, flush=True)

"""The run's progress on stderr while the driver replays the workload: a live display (rich)
when stderr is a terminal, the plain progress line every ~2 s otherwise (CI logs, pipes).

Both show the same snapshot (`snapshot`, pure): turns and agents done, tokens/s, the share of
its shaped rate each engine NIC direction used between the last two counter samples, and, in
the live display, the estimated time left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from lab.results.metrics import Sample

PLAIN_INTERVAL_S = 2.0
"""The plain line's period; the live display is redrawn at every update (each runner tick)."""
ENGINE_NODES = ("prefill", "decode")
DIRECTIONS = ("egress", "ingress")


@dataclass(frozen=True)
class NicUse:
    """One engine NIC between two counter samples: Mbit/s and the share of its shaped rate."""

    node: str
    nic: str
    mbit: dict[str, float]
    """direction -> Mbit/s."""
    percent: dict[str, float | None]
    """direction -> % of the shaped rate (None: the direction is not shaped)."""


@dataclass(frozen=True)
class Snapshot:
    """What the progress shows at one moment."""

    policy: str
    elapsed_s: float
    turns_done: int
    turns_total: int
    turns_failed: int
    agents_done: int
    agents_total: int | None
    tokens_per_s: float
    eta_s: float | None
    """Turns left at the rate of the turns done so far (None before the first one)."""
    nics: list[NicUse] = field(default_factory=list)


def _nic_use(a: Sample, b: Sample) -> list[NicUse]:
    dt = max(float(b["t"]) - float(a["t"]), 1e-9)
    out: list[NicUse] = []
    for node, nics in sorted(b["nodes"].items()):
        if not node.startswith(ENGINE_NODES):
            continue
        for nic, c in sorted(nics.items()):
            prev = a["nodes"].get(node, {}).get(nic)
            if prev is None or not c.get("rate_mbit"):
                continue  # unshaped (mgmt) or new
            mbit: dict[str, float] = {}
            percent: dict[str, float | None] = {}
            for d in DIRECTIONS:
                mbit[d] = (c[f"{d}_bytes"] - prev[f"{d}_bytes"]) * 8 / dt / 1e6
                rate = c.get("ingress_rate_mbit") if d == "ingress" else None
                rate = rate or c.get("rate_mbit")
                percent[d] = 100 * mbit[d] / rate if rate else None
            out.append(NicUse(node, nic, mbit, percent))
    return out


def snapshot(
    policy: str,
    progress: Mapping[str, Any],
    samples: Sequence[Sample],
    agents_total: int | None = None,
) -> Snapshot:
    """The driver's last progress message and the runner's counter samples, as figures."""
    elapsed = float(progress["elapsed_s"])
    done, total = int(progress["turns_done"]), int(progress["turns_total"])
    eta = elapsed * (total - done) / done if done > 0 else None
    return Snapshot(
        policy=policy,
        elapsed_s=elapsed,
        turns_done=done,
        turns_total=total,
        turns_failed=int(progress.get("turns_failed", 0)),
        agents_done=int(progress["agents_done"]),
        agents_total=agents_total,
        tokens_per_s=float(progress["tokens_done"]) / max(elapsed, 1e-9),
        eta_s=eta,
        nics=_nic_use(samples[-2], samples[-1]) if len(samples) >= 2 else [],
    )


def plain_line(s: Snapshot) -> str:
    """The one-line form (CI logs, pipes): each engine node's snic ingress, as a share of its
    rate, the storage reads the DualPath scheduler balances."""
    nic = "".join(
        f"  {u.node} snic {u.percent['ingress']:3.0f}%"
        for u in s.nics
        if u.nic == "snic" and u.percent["ingress"] is not None
    )
    line = (
        f"[{s.policy}] {s.elapsed_s:6.1f}s  turns {s.turns_done}/{s.turns_total}"
        f"  agents {s.agents_done}  {s.tokens_per_s / 1000:7.1f}k tok/s{nic}"
    )
    if s.turns_failed:
        line += f"  FAILED {s.turns_failed}"
    return line


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s"


def _percent(p: float | None) -> str:
    return "-" if p is None else f"{p:.0f}%"


def live_view(s: Snapshot) -> RenderableType:
    """The live display: a header, a bar of the turns done and a table of NIC use."""
    agents = f"{s.agents_done}/{s.agents_total}" if s.agents_total else str(s.agents_done)
    share = 100 * s.turns_done / s.turns_total if s.turns_total else 100.0
    eta = "-" if s.eta_s is None else _duration(s.eta_s)
    header = Text.assemble(
        (f"[{s.policy}] ", "bold"),
        f"{_duration(s.elapsed_s)}  turns {s.turns_done}/{s.turns_total} ({share:.0f}%)",
        f"  agents {agents}  {s.tokens_per_s / 1000:.1f}k tok/s  ETA {eta}",
    )
    if s.turns_failed:
        header.append(f"  FAILED {s.turns_failed}", style="bold red")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(s.turns_total, 1), completed=s.turns_done, width=40),
        f"{s.turns_done}/{s.turns_total}",
    )
    parts: list[RenderableType] = [header, bar]
    if s.nics:
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("node")
        table.add_column("nic")
        for d in DIRECTIONS:
            table.add_column(f"{d} Mbit/s", justify="right")
            table.add_column("of rate", justify="right")
        for u in s.nics:
            cells = [u.node, u.nic]
            for d in DIRECTIONS:
                cells += [f"{u.mbit[d]:.1f}", _percent(u.percent[d])]
            table.add_row(*cells)
        parts.append(table)
    return Group(*parts)


class Progress:
    """The progress of one run: `progress` is the driver's last progress message (set by the
    runner's reader thread), `update` is called at every runner tick, `close` at the end.
    Disabled (`-q`), it shows nothing. `console`: the live display's (default: stderr's when
    it is a terminal); `stream`: the plain lines' (default: stderr)."""

    def __init__(
        self,
        policy: str,
        enabled: bool,
        *,
        agents_total: int | None = None,
        console: Console | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.policy = policy
        self.enabled = enabled
        self.agents_total = agents_total
        self.last_print = 0.0
        self.progress: dict[str, Any] = {}
        self._stream = stream
        if console is None and enabled and stream is None and sys.stderr.isatty():
            console = Console(stderr=True)
        self._console = console
        self._live: Live | None = None

    @property
    def live(self) -> bool:
        """Whether this progress is the live display (else the plain lines)."""
        return self._console is not None

    def update(self, samples: list[Sample]) -> None:
        if not self.enabled or not self.progress:
            return
        snap = snapshot(self.policy, self.progress, samples, self.agents_total)
        if self._console is not None:
            view = live_view(snap)
            if self._live is None:
                self._live = Live(view, console=self._console, auto_refresh=False)
                self._live.start()
            self._live.update(view, refresh=True)
            return
        if time.monotonic() - self.last_print < PLAIN_INTERVAL_S:
            return
        self.last_print = time.monotonic()
        print(plain_line(snap), file=self._stream or sys.stderr, flush=True)

    def close(self) -> None:
        """End the live display (its last frame stays on the terminal)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

"""The run's progress: the plain line (stderr not a terminal) and the live display (rich)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.text import Text

from lab.results.metrics import Sample
from lab.run.progress import Progress, plain_line, snapshot

PROGRESS = {
    "elapsed_s": 120.1,
    "turns_done": 695,
    "turns_failed": 0,
    "turns_total": 1500,
    "agents_done": 12,
    "tokens_done": 1_201_000,
}


def _nic(ingress_bytes: int, egress_bytes: int, rate: float | None, **more: Any) -> dict[str, Any]:
    return {"ingress_bytes": ingress_bytes, "egress_bytes": egress_bytes, "rate_mbit": rate,
            **more}  # fmt: skip


def _samples() -> list[Sample]:
    """One second apart: prefill-0's snic read 50 Mbit/s of 100, decode-0's 25 of 100 while
    its cnic sent 100 Mbit/s of 400 and received 150 of its 300 ingress rate."""
    a = {
        "prefill-0": {"snic": _nic(0, 0, 100.0), "mgmt": _nic(0, 0, None)},
        "decode-0": {"snic": _nic(0, 0, 100.0), "cnic": _nic(0, 0, 400.0, ingress_rate_mbit=300.0)},
        "storage-0": {"snic": _nic(0, 0, 100.0)},
    }
    b = {
        "prefill-0": {"snic": _nic(6_250_000, 0, 100.0), "mgmt": _nic(10, 10, None)},
        "decode-0": {
            "snic": _nic(3_125_000, 0, 100.0),
            "cnic": _nic(18_750_000, 12_500_000, 400.0, ingress_rate_mbit=300.0),
        },
        "storage-0": {"snic": _nic(0, 9_000_000, 100.0)},
    }
    return [{"t": 10.0, "nodes": a}, {"t": 11.0, "nodes": b}]


def test_the_snapshot_has_rate_eta_and_nic_shares() -> None:
    s = snapshot("dualpath", PROGRESS, _samples(), agents_total=64)
    assert round(s.tokens_per_s) == 10_000
    assert s.eta_s is not None and round(s.eta_s, 1) == round(120.1 * 805 / 695, 1)
    use = {(u.node, u.nic): u for u in s.nics}
    assert set(use) == {("decode-0", "cnic"), ("decode-0", "snic"), ("prefill-0", "snic")}
    assert use["prefill-0", "snic"].percent == {"egress": 0.0, "ingress": 50.0}
    assert use["decode-0", "cnic"].percent == {"egress": 25.0, "ingress": 50.0}
    assert use["decode-0", "cnic"].mbit == {"egress": 100.0, "ingress": 150.0}
    assert snapshot("dualpath", {**PROGRESS, "turns_done": 0}, []).eta_s is None


def test_plain_mode_prints_today_s_line_to_a_stream_that_is_no_terminal() -> None:
    out = io.StringIO()
    show = Progress("dualpath", True, stream=out)
    assert not show.live
    show.update(_samples())  # no progress message yet: nothing
    assert out.getvalue() == ""
    show.progress = {**PROGRESS, "turns_failed": 3}
    show.update(_samples())
    show.update(_samples())  # within the line's period: not printed again
    show.close()
    assert out.getvalue() == (
        "[dualpath]  120.1s  turns 695/1500  agents 12     10.0k tok/s"
        "  decode-0 snic  25%  prefill-0 snic  50%  FAILED 3\n"
    )
    assert plain_line(snapshot("basic", PROGRESS, [])).endswith("10.0k tok/s")


def test_quiet_shows_nothing() -> None:
    out, screen = io.StringIO(), io.StringIO()
    console = Console(file=screen, force_terminal=True)
    for show in (Progress("basic", False, stream=out), Progress("basic", False, console=console)):
        show.progress = dict(PROGRESS)
        show.update(_samples())
        show.close()
    assert out.getvalue() == "" and screen.getvalue() == ""


def test_rich_mode_shows_turns_agents_rate_eta_and_nic_use() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    show = Progress("dualpath", True, agents_total=64, console=console)
    assert show.live
    try:
        show.progress = dict(PROGRESS)
        show.update(_samples())
        show.progress = {**PROGRESS, "turns_done": 750, "elapsed_s": 125.0, "agents_done": 13}
        show.update(_samples())
    finally:
        show.close()
    text = Text.from_ansi(screen.getvalue()).plain
    last = text[text.rindex("[dualpath]") :]  # the last frame drawn
    assert "turns 750/1500 (50%)" in last
    assert "agents 13/64" in last
    assert "9.6k tok/s" in last  # 1,201,000 tokens in 125 s
    assert "ETA 2m05s" in last  # 750 turns left at 6 turns/s
    assert "2m05s  turns" in last  # elapsed
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in last.splitlines()[2:]}
    assert rows[("decode-0", "cnic")] == ["100.0", "25%", "150.0", "50%"]
    assert rows[("prefill-0", "snic")] == ["0.0", "0%", "50.0", "50%"]
    assert rows[("decode-0", "snic")] == ["0.0", "0%", "25.0", "25%"]
    assert ("storage-0", "snic") not in rows  # engine NICs only

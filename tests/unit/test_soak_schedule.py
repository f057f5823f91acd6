"""bench/soak.py's fault schedule: seeded, every kind of fault, one at a time, valid."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from lab.config.models import load_config
from lab.run.chaos import NodeStep, cluster_links, compile_scenario

REPO = Path(__file__).resolve().parents[2]


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", REPO / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_thirty_minutes_hold_every_kind_of_fault_one_at_a_time() -> None:
    soak = _soak()
    cfg = load_config(REPO / "examples" / "balance-2p2d-online.yaml")
    sched = soak.fault_schedule(cfg, 1800.0, seed=1)
    assert sched == soak.fault_schedule(cfg, 1800.0, seed=1)  # seeded
    assert sched != soak.fault_schedule(cfg, 1800.0, seed=2)
    kinds = {
        next(k for k in ("flap", "set", "loss_burst", "node") if k in e) for e in sched["events"]
    }
    assert kinds == {"flap", "set", "loss_burst", "node"}
    steps = compile_scenario(sched, cluster_links(cfg), source="soak").steps  # valid as is
    kills = [s for s in steps if isinstance(s, NodeStep)]
    killed = {s.node for s in kills if s.action == "kill"}
    assert any(n.startswith("storage") for n in killed)
    assert any(n.startswith(("prefill", "decode")) for n in killed)
    # one fault at a time: every kill is restarted before the next kill
    actions = [s.action for s in kills]
    assert actions == ["kill", "restart"] * (len(kills) // 2)
    assert all(soak.WARMUP_S <= s.at_s <= 1800.0 - 30 for s in steps)

"""Bench: a long chaos soak — a 2P2D lab under a seeded random fault schedule.

Runs one lab (default examples/balance-2p2d-online.yaml, Poisson arrivals below capacity) for
`--minutes` while a fault schedule drawn from `--seed` flaps links, drops rates, injects loss
bursts and kills and restarts engine nodes (same-role peers included) and storage servers, one
fault at a time. Every kind is drawn at least once. A monitor samples, every `--every` seconds,
the RSS and open fds of each node's processes (the data plane with its engine) from /proc;
the driver samples the scheduler's turn table (GET /v1/status) from inside the lab.

It reports turns done, turns failed with their reasons, hung turns (attempts the client gave
up on: must be 0), the byte ledger, the longest time any node went without reading after the
first fault, and fds, RSS and scheduler state from start to end; as a table and soak.json.
Needs root (netns backend); the lab is taken down at the end whatever happens.

    .venv/bin/python bench/soak.py --minutes 30 --seed 1 --out results/soak
    .venv/bin/python bench/soak.py --minutes 3 --seed 2 --out /tmp/soak   # a short look
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.config.models import LabConfig, load_config, parse_settings  # noqa: E402
from lab.run.chaos import cluster_links, compile_scenario  # noqa: E402
from lab.run.runner import run_once  # noqa: E402
from netem.state import default_state_dir  # noqa: E402
from services.process import child_pids  # noqa: E402

KINDS = ("flap", "rate_drop", "loss_burst", "kill_engine", "kill_storage")
WARMUP_S = 30.0
"""No fault in the first seconds: the start-of-run figures are the baseline."""


def fault_schedule(cfg: LabConfig, duration_s: float, seed: int) -> dict[str, Any]:
    """A scenario (chaos YAML as a dict): faults one at a time, each over before the next,
    spaced 20-60 s apart from WARMUP_S to a minute before the end; the first len(KINDS) are
    one of each kind in a random order, the rest drawn at random. Pure."""
    rng = random.Random(seed)
    c = cfg.cluster
    engines = c.engine_ids()
    storages = c.storage_ids()
    first = list(KINDS)
    rng.shuffle(first)
    events: list[dict[str, Any]] = []
    t = WARMUP_S
    while t < duration_s - 60:
        kind = first.pop() if first else rng.choice(KINDS)
        node = rng.choice(engines)
        nic = rng.choice(("cnic", "snic"))
        if kind == "flap":
            down, times = round(rng.uniform(0.5, 3.0), 1), rng.randint(1, 3)
            every = round(down + rng.uniform(2.0, 6.0), 1)
            events.append(
                {
                    "at": f"{t:.1f}s",
                    "flap": {
                        "node": node,
                        "nic": nic,
                        "down_for": f"{down}s",
                        "times": times,
                        "every": f"{every}s",
                    },
                }
            )
            length = times * every
        elif kind == "rate_drop":
            length = rng.uniform(10, 30)
            rate = f"{rng.randint(20, 70)}%"
            events.append({"at": f"{t:.1f}s", "set": {"node": node, "nic": nic, "rate": rate}})
            events.append(
                {"at": f"{t + length:.1f}s", "set": {"node": node, "nic": nic, "rate": "100%"}}
            )
        elif kind == "loss_burst":
            length = rng.uniform(5, 15)
            loss = f"{rng.choice((1, 2, 5, 10))}%"
            events.append(
                {
                    "at": f"{t:.1f}s",
                    "loss_burst": {"node": node, "nic": nic, "loss": loss, "for": f"{length:.1f}s"},
                }
            )
        else:
            target = node if kind == "kill_engine" else rng.choice(storages)
            length = rng.uniform(3, 8)
            events.append({"at": f"{t:.1f}s", "node": {"id": target, "action": "kill"}})
            events.append({"at": f"{t + length:.1f}s", "node": {"id": target, "action": "restart"}})
        t += length + rng.uniform(20, 60)
    return {
        "name": f"soak-seed{seed}",
        "description": f"random faults, seed {seed}, one at a time over {duration_s:.0f} s",
        "events": events,
    }


# -- the monitor (I/O) -------------------------------------------------------------------------


def _proc_figures(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) of one process; (0, 0) when it is gone."""
    try:
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return 0, 0


class Monitor:
    """Samples the soak lab's node processes and scheduler state from a thread."""

    def __init__(self, every_s: float, started_after: float, path: Path | None = None) -> None:
        self.every_s = every_s
        self.path = path
        self.started_after = started_after
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-monitor", daemon=True)

    def _record(self) -> dict[str, Any] | None:
        records = [
            p
            for p in default_state_dir().glob("*.run.json")
            if p.stat().st_mtime >= self.started_after
        ]
        if not records:
            return None
        data = json.loads(max(records, key=lambda p: p.stat().st_mtime).read_text())
        return data if isinstance(data, dict) else None

    def _sample(self) -> None:
        data = self._record()
        if data is None:
            return
        nodes: dict[str, dict[str, int]] = {}
        for name, pid in (data.get("pids") or {}).items():
            rss, fds = 0, 0
            for p in [int(pid), *child_pids(int(pid))]:
                r, f = _proc_figures(p)
                rss, fds = rss + r, fds + f
            nodes[name] = {"rss": rss, "fds": fds}
        row = {"t": time.time(), "nodes": nodes}
        self.samples.append(row)
        if self.path is not None:  # kept on disk as they come: a crash loses nothing
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self._sample()
            except (OSError, ValueError):
                continue


# -- the report (pure) -------------------------------------------------------------------------


def _span(samples: list[dict[str, Any]], get: Any) -> dict[str, Any]:
    values = [v for v in (get(s) for s in samples) if v is not None]
    if not values:
        return {"start": None, "end": None, "max": None}
    return {"start": values[0], "end": values[-1], "max": max(values)}


def _up(sample: dict[str, Any], node: str) -> bool:
    return node in sample["nodes"] and sample["nodes"][node]["rss"] > 0


def report(
    summary: dict[str, Any],
    turns: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    scheduler: list[dict[str, Any]],
    started: float,
    finished: float,
) -> dict[str, Any]:
    """soak.json from the run's summary, the driver's turns and the monitor's samples. A
    resource series runs from its first sample after WARMUP_S (the lab is warmed up) to its last
    before the driver finished (the lab is then taken down); a sample in which a node had no
    process (killed, not yet restarted) is not one of its values."""
    warm = [s for s in samples if started + WARMUP_S <= s["t"] <= finished] or samples
    reasons = Counter(
        str(t["error"]).split(":", 1)[-1].strip()[:80] for t in turns if t.get("error")
    )
    per_node: dict[str, Any] = {}
    names = sorted({n for s in warm for n in s["nodes"]})
    for n in names:
        per_node[n] = {
            "rss_mib": _span(
                warm,
                lambda s, n=n: round(s["nodes"][n]["rss"] / 2**20, 1) if _up(s, n) else None,
            ),
            "fds": _span(warm, lambda s, n=n: s["nodes"][n]["fds"] if _up(s, n) else None),
        }
    rec = summary.get("recovery") or {}
    gaps = {n: g for n, g in (rec.get("longest_read_gap_s") or {}).items() if g is not None}
    up = {n: g for n, g in (rec.get("longest_read_gap_while_up_s") or {}).items() if g is not None}
    ledger = summary.get("byte_ledger") or {}
    events = (summary.get("chaos") or {}).get("events", [])
    return {
        "turns_done": summary["turns_done"],
        "turns_failed": summary["turns_failed"],
        "failed_reasons": dict(reasons.most_common()),
        "hung_attempts": summary.get("attempts_timed_out", 0),
        "retries": summary["retries"],
        "bytes_accounted": summary["bytes_accounted"],
        "bytes_verified": summary["bytes_verified"],
        "bytes_lost_to_faults": ledger.get("bytes_lost_to_faults"),
        "faults_applied": sum(1 for e in events if "error" not in e),
        "fault_steps_refused": [e for e in events if "error" in e],
        "fault_errors": (summary.get("fault_errors") or {}).get("count"),
        "longest_read_gap_s": gaps,
        "longest_no_progress_s": max(gaps.values(), default=None),
        "longest_read_gap_while_up_s": up,
        "longest_no_progress_while_up_s": max(up.values(), default=None),
        "longest_gap_between_turns_done_s": rec.get("longest_gap_between_turns_done_s"),
        "nodes": per_node,
        "scheduler_turns": _span(
            [s for s in scheduler if s["t"] >= started + WARMUP_S] or scheduler,
            lambda s: s.get("turns"),
        ),
        "emulation": (summary.get("emulation_health") or {}).get("verdict"),
        "jct_s": summary["jct_s"],
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"turns done {r['turns_done']}, failed {r['turns_failed']} {r['failed_reasons'] or ''}",
        f"hung attempts (client timeouts) {r['hung_attempts']}, retries {r['retries']}",
        f"bytes accounted {r['bytes_accounted']}: {r['bytes_verified']:,} verified, "
        f"{r['bytes_lost_to_faults'] or 0:,} lost with killed processes",
        f"faults applied {r['faults_applied']}, refused {len(r['fault_steps_refused'])}, "
        f"lost-peer errors {r['fault_errors']}",
        f"longest time without reading after the first fault: {r['longest_no_progress_s']} s "
        f"({r['longest_read_gap_s']}); while the node itself was up: "
        f"{r['longest_no_progress_while_up_s']} s; longest without a finished turn "
        f"{r['longest_gap_between_turns_done_s']} s",
        f"scheduler turns start/end/max {r['scheduler_turns']}",
        "",
        f"{'node':12s} {'RSS MiB start':>14s} {'end':>8s} {'max':>8s} "
        f"{'fds start':>10s} {'end':>6s} {'max':>6s}",
    ]
    for n, v in r["nodes"].items():
        m, f = v["rss_mib"], v["fds"]
        lines.append(
            f"{n:12s} {m['start']!s:>14s} {m['end']!s:>8s} {m['max']!s:>8s} "
            f"{f['start']!s:>10s} {f['end']!s:>6s} {f['max']!s:>6s}"
        )
    lines.append(f"emulation: {r['emulation']}; JCT {r['jct_s']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-c", "--config", type=Path, default=REPO / "examples/balance-2p2d-online.yaml")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--every", type=float, default=10.0, help="monitor interval, s")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    duration = args.minutes * 60
    cfg = load_config(args.config)
    w = cfg.workload
    if w.arrival != "poisson" or not w.agents_per_s:
        ap.error(f"{args.config}: the soak needs Poisson arrivals (workload.arrival: poisson)")
    # agents_per_s is real-equivalent: x tau on the lab's clock
    agents = max(1, math.ceil(duration * w.agents_per_s / cfg.scaling.time_dilation))
    cfg = load_config(
        args.config, overrides=parse_settings([f"workload.num_agents={agents}", *args.set])
    )
    scenario_dict = fault_schedule(cfg, duration, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scenario.json").write_text(json.dumps(scenario_dict, indent=2))
    scenario = compile_scenario(scenario_dict, cluster_links(cfg), source="soak")
    print(
        f"soak: {agents} agents over ~{duration:.0f} s, "
        f"{len(scenario.steps)} fault steps (seed {args.seed})",
        flush=True,
    )
    started = time.time()
    monitor = Monitor(args.every, started_after=started - 1, path=args.out / "processes.jsonl")
    monitor.thread.start()
    try:
        res = run_once(
            cfg, backend="netns", out_dir=args.out / "run", progress=True, scenario=scenario
        )
    finally:
        monitor.stop.set()
        monitor.thread.join(timeout=10)
    driver = json.loads((args.out / "run" / "driver.json").read_text())
    out = report(
        res.summary,
        driver["turns"],
        monitor.samples,
        driver.get("scheduler_samples", []),
        driver["started_at"],
        driver["finished_at"],
    )
    (args.out / "soak.json").write_text(json.dumps({**out, "samples": monitor.samples}, indent=2))
    print(table(out))
    return 0 if out["hung_attempts"] == 0 and out["bytes_accounted"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Bench: garbage on every listening port of a running lab, while its workload runs.

Brings up a lab (netns backend, default examples/laptop.yaml with more turns per agent so the
workload outlasts the attacks) and, once the driver runs, throws lab.run.garbage at every port of
every node from inside the node's own namespace: random bytes, oversize length prefixes, a
slow sender (a byte a second, until the port's frame timeout cuts it), 2,000 connections at
once, then a legitimate request. The ports: engine nodes' KV (data plane), collective and
management frame ports; storage servers' data and management ports; the scheduler's HTTP API
and gRPC; every node's /metrics. The runner's control endpoint (127.0.0.1 in the host
namespace) gets the same from here.

It reports per node the peak RSS (VmHWM, summed over the node's processes) before the
attacks and at the end, and per port whether it answered before and after, how long the slow
sender lasted and how many flood connections the port closed; a table and garbage.json. The
run's own outcome (turns done and failed) is in the JSON. Needs root; the lab is taken down
at the end whatever happens.

    .venv/bin/python bench/garbage.py --out /tmp/garbage
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.config.models import load_config, parse_settings  # noqa: E402
from lab.run.garbage import Target, peak_rss_bytes  # noqa: E402
from lab.run.runner import run_once  # noqa: E402
from netem.state import default_state_dir  # noqa: E402
from services.process import child_pids  # noqa: E402
from services.prom import METRICS_PORT  # noqa: E402
from services.spec import ClusterSpec, Role  # noqa: E402

DEFAULT_SET = ["workload.max_turns_per_agent=25"]
WARMUP_S = 20.0
"""Attacks start this long after the lab's processes are recorded: the driver is running."""


def targets_of(spec: ClusterSpec) -> dict[str, list[Target]]:
    """Every listening port of every node, by node (pure)."""
    out: dict[str, list[Target]] = {}
    for n in spec.nodes:
        ts: list[Target] = []
        if n.cnic is not None:
            ts.append(Target(n.node_id, "kv", n.cnic.host, n.cnic.port, "frames", "stats"))
        if n.collective is not None:
            c = n.collective
            ts.append(Target(n.node_id, "collective", c.host, c.port, "frames", "collective"))
        if n.storage is not None:
            s = n.storage
            ts.append(Target(n.node_id, "storage", s.host, s.port, "frames", "read"))
        if n.role is Role.SCHEDULER:
            h, g = spec.http, spec.grpc
            ts.append(Target(n.node_id, "http", h.host, h.port, "http", "/metrics"))
            grpc_probe = "dualpath.Scheduler/Fetch"
            ts.append(Target(n.node_id, "grpc", g.host, g.port, "grpc", grpc_probe))
        else:
            m = n.mgmt
            ts.append(Target(n.node_id, "mgmt", m.host, m.port, "frames", "stats"))
        ts.append(Target(n.node_id, "metrics", n.mgmt.host, METRICS_PORT, "http", "/metrics"))
        out[n.node_id] = ts
    return out


class Attacker:
    """From a thread: waits for the lab, samples each node's peak RSS, runs the attacks."""

    def __init__(self, out: Path, *, connections: int, slow_max_s: float, started: float) -> None:
        self.out = out
        self.connections = connections
        self.slow_max_s = slow_max_s
        self.started = started
        self.record: dict[str, Any] | None = None
        self.hwm: dict[str, dict[int, int]] = {}  # node -> pid -> VmHWM
        self.hwm_before: dict[str, int] = {}
        self.outcomes: dict[str, list[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self.done = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="garbage", daemon=True)
        self.sampler = threading.Thread(target=self._sample_loop, name="rss", daemon=True)

    def _find_record(self) -> dict[str, Any] | None:
        records = [
            p for p in default_state_dir().glob("*.run.json") if p.stat().st_mtime >= self.started
        ]
        for p in sorted(records, key=lambda p: p.stat().st_mtime, reverse=True):
            data = json.loads(p.read_text())
            if isinstance(data, dict) and data.get("pids") and data.get("backend") == "netns":
                return data
        return None

    def _sample(self) -> None:
        if self.record is None:
            return
        for node, pid in (self.record.get("pids") or {}).items():
            for p in [int(pid), *child_pids(int(pid))]:
                hwm, _ = peak_rss_bytes(p)
                seen = self.hwm.setdefault(node, {})
                if hwm:
                    seen[p] = max(seen.get(p, 0), hwm)

    def node_hwm(self) -> dict[str, int]:
        return {node: sum(per_pid.values()) for node, per_pid in self.hwm.items()}

    def _sample_loop(self) -> None:
        while not self.stop.wait(1.0):
            try:
                if self.record is None:
                    self.record = self._find_record()
                self._sample()
            except (OSError, ValueError):
                continue

    def _run(self) -> None:
        try:
            self._attack()
        except Exception as exc:  # reported, and the run goes on to its end
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.done.set()

    def _attack(self) -> None:
        while self.record is None and not self.stop.wait(0.5):
            pass
        if self.record is None:
            return
        if self.stop.wait(WARMUP_S):
            return
        self._sample()
        self.hwm_before = self.node_hwm()
        spec = ClusterSpec.load(Path(self.record["spec"]))
        lab_id = self.record["lab_id"]
        procs: dict[str, subprocess.Popen[str]] = {}
        for node, ts in targets_of(spec).items():
            path = self.out / f"targets-{node}.json"
            path.write_text(json.dumps([asdict(t) for t in ts]))
            argv = [sys.executable, "-m", "lab.run.garbage", str(path)]
            argv += ["--connections", str(self.connections), "--slow-max-s", str(self.slow_max_s)]
            procs[node] = subprocess.Popen(
                ["ip", "netns", "exec", f"dp-{lab_id}-{node}", *argv],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
        control = self.record.get("control_url")
        if control:
            u = urlsplit(control)
            t = Target("runner", "control", u.hostname or "127.0.0.1", int(u.port or 0), "http")
            path = self.out / "targets-runner.json"
            path.write_text(json.dumps([asdict(t) | {"probe": "/v1/links"}]))
            argv = [sys.executable, "-m", "lab.run.garbage", str(path)]
            argv += ["--connections", str(self.connections), "--slow-max-s", str(self.slow_max_s)]
            procs["runner"] = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        for node, proc in procs.items():
            stdout, _ = proc.communicate(timeout=self.slow_max_s + 300)
            try:
                self.outcomes[node] = json.loads(stdout)
            except json.JSONDecodeError:
                self.errors.append(f"{node}: attacker exited {proc.returncode} without a report")
        self._sample()


def _secs(value: float | None) -> str:
    return "not cut" if value is None else f"{value:.1f}"


def table(r: dict[str, Any]) -> str:
    rows = [
        "| node | peak RSS before | peak RSS at end | ports serving after | slow sender cut after "
        "(s, per port) | flood connections closed by the port |",
        "|---|---|---|---|---|---|",
    ]
    for node, ports in sorted(r["ports"].items()):
        before = r["peak_rss_before_mib"].get(node)
        end = r["peak_rss_end_mib"].get(node)
        serving = sum(1 for p in ports if p["serves_after"])
        names = ", ".join(f"{p['name']} {_secs(p['slow_cut_after_s'])}" for p in ports)
        floods = ", ".join(f"{p['name']} {p['flood_closed_by_server']}" for p in ports)
        rows.append(
            f"| {node} | {before if before is not None else '-'} MiB | "
            f"{end if end is not None else '-'} MiB | {serving}/{len(ports)} "
            f"({', '.join(p['name'] for p in ports if not p['serves_after']) or 'all'}) | "
            f"{names} | {floods} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-c", "--config", type=Path, default=REPO / "examples/laptop.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--slow-max-s", type=float, default=150.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, overrides=parse_settings([*DEFAULT_SET, *args.set]))
    args.out.mkdir(parents=True, exist_ok=True)
    attacker = Attacker(
        args.out,
        connections=args.connections,
        slow_max_s=args.slow_max_s,
        started=time.time() - 1,
    )
    attacker.sampler.start()
    attacker.thread.start()
    run_error = None
    summary: dict[str, Any] = {}
    try:
        res = run_once(cfg, backend="netns", out_dir=args.out / "run", progress=True)
        summary = res.summary
    except Exception as exc:  # the attacks' figures are still worth reporting
        run_error = f"{type(exc).__name__}: {exc}"
    finally:
        attacker.stop.set()
        attacker.thread.join(timeout=args.slow_max_s + 330)
        attacker.sampler.join(timeout=5)
    mib = 1 << 20
    ports = attacker.outcomes
    result: dict[str, Any] = {
        "config": str(args.config),
        "connections": args.connections,
        "peak_rss_before_mib": {n: round(v / mib) for n, v in attacker.hwm_before.items()},
        "peak_rss_end_mib": {n: round(v / mib) for n, v in attacker.node_hwm().items()},
        "ports": ports,
        "all_serving": bool(ports) and all(p["serves_after"] for ps in ports.values() for p in ps),
        "attack_errors": attacker.errors,
        "run_error": run_error,
        "run": {
            k: summary.get(k)
            for k in (
                "turns_done",
                "turns_failed",
                "turns_retried",
                "attempts_timed_out",
                "bytes_accounted",
                "node_errors",
            )
        }
        | {"verdict": (summary.get("emulation_health") or {}).get("verdict")},
    }
    (args.out / "garbage.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"all ports serving after the garbage: {result['all_serving']}")
    print(f"the run meanwhile: {json.dumps(result['run'])}")
    if attacker.errors or run_error:
        print(f"errors: {attacker.errors} {run_error or ''}")
    return 0 if result["all_serving"] else 1


if __name__ == "__main__":
    sys.exit(main())

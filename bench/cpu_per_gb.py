"""Bench: CPU seconds per verified GB of KV, for a whole lab run, of any checkout of the lab.

Runs `python -m lab.cli run` of a checkout (this one by default, or another one with its own
.venv, e.g. an older commit in a git worktree) on one config and measures, from outside, over
the run's measured window (the driver's started_at..finished_at from summary.json):

- host CPU: busy jiffies of /proc/stat (user, nice, system, irq, softirq, steal), i.e.
  everything the machine did, the kernel's shaping and TCP included;
- lab processes: user + system CPU of every process the run started (polled from /proc),
  by role (engine nodes, storage servers, scheduler, driver, runner);

each divided by the run's verified KV bytes (summary.json bytes_verified). Side by side in one
invocation with `--checkout` twice, it reports the ratio. Needs root for the netns backend.

    .venv/bin/python bench/cpu_per_gb.py -c examples/laptop.yaml \\
        --set scaling.bandwidth_scale=0.0025 --checkout . --checkout /tmp/old
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")
POLL_S = 0.25


def _stat_busy() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return user + nice + system + irq + softirq + steal


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return "?"
    if "--node" in args:
        node = args[args.index("--node") + 1]
        part = "/dataplane" if "services.dataplane" in args else ""
        return node.split("-")[0] + part  # prefill, decode, storage, scheduler
    if "lab.run.driver" in args:
        return "driver"
    if "lab.cli" in args:
        return "runner"
    return "other"


class Sampler:
    """Polls the host's busy jiffies and every descendant's CPU, with timestamps."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.host: list[tuple[float, int]] = []
        self.procs: dict[int, tuple[str, list[tuple[float, float]]]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            self.host.append((now, _stat_busy()))
            kids = _children()
            todo, seen = [self.root], set()
            while todo:
                pid = todo.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                todo.extend(kids.get(pid, []))
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    cpu = (int(fields[11]) + int(fields[12])) / HZ
                except (OSError, ValueError, IndexError):
                    continue
                role, rows = self.procs.setdefault(pid, (_role(pid), []))
                if role in ("?", "other"):
                    self.procs[pid] = (_role(pid), rows)
                rows.append((now, cpu))
            self.stop.wait(POLL_S)


def _at(rows: list[tuple[float, float]], t: float) -> float:
    """Linear interpolation of a cumulative series at time t (clamped)."""
    times = [r[0] for r in rows]
    i = bisect.bisect_left(times, t)
    if i <= 0:
        return rows[0][1]
    if i >= len(rows):
        return rows[-1][1]
    (t0, v0), (t1, v1) = rows[i - 1], rows[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1


def measure(checkout: Path, config: str, sets: list[str], out: Path) -> dict[str, Any]:
    python = checkout / ".venv" / "bin" / "python"
    argv = [str(python), "-m", "lab.cli", "run", "-c", config, "--out", str(out), "-q"]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.Popen(argv, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = Sampler(proc.pid)
    sampler.thread.start()
    _, err = proc.communicate()
    sampler.stop.set()
    sampler.thread.join()
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise SystemExit(f"{checkout}: no summary ({err.decode()[-500:]})")
    s = json.loads(summary_path.read_text())
    driver = json.loads((out / "driver.json").read_text())
    t0, t1 = float(driver["started_at"]), float(driver["finished_at"])
    gb = s["bytes_verified"] / 1e9
    host_s = (
        _at([(t, float(v)) for t, v in sampler.host], t1)
        - _at([(t, float(v)) for t, v in sampler.host], t0)
    ) / HZ
    roles: dict[str, float] = {}
    for role, rows in sampler.procs.values():
        if len(rows) >= 2:
            roles[role] = roles.get(role, 0.0) + max(_at(rows, t1) - _at(rows, t0), 0.0)
    lab_s = sum(roles.values())
    return {
        "checkout": str(checkout),
        "commit": subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "jct_s": s["jct_s"],
        "verified_gb": round(gb, 4),
        "verified_gbit_per_s": round(gb * 8 / (t1 - t0), 4),
        "host_cpu_s": round(host_s, 2),
        "lab_cpu_s": round(lab_s, 2),
        "host_cpu_s_per_gb": round(host_s / gb, 3) if gb else None,
        "lab_cpu_s_per_gb": round(lab_s / gb, 3) if gb else None,
        "lab_cpu_s_by_role": {k: round(v, 2) for k, v in sorted(roles.items())},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-c", "--config", required=True, help="config path (relative to each checkout)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--checkout", action="append", type=Path, help="a lab checkout with .venv")
    ap.add_argument(
        "--out", type=Path, default=Path(f"results/bench/cpu-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    args = ap.parse_args(argv)
    checkouts = args.checkout or [Path(__file__).resolve().parents[1]]
    rows = []
    for i, checkout in enumerate(checkouts):
        print(f"== {checkout}", file=sys.stderr, flush=True)
        rows.append(measure(checkout.resolve(), args.config, args.set, args.out / f"run-{i}"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_per_gb.json").write_text(json.dumps(rows, indent=2))
    print(
        f"{'commit':<10} {'JCT s':>7} {'KV GB':>7} {'Gbit/s':>7} "
        f"{'host CPU-s/GB':>14} {'lab CPU-s/GB':>13}"
    )
    for r in rows:
        print(
            f"{r['commit']:<10} {r['jct_s']:>7.2f} {r['verified_gb']:>7.2f} "
            f"{r['verified_gbit_per_s']:>7.3f} {r['host_cpu_s_per_gb']:>14.3f} "
            f"{r['lab_cpu_s_per_gb']:>13.3f}   {r['lab_cpu_s_by_role']}"
        )
    if len(rows) > 1 and rows[1]["host_cpu_s_per_gb"]:
        ratio = rows[0]["host_cpu_s_per_gb"] / rows[1]["host_cpu_s_per_gb"]
        print(f"host CPU per verified GB, first / second checkout: {ratio:.3f}")
    print(f"written: {args.out / 'cpu_per_gb.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

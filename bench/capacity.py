"""Bench: online capacity within the SLO, Basic vs DualPath (DualPath §8: 1.67x and 2.25x).

Agents arrive as a Poisson process at a swept rate (`workload.agents_per_s`, real-equivalent
agents per second, APS). For each policy the sweep walks the rates upwards on the same seeded
workload and stops after the first rate at which fewer than `--min-attained` of the turns
meet the paper's SLO (TTFT <= 4 s, TPOT <= 50 ms, real-equivalent; summary.json `slo`) or a
turn fails. A policy's capacity is the highest rate of its passing run of rates from the
bottom; the table gives each run's attainment, real-equivalent TTFT/TPOT and the share of
TTFT spent queued before the turn's storage read began (summary.json `ttft_breakdown`), its
emulation-health verdict (summary.json `emulation_health`; a host-bound run's latencies are
the machine's CPU as much as the policy's), and the capacity ratio.
Needs root (netns backend). Writes DIR/<policy>-<aps>/ and DIR/capacity.json.

    .venv/bin/python bench/capacity.py run -c examples/online-capacity.yaml --out DIR \\
        [--policy basic --policy dualpath] [--aps 8 12 16 20 24 28 32] [--min-attained 0.9]
    .venv/bin/python bench/capacity.py table DIR [--min-attained 0.9]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.config.models import ConfigError, load_config, parse_settings  # noqa: E402
from lab.results.health import HOST_BOUND, verdict_of  # noqa: E402
from lab.run.rundir import REPORT, write_run_report  # noqa: E402
from lab.run.runner import run_once  # noqa: E402

POLICIES = ("basic", "dualpath", "oracle")
DEFAULT_APS = (8.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0)
DEFAULT_MIN_ATTAINED = 0.9


def run_name(policy: str, aps: float) -> str:
    return f"{policy}-{aps:g}"


def row(run_dir: Path) -> dict[str, Any]:
    """One finished run: its rate, SLO attainment and real-equivalent latencies."""
    s = json.loads((run_dir / "summary.json").read_text())
    spec = json.loads((run_dir / "spec.json").read_text())
    tau = float(s["time_dilation"])

    def real(d: dict[str, Any], key: str) -> float | None:
        v = d.get(key)
        return None if v is None else v / tau

    return {
        "run": run_dir.name,
        "policy": s["policy"],
        "aps": float(s["arrival"]["agents_per_s"]),
        "attained": s["slo"]["attained"],
        "turns_done": s["turns_done"],
        "turns_failed": s["turns_failed"],
        "bytes_accounted": s["bytes_accounted"],
        "jct_s": s["jct_s"],
        "ttft_real_s": {k: real(s["ttft_s"], k) for k in ("p50", "p90", "p99", "mean")},
        "tpot_real_ms": {k: real(s["tpot_ms"], k) for k in ("p50", "p90", "p99")},
        "ttft_queue_share": (s.get("ttft_breakdown") or {}).get("queue_share"),
        "emulation": verdict_of(s),
        "lab_id": spec.get("lab_id"),
    }


def passes(r: dict[str, Any], min_attained: float) -> bool:
    return r["turns_failed"] == 0 and (r["attained"] or 0.0) >= min_attained


def capacity(rows: Sequence[dict[str, Any]], min_attained: float) -> float | None:
    """Highest rate of the passing run of rates from the lowest one; None if the lowest fails."""
    best = None
    for r in sorted(rows, key=lambda r: r["aps"]):
        if not passes(r, min_attained):
            break
        best = r["aps"]
    return best


def report(root: Path, min_attained: float) -> dict[str, Any]:
    rows = [row(d) for d in sorted(root.iterdir()) if (d / "summary.json").exists()]
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_policy.setdefault(r["policy"], []).append(r)
    caps = {p: capacity(rs, min_attained) for p, rs in by_policy.items()}
    # a capacity is only measured when some swept rate failed; otherwise it is a lower bound
    bounded = {p: any(not passes(r, min_attained) for r in rs) for p, rs in by_policy.items()}
    ratio = None
    basic, dual = caps.get("basic"), caps.get("dualpath")
    if basic and dual and bounded["basic"] and bounded["dualpath"]:
        ratio = round(dual / basic, 3)
    same_rate = [
        {
            "aps": b["aps"],
            "ttft_p50_real_s": {
                "basic": b["ttft_real_s"]["p50"],
                "dualpath": d["ttft_real_s"]["p50"],
            },
            "ttft_p99_real_s": {
                "basic": b["ttft_real_s"]["p99"],
                "dualpath": d["ttft_real_s"]["p99"],
            },
            "queue_share": {"basic": b["ttft_queue_share"], "dualpath": d["ttft_queue_share"]},
        }
        for b in by_policy.get("basic", [])
        for d in by_policy.get("dualpath", [])
        if b["aps"] == d["aps"]
    ]
    return {
        "min_attained": min_attained,
        "capacity_aps": caps,
        "capacity_is_lower_bound": {p: not v for p, v in bounded.items()},
        "dualpath_over_basic": ratio,
        "same_rate": sorted(same_rate, key=lambda x: x["aps"]),
        "host_bound_runs": sorted(r["run"] for r in rows if r["emulation"] == HOST_BOUND),
        "rows": sorted(rows, key=lambda r: (r["policy"], r["aps"])),
    }


def print_table(rep: dict[str, Any]) -> None:
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print(
        f"SLO: TTFT <= 4 s and TPOT <= 50 ms (real); a rate passes at >= "
        f"{100 * rep['min_attained']:.0f}% of turns within it and no failed turn"
    )
    print(
        f"{'policy':<9} {'APS':>5} {'in SLO':>7} {'TTFT p50':>9} {'p90':>7} {'p99':>7} "
        f"{'queued':>7} {'TPOT p50':>9} {'JCT s':>7} {'emulation':>10}  turns"
    )
    for r in rep["rows"]:
        t, p = r["ttft_real_s"], r["tpot_real_ms"]
        print(
            f"{r['policy']:<9} {r['aps']:>5g} {f(r['attained'], '.1%'):>7} "
            f"{f(t['p50'], '.2f'):>9} {f(t['p90'], '.2f'):>7} {f(t['p99'], '.2f'):>7} "
            f"{f(r['ttft_queue_share'], '.0%'):>7} "
            f"{f(p['p50'], '.1f'):>9} {r['jct_s']:>7.1f} {r['emulation']:>10}  "
            f"{r['turns_done']} done, "
            f"{r['turns_failed']} failed{'' if r['bytes_accounted'] else ', BYTES NOT ACCOUNTED'}"
        )
    if rep["same_rate"]:
        print("same rate: TTFT p50 basic/dualpath (real s), queued share of TTFT")
        for x in rep["same_rate"]:
            t, q = x["ttft_p50_real_s"], x["queue_share"]
            print(
                f"  {x['aps']:>5g} APS  {f(t['basic'], '.2f')} / {f(t['dualpath'], '.2f')} s"
                f"  queued {f(q['basic'], '.0%')} / {f(q['dualpath'], '.0%')}"
            )
    caps = []
    for p, c in rep["capacity_aps"].items():
        low = rep["capacity_is_lower_bound"][p]
        caps.append(f"{p} {'-' if c is None else ('>= ' if low else '') + format(c, 'g')}")
    note = "" if rep["dualpath_over_basic"] else " (needs a failing rate for both policies)"
    ratio = rep["dualpath_over_basic"] or "-"
    print(f"capacity (APS): {', '.join(caps)}; dualpath/basic: {ratio}{note}")
    if rep["host_bound_runs"]:
        print(
            f"host-bound runs (their latencies are the machine's as much as the policy's): "
            f"{', '.join(rep['host_bound_runs'])}"
        )
    if any(rep["capacity_is_lower_bound"].values()):
        print(
            "every swept rate of a '>=' policy passed: sweep higher rates, or more agents "
            "(agents run their turns back to back, so the queue is at most one turn per "
            "agent in flight and a small run cannot wait past the SLO)"
        )


def run(
    config: Path,
    out: Path,
    policies: Sequence[str],
    rates: Sequence[float],
    settings: Sequence[str],
    min_attained: float,
) -> None:
    dirs: list[Path] = []
    for policy in policies:
        for aps in sorted(rates):
            sets = [*settings, "workload.arrival=poisson", f"workload.agents_per_s={aps:g}"]
            cfg = load_config(config, {**parse_settings(sets), "policy": policy})
            run_dir = out / run_name(policy, aps)
            dirs.append(run_dir)
            run_once(cfg, backend="netns", out_dir=run_dir, progress=False)
            r = row(run_dir)
            share = "-" if r["attained"] is None else f"{r['attained']:.1%}"
            print(
                f"{run_dir.name}: {share} of turns within the SLO, emulation {r['emulation']}",
                flush=True,
            )
            if not passes(r, min_attained):
                break  # the next rates would only queue more
    print(f"report: {write_run_report(dirs, out / REPORT)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/capacity.py", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="sweep the arrival rate for each policy")
    p_run.add_argument("-c", "--config", type=Path, required=True)
    p_run.add_argument("--out", type=Path, required=True)
    p_run.add_argument("--policy", action="append", choices=POLICIES)
    p_run.add_argument("--aps", type=float, nargs="+", default=list(DEFAULT_APS))
    p_run.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p_run.add_argument("--min-attained", type=float, default=DEFAULT_MIN_ATTAINED)
    p_table = sub.add_parser("table", help="the capacity table of finished runs")
    p_table.add_argument("dir", type=Path)
    p_table.add_argument("--min-attained", type=float, default=DEFAULT_MIN_ATTAINED)
    args = parser.parse_args(argv)
    if not 0 < args.min_attained <= 1:
        parser.error(f"--min-attained must be in (0, 1], got {args.min_attained}")
    if args.cmd == "run":
        if any(a <= 0 for a in args.aps):
            parser.error(f"--aps rates must be > 0, got {args.aps}")
        try:
            run(
                args.config,
                args.out,
                args.policy or ["basic", "dualpath"],
                args.aps,
                args.set,
                args.min_attained,
            )
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        root = args.out
    else:
        root = args.dir
    if not root.is_dir():
        print(f"error: {root} is not a directory of runs", file=sys.stderr)
        return 2
    rep = report(root, args.min_attained)
    (root / "capacity.json").write_text(json.dumps(rep, indent=2))
    print_table(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bench: one config at several scalings that must give the same real-equivalent results.

The scaling model promises that `bandwidth_scale` (k) and `time_dilation` (tau) change nothing
real: emulated rates are real x k, durations real x tau, bytes real x k x tau. This bench runs
one config at several (k, tau) pairs, back to back on the same seeded workload, and reports the
spread of the real-equivalent JCT, TTFT p50 and TPOT p50 and of the storage NICs' use, each
run's emulation-health verdict, and the emulation capacity: the highest aggregate rate of
verified KV (storage reads + relay + PD transfer, emulated Gbit/s) at which JCT stays within
--tolerance of the lowest-rate run, every lower-rate run included. Needs root for the netns
backend. Writes DIR/invariance.json and every run under DIR/<k>-<tau>[-<repeat>]/.

    .venv/bin/python bench/invariance.py -c examples/laptop.yaml \\
        --pair 0.00025:10 --pair 0.001:10 --pair 0.0025:10 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.config.models import ConfigError, LabConfig, load_config, parse_settings  # noqa: E402
from lab.run.backends import BACKENDS  # noqa: E402
from lab.run.rundir import REPORT, write_run_report  # noqa: E402
from lab.run.runner import run_once  # noqa: E402
from services.spec import Policy  # noqa: E402


def parse_pair(text: str) -> tuple[float, float]:
    """`K:TAU`, e.g. 0.001:10."""
    k, sep, tau = text.partition(":")
    try:
        pair = float(k), float(tau)
    except ValueError:
        pair = (0.0, 0.0)
    if not sep or pair[0] <= 0 or pair[1] <= 0:
        raise ConfigError(f"--pair {text!r}: expected K:TAU with both > 0, e.g. 0.001:10")
    return pair


def snic_use(summary: dict[str, Any]) -> float | None:
    """Mean storage-NIC read utilisation over the engine nodes (kernel counters)."""
    uses = [
        nics["snic"]["ingress_util"]
        for node, nics in summary.get("nics", {}).items()
        if node.startswith(("prefill", "decode")) and nics.get("snic", {}).get("ingress_util")
    ]
    return round(sum(uses) / len(uses), 4) if uses else None


def row(k: float, tau: float, repeat: int, s: dict[str, Any]) -> dict[str, Any]:
    health = s.get("emulation_health", {})
    jct = float(s["jct_s"])
    return {
        "bandwidth_scale": k,
        "time_dilation": tau,
        "repeat": repeat,
        "real_jct_s": s["real_jct_s"],
        "real_ttft_p50_s": _real(s["ttft_s"].get("p50"), tau),
        "real_tpot_p50_ms": _real(s["tpot_ms"].get("p50"), tau),
        "snic_use": snic_use(s),
        "verified_gbit_per_s": round(s["bytes_verified"] * 8 / jct / 1e9, 4) if jct else None,
        "emulation": health.get("verdict"),
        "reasons": health.get("reasons", []),
        "host_cpu_busy_pct": health.get("host", {}).get("cpu_busy_pct", {}).get("mean"),
        "turns_failed": s["turns_failed"],
        "bytes_accounted": s["bytes_accounted"],
    }


def _real(value: float | None, tau: float) -> float | None:
    return None if value is None else round(value / tau, 6)


def spread(values: list[float]) -> dict[str, float] | None:
    """(max - min) / min and the coefficient of variation of a measure across runs."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2 or min(vals) <= 0:
        return None
    return {
        "max_over_min": round(max(vals) / min(vals), 4),
        "cv": round(statistics.pstdev(vals) / statistics.mean(vals), 4),
    }


def capacity(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Highest mean aggregate rate among (k, tau) groups, ordered by rate, such that that group
    and every slower one have a mean real JCT within `tolerance` of the slowest group's."""
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["bandwidth_scale"], r["time_dilation"]), []).append(r)
    means = sorted(
        (
            statistics.mean(r["verified_gbit_per_s"] for r in rs),
            statistics.mean(r["real_jct_s"] for r in rs),
            key,
        )
        for key, rs in groups.items()
    )
    ref_jct = means[0][1]
    best: dict[str, Any] = {"verified_gbit_per_s": None, "pair": None}
    for rate, jct, key in means:
        if abs(jct / ref_jct - 1) > tolerance:
            break
        best = {"verified_gbit_per_s": round(rate, 3), "pair": list(key)}
    best["reference_real_jct_s"] = round(ref_jct, 4)
    best["tolerance"] = tolerance
    best["groups"] = [
        {
            "pair": list(key),
            "verified_gbit_per_s": round(rate, 3),
            "jct_vs_ref": round(jct / ref_jct, 4),
        }
        for rate, jct, key in means
    ]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--pair", action="append", metavar="K:TAU", help="a scaling to run (repeat)")
    ap.add_argument("--policy", choices=[p.value for p in Policy], default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=0.05, help="JCT tolerance (default 0.05)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--backend", choices=BACKENDS, default="netns")
    ap.add_argument("--out", default=f"results/bench/invariance-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args(argv)
    try:
        base = load_config(Path(args.config), parse_settings(args.set))
        if args.policy:
            base = base.model_copy(update={"policy": Policy(args.policy)})
        k0, tau0 = base.scaling.bandwidth_scale, base.scaling.time_dilation
        pairs = (
            [parse_pair(p) for p in args.pair]
            if args.pair
            else [(k0 * m, tau0) for m in (1, 2, 4, 10)]
        )
        if args.repeats < 1:
            raise ConfigError("--repeats must be >= 1")
        configs: list[tuple[float, float, LabConfig]] = []
        for k, tau in pairs:
            sets = [f"scaling.bandwidth_scale={k}", f"scaling.time_dilation={tau}", *args.set]
            cfg = load_config(Path(args.config), parse_settings(sets))
            if args.policy:
                cfg = cfg.model_copy(update={"policy": Policy(args.policy)})
            configs.append((k, tau, cfg))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    dirs: list[Path] = []
    # repeats interleave the pairs, so a slow spell of the host spreads over all of them
    for repeat in range(args.repeats):
        for k, tau, cfg in configs:
            name = f"{k:g}-{tau:g}" + (f"-{repeat}" if args.repeats > 1 else "")
            print(f"== k={k:g} tau={tau:g} repeat {repeat}", file=sys.stderr, flush=True)
            dirs.append(out / name)
            summary = run_once(cfg, backend=args.backend, out_dir=dirs[-1]).summary
            rows.append(row(k, tau, repeat, summary))
    report = {
        "config": args.config,
        "policy": configs[0][2].policy.value,
        "backend": args.backend,
        "rows": rows,
        "spread": {
            key: spread([r[key] for r in rows])
            for key in ("real_jct_s", "real_ttft_p50_s", "real_tpot_p50_ms", "snic_use")
        },
        "capacity": capacity(rows, args.tolerance),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "invariance.json").write_text(json.dumps(report, indent=2))
    print(f"report: {write_run_report(dirs, out / REPORT)}", file=sys.stderr)
    print(
        f"{'k':>9} {'tau':>5} {'JCT real s':>10} {'TTFT p50':>9} {'TPOT p50':>9} "
        f"{'snic':>6} {'KV Gbit/s':>9} {'host CPU':>8}  emulation"
    )
    for r in rows:
        print(
            f"{r['bandwidth_scale']:>9g} {r['time_dilation']:>5g} {r['real_jct_s']:>10.3f} "
            f"{_fmt(r['real_ttft_p50_s'], '.4f'):>9} {_fmt(r['real_tpot_p50_ms'], '.2f'):>9} "
            f"{_fmt(r['snic_use'], '.0%'):>6} {_fmt(r['verified_gbit_per_s'], '.3f'):>9} "
            f"{_fmt(r['host_cpu_busy_pct'], '.0f'):>7}%  {r['emulation']}"
        )
    for key, sp in report["spread"].items():
        if sp:
            print(f"spread {key}: max/min {sp['max_over_min']:.3f}, cv {sp['cv']:.3f}")
    cap = report["capacity"]
    print(
        f"emulation capacity: {cap['verified_gbit_per_s']} Gbit/s of verified KV "
        f"(JCT within {100 * args.tolerance:g} % of the lowest-rate run; pair {cap['pair']})"
    )
    print(f"written: {out / 'invariance.json'}")
    failed = any(r["turns_failed"] or not r["bytes_accounted"] for r in rows)
    return 1 if failed else 0


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())

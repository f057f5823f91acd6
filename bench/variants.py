"""Bench: one config, several variants, run back to back on the same seeded workload.

Each variant is a name and `--set`-style overrides; the first variant is the reference. The
table gives JCT and its ratio to the reference, TTFT p50, read sides, the storage-NIC and
attention balance, whether every byte was accounted for and each run's emulation-health
verdict (a host-bound run measured the machine's CPU as much as the variant), all from the
runs' summaries.
Needs root for the netns backend. Writes DIR/variants.json, each run under DIR/<name>/ and
DIR/report.html with the runs side by side.

    .venv/bin/python bench/variants.py -c examples/laptop.yaml \\
        --variant whole: --variant split:scheduling.split_reads=true
    .venv/bin/python bench/variants.py -c examples/quota-balance.yaml \\
        --variant quota: --variant no-quota:scheduling.compute_quota_ms=null
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.config.models import ConfigError, load_config, parse_settings  # noqa: E402
from lab.results.health import HOST_BOUND, verdict_of  # noqa: E402
from lab.run.backends import BACKENDS  # noqa: E402
from lab.run.rundir import REPORT, write_run_report  # noqa: E402
from lab.run.runner import run_once  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`name:key=value,key=value` (nothing after the colon: the config as it is)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"--variant {text!r}: expected NAME:[KEY=VALUE,...]")
    return name.strip(), [s for s in rest.split(",") if s.strip()]


def row(name: str, s: dict[str, Any], ref_jct: float) -> dict[str, Any]:
    att = s.get("attention_balance", {})
    snic = s.get("snic_balance", {})
    return {
        "variant": name,
        "jct_s": s["jct_s"],
        "jct_vs_reference": round(s["jct_s"] / ref_jct, 4) if ref_jct else None,
        "ttft_p50_s": s["ttft_s"]["p50"],
        "read_sides": s["read_sides"],
        "snic_balance": snic,
        "attention_early_all_busy": att.get("early_all_busy_mean"),
        "attention_early_all_busy_p50": att.get("early_all_busy_p50"),
        "attention_early": att.get("early_mean"),
        "attention_all_busy": att.get("all_busy_mean"),
        "turns_done": s["turns_done"],
        "turns_failed": s["turns_failed"],
        "bytes_accounted": s["bytes_accounted"],
        "emulation": verdict_of(s),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:[K=V,...]")
    ap.add_argument("--backend", choices=BACKENDS, default="netns")
    ap.add_argument("--out", default=f"results/bench/variants-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant]
        names = [n for n, _ in variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"variant names must be unique, got {names}")
        configs = [
            (name, load_config(Path(args.config), parse_settings(sets))) for name, sets in variants
        ]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    ref_jct = 0.0
    for name, cfg in configs:
        print(f"== {name}", file=sys.stderr, flush=True)
        summary = run_once(cfg, backend=args.backend, out_dir=out / name).summary
        ref_jct = ref_jct or float(summary["jct_s"])
        rows.append(row(name, summary, ref_jct))
    report = {"config": args.config, "backend": args.backend, "variants": variants, "rows": rows}
    (out / "variants.json").write_text(json.dumps(report, indent=2))
    dirs = [out / name for name, _ in configs]
    print(f"report: {write_run_report(dirs, out / REPORT)}", file=sys.stderr)
    print(
        f"{'variant':<14} {'JCT s':>8} {'vs ref':>7} {'TTFT p50':>9} {'att early':>10} "
        f"{'emulation':>10}  reads"
    )
    for r in rows:
        att = r["attention_early_all_busy"]
        print(
            f"{r['variant']:<14} {r['jct_s']:>8.2f} {r['jct_vs_reference']:>7.3f} "
            f"{r['ttft_p50_s']:>9.3f} {att if att is not None else '-':>10} "
            f"{r['emulation']:>10}  {r['read_sides']}"
        )
    print(f"written: {out / 'variants.json'}")
    bound = [r["variant"] for r in rows if r["emulation"] == HOST_BOUND]
    if bound:
        print(f"host-bound (see emulation_health in summary.json): {', '.join(bound)}")
    failed = any(r["turns_failed"] or not r["bytes_accounted"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

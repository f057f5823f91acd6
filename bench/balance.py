"""Bench: storage-NIC read balance across engine nodes, round-robin vs DualPath scheduling.

DualPath §8 reports snic traffic max/avg 1.53 with a round-robin scheduler and 1.18 with its
own. `run` replays one config under policy dualpath once per scheduler variant, in turn,
`--repeats` times (same seed, so the same turns and the same reads):

- `round_robin`: engines in rotation, read side by the paper's shorter-queue rule;
- `round_robin_alt`: engines in rotation and the read side alternating, so that no decision
  sees load (`scheduling.baseline_read_side: alternate`);
- `dualpath`: Algorithm 1, two-level DE selection, shorter-queue read side.

`table` recomputes the balance of finished runs from their counters.json and driver.json,
with any window and busy fraction, and prints one row per run with its emulation-health
verdict (summary.json `emulation_health`: a host-bound run's balance is the CPU's as much as
the scheduler's). Needs root for `run`.

    .venv/bin/python bench/balance.py run -c examples/balance-2p2d.yaml --out /tmp/bal \
        [--variant dualpath --variant round_robin_alt] [--set workload.num_agents=128]
    .venv/bin/python bench/balance.py table /tmp/bal [--window 5] [--busy-fraction 0.9]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.config.models import load_config, parse_settings  # noqa: E402
from lab.results.balance import (  # noqa: E402
    SNIC_BALANCE_BUSY_FRACTION,
    SNIC_BALANCE_WINDOW_S,
    snic_balance,
)
from lab.results.health import verdict_of  # noqa: E402
from lab.run.rundir import REPORT, write_run_report  # noqa: E402
from lab.run.runner import run_once  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "round_robin": {"selector": "round_robin", "baseline_read_side": "shorter_queue"},
    "round_robin_alt": {"selector": "round_robin", "baseline_read_side": "alternate"},
    "dualpath": {"selector": "dualpath", "baseline_read_side": "shorter_queue"},
}


def run(config: Path, out: Path, repeats: int, variants: list[str], settings: list[str]) -> None:
    dirs: list[Path] = []
    for rep in range(repeats):
        for name in variants:
            cfg = load_config(config, parse_settings(settings))
            sched = cfg.scheduling.model_copy(update=VARIANTS[name])
            cfg = cfg.model_copy(update={"scheduling": sched})
            dirs.append(out / f"{name}-{rep}")
            res = run_once(cfg, backend="netns", out_dir=dirs[-1], progress=False)
            print(f"{name}-{rep} done, emulation {verdict_of(res.summary)}", flush=True)
    print(f"report: {write_run_report(dirs, out / REPORT)}", flush=True)


def row(run_dir: Path, window_s: float, busy_fraction: float) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    driver = json.loads((run_dir / "driver.json").read_text())
    samples = json.loads((run_dir / "counters.json").read_text())
    spec = json.loads((run_dir / "spec.json").read_text())
    bal = snic_balance(
        samples,
        driver["started_at"],
        driver["finished_at"],
        window_s=window_s,
        busy_fraction=busy_fraction,
    )
    util = {
        node: nics["snic"]["ingress_util"]
        for node, nics in sorted(summary["nics"].items())
        if node.startswith(("prefill", "decode")) and "snic" in nics
    }
    return {
        "run": run_dir.name,
        "selector": spec.get("selector"),
        "read_side": spec.get("baseline_read_side"),
        "jct_s": summary["jct_s"],
        "turns_done": summary["turns_done"],
        "turns_failed": summary["turns_failed"],
        "balance": bal,
        "snic_util": util,
        "read_sides": summary["read_sides"],
        "emulation": verdict_of(summary),
    }


def table(root: Path, window_s: float, busy_fraction: float) -> list[dict[str, Any]]:
    rows = [
        row(d, window_s, busy_fraction)
        for d in sorted(root.iterdir())
        if (d / "summary.json").exists() and (d / "counters.json").exists()
    ]
    if not rows:
        return rows
    nodes = list(rows[0]["snic_util"])
    head = ["run", "JCT s", "whole", "interval", "busy", "window", "worst", "busy s"]
    head += [f"{n} snic" for n in nodes]
    head += ["emulation"]
    lines = [head]
    for r in rows:
        b = r["balance"]

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.3f}"

        lines.append(
            [
                r["run"],
                f"{r['jct_s']:.1f}",
                f(b["whole_run"]),
                f(b["mean_interval"]),
                f(b["busy"]),
                f(b["mean_window"]),
                f(b["max_window"]),
                "-" if b["busy_s"] is None else f"{b['busy_s']:.1f}",
            ]
            + [f"{100 * (r['snic_util'].get(n) or 0):.0f}%" for n in nodes]
            + [r["emulation"]]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print(f"window {window_s:g} s, busy part to {100 * busy_fraction:.0f}% of the reads")
    for line in lines:
        print(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/balance.py", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run both selectors")
    p_run.add_argument("-c", "--config", type=Path, required=True)
    p_run.add_argument("--out", type=Path, required=True)
    p_run.add_argument("--repeats", type=int, default=2)
    p_run.add_argument(
        "--variant",
        action="append",
        choices=sorted(VARIANTS),
        help="scheduler variant to run (repeatable; default: all, in the order above)",
    )
    p_run.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override"
    )
    p_tab = sub.add_parser("table", help="balance of finished runs")
    p_tab.add_argument("root", type=Path)
    p_tab.add_argument("--window", type=float, default=SNIC_BALANCE_WINDOW_S)
    p_tab.add_argument("--busy-fraction", type=float, default=SNIC_BALANCE_BUSY_FRACTION)
    p_tab.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run(args.config, args.out, args.repeats, args.variant or list(VARIANTS), args.set)
        return 0
    rows = table(args.root, args.window, args.busy_fraction)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

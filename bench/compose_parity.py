"""Bench: the same config on the netns and compose backends, alternating, repeated.

Each repeat runs the policies on netns (`runner.compare`) and then on one compose stack
(`compose.backend.run_stack`), so both see the same machine within minutes of each other. The
table gives each run's JCT, the compose/netns ratio per policy and DualPath's speedup on each
backend, plus the 1-minute load average before and after each run: on a shared machine a run
that started or ended under load from elsewhere is visible as such. Needs root and a Docker
engine (make images). Writes DIR/parity.json and every run under DIR/<repeat>/<backend>/.

    .venv/bin/python bench/compose_parity.py -c examples/laptop.yaml --repeats 2 --out /tmp/parity
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from compose.backend import run_stack  # noqa: E402
from lab.config.models import load_config  # noqa: E402
from lab.run.runner import compare  # noqa: E402
from services.spec import Policy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--policies", default="basic,dualpath")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg = load_config(Path(args.config))
    policies = [Policy(p) for p in args.policies.split(",")]
    out = Path(args.out)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for backend in ("netns", "compose"):
            dest = out / str(rep) / backend
            load_before = os.getloadavg()[0]
            if backend == "netns":
                cmp = compare(cfg, backend="netns", out_dir=dest, progress=False, policies=policies)
            else:
                names = [p.value for p in policies]
                cmp = run_stack(cfg, policies=names, out_dir=dest, progress=False)
            runs.append(
                {
                    "repeat": rep,
                    "backend": backend,
                    "jct_s": cmp["jct_s"],
                    "speedup": cmp["speedup"].get("dualpath_over_basic"),
                    "bytes_accounted": all(s["bytes_accounted"] for s in cmp["runs"].values()),
                    "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                }
            )
            r = runs[-1]
            print(
                f"repeat {rep} {backend:8s} "
                + "  ".join(f"{p} {j:6.2f} s" for p, j in r["jct_s"].items())
                + f"  dualpath/basic {r['speedup']}x  load {r['load_1m']}",
                flush=True,
            )
    ratios: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        ns, co = (
            next(r for r in runs if r["repeat"] == rep and r["backend"] == b)
            for b in ("netns", "compose")
        )
        for p, j in co["jct_s"].items():
            ratios.setdefault(p, []).append(round(j / ns["jct_s"][p], 3))
    print("compose/netns JCT ratio per policy: " + ", ".join(f"{p} {v}" for p, v in ratios.items()))
    (out / "parity.json").write_text(
        json.dumps({"runs": runs, "compose_over_netns": ratios}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

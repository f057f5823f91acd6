"""The compose image's entrypoint: `node` (the agent of one node container) or `driver` (the
workload driver and conductor of the stack). Only parses arguments and calls
`compose.agent.run_agent` or `compose.conduct.conduct`.

    node --node prefill-0 --cnic 198.18.0.0/24@400 --snic 198.18.1.0/24@100 --mgmt 198.18.2.0/24
    driver --policies basic,dualpath,oracle [--out /results/NAME]   (config in $DUALPATH_CONFIG)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from compose.agent import NicArg, run_agent
from compose.conduct import conduct
from compose.render import AGENT_PORT, ALL_POLICIES
from netem.spec import SpecError


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compose.entry", description=__doc__)
    sub = p.add_subparsers(dest="role", required=True)
    node = sub.add_parser("node", help="a node container's agent")
    node.add_argument("--node", required=True, help="node id, e.g. prefill-0")
    for nic in ("cnic", "snic"):
        node.add_argument(f"--{nic}", metavar="SUBNET[@RATE_MBIT]", help=f"find {nic} by subnet")
    node.add_argument("--mgmt", required=True, metavar="SUBNET", help="the management network")
    node.add_argument("--no-isolation", action="store_true", help="cnic as one FIFO class")
    node.add_argument("--kv-min-fraction", type=float, default=0.05, help="cnic kv class share")
    node.add_argument("--port", type=int, default=AGENT_PORT, help="agent port on mgmt")
    drv = sub.add_parser("driver", help="run the workload on the stack's nodes")
    drv.add_argument("--policies", default=",".join(ALL_POLICIES), help="comma-separated")
    drv.add_argument("--out", type=Path, help="output folder (default /results/<name>-...)")
    args = p.parse_args(argv)
    if args.role == "driver":
        config = os.environ.get("DUALPATH_CONFIG")
        if not config:
            _say("error: DUALPATH_CONFIG is empty: the driver takes its lab config from it")
            return 2
        policies = [x.strip() for x in args.policies.split(",") if x.strip()]
        bad = [x for x in policies if x not in ALL_POLICIES]
        if bad or not policies:
            _say(f"error: --policies {args.policies!r}: valid are {', '.join(ALL_POLICIES)}")
            return 2
        return conduct(
            config,
            policies=policies,
            out=args.out,
            scenario_text=os.environ.get("DUALPATH_SCENARIO"),
        )
    try:
        nics = [
            NicArg.parse(n, getattr(args, n)) for n in ("cnic", "snic", "mgmt") if getattr(args, n)
        ]
    except SpecError as exc:
        _say(f"error: {exc}")
        return 2
    return run_agent(
        args.node,
        nics,
        isolation=not args.no_isolation,
        kv_min_fraction=args.kv_min_fraction,
        port=args.port,
        say=_say,
    )


if __name__ == "__main__":
    sys.exit(main())

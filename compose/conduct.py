"""The driver container's main (`compose.entry driver`): the lab's runner on the stack's nodes,
through their agents (compose.stack.StackBackend), one policy after the other, results into the
bind-mounted results directory."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from compose.stack import StackBackend
from dualpath.errors import EXIT_FAILED, DualPathError, describe
from lab.config.models import ConfigError, parse_config
from lab.results.report import comparison_table, summary_lines
from lab.results.verdict import exit_status
from lab.run.bringup import Prepared
from lab.run.chaos import cluster_links, compile_scenario
from lab.run.runner import compare, run_once
from services.spec import Policy


def stack_backend(lab: Prepared) -> StackBackend:
    """The runner's backend in a driver container: the stack's node containers, already up."""
    return StackBackend(lab.spec, lab.spec_path, lab.out_dir / "logs", lab.state)


def _default_out(name: str, kind: str) -> Path:
    return Path("/results") / f"{name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def conduct(
    config_text: str,
    *,
    policies: Sequence[str],
    out: Path | None,
    scenario_text: str | None = None,
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> int:
    """The driver container's main: run `policies` on the stack's nodes one after the other
    and write summary.json per policy (and comparison.json for several). 0 when every turn
    of every run completed and its bytes balance, 1 otherwise, 2 for a bad config or
    scenario."""
    try:
        cfg = parse_config(_yaml(config_text, "DUALPATH_CONFIG"), source="DUALPATH_CONFIG")
        scenario = None
        if scenario_text is not None:
            data = _yaml(scenario_text, "DUALPATH_SCENARIO")
            scenario = compile_scenario(data, cluster_links(cfg), source="DUALPATH_SCENARIO")
        chosen = [Policy(p) for p in policies]
        if len(chosen) == 1:
            run_cfg = cfg.model_copy(update={"policy": chosen[0]})
            dest = out or _default_out(cfg.name, chosen[0].value)
            res = run_once(
                run_cfg, backend="compose", out_dir=dest, scenario=scenario, factory=stack_backend
            )
            say("\n".join(summary_lines(res.summary)))
            say(f"summary: {dest / 'summary.json'}")
            return _failed({"run": res.summary})
        dest = out or _default_out(cfg.name, "compare")
        cmp = compare(cfg, backend="compose", out_dir=dest, policies=chosen, factory=stack_backend)
    except DualPathError as exc:
        say(describe(exc))
        return exc.exit_status
    say(comparison_table(cmp) if "basic" in cmp["runs"] else json.dumps(cmp["jct_s"]))
    say(f"comparison: {dest / 'comparison.json'}")
    return _failed(cmp["runs"])


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None


def _failed(summaries: Mapping[str, Mapping[str, Any]]) -> int:
    """1 when a run failed (a turn or node error, or bytes that do not balance), else 0: the
    CLI's rule without the host-bound verdict (the stack's host is the user's to judge)."""
    return EXIT_FAILED if exit_status(summaries, allow_host_bound=True) == EXIT_FAILED else 0

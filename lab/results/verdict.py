"""From a run's summaries to the exit status of the command that made them: 1 when a run
failed, 3 when the host shaped its figures (emulation health, lab.results.health) and that was
not accepted, else 0; and recording an accepted host-bound verdict in summary.json."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dualpath.errors import EXIT_FAILED, EXIT_HOST_BOUND, EXIT_OK
from lab.results.health import HOST_BOUND, verdict_of


def host_bound_runs(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The names (policies) of the runs whose emulation-health verdict is host-bound."""
    return [name for name, s in summaries.items() if verdict_of(s) == HOST_BOUND]


def exit_status(summaries: Mapping[str, Mapping[str, Any]], *, allow_host_bound: bool) -> int:
    """The exit status of run/compare/chaos from their summaries: 1 when a run failed (a turn
    or node error, or bytes that do not balance), else 3 when a run was host-bound unless
    `allow_host_bound`, else 0. An "unknown" verdict (no timeline reported a step, e.g. an
    older node) does not fail."""
    if any(s.get("errors") or not s.get("bytes_accounted", True) for s in summaries.values()):
        return EXIT_FAILED
    if host_bound_runs(summaries) and not allow_host_bound:
        return EXIT_HOST_BOUND
    return EXIT_OK


def host_bound_message(summaries: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The last stderr line when a run was host-bound and that was not accepted; None else."""
    names = host_bound_runs(summaries)
    if not names:
        return None
    return (
        f"error: emulation was host-bound ({', '.join(names)}): this machine's CPU, not the "
        "emulated system, shaped the figures (emulation_health in summary.json says where); "
        "--allow-host-bound accepts them"
    )


def accept_host_bound(
    summaries: Mapping[str, dict[str, Any]], files: Mapping[str, Path], allow: bool
) -> None:
    """With --allow-host-bound: record `allowed_host_bound: true` in each host-bound run's
    summary and rewrite its summary.json (`files`, per run name; written by the runner, here
    or in a compose driver container)."""
    if not allow:
        return
    for name in host_bound_runs(summaries):
        summaries[name]["allowed_host_bound"] = True
        path = files.get(name)
        if path is not None and path.exists():
            path.write_text(json.dumps(summaries[name], indent=2))

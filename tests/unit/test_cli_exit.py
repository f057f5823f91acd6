"""Exit status of run/compare/chaos: a host-bound run exits 3 unless --allow-host-bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import lab.commands as commands
from dualpath.errors import EXIT_FAILED, EXIT_HOST_BOUND, EXIT_OK
from lab.cli import build_parser
from lab.results.health import assess
from lab.results.metrics import summarize
from lab.results.verdict import accept_host_bound, exit_status, host_bound_message
from lab.run.runner import RunResult

REPO = Path(__file__).resolve().parents[2]


def _summary(verdict: str | None, *, errors: tuple[str, ...] = ()) -> dict[str, Any]:
    s: dict[str, Any] = {"policy": "dualpath", "errors": list(errors)}
    if verdict is not None:
        s["emulation_health"] = {"verdict": verdict, "reasons": []}
    return s


@pytest.mark.parametrize(
    ("verdicts", "allow", "status"),
    [
        (["healthy"], False, EXIT_OK),
        (["unknown"], False, EXIT_OK),  # no timeline reported a step: not a failure
        ([None], False, EXIT_OK),  # a summary from before emulation health
        (["host-bound"], False, EXIT_HOST_BOUND),
        (["host-bound"], True, EXIT_OK),
        (["healthy", "host-bound", "healthy"], False, EXIT_HOST_BOUND),
        (["healthy", "host-bound", "unknown"], True, EXIT_OK),
    ],
)
def test_exit_status_from_the_verdicts(
    verdicts: list[str | None], allow: bool, status: int
) -> None:
    runs = {f"p{i}": _summary(v) for i, v in enumerate(verdicts)}
    assert exit_status(runs, allow_host_bound=allow) == status


def test_a_failed_run_exits_1_whatever_its_health() -> None:
    runs = {"basic": _summary("host-bound", errors=("traj 1 turn 0: lost",))}
    assert exit_status(runs, allow_host_bound=False) == EXIT_FAILED
    assert exit_status(runs, allow_host_bound=True) == EXIT_FAILED


def test_bytes_that_do_not_balance_fail_the_run() -> None:
    runs = {"dualpath": {**_summary("healthy"), "bytes_accounted": False}}
    assert exit_status(runs, allow_host_bound=True) == EXIT_FAILED


def test_the_message_names_the_runs_and_the_flag() -> None:
    runs = {"basic": _summary("healthy"), "dualpath": _summary("host-bound")}
    msg = host_bound_message(runs)
    assert msg is not None and "(dualpath)" in msg and "--allow-host-bound" in msg
    assert host_bound_message({"basic": _summary("unknown")}) is None


def test_accepting_records_it_in_the_summary_file(tmp_path: Path) -> None:
    runs = {"basic": _summary("healthy"), "dualpath": _summary("host-bound")}
    files = {p: tmp_path / p / "summary.json" for p in runs}
    for p, path in files.items():
        path.parent.mkdir()
        path.write_text(json.dumps(runs[p]))
    accept_host_bound(runs, files, False)
    assert "allowed_host_bound" not in json.loads(files["dualpath"].read_text())
    accept_host_bound(runs, files, True)
    assert json.loads(files["dualpath"].read_text())["allowed_host_bound"] is True
    assert "allowed_host_bound" not in json.loads(files["basic"].read_text())
    assert runs["dualpath"]["allowed_host_bound"] is True


def test_the_flag_belongs_to_run_compare_and_chaos() -> None:
    parser = build_parser()
    for argv in (["run"], ["compare"], ["chaos", "--scenario", "s.yaml"]):
        args = parser.parse_args([*argv, "-c", "x.yaml", "--allow-host-bound"])
        assert args.allow_host_bound
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "-c", "x.yaml", "--allow-host-bound"])
    assert "3 a run was host-bound" in parser.format_help()


def _fake_run_once(summary: dict[str, Any]) -> Any:
    """Stands in for lab.run.runner.run_once: writes `summary` where the runner would."""

    def run_once(cfg: Any, *, out_dir: Path, **kw: Any) -> RunResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return RunResult(summary, out_dir)

    return run_once


def _host_bound_summary() -> dict[str, Any]:
    """A summary as the runner writes it, of a run whose one timeline ran 20 % late."""
    driver = {"started_at": 0.0, "finished_at": 10.0, "jct_s": 10.0, "turns": []}
    s = summarize(
        policy="dualpath",
        backend="local",
        config_name="laptop",
        time_dilation=1.0,
        driver=driver,
        samples=[],
        num_agents=0,
    )
    steps = [[0.1 * i, 100.0, 120.0, 20.0] for i in range(100)]
    health = {"prefill-0": [{"process": "prefill-0", "part": "timeline", "steps": steps}]}
    s["emulation_health"] = assess(health, [], window=(0.0, 10.0))
    s["allowed_host_bound"] = False
    return s


@pytest.mark.parametrize(("allow", "status"), [(False, EXIT_HOST_BOUND), (True, EXIT_OK)])
def test_dualpath_run_prints_everything_then_exits_3_or_records_the_acceptance(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    allow: bool,
    status: int,
) -> None:
    monkeypatch.setattr(commands, "run_once", _fake_run_once(_host_bound_summary()))
    out = tmp_path / "run"
    argv = ["run", "-c", str(REPO / "examples" / "laptop.yaml"), "--backend", "local"]
    argv += ["--out", str(out)] + (["--allow-host-bound"] if allow else [])
    args = build_parser().parse_args(argv)
    assert args.func(args) == status
    printed = capsys.readouterr()
    assert "emulation: HOST-BOUND" in printed.out and f"summary: {out}" in printed.out
    written = json.loads((out / "summary.json").read_text())
    assert written["allowed_host_bound"] is allow
    if allow:
        assert "accepted" in printed.out and printed.err == ""
    else:
        last = printed.err.strip().splitlines()[-1]
        assert "host-bound" in last and "--allow-host-bound" in last

"""The pytest plugin's labs on loopback (lab.testing.harness on the local backend): a lab held
up runs its workload once, refuses a second run and a link change it cannot make, and is taken
down whatever the test did. Nothing is asserted on speed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from lab_inputs import bailian_line, tiny

from lab.config.models import parse_config
from lab.run.chaos import ScenarioError
from lab.run.runner import RunError
from lab.testing.harness import Lab, LabChangeError, LabFixtureError, lab_factory, load, run

pytest_plugins = ["pytester"]

TINY = tiny(policy="basic", cluster={"storage_servers": 1}, workload={"num_agents": 2, "seed": 4})


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALPATH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DUALPATH_DATA_DIR", str(tmp_path))


def _nothing_left(tmp_path: Path, pids: list[int]) -> None:
    assert not list((tmp_path / "state").glob("*.run.json"))
    assert not list(tmp_path.glob("dualpath-*"))  # the data directories
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]


def test_a_held_lab_runs_its_workload_once_and_goes_down(tmp_path: Path) -> None:
    lab = Lab(parse_config(TINY), backend="local", out_dir=tmp_path / "lab")
    with lab:
        assert not lab.shaped
        assert list((tmp_path / "state").glob("*.run.json"))  # recorded while up
        pids = list(lab.up.prepared.state.data["pids"].values())
        with pytest.raises(LabChangeError, match="local backend has no shaped links"):
            lab.set_link("prefill-0", "snic", rate="50%")
        with pytest.raises(LabFixtureError, match="rate"):
            lab.set_link("prefill-0", "snic", rate="fast")
        with pytest.raises(LabFixtureError, match="nothing to change"):
            lab.set_link("prefill-0", "snic")
        result = lab.run()
        s = result.summary
        assert s["turns_done"] == 4 and s["turns_failed"] == 0 and s["errors"] == []
        assert s["bytes_accounted"] and set(s["read_sides"]) == {"prefill"}
        assert "control" not in s  # the refused changes changed nothing
        assert s["scaling"]["time_dilation"] == 2
        assert result.out_dir == tmp_path / "lab" and (result.out_dir / "summary.json").is_file()
        with pytest.raises(RunError, match="has run its workload already"):
            lab.run()
    _nothing_left(tmp_path, pids)
    with pytest.raises(LabFixtureError, match="not up"):
        lab.set_link("prefill-0", "snic", rate="50%")


def test_labs_of_the_factory_go_down_when_the_test_fails(tmp_path: Path) -> None:
    pids: list[int] = []
    with (
        pytest.raises(AssertionError, match="the test failed"),
        lab_factory(tmp_path / "labs", "local") as make,
    ):
        for policy in ("basic", "dualpath"):
            lab = make(TINY, policy=policy, agents=1)
            assert lab.cfg.policy.value == policy and lab.cfg.workload.num_agents == 1
            pids += lab.up.prepared.state.data["pids"].values()
        assert sorted(p.name for p in (tmp_path / "labs").iterdir()) == [
            "tiny-basic",
            "tiny-dualpath",
        ]
        raise AssertionError("the test failed")
    assert len(pids) == 8  # two labs of four nodes
    _nothing_left(tmp_path, pids)


INNER = """
import json
import os
import signal

CONFIG = {config!r}


def test_terminated_while_a_lab_is_up(dualpath_lab):
    lab = dualpath_lab(CONFIG)
    pids = list(lab.up.prepared.state.data["pids"].values())
    with open({pids_file!r}, "w") as fh:
        json.dump(pids, fh)
    os.kill(os.getpid(), signal.SIGTERM)  # as a cancelled CI job is
    raise AssertionError("not reached: SIGTERM interrupts the test")
"""


def test_a_terminated_session_takes_its_labs_down(
    tmp_path: Path, pytester: pytest.Pytester
) -> None:
    pids_file = tmp_path / "pids.json"
    pytester.makepyfile(test_inner=INNER.format(config=TINY, pids_file=str(pids_file)))
    result = pytester.runpytest_subprocess("--dualpath-backend", "local", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    pids = json.loads(pids_file.read_text())
    assert len(pids) == 4  # the lab was up: scheduler, prefill, decode, storage
    result.stderr.fnmatch_lines(["*lab * down: removed * objects*"])
    _nothing_left(tmp_path, pids)


BOTH = """
CONFIG = {config!r}


def test_a_run_and_a_lab_of_one_config(dualpath_run, dualpath_lab, dualpath_results):
    first = dualpath_run(CONFIG, agents=1)
    lab = dualpath_lab(CONFIG, agents=1)
    second = lab.run()
    assert first.out_dir != second.out_dir
    assert {{first.out_dir.name, second.out_dir.name}} == {{"tiny-basic", "tiny-basic-2"}}
    assert first.out_dir.parent == second.out_dir.parent == dualpath_results
    for result in (first, second):
        assert result.summary["turns_done"] == 2 and result.summary["turns_failed"] == 0
        assert (result.out_dir / "summary.json").is_file()
"""


def test_the_fixtures_on_loopback_keep_results_where_asked(
    tmp_path: Path, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_inner=BOTH.format(config=TINY))
    results = tmp_path / "results"
    result = pytester.runpytest_subprocess(
        "--dualpath-backend", "local", "--dualpath-results", str(results), "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)
    kept = sorted(p.relative_to(results) for p in results.glob("*/*/summary.json"))
    test_dir = "test_inner.py_test_a_run_and_a_lab_of_one_config"
    assert [str(p) for p in kept] == [
        f"{test_dir}/tiny-basic/summary.json",
        f"{test_dir}/tiny-basic-2/summary.json",
    ]
    _nothing_left(tmp_path, [])


def _request(chat: int, parent: int, at: float, tokens: int, blocks: int) -> dict[str, Any]:
    """A Qwen-Bailian trace line: 16-token blocks, a session as a parent_chat_id chain."""
    return bailian_line(chat, parent, at, tokens, list(range(blocks)), turn=1 if parent < 0 else 2)


def test_a_held_lab_replays_a_request_trace_given_as_an_override(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [_request(1, -1, 0.0, 320, 20), _request(2, 1, 0.3, 640, 40)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {k: v for k, v in TINY.items() if k != "workload"}
    cfg = load(base, overrides={"workload.trace": {"file": str(trace), "format": "bailian"}})
    with Lab(cfg, backend="local", out_dir=tmp_path / "lab") as lab:
        s = lab.run().summary
    assert s["arrival"]["mode"] == "trace" and s["trace"]["requests_replayed"] == 2
    assert s["turns_done"] == 2 and s["turns_failed"] == 0 and s["errors"] == []
    assert s["trace"]["assigned_hit_blocks"] > 0  # the second request's prefix is the first's
    assert s["bytes_accounted"] and s["byte_ledger"]["balanced"]
    _nothing_left(tmp_path, [])


def test_a_scenario_that_cannot_be_read_stops_a_run_before_anything_starts(
    tmp_path: Path,
) -> None:
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        run(parse_config(TINY), backend="local", out_dir=tmp_path / "out", scenario="nope.yaml")
    assert not (tmp_path / "out").exists()
    _nothing_left(tmp_path, [])

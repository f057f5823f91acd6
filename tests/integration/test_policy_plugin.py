"""The example policy plugin as a user meets it: installed into the lab's virtualenv (`make
venv`), listed by `dualpath policies`, and run by name from a config on the `local` backend,
where the scheduler process loads it from its entry point. Real processes, no fakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from lab_inputs import tiny

DUALPATH = Path(sys.executable).with_name("dualpath")
PLUGIN = "shortest_read_queue"

TINY = tiny(name="plugin", policy="dualpath", scheduling={"selector": PLUGIN})


def dualpath(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DUALPATH_STATE_DIR": str(tmp_path / "state"),
        "DUALPATH_DATA_DIR": str(tmp_path),
    }
    return subprocess.run(
        [str(DUALPATH), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )


def config_file(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dualpath_policies_lists_the_installed_example_plugin(tmp_path: Path) -> None:
    listed = dualpath(tmp_path, "policies", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows[PLUGIN] == {
        "name": PLUGIN,
        "origin": "dualpath-example-policy 0.1.0",
        "description": "Shortest read queue first: nodes by storage-read queue, engines by"
        " fewest tokens.",
        "entry_point": "dualpath_example_policy:make_policy",
        "config": f"policy: dualpath, scheduling.selector: {PLUGIN}",
        "error": "",
    }
    assert rows["dualpath"]["origin"] == "built-in"
    text = dualpath(tmp_path, "policies")
    assert text.returncode == 0, text.stderr
    (line,) = [x for x in text.stdout.splitlines() if x.startswith(PLUGIN)]
    assert "dualpath-example-policy 0.1.0" in line and "Shortest read queue first" in line


def test_a_run_picks_the_plugin_policy_by_name_from_its_config(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = dualpath(
        tmp_path, "run", "-c", str(config_file(tmp_path, TINY)), "--backend", "local",
        "--out", str(out), "-q",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == [] and summary["turns_failed"] == 0
    assert summary["turns_done"] == 6
    assert summary["bytes_accounted"] and summary["bytes_storage_read"] > 0
    # the scheduler process built the plugin's policy from its entry point, no other
    log = (out / "logs" / "scheduler.log").read_text()
    assert f"[scheduler] policy {PLUGIN}\n" in log, log
    assert json.loads((out / "spec.json").read_text())["selector"] == PLUGIN


def test_an_unknown_policy_name_lists_the_built_in_and_the_plugin_names(tmp_path: Path) -> None:
    bad = config_file(tmp_path, {**TINY, "scheduling": {"selector": "fastest"}})
    out = tmp_path / "out"
    run = dualpath(tmp_path, "run", "-c", str(bad), "--backend", "local", "--out", str(out))
    assert run.returncode == 2, run.stdout + run.stderr
    message = run.stderr
    assert "scheduling.selector: unknown selector 'fastest'" in message
    assert "valid: dualpath, least_tokens, round_robin;" in message
    plugins = message.split("plugins (dualpath.policies): ", 1)[1].split("\n", 1)[0]
    assert PLUGIN in plugins.split(", ")
    assert not out.exists() and not list(tmp_path.glob("dualpath-*"))  # refused before bring-up

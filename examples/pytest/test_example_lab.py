"""An example of a test suite built only on DualPath Mesh's pytest plugin (docs/testing.md).

Installing dualpath-mesh is all it takes: no conftest, no helpers. The fixtures bring a lab up
on the netns backend where the test process may create network namespaces (root), on loopback
(the local backend) otherwise, and take it down whatever happens:

    pytest examples/pytest                               # netns as root, local otherwise
    pytest examples/pytest --dualpath-backend local      # loopback processes, unshaped
    pytest examples/pytest --dualpath-results results/ci # keep summary.json and the logs

The config is the laptop demo, made small enough for a CI runner with a few overrides (2 GPUs
per node, 4 agents of 2 turns, time dilated x2). Nothing here asserts on speed: a shared CI
machine's CPU shapes timings as much as the emulated links do. What is asserted is what every
run must get right whatever the machine: every turn done, every KV byte verified and accounted
for, the read side the policy promises, the link change recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

CONFIG = Path(__file__).resolve().parents[1] / "laptop.yaml"
AGENTS, TURNS = 4, 2
SMALL: dict[str, Any] = {
    "cluster.gpus_per_node": 2,
    "scaling.time_dilation": 2,
    "workload": {"max_len": 32768, "seed": 5, "gen_token_scale": 0.05},
}


def test_config_overrides_apply(dualpath_config: Any) -> None:
    cfg = dualpath_config(CONFIG, policy="basic", agents=AGENTS, turns=TURNS, overrides=SMALL)
    assert cfg.policy.value == "basic"
    assert cfg.workload.num_agents == AGENTS
    assert cfg.workload.max_turns_per_agent == TURNS
    assert cfg.cluster.gpus_per_node == 2
    assert cfg.workload.seed == 5
    assert cfg.model.block_tokens == 64  # the rest is the file's


def test_basic_reads_kv_through_the_prefill_side_only(dualpath_run: Any) -> None:
    result = dualpath_run(CONFIG, policy="basic", agents=AGENTS, turns=TURNS, overrides=SMALL)
    s = result.summary
    assert s["policy"] == "basic"
    assert s["turns_failed"] == 0 and s["errors"] == []
    assert s["turns_done"] == AGENTS * TURNS
    assert set(s["read_sides"]) == {"prefill"}  # basic never reads through the decode side
    assert s["bytes_storage_read"] > 0 and s["bytes_accounted"]
    assert (result.out_dir / "summary.json").is_file()


@pytest.mark.dualpath_netns  # the local backend has no shaped links to change
def test_a_halved_storage_link_is_recorded_and_every_turn_still_completes(
    dualpath_lab: Any,
) -> None:
    lab = dualpath_lab(CONFIG, policy="dualpath", agents=AGENTS, turns=TURNS, overrides=SMALL)
    done = lab.set_link("prefill-0", "snic", rate="50%")
    assert done.startswith("prefill-0/snic: rate_mbit=50")  # what the kernel was told

    s = lab.run().summary

    assert s["turns_done"] == AGENTS * TURNS and s["turns_failed"] == 0
    assert s["bytes_accounted"] and s["byte_ledger"]["balanced"]
    (change,) = s["control"]["events"]  # made before the driver started: a negative t
    assert change["node"] == "prefill-0" and change["nic"] == "snic" and change["t"] < 0
    assert change["changes"]["rate_mbit"] == pytest.approx(lab.cfg.snic_rate_mbit / 2)

"""The replay plan (agents.json): what the runner encodes the driver decodes, checked."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from lab.run.workload import (
    AgentPlan,
    PlanFileError,
    ReplayPlan,
    Trajectory,
    TrajectoryTurn,
    TurnPlan,
    plan_agents,
)

TRAJ = Trajectory(7, (TrajectoryTurn(100, 20), TrajectoryTurn(50, 10), TrajectoryTurn(200, 30)))


def _plan() -> ReplayPlan:
    (agent,) = plan_agents([TRAJ], block_tokens=64, start_turn_fraction=0.4)
    return ReplayPlan((msgspec.structs.replace(agent, start_after_s=1.5),))


def test_the_driver_decodes_exactly_what_the_runner_encoded() -> None:
    plan = _plan()
    back = ReplayPlan.decode(plan.encode(), source="agents.json")
    assert back == plan
    assert back.num_turns == 2 and back.agents[0].start_after_s == 1.5
    assert back.agents[0].turns[0] == TurnPlan(7, 1, 120, 50, 10)


def test_the_file_keeps_its_shape() -> None:
    doc = json.loads(_plan().encode())
    (agent,) = doc["agents"]
    assert {"traj_id", "seed_blocks", "start_after_s", "turns"} <= set(agent)
    assert {"turn_index", "context_tokens", "append_tokens", "gen_tokens"} <= set(agent["turns"][0])


def test_an_offline_agent_starts_at_once() -> None:
    doc = json.loads(_plan().encode())
    del doc["agents"][0]["start_after_s"]
    plan = ReplayPlan.decode(json.dumps(doc).encode(), source="agents.json")
    assert plan.agents[0].start_after_s == 0.0


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda a: a["turns"][0].update(gen_tokens=0), "gen_tokens"),
        (lambda a: a["turns"][0].update(context_tokens="120"), "context_tokens"),
        (lambda a: a.update(seed_blocks=-1), "seed_blocks"),
        (lambda a: a.update(start_after_s=-0.5), "start_after_s"),
        (lambda a: a.update(surprise=1), "surprise"),
        (lambda a: a["turns"][1].update(traj_id=8), "trajectory 8"),
    ],
)
def test_an_invalid_plan_is_refused_naming_the_field(
    change: Callable[[dict[str, Any]], object], named: str
) -> None:
    doc = json.loads(_plan().encode())
    change(doc["agents"][0])
    with pytest.raises(PlanFileError, match=named) as info:
        ReplayPlan.decode(json.dumps(doc).encode(), source="run/agents.json")
    assert "run/agents.json" in str(info.value)


def test_a_file_that_is_not_json_is_refused() -> None:
    with pytest.raises(PlanFileError, match="not a replay plan"):
        ReplayPlan.decode(b"{not json", source="agents.json")


def test_agents_and_turns_are_frozen() -> None:
    agent = _plan().agents[0]
    with pytest.raises(AttributeError):
        agent.seed_blocks = 3  # type: ignore[misc]
    assert isinstance(agent, AgentPlan)

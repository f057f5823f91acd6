"""Chaos scenarios: value parsing, expansion of ramps/flaps/bursts/repeats, errors by path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab.config.models import load_config
from lab.run.chaos import (
    ClusterLinks,
    LinkStep,
    NodeStep,
    ScenarioError,
    cluster_links,
    compile_scenario,
    load_scenario,
    parse_duration,
    parse_percent,
    parse_rate,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LINKS = ClusterLinks(
    {"prefill-0": {"cnic": 400.0, "snic": 100.0}, "decode-0": {"cnic": 400.0, "snic": 100.0}},
    frozenset({"storage-0"}),
)


def compile_events(*events: dict[str, Any]) -> tuple[LinkStep | NodeStep, ...]:
    return compile_scenario({"name": "t", "events": list(events)}, LINKS).steps


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), (4, 4.0), ("1.5", 1.5)]
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize(
    ("text", "mbit"),
    [("50%", 50.0), ("40mbit", 40.0), ("800kbit", 0.8), ("1gbit", 1000.0), (7, 7.0)],
)
def test_rates_relative_or_absolute(text: Any, mbit: float) -> None:
    assert parse_rate(text, 100.0, "x") == pytest.approx(mbit)


def test_percent_from_text_or_fraction() -> None:
    assert parse_percent("5%", "x") == 5.0
    assert parse_percent(0.05, "x") == pytest.approx(5.0)


def test_set_and_node_steps_are_sorted_by_time_then_order() -> None:
    steps = compile_events(
        {"at": "20s", "node": {"id": "decode-0", "action": "kill"}},
        {"at": "10s", "set": {"node": "prefill-0", "nic": "snic", "rate": "50%", "loss": "1%"}},
        {"at": "20s", "node": {"id": "storage-0", "action": "stop"}},
    )
    assert steps[0] == LinkStep(
        10.0, "prefill-0", "snic", {"rate_mbit": 50.0, "loss_pct": 1.0}, "events[1] (set)"
    )
    assert [s.node for s in steps[1:]] == ["decode-0", "storage-0"]
    assert isinstance(steps[1], NodeStep) and steps[1].action == "kill"


def test_loss_burst_flap_and_ramp_expand() -> None:
    burst = compile_events(
        {"at": 5, "loss_burst": {"node": "decode-0", "nic": "cnic", "loss": "5%", "for": "2s"}}
    )
    assert [(s.at_s, dict(s.changes)) for s in burst if isinstance(s, LinkStep)] == [
        (5.0, {"loss_pct": 5.0}),
        (7.0, {"loss_pct": 0.0}),
    ]
    flap = compile_events(
        {
            "at": 1,
            "flap": {"node": "decode-0", "nic": "cnic", "down_for": 1, "times": 2, "every": 3},
        }
    )
    assert [(s.at_s, dict(s.changes)["up"]) for s in flap if isinstance(s, LinkStep)] == [
        (1.0, False),
        (2.0, True),
        (4.0, False),
        (5.0, True),
    ]
    ramp = compile_events(
        {
            "at": 0,
            "ramp": {
                "node": "prefill-0",
                "nic": "snic",
                "rate": {"from": "100%", "to": "20%"},
                "over": "8s",
                "steps": 4,
            },
        }
    )
    got = [(s.at_s, dict(s.changes)["rate_mbit"]) for s in ramp if isinstance(s, LinkStep)]
    assert got == [(0.0, 100.0), (2.0, 80.0), (4.0, 60.0), (6.0, 40.0), (8.0, 20.0)]


def test_repeat_offsets_nested_events() -> None:
    steps = compile_events(
        {
            "at": "10s",
            "repeat": {
                "every": "5s",
                "times": 3,
                "events": [{"at": 1, "node": {"id": "decode-0", "action": "stop"}}],
            },
        }
    )
    assert [s.at_s for s in steps] == [11.0, 16.0, 21.0]


@pytest.mark.parametrize(
    ("event", "fragment"),
    [
        ({"at": "soon", "set": {"node": "prefill-0", "nic": "snic", "rate": "1%"}}, "events[0].at"),
        ({"set": {"node": "prefill-9", "nic": "snic", "rate": "1%"}}, "events[0].set.node"),
        ({"set": {"node": "prefill-0", "nic": "mgmt", "rate": "1%"}}, "events[0].set.nic"),
        ({"set": {"node": "prefill-0", "nic": "snic", "rate": "fast"}}, "events[0].set.rate"),
        ({"set": {"node": "prefill-0", "nic": "snic", "rate": "0%"}}, "must be a rate > 0"),
        ({"set": {"node": "prefill-0", "nic": "snic", "loss": "150%"}}, "events[0].set.loss"),
        ({"set": {"node": "prefill-0", "nic": "snic"}}, "nothing to change"),
        ({"set": {"node": "prefill-0", "nic": "snic", "speed": 1}}, "events[0].set.speed"),
        ({"node": {"id": "decode-0", "action": "explode"}}, "events[0].node.action"),
        ({"set": {}, "node": {}}, "exactly one of"),
        (
            {"flap": {"node": "decode-0", "nic": "cnic", "down_for": 2, "times": 2, "every": 1}},
            "every",
        ),
        (
            {
                "repeat": {
                    "every": 1,
                    "times": 10**6,
                    "events": [{"node": {"id": "decode-0", "action": "stop"}}],
                }
            },
            "more than",
        ),
    ],
)
def test_bad_events_are_rejected_naming_the_path(event: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ScenarioError) as info:
        compile_scenario({"events": [event]}, LINKS, source="s.yaml")
    assert str(info.value).startswith("s.yaml: ")
    assert fragment in str(info.value)


def test_cluster_links_come_from_the_config() -> None:
    links = cluster_links(load_config(EXAMPLES / "laptop.yaml"))
    assert links.rates_mbit["prefill-0"] == {"cnic": 400.0, "snic": 100.0}
    assert set(links.rates_mbit) == {"prefill-0", "decode-0"}
    assert links.other_nodes == {"storage-0", "storage-1"}


def test_example_scenarios_compile_against_the_laptop_config() -> None:
    links = cluster_links(load_config(EXAMPLES / "laptop.yaml"))
    paths = sorted((EXAMPLES / "chaos").glob("*.yaml"))
    assert paths
    for path in paths:
        scenario = load_scenario(path, links)
        assert scenario.steps and scenario.description


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(tmp_path / "nope.yaml", LINKS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("events: [\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad, LINKS)

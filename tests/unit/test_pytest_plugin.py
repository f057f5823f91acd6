"""The pytest plugin's pure parts (lab.testing.harness: overrides, config loading, backend
choice, run directories) and its wiring in a pytest session of its own (pytester): registered
by the entry point, options checked, the netns marker, and no lab imported until a fixture
asks for one. No lab comes up here (tests/integration/test_pytest_plugin_local.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lab.config.models import ConfigError, parse_config
from lab.testing.harness import (
    LabFixtureError,
    choose_backend,
    config_overrides,
    load,
    merged,
    nested,
    run_dir_name,
)

pytest_plugins = ["pytester"]

SMALL = {
    "name": "small",
    "cluster": {"prefill_nodes": 1, "decode_nodes": 1, "storage_servers": 1, "gpus_per_node": 2},
    "workload": {"num_agents": 3, "max_len": 32768, "seed": 2},
}


def test_dotted_and_nested_overrides_make_one_mapping() -> None:
    got = nested(
        {
            "workload.seed": 3,
            "workload": {"num_agents": 2},
            "workload.trace": {"file": "t.jsonl", "format.name": "mooncake"},
            "policy": "basic",
        }
    )
    assert got == {
        "workload": {
            "seed": 3,
            "num_agents": 2,
            "trace": {"file": "t.jsonl", "format": {"name": "mooncake"}},
        },
        "policy": "basic",
    }


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"workload.seed": 3, "workload.seed.x": 1}, "workload.seed is already set"),
        ({"workload.seed": 3, "workload": 4}, "replaces overrides given under it"),
        ({"workload..seed": 3}, "workload..seed"),
        ({"workload.num-agents": 3}, "workload.num-agents"),
    ],
)
def test_conflicting_or_malformed_overrides_are_refused(
    overrides: dict[str, object], named: str
) -> None:
    with pytest.raises(LabFixtureError, match=named.replace(".", r"\.")):
        nested(overrides)


def test_merge_lays_mappings_into_mappings_and_replaces_the_rest() -> None:
    base = {"workload": {"seed": 1, "num_agents": 8}, "scaling": "auto", "policy": "dualpath"}
    over = {"workload": {"seed": 2}, "scaling": {"time_dilation": 2}}
    assert merged(base, over) == {
        "workload": {"seed": 2, "num_agents": 8},
        "scaling": {"time_dilation": 2},
        "policy": "dualpath",
    }
    assert base["workload"] == {"seed": 1, "num_agents": 8}  # not changed in place


def test_shorthands_win_over_the_same_field_in_overrides() -> None:
    got = config_overrides(
        policy="oracle",
        agents=4,
        turns=2,
        overrides={"workload.num_agents": 9, "workload.seed": 7, "policy": "basic"},
    )
    assert got == {
        "policy": "oracle",
        "workload": {"num_agents": 4, "seed": 7, "max_turns_per_agent": 2},
    }
    assert config_overrides() == {}


def test_load_from_a_file_a_mapping_and_a_config(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    from_file = load(path, policy="basic", turns=2, overrides={"workload.seed": 9})
    from_map = load(SMALL, policy="basic", turns=2, overrides={"workload": {"seed": 9}})
    assert from_file == from_map
    assert (from_file.policy.value, from_file.workload.max_turns_per_agent) == ("basic", 2)
    assert from_file.workload.seed == 9 and from_file.workload.num_agents == 3
    again = load(from_file, agents=5)
    assert again.workload.num_agents == 5 and again.workload.seed == 9
    assert load(from_file) is from_file


def test_a_file_scaling_auto_can_have_one_field_set(tmp_path: Path) -> None:
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "scaling": "auto"}))
    cfg = load(path, overrides={"scaling.time_dilation": 4})
    assert cfg.scaling.time_dilation == 4 and cfg.scaling.auto == ("bandwidth_scale",)


def test_a_bad_override_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"workload\.num_agents"):
        load(SMALL, agents=0)
    with pytest.raises(ConfigError, match=r"workload\.no_such_field"):
        load(parse_config(SMALL), overrides={"workload.no_such_field": 1})
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "missing.yaml")


def test_backend_choice() -> None:
    def able() -> None:
        return None

    def unable() -> str:
        return "no CAP_NET_ADMIN"

    assert choose_backend("auto", able) == "netns"
    assert choose_backend("auto", unable) == "local"
    assert choose_backend("netns", able) == "netns"
    assert choose_backend("local", able) == "local"
    with pytest.raises(LabFixtureError, match="--dualpath-backend netns: no CAP_NET_ADMIN"):
        choose_backend("netns", unable)
    with pytest.raises(LabFixtureError, match="'compose'"):
        choose_backend("compose", able)


def test_run_directories_are_unique_per_config_and_policy() -> None:
    cfg = parse_config(SMALL)
    taken: set[str] = set()
    names = [run_dir_name(cfg, taken) for _ in range(3)]
    other = run_dir_name(cfg.model_copy(update={"name": "a b/c"}), taken)
    assert names == ["small-dualpath", "small-dualpath-2", "small-dualpath-3"]
    assert other == "a_b_c-dualpath"


def test_the_plugin_is_registered_by_its_entry_point(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("dualpath")
    assert plugin is not None and plugin.__name__ == "lab.pytest_plugin"


INNER = """
import sys

import pytest


def test_no_lab_code_until_a_fixture_asks():
    assert "lab.testing.harness" not in sys.modules
    assert "lab.run.runner" not in sys.modules


def test_backend(dualpath_backend):
    assert dualpath_backend == "local"


@pytest.mark.dualpath_netns
def test_shaped():
    raise AssertionError("runs only on netns labs")
"""


def test_marker_and_option_in_a_session_of_their_own(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("--dualpath-backend", "local", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*dualpath_netns: needs shaped links, the labs here are local*"])


def test_a_bad_backend_option_names_itself(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner="def test_b(dualpath_backend):\n    pass\n")
    result = pytester.runpytest_subprocess("--dualpath-backend", "compose")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--dualpath-backend 'compose': expected one of auto*"])

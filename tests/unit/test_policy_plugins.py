"""Policy plugins (scheduler.plugins): discovery, the built-in names winning, and a clear error
naming the plugin for each way one can fail. The entry points here are real `EntryPoint`s whose
values name objects of this module; where the code discovers them itself (the config, the
`dualpath policies` verb), `importlib.metadata.entry_points` is replaced by a fake list."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

import scheduler.plugins
from dualpath.errors import UsageError
from lab.cli import build_parser
from lab.config.cluster import build_cluster_spec
from lab.config.models import ConfigError, parse_config
from lab.run.bringup import prepare
from scheduler.dualpath_policy import DualPathPolicy
from scheduler.plugins import (
    CheckedPolicy,
    InstalledPolicies,
    PolicyPluginError,
    catalogue,
)
from scheduler.registry import (
    PLUGIN_GROUP,
    PolicyKnobs,
    UnknownPolicyError,
    make_policy,
    policy_name,
)
from scheduler.views import Assignment, EngineView, NodeView, PendingTurn, ReadSide, SchedulePlan
from services.scheduler.state import policy_for

KNOBS = PolicyKnobs(beta_tokens=1000)
HERE = __name__


@dataclass(frozen=True)
class FirstEngines:
    """Every queued turn on the first engines, reads on the prefill side."""

    plan_override: Any = None

    @property
    def name(self) -> str:
        return "first_engines"

    def schedule(
        self,
        queue: Sequence[PendingTurn],
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        now: float,
    ) -> SchedulePlan:
        if isinstance(self.plan_override, Exception):
            raise self.plan_override
        if self.plan_override is not None:
            return self.plan_override  # type: ignore[no-any-return]
        pe, de = prefill[0], decode[0]
        return SchedulePlan(
            tuple(
                Assignment(t.turn_id, pe.node_id, 0, de.node_id, 0, ReadSide.PREFILL) for t in queue
            )
        )


def good_factory(knobs: PolicyKnobs) -> FirstEngines:
    """First engines: every turn on engine 0 of the first nodes.

    More text that the listing leaves out."""
    assert knobs.beta_tokens > 0
    return FirstEngines()


NOT_CALLABLE = 42


def raising_factory(knobs: PolicyKnobs) -> FirstEngines:
    raise RuntimeError("no GPUs today")


class NoSchedule:
    name = "no_schedule"


class NameNotStr(FirstEngines):
    @property
    def name(self) -> Any:
        return 7


class ScheduleWithoutNow:
    name = "without_now"

    def schedule(self, queue: Sequence[PendingTurn]) -> SchedulePlan:
        return SchedulePlan(())


def no_schedule(knobs: PolicyKnobs) -> object:
    return NoSchedule()


def name_not_str(knobs: PolicyKnobs) -> object:
    return NameNotStr()


def without_now(knobs: PolicyKnobs) -> object:
    return ScheduleWithoutNow()


def ep(name: str, attr: str, module: str = HERE) -> EntryPoint:
    return EntryPoint(name=name, value=f"{module}:{attr}", group=PLUGIN_GROUP)


def views() -> tuple[list[PendingTurn], list[NodeView], list[NodeView]]:
    queue = [PendingTurn("t0", 0, 100, 64, 5), PendingTurn("t1", 1, 100, 0, 5)]
    prefill = [NodeView("prefill-0", 0, (EngineView("prefill-0", 0, 0, 0),))]
    decode = [NodeView("decode-0", 0, (EngineView("decode-0", 0, 0, 0, 10**6),))]
    return queue, prefill, decode


def policies_verb(*argv: str) -> int:
    """`dualpath policies ARGV` through the real parser (lab.cli.main also owns signals)."""
    args = build_parser().parse_args(["policies", *argv])
    status: int = args.func(args)
    return status


def fake_group(monkeypatch: pytest.MonkeyPatch, *eps: EntryPoint) -> None:
    def entry_points(*, group: str) -> tuple[EntryPoint, ...]:
        return eps if group == PLUGIN_GROUP else ()

    monkeypatch.setattr(scheduler.plugins, "entry_points", entry_points)


def test_a_plugin_is_found_by_name_built_and_its_plans_carried_out() -> None:
    plugins = InstalledPolicies([ep("first", "good_factory")])
    assert list(plugins) == ["first"] and len(plugins) == 1 and "first" in plugins
    assert policy_name("dualpath", "first", plugins) == "first"
    policy = make_policy("first", KNOBS, plugins)
    assert isinstance(policy, CheckedPolicy) and isinstance(policy.inner, FirstEngines)
    assert policy.name == "first_engines"
    queue, prefill, decode = views()
    plan = policy.schedule(queue, prefill, decode, now=0.0)
    assert plan.assigned_ids == {"t0", "t1"}


def test_unknown_names_list_the_built_in_and_the_plugin_names() -> None:
    plugins = InstalledPolicies([ep("first", "good_factory"), ep("second", "good_factory")])
    with pytest.raises(UnknownPolicyError) as exc:
        make_policy("fastest", KNOBS, plugins)
    assert "valid: basic, dualpath, dualpath_split, least_tokens, oracle, round_robin;" in str(
        exc.value
    )
    assert str(exc.value).endswith("plugins (dualpath.policies): first, second")
    with pytest.raises(UnknownPolicyError, match=r"least_tokens, round_robin; .*: first, second"):
        policy_name("dualpath", "fastest", plugins)
    with pytest.raises(UnknownPolicyError, match=r"plugins \(dualpath\.policies\): none installed"):
        policy_name("dualpath", "fastest")


def test_a_built_in_name_wins_and_the_plugin_is_never_loaded() -> None:
    # the value names no module: loading it would fail, so a built-in policy proves it unused
    plugins = InstalledPolicies([ep("dualpath", "f", module="no_such_module_for_dualpath")])
    assert "dualpath" not in plugins and list(plugins) == []
    assert isinstance(make_policy("dualpath", KNOBS, plugins), DualPathPolicy)
    (shadowed,) = [e for e in catalogue(plugins) if e.origin != "built-in"]
    assert shadowed.name == "dualpath" and "shadowed by the built-in" in shadowed.error
    # and a built-in that is not a selector stays out of the dualpath system's selectors
    with pytest.raises(UnknownPolicyError):
        policy_name("dualpath", "basic", InstalledPolicies([ep("basic", "good_factory")]))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (ep("gone", "f", module="no_such_module_for_tests"), "cannot be loaded: ModuleNotFound"),
        (ep("missing", "no_such_attribute"), "cannot be loaded: AttributeError"),
        (ep("constant", "NOT_CALLABLE"), "int is not callable"),
        (ep("raises", "raising_factory"), "its factory raised RuntimeError: no GPUs today"),
        (ep("no_schedule", "no_schedule"), "NoSchedule, which has no `schedule("),
        (ep("name_not_str", "name_not_str"), "whose `name` is 7, not a non-empty str"),
        (ep("without_now", "without_now"), "ScheduleWithoutNow, which has no `schedule("),
    ],
    ids=lambda x: x.name if isinstance(x, EntryPoint) else "",
)
def test_a_plugin_that_cannot_be_used_is_named_with_its_value(
    entry: EntryPoint, problem: str
) -> None:
    plugins = InstalledPolicies([entry])
    with pytest.raises(PolicyPluginError) as exc:
        make_policy(entry.name, KNOBS, plugins)
    message = str(exc.value)
    assert f"policy plugin {entry.name!r} ({entry.value}, from an unknown distribution)" in message
    assert problem in message
    assert exc.value.exit_status == 2  # a UsageError: choose another policy or fix the plugin
    (listed,) = [e for e in catalogue(plugins) if e.name == entry.name]
    assert listed.error == message and listed.value == entry.value


def test_two_plugins_of_one_name_are_an_error_naming_both() -> None:
    plugins = InstalledPolicies([ep("twin", "good_factory"), ep("twin", "raising_factory")])
    assert list(plugins) == ["twin"] and len(plugins) == 1
    with pytest.raises(PolicyPluginError, match="'twin' is registered more than once") as exc:
        make_policy("twin", KNOBS, plugins)
    assert f"{HERE}:good_factory" in str(exc.value)
    assert f"{HERE}:raising_factory" in str(exc.value)


def _bad_plans() -> list[tuple[object, str]]:
    def a(turn: str = "t0", pe: int = 0, de: int = 0, side: ReadSide = ReadSide.PREFILL) -> Any:
        return Assignment(turn, "prefill-0", pe, "decode-0", de, side)

    return [
        ([a()], "returned list, not a SchedulePlan"),
        (SchedulePlan((a("t9"),)), "turn 't9' is not in the queue"),
        (SchedulePlan((a(), a())), "turn 't0' is assigned twice"),
        (SchedulePlan((a(pe=3),)), "prefill engine prefill-0/3 is not in the view"),
        (SchedulePlan((a(de=1),)), "decode engine decode-0/1 is not in the view"),
        (SchedulePlan((a(side=ReadSide.NONE),)), "turn 't0' has hit tokens but read side 'none'"),
        (SchedulePlan(("t0",)), "str is not an Assignment"),  # type: ignore[arg-type]
    ]


def test_an_exception_out_of_schedule_names_the_plugin() -> None:
    failing = FirstEngines(plan_override=KeyError("decode-7"))
    policy = CheckedPolicy(failing, "policy plugin 'p' (m:f, from d 1)")
    queue, prefill, decode = views()
    with pytest.raises(PolicyPluginError) as exc:
        policy.schedule(queue, prefill, decode, now=0.0)
    assert (
        str(exc.value)
        == "policy plugin 'p' (m:f, from d 1): schedule() raised KeyError: 'decode-7'"
    )
    assert isinstance(exc.value.__cause__, KeyError)


@pytest.mark.parametrize(("plan", "problem"), _bad_plans())
def test_a_plan_the_scheduler_cannot_keep_is_an_error_naming_the_plugin(
    plan: object, problem: str
) -> None:
    policy = CheckedPolicy(FirstEngines(plan_override=plan), "policy plugin 'p' (m:f, from d 1)")
    queue, prefill, decode = views()
    with pytest.raises(PolicyPluginError) as exc:
        policy.schedule(queue, prefill, decode, now=0.0)
    assert str(exc.value).startswith("policy plugin 'p' (m:f, from d 1): schedule() returned")
    assert problem in str(exc.value)


def test_read_side_none_is_fine_for_a_turn_without_hits() -> None:
    queue, prefill, decode = views()
    plan = SchedulePlan((Assignment("t1", "prefill-0", 0, "decode-0", 0, ReadSide.NONE),))
    policy = CheckedPolicy(FirstEngines(plan_override=plan), "p")
    assert policy.schedule(queue, prefill, decode, now=0.0) is plan


def test_the_config_accepts_a_plugin_selector_and_lists_both_kinds_for_an_unknown_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_group(monkeypatch, ep("first", "good_factory"), ep("broken", "NOT_CALLABLE"))
    cfg = parse_config({"scheduling": {"selector": "first"}})
    assert cfg.scheduling.selector == "first"
    with pytest.raises(ConfigError) as exc:
        parse_config({"scheduling": {"selector": "fastest"}})
    assert (
        "scheduling.selector: unknown selector 'fastest'; valid: dualpath, least_tokens,"
        " round_robin; plugins (dualpath.policies): broken, first"
    ) in str(exc.value)
    # the spec carries the name to the scheduler, which builds the plugin's policy
    spec = build_cluster_spec(cfg, lab_id="u", backend="netns", data_dir=Path("/nonexistent"))
    policy = policy_for(spec, InstalledPolicies())
    assert isinstance(policy, CheckedPolicy) and policy.name == "first_engines"
    # a plugin is a selector of the dualpath system: under basic the plugin is not consulted
    basic = build_cluster_spec(
        parse_config({"policy": "basic", "scheduling": {"selector": "broken"}}),
        lab_id="u",
        backend="netns",
        data_dir=Path("/nonexistent"),
    )
    assert policy_for(basic, InstalledPolicies()).name == "least_tokens"


def test_dualpath_policies_lists_plugins_and_fails_on_a_broken_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_group(monkeypatch, ep("first", "good_factory"))
    assert policies_verb("--json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["first"] == {
        "name": "first",
        "origin": "an unknown distribution",
        "description": "First engines: every turn on engine 0 of the first nodes.",
        "entry_point": f"{HERE}:good_factory",
        "config": "policy: dualpath, scheduling.selector: first",
        "error": "",
    }
    assert rows["basic"]["origin"] == "built-in" and rows["basic"]["config"] == "policy: basic"
    assert {r["origin"] for r in rows.values()} == {"built-in", "an unknown distribution"}

    fake_group(monkeypatch, ep("first", "good_factory"), ep("raises", "raising_factory"))
    assert policies_verb() == 1  # listed, with why, and the status says so
    out = capsys.readouterr().out
    assert "First engines: every turn on engine 0 of the first nodes." in out
    assert "error: policy plugin 'raises'" in out and "no GPUs today" in out


def test_a_plugin_that_cannot_be_built_stops_the_run_before_bring_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_group(monkeypatch, ep("raises", "raising_factory"))
    monkeypatch.setenv("DUALPATH_DATA_DIR", str(tmp_path))
    cfg = parse_config({"scheduling": {"selector": "raises"}})  # the name is known
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PolicyPluginError, match=r"'raises' .*: its factory raised RuntimeError"):
        prepare(cfg, backend="local", out_dir=out)
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []  # nothing left


def test_the_compose_backend_refuses_a_plugin_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_group(monkeypatch, ep("first", "good_factory"))
    config = tmp_path / "lab.yaml"
    config.write_text("scheduling:\n  selector: first\n")
    argv = ["run", "-c", str(config), "--backend", "compose", "--out", str(tmp_path / "out")]
    args = build_parser().parse_args(argv)
    with pytest.raises(UsageError, match="'first' is a policy plugin, and the compose image"):
        args.func(args)
    assert not (tmp_path / "out").exists()

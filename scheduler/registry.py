"""The one registry of scheduling policies: name -> factory, used by the scheduler service
and by the tests alike. Pure: builds policies, never schedules.

Names (docs/design.md, "Policies"): `basic` (the paper's Basic: least tokens, reads on the
prefill side), `oracle` (least tokens, no reads), `dualpath` (§6: Algorithm 1, two-level DE
selection, shorter-queue read side; `split_reads` splits them), `dualpath_split` (the same,
always split), and the baselines of the `dualpath` system: `round_robin` and `least_tokens`
(shorter-queue read side; round robin may rotate it instead: `baseline_read_side`).

Policies of other distributions (docs/design.md, "Policy plugins") come in as the `plugins`
mapping of `make_policy` and `policy_name` (scheduler.plugins finds them); a built-in name
always wins over a plugin of the same name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from dualpath.errors import UsageError
from scheduler.dualpath_policy import (
    DualPathPolicy,
    LeastTokensBaseline,
    ReadRule,
    RoundRobinPolicy,
)
from scheduler.policies import SchedulingPolicy

BaselineReadSide = Literal["shorter_queue", "alternate"]


@dataclass(frozen=True, slots=True)
class PolicyKnobs:
    """The configuration a policy may take; each factory uses the knobs its policy has."""

    beta_tokens: int
    alpha_tokens: int = 0
    block_tokens: int = 64
    snic_tokens_per_s: float = 1.0
    split_reads: bool = False
    """`dualpath` only: split each turn's hit blocks between both sides."""
    baseline_read_side: BaselineReadSide = "shorter_queue"
    """`round_robin` only: `alternate` rotates the read side as well."""


PLUGIN_GROUP = "dualpath.policies"
"""The entry-point group of policy plugins (docs/design.md, "Policy plugins")."""


class UnknownPolicyError(UsageError, ValueError):
    """A policy name the registry does not know; the message lists the valid names: the
    built-in ones, then those of the installed plugins."""

    def __init__(
        self,
        name: str,
        *,
        kind: str = "policy",
        valid: Iterable[str] = (),
        plugins: Iterable[str] = (),
    ) -> None:
        names = ", ".join(sorted(valid or POLICIES))
        extra = ", ".join(sorted(set(plugins))) or "none installed"
        super().__init__(
            f"unknown {kind} {name!r}; valid: {names}; plugins ({PLUGIN_GROUP}): {extra}"
        )


PolicyFactory = Callable[[PolicyKnobs], SchedulingPolicy]


def _dualpath(knobs: PolicyKnobs, *, split_reads: bool | None = None) -> SchedulingPolicy:
    return DualPathPolicy(
        alpha_tokens=knobs.alpha_tokens,
        beta_tokens=knobs.beta_tokens,
        split_reads=knobs.split_reads if split_reads is None else split_reads,
        block_tokens=knobs.block_tokens,
        snic_tokens_per_s=knobs.snic_tokens_per_s,
    )


def _least_tokens(rule: ReadRule, knobs: PolicyKnobs) -> SchedulingPolicy:
    return LeastTokensBaseline(beta_tokens=knobs.beta_tokens, read_rule=rule)


def _round_robin(knobs: PolicyKnobs) -> SchedulingPolicy:
    rule: ReadRule = "alternate" if knobs.baseline_read_side == "alternate" else "shorter_queue"
    return RoundRobinPolicy(beta_tokens=knobs.beta_tokens, read_rule=rule)


POLICIES: Mapping[str, PolicyFactory] = MappingProxyType(
    {
        "basic": functools.partial(_least_tokens, "prefill"),
        "oracle": functools.partial(_least_tokens, "none"),
        "dualpath": _dualpath,
        "dualpath_split": functools.partial(_dualpath, split_reads=True),
        "round_robin": _round_robin,
        "least_tokens": functools.partial(_least_tokens, "shorter_queue"),
    }
)
"""Every policy by name."""

DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "basic": "the paper's Basic: least tokens, every read on the prefill side",
        "oracle": "least tokens and no storage reads: the upper bound",
        "dualpath": "the paper's scheduler: Algorithm 1, two-level DE selection, shorter-queue"
        " read side",
        "dualpath_split": "dualpath with each turn's hit-KV read split across both sides",
        "round_robin": "baseline: engines in turn, shorter-queue (or alternating) read side",
        "least_tokens": "baseline: least-tokens engines, shorter-queue read side",
    }
)
"""One line per built-in policy, as `dualpath policies` lists them."""

NO_PLUGINS: Mapping[str, PolicyFactory] = MappingProxyType({})
"""The `plugins` of a caller that takes the built-in policies only (unit tests, benches)."""

SELECTORS = ("dualpath", "round_robin", "least_tokens")
"""The engine selectors of the `dualpath` system (`scheduling.selector`): registry names."""


def make_policy(
    name: str, knobs: PolicyKnobs, plugins: Mapping[str, PolicyFactory] = NO_PLUGINS
) -> SchedulingPolicy:
    """The policy called `name`: a built-in one, else the plugin of that name (looking it up
    in `plugins` loads it); unknown names raise UnknownPolicyError listing valid ones."""
    factory = POLICIES.get(name)
    if factory is None and name in plugins:
        factory = plugins[name]
    if factory is None:
        raise UnknownPolicyError(name, plugins=plugins)
    return factory(knobs)


def policy_name(system: str, selector: str = "dualpath", plugins: Collection[str] = ()) -> str:
    """The registry name a configuration runs: `basic` and `oracle` are policies of their
    own; the `dualpath` system runs its selector (the paper's, a baseline or a plugin's)."""
    if system != "dualpath":
        return system
    if selector not in SELECTORS and selector not in plugins:
        raise UnknownPolicyError(selector, kind="selector", valid=SELECTORS, plugins=plugins)
    return selector

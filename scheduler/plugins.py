"""Scheduling policies of other distributions: the entry points of group `dualpath.policies`
(docs/design.md, "Policy plugins").

Each entry point names a factory, `Callable[[PolicyKnobs], SchedulingPolicy]`, as
`module:attr`. `InstalledPolicies` is the mapping `scheduler.registry.make_policy` and
`policy_name` take: iterating it reads the installed packages' metadata only, looking a name up
imports that plugin, and every policy a plugin's factory builds is checked against the
interface the scheduler service calls (`name`, `schedule`), as is every plan it returns.
A plugin that cannot be used raises `PolicyPluginError` naming the entry point and its value.

The one module of `scheduler/` that touches the file system (importlib.metadata reads
`*.dist-info`, a lookup imports the plugin's module); it schedules nothing and loads no event
loop or socket code of its own. A built-in name always wins: a plugin of the same name is
never loaded, and `catalogue()` lists it as shadowed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from dualpath.errors import UsageError
from scheduler.policies import SchedulingPolicy
from scheduler.registry import (
    DESCRIPTIONS,
    PLUGIN_GROUP,
    POLICIES,
    PolicyFactory,
    PolicyKnobs,
)
from scheduler.views import Assignment, NodeView, PendingTurn, ReadSide, SchedulePlan

PROBE_KNOBS = PolicyKnobs(alpha_tokens=100_000, beta_tokens=100_000)
"""The knobs `catalogue()` builds each plugin's policy with, to check that it can be built."""


class PolicyPluginError(UsageError):
    """A policy plugin that cannot be used (it does not import, is not callable, its factory
    raises, or what it builds or plans does not fit the interface); the message names the
    entry point and its `module:attr` value."""


def describe_entry(ep: EntryPoint) -> str:
    """`name (module:attr, from distribution version)`: how errors name a plugin."""
    return f"policy plugin {ep.name!r} ({ep.value}, from {origin(ep)})"


def origin(ep: EntryPoint) -> str:
    """The distribution and version that registered `ep`."""
    dist = ep.dist
    if dist is None:
        return "an unknown distribution"
    return f"{dist.name} {dist.version}"


def first_line(doc: str | None) -> str:
    """A docstring's first line, or a note that there is none."""
    lines = inspect.cleandoc(doc or "").splitlines()
    return lines[0].strip() if lines and lines[0].strip() else "(no docstring)"


def _schedule_accepts_the_call(schedule: Callable[..., object]) -> bool:
    """Whether `schedule(queue, prefill, decode, now=...)`, the scheduler's call, binds."""
    try:
        sig = inspect.signature(schedule)
    except (TypeError, ValueError):  # no signature to read (a C callable): trust it
        return True
    try:
        sig.bind((), (), (), now=0.0)
    except TypeError:
        return False
    return True


def check_policy(policy: object, who: str) -> SchedulingPolicy:
    """`policy` as a SchedulingPolicy, or PolicyPluginError saying what it lacks: a `name`
    that is a str, and a `schedule` that takes `(queue, prefill, decode, *, now)`."""
    try:
        name = getattr(policy, "name", None)
    except Exception as exc:
        raise PolicyPluginError(
            f"{who}: reading its policy's `name` raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(name, str) or not name:
        raise PolicyPluginError(
            f"{who}: its factory returned {type(policy).__name__}, whose `name` is"
            f" {name!r}, not a non-empty str (the SchedulingPolicy protocol, scheduler/policies.py)"
        )
    schedule = getattr(policy, "schedule", None)
    if not callable(schedule) or not _schedule_accepts_the_call(schedule):
        raise PolicyPluginError(
            f"{who}: its factory returned {type(policy).__name__}, which has no"
            " `schedule(queue, prefill, decode, *, now)` (the SchedulingPolicy protocol,"
            " scheduler/policies.py)"
        )
    return CheckedPolicy(policy, who)


def check_plan(
    plan: object,
    queue: Sequence[PendingTurn],
    prefill: Sequence[NodeView],
    decode: Sequence[NodeView],
    who: str,
) -> SchedulePlan:
    """`plan` if it is a SchedulePlan the scheduler can carry out: each assignment places a
    queued turn, once, on engines of the views, with a read side that reads its hits."""
    if not isinstance(plan, SchedulePlan):
        raise PolicyPluginError(
            f"{who}: schedule() returned {type(plan).__name__}, not a SchedulePlan"
        )
    turns = {t.turn_id: t for t in queue}
    pe = {(n.node_id, e.engine) for n in prefill for e in n.engines}
    de = {(n.node_id, e.engine) for n in decode for e in n.engines}
    seen: set[str] = set()
    for a in plan.assignments:
        problem = None
        if not isinstance(a, Assignment):
            problem = f"{type(a).__name__} is not an Assignment"
        elif a.turn_id not in turns:
            problem = f"turn {a.turn_id!r} is not in the queue"
        elif a.turn_id in seen:
            problem = f"turn {a.turn_id!r} is assigned twice"
        elif (a.prefill_node, a.prefill_engine) not in pe:
            problem = f"prefill engine {a.prefill_node}/{a.prefill_engine} is not in the view"
        elif (a.decode_node, a.decode_engine) not in de:
            problem = f"decode engine {a.decode_node}/{a.decode_engine} is not in the view"
        elif not isinstance(a.read_side, ReadSide):
            problem = f"read side {a.read_side!r} is not a ReadSide"
        elif a.read_side is ReadSide.NONE and turns[a.turn_id].hit_tokens > 0:
            problem = f"turn {a.turn_id!r} has hit tokens but read side 'none'"
        if problem is not None:
            raise PolicyPluginError(f"{who}: schedule() returned a plan it cannot keep: {problem}")
        seen.add(a.turn_id)
    return plan


class CheckedPolicy:
    """A plugin's policy, whose every plan is checked (`check_plan`) before the scheduler
    carries it out: a wrong plan, or an exception out of `schedule`, is an error naming the
    plugin, not a broken turn table."""

    def __init__(self, policy: object, who: str) -> None:
        self.inner: Any = policy
        self.who = who
        self._name = str(getattr(policy, "name", ""))

    @property
    def name(self) -> str:
        return self._name

    def schedule(
        self,
        queue: Sequence[PendingTurn],
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        now: float,
    ) -> SchedulePlan:
        try:
            plan = self.inner.schedule(queue, prefill, decode, now=now)
        except Exception as exc:
            raise PolicyPluginError(
                f"{self.who}: schedule() raised {type(exc).__name__}: {exc}"
            ) from exc
        return check_plan(plan, queue, prefill, decode, self.who)


def load_factory(ep: EntryPoint) -> PolicyFactory:
    """The factory `ep` names, wrapped so that what it builds is checked; PolicyPluginError
    when it does not import or is not callable."""
    who = describe_entry(ep)
    try:
        factory = ep.load()
    except Exception as exc:
        raise PolicyPluginError(f"{who}: cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not callable(factory):
        raise PolicyPluginError(
            f"{who}: {type(factory).__name__} is not callable; the entry point must name a"
            " factory Callable[[PolicyKnobs], SchedulingPolicy]"
        )

    def build(knobs: PolicyKnobs) -> SchedulingPolicy:
        try:
            policy = factory(knobs)
        except Exception as exc:
            raise PolicyPluginError(
                f"{who}: its factory raised {type(exc).__name__}: {exc}"
            ) from exc
        return check_policy(policy, who)

    build.__doc__ = factory.__doc__
    return build


def _group() -> tuple[EntryPoint, ...]:
    return tuple(sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: (ep.name, ep.value)))


class InstalledPolicies(Mapping[str, PolicyFactory]):
    """The plugin policies by name, built-in names left out. Listing reads metadata only; a
    lookup loads that one plugin (`load_factory`). Two plugins of one name are an error when
    that name is looked up, never a silent choice."""

    def __init__(self, eps: Iterable[EntryPoint] | None = None) -> None:
        found = _group() if eps is None else tuple(eps)
        self.shadowed = tuple(ep for ep in found if ep.name in POLICIES)
        self.entries = tuple(ep for ep in found if ep.name not in POLICIES)

    def entries_named(self, name: str) -> tuple[EntryPoint, ...]:
        return tuple(ep for ep in self.entries if ep.name == name)

    def __getitem__(self, name: str) -> PolicyFactory:
        eps = self.entries_named(name)
        if not eps:
            raise KeyError(name)
        if len(eps) > 1:
            raise PolicyPluginError(
                f"policy plugin {name!r} is registered more than once: "
                + "; ".join(f"{ep.value} from {origin(ep)}" for ep in eps)
            )
        return load_factory(eps[0])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({ep.name for ep in self.entries}))

    def __len__(self) -> int:
        return len({ep.name for ep in self.entries})

    def __contains__(self, name: object) -> bool:
        return any(ep.name == name for ep in self.entries)


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One line of `dualpath policies`."""

    name: str
    origin: str
    """`built-in`, or the plugin's distribution and version."""
    description: str
    value: str = ""
    """A plugin's `module:attr`."""
    error: str = ""
    """Why a plugin cannot be used ("" when it can)."""


def catalogue(installed: InstalledPolicies | None = None) -> tuple[PolicyEntry, ...]:
    """Every policy there is: the built-in ones, then each plugin, loaded and built once with
    PROBE_KNOBS so that a broken one shows its error; shadowed plugins say so."""
    plugins = InstalledPolicies() if installed is None else installed
    out = [PolicyEntry(name, "built-in", DESCRIPTIONS[name]) for name in POLICIES]
    for ep in plugins.entries:
        description, error = "", ""
        try:
            factory = plugins[ep.name]
            description = first_line(factory.__doc__)
            factory(PROBE_KNOBS)
        except PolicyPluginError as exc:
            error = str(exc)
        out.append(PolicyEntry(ep.name, origin(ep), description, ep.value, error))
    for ep in plugins.shadowed:
        error = f"shadowed by the built-in policy {ep.name!r}: never loaded"
        out.append(PolicyEntry(ep.name, origin(ep), "", ep.value, error))
    return tuple(out)

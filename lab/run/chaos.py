"""Chaos scenarios: a YAML timeline of link changes and node actions, compiled to a flat plan.

A scenario names nodes and NICs of one lab config; `compile_scenario` validates it against the
cluster and expands ramps, flaps, loss bursts and repeats into a time-sorted tuple of primitive
steps (`LinkStep`, `NodeStep`) that the runner executes while the workload runs. Pure: data in,
frozen plan out; no clocks, no I/O. Errors name the path of the bad value
(`events[2].set.rate: ...`) and the allowed forms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dualpath.errors import UsageError
from lab.config.models import LabConfig, read_yaml

NodeAction = Literal["stop", "cont", "kill", "restart"]
NODE_ACTIONS: tuple[NodeAction, ...] = ("stop", "cont", "kill", "restart")
NICS = ("cnic", "snic")
MAX_EVENTS = 10_000
"""Primitive steps a scenario may expand to (a typo in `times` must not hang the runner)."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|kbit|mbit|gbit)\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


class ScenarioError(UsageError, ValueError):
    """A scenario is invalid; the message names the path of the bad value."""


@dataclass(frozen=True, slots=True)
class LinkStep:
    """Change one NIC at `at_s` seconds after the workload starts (NetnsLab.set_link keys)."""

    at_s: float
    node: str
    nic: str
    changes: Mapping[str, float | bool] = field(hash=False)
    source: str = ""
    """The scenario event it came from, e.g. 'events[3] (flap)'."""


@dataclass(frozen=True, slots=True)
class NodeStep:
    """stop (SIGSTOP), cont (SIGCONT), kill (SIGKILL) or restart a node's process."""

    at_s: float
    node: str
    action: NodeAction
    source: str = ""


Step = LinkStep | NodeStep


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class ClusterLinks:
    """What a scenario may refer to: engine nodes and their configured NIC rates (Mbit/s)."""

    rates_mbit: Mapping[str, Mapping[str, float]]
    """node id -> nic -> configured emulated rate."""
    other_nodes: frozenset[str] = frozenset()
    """Nodes without shaped NICs (storage servers): node actions only."""


# -- value parsing ------------------------------------------------------------------------------


def parse_duration(value: Any, where: str) -> float:
    """Seconds from `30s`, `500ms`, `2m` or a plain number of seconds (>= 0)."""
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: {value!r} is not a duration (use 30s, 500ms or 2m)")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        unit = m.group(2) or "s"
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
    else:
        raise ScenarioError(f"{where}: {value!r} is not a duration (use 30s, 500ms or 2m)")
    if not math.isfinite(seconds) or seconds < 0:
        raise ScenarioError(f"{where}: {value!r} must be a finite duration >= 0")
    return seconds


def parse_rate(value: Any, configured_mbit: float, where: str) -> float:
    """Mbit/s from `50%` (of the configured rate), `40mbit`, `800kbit`, `1gbit` or a number of
    Mbit/s; must be > 0 (a link that carries nothing is `up: false`)."""
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: {value!r} is not a rate (use 50%, 40mbit or 1gbit)")
    if isinstance(value, int | float):
        mbit = float(value)
    elif isinstance(value, str) and (m := _RATE.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit == "%":
            mbit = configured_mbit * number / 100.0
        else:
            mbit = number * {"kbit": 0.001, "mbit": 1.0, "gbit": 1000.0}[unit]
    else:
        raise ScenarioError(f"{where}: {value!r} is not a rate (use 50%, 40mbit or 1gbit)")
    if not math.isfinite(mbit) or mbit <= 0:
        raise ScenarioError(f"{where}: {value!r} must be a rate > 0 (use up: false for no link)")
    return mbit


def parse_percent(value: Any, where: str) -> float:
    """Percent (0-100) from `5%` or a fraction 0-1 given as a number."""
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: {value!r} is not a percentage (use 5% or 0.05)")
    if isinstance(value, int | float):
        pct = float(value) * 100.0
    elif isinstance(value, str) and (m := _PERCENT.match(value)):
        pct = float(m.group(1))
    else:
        raise ScenarioError(f"{where}: {value!r} is not a percentage (use 5% or 0.05)")
    if not math.isfinite(pct) or not 0 <= pct <= 100:
        raise ScenarioError(f"{where}: {value!r} must be between 0% and 100%")
    return pct


# -- compiling ------------------------------------------------------------------------------------

_SET_KEYS = ("rate", "loss", "delay", "jitter", "up")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: must be a mapping, got {type(value).__name__}")
    return value


def _only(m: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    extra = sorted(set(m) - set(allowed))
    if extra:
        raise ScenarioError(f"{where}.{extra[0]}: unknown key; allowed: {', '.join(allowed)}")


def _int(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ScenarioError(f"{where}: {value!r} must be an integer >= {low}")
    return value


class _Compiler:
    def __init__(self, links: ClusterLinks) -> None:
        self.links = links
        self.steps: list[Step] = []

    def _emit(self, step: Step) -> None:
        if len(self.steps) >= MAX_EVENTS:
            raise ScenarioError(f"the scenario expands to more than {MAX_EVENTS} steps")
        self.steps.append(step)

    def _nic(self, m: Mapping[str, Any], where: str) -> tuple[str, str, float]:
        node, nic = m.get("node"), m.get("nic")
        if node not in self.links.rates_mbit:
            valid = ", ".join(sorted(self.links.rates_mbit))
            raise ScenarioError(f"{where}.node: {node!r} is not an engine node ({valid})")
        if nic not in self.links.rates_mbit[str(node)]:
            raise ScenarioError(f"{where}.nic: {nic!r} is invalid ({' or '.join(NICS)})")
        return str(node), str(nic), float(self.links.rates_mbit[str(node)][str(nic)])

    def _changes(self, m: Mapping[str, Any], rate_mbit: float, where: str) -> dict[str, Any]:
        out: dict[str, float | bool] = {}
        if "rate" in m:
            out["rate_mbit"] = parse_rate(m["rate"], rate_mbit, f"{where}.rate")
        if "loss" in m:
            out["loss_pct"] = parse_percent(m["loss"], f"{where}.loss")
        if "delay" in m:
            out["delay_ms"] = parse_duration(m["delay"], f"{where}.delay") * 1000.0
        if "jitter" in m:
            out["jitter_ms"] = parse_duration(m["jitter"], f"{where}.jitter") * 1000.0
        if "up" in m:
            if not isinstance(m["up"], bool):
                raise ScenarioError(f"{where}.up: {m['up']!r} must be true or false")
            out["up"] = m["up"]
        if not out:
            raise ScenarioError(f"{where}: nothing to change; give one of {', '.join(_SET_KEYS)}")
        return out

    def event(self, ev: Any, offset: float, where: str) -> None:
        ev = _mapping(ev, where)
        kinds = [k for k in ("set", "loss_burst", "flap", "ramp", "node", "repeat") if k in ev]
        if len(kinds) != 1:
            raise ScenarioError(
                f"{where}: needs exactly one of set, loss_burst, flap, ramp, node, repeat"
            )
        kind = kinds[0]
        _only(ev, ("at", kind), where)
        at = offset + parse_duration(ev.get("at", 0), f"{where}.at")
        body = ev[kind]
        src = f"{where} ({kind})"
        w = f"{where}.{kind}"
        if kind == "repeat":
            self._repeat(_mapping(body, w), at, w)
            return
        body = _mapping(body, w)
        if kind == "node":
            self._node_event(body, at, w, src)
            return
        node, nic, rate = self._nic(body, w)
        if kind == "set":
            _only(body, ("node", "nic", *_SET_KEYS), w)
            self._emit(LinkStep(at, node, nic, self._changes(body, rate, w), src))
        elif kind == "loss_burst":
            self._loss_burst(body, at, (node, nic), w, src)
        elif kind == "flap":
            self._flap(body, at, (node, nic), w, src)
        else:
            self._ramp(body, at, (node, nic, rate), w, src)

    def _node_event(self, body: dict[str, Any], at: float, w: str, src: str) -> None:
        """`node: {id, action}`: stop, cont, kill or restart a node's process."""
        _only(body, ("id", "action"), w)
        node, action = body.get("id"), body.get("action")
        known = set(self.links.rates_mbit) | self.links.other_nodes
        if node not in known:
            raise ScenarioError(f"{w}.id: {node!r} is not a node ({', '.join(sorted(known))})")
        if action not in NODE_ACTIONS:
            raise ScenarioError(f"{w}.action: {action!r} is invalid ({', '.join(NODE_ACTIONS)})")
        self._emit(NodeStep(at, str(node), action, src))

    def _loss_burst(
        self, body: dict[str, Any], at: float, link: tuple[str, str], w: str, src: str
    ) -> None:
        """`loss_burst: {loss, for}`: the loss from `at`, back to 0 after `for`."""
        node, nic = link
        _only(body, ("node", "nic", "loss", "for"), w)
        if "loss" not in body:
            raise ScenarioError(f"{w}.loss: required")
        loss = parse_percent(body["loss"], f"{w}.loss")
        length = parse_duration(body.get("for"), f"{w}.for")
        self._emit(LinkStep(at, node, nic, {"loss_pct": loss}, src))
        self._emit(LinkStep(at + length, node, nic, {"loss_pct": 0.0}, src))

    def _flap(
        self, body: dict[str, Any], at: float, link: tuple[str, str], w: str, src: str
    ) -> None:
        """`flap: {down_for, times, every}`: the link down then up again, `times` times."""
        node, nic = link
        _only(body, ("node", "nic", "down_for", "times", "every"), w)
        down = parse_duration(body.get("down_for"), f"{w}.down_for")
        times = _int(body.get("times", 1), f"{w}.times", 1)
        every = parse_duration(body.get("every", 0), f"{w}.every")
        if times > 1 and every <= down:
            raise ScenarioError(f"{w}.every: must be longer than down_for when times > 1")
        for i in range(times):
            start = at + i * every
            self._emit(LinkStep(start, node, nic, {"up": False}, src))
            self._emit(LinkStep(start + down, node, nic, {"up": True}, src))

    def _ramp(
        self, body: dict[str, Any], at: float, link: tuple[str, str, float], w: str, src: str
    ) -> None:
        """`ramp: {rate: {from, to}, over, steps}`: the rate moved in `steps` equal steps."""
        node, nic, rate = link
        _only(body, ("node", "nic", "rate", "over", "steps"), w)
        rates = _mapping(body.get("rate"), f"{w}.rate")
        _only(rates, ("from", "to"), f"{w}.rate")
        first = parse_rate(rates.get("from"), rate, f"{w}.rate.from")
        last = parse_rate(rates.get("to"), rate, f"{w}.rate.to")
        over = parse_duration(body.get("over"), f"{w}.over")
        steps = _int(body.get("steps", 5), f"{w}.steps", 1)
        for i in range(steps + 1):
            frac = i / steps
            value = first + (last - first) * frac
            self._emit(LinkStep(at + over * frac, node, nic, {"rate_mbit": value}, src))

    def _repeat(self, body: dict[str, Any], at: float, where: str) -> None:
        _only(body, ("every", "times", "events"), where)
        every = parse_duration(body.get("every"), f"{where}.every")
        times = _int(body.get("times"), f"{where}.times", 1)
        events = body.get("events")
        if not isinstance(events, list) or not events:
            raise ScenarioError(f"{where}.events: must be a non-empty list of events")
        if every <= 0 and times > 1:
            raise ScenarioError(f"{where}.every: must be > 0 when times > 1")
        for i in range(times):
            for j, ev in enumerate(events):
                self.event(ev, at + i * every, f"{where}.events[{j}]")


def compile_scenario(data: Any, links: ClusterLinks, *, source: str = "scenario") -> Scenario:
    """Validate a parsed scenario against the cluster and expand it to primitive steps."""
    try:
        top = _mapping(data, "(top level)")
        _only(top, ("name", "description", "events"), "(top level)")
        events = top.get("events")
        if not isinstance(events, list) or not events:
            raise ScenarioError("events: must be a non-empty list")
        compiler = _Compiler(links)
        for i, ev in enumerate(events):
            compiler.event(ev, 0.0, f"events[{i}]")
    except ScenarioError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    ordered = sorted(enumerate(compiler.steps), key=lambda p: (p[1].at_s, p[0]))
    return Scenario(
        name=str(top.get("name", Path(source).stem)),
        description=str(top.get("description", "")),
        steps=tuple(step for _, step in ordered),
    )


def load_scenario(path: Path, links: ClusterLinks) -> Scenario:
    return compile_scenario(read_yaml(path, "scenario", ScenarioError), links, source=str(path))


def cluster_links(cfg: LabConfig) -> ClusterLinks:
    """The engine nodes of a config with their emulated cnic/snic rates, and its other nodes."""
    c = cfg.cluster
    rates = {"cnic": cfg.cnic_rate_mbit, "snic": cfg.snic_rate_mbit}
    storage = frozenset(c.storage_ids())
    return ClusterLinks({n: dict(rates) for n in c.engine_ids()}, storage)

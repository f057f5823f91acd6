"""What the pytest plugin's fixtures do, without pytest: load a config with overrides, choose
a backend, hold a lab up and change its links, run a workload.

Nothing here brings a lab up by itself: `Lab` uses the bring-up of `dualpath up`/`run`
(lab.run.bringup `prepare` and `held`), its link and node changes go through the lab's control
endpoint (lab.run.control, the path of `dualpath link set` and `dualpath node`), and its run is
the runner's (lab.run.runner `run_held`); `run` is `dualpath run` (`run_once`). A config goes
through `load_config`/`parse_config` untouched apart from the overrides, so every workload the
config models know (generated trajectories, a trajectories file, a request trace) runs the same
way.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any

from dualpath.errors import DualPathError, UsageError
from lab.config.models import LabConfig, load_config, parse_config
from lab.run.bringup import HeldLab, check_backend, held, prepare
from lab.run.chaos import cluster_links, load_scenario
from lab.run.runner import RunResult, resolve_scaling, run_held, run_once
from netem.kernel import require_net_admin
from services.spec import ClusterSpec

Say = Callable[[str], None]
ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | LabConfig
"""A config: a YAML file, its content as a mapping, or a loaded config."""

BACKEND_CHOICES = ("auto", "netns", "local")
"""`--dualpath-backend`: auto is netns where this process may use it, local otherwise."""


class LabFixtureError(UsageError):
    """A fixture was asked for something it cannot do; the message names the argument."""


class LabChangeError(DualPathError):
    """The lab refused a link or node change (the backend or kernel could not make it)."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- configs ---------------------------------------------------------------------------------
def nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides keyed by dotted paths (`workload.seed`) or already nested, as one nested
    mapping; a value may be a mapping itself (`{"workload.trace": {"file": ...}}`). A path that
    runs through a value already given is refused."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(p.isidentifier() for p in parts):
            raise LabFixtureError(f"override {key!r}: expected a dotted key such as workload.seed")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise LabFixtureError(f"override {key!r}: {where} is already set to a value")
            node = child
        leaf = parts[-1]
        if isinstance(value, Mapping):
            value = nested(value)
            if isinstance(node.get(leaf), dict):
                value = merged(node[leaf], value)
        elif leaf in node and isinstance(node[leaf], dict):
            raise LabFixtureError(f"override {key!r}: replaces overrides given under it")
        node[leaf] = value
    return out


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, mapping into mapping; anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = merged(old, value)
        else:
            out[key] = value
    return out


def config_overrides(
    *,
    policy: str | None = None,
    agents: int | None = None,
    turns: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fixtures' shorthands (policy, agents: workload.num_agents, turns:
    workload.max_turns_per_agent) and `overrides`, as one nested mapping; a shorthand wins
    over the same field in `overrides`."""
    out = nested(overrides or {})
    short: dict[str, Any] = {}
    if policy is not None:
        short["policy"] = policy
    if agents is not None:
        short["workload.num_agents"] = agents
    if turns is not None:
        short["workload.max_turns_per_agent"] = turns
    return merged(out, nested(short))


def load(
    source: ConfigSource,
    *,
    policy: str | None = None,
    agents: int | None = None,
    turns: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LabConfig:
    """A config from a YAML file (as `dualpath run -c FILE --set ...` loads it), a mapping or a
    loaded config, with the overrides applied and the whole checked (ConfigError names the
    field)."""
    changes = config_overrides(policy=policy, agents=agents, turns=turns, overrides=overrides)
    if isinstance(source, LabConfig):
        if not changes:
            return source
        return parse_config(merged(source.model_dump(mode="json"), changes), source=source.name)
    if isinstance(source, Mapping):
        return parse_config(merged(source, changes), source="config")
    return load_config(Path(source), changes)


# --- backends --------------------------------------------------------------------------------
def netns_refusal() -> str | None:
    """Why this process cannot use the netns backend (no CAP_NET_ADMIN/CAP_SYS_ADMIN, no
    `ip`), or None when it can."""
    try:
        require_net_admin()
    except DualPathError as exc:
        return str(exc)
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (make system-deps)"
    return None


def choose_backend(requested: str, refusal: Callable[[], str | None] = netns_refusal) -> str:
    """The backend for `--dualpath-backend REQUESTED`: netns or local as asked; auto is netns
    when `refusal()` finds nothing against it, local otherwise. Asking for netns where it
    cannot work is LabFixtureError with the reason."""
    if requested not in BACKEND_CHOICES:
        raise LabFixtureError(
            f"--dualpath-backend {requested!r}: expected one of {', '.join(BACKEND_CHOICES)}"
        )
    if requested == "local":
        return "local"
    why = refusal()
    if why is None:
        return "netns"
    if requested == "netns":
        raise LabFixtureError(f"--dualpath-backend netns: {why}")
    return "local"


def run_dir_name(cfg: LabConfig, taken: set[str]) -> str:
    """A directory name for one lab or run of `cfg` (`<name>-<policy>`, then `-2`, `-3`, ...)
    not in `taken`, which it joins."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.name}-{cfg.policy.value}")
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


# --- labs and runs ---------------------------------------------------------------------------
@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a cancelled CI job, `timeout`) raised as KeyboardInterrupt while the block runs,
    as the CLI does, so that the labs' teardown runs before the process ends; in the main
    thread only, the previous handler restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Lab:
    """A lab of one config held up until `close()` (or the end of a `with` block): its links
    and nodes changed through its control endpoint, its workload run once on it."""

    def __init__(
        self, cfg: LabConfig, *, backend: str, out_dir: Path, log: Say | None = None
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.out_dir = out_dir
        self.log = log or _stderr
        self.scaling: dict[str, Any] = {}
        self._stack = ExitStack()
        self._up: HeldLab | None = None
        self.result: RunResult | None = None
        """The run's result once `run()` has returned."""

    def start(self) -> Lab:
        """Bring the lab up (scaling left on auto is chosen first, as `dualpath run` does)."""
        if self._up is not None:
            raise LabFixtureError(f"lab {self.lab_id} is up already")
        check_backend(self.backend)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.scaling = resolve_scaling(self.cfg, self.log)
        prepared = prepare(self.cfg, backend=self.backend, out_dir=self.out_dir)

        def said_down(removed: list[str]) -> None:
            self.log(f"lab {prepared.lab_id} down: removed {len(removed)} objects")

        self._up = self._stack.enter_context(held(prepared, on_down=said_down))
        self.log(f"lab {prepared.lab_id} is up ({self.backend}), control {self.control_url}")
        return self

    def close(self) -> None:
        """Take the lab down: nodes, network, data directory, record (idempotent)."""
        self._up = None
        self._stack.close()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def up(self) -> HeldLab:
        if self._up is None:
            raise LabFixtureError("the lab is not up (start() it, or it was closed)")
        return self._up

    @property
    def spec(self) -> ClusterSpec:
        return self.up.prepared.spec

    @property
    def lab_id(self) -> str:
        return self.up.prepared.lab_id

    @property
    def control_url(self) -> str:
        return self.up.control.url

    @property
    def shaped(self) -> bool:
        """Whether its links are shaped (and can be changed): the netns backend."""
        return self.backend == "netns"

    @property
    def changes(self) -> list[dict[str, Any]]:
        """The link and node changes made so far, as the run's summary records them."""
        return [dict(e) for e in self.up.control.applied]

    def set_link(
        self,
        node: str,
        nic: str,
        *,
        rate: str | float | None = None,
        loss: str | float | None = None,
        delay: str | float | None = None,
        jitter: str | float | None = None,
        up: bool | None = None,
    ) -> str:
        """Change one NIC in place, as `dualpath link set NODE NIC rate=50% loss=1% ...` does
        (same syntax: rate `50%` or `20mbit`, loss `1%`, delay/jitter `10ms`); returns what
        was changed. A bad value is LabFixtureError naming it, a change the backend cannot
        make (the local backend has no shaped links) LabChangeError."""
        given = {"rate": rate, "loss": loss, "delay": delay, "jitter": jitter, "up": up}
        body = {k: v for k, v in given.items() if v is not None}
        if not body:
            raise LabFixtureError(f"set_link({node!r}, {nic!r}): nothing to change")
        return self._control(f"/v1/links/{node}/{nic}", body)

    def node(self, node: str, action: str) -> str:
        """stop, cont, kill or restart one node's process, as `dualpath node NODE ACTION`."""
        return self._control(f"/v1/nodes/{node}/{action}", {})

    def _control(self, path: str, body: dict[str, Any]) -> str:
        status, reply = self.up.control.apply(path, body)
        if status is HTTPStatus.OK:
            return str(reply["result"])
        if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.NOT_FOUND):
            raise LabFixtureError(f"{path}: {reply['error']}")
        raise LabChangeError(f"{path}: {reply['error']}")

    def run(self, *, progress: bool = False) -> RunResult:
        """Run the config's workload on this lab (once; see `lab.run.runner.run_held`); the
        changes made before it are in its summary's `control.events`, at a negative `t`."""
        self.result = run_held(self.up, scaling=self.scaling, progress=progress, log=self.log)
        return self.result


@contextmanager
def lab_factory(
    out_root: Path, backend: str, log: Say | None = None, taken: set[str] | None = None
) -> Iterator[Callable[..., Lab]]:
    """A factory of started labs (`make(config, **overrides)`, the overrides of `load`) for
    the `with` block; every lab it made is taken down on the way out, whatever happened.
    `taken`: directory names under `out_root` already used (`run_dir_name`)."""
    made: list[Lab] = []
    taken = set() if taken is None else taken

    def make(source: ConfigSource, **kwargs: Any) -> Lab:
        cfg = load(source, **kwargs)
        lab = Lab(cfg, backend=backend, out_dir=out_root / run_dir_name(cfg, taken), log=log)
        made.append(lab)
        return lab.start()

    try:
        with sigterm_interrupts():
            yield make
    finally:
        errors: list[BaseException] = []
        for lab in reversed(made):
            try:
                lab.close()
            except BaseException as exc:  # take the others down all the same
                errors.append(exc)
        if errors:
            raise errors[0]


def run(
    cfg: LabConfig,
    *,
    backend: str,
    out_dir: Path,
    scenario: str | os.PathLike[str] | None = None,
    progress: bool = False,
    log: Say | None = None,
) -> RunResult:
    """One run end to end, as `dualpath run` (or `dualpath chaos --scenario FILE`): the lab
    comes up, the workload runs, the lab goes down whatever happens; summary.json in
    `out_dir`."""
    chaos = load_scenario(Path(scenario), cluster_links(cfg)) if scenario is not None else None
    with sigterm_interrupts():
        return run_once(
            cfg, backend=backend, out_dir=out_dir, progress=progress, log=log, scenario=chaos
        )

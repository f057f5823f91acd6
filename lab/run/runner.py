"""One lab run, start to finish: spec, workload, backend up, driver, counters, summary, down.

The runner owns the lifecycle: whatever happens (error, Ctrl-C, SIGTERM) the backend's
`down()` runs and removes exactly what was created. Progress goes to stderr while the driver
replays the workload.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from dualpath.errors import DualPathError
from lab.config.models import LabConfig
from lab.config.scaling import choose_scaling, resolve
from lab.results.health import HostSample, assess, verdict_of
from lab.results.kernel_series import counter_summary, merge_rows, queue_series
from lab.results.metrics import Sample, latency_series, recovery, summarize, throughput_series
from lab.run.backends import Backend, BackendError, stop_pids
from lab.run.bringup import (
    BackendFactory,
    HeldLab,
    Prepared,
    check_backend,
    held,
    make_backend,
    prepare,
)
from lab.run.calibrate import calibrate
from lab.run.chaos import Scenario
from lab.run.dashboard import RunFeed
from lab.run.player import ChaosPlayer
from lab.run.progress import Progress
from lab.run.rundir import REPORT, write_run_report
from lab.run.sampling import sample
from lab.run.selftest import SelftestOptions, run_selftest
from lab.run.trace_replay import load_configured, options_of, plan_trace, trace_summary
from lab.run.traces import Trace
from lab.run.workload import ReplayPlan, generate, load_jsonl, plan_agents, poisson_arrivals
from services.prom import exported_nodes, metrics_url
from services.spec import ClusterSpec, Policy

SAMPLE_INTERVAL_S = 0.5
DRIVER_RESULTS = "driver.json"
"""The driver's results file, in the run directory."""


class RunError(DualPathError):
    """The run could not produce a result; the message says why."""

    context = "run failed: "


@dataclass(frozen=True)
class RunResult:
    summary: dict[str, Any]
    out_dir: Path


def _replay_plan(cfg: LabConfig, block_tokens: int) -> ReplayPlan:
    """The agents the driver replays: the config's trajectories (loaded or generated) planned
    into turns, each agent with its arrival offset; agents left without a turn are dropped."""
    w = cfg.workload
    if w.trajectories_file:
        trajs = load_jsonl(Path(w.trajectories_file))[: w.num_agents]
    else:
        trajs = generate(w.num_agents, w.max_len, w.seed)
    agents = plan_agents(
        trajs,
        block_tokens=block_tokens,
        start_turn_fraction=w.start_turn_fraction,
        max_turns=w.max_turns_per_agent,
        gen_token_scale=w.gen_token_scale,
        max_gen_tokens=w.max_gen_tokens_per_turn,
    )
    starts = (
        poisson_arrivals(len(agents), agents_per_s=w.agents_per_s, seed=w.seed)
        if w.arrival == "poisson" and w.agents_per_s is not None
        else [0.0] * len(agents)
    )
    return ReplayPlan(
        tuple(
            # emulated seconds after the driver's start: real arrival offsets x tau
            msgspec.structs.replace(a, start_after_s=start * cfg.scaling.time_dilation)
            for a, start in zip(agents, starts, strict=True)
            if a.turns
        )
    )


def run_once(
    cfg: LabConfig,
    *,
    backend: str,
    out_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    scenario: Scenario | None = None,
    selftest: SelftestOptions | None = None,
    scaling: dict[str, Any] | None = None,
    factory: BackendFactory = make_backend,
    dashboard_port: int | None = None,
) -> RunResult:
    """Run the config's workload once under cfg.policy on `backend`; write summary.json.
    Scaling left on auto is chosen first (lab.config.scaling, after a host calibration); `scaling`
    is the record of a choice already made (compare makes it once for all its runs).
    With a chaos `scenario`, its steps run against the lab from the driver's start. With
    `selftest`, the lab's links are measured first (lab.run.selftest, in a lab of their own) and
    the run refuses to go on when one is outside tolerance, unless the options allow it.
    `dashboard_port`: serve the live dashboard there while the lab is up (0: any free port).
    `factory` makes the backend (the compose driver passes the stack's).

    Three steps: plan (scaling, selftest, spec and workload plan), play (the lab held up while
    the driver replays the plan, counters sampled, chaos applied), summarize (summary.json and
    the series and plots beside it)."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    check_backend(backend)  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, scaling = resolve_scaling(cfg, say, scaling)
    checked = _selftest(cfg, backend, out_dir, selftest, say) if selftest is not None else None
    plan = _plan(cfg, backend, out_dir)
    played = _play(plan, factory, scenario, say, progress, dashboard_port)
    summary = _summarize(plan, played, scaling, checked)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_run_report([out_dir], out_dir / REPORT)
    return RunResult(summary, out_dir)


@dataclass
class _Plan:
    """A lab prepared and the workload it will replay (written to `plan_path`)."""

    lab: Prepared
    replay: ReplayPlan
    plan_path: Path
    trace: Trace | None = None
    """The request trace replayed, when the workload is one."""


@dataclass
class _Played:
    """What a played run measured: the driver's record, the counters and host samples, and
    the faults (chaos steps and changes made through the control endpoint)."""

    driver: dict[str, Any]
    samples: list[Sample]
    host: list[HostSample]
    chaos: ChaosPlayer | None
    by_hand: list[dict[str, Any]]

    @property
    def faults(self) -> list[dict[str, Any]]:
        chaos = self.chaos.log if self.chaos is not None else []
        return sorted([*chaos, *self.by_hand], key=lambda e: e["t"])


def _plan(cfg: LabConfig, backend: str, out_dir: Path) -> _Plan:
    """Prepare the lab; the replay plan is written to agents.json before any backend starts
    (it needs the spec's block size)."""
    plans: list[ReplayPlan] = []
    plan_path = out_dir / "agents.json"
    trace = _configured_trace(cfg)

    def write_plan(spec: ClusterSpec) -> None:
        plans.append(_write_plan(cfg, spec, plan_path, trace))

    lab = prepare(cfg, backend=backend, out_dir=out_dir, before_backend=write_plan)
    return _Plan(lab, plans[0], plan_path, trace)


def _configured_trace(cfg: LabConfig) -> Trace | None:
    """The config's request trace, read and checked whole before anything starts (a bad line
    costs nothing); None when the workload is not a trace."""
    return load_configured(cfg) if cfg.workload.trace is not None else None


def _write_plan(
    cfg: LabConfig, spec: ClusterSpec, plan_path: Path, trace: Trace | None
) -> ReplayPlan:
    """The replay plan of a lab of `spec` (the trace's, or the config's trajectories), written
    to `plan_path` for the driver: the one place both `run_once` and `run_held` make it."""
    bt = spec.profile.block_tokens
    replay = plan_trace(trace, options_of(cfg, bt)) if trace is not None else _replay_plan(cfg, bt)
    plan_path.write_bytes(replay.encode())
    return replay


def _play(
    plan: _Plan,
    factory: BackendFactory,
    scenario: Scenario | None,
    say: Callable[[str], None],
    progress: bool,
    dashboard_port: int | None = None,
) -> _Played:
    """Hold the lab up while the driver replays the plan (counters and host sampled, the
    scenario's steps applied); the lab comes down whatever happens."""
    lab, policy = plan.lab, plan.lab.cfg.policy.value
    say(
        f"[{policy}] lab {lab.lab_id} on {lab.spec.backend}: {len(plan.replay.agents)} agents, "
        f"{plan.replay.num_turns} turns"
    )

    def said_down(removed: list[str]) -> None:
        say(f"[{policy}] lab {lab.lab_id} down: removed {len(removed)} objects")

    with held(lab, factory, on_down=said_down, dashboard_port=dashboard_port) as up:
        return _play_held(plan, up, scenario, say, progress)


def _play_held(
    plan: _Plan,
    up: HeldLab,
    scenario: Scenario | None,
    say: Callable[[str], None],
    progress: bool,
) -> _Played:
    """The driver replays the plan on a lab that is up (counters and host sampled, the
    scenario's steps applied); the changes made through its control endpoint so far are the
    run's faults by hand (those made before the driver started have a negative `t`)."""
    lab, policy = plan.lab, plan.lab.cfg.policy.value
    _record_metrics_urls(lab)
    say(f"[{policy}] control: {up.control.url} (dualpath link set NODE NIC key=value)")
    chaos = ChaosPlayer(scenario, up.backend, say) if scenario is not None else None
    show = Progress(policy, progress, agents_total=len(plan.replay.agents))
    feed: RunFeed | None = None
    if up.dashboard is not None:
        say(f"[{policy}] dashboard: {up.dashboard.url}")
        logs = [(chaos.log, False)] if chaos is not None else []
        logs.append((up.control.applied, True))
        feed = RunFeed(up.dashboard, steps=lambda: logs)
    try:
        samples, host = _replay(plan, up.backend, chaos, show, feed)
    except BaseException as exc:
        if feed is not None:
            feed.finish(f"run stopped: {exc}" if str(exc) else "run stopped")
        raise
    driver = json.loads((lab.out_dir / DRIVER_RESULTS).read_text())
    if feed is not None:
        done = sum(t.get("error") is None for t in driver["turns"])
        feed.finish(f"{done}/{len(driver['turns'])} turns done; the lab goes down")
    by_hand = _by_hand(up.control.applied, float(driver["started_at"]))
    return _Played(driver, samples, host, chaos, by_hand)


def run_held(
    up: HeldLab,
    *,
    scaling: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    scenario: Scenario | None = None,
) -> RunResult:
    """Run the config's workload once on a lab that is already up (`bringup.held`) and that
    the caller takes down; summary.json and the rest go to the lab's own directory. The lab's
    config must have its scaling resolved (`resolve_scaling` before `prepare`; `scaling` is
    that choice's record). Once per lab: a second run would find the first one's KV in storage
    and its turns in the scheduler and engine counters, so it is refused (RunError). Link and
    node changes made through the lab's control endpoint before the run are its faults, at a
    negative `t`."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    lab = up.prepared
    if lab.cfg.scaling.auto:
        raise RunError(
            f"lab {lab.lab_id}: scaling {', '.join(lab.cfg.scaling.auto)} left on auto; "
            "resolve it (lab.run.runner.resolve_scaling) before the lab is prepared"
        )
    plan_path = lab.out_dir / "agents.json"
    if plan_path.exists():
        raise RunError(
            f"lab {lab.lab_id} has run its workload already ({plan_path}): a lab runs one "
            "workload, since storage, scheduler and engine counters keep the first run's state"
        )
    _, record = resolve_scaling(lab.cfg, say, scaling)
    trace = _configured_trace(lab.cfg)
    replay = _write_plan(lab.cfg, lab.spec, plan_path, trace)
    plan = _Plan(lab, replay, plan_path, trace)
    say(
        f"[{lab.cfg.policy.value}] lab {lab.lab_id} on {lab.spec.backend} (up): "
        f"{len(replay.agents)} agents, {replay.num_turns} turns"
    )
    played = _play_held(plan, up, scenario, say, progress)
    summary = _summarize(plan, played, record, None)
    (lab.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_run_report([lab.out_dir], lab.out_dir / REPORT)
    return RunResult(summary, lab.out_dir)


def _record_metrics_urls(lab: Prepared) -> None:
    """Record every node's Prometheus URL in the lab's state when the backend exports them."""
    spec = lab.spec
    if exported_nodes(spec.backend):
        lab.state.data["metrics_urls"] = {n.node_id: metrics_url(n.mgmt.host) for n in spec.nodes}
        lab.state.save()


def _replay(
    plan: _Plan, be: Backend, chaos: ChaosPlayer | None, show: Progress, feed: RunFeed | None
) -> tuple[list[Sample], list[HostSample]]:
    """Run the driver to its end, sampling counters and host while it runs, the chaos steps
    played beside it; RunError when it fails. Interrupted, the driver is stopped first."""
    out_dir = plan.lab.out_dir
    samples: list[Sample] = []
    host: list[HostSample] = []
    proc: subprocess.Popen[str] | None = None
    fatal: list[str] = []
    try:
        with (out_dir / "logs" / "driver.log").open("w") as driver_log:
            proc = _start_driver(plan, be, driver_log)
            if chaos is not None:
                chaos.thread.start()
            reader = threading.Thread(
                target=_listen, args=(proc, show, chaos, fatal, feed), daemon=True
            )
            reader.start()
            while proc.poll() is None:
                sample(be, samples, host)
                show.update(samples)
                if feed is not None:
                    feed.tick(samples, host)
                time.sleep(SAMPLE_INTERVAL_S)
            sample(be, samples, host)
            reader.join(timeout=5)
            if feed is not None:
                feed.tick(samples, host)
            if chaos is not None:
                chaos.stop.set()
                chaos.thread.join(timeout=30)
        if proc.returncode != 0 or not (out_dir / DRIVER_RESULTS).exists():
            why = fatal[0] if fatal else f"driver exited with status {proc.returncode}"
            raise RunError(f"{why} (logs in {out_dir / 'logs'})")
    finally:
        show.close()
        if chaos is not None:
            chaos.stop.set()
        if proc is not None and proc.poll() is None:  # interrupted: the driver goes first
            stop_pids({"driver": proc.pid}, str(plan.lab.spec_path))
    return samples, host


def _start_driver(plan: _Plan, be: Backend, log: IO[str]) -> subprocess.Popen[str]:
    """Start the driver process (where the backend runs it), its pid recorded in the lab's
    state; its stdout is the JSON-lines channel `_listen` reads, its stderr goes to `log`."""
    lab = plan.lab
    argv = be.driver_argv(
        [
            sys.executable,
            "-m",
            "lab.run.driver",
            "--spec",
            str(lab.spec_path),
            "--plan",
            str(plan.plan_path),
            "--out",
            str(lab.out_dir / DRIVER_RESULTS),
        ]
    )
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lab.state.add_pid("driver", proc.pid)
    return proc


def _listen(
    proc: subprocess.Popen[str],
    show: Progress,
    chaos: ChaosPlayer | None,
    fatal: list[str],
    feed: RunFeed | None = None,
) -> None:
    """Read the driver's JSON lines: its start starts the chaos clock, its progress feeds the
    status line and the dashboard, a fatal error is kept for the RunError."""
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "started_at" in msg and chaos is not None:
            chaos.start_clock(float(msg["started_at"]))
        if "started_at" in msg and feed is not None:
            feed.on_start(float(msg["started_at"]))
        if "progress" in msg:
            show.progress = msg["progress"]
            if feed is not None:
                feed.on_progress(msg["progress"])
        if "fatal" in msg:
            fatal.append(str(msg["fatal"]))


def _by_hand(applied: Sequence[dict[str, Any]], started_at: float) -> list[dict[str, Any]]:
    """Changes made through the control endpoint during the run: faults like the scenario's,
    their wall-clock time made relative to the driver's start."""
    return [
        {"t": round(e["wall"] - started_at, 3), **{k: v for k, v in e.items() if k != "wall"}}
        for e in applied
    ]


def _summarize(
    plan: _Plan,
    played: _Played,
    scaling: dict[str, Any],
    checked: dict[str, Any] | None,
) -> dict[str, Any]:
    """summary.json's content; the series, counters and plots written beside it."""
    cfg, spec = plan.lab.cfg, plan.lab.spec
    driver, samples, faults = played.driver, played.samples, played.faults
    started, finished = driver["started_at"], driver["finished_at"]
    summary = summarize(
        policy=cfg.policy.value,
        backend=spec.backend,
        config_name=cfg.name,
        time_dilation=cfg.scaling.time_dilation,
        driver=driver,
        samples=samples,
        num_agents=len(plan.replay.agents),
        faults_injected=bool(faults),
    )
    summary["scaling"] = scaling
    summary["arrival"] = _arrival(plan)
    if plan.trace is not None:
        summary["trace"] = trace_summary(
            plan.trace,
            options_of(cfg, spec.profile.block_tokens),
            plan.replay,
            driver["turns"],
            storage_read_bytes=int(summary["bytes_storage_read"]),
            block_bytes=spec.profile.block_bytes,
        )
    summary.update(_fault_records(played))
    paused = paused_intervals(faults, started, finished)
    if faults:
        since = started + float(faults[0]["t"])
        summary["recovery"] = recovery(samples, driver["turns"], since, finished, down=paused)
    summary["kernel_counters"] = counter_summary(samples, started, finished)
    if checked is not None:
        summary["selftest"] = checked
    health = assess(
        driver.get("health") or {},
        played.host,
        window=(started, finished),
        storage_mbit={n.node_id: n.snic_rate_mbit for n in spec.nodes if n.snic_rate_mbit},
        paused=paused,
    )
    summary["emulation_health"] = health
    summary["allowed_host_bound"] = False  # `dualpath ... --allow-host-bound` sets it
    _write_series(plan, played)
    return summary


def _arrival(plan: _Plan) -> dict[str, Any]:
    """summary.json `arrival`: the arrival mode, its rate and the last agent's arrival."""
    w = plan.lab.cfg.workload
    return {
        "mode": "trace" if w.trace is not None else w.arrival,
        "agents_per_s": w.agents_per_s,  # real-equivalent (APS)
        "last_arrival_s": round(max((a.start_after_s for a in plan.replay.agents), default=0.0), 3),
    }


def _fault_records(played: _Played) -> dict[str, Any]:
    """summary.json `chaos` (the scenario and its steps' outcomes) and `control` (changes
    made by hand), each only when there was one."""
    out: dict[str, Any] = {}
    chaos = played.chaos
    if chaos is not None:
        out["chaos"] = {
            "scenario": chaos.scenario.name,
            "description": chaos.scenario.description,
            "steps_planned": len(chaos.scenario.steps),
            "events": chaos.log,
        }
    if played.by_hand:
        out["control"] = {"events": played.by_hand}
    return out


def _write_series(plan: _Plan, played: _Played) -> None:
    """timeseries, counters, host and latency JSON beside summary.json."""
    out_dir = plan.lab.out_dir
    samples, started = played.samples, played.driver["started_at"]
    series = throughput_series(samples, started)
    series = merge_rows(series, queue_series(samples, started))
    (out_dir / "timeseries.json").write_text(json.dumps(series))
    (out_dir / "counters.json").write_text(json.dumps(samples))
    (out_dir / "host.json").write_text(json.dumps(played.host))
    latency = latency_series(played.driver["turns"], started)
    (out_dir / "latency.json").write_text(json.dumps(latency))


def paused_intervals(
    events: Sequence[dict[str, Any]], started_at: float, finished_at: float
) -> dict[str, list[tuple[float, float]]]:
    """Per node, the wall-clock intervals a chaos step had it stopped (stop → cont) or gone
    (kill → restart), from the chaos log (`t` relative to the driver's start); an interval
    still open at the end runs to `finished_at`."""
    ends = {"stop": "cont", "kill": "restart"}
    opened: dict[str, tuple[str, float]] = {}
    out: dict[str, list[tuple[float, float]]] = {}
    for e in sorted(events, key=lambda e: float(e.get("t", 0.0))):
        action, node = e.get("action"), e.get("node")
        if not isinstance(node, str) or "error" in e:
            continue
        at = started_at + float(e.get("t", 0.0))
        if action in ends and node not in opened:
            opened[node] = (ends[action], at)
        elif node in opened and action == opened[node][0]:
            out.setdefault(node, []).append((opened.pop(node)[1], at))
    for node, (_, at) in opened.items():
        out.setdefault(node, []).append((at, finished_at))
    return out


def resolve_scaling(
    cfg: LabConfig, say: Callable[[str], None], record: dict[str, Any] | None = None
) -> tuple[LabConfig, dict[str, Any]]:
    """The config with nothing on auto, and the record for summary.json `scaling`: the values,
    which were chosen, and from what calibration (`record`: a choice made earlier)."""
    if not cfg.scaling.auto:
        base = {
            "bandwidth_scale": cfg.scaling.bandwidth_scale,
            "time_dilation": cfg.scaling.time_dilation,
        }
        return cfg, record if record is not None else {**base, "auto": []}
    cal = calibrate()
    choice = choose_scaling(cfg, cal)
    say(
        f"[scaling] auto: host calibration {cal.cpu_s_per_gb:g} CPU-s/GB through the transport, "
        f"{cal.cpus} CPUs, timer p99 {cal.timer_late_p99_ms:g} ms ({cal.seconds:g} s)"
    )
    for note in choice.notes:
        say(f"[scaling] {note}")
    record = {
        "bandwidth_scale": choice.bandwidth_scale,
        "time_dilation": choice.time_dilation,
        "auto": list(choice.auto),
        "calibration": asdict(cal),
        "choice": choice.as_json(),
    }
    return resolve(cfg, choice), record


def _selftest(
    cfg: LabConfig,
    backend: str,
    out_dir: Path,
    options: SelftestOptions,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Measure the lab's links before the workload (`run --selftest`); selftest.json in the run
    directory. Out of tolerance: RunError, unless `options.allow_out_of_tolerance`."""
    if backend != "netns":
        raise RunError("--selftest measures shaped links: it needs --backend netns")
    report = run_selftest(cfg, options, log=say)
    (out_dir / "selftest.json").write_text(json.dumps(report.as_json(), indent=2))
    for line in report.lines():
        say(f"[selftest] {line}")
    if not report.passed and not options.allow_out_of_tolerance:
        raise RunError(
            f"selftest: {len(report.failures)} link(s) outside the "
            f"{100 * options.tolerance:g} % tolerance ({', '.join(report.failures)}); no results "
            "are reported from a lab that does not shape as configured "
            "(--allow-out-of-tolerance runs anyway)"
        )
    return report.as_json()


SPEEDUPS = {
    "dualpath_over_basic": (Policy.BASIC, Policy.DUALPATH),
    "oracle_over_basic": (Policy.BASIC, Policy.ORACLE),
    "oracle_over_dualpath": (Policy.DUALPATH, Policy.ORACLE),
}


def compare(
    cfg: LabConfig,
    *,
    backend: str,
    out_dir: Path,
    progress: bool = True,
    policies: Sequence[Policy] = (Policy.BASIC, Policy.DUALPATH, Policy.ORACLE),
    factory: BackendFactory = make_backend,
) -> dict[str, Any]:
    """The policies (basic, dualpath and oracle) on the same seeded workload; writes
    comparison.json with the speedups between the policies that ran and each run's
    emulation-health verdict."""
    results: dict[str, dict[str, Any]] = {}
    # one scaling for every policy: a comparison holds k and tau fixed
    cfg, scaling = resolve_scaling(cfg, lambda m: print(m, file=sys.stderr, flush=True))
    for policy in policies:
        run_cfg = cfg.model_copy(update={"policy": policy})
        res = run_once(
            run_cfg,
            backend=backend,
            out_dir=out_dir / policy.value,
            progress=progress,
            scaling=scaling,
            factory=factory,
        )
        results[policy.value] = res.summary
    jct = {p: s["jct_s"] for p, s in results.items()}
    comparison = {
        "config": cfg.name,
        "backend": backend,
        "scaling": scaling,
        "jct_s": jct,
        "speedup": {
            name: round(jct[a.value] / jct[b.value], 3)
            for name, (a, b) in SPEEDUPS.items()
            if a.value in jct and b.value in jct
        },
        "emulation_health": {p: verdict_of(s) for p, s in results.items()},
        "runs": results,
    }
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
    write_run_report([out_dir / p.value for p in policies], out_dir / REPORT)
    return comparison


__all__ = ["BackendError", "RunError", "RunResult", "compare", "run_held", "run_once"]

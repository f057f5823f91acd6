"""One lab run, start to finish: spec, workload, backend up, driver, counters, summary, down.

The runner owns the lifecycle: whatever happens (error, Ctrl-C, SIGTERM) the backend's
`down()` runs and removes exactly what was created. Progress goes to stderr while the driver
replays the workload.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lab.backends import (
    Backend,
    BackendError,
    LocalBackend,
    NetnsBackend,
    RunState,
    free_port_base,
    make_data_dir,
    stop_pids,
)
from lab.chaos import Scenario, cluster_links
from lab.config import LOCAL_PORTS, LabConfig, build_cluster_spec
from lab.control import ControlServer, apply_step, step_entry
from lab.health import HostSample, assess, host_sample, verdict_of
from lab.kernel_series import counter_summary, merge_rows, queue_series
from lab.metrics import Sample, latency_series, recovery, summarize, throughput_series
from lab.report import write_class_plot, write_plot
from lab.selftest import SelftestOptions, run_selftest
from lab.workload import generate, load_jsonl, plan_agents, poisson_arrivals
from services.prom import exported_nodes, metrics_url
from services.spec import ClusterSpec, Policy

SAMPLE_INTERVAL_S = 0.5
BACKENDS = ("netns", "compose", "local")
PROC_STAT = Path("/proc/stat")
PROC_PSI_CPU = Path("/proc/pressure/cpu")
"""Both host-wide (a container sees the host's, unless something like lxcfs masks them)."""


def _read_text(path: Path) -> str | None:
    """A /proc file's text, None when the kernel has no such file (no PSI before 4.20, or
    psi=0) or it cannot be read: host figures are then missing, never an error."""
    try:
        return path.read_text()
    except OSError:
        return None


def sample_host(now: float) -> HostSample:
    """The host's CPU busy jiffies and CPU pressure (PSI some) at `now` (lab.health)."""
    return host_sample(
        now,
        stat_text=_read_text(PROC_STAT),
        psi_text=_read_text(PROC_PSI_CPU),
        num_cpus=os.cpu_count(),
    )


class RunError(Exception):
    """The run could not produce a result; the message says why."""


@dataclass(frozen=True)
class RunResult:
    summary: dict[str, Any]
    out_dir: Path


def _agents_plan(cfg: LabConfig, block_tokens: int) -> list[dict[str, Any]]:
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
    return [
        {
            "traj_id": a.traj_id,
            "seed_blocks": a.seed_blocks,
            # emulated seconds after the driver's start: real arrival offsets x tau
            "start_after_s": start * cfg.scaling.time_dilation,
            "turns": [
                {
                    "turn_index": t.turn_index,
                    "context_tokens": t.context_tokens,
                    "append_tokens": t.append_tokens,
                    "gen_tokens": t.gen_tokens,
                }
                for t in a.turns
            ],
        }
        for a, start in zip(agents, starts, strict=True)
        if a.turns
    ]


def _make_backend(
    cfg: LabConfig, spec: ClusterSpec, spec_path: Path, out: Path, state: RunState
) -> Backend:
    if spec.backend == "local":
        return LocalBackend(spec, spec_path, out / "logs", state)
    if spec.backend == "netns":
        return NetnsBackend(
            spec, spec_path, out / "logs", state, kv_min_fraction=cfg.network.kv_min_fraction
        )
    if spec.backend == "compose":  # this process is a compose stack's driver
        from lab.compose_stack import StackBackend

        return StackBackend(spec, spec_path, out / "logs", state)
    raise RunError(f"unknown backend {spec.backend!r}; valid backends: {', '.join(BACKENDS)}")


class _Progress:
    """Prints one status line every ~2 s: turns, agents, tokens/s, storage NIC use."""

    def __init__(self, policy: str, enabled: bool) -> None:
        self.policy = policy
        self.enabled = enabled
        self.last_print = 0.0
        self.progress: dict[str, Any] = {}

    def update(self, samples: list[Sample]) -> None:
        if not self.enabled or time.monotonic() - self.last_print < 2.0 or not self.progress:
            return
        self.last_print = time.monotonic()
        p = self.progress
        tok_s = p["tokens_done"] / max(p["elapsed_s"], 1e-9)
        nic = ""
        if len(samples) >= 2:
            a, b = samples[-2], samples[-1]
            dt = max(b["t"] - a["t"], 1e-9)
            parts = []
            for node, nics in sorted(b["nodes"].items()):
                c = nics.get("snic")
                prev = a["nodes"].get(node, {}).get("snic")
                if c is None or prev is None or not c.get("rate_mbit"):
                    continue
                if not node.startswith(("prefill", "decode")):
                    continue
                mbit = (c["ingress_bytes"] - prev["ingress_bytes"]) * 8 / dt / 1e6
                parts.append(f"{node} snic {100 * mbit / c['rate_mbit']:3.0f}%")
            nic = "  " + "  ".join(parts)
        line = (
            f"[{self.policy}] {p['elapsed_s']:6.1f}s  turns {p['turns_done']}/{p['turns_total']}"
            f"  agents {p['agents_done']}  {tok_s / 1000:7.1f}k tok/s{nic}"
        )
        if p.get("turns_failed"):
            line += f"  FAILED {p['turns_failed']}"
        print(line, file=sys.stderr, flush=True)


class _ChaosPlayer:
    """Plays a scenario's steps against the backend while the driver runs, from the driver's
    start; every step's outcome (or error) is recorded with its planned and actual time."""

    def __init__(self, scenario: Scenario, be: Backend, say: Callable[[str], None]) -> None:
        self.scenario = scenario
        self.be = be
        self.say = say
        self.started = threading.Event()
        self.stop = threading.Event()
        self.started_at = 0.0
        self.log: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start_clock(self, started_at: float) -> None:
        self.started_at = started_at
        self.started.set()

    def _run(self) -> None:
        while not self.started.wait(0.1):
            if self.stop.is_set():
                return
        for step in self.scenario.steps:
            delay = self.started_at + step.at_s - time.time()
            if delay > 0 and self.stop.wait(delay):
                return
            entry: dict[str, Any] = {
                "at_s": step.at_s,
                "t": round(time.time() - self.started_at, 3),
                **step_entry(step),
            }
            try:
                entry["result"] = apply_step(self.be, step)
            except Exception as exc:  # recorded and reported; the run goes on
                entry["error"] = f"{type(exc).__name__}: {exc}"
            self.log.append(entry)
            self.say(f"[chaos] t={entry['t']:.1f}s {entry.get('result') or entry.get('error')}")


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
) -> RunResult:
    """Run the config's workload once under cfg.policy on `backend`; write summary.json.
    Scaling left on auto is chosen first (lab.scaling, after a host calibration); `scaling`
    is the record of a choice already made (compare makes it once for all its runs).
    With a chaos `scenario`, its steps run against the lab from the driver's start. With
    `selftest`, the lab's links are measured first (lab.selftest, in a lab of their own) and
    the run refuses to go on when one is outside tolerance, unless the options allow it."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if backend not in BACKENDS:
        raise RunError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "netns":
        from netem.kernel import require_net_admin

        require_net_admin()  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, scaling = resolve_scaling(cfg, say, scaling)
    checked = _selftest(cfg, backend, out_dir, selftest, say) if selftest is not None else None
    lab_id = secrets.token_hex(3)
    base_port = free_port_base(LOCAL_PORTS) if backend == "local" else 0
    # The data directory exists (mkdtemp, 0700) before the spec or any record names it; the
    # spec carries the lab's fresh secret and is written 0600.
    data_dir = make_data_dir(lab_id)
    try:
        spec = build_cluster_spec(
            cfg, lab_id=lab_id, backend=backend, data_dir=data_dir.path, base_port=base_port
        )
        spec_path = out_dir / "spec.json"
        spec.dump(spec_path)
        agents = _agents_plan(cfg, spec.profile.block_tokens)
        plan_path = out_dir / "agents.json"
        plan_path.write_text(json.dumps({"agents": agents}))
        state = RunState(lab_id, backend, spec_path, data_dir, secret=spec.secret)
        be = _make_backend(cfg, spec, spec_path, out_dir, state)
    except BaseException:
        data_dir.remove()
        raise
    samples: list[Sample] = []
    host: list[HostSample] = []
    driver_out = out_dir / "driver.json"
    show = _Progress(cfg.policy.value, progress)
    say(
        f"[{cfg.policy.value}] lab {lab_id} on {backend}: {len(agents)} agents, "
        f"{sum(len(a['turns']) for a in agents)} turns"
    )
    proc: subprocess.Popen[str] | None = None
    chaos: _ChaosPlayer | None = None
    control: ControlServer | None = None
    try:
        be.up()
        control = ControlServer(be, cluster_links(cfg), secret=spec.secret)
        state.data["control_url"] = control.url
        if exported_nodes(backend):
            state.data["metrics_urls"] = {n.node_id: metrics_url(n.mgmt.host) for n in spec.nodes}
        state.save()
        say(f"[{cfg.policy.value}] control: {control.url} (dualpath link set NODE NIC key=value)")
        argv = be.driver_argv(
            [
                sys.executable,
                "-m",
                "lab.driver",
                "--spec",
                str(spec_path),
                "--plan",
                str(plan_path),
                "--out",
                str(driver_out),
            ]
        )
        driver_log = (out_dir / "logs" / "driver.log").open("w")
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=driver_log,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        state.add_pid("driver", proc.pid)
        fatal: list[str] = []
        chaos = _ChaosPlayer(scenario, be, say) if scenario is not None else None
        if chaos is not None:
            chaos.thread.start()

        def read_driver() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "started_at" in msg and chaos is not None:
                    chaos.start_clock(float(msg["started_at"]))
                if "progress" in msg:
                    show.progress = msg["progress"]
                if "fatal" in msg:
                    fatal.append(str(msg["fatal"]))

        reader = threading.Thread(target=read_driver, daemon=True)
        reader.start()
        while proc.poll() is None:
            _sample(be, samples, host)
            show.update(samples)
            time.sleep(SAMPLE_INTERVAL_S)
        _sample(be, samples, host)
        reader.join(timeout=5)
        if chaos is not None:
            chaos.stop.set()
            chaos.thread.join(timeout=30)
        driver_log.close()
        if proc.returncode != 0 or not driver_out.exists():
            why = fatal[0] if fatal else f"driver exited with status {proc.returncode}"
            raise RunError(f"{why} (logs in {out_dir / 'logs'})")
    finally:
        if chaos is not None:
            chaos.stop.set()
        if control is not None:
            control.close()
        if proc is not None and proc.poll() is None:  # interrupted: the driver goes first
            stop_pids({"driver": proc.pid}, str(spec_path))
        removed = be.down()  # the nodes, the network, the data directory, then the record
        say(f"[{cfg.policy.value}] lab {lab_id} down: removed {len(removed)} objects")
    driver = json.loads(driver_out.read_text())
    # changes made through the control endpoint during the run are faults like the scenario's
    by_hand = [
        {
            "t": round(e["wall"] - driver["started_at"], 3),
            **{k: v for k, v in e.items() if k != "wall"},
        }
        for e in (control.applied if control is not None else [])
    ]
    faults = sorted([*(chaos.log if chaos is not None else []), *by_hand], key=lambda e: e["t"])
    summary = summarize(
        policy=cfg.policy.value,
        backend=backend,
        config_name=cfg.name,
        time_dilation=cfg.scaling.time_dilation,
        driver=driver,
        samples=samples,
        num_agents=len(agents),
        faults_injected=bool(faults),
    )
    w = cfg.workload
    summary["scaling"] = scaling
    summary["arrival"] = {
        "mode": w.arrival,
        "agents_per_s": w.agents_per_s,  # real-equivalent (APS)
        "last_arrival_s": round(max((float(a["start_after_s"]) for a in agents), default=0.0), 3),
    }
    if chaos is not None:
        summary["chaos"] = {
            "scenario": chaos.scenario.name,
            "description": chaos.scenario.description,
            "steps_planned": len(chaos.scenario.steps),
            "events": chaos.log,
        }
    if by_hand:
        summary["control"] = {"events": by_hand}
    if faults:
        since = driver["started_at"] + float(faults[0]["t"])
        down = paused_intervals(faults, driver["started_at"], driver["finished_at"])
        summary["recovery"] = recovery(
            samples, driver["turns"], since, driver["finished_at"], down=down
        )
    summary["kernel_counters"] = counter_summary(
        samples, driver["started_at"], driver["finished_at"]
    )
    if checked is not None:
        summary["selftest"] = checked
    health = assess(
        driver.get("health") or {},
        host,
        window=(driver["started_at"], driver["finished_at"]),
        storage_mbit={n.node_id: n.snic_rate_mbit for n in spec.nodes if n.snic_rate_mbit},
        paused=paused_intervals(faults, driver["started_at"], driver["finished_at"]),
    )
    summary["emulation_health"] = health
    summary["allowed_host_bound"] = False  # `dualpath ... --allow-host-bound` sets it
    series = throughput_series(samples, driver["started_at"])
    series = merge_rows(series, queue_series(samples, driver["started_at"]))
    (out_dir / "timeseries.json").write_text(json.dumps(series))
    (out_dir / "counters.json").write_text(json.dumps(samples))
    (out_dir / "host.json").write_text(json.dumps(host))
    latency = latency_series(driver["turns"], driver["started_at"])
    (out_dir / "latency.json").write_text(json.dumps(latency))
    if series:
        write_plot(
            series,
            out_dir / "throughput.svg",
            title=f"{cfg.name} / {cfg.policy.value}",
            events=faults,
            latency=latency,
            lateness=health["lateness_per_s"],
            lateness_threshold=health["thresholds"]["timeline_lateness_p99"],
        )
        write_class_plot(
            series, out_dir / "cnic_classes.svg", title=f"{cfg.name} / {cfg.policy.value}"
        )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(summary, out_dir)


def _sample(be: Backend, samples: list[Sample], host: list[HostSample]) -> None:
    """One tick: every node's kernel counters (when the backend has them) and the host's CPU
    figures (always), at the same moment."""
    counters = be.counters()
    now = time.time()
    if counters is not None:
        samples.append({"t": now, "nodes": counters})
    host.append(sample_host(now))


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
    from lab.calibrate import calibrate
    from lab.scaling import choose_scaling, resolve

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
    return comparison


__all__ = ["BackendError", "RunError", "RunResult", "compare", "run_once"]

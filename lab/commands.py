"""What each `dualpath` verb does (lab.cli parses the arguments and calls one of these): load
the config, call the runner, the bring-up or a backend, print, and return the exit status.
Errors are raised (dualpath.errors), and lab.cli turns them into a message and a status.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from compose.backend import down_stack, exec_in, recorded_stack, repo_root, run_stack
from compose.render import render_text
from dualpath.errors import EXIT_FAILED, EXIT_HOST_BOUND, EXIT_OK, EXIT_USAGE, UsageError
from lab.config.models import (
    ConfigError,
    LabConfig,
    load_config,
    parse_settings,
)
from lab.results.report import comparison_table, summary_lines
from lab.results.verdict import accept_host_bound, exit_status, host_bound_message, host_bound_runs
from lab.run.backends import (
    BackendError,
    NetnsBackend,
    down_recorded,
    state_dir,
)
from lab.run.bringup import check_backend, held, prepare
from lab.run.chaos import cluster_links, load_scenario
from lab.run.dashboard import LabWatch, scheduler_status
from lab.run.rundir import REPORT, write_run_report
from lab.run.runner import compare, run_once
from lab.run.selftest import SelftestOptions, run_selftest
from lab.run.traces import load_trace, stats_lines, trace_stats
from netem.doctor import probe
from scheduler.analysis import format_analysis, format_lab_analysis
from scheduler.plugins import catalogue
from scheduler.registry import SELECTORS
from services.auth import AUTH_HEADER, bearer
from services.spec import Policy
from services.tokenizer import tokenizer_files


def _load(args: argparse.Namespace) -> LabConfig:
    overrides = parse_settings(getattr(args, "set", None) or [])
    if getattr(args, "policy", None):
        overrides["policy"] = args.policy
    return load_config(Path(args.config), overrides)


def _default_out(cfg: LabConfig, kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{cfg.name}-{kind}-{stamp}"


def selftest_options(args: argparse.Namespace) -> SelftestOptions:
    return SelftestOptions(
        seconds=args.selftest_seconds,
        tolerance=args.tolerance / 100,
        max_concurrent_mbit=args.max_concurrent_mbit,
        allow_out_of_tolerance=getattr(args, "allow_out_of_tolerance", False),
    )


def _finish(summaries: Mapping[str, Mapping[str, Any]], args: argparse.Namespace) -> int:
    """Exit status of a run/compare/chaos whose results are written and printed; the last
    line on stderr says why when it is the host-bound one."""
    status = exit_status(summaries, allow_host_bound=args.allow_host_bound)
    message = host_bound_message(summaries)
    if status == EXIT_HOST_BOUND and message is not None:
        print(message, file=sys.stderr)
    return status


def _single(summary: dict[str, Any], out: Path, args: argparse.Namespace) -> int:
    """Accept (if allowed), print and judge the summary of one run written to `out`."""
    runs = {str(summary["policy"]): summary}
    accept_host_bound(runs, {str(summary["policy"]): out / "summary.json"}, args.allow_host_bound)
    if args.allow_host_bound and host_bound_runs(runs):  # the page says it was accepted
        write_run_report([out], out / REPORT)
    print("\n".join(summary_lines(summary)))
    print(f"summary: {out / 'summary.json'}")
    if (out / REPORT).exists():
        print(f"report: {out / REPORT}")
    return _finish(runs, args)


def cmd_run(args: argparse.Namespace) -> int:
    if args.allow_out_of_tolerance and not args.selftest:
        raise ConfigError("--allow-out-of-tolerance: only means something with --selftest")
    if args.selftest and args.backend != "netns":
        raise ConfigError(
            f"--selftest: measures the shaped links of the netns backend, not {args.backend!r}"
        )
    cfg = _load(args)
    _dashboard_here(args)
    checks = selftest_options(args) if args.selftest else None
    out = Path(args.out) if args.out else _default_out(cfg, cfg.policy.value)
    if args.backend == "compose":
        summary = _compose(cfg, [cfg.policy.value], out, args)
    else:
        summary = _run_here(cfg, out, args, selftest=checks)
    return _single(summary, out, args)


def _run_here(
    cfg: LabConfig, out: Path, args: argparse.Namespace, **options: Any
) -> dict[str, Any]:
    """One run on this host's backend (netns or local), with the command's common options."""
    return run_once(
        cfg,
        backend=args.backend,
        out_dir=out,
        progress=not args.quiet,
        dashboard_port=args.dashboard,
        **options,
    ).summary


def _dashboard_here(args: argparse.Namespace) -> None:
    """--dashboard serves from the process that owns the lab; on compose that is the driver
    container, whose 127.0.0.1 the host cannot reach."""
    if args.dashboard is not None and args.backend == "compose":
        raise UsageError(
            "--dashboard: a compose lab is owned by its driver container, out of the host's "
            "reach; watch it with the monitoring profile's Prometheus (docs/compose.md) or run "
            "on --backend netns"
        )


def _compose(
    cfg: LabConfig,
    policies: list[str],
    out: Path,
    args: argparse.Namespace,
    scenario: str | None = None,
) -> dict[str, Any]:
    """One compose stack runs the policies (compose.backend)."""
    if cfg.scheduling.selector not in SELECTORS:
        raise UsageError(
            f"scheduling.selector {cfg.scheduling.selector!r} is a policy plugin, and the"
            " compose image carries only the built-in policies: run it on --backend netns or"
            ' local (docs/design.md, "Policy plugins")'
        )
    return run_stack(
        cfg, policies=policies, out_dir=out, scenario_text=scenario, progress=not args.quiet
    )


def cmd_chaos(args: argparse.Namespace) -> int:
    """Run the workload once with a chaos scenario playing against the lab."""
    cfg = _load(args)
    _dashboard_here(args)
    scenario = load_scenario(Path(args.scenario), cluster_links(cfg))  # before anything runs
    out = Path(args.out) if args.out else _default_out(cfg, f"chaos-{scenario.name}")
    if args.backend == "compose":  # the driver container compiles the same file again
        import yaml

        data = yaml.safe_load(Path(args.scenario).read_text())
        data.setdefault("name", scenario.name)
        text = yaml.safe_dump(data, sort_keys=False)
        summary = _compose(cfg, [cfg.policy.value], out, args, scenario=text)
    else:
        summary = _run_here(cfg, out, args, scenario=scenario)
    return _single(summary, out, args)


def cmd_compare(args: argparse.Namespace) -> int:
    cfg = _load(args)
    out = Path(args.out) if args.out else _default_out(cfg, "compare")
    if args.backend == "compose":
        cmp = _compose(cfg, [p.value for p in Policy], out, args)
    else:
        cmp = compare(cfg, backend=args.backend, out_dir=out, progress=not args.quiet)
    runs: dict[str, dict[str, Any]] = cmp["runs"]
    if args.allow_host_bound and host_bound_runs(runs):
        accept_host_bound(runs, {p: out / p / "summary.json" for p in runs}, True)
        (out / "comparison.json").write_text(json.dumps(cmp, indent=2))
        write_run_report([out / p for p in runs], out / REPORT)
    print()
    print(
        f"{cfg.name}: {cfg.cluster.prefill_nodes}P{cfg.cluster.decode_nodes}D, "
        f"{cmp['runs']['basic']['num_agents']} agents, backend {args.backend}"
    )
    print(comparison_table(cmp))
    print(f"comparison: {out / 'comparison.json'}")
    if (out / REPORT).exists():
        print(f"report: {out / REPORT}")
    return _finish(runs, args)


def cmd_report(args: argparse.Namespace) -> int:
    """The HTML report (lab.results.html_report) of one run directory, or of several side by
    side; written to -o, or beside the one directory given."""
    dirs = [Path(d) for d in args.run_dirs]
    if args.output:
        out = Path(args.output)
    elif len(dirs) == 1:
        out = dirs[0] / REPORT
    else:
        raise UsageError("several run directories: say where the comparison goes with -o FILE")
    print(f"report: {write_run_report(dirs, out)}")
    return EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    """Bring a lab up. By default a detached controller process owns it (it holds the network,
    restarts nodes and serves the control endpoint for `link set` and `node`) and this command
    returns once the lab is ready; `--foreground` runs the controller here until Ctrl-C."""
    if args.backend == "compose":
        raise ConfigError(
            "--backend compose: a compose stack comes up with `docker compose up` on a file from "
            "`dualpath compose render -c CONFIG -o FILE` (see docs/compose.md)"
        )
    if not args.foreground:
        return _up_detached(args)
    cfg = _load(args)
    check_backend(args.backend)  # before anything is written
    lab_id = args.lab_id or secrets.token_hex(3)
    out = Path(args.out) if args.out else Path("results") / f"{cfg.name}-up-{lab_id}"
    out.mkdir(parents=True, exist_ok=True)
    lab = prepare(
        cfg,
        backend=args.backend,
        out_dir=out,
        lab_id=lab_id,
        allow_unemulated=args.allow_unemulated,
    )
    watch: LabWatch | None = None
    try:
        with held(lab, controller_pid=os.getpid(), dashboard_port=args.dashboard) as up:
            spec = lab.spec
            status_url = f"http://{spec.http.host}:{spec.http.port}/v1/status"
            print(
                f"lab {lab_id} is up ({args.backend}): {', '.join(n.node_id for n in spec.nodes)}"
            )
            print(f"  scheduler HTTP API: {status_url}")
            print(f"  control endpoint:   {up.control.url} (pid {os.getpid()} owns the lab)")
            if up.dashboard is not None:
                control_log = up.control.applied
                be = up.backend
                in_lab = (
                    partial(be.lab.open_socket, "scheduler")
                    if isinstance(be, NetnsBackend)
                    else socket.socket
                )
                watch = LabWatch(
                    up.dashboard,
                    be.counters,
                    status=partial(scheduler_status, in_lab, spec.http.host, spec.http.port),
                    steps=lambda: [(control_log, True)],
                )
                print(f"  live dashboard:     {up.dashboard.url}")
            print(f"  logs: {out / 'logs'}")
            print("  run a command in a node:  dualpath exec prefill-0 -- ss -tin")
            print("  change a link:            dualpath link set prefill-0 snic rate=50%")
            print(
                "  tear it down:             dualpath down"
                + ("" if args.detached else " (or Ctrl-C)")
            )
            if args.detached:
                _detach_output(out / "logs" / "controller.log")
            try:
                while True:
                    time.sleep(3600)
            finally:
                if watch is not None:
                    watch.close()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `dualpath down`
        return EXIT_OK


def _detach_output(log: Path) -> None:
    """Point stdout/stderr at the controller's log: closing the pipe tells `up` it is ready."""
    sys.stdout.flush()
    sys.stderr.flush()
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _up_detached(args: argparse.Namespace) -> int:
    """Start `up --foreground` in its own session, relay its output until it is ready."""

    lab_id = secrets.token_hex(3)
    cmd = [sys.executable, "-m", "lab.cli", "up", "-c", args.config, "--backend", args.backend]
    cmd += ["--foreground", "--detached", "--lab-id", lab_id]
    for item in args.set or []:
        cmd += ["--set", item]
    if args.policy:
        cmd += ["--policy", args.policy]
    if args.out:
        cmd += ["--out", args.out]
    if args.allow_unemulated:
        cmd.append("--allow-unemulated")
    if args.dashboard is not None:
        cmd += ["--dashboard", str(args.dashboard)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C in this terminal must not reach the lab's owner
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # EOF: the controller is ready (output moved to its log) or gone
        print(line, end="", flush=True)
    try:
        return proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    """DualPath §4.2: is the config's P/D inside the bottleneck-free range, and if not, what
    saturates first."""
    cfg = _load(args)
    result, lab = cfg.cluster.analysis(), cfg.cluster.lab_analysis()
    print(f"{cfg.name}: {format_analysis(result)}")
    print(format_lab_analysis(lab))
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace) -> int:
    """Measure every shaped link of the config's network against its configured rate (and
    delay); exit 1 when one is outside tolerance."""
    cfg = _load(args)
    options = selftest_options(args)
    quiet = args.json or args.quiet
    report = run_selftest(
        cfg, options, log=(lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    )
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return EXIT_OK if report.passed else EXIT_FAILED


def cmd_doctor(args: argparse.Namespace) -> int:
    """What this kernel/host can emulate, per link feature. Probes in a namespace of its own."""
    report = probe()
    if args.json:
        data = asdict(report)
        data["features"] = [asdict(f) for f in report.features()]
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(report.lines()))
    return EXIT_OK


def cmd_trace_stats(args: argparse.Namespace) -> int:
    """A trace's requests, arrival rate, lengths and offline prefix-hit rate (lab.run.traces)."""
    stats = trace_stats(load_trace(Path(args.file), args.format))
    print(json.dumps(stats, indent=2) if args.json else "\n".join(stats_lines(stats)))
    return EXIT_OK


TOKENIZER_REPO_ID = "dualpath/byte-tokenizer"
"""The repo id `dualpath tokenizer --hub-cache` files the lab's tokenizer under."""


def cmd_tokenizer(args: argparse.Namespace) -> int:
    """The lab's tokenizer (services.tokenizer) as HuggingFace files: in DIR, and with
    --hub-cache also as a hub cache entry (refs/main naming a snapshot by the files' hash)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", args.repo_id):
        raise UsageError(f"--repo-id {args.repo_id!r}: expected ORG/NAME")
    files = tokenizer_files()
    targets = [Path(args.dir)]
    if args.hub_cache:
        digest = hashlib.sha1("".join(files[k] for k in sorted(files)).encode()).hexdigest()
        repo = Path(args.hub_cache) / ("models--" + args.repo_id.replace("/", "--"))
        targets.append(repo / "snapshots" / digest)
    try:
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (target / name).write_text(text, encoding="utf-8")
        if args.hub_cache:
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text(digest)
    except OSError as exc:
        raise UsageError(f"cannot write the tokenizer: {exc}") from None
    print(f"tokenizer written to {', '.join(str(t) for t in targets)}")
    if args.hub_cache:
        print(f"  HF_HUB_CACHE={args.hub_cache} HF_HUB_OFFLINE=1 ... --tokenizer {args.repo_id}")
    return EXIT_OK


CHOSEN_BY: Mapping[str, str] = {
    "basic": "policy: basic",
    "oracle": "policy: oracle",
    "dualpath": "policy: dualpath (scheduling.selector: dualpath, the default)",
    "dualpath_split": "policy: dualpath, scheduling.split_reads: true",
    "round_robin": "policy: dualpath, scheduling.selector: round_robin",
    "least_tokens": "policy: dualpath, scheduling.selector: least_tokens",
}
"""The config that runs each built-in policy; a plugin runs as a selector of `dualpath`."""


def cmd_policies(args: argparse.Namespace) -> int:
    """Every scheduling policy: built-in, then each plugin (scheduler.plugins) with its
    distribution; a plugin that cannot be used is listed with why, and the status is 1."""
    rows = [
        {
            "name": e.name,
            "origin": e.origin,
            "description": e.description,
            "entry_point": e.value,
            "config": CHOSEN_BY.get(e.name, f"policy: dualpath, scheduling.selector: {e.name}"),
            "error": e.error,
        }
        for e in catalogue()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["name"]) for r in rows)
        origin_width = max(len(r["origin"]) for r in rows)
        for r in rows:
            text = f"error: {r['error']}" if r["error"] else r["description"]
            print(f"{r['name']:<{width}}  {r['origin']:<{origin_width}}  {text}")
            print(f"{'':<{width}}  {'':<{origin_width}}  config: {r['config']}")
    return EXIT_FAILED if any(r["error"] for r in rows) else EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    removed = down_recorded(args.lab, down_stack=down_stack)
    if not removed:
        print("nothing to remove: no lab is recorded in", state_dir())
    for item in removed:
        print("removed", item)
    return EXIT_OK


def _recorded() -> list[dict[str, Any]]:
    sdir = state_dir()
    out = []
    if sdir.is_dir():
        for path in sorted(sdir.glob("*.run.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
    return out


def _control(lab_id: str | None) -> tuple[str, str]:
    """The URL of the one running lab's control endpoint (or `lab_id`'s) and the lab's secret,
    from its run-state record (0600: only its owner can drive the lab)."""
    labs = [lab for lab in _recorded() if lab.get("control_url")]
    if lab_id is not None:
        labs = [lab for lab in labs if lab["lab_id"] == lab_id]
    if len(labs) != 1:
        which = ", ".join(lab["lab_id"] for lab in labs) or "none"
        raise ConfigError(
            f"need exactly one running lab with a control endpoint (found: {which}); "
            "start one with dualpath up/run/chaos, or pick one with --lab"
        )
    secret = labs[0].get("secret")
    if not isinstance(secret, str) or not secret:
        raise BackendError(
            f"lab {labs[0]['lab_id']}: its record holds no secret for the control endpoint "
            "(a lab started by an older dualpath): take it down and start it again"
        )
    return str(labs[0]["control_url"]), secret


def _send_control(control: tuple[str, str], path: str, body: dict[str, Any]) -> int:
    """POST to a lab's control endpoint ((url, secret) from `_control`); 400 (bad value) exits
    2, a refused change exits 1."""
    import urllib.error
    import urllib.request

    url, secret = control
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", AUTH_HEADER: bearer(secret)},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            print(json.loads(resp.read())["result"])
            return EXIT_OK
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read() or b"{}").get("error", exc.reason)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
            msg = f"HTTP {exc.code} {exc.reason}"
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE if exc.code == 400 else EXIT_FAILED
    except urllib.error.URLError as exc:
        print(f"error: control endpoint unreachable: {exc.reason}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # e.g. the run ended while the request was in flight
        print(f"error: control endpoint went away: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _in_stack(lab_id: str | None, argv: list[str]) -> int | None:
    """For a compose lab: the same command, run by `dualpath` in its driver container (whose
    runner owns the lab and its control endpoint); None when no compose lab is up."""
    stack = recorded_stack(lab_id)
    if stack is None:
        return None
    return exec_in(stack, "driver", ["dualpath", *argv])


def cmd_link_set(args: argparse.Namespace) -> int:
    """Change a NIC of a running lab in place: dualpath link set NODE NIC rate=50% loss=1%."""
    forwarded = _in_stack(args.lab, ["link", "set", args.node, args.nic, *args.changes])
    if forwarded is not None:
        return forwarded
    body: dict[str, Any] = {}
    for item in args.changes:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{item!r}: expected KEY=VALUE (rate, loss, delay, jitter, up)")
        body[key] = {"true": True, "false": False}.get(value.lower(), value)
    return _send_control(_control(args.lab), f"/v1/links/{args.node}/{args.nic}", body)


def cmd_node(args: argparse.Namespace) -> int:
    """stop, cont, kill or restart a node of a running lab."""
    forwarded = _in_stack(args.lab, ["node", args.node, args.action])
    if forwarded is not None:
        return forwarded
    return _send_control(_control(args.lab), f"/v1/nodes/{args.node}/{args.action}", {})


def cmd_status(args: argparse.Namespace) -> int:
    labs = _recorded()
    if not labs:
        print("no lab is up")
        return EXIT_OK
    for lab in labs:
        alive = {n: p for n, p in lab["pids"].items() if Path(f"/proc/{p}").exists()}
        print(f"lab {lab['lab_id']} ({lab['backend']}), spec {lab['spec']}")
        ctl = lab.get("controller_pid")
        if ctl is not None:
            state = "running" if Path(f"/proc/{ctl}").exists() else "exited"
            print(f"  {'controller':12s} pid {ctl:<8d} {state}, control {lab.get('control_url')}")
        for node, pid in sorted(lab["pids"].items()):
            print(f"  {node:12s} pid {pid:<8d} {'running' if node in alive else 'exited'}")
        for node, url in sorted(lab.get("metrics_urls", {}).items()):
            print(f"  metrics {node:12s} {url}")
        api = _openai_endpoint(Path(lab["spec"]))
        if api is not None:
            print(f'  openai api   {api}  (api key: the spec\'s "secret")')
        if lab.get("dashboard_url"):
            print(f'  dashboard    {lab["dashboard_url"]}#token=<the spec\'s "secret">')
    return EXIT_OK


def _openai_endpoint(spec_path: Path) -> str | None:
    """The OpenAI-compatible API of a recorded lab: its base URL and model, from its spec."""
    try:
        spec = json.loads(spec_path.read_text())
        http, model = spec["http"], spec["profile"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"http://{http['host']}:{http['port']}/v1  model {model}"


def cmd_exec(args: argparse.Namespace) -> int:
    labs = [lab for lab in _recorded() if args.lab in (None, lab["lab_id"])]
    if not labs:
        print("error: no lab is up (start one with `dualpath up -c CONFIG`)", file=sys.stderr)
        return EXIT_USAGE
    if len(labs) > 1:
        ids = ", ".join(lab["lab_id"] for lab in labs)
        print(f"error: several labs are up ({ids}); choose one with --lab", file=sys.stderr)
        return EXIT_USAGE
    lab = labs[0]
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("error: no command given (dualpath exec NODE -- CMD...)", file=sys.stderr)
        return EXIT_USAGE
    if lab["backend"] == "compose":
        return exec_in(lab, args.node, cmd, stdin=True)
    if lab["backend"] != "netns":
        os.execvp(cmd[0], cmd)
    ns = f"dp-{lab['lab_id']}-{args.node}"
    if not Path(f"/run/netns/{ns}").exists():
        print(f"error: lab {lab['lab_id']} has no node {args.node!r}", file=sys.stderr)
        return EXIT_USAGE
    os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])


def cmd_compose_render(args: argparse.Namespace) -> int:
    """The config as a compose file (one service per node; see docs/compose.md)."""
    cfg = _load(args)
    out = Path(args.output) if args.output else None
    root = repo_root()
    here = (out.parent if out else Path.cwd()).resolve()
    text = render_text(
        cfg,
        config_arg=args.config,
        output_arg=args.output,
        context=os.path.relpath(root, here) if root else None,
        policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        results=args.results,
        image=args.image,
        monitoring=args.monitoring,
    )
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return EXIT_OK

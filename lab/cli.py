"""The `dualpath` command line: run, compare, up, down, status, exec, analyze, doctor.

Only parses arguments, loads the config, calls the runner/backends and prints. Exit status:
0 ok, 1 the run failed, 2 bad input (config, arguments, missing privileges), 3 a run was
host-bound (its emulation health, lab.health; `--allow-host-bound` accepts it), 130
interrupted.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from lab.backends import (
    BackendError,
    LocalBackend,
    NetnsBackend,
    RunState,
    down_recorded,
    free_port_base,
    make_data_dir,
    state_dir,
)
from lab.chaos import ScenarioError, cluster_links
from lab.config import (
    LOCAL_PORTS,
    ConfigError,
    LabConfig,
    build_cluster_spec,
    load_config,
    parse_settings,
)
from lab.control import ControlServer
from lab.health import HOST_BOUND, verdict_of
from lab.report import comparison_table, summary_lines
from lab.runner import BACKENDS, RunError, compare, run_once
from lab.selftest import SelftestOptions
from lab.workload import TrajectoryFileError
from services.auth import AUTH_HEADER, bearer
from services.spec import LAB_ID_PATTERN, NODE_ID_PATTERN, Policy

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HOST_BOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_STATUS_HELP = (
    "exit status: 0 ok, 1 the run failed, 2 bad input, 3 a run was host-bound (this machine's "
    "CPU shaped its figures; --allow-host-bound accepts it), 130 interrupted"
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so that every `finally` cleans up."""


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated()


def _load(args: argparse.Namespace) -> LabConfig:
    overrides = parse_settings(getattr(args, "set", None) or [])
    if getattr(args, "policy", None):
        overrides["policy"] = args.policy
    return load_config(Path(args.config), overrides)


def _default_out(cfg: LabConfig, kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{cfg.name}-{kind}-{stamp}"


def _selftest_options(args: argparse.Namespace) -> SelftestOptions:
    return SelftestOptions(
        seconds=args.selftest_seconds,
        tolerance=args.tolerance / 100,
        max_concurrent_mbit=args.max_concurrent_mbit,
        allow_out_of_tolerance=getattr(args, "allow_out_of_tolerance", False),
    )


def host_bound_runs(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The names (policies) of the runs whose emulation-health verdict is host-bound."""
    return [name for name, s in summaries.items() if verdict_of(s) == HOST_BOUND]


def exit_status(summaries: Mapping[str, Mapping[str, Any]], *, allow_host_bound: bool) -> int:
    """The exit status of run/compare/chaos from their summaries: 1 when a run failed (a turn
    or node error, or bytes that do not balance), else 3 when a run was host-bound unless
    `allow_host_bound`, else 0. An "unknown" verdict (no timeline reported a step, e.g. an
    older node) does not fail."""
    if any(s.get("errors") or not s.get("bytes_accounted", True) for s in summaries.values()):
        return EXIT_FAILED
    if host_bound_runs(summaries) and not allow_host_bound:
        return EXIT_HOST_BOUND
    return EXIT_OK


def host_bound_message(summaries: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The last stderr line when a run was host-bound and that was not accepted; None else."""
    names = host_bound_runs(summaries)
    if not names:
        return None
    return (
        f"error: emulation was host-bound ({', '.join(names)}): this machine's CPU, not the "
        "emulated system, shaped the figures (emulation_health in summary.json says where); "
        "--allow-host-bound accepts them"
    )


def accept_host_bound(
    summaries: Mapping[str, dict[str, Any]], files: Mapping[str, Path], allow: bool
) -> None:
    """With --allow-host-bound: record `allowed_host_bound: true` in each host-bound run's
    summary and rewrite its summary.json (`files`, per run name; written by the runner, here
    or in a compose driver container)."""
    if not allow:
        return
    for name in host_bound_runs(summaries):
        summaries[name]["allowed_host_bound"] = True
        path = files.get(name)
        if path is not None and path.exists():
            path.write_text(json.dumps(summaries[name], indent=2))


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
    print("\n".join(summary_lines(summary)))
    print(f"summary: {out / 'summary.json'}")
    return _finish(runs, args)


def cmd_run(args: argparse.Namespace) -> int:
    if args.allow_out_of_tolerance and not args.selftest:
        raise ConfigError("--allow-out-of-tolerance: only means something with --selftest")
    if args.selftest and args.backend != "netns":
        raise ConfigError(
            f"--selftest: measures the shaped links of the netns backend, not {args.backend!r}"
        )
    cfg = _load(args)
    checks = _selftest_options(args) if args.selftest else None
    out = Path(args.out) if args.out else _default_out(cfg, cfg.policy.value)
    if args.backend == "compose":
        summary = _compose(cfg, [cfg.policy.value], out, args)
    else:
        summary = run_once(
            cfg, backend=args.backend, out_dir=out, progress=not args.quiet, selftest=checks
        ).summary
    return _single(summary, out, args)


def _compose(
    cfg: LabConfig,
    policies: list[str],
    out: Path,
    args: argparse.Namespace,
    scenario: str | None = None,
) -> dict[str, Any]:
    """One compose stack runs the policies (lab.compose_backend)."""
    from lab.compose_backend import run_stack

    return run_stack(
        cfg, policies=policies, out_dir=out, scenario_text=scenario, progress=not args.quiet
    )


def cmd_chaos(args: argparse.Namespace) -> int:
    """Run the workload once with a chaos scenario playing against the lab."""
    from lab.chaos import cluster_links, load_scenario

    cfg = _load(args)
    scenario = load_scenario(Path(args.scenario), cluster_links(cfg))  # before anything runs
    out = Path(args.out) if args.out else _default_out(cfg, f"chaos-{scenario.name}")
    if args.backend == "compose":  # the driver container compiles the same file again
        import yaml

        data = yaml.safe_load(Path(args.scenario).read_text())
        data.setdefault("name", scenario.name)
        text = yaml.safe_dump(data, sort_keys=False)
        summary = _compose(cfg, [cfg.policy.value], out, args, scenario=text)
    else:
        summary = run_once(
            cfg, backend=args.backend, out_dir=out, progress=not args.quiet, scenario=scenario
        ).summary
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
    print()
    print(
        f"{cfg.name}: {cfg.cluster.prefill_nodes}P{cfg.cluster.decode_nodes}D, "
        f"{cmp['runs']['basic']['num_agents']} agents, backend {args.backend}"
    )
    print(comparison_table(cmp))
    print(f"comparison: {out / 'comparison.json'}")
    return _finish(runs, args)


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
    if args.backend == "netns":
        from netem.kernel import require_net_admin

        require_net_admin()  # before anything is written
    lab_id = args.lab_id or secrets.token_hex(3)
    out = Path(args.out) if args.out else Path("results") / f"{cfg.name}-up-{lab_id}"
    out.mkdir(parents=True, exist_ok=True)
    base = free_port_base(LOCAL_PORTS) if args.backend == "local" else 0
    data_dir = make_data_dir(lab_id)  # exists before anything names it (lab.runner)
    try:
        spec = build_cluster_spec(
            cfg, lab_id=lab_id, backend=args.backend, data_dir=data_dir.path, base_port=base
        )
        spec_path = (out / "spec.json").resolve()
        spec.dump(spec_path)
        state = RunState(lab_id, args.backend, spec_path, data_dir, secret=spec.secret)
        if args.backend == "netns":
            be: LocalBackend | NetnsBackend = NetnsBackend(
                spec,
                spec_path,
                out / "logs",
                state,
                kv_min_fraction=cfg.network.kv_min_fraction,
                allow_unemulated=args.allow_unemulated,
            )
        else:
            be = LocalBackend(spec, spec_path, out / "logs", state)
    except BaseException:
        data_dir.remove()
        raise
    control: ControlServer | None = None
    try:
        be.up()
        control = ControlServer(be, cluster_links(cfg), secret=spec.secret)
        state.data["control_url"] = control.url
        state.data["controller_pid"] = os.getpid()
        state.save()
        print(f"lab {lab_id} is up ({args.backend}): {', '.join(n.node_id for n in spec.nodes)}")
        print(f"  scheduler HTTP API: http://{spec.http.host}:{spec.http.port}/v1/status")
        print(f"  control endpoint:   {control.url} (pid {os.getpid()} owns the lab)")
        print(f"  logs: {out / 'logs'}")
        print("  run a command in a node:  dualpath exec prefill-0 -- ss -tin")
        print("  change a link:            dualpath link set prefill-0 snic rate=50%")
        print(
            "  tear it down:             dualpath down" + ("" if args.detached else " (or Ctrl-C)")
        )
        if args.detached:
            _detach_output(out / "logs" / "controller.log")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `dualpath down`
        return EXIT_OK
    finally:
        if control is not None:
            control.close()
        be.down()  # the nodes, the network, the data directory, then the record


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
    import subprocess

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
    from scheduler.analysis import format_analysis, format_lab_analysis

    cfg = _load(args)
    result, lab = cfg.cluster.analysis(), cfg.cluster.lab_analysis()
    print(f"{cfg.name}: {format_analysis(result)}")
    print(format_lab_analysis(lab))
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace) -> int:
    """Measure every shaped link of the config's network against its configured rate (and
    delay); exit 1 when one is outside tolerance."""
    from lab.selftest import run_selftest

    cfg = _load(args)
    options = _selftest_options(args)
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
    from netem.doctor import probe

    report = probe()
    if args.json:
        from dataclasses import asdict

        data = asdict(report)
        data["features"] = [asdict(f) for f in report.features()]
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(report.lines()))
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    removed = down_recorded(args.lab)
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
    from lab.compose_backend import exec_argv, recorded_stack

    stack = recorded_stack(lab_id)
    if stack is None:
        return None
    return subprocess.run(exec_argv(stack, "driver", ["dualpath", *argv]), check=False).returncode


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
    return EXIT_OK


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
        from lab.compose_backend import exec_argv

        argv = exec_argv(lab, args.node, cmd)
        os.execvp(argv[0], argv)
    if lab["backend"] != "netns":
        os.execvp(cmd[0], cmd)
    ns = f"dp-{lab['lab_id']}-{args.node}"
    if not Path(f"/run/netns/{ns}").exists():
        print(f"error: lab {lab['lab_id']} has no node {args.node!r}", file=sys.stderr)
        return EXIT_USAGE
    os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])


def cmd_compose_render(args: argparse.Namespace) -> int:
    """The config as a compose file (one service per node; see docs/compose.md)."""
    from lab.compose_backend import repo_root
    from lab.compose_render import render_text

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
    )
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return EXIT_OK


def _lab_id(text: str) -> str:
    """A lab id as arguments give it: checked before it can name a file or a namespace."""
    if not re.fullmatch(LAB_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a lab id (1-8 lower-case letters or digits)"
        )
    return text


def _node_id(text: str) -> str:
    """A node id as arguments give it (it names a namespace and goes into URLs)."""
    if not re.fullmatch(NODE_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a node id (e.g. prefill-0)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dualpath",
        description="DualPath Mesh: a DualPath LLM-inference lab on real, shaped networks.",
        epilog=EXIT_STATUS_HELP,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, policy: bool = True) -> None:
        sp.add_argument("-c", "--config", required=True, help="lab config (YAML)")
        if policy:
            sp.add_argument("--policy", choices=[x.value for x in Policy], help="override policy")
        sp.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one config field, e.g. --set scheduling.compute_quota_ms=null",
        )
        sp.add_argument("--backend", choices=BACKENDS, default="netns", help="default: netns")
        sp.add_argument("--out", help="output directory (default: results/<name>-...)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    def measuring(sp: argparse.ArgumentParser, prefix: str = "") -> None:
        sp.add_argument(
            f"--{prefix}tolerance",
            dest="tolerance",
            type=float,
            default=5.0,
            metavar="PCT",
            help="allowed deviation of goodput from rate x MSS/(MTU+14), %% (default 5)",
        )
        sp.add_argument(
            "--selftest-seconds",
            type=float,
            default=2.0,
            metavar="S",
            help="measured seconds per link and direction (default 2)",
        )
        sp.add_argument(
            "--max-concurrent-mbit",
            type=float,
            default=1000.0,
            metavar="MBIT",
            help="links measured at once add up to at most this rate (default 1000)",
        )

    def judged(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--allow-host-bound",
            action="store_true",
            help="exit 0 even when a run's emulation health is host-bound (the host's CPU "
            "could not keep up; see emulation_health in summary.json), instead of 3; the "
            "summary records allowed_host_bound: true",
        )

    run = sub.add_parser(
        "run", help="run the workload once and write summary.json", epilog=EXIT_STATUS_HELP
    )
    common(run)
    judged(run)
    run.add_argument(
        "--selftest",
        action="store_true",
        help="measure every shaped link first (dualpath selftest); refuse to run when one is "
        "outside tolerance",
    )
    run.add_argument(
        "--allow-out-of-tolerance",
        action="store_true",
        help="with --selftest: run and report even when a link is outside tolerance (the "
        "summary records it)",
    )
    measuring(run, prefix="selftest-")
    run.set_defaults(func=cmd_run)
    sft = sub.add_parser(
        "selftest", help="measure every shaped link of a config's network against its rate"
    )
    sft.add_argument("-c", "--config", required=True, help="lab config (YAML)")
    sft.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field")
    sft.add_argument("--json", action="store_true", help="the report as JSON")
    sft.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    measuring(sft)
    sft.set_defaults(func=cmd_selftest)
    cmp = sub.add_parser(
        "compare", help="basic vs dualpath vs oracle on the same workload", epilog=EXIT_STATUS_HELP
    )
    common(cmp, policy=False)
    judged(cmp)
    cmp.set_defaults(func=cmd_compare)
    ch = sub.add_parser(
        "chaos",
        help="run the workload with a chaos scenario (YAML timeline)",
        epilog=EXIT_STATUS_HELP,
    )
    common(ch)
    judged(ch)
    ch.add_argument("--scenario", required=True, help="scenario file, e.g. examples/chaos/*.yaml")
    ch.set_defaults(func=cmd_chaos)
    up = sub.add_parser("up", help="bring a lab up and leave it running")
    common(up)
    up.add_argument(
        "--allow-unemulated",
        action="store_true",
        help="come up even if a link feature cannot be emulated here (see `dualpath doctor`)",
    )
    up.add_argument(
        "--foreground",
        action="store_true",
        help="own the lab from this process until Ctrl-C (default: a detached controller)",
    )
    up.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    up.add_argument("--lab-id", type=_lab_id, help=argparse.SUPPRESS)
    up.set_defaults(func=cmd_up)
    an = sub.add_parser("analyze", help="the bottleneck-free P/D range (DualPath §4.2)")
    an.add_argument("-c", "--config", required=True, help="lab config (YAML)")
    an.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field")
    an.set_defaults(func=cmd_analyze)
    down = sub.add_parser("down", help="stop every recorded lab and remove what it created")
    down.add_argument("--lab", type=_lab_id, help="only this lab id")
    down.set_defaults(func=cmd_down)
    doc = sub.add_parser("doctor", help="what this kernel/host can emulate, per link feature")
    doc.add_argument("--json", action="store_true", help="the report as JSON")
    doc.set_defaults(func=cmd_doctor)
    link = sub.add_parser("link", help="change a link of a running lab (up/run/chaos)")
    link_sub = link.add_subparsers(dest="link_command", required=True)
    ls = link_sub.add_parser("set", help="dualpath link set NODE NIC rate=50%% loss=1%% up=false")
    ls.add_argument("node", type=_node_id, help="e.g. prefill-0")
    ls.add_argument("nic", choices=["cnic", "snic"])
    ls.add_argument("changes", nargs="+", metavar="KEY=VALUE", help="rate, loss, delay, jitter, up")
    ls.add_argument("--lab", type=_lab_id, help="lab id, when several are running")
    ls.set_defaults(func=cmd_link_set)
    nd = sub.add_parser("node", help="stop, cont, kill or restart a node of a running lab")
    nd.add_argument("node", type=_node_id, help="e.g. decode-0")
    nd.add_argument("action", choices=["stop", "cont", "kill", "restart"])
    nd.add_argument("--lab", type=_lab_id, help="lab id, when several are running")
    nd.set_defaults(func=cmd_node)
    co = sub.add_parser("compose", help="Docker Compose files for a config")
    co_sub = co.add_subparsers(dest="compose_command", required=True)
    cr = co_sub.add_parser("render", help="write the config as a compose file")
    cr.add_argument("-c", "--config", required=True, help="lab config (YAML)")
    cr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field")
    cr.add_argument("-o", "--output", help="file to write (default: stdout)")
    cr.add_argument(
        "--policies", default="basic,dualpath,oracle", help="what the driver runs, in order"
    )
    cr.add_argument("--results", default="./results", help="host folder for results")
    cr.add_argument("--image", default="dualpath-mesh:latest", help="the image every service runs")
    cr.set_defaults(func=cmd_compose_render)
    st = sub.add_parser("status", help="labs that are up and their processes")
    st.set_defaults(func=cmd_status)
    ex = sub.add_parser("exec", help="run a command inside a node: dualpath exec NODE -- CMD")
    ex.add_argument("node", type=_node_id, help="node id, e.g. prefill-0")
    ex.add_argument("--lab", type=_lab_id, help="lab id, when several are up")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...")
    ex.set_defaults(func=cmd_exec)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Own both signals: a process started in the background inherits SIGINT ignored, and a
    # Ctrl-C or `kill -INT` must still take the lab down through every `finally`.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # `kill -USR1 <pid>` prints every thread's stack: a cheap way to see where a run waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        result: int = args.func(args)
        return result
    except (ConfigError, TrajectoryFileError, ScenarioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RunError as exc:
        print(f"error: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: the lab was taken down", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `dualpath analyze -c X | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:
        from netem.errors import NetemError, NetemPermissionError

        if isinstance(exc, NetemPermissionError):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, NetemError):
            print(f"error: network setup failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, OSError):  # a file or directory the user cannot write, a full disk
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())

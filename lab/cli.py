"""The `dualpath` command line: run, compare, report, up, down, status, exec, analyze, doctor.

Only parses arguments, loads the config, calls the runner/backends and prints. Exit status:
0 ok, 1 the run failed, 2 bad input (config, arguments, missing privileges), 3 a run was
host-bound (its emulation health, lab.results.health; `--allow-host-bound` accepts it), 130
interrupted.
"""

from __future__ import annotations

import argparse
import faulthandler
import re
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import NoReturn, TypeAlias

from dualpath.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STATUS_HELP,
    DualPathError,
    report,
)
from lab import commands
from lab.run.backends import BACKENDS
from lab.run.dashboard import DEFAULT_PORT as DEFAULT_DASHBOARD_PORT
from lab.run.traces import FORMATS
from services.spec import LAB_ID_PATTERN, NODE_ID_PATTERN, Policy

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so that every `finally` cleans up."""


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated()


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


def _common(sp: argparse.ArgumentParser, policy: bool = True) -> None:
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


def _measuring(sp: argparse.ArgumentParser, prefix: str = "") -> None:
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


def _judged(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--allow-host-bound",
        action="store_true",
        help="exit 0 even when a run's emulation health is host-bound (the host's CPU "
        "could not keep up; see emulation_health in summary.json), instead of 3; the "
        "summary records allowed_host_bound: true",
    )


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535; 0: any free one)")
    return int(text)


def _dashboard(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--dashboard",
        nargs="?",
        const=DEFAULT_DASHBOARD_PORT,
        type=_port,
        metavar="PORT",
        help="serve a live dashboard of the lab on 127.0.0.1:PORT while it is up (default "
        f"{DEFAULT_DASHBOARD_PORT}; 0: any free port); its URL, with the lab's secret, is printed",
    )


def _add_run(sub: Subparsers) -> None:
    run = sub.add_parser(
        "run", help="run the workload once and write summary.json", epilog=EXIT_STATUS_HELP
    )
    _common(run)
    _judged(run)
    _dashboard(run)
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
    _measuring(run, prefix="selftest-")
    run.set_defaults(func=commands.cmd_run)


def _add_selftest(sub: Subparsers) -> None:
    sft = sub.add_parser(
        "selftest", help="measure every shaped link of a config's network against its rate"
    )
    sft.add_argument("-c", "--config", required=True, help="lab config (YAML)")
    sft.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field")
    sft.add_argument("--json", action="store_true", help="the report as JSON")
    sft.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    _measuring(sft)
    sft.set_defaults(func=commands.cmd_selftest)


def _add_compare(sub: Subparsers) -> None:
    cmp = sub.add_parser(
        "compare", help="basic vs dualpath vs oracle on the same workload", epilog=EXIT_STATUS_HELP
    )
    _common(cmp, policy=False)
    _judged(cmp)
    cmp.set_defaults(func=commands.cmd_compare)


def _add_chaos(sub: Subparsers) -> None:
    ch = sub.add_parser(
        "chaos",
        help="run the workload with a chaos scenario (YAML timeline)",
        epilog=EXIT_STATUS_HELP,
    )
    _common(ch)
    _judged(ch)
    _dashboard(ch)
    ch.add_argument("--scenario", required=True, help="scenario file, e.g. examples/chaos/*.yaml")
    ch.set_defaults(func=commands.cmd_chaos)


def _add_report(sub: Subparsers) -> None:
    rp = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run, or of several runs side by side",
    )
    rp.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a run directory (summary.json), or a compare directory for its policies",
    )
    rp.add_argument(
        "-o", "--output", help="file to write (default: report.html in the one RUN_DIR)"
    )
    rp.set_defaults(func=commands.cmd_report)


def _add_up(sub: Subparsers) -> None:
    up = sub.add_parser("up", help="bring a lab up and leave it running")
    _common(up)
    _dashboard(up)
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
    up.set_defaults(func=commands.cmd_up)


def _add_analyze(sub: Subparsers) -> None:
    an = sub.add_parser("analyze", help="the bottleneck-free P/D range (DualPath §4.2)")
    an.add_argument("-c", "--config", required=True, help="lab config (YAML)")
    an.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field")
    an.set_defaults(func=commands.cmd_analyze)


def _add_down(sub: Subparsers) -> None:
    down = sub.add_parser("down", help="stop every recorded lab and remove what it created")
    down.add_argument("--lab", type=_lab_id, help="only this lab id")
    down.set_defaults(func=commands.cmd_down)


def _add_doctor(sub: Subparsers) -> None:
    doc = sub.add_parser("doctor", help="what this kernel/host can emulate, per link feature")
    doc.add_argument("--json", action="store_true", help="the report as JSON")
    doc.set_defaults(func=commands.cmd_doctor)


def _add_trace(sub: Subparsers) -> None:
    trace = sub.add_parser("trace", help="public request traces (Mooncake, Qwen-Bailian)")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    ts = trace_sub.add_parser(
        "stats", help="requests, arrival rate, lengths and the offline prefix-hit rate"
    )
    ts.add_argument("file", help="the trace (JSON lines)")
    ts.add_argument(
        "--format", default="mooncake", choices=sorted(FORMATS), help="default: mooncake"
    )
    ts.add_argument("--json", action="store_true", help="the figures as JSON")
    ts.set_defaults(func=commands.cmd_trace_stats)


def _add_tokenizer(sub: Subparsers) -> None:
    tk = sub.add_parser(
        "tokenizer",
        help="write the lab's tokenizer (a token per UTF-8 byte) as HuggingFace files, for"
        " benchmark clients such as AIPerf",
    )
    tk.add_argument("dir", help="directory to write tokenizer.json and tokenizer_config.json to")
    tk.add_argument(
        "--hub-cache",
        help="also lay the files out as a HuggingFace hub cache here (HF_HUB_CACHE), so a"
        " client that takes only a repo id loads them offline",
    )
    tk.add_argument(
        "--repo-id", default=commands.TOKENIZER_REPO_ID, help="repo id in the hub cache"
    )
    tk.set_defaults(func=commands.cmd_tokenizer)


def _add_policies(sub: Subparsers) -> None:
    po = sub.add_parser(
        "policies",
        help="scheduling policies: built-in and plugins (entry points dualpath.policies)",
    )
    po.add_argument("--json", action="store_true", help="the list as JSON")
    po.set_defaults(func=commands.cmd_policies)


def _add_link(sub: Subparsers) -> None:
    link = sub.add_parser("link", help="change a link of a running lab (up/run/chaos)")
    link_sub = link.add_subparsers(dest="link_command", required=True)
    ls = link_sub.add_parser("set", help="dualpath link set NODE NIC rate=50%% loss=1%% up=false")
    ls.add_argument("node", type=_node_id, help="e.g. prefill-0")
    ls.add_argument("nic", choices=["cnic", "snic"])
    ls.add_argument("changes", nargs="+", metavar="KEY=VALUE", help="rate, loss, delay, jitter, up")
    ls.add_argument("--lab", type=_lab_id, help="lab id, when several are running")
    ls.set_defaults(func=commands.cmd_link_set)


def _add_node(sub: Subparsers) -> None:
    nd = sub.add_parser("node", help="stop, cont, kill or restart a node of a running lab")
    nd.add_argument("node", type=_node_id, help="e.g. decode-0")
    nd.add_argument("action", choices=["stop", "cont", "kill", "restart"])
    nd.add_argument("--lab", type=_lab_id, help="lab id, when several are running")
    nd.set_defaults(func=commands.cmd_node)


def _add_compose(sub: Subparsers) -> None:
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
    cr.add_argument(
        "--no-monitoring",
        dest="monitoring",
        action="store_false",
        help="leave out the Prometheus service of the profile `monitoring` (a file for swarm, "
        "whose schema has no profiles)",
    )
    cr.set_defaults(func=commands.cmd_compose_render)


def _add_status(sub: Subparsers) -> None:
    st = sub.add_parser("status", help="labs that are up and their processes")
    st.set_defaults(func=commands.cmd_status)


def _add_exec(sub: Subparsers) -> None:
    ex = sub.add_parser("exec", help="run a command inside a node: dualpath exec NODE -- CMD")
    ex.add_argument("node", type=_node_id, help="node id, e.g. prefill-0")
    ex.add_argument("--lab", type=_lab_id, help="lab id, when several are up")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...")
    ex.set_defaults(func=commands.cmd_exec)


VERBS: tuple[Callable[[Subparsers], None], ...] = (
    _add_run,
    _add_selftest,
    _add_compare,
    _add_chaos,
    _add_report,
    _add_up,
    _add_analyze,
    _add_down,
    _add_doctor,
    _add_link,
    _add_node,
    _add_compose,
    _add_status,
    _add_exec,
    _add_trace,
    _add_policies,
    _add_tokenizer,
)
"""Every verb of `dualpath`, in the order `--help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dualpath",
        description="DualPath Mesh: a DualPath LLM-inference lab on real, shaped networks.",
        epilog=EXIT_STATUS_HELP,
    )
    sub = p.add_subparsers(dest="command", required=True)

    for add in VERBS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, run the verb, and turn how it ended into the exit status: the one place where
    an error becomes a message and a status (dualpath.errors)."""
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
    except DualPathError as exc:
        return report(exc)
    except KeyboardInterrupt:
        print("interrupted: the lab was taken down", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `dualpath analyze -c X | head`
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:  # a file or directory the user cannot write, a full disk
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""Bench: NVIDIA's AIPerf replays a Mooncake trace against the lab's OpenAI-compatible API, and
its TTFT and inter-token latency are set beside the lab's own record of the same requests.

A cluster comes up as local processes on loopback (`--config`, default: the laptop model on
1P1D at tau 1). The lab's tokenizer is written as a HuggingFace hub-cache entry
(`dualpath tokenizer --hub-cache`), so AIPerf counts the tokens the lab counts and needs no
network. The trace is the first `--requests` lines of `--trace`, each prompt capped at
`--max-input` tokens (a multiple of 512: its hash_ids cut to match) and each output at
`--max-output`, timestamps divided by `--speedup`. AIPerf sends it on its fixed schedule,
streaming, then the lab's GET /v1/api/summary is read. The host's CPU use over the replay is
reported with the figures: a host that did not keep up shapes both sides alike, but it is not
DualPath's latency any more.

    make aiperf   # AIPerf in its own venv (.venv-aiperf)
    .venv/bin/python bench/aiperf_replay.py --out /tmp/aip [--requests 1500] [--speedup 2]
        [--max-input 131072] [--max-output 4096] [--endpoint chat] [--json]

Output: a table (AIPerf, lab, AIPerf / lab) and `result.json` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.config.cluster import build_cluster_spec  # noqa: E402
from lab.config.models import load_config, parse_config  # noqa: E402
from lab.run.backends import LocalBackend, RunState, free_port_base  # noqa: E402
from services.spec import ClusterSpec  # noqa: E402

SAMPLE = REPO / "tests" / "data" / "traces" / "mooncake-conversation-first1500.jsonl"
AIPERF = Path(os.environ.get("DUALPATH_AIPERF", REPO / ".venv-aiperf" / "bin" / "aiperf"))
DUALPATH = Path(sys.executable).parent / "dualpath"
TRACE_BLOCK = 512
DEFAULT_CONFIG: dict[str, Any] = {
    "name": "aiperf",
    "model": {"name": "ds27b-like", "max_model_len": 131072},
    "cluster": {"prefill_nodes": 1, "decode_nodes": 1, "storage_servers": 2, "gpus_per_node": 4},
    "scaling": {"bandwidth_scale": 0.00025, "time_dilation": 1},
}


def capped_trace(
    src: Path, dst: Path, requests: int, max_in: int, max_out: int, speedup: float
) -> int:
    """The first `requests` lines of a Mooncake trace, capped; returns how many were written."""
    if max_in % TRACE_BLOCK:
        raise SystemExit(f"--max-input must be a multiple of {TRACE_BLOCK}")
    rows = []
    with src.open() as f:
        for line in f:
            if len(rows) >= requests:
                break
            d = json.loads(line)
            if d["input_length"] > max_in:
                d["input_length"] = max_in
                d["hash_ids"] = d["hash_ids"][: math.ceil(max_in / TRACE_BLOCK)]
            d["output_length"] = max(1, min(int(d["output_length"]), max_out))
            d["timestamp"] = int(d["timestamp"] / speedup)
            rows.append(d)
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the host so far (/proc/stat's cpu line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def get_json(spec: ClusterSpec, path: str) -> Any:
    url = f"http://{spec.http.host}:{spec.http.port}{path}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def bring_up(
    config: dict[str, Any] | None, config_path: Path | None, out: Path
) -> tuple[ClusterSpec, LocalBackend]:
    cfg = load_config(config_path) if config_path else parse_config(config or DEFAULT_CONFIG)
    spec = build_cluster_spec(
        cfg, lab_id="aiperf", backend="local", data_dir=out / "data", base_port=free_port_base(64)
    )
    spec_path = out / "spec.json"
    spec.dump(spec_path)
    be = LocalBackend(spec, spec_path, out / "logs", RunState("aiperf", "local", spec_path, None))
    be.up()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if get_json(spec, "/v1/status").get("ready"):
                return spec, be
        except OSError:
            pass
        time.sleep(0.1)
    be.down()
    raise SystemExit("the lab did not come up within 60 s")


def run_aiperf(spec: ClusterSpec, trace: Path, out: Path, endpoint: str, timeout_s: float) -> Path:
    hub = out / "hf-cache"
    subprocess.run(
        [str(DUALPATH), "tokenizer", str(out / "tokenizer"), "--hub-cache", str(hub)],
        check=True,
        capture_output=True,
    )
    artifacts = out / "aiperf"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "AIPERF_DATASET_MMAP_CACHE_DIR": str(out / "aiperf-cache"),
    }
    cmd = [
        str(AIPERF), "profile",
        "--model", spec.profile.name,
        "--url", f"http://{spec.http.host}:{spec.http.port}",
        "--endpoint-type", endpoint, "--streaming",
        "--tokenizer", "dualpath/byte-tokenizer",
        "--custom-dataset-type", "mooncake_trace", "--input-file", str(trace),
        "--fixed-schedule",
        "--header", f"Authorization:Bearer {spec.secret}",
        "--output-artifact-dir", str(artifacts),
        "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry",
        "--workers-max", "1", "--record-processors", "1", "--random-seed", "1",
    ]  # fmt: skip
    with (out / "aiperf.log").open("w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if done.returncode != 0:
        raise SystemExit(f"aiperf exited {done.returncode}; see {out / 'aiperf.log'}")
    return artifacts


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not AIPERF.exists():
        raise SystemExit(f"no AIPerf at {AIPERF}: run `make aiperf` (or set DUALPATH_AIPERF)")
    trace = out / "trace.jsonl"
    n = capped_trace(
        Path(args.trace), trace, args.requests, args.max_input, args.max_output, args.speedup
    )
    expected = [json.loads(line) for line in trace.read_text().splitlines()]
    spec, be = bring_up(None, Path(args.config) if args.config else None, out)
    try:
        busy0, total0 = cpu_busy()
        t0 = time.monotonic()
        artifacts = run_aiperf(spec, trace, out, args.endpoint, args.timeout)
        wall = time.monotonic() - t0
        busy1, total1 = cpu_busy()
        lab = get_json(spec, "/v1/api/summary")
        metrics = get_json(spec, "/v1/cluster")
    finally:
        be.down()
    export = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    records = [
        json.loads(line) for line in (artifacts / "profile_export.jsonl").read_text().splitlines()
    ]

    def p50(key: str) -> float | None:
        block = export.get(key) or {}
        return block.get("p50")

    isl = sorted(int(r["metrics"]["input_sequence_length"]["value"]) for r in records)
    osl = sorted(int(r["metrics"]["output_sequence_length"]["value"]) for r in records)
    ttft_aiperf, itl_aiperf = p50("time_to_first_token"), p50("inter_token_latency")
    ttft_lab = lab["ttft_s"]["p50"] * 1000 if lab["ttft_s"]["p50"] is not None else None
    itl_lab = lab["itl_s"]["p50"] * 1000 if lab["itl_s"]["p50"] is not None else None
    return {
        "trace": str(args.trace),
        "requests": n,
        "speedup": args.speedup,
        "max_input": args.max_input,
        "max_output": args.max_output,
        "endpoint": args.endpoint,
        "aiperf_requests": len(records),
        "aiperf_errors": (export.get("error_request_count") or {}).get("avg", 0),
        "isl_matches_trace": isl == sorted(int(r["input_length"]) for r in expected),
        "osl_matches_trace": osl == sorted(int(r["output_length"]) for r in expected),
        "lab": lab,
        "ttft_p50_ms": {
            "aiperf": ttft_aiperf,
            "lab": ttft_lab,
            "ratio": _ratio(ttft_aiperf, ttft_lab),
        },
        "itl_p50_ms": {"aiperf": itl_aiperf, "lab": itl_lab, "ratio": _ratio(itl_aiperf, itl_lab)},
        "wall_s": round(wall, 1),
        "host_cpu_busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "nodes": sorted(metrics),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace", default=str(SAMPLE))
    ap.add_argument("--config", help="lab config (YAML); default: the laptop model, 1P1D, tau 1")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--max-input", type=int, default=131072)
    ap.add_argument("--max-output", type=int, default=4096)
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--timeout", type=float, default=3600.0, help="AIPerf's, in seconds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args)
    Path(args.out, "result.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['aiperf_requests']} requests by AIPerf ({result['aiperf_errors']} errors), "
        f"{result['wall_s']} s, host CPU {100 * result['host_cpu_busy']:.0f} % busy"
    )
    print(f"  ISL as the trace: {result['isl_matches_trace']}, OSL: {result['osl_matches_trace']}")
    print(f"  {'p50':10s} {'AIPerf':>10s} {'lab':>10s} {'ratio':>8s}")
    for key in ("ttft_p50_ms", "itl_p50_ms"):
        row = result[key]
        print(f"  {key:10s} {row['aiperf']:10.2f} {row['lab']:10.2f} {row['ratio']:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

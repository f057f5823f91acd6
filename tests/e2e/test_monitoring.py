"""The compose profile `monitoring` on a real engine, with a real Prometheus server (Debian's
package, built offline: compose/build-monitoring-image.sh).

A rendered file comes up with `--profile monitoring`; the driver runs DualPath on the small
config while Prometheus scrapes every node's exporter and the scheduler. Then, through the
server's HTTP API from the host (its mgmt address; the host has one on each bridge):

- every target was scraped during the run;
- prefill-0's and decode-0's snic ingress bytes over the run match summary.json's
  `kernel_counters` (the runner's own samples of the same kernel counters) within 1 %;
- the recording rules evaluate without error; the utilisation rule, summed over the run's
  evaluations and times the shaped rate, gives back prefill-0's snic bytes within 5 %, and
  its peak is a busy link's;
- every PromQL expression of compose/monitoring/grafana-dashboard.json returns data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from stack_helpers import ROOT, RUN_TIMEOUT_S, need, nothing_left, render

from compose import engine, monitoring
from compose.backend import run_cmd
from compose.render import LAB_LABEL, NODE_LABEL

DASHBOARD = ROOT / "compose" / "monitoring" / "grafana-dashboard.json"
BYTES_TOLERANCE = 0.01
"""Two checks of the same kernel counter (cumulative since the container shaped its NIC):

- Its value at the run's end against the run's bytes in summary.json: the stack is new and runs
  one policy, so they differ by what the NIC carried before the run (control traffic, a few KB)
  and between the end and the samples after it (idle: no KV is read after the last turn).
- Its growth over the run, windowed as the runner windows its samples: the runner (every 0.5 s)
  and Prometheus (every 1 s) read the counter at different instants, equal where the edges are
  idle. But a node's exporter starts with its node process, shortly before the run; when
  Prometheus's first scrape comes after the run's start (about 1 s after, on a quiet host),
  what the NIC can carry in that gap at its shaped rate, plus the runner's 0.5 s, is allowed
  on top."""
RUNNER_SAMPLE_S = 0.5
RULE_TOLERANCE = 0.05
"""The rule is evaluated every second over the last 5 s, so each byte is counted by five
evaluations a fifth each: the sum over the run (and 5 s past it) times the rate is the bytes.
What it may miss: an evaluation or a scrape a loaded host delays, and rate()'s extrapolation at
the ends of a node's series."""
PROFILE_ARGS = ("--profile", monitoring.PROFILE)


@pytest.fixture(scope="session")
def prometheus_image(image: str) -> str:
    """The Prometheus image of these sources, built (offline with DUALPATH_OFFLINE=1) or
    reused."""
    argv = [str(ROOT / "compose" / "build-monitoring-image.sh")]
    if os.environ.get("DUALPATH_OFFLINE") == "1":
        argv.append("--offline")
    env = {**os.environ, "DUALPATH_PYTHON": sys.executable}  # its engine steps: our SDK
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, env=env)
    if done.returncode != 0:
        need(f"building the Prometheus image failed: {done.stderr[-2000:]}")
    return done.stdout.strip()


def _api(base: str, path: str, **params: Any) -> Any:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as resp:
        body: dict[str, Any] = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def _value_at(base: str, query: str, at: float) -> float:
    (series,) = _api(base, "query", query=query, time=f"{at:.3f}")["result"]
    return float(series["value"][1])


def _window(base: str, series: str, started: float, finished: float) -> tuple[float, float, float]:
    """A counter over the run from Prometheus's raw samples, windowed as the runner windows its
    own (lab.results.kernel_series): the last sample at or before `started` and the first at or
    after `finished` (the nearest inside where there is none outside). Their values, and the
    seconds of the run the window leaves out."""
    span = round(finished - started) + 60
    (got,) = _api(base, "query", query=f"{series}[{span}s]", time=f"{finished + 30:.3f}")["result"]
    samples = [(float(ts), float(v)) for ts, v in got["values"]]
    before = [s for s in samples if s[0] <= started]
    after = [s for s in samples if s[0] >= finished]
    first = before[-1] if before else samples[0]
    last = after[0] if after else samples[-1]
    return first[1], last[1], max(0.0, first[0] - started) + max(0.0, finished - last[0])


def _wait_for_driver(lab: str) -> dict[str, Any]:
    (cid,) = engine.ids("container", {LAB_LABEL: lab, NODE_LABEL: "driver"})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        st = engine.states({"driver": cid})["driver"]
        if not st["Running"]:
            return st
        time.sleep(2.0)
    raise AssertionError(f"the driver did not finish within {RUN_TIMEOUT_S} s")


def _finite(series: list[dict[str, Any]]) -> int:
    return sum(1 for s in series for _, v in s["values"] if v not in ("NaN", "+Inf", "-Inf"))


def test_prometheus_scrapes_the_lab_and_matches_the_summary(
    compose: tuple[str, ...], image: str, prometheus_image: str, lab_name: str, tmp_path: Path
) -> None:
    file = tmp_path / "docker-compose.yml"
    render(file, lab_name, image=image, policies="dualpath")
    doc = yaml.safe_load(file.read_text())
    assert doc["services"][monitoring.SERVICE]["profiles"] == [monitoring.PROFILE]
    mgmt = doc["networks"]["mgmt"]["ipam"]["config"][0]["subnet"]
    base = monitoring.url(mgmt)
    project = [*compose, "-p", lab_name, "-f", str(file), *PROFILE_ARGS]
    try:
        run_cmd([*project, "up", "-d", "--no-build"])
        st = _wait_for_driver(lab_name)
        assert st["ExitCode"] == 0, engine.logs(
            engine.ids("container", {LAB_LABEL: lab_name, NODE_LABEL: "driver"})[0],
            name="driver",
            tail=60,
        ).decode()
        (run_dir,) = (tmp_path / "results").glob(f"{lab_name}-*/summary.json")
        summary = json.loads(run_dir.read_text())
        driver = json.loads(run_dir.with_name("driver.json").read_text())
        started, finished = float(driver["started_at"]), float(driver["finished_at"])
        # one scrape interval past the end: Prometheus's first sample at or after it
        end = finished + monitoring.SCRAPE_INTERVAL_S
        run_s = f"{round(end - started)}s"

        # every node's exporter and the scheduler were scraped during the run
        up = _api(base, "query", query=f'max_over_time(up{{lab="{lab_name}"}}[{run_s}])', time=end)
        seen = {r["metric"]["instance"]: r["value"][1] for r in up["result"]}
        nodes = [s for s in doc["services"] if s not in ("driver", monitoring.SERVICE)]
        assert seen == {
            **{f"{n}:7600": "1" for n in nodes},
            "scheduler:7401": "1",
        }

        # snic bytes over the run: Prometheus against the runner's kernel counters
        measured: dict[str, tuple[int, int, int, float]] = {}
        slack: dict[str, float] = {}
        for node in ("prefill-0", "decode-0"):
            query = (
                f'dualpath_nic_bytes_total{{lab="{lab_name}", node="{node}", nic="snic",'
                ' direction="ingress"}'
            )
            first, last, uncovered = _window(base, query, started, finished)
            runner = int(summary["kernel_counters"][node]["snic"]["ingress"]["bytes"])
            rate_bytes = float(summary["nics"][node]["snic"]["rate_mbit"]) * 1e6 / 8
            slack[node] = rate_bytes * (uncovered + RUNNER_SAMPLE_S) if uncovered else 0.0
            measured[node] = (round(last), round(last - first), runner, round(uncovered, 3))
            assert runner > 10_000_000, summary["kernel_counters"][node]
            assert abs(last - runner) <= BYTES_TOLERANCE * runner, (node, measured[node])
            allowed = BYTES_TOLERANCE * runner + slack[node]
            assert abs(last - first - runner) <= allowed, (node, measured[node])
        print(
            "snic ingress bytes: Prometheus at the end, its growth over the run, summary.json,"
            f" s of the run before Prometheus's first sample: {measured}"
        )

        # the recording rules evaluate, and utilisation agrees with the summary's
        rules = [r for g in _api(base, "rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} >= {
            "dualpath:nic_bits_per_second:rate5s",
            "dualpath:nic_utilisation:ratio_rate5s",
            "dualpath:snic_read_share:ratio_rate5s",
        }
        assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules
        rate_bits = float(summary["nics"]["prefill-0"]["snic"]["rate_mbit"]) * 1e6
        tail = finished + 6  # the last evaluations whose 5 s windows still hold the run's bytes
        time.sleep(max(0.0, tail + 2 - time.time()))
        util_q = (
            f'sum_over_time(dualpath:nic_utilisation:ratio_rate5s{{lab="{lab_name}",'
            f' node="prefill-0", nic="snic", direction="ingress"}}[{round(tail - started)}s])'
        )
        from_rule = _value_at(base, util_q, tail) * monitoring.SCRAPE_INTERVAL_S * rate_bits / 8
        runner = measured["prefill-0"][2]
        print(f"prefill-0 snic ingress bytes from the utilisation rule: {from_rule:.0f}")
        allowed = RULE_TOLERANCE * runner + slack["prefill-0"]
        assert abs(from_rule - runner) <= allowed, (from_rule, runner)
        peak_q = util_q.replace("sum_over_time", "max_over_time")
        # a busy link, about its rate at most: a scrape's timestamp is when it began, the
        # exporter reads the kernel a little later, so a 5 s rate may read a few % high
        assert 0.5 < _value_at(base, peak_q, tail) <= 1.25
        share = _value_at(
            base,
            f'max_over_time(dualpath:snic_read_share:ratio_rate5s{{lab="{lab_name}",'
            f' node="decode-0"}}[{run_s}])',
            end,
        )
        assert 0.2 < share <= 1.0  # DualPath reads through the decode node's snic too

        # every panel's expression returns data over the run (Grafana substitutes $lab)
        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$lab", lab_name)
                got = _api(base, "query_range", query=expr, start=started, end=end, step="1s")
                if _finite(got["result"]) == 0:
                    empty.append(f"{panel['title']}/{target['refId']}: {expr}")
        assert empty == []
    finally:
        run_cmd([*project, "down", "-v", "--remove-orphans", "-t", "5"])
    nothing_left(lab_name)

"""Kernel counters where users look: a node's /metrics (served from inside its namespace, read
with pyroute2 there) and the self-test's measurement of a lab's links. No assertion on speed
except the self-test's own subject, a link shaped to half its configured rate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from netem_helpers import ROOT_REASON, address, engine_host, netns_names, run, send_marked
from test_lab_lifecycle import TINY

from lab.run.selftest import SelftestOptions, links_of, measure
from netem.netns import NetnsLab
from netem.spec import HostSpec, LinkShape, NicSpec, TopologySpec
from services.prom import parse_samples, sample_key

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
]

MakeLab = Callable[[TopologySpec], NetnsLab]
PORT = 7600
NBYTES = 2_000_000

_EXPORTER = """
import asyncio, sys, uvloop
from services.prom import MetricsExporter

async def main():
    exporter = MetricsExporter.of_this_namespace(sys.argv[1], "prefill")
    await exporter.start(sys.argv[2], int(sys.argv[3]))
    print("ready", flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""

_SCRAPE = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers
    sys.stdout.write(r.read().decode())
"""


def _of_lab(lab_id: str) -> set[str]:
    """Namespaces of one lab still present (other labs may come and go meanwhile)."""
    return {n for n in netns_names() if n.startswith(f"dp-{lab_id}-")}


def test_a_node_exports_its_own_kernel_counters(make_lab: MakeLab, lab_id: str) -> None:
    lab = make_lab(
        TopologySpec(
            lab_id,
            (
                engine_host("prefill-0", 0, cnic_mbit=200, snic_mbit=50),
                engine_host("decode-0", 1, cnic_mbit=200, snic_mbit=None),
            ),
        )
    )
    lab.up()
    mgmt = address(lab, "prefill-0", "mgmt")
    exporter = subprocess.Popen(
        lab.exec_argv("prefill-0", [sys.executable, "-c", _EXPORTER, "prefill-0", mgmt, str(PORT)]),
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert exporter.stdout is not None
        assert exporter.stdout.readline().strip() == "ready"
        url = f"http://{mgmt}:{PORT}/metrics"

        def scrape() -> dict[str, float]:
            text = run(lab.exec_argv("decode-0", [sys.executable, "-c", _SCRAPE, url]))
            return parse_samples(text)

        before = scrape()
        got = send_marked(
            lab, sender="prefill-0", receiver="decode-0", nic="cnic", dscp=46, nbytes=NBYTES,
            port=7101,
        )  # fmt: skip
        assert got == NBYTES
        after = scrape()
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
    labels = {"node": "prefill-0", "role": "prefill", "nic": "cnic", "direction": "egress"}
    coll = sample_key("dualpath_class_bytes_total", {**labels, "class": "collective"})
    kv = sample_key("dualpath_class_bytes_total", {**labels, "class": "kv"})
    nic_bytes = sample_key("dualpath_nic_bytes_total", labels)
    # The marked bytes went through the collective class and the exporter saw them there.
    assert after[coll] - before[coll] >= NBYTES
    assert after[kv] - before[kv] < NBYTES // 100
    assert after[nic_bytes] >= before[nic_bytes] + NBYTES
    # Rates are the kernel's: the lab's configured ones, per NIC; unshaped NICs have none.
    rate = "dualpath_nic_rate_bits_per_second"
    assert after[sample_key(rate, labels)] == 200e6
    assert after[sample_key(rate, {**labels, "nic": "snic", "direction": "ingress"})] == 50e6
    assert not any(k.startswith(rate) and 'nic="mgmt"' in k for k in after)
    assert sample_key("dualpath_nic_bytes_total", {**labels, "nic": "mgmt"}) in after


def test_selftest_flags_a_link_the_kernel_shapes_differently_from_its_spec(
    make_lab: MakeLab, lab_id: str
) -> None:
    """Both snic directions of a node are measured against an unshaped probe; the egress class
    is then changed behind the lab's back to half its rate, and only that link fails."""
    spec = TopologySpec(
        lab_id,
        (
            HostSpec("prefill-0", (NicSpec("snic", "storage", "198.18.1.10/24", LinkShape(40)),)),
            HostSpec("probe-storage", (NicSpec("probe", "storage", "198.18.1.254/24"),)),
        ),
    )
    lab = make_lab(spec)
    lab.up()
    assert [x.name for x in links_of(lab.spec)] == [
        "prefill-0.snic.egress",
        "prefill-0.snic.ingress",
    ]
    ns = lab.namespace("prefill-0")
    run(["tc", "-n", ns, "class", "change", "dev", "snic", "parent", "1:", "classid", "1:1",
         "htb", "rate", "20mbit", "ceil", "20mbit"])  # fmt: skip
    options = SelftestOptions(seconds=1.0, warmup_s=0.3, tolerance=0.05)
    results, rounds = measure(lab, options)
    assert rounds == 2
    by_name = {r.link.name: r for r in results}
    egress, ingress = by_name["prefill-0.snic.egress"], by_name["prefill-0.snic.ingress"]
    assert (egress.mss, egress.mtu) == (1448, 1500)
    assert egress.expected_mbit == pytest.approx(40 * 1448 / 1514)
    assert egress.error < -0.3  # shaped to 20 of 40 Mbit/s
    assert abs(ingress.error) <= 0.05
    assert ingress.rtt_status == "no delay configured" and ingress.rtt_ms is not None


def test_selftest_cli_tears_down_what_it_made(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\n"
        "cluster: {prefill_nodes: 1, decode_nodes: 1, storage_servers: 1, gpus_per_node: 1,\n"
        "          cnic_gbit_per_gpu: 160, snic_gbit: 80}\n"
        "scaling: {bandwidth_scale: 0.00025, time_dilation: 2}\n"
    )
    env = {**os.environ, "DUALPATH_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run(
        [sys.executable, "-m", "lab.cli", "selftest", "-c", str(config), "--json",
         "--selftest-seconds", "0.5"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    import json

    doc = json.loads(done.stdout)
    assert [x["node"] + "." + x["nic"] + "." + x["direction"] for x in doc["links"]] == [
        f"{node}.{nic}.{d}"
        for node in ("prefill-0", "decode-0")
        for nic in ("cnic", "snic")
        for d in ("egress", "ingress")
    ]
    assert {x["rate_mbit"] for x in doc["links"] if x["nic"] == "cnic"} == {40.0}
    assert all(x["goodput_mbit"] > 0 and x["mss"] == 1448 for x in doc["links"])
    assert doc["passed"] == (done.returncode == 0)
    assert not _of_lab(doc["lab_id"])
    assert not list((tmp_path / "state").glob("*.json"))


TINY_RUN = {
    **TINY,
    "name": "observed",
    # Two prefill nodes, so collectives flow; CNIC:SNIC 4 with one GPU per node.
    "cluster": {
        "prefill_nodes": 2,
        "decode_nodes": 1,
        "storage_servers": 1,
        "gpus_per_node": 1,
        "cnic_gbit_per_gpu": 1600,
    },
}


def _cli(args: list[str], env: dict[str, str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lab.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        **kw,  # type: ignore[call-overload]
    )


def test_run_with_selftest_records_counters_queues_and_metrics(tmp_path: Path) -> None:
    import json

    import yaml

    config = tmp_path / "observed.yaml"
    # Long enough (dilated 20x) to be scraped while it runs; it is stopped with SIGTERM.
    long = {
        **TINY_RUN,
        "scaling": {"bandwidth_scale": 0.00025, "time_dilation": 20},
        "workload": {**TINY_RUN["workload"], "num_agents": 8, "max_turns_per_agent": 20},
    }
    config.write_text(yaml.safe_dump(long))
    state = tmp_path / "state"
    env = {**os.environ, "DUALPATH_STATE_DIR": str(state), "DUALPATH_DATA_DIR": str(tmp_path)}
    out = tmp_path / "run"
    # The selftest's 0.5 s windows may read a link a few per cent over its rate (HTB's burst):
    # this test is about the counters and /metrics, so a link out of tolerance does not stop it.
    proc = _cli(
        ["run", "-c", str(config), "--out", str(out), "-q", "--selftest", "--selftest-seconds",
         "0.5", "--allow-out-of-tolerance"],
        env,
    )  # fmt: skip
    try:
        # While the workload runs, the run state lists each node's /metrics and they answer.
        urls: dict[str, str] = {}
        lab_id = ""
        deadline = time.monotonic() + 120
        while not urls and time.monotonic() < deadline and proc.poll() is None:
            for path in state.glob("*.run.json"):
                data = json.loads(path.read_text())
                urls, lab_id = data.get("metrics_urls", {}), data["lab_id"]
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        assert set(urls) == {"prefill-0", "prefill-1", "decode-0", "storage-0", "scheduler"}
        scrape = [sys.executable, "-c", _SCRAPE, urls["prefill-0"]]
        text = ""
        for _ in range(50):  # the node may still be starting its exporter
            done = subprocess.run(
                ["ip", "netns", "exec", f"dp-{lab_id}-scheduler", *scrape],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if done.returncode == 0:
                text = done.stdout
                break
            time.sleep(0.2)
        samples = parse_samples(text)
        assert any(k.startswith("dualpath_class_bytes_total") and 'class="collective"' in k
                   for k in samples)  # fmt: skip
        assert any('nic="snic"' in k for k in samples)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert lab_id and not _of_lab(lab_id)

    # A whole run: the selftest's verdict, the window's counters and the queue columns. Its
    # figures are not asserted, so a host-bound verdict (exit 3 on a busy two-core machine)
    # does not stop it; the verdict itself is tests/unit/test_health.py's and the CLI's.
    config.write_text(yaml.safe_dump(TINY_RUN))
    done = subprocess.run(
        [sys.executable, "-m", "lab.cli", "run", "-c", str(config), "--out", str(out), "-q",
         "--selftest", "--selftest-seconds", "0.5", "--allow-out-of-tolerance",
         "--allow-host-bound"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "passed" in summary["selftest"] and len(summary["selftest"]["links"]) == 12
    assert (out / "selftest.json").exists()
    cnic = summary["kernel_counters"]["prefill-0"]["cnic"]
    for direction in ("egress", "ingress"):
        classes = cnic[direction]["classes"]
        assert set(classes) == {"collective", "control", "kv"}
        assert sum(c["bytes"] for c in classes.values()) <= cnic[direction]["bytes"]
        assert classes["kv"]["bytes"] > 0
    # Two prefill nodes exchange collectives: their class carried bytes both ways.
    assert cnic["egress"]["classes"]["collective"]["bytes"] > 0
    assert cnic["ingress"]["classes"]["collective"]["bytes"] > 0
    rows = json.loads((out / "timeseries.json").read_text())
    assert "prefill-0/cnic/ingress_backlog_bytes" in rows[0]
    assert "prefill-0/cnic/ingress/kv_mbit" in rows[0]
    page = (out / "report.html").read_text()
    # the queue columns reach the report: a panel, or the note that every queue stayed empty
    queues = '"title":{"text":"queued, kB"}' in page
    assert queues != ("Every shaped queue stayed under 0.5 kB" in page)
    assert "cnic priority classes" in page
    assert "Link fidelity (selftest)" in page
    assert not _of_lab(json.loads((out / "spec.json").read_text())["lab_id"])
    assert not _of_lab(summary["selftest"]["lab_id"])

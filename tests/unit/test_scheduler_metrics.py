"""The scheduler's own /metrics families (SchedulerCollector): queue, turns, node reports and
the HTTP port, written by prometheus_client from the state at each scrape."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lab.config.cluster import build_cluster_spec
from lab.config.models import parse_config
from scheduler.registry import PolicyKnobs, make_policy
from services.prom import parse_samples, sample_key
from services.scheduler.http_server import SchedulerCollector
from services.scheduler.state import SchedulerState
from services.wire.rpc import EngineLoadReport, FetchRequest, TurnSubmission, decode_as


def _state() -> SchedulerState:
    cfg = parse_config({"cluster": {"gpus_per_node": 1, "cnic_gbit_per_gpu": 1600}})
    spec = build_cluster_spec(cfg, lab_id="u", backend="netns", data_dir=Path("/nonexistent"))
    return SchedulerState(spec, make_policy("least_tokens", PolicyKnobs(beta_tokens=10**9)))


def _scrape(state: SchedulerState, port: dict[str, int] | None = None) -> str:
    registry = CollectorRegistry()
    registry.register(SchedulerCollector(state, None if port is None else (lambda: port)))
    return generate_latest(registry).decode()


def test_queue_turns_reports_and_port_counters_are_read_at_each_scrape() -> None:
    state = _state()
    for traj in (1, 2, 3):
        body = {"traj_id": traj, "turn_index": 0, "context_tokens": 640, "append_tokens": 64,
                "gen_tokens": 4}  # fmt: skip
        state.submit(decode_as(body, TurnSubmission), 0.0)
    before = parse_samples(_scrape(state))
    assert before["dualpath_queue_turns"] == 3
    assert before["dualpath_turns_done_total"] == 0
    assert before["dualpath_turns_failed_total"] == 0
    assert not any(k.startswith("dualpath_http_port") for k in before)
    state.fetch(
        FetchRequest(
            node_id="prefill-0",
            role="prefill",
            read_q_tokens=1280,
            engines=(EngineLoadReport(0, 0, 0, 10**9),),
            boot="b1",
            counters={"bytes_verified": 4096, "kv_port_refused": 2, "note": "not a number"},
        ),
        0.0,
    )
    got = parse_samples(_scrape(state, {"connections": 5, "refused": 1}))
    assert got[sample_key("dualpath_read_queue_tokens", {"node": "prefill-0"})] == 1280
    counter = "dualpath_node_counter_total"
    assert got[sample_key(counter, {"node": "prefill-0", "name": "bytes_verified"})] == 4096
    assert got[sample_key(counter, {"node": "prefill-0", "name": "kv_port_refused"})] == 2
    assert not any('name="note"' in k for k in got)  # only numbers are samples
    assert got[sample_key("dualpath_http_port", {"name": "connections"})] == 5
    assert got[sample_key("dualpath_http_port", {"name": "refused"})] == 1


def test_the_families_keep_their_types() -> None:
    kinds = {f.name: f.type for f in text_string_to_metric_families(_scrape(_state(), {}))}
    assert kinds == {
        "dualpath_queue_turns": "gauge",
        "dualpath_turns_done": "counter",
        "dualpath_turns_failed": "counter",
        "dualpath_read_queue_tokens": "gauge",
        "dualpath_node_counter": "counter",
        "dualpath_http_port": "gauge",
    }

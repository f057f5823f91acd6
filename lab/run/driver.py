"""The workload driver: replays agent turns (lab.run.workload.ReplayPlan, decoded and checked
from the runner's agents.json) against the scheduler's HTTP API.

Runs as its own process on the management network (in the scheduler's namespace on the netns
backend). Seeds warm-start KV, starts every agent at once (offline mode) or at its planned
arrival offset (online mode, Poisson arrivals), measures TTFT, TTST, TPOT and JCT from the
client side, prints progress as JSON lines and writes a results file. At the end it gathers
every lab process's emulation-health snapshot (services/health.py), its own included; judging
them is lab.results.health's job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from lab.run.workload import AgentPlan, PlanFileError, ReplayPlan, TurnPlan
from services.auth import AUTH_HEADER, bearer
from services.engine import engine_stats
from services.health import HealthMonitor
from services.spec import ClusterSpec, Role
from services.storage_client import StorageClient, StorageClientError
from services.transport import RemoteError

READY_TIMEOUT_S = 60.0
SEED_CONCURRENCY = 8
TIMEOUT_ERROR = "turn did not finish within"
MAX_RETRY_REASONS = 5
GET_TIMEOUT = aiohttp.ClientTimeout(total=30)
SCHEDULER_SAMPLE_S = 5.0
"""Bound on the driver's status and counter reads (a turn's own request has its timeout)."""


@dataclass
class TurnResult:
    traj_id: int
    turn_index: int
    prompt_tokens: int
    gen_tokens: int
    submitted_at: float
    assigned_at: float | None = None
    """When the scheduler placed the turn (its `assigned` event reached the client)."""
    read_started_at: float | None = None
    """When the first of its storage reads began (left the node's read queue); None when
    the turn read nothing (Oracle, or no cached prefix)."""
    prefill_started_at: float | None = None
    """When the turn's first prefill step began: its first layer group of KV was ready."""
    first_token_at: float | None = None
    second_token_at: float | None = None
    last_token_at: float | None = None
    """When decoding produced the turn's last token (its new blocks are persisted after)."""
    done_at: float | None = None
    read_side: str | None = None
    hit_blocks: int | None = None
    """Blocks of the prompt the scheduler found persisted (its last attempt's)."""
    prompt_blocks: int | None = None
    prefill: str | None = None
    decode: str | None = None
    error: str | None = None
    retryable: bool = False
    attempts: int = 1
    timed_out: int = 0
    """Attempts the client gave up on (no end within its timeout): a hung turn, whatever
    the retry made of it."""
    retried_for: list[str] = field(default_factory=list)
    """Why each earlier attempt failed (the first MAX_RETRY_REASONS)."""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at


@dataclass
class DriverProgress:
    turns_total: int
    turns_done: int = 0
    turns_failed: int = 0
    agents_done: int = 0
    tokens_done: int = 0
    in_flight: int = 0
    """Turns submitted (an attempt under way, retries included) and not yet ended."""
    results: list[TurnResult] = field(default_factory=list)
    fresh_ttft: list[tuple[float, float]] = field(default_factory=list)
    """(first token's wall time, TTFT s) of the turns that finished since the last progress
    line: the live dashboard plots TTFT as it happens."""


async def _wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base}/v1/status", timeout=GET_TIMEOUT) as resp:
                status = await resp.json()
                if status.get("ready"):
                    return
                last = f"nodes reported: {sorted(status.get('nodes', {}))}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = str(exc) or type(exc).__name__
        await asyncio.sleep(0.2)
    raise TimeoutError(f"cluster not ready after {READY_TIMEOUT_S:.0f} s ({last})")


async def _run_turn(
    session: aiohttp.ClientSession, base: str, turn: TurnPlan, timeout_s: float
) -> TurnResult:
    """Submit one turn and follow its event stream to its end, its timeout or an error."""
    res = TurnResult(
        traj_id=turn.traj_id,
        turn_index=turn.turn_index,
        prompt_tokens=turn.prompt_tokens,
        gen_tokens=turn.gen_tokens,
        submitted_at=time.time(),
    )
    body: dict[str, Any] = {
        "traj_id": turn.traj_id,
        "turn_index": turn.turn_index,
        "context_tokens": turn.context_tokens,
        "append_tokens": turn.append_tokens,
        "gen_tokens": turn.gen_tokens,
    }
    if turn.block_keys:
        body["block_keys"] = list(turn.block_keys)
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(f"{base}/v1/turns", json=body) as resp:
                if resp.status != 200:
                    res.error = f"HTTP {resp.status}: {await resp.text()}"
                    return res
                async for line in resp.content:
                    if line.strip() and _record_event(res, json.loads(line), time.time()):
                        return res
                res.error = "event stream ended before the turn finished"
    except TimeoutError:
        res.error = f"{TIMEOUT_ERROR} {timeout_s:.0f} s"
        res.retryable = True
    except aiohttp.ClientError as exc:
        res.error = f"HTTP error: {exc}"
    return res


def _record_event(res: TurnResult, ev: dict[str, Any], now: float) -> bool:
    """Record one event of the turn's stream at `now`; True when it ends the turn (done or
    failed)."""
    kind = ev.get("event")
    if kind == "assigned":
        res.assigned_at = now
        res.read_side = ev.get("read_side")
        ranges = (ev.get("reads") or {}).values()
        if len(ranges) == 2 and all(end > first for first, end in ranges):
            res.read_side = "split"
        res.prefill = ev.get("prefill")
        res.decode = ev.get("decode")
        res.hit_blocks = ev.get("hit_blocks")
        res.prompt_blocks = ev.get("prompt_blocks")
    elif kind == "read_started" and res.read_started_at is None:
        res.read_started_at = now
    elif kind == "prefill_started" and res.prefill_started_at is None:
        res.prefill_started_at = now
    elif kind == "first_token":
        res.first_token_at = now
    elif kind == "second_token":
        res.second_token_at = now
    elif kind == "last_token":
        res.last_token_at = now
    elif kind == "done":
        res.done_at = now
        return True
    elif kind == "failed":
        res.error = f"{ev.get('node')}: {ev.get('reason')}"
        res.retryable = bool(ev.get("retryable"))
        return True
    return False


async def _agent(
    session: aiohttp.ClientSession,
    base: str,
    agent: AgentPlan,
    progress: DriverProgress,
    timeout_s: float,
    *,
    retries: int,
    backoff_s: float,
    started: float,
) -> None:
    # online mode: the agent arrives start_after_s after the run starts (0 when offline)
    delay = started + agent.start_after_s - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    for i, turn in enumerate(agent.turns):
        progress.in_flight += 1
        try:
            res = await _turn_with_retries(
                session, base, turn, timeout_s, retries=retries, backoff_s=backoff_s
            )
        finally:
            progress.in_flight -= 1
        progress.results.append(res)
        if res.error is not None:
            progress.turns_failed += 1
            # the rest of this trajectory depends on this turn's KV: stop the agent
            progress.turns_failed += len(agent.turns) - 1 - i
            break
        progress.turns_done += 1
        progress.tokens_done += res.prompt_tokens + res.gen_tokens
        if res.first_token_at is not None:
            progress.fresh_ttft.append((res.first_token_at, res.first_token_at - res.submitted_at))
    progress.agents_done += 1


async def _turn_with_retries(
    session: aiohttp.ClientSession,
    base: str,
    turn: TurnPlan,
    timeout_s: float,
    *,
    retries: int,
    backoff_s: float,
) -> TurnResult:
    """The turn's last attempt: a retryable failure is submitted again, up to `retries` times."""
    attempt, timed_out = 0, 0
    why: list[str] = []
    while True:
        res = await _run_turn(session, base, turn, timeout_s)
        timed_out += res.error is not None and res.error.startswith(TIMEOUT_ERROR)
        res.attempts, res.timed_out, res.retried_for = attempt + 1, timed_out, why
        if res.error is None or not res.retryable or attempt >= retries:
            return res
        why = [*why, res.error][:MAX_RETRY_REASONS]
        # a lost node or link: back off (full jitter, so the turns a fault failed together
        # do not come back together), then submit the same turn again (its KV is
        # deterministic, so a late first attempt writing the same blocks is harmless)
        await asyncio.sleep(random.uniform(0.0, backoff_s * 2 ** min(attempt, 3)))
        attempt += 1


async def _scheduler_sampler(
    session: aiohttp.ClientSession, base: str, out: list[dict[str, Any]], stop: asyncio.Event
) -> None:
    """The scheduler's own state over the run (turns it holds, queue, done, failed) every
    SCHEDULER_SAMPLE_S: a long run shows whether it stays bounded."""
    while not stop.is_set():
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(f"{base}/v1/status", timeout=GET_TIMEOUT) as resp:
                st = await resp.json()
            out.append(
                {"t": time.time(), **{k: st.get(k) for k in ("turns", "queue", "done", "failed")}}
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=SCHEDULER_SAMPLE_S)


async def _progress_printer(progress: DriverProgress, started: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        line = {
            "progress": {
                "elapsed_s": round(time.time() - started, 2),
                "turns_done": progress.turns_done,
                "turns_failed": progress.turns_failed,
                "turns_total": progress.turns_total,
                "agents_done": progress.agents_done,
                "tokens_done": progress.tokens_done,
                "in_flight": progress.in_flight,
                "ttft": [[round(t, 3), round(v, 4)] for t, v in progress.fresh_ttft],
            }
        }
        progress.fresh_ttft.clear()
        print(json.dumps(line), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


def _snapshot_list(value: Any) -> list[dict[str, Any]]:
    """A node's health report as a list of snapshots; [] for a node that reported none."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


async def _storage_health(storage: StorageClient, node_id: str) -> list[dict[str, Any]]:
    """A storage server's health snapshot; [] from a client or server that has none."""
    ask = getattr(storage, "health", None)  # StorageClient.health is newer than some labs
    if ask is None:
        return []
    try:
        return _snapshot_list(await ask(node_id))
    except (AttributeError, RemoteError, StorageClientError):
        return []


async def _scheduler_health(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    """The scheduler's health snapshot (GET /v1/health); [] when it has none (an older one)."""
    try:
        async with session.get(f"{base}/v1/health") as resp:
            if resp.status != 200:
                return []
            return _snapshot_list(await resp.json())
    except (aiohttp.ClientError, json.JSONDecodeError):
        return []


async def gather_health(
    spec: ClusterSpec,
    engines: dict[str, dict[str, Any]],
    storage: StorageClient,
    session: aiohttp.ClientSession,
    base: str,
    own: HealthMonitor,
) -> dict[str, list[dict[str, Any]]]:
    """{node or process name: [snapshots]} for every node, the scheduler and this driver;
    a node that reported nothing gets [] (lab.results.health lists it as not reported)."""
    health = {node: _snapshot_list(st.get("health")) for node, st in engines.items()}
    for n in spec.storage_nodes:
        health[n.node_id] = await _storage_health(storage, n.node_id)
    health["scheduler"] = await _scheduler_health(session, base)
    health["driver"] = [own.snapshot()]
    return health


async def drive(spec: ClusterSpec, plan: ReplayPlan) -> dict[str, Any]:
    monitor = HealthMonitor("driver", "driver")
    monitor.start()
    try:
        return await _drive(spec, plan, monitor)
    finally:
        await monitor.stop()


async def _drive(spec: ClusterSpec, plan: ReplayPlan, monitor: HealthMonitor) -> dict[str, Any]:
    """Wait for the cluster, seed, replay every agent, then gather the counters, the engines'
    step records and every process's health: the results file's content."""
    base = f"http://{spec.http.host}:{spec.http.port}"
    storage = StorageClient(spec)
    # every request presents the lab's secret: the scheduler refuses a turn without it
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        connector=aiohttp.TCPConnector(limit=0),
        headers={AUTH_HEADER: bearer(spec.secret)},
    ) as session:
        await _wait_ready(session, base)
        seeded = await _seed(storage, plan)
        storage_before = await _storage_stats(spec, storage)
        cluster_before = await _get_json(session, f"{base}/v1/cluster")
        replayed = await _replay(session, base, spec, plan)
        # Let every node's next pull carry its final counters to the scheduler.
        await asyncio.sleep(spec.pull_interval_s * 3 + 0.3)
        cluster = await _get_json(session, f"{base}/v1/cluster")
        storage_after = await _storage_stats(spec, storage)
        engines = await _engine_records(spec, storage, session, base, monitor)
    await storage.close()
    started, finished = replayed.started_at, replayed.finished_at
    return {
        "started_at": started,
        "finished_at": finished,
        "jct_s": finished - started,
        "seeded_bytes": seeded,
        "turns": [asdict(r) for r in replayed.progress.results],
        "cluster": cluster,
        "cluster_before": cluster_before,
        "scheduler_samples": replayed.scheduler_samples,
        "storage_before": storage_before,
        "storage_after": storage_after,
        **engines,
    }


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=GET_TIMEOUT) as resp:
        return await resp.json()


async def _seed(storage: StorageClient, plan: ReplayPlan) -> int:
    """Write every warm-starting agent's seed blocks to storage (SEED_CONCURRENCY at a time);
    the bytes written."""
    sem = asyncio.Semaphore(SEED_CONCURRENCY)

    async def seed(agent: AgentPlan) -> int:
        async with sem:
            return await storage.seed(agent.traj_id, 0, agent.seed_blocks)

    return sum(await asyncio.gather(*(seed(a) for a in plan.agents if a.seed_blocks > 0)))


async def _storage_stats(spec: ClusterSpec, storage: StorageClient) -> dict[str, Any]:
    return {n.node_id: await storage.stats(n.node_id) for n in spec.storage_nodes}


@dataclass
class _Replayed:
    started_at: float
    finished_at: float
    progress: DriverProgress
    scheduler_samples: list[dict[str, Any]]


async def _replay(
    session: aiohttp.ClientSession, base: str, spec: ClusterSpec, plan: ReplayPlan
) -> _Replayed:
    """Every agent's turns, all at once or at their arrival offsets, with the progress lines
    and the scheduler's state sampled while they run."""
    progress = DriverProgress(turns_total=plan.num_turns)
    started = time.time()
    print(json.dumps({"started_at": started}), flush=True)
    stop = asyncio.Event()
    printer = asyncio.create_task(_progress_printer(progress, started, stop))
    sched_samples: list[dict[str, Any]] = []
    sampler = asyncio.create_task(_scheduler_sampler(session, base, sched_samples, stop))
    await asyncio.gather(
        *(
            _agent(
                session,
                base,
                a,
                progress,
                spec.request_timeout_s * 4,
                retries=spec.turn_retries,
                backoff_s=spec.retry_backoff_s,
                started=started,
            )
            for a in plan.agents
        )
    )
    finished = time.time()
    stop.set()
    await printer
    await sampler
    return _Replayed(started, finished, progress, sched_samples)


async def _engine_records(
    spec: ClusterSpec,
    storage: StorageClient,
    session: aiohttp.ClientSession,
    base: str,
    monitor: HealthMonitor,
) -> dict[str, Any]:
    """The prefill nodes' step records, every engine's collective latencies, and the health
    snapshots of every process."""
    engines = [*spec.by_role(Role.PREFILL), *spec.by_role(Role.DECODE)]
    stats = {n.node_id: await engine_stats(spec, n.node_id) for n in engines}
    return {
        "prefill_steps": {
            n.node_id: stats[n.node_id].get("prefill_steps", []) for n in spec.by_role(Role.PREFILL)
        },
        "collective_ms": {node: st.get("collective_ms", []) for node, st in stats.items()},
        "health": await gather_health(spec, stats, storage, session, base, monitor),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.run.driver", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--plan", type=Path, required=True, help="agents to replay (JSON)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    args = parser.parse_args(argv)
    spec = ClusterSpec.load(args.spec)
    import uvloop

    try:
        plan = ReplayPlan.decode(args.plan.read_bytes(), source=str(args.plan))
        result = uvloop.run(drive(spec, plan))
    except (PlanFileError, TimeoutError) as exc:
        print(json.dumps({"fatal": str(exc)}), flush=True)
        return 1
    args.out.write_text(json.dumps(result))
    print(json.dumps({"finished": True, "jct_s": result["jct_s"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Agent trajectories: a generator calibrated to DualPath Table 2, JSONL load/dump, and the
replay plan (tokens and KV blocks of every turn) the driver executes: `ReplayPlan`, one typed
form (msgspec structs) that the runner encodes to agents.json and the driver decodes, checked.

Pure except `load_jsonl`/`dump_jsonl`; randomness comes only from `random.Random(seed)`, never
from numpy or the global generator, so a seed gives the same trajectories everywhere.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import msgspec

from dualpath.errors import DualPathError, UsageError
from services.blocks import TurnBlocks

MAX_TRAJECTORY_TOKENS = 1 << 20
"""Sanity cap on a loaded trajectory's total tokens (16x the largest Table 2 MaxLen)."""

# -- data ---------------------------------------------------------------------------------------


class TrajectoryFileError(UsageError):
    """A trajectory file is unreadable or invalid; names the file, the line and the field."""

    def __init__(self, path: Path, line: int | None, field: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        where = str(path) if line is None else f"{path}:{line}"
        what = message if field is None else f"{field}: {message}"
        super().__init__(f"{where}: {what}")


@dataclass(frozen=True, slots=True)
class TrajectoryTurn:
    """One agent turn: `append_tokens` join the context (tool output), then `gen_tokens` are
    generated. Both are >= 1: every turn has a prompt to prefill and a first token to emit."""

    append_tokens: int
    gen_tokens: int

    def __post_init__(self) -> None:
        if self.append_tokens < 1 or self.gen_tokens < 1:
            raise ValueError(f"turn token counts must be >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class Trajectory:
    traj_id: int
    turns: tuple[TrajectoryTurn, ...]

    def __post_init__(self) -> None:
        if self.traj_id < 0:
            raise ValueError(f"traj_id must be >= 0, got {self.traj_id}")
        if not self.turns:
            raise ValueError(f"trajectory {self.traj_id} has no turns")

    def context_before(self, turn_index: int) -> int:
        """Tokens in the context when turn `turn_index` starts: sum of (append + gen) before it.

        `turn_index == len(turns)` is allowed and gives the total.
        """
        if not 0 <= turn_index <= len(self.turns):
            raise ValueError(f"turn_index {turn_index} outside 0..{len(self.turns)}")
        return sum(t.append_tokens + t.gen_tokens for t in self.turns[:turn_index])

    @property
    def total_tokens(self) -> int:
        return sum(t.append_tokens + t.gen_tokens for t in self.turns)


# -- Table 2 and the generator ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Table2Row:
    """One dataset of DualPath Table 2 (500 coding-agent RL trajectories each)."""

    max_len: int
    avg_turns: float
    avg_append: float
    avg_gen: float
    avg_total_tokens: float
    avg_context: float


PAPER_TABLE2: Mapping[int, Table2Row] = {
    32768: Table2Row(32768, 60, 608, 148, 28_639, 17_183),
    49152: Table2Row(49152, 106, 474, 172, 42_607, 25_120),
    65536: Table2Row(65536, 157, 429, 176, 55_958, 32_721),
}
SUPPORTED_MAX_LENS = tuple(PAPER_TABLE2)

# How the generator reproduces Table 2 (DualPath §7). Reading the table:
#
# * turns x (append + gen) is 1.6x the total (60 x 756 = 45,360 vs 28,639), so the per-turn
#   columns cannot be pooled over all turns (pooled means multiply back to the total exactly).
#   They are averages over trajectories of each trajectory's mean per turn, and short-turn
#   trajectories have many turns: E[n] * E[m] >> E[n * m] = E[total].
# * the mean prompt over all turns (pooled, so long trajectories weigh more) is 0.60 of the mean
#   total, while uniformly growing contexts would give about total / 2: contexts are
#   front-loaded. In coding agents the first prompt (system prompt, tool schemas, the issue,
#   a repository listing) is large; here it is a share of the trajectory's tokens.
#
# The model, per trajectory (latent quantiles u_* stratified over the agents, see below):
#
# 1. Total T. Natural length x * max_len with log(x) logistic(mu, s); a trajectory that would
#    run past MaxLen is cut where its next turn no longer fits: T = max_len - v * m, v ~ U[0, 1).
#    T >= max_len / 64 (a few turns at least). So every T <= max_len by construction.
# 2. Mean turn size m, log-uniform on [m_lo, m_lo * ratio]; turns n = round(T / m). Turn count
#    and turn size are therefore strongly negatively correlated (never sampled independently).
# 3. First-prompt share f_t = first_share * (0.5 + u) and generated share
#    g_t = gen_share * (0.5 + u): F = f_t * T extra tokens on turn 0's append,
#    G = g_t * (T - F) generated tokens, the rest appended.
# 4. G and the appends are split over the n turns with heavy-tailed weights (log-logistic:
#    tail index 1 / 0.5 = 2 for appends, i.e. the occasional huge tool output; 1 / 0.3 for
#    generations), every turn getting >= 1 of each, so the sums are exact.
#
# Stratified (Latin hypercube) sampling of the per-trajectory quantiles makes even a few dozen
# agents reproduce the means: with plain sampling the heavy right tail of n moves the mean
# turn count by ~5 % between seeds of 500 agents. The price: trajectory i depends on
# num_agents, not only on seed and i. Only rng.random(), exp, log and pow are used, all of them
# deterministic across platforms up to the last float bit, which the integer rounding absorbs.
#
# The parameters were fitted by damped fixed-point iteration on 5,000 agents per row (each
# parameter mainly drives one column: total_mu -> total, turn size -> append + gen, ratio ->
# turns, gen_share -> gen, first_share -> context). With 500 agents, over seeds 0-9 every
# column is within 1.5 % of Table 2 (64 agents: 5.5 %). Seed 1, 500 agents, generated / paper:
#
#   MaxLen  turns        append/turn  gen/turn     total            context
#   32768   59.8 / 60    605 / 608    148.7 / 148  28,636 / 28,639  17,113 / 17,183
#   49152   105.5 / 106  473 / 474    173.6 / 172  42,607 / 42,607  25,035 / 25,120
#   65536   155.9 / 157  427 / 429    177.6 / 176  55,962 / 55,958  32,597 / 32,721
#
# Side effects of the model worth knowing: ~55 % of trajectories end within 3 % of MaxLen;
# corr(turns, mean turn size) is about -0.78; turn 0's prompt is 4-6 K tokens (median).


@dataclass(frozen=True, slots=True)
class _Shape:
    """Generator parameters of one Table 2 row (fitted, see the comment above)."""

    total_mu: float  # location of log(natural length / max_len)
    total_scale: float  # logistic scale of log(natural length / max_len)
    turn_tokens_lo: float  # smallest mean turn size m
    turn_tokens_ratio: float  # largest / smallest m
    first_share: float  # mean share of T in turn 0's extra prompt
    gen_share: float  # mean share of T - F that is generated


_SHAPES: Mapping[int, _Shape] = {
    32768: _Shape(0.1031, 0.30, 181.9, 10.93, 0.1382, 0.2272),
    49152: _Shape(0.06934, 0.30, 150.9, 11.43, 0.1191, 0.3024),
    65536: _Shape(0.02537, 0.30, 127.9, 13.21, 0.1053, 0.3253),
}
_APPEND_TAIL = 0.5
_GEN_TAIL = 0.3
_NUM_LATENTS = 4  # total, turn size, first share, gen share


def _open_unit(u: float) -> float:
    """Clamp a [0, 1) draw into the open interval so logit and pow never see 0 or 1."""
    return min(max(u, 1e-12), 1.0 - 1e-12)


def _log_logistic(rng: random.Random, scale: float) -> float:
    u = _open_unit(rng.random())
    return math.exp(scale * math.log(u / (1.0 - u)))


def _permutation(rng: random.Random, n: int) -> list[int]:
    """Fisher-Yates with rng.random() only (random.shuffle's internals are not ours to fix)."""
    out = list(range(n))
    for i in range(n - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        out[i], out[j] = out[j], out[i]
    return out


def _split(total: int, weights: Sequence[float]) -> list[int]:
    """`total` as len(weights) integers >= 1 proportional to the weights, summing exactly.

    Rounded cumulative boundaries: monotone, so no part is negative, and the last boundary
    is exact, so float error can never lose or add a token.
    """
    rest = total - len(weights)
    cum = list(itertools.accumulate(weights))
    bounds = [0, *(round(rest * c / cum[-1]) for c in cum[:-1]), rest]
    return [1 + b - a for a, b in itertools.pairwise(bounds)]


def _trajectory(
    rng: random.Random, traj_id: int, max_len: int, shape: _Shape, latents: Sequence[float]
) -> Trajectory:
    u_total, u_turn, u_first, u_gen = (_open_unit(u) for u in latents)
    m = shape.turn_tokens_lo * shape.turn_tokens_ratio**u_turn
    natural = math.exp(shape.total_mu + shape.total_scale * math.log(u_total / (1.0 - u_total)))
    total = (
        max_len - int(rng.random() * m)  # cut where the next turn no longer fits
        if natural >= 1.0
        else int(natural * max_len)
    )
    total = max(total, max_len // 64)
    first = int(shape.first_share * (0.5 + u_first) * total)
    num_turns = max(1, min(round(total / m), (total - first) // 2))
    gen_total = round(shape.gen_share * (0.5 + u_gen) * (total - first))
    gen_total = min(max(gen_total, num_turns), total - first - num_turns)
    gens = _split(gen_total, [_log_logistic(rng, _GEN_TAIL) for _ in range(num_turns)])
    appends = _split(
        total - first - gen_total, [_log_logistic(rng, _APPEND_TAIL) for _ in range(num_turns)]
    )
    appends[0] += first
    return Trajectory(
        traj_id, tuple(TrajectoryTurn(a, g) for a, g in zip(appends, gens, strict=True))
    )


def _generate(num_agents: int, max_len: int, seed: int, shape: _Shape) -> list[Trajectory]:
    rng = random.Random(seed)
    strata = [_permutation(rng, num_agents) for _ in range(_NUM_LATENTS)]
    trajs = []
    for i in range(num_agents):
        latents = [(perm[i] + rng.random()) / num_agents for perm in strata]
        trajs.append(_trajectory(rng, i, max_len, shape, latents))
    return trajs


def generate(num_agents: int, max_len: int, seed: int) -> list[Trajectory]:
    """`num_agents` synthetic trajectories (ids 0..n-1) shaped like Table 2's MaxLen row.

    Every trajectory's total is <= max_len. Deterministic in (num_agents, max_len, seed).
    """
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ValueError(f"num_agents must be an integer >= 1, got {num_agents!r}")
    shape = _SHAPES.get(max_len)
    if shape is None:
        allowed = ", ".join(str(v) for v in SUPPORTED_MAX_LENS)
        raise ValueError(
            f"max_len must be one of the DualPath Table 2 rows ({allowed}), got {max_len!r}"
        )
    return _generate(num_agents, max_len, seed, shape)


# -- JSONL --------------------------------------------------------------------------------------


def _token_field(value: Any, path: Path, line: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrajectoryFileError(path, line, field, f"must be an integer, got {value!r}")
    if value < 1:
        raise TrajectoryFileError(path, line, field, f"must be >= 1, got {value}")
    return value


def _parse_line(obj: Any, path: Path, line: int) -> Trajectory:
    if not isinstance(obj, dict):
        raise TrajectoryFileError(path, line, None, "each line must be a JSON object")
    extra = sorted(set(obj) - {"traj_id", "turns"})
    if extra:
        raise TrajectoryFileError(path, line, extra[0], "unknown field (allowed: traj_id, turns)")
    for key in ("traj_id", "turns"):
        if key not in obj:
            raise TrajectoryFileError(path, line, key, "missing")
    traj_id = obj["traj_id"]
    if isinstance(traj_id, bool) or not isinstance(traj_id, int):
        raise TrajectoryFileError(path, line, "traj_id", f"must be an integer, got {traj_id!r}")
    if traj_id < 0:
        raise TrajectoryFileError(path, line, "traj_id", f"must be >= 0, got {traj_id}")
    raw_turns = obj["turns"]
    if not isinstance(raw_turns, list) or not raw_turns:
        raise TrajectoryFileError(path, line, "turns", "must be a non-empty list")
    turns = []
    total = 0
    for i, raw in enumerate(raw_turns):
        where = f"turns[{i}]"
        if not isinstance(raw, dict):
            raise TrajectoryFileError(path, line, where, "must be an object {append, gen}")
        extra = sorted(set(raw) - {"append", "gen"})
        if extra:
            raise TrajectoryFileError(
                path, line, f"{where}.{extra[0]}", "unknown field (allowed: append, gen)"
            )
        for key in ("append", "gen"):
            if key not in raw:
                raise TrajectoryFileError(path, line, f"{where}.{key}", "missing")
        append = _token_field(raw["append"], path, line, f"{where}.append")
        gen = _token_field(raw["gen"], path, line, f"{where}.gen")
        total += append + gen
        if total > MAX_TRAJECTORY_TOKENS:
            raise TrajectoryFileError(
                path, line, "turns", f"total tokens exceed the cap of {MAX_TRAJECTORY_TOKENS}"
            )
        turns.append(TrajectoryTurn(append, gen))
    return Trajectory(traj_id, tuple(turns))


def load_jsonl(path: Path) -> list[Trajectory]:
    """Trajectories from a JSON-lines file, one object per line (blank lines are skipped):
    `{"traj_id": 0, "turns": [{"append": 608, "gen": 148}, ...]}`.

    Raises TrajectoryFileError naming the line and field of the first problem.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrajectoryFileError(path, None, None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TrajectoryFileError(path, None, None, f"not UTF-8 text: {exc.reason}") from None
    trajs: list[Trajectory] = []
    first_line_of: dict[int, int] = {}
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrajectoryFileError(path, line_no, None, f"not valid JSON: {exc.msg}") from None
        traj = _parse_line(obj, path, line_no)
        if traj.traj_id in first_line_of:
            raise TrajectoryFileError(
                path,
                line_no,
                "traj_id",
                f"duplicate id {traj.traj_id} (first on line {first_line_of[traj.traj_id]})",
            )
        first_line_of[traj.traj_id] = line_no
        trajs.append(traj)
    if not trajs:
        raise TrajectoryFileError(path, None, None, "no trajectories in the file")
    return trajs


def dump_jsonl(trajs: Sequence[Trajectory], path: Path) -> None:
    """Write trajectories in the format `load_jsonl` reads (one compact object per line)."""
    lines = [
        json.dumps(
            {
                "traj_id": t.traj_id,
                "turns": [{"append": u.append_tokens, "gen": u.gen_tokens} for u in t.turns],
            },
            separators=(",", ":"),
        )
        for t in trajs
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# -- replay plan --------------------------------------------------------------------------------


def _check_block_tokens(block_tokens: int) -> None:
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")


NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
BlockKey = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


class TurnPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One request of the replay: `context_tokens` are in storage (as far as full blocks go),
    `append_tokens` are new, then `gen_tokens` are decoded (design.md, "Tokens and blocks")."""

    traj_id: NonNegativeInt
    turn_index: NonNegativeInt
    context_tokens: NonNegativeInt
    append_tokens: PositiveInt
    gen_tokens: PositiveInt
    block_keys: tuple[BlockKey, ...] = ()
    """A trace request's content-addressed prompt: one key per full block (context 0); the
    scheduler finds which of them are persisted (services/prefixes.py)."""

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens + self.append_tokens

    def blocks(self, block_tokens: int) -> TurnBlocks:
        """The turn's tokens in blocks (services.blocks, as the scheduler counts them)."""
        return TurnBlocks.of(self.context_tokens, self.prompt_tokens, self.gen_tokens, block_tokens)

    def hit_blocks(self, block_tokens: int) -> int:
        """Blocks read from storage: only full blocks are persisted, the tail is recomputed."""
        return self.blocks(block_tokens).hit

    def prompt_blocks(self, block_tokens: int) -> int:
        """Blocks the prompt spans (the last one may be partial)."""
        return self.blocks(block_tokens).prompt

    def persist_end_block(self, block_tokens: int) -> int:
        """After the turn, blocks [0, this) are full and persisted by the decode node."""
        return self.blocks(block_tokens).persist_end


class AgentPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    traj_id: NonNegativeInt
    seed_blocks: NonNegativeInt
    """Blocks [0, seed_blocks) are written to storage before the run (warm start); 0 when the
    agent starts at turn 0."""
    turns: tuple[TurnPlan, ...]
    start_after_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    """Emulated seconds after the driver's start when the agent arrives (online mode: its
    real arrival offset x tau); 0 when every agent starts at once (offline mode)."""

    def __post_init__(self) -> None:
        for turn in self.turns:
            # a trace session's requests each persist under their own id (content-addressed)
            if turn.traj_id != self.traj_id and not turn.block_keys:
                raise ValueError(
                    f"agent {self.traj_id}: turn {turn.turn_index} is planned for "
                    f"trajectory {turn.traj_id}"
                )


class ReplayPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the driver replays (agents.json): the runner encodes it, the driver decodes it
    with every field's type and range checked."""

    agents: tuple[AgentPlan, ...]

    @property
    def num_turns(self) -> int:
        return sum(len(a.turns) for a in self.agents)

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes, *, source: str) -> ReplayPlan:
        """The plan in `data`; PlanFileError naming `source` and the field when it is invalid."""
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.DecodeError as exc:
            raise PlanFileError(f"{source}: not a replay plan: {exc}") from None


class PlanFileError(DualPathError):
    """A replay plan file (agents.json) that does not decode or validate."""


def plan_agents(
    trajs: Sequence[Trajectory],
    *,
    block_tokens: int,
    start_turn_fraction: float = 0.0,
    max_turns: int | None = None,
    gen_token_scale: float = 1.0,
    max_gen_tokens: int | None = None,
) -> list[AgentPlan]:
    """The turns each agent replays (design.md, "What the laptop example changes").

    Agent t starts at turn floor(num_turns * start_turn_fraction) (the fraction read as the
    decimal the user wrote, so 0.29 x 100 turns starts at 29) and replays at most `max_turns`.
    Generated tokens are max(1, round(gen * gen_token_scale)) (round half to even), then
    capped at `max_gen_tokens` when given (a few turns of the heavy-tailed generator emit
    thousands of tokens; in a small offline run one such turn alone sets the JCT).

    Contexts: the history before the start turn is the trajectory's own, unscaled -- it stands
    for what a long-running service already holds, and it is exactly what is pre-seeded
    (seed_blocks = context_before(start) // block_tokens, so the first replayed turn's hit
    blocks are the seeded ones). From then on the context grows by what is actually replayed:
    turn i+1's context = turn i's prompt + turn i's *scaled* gen, so every hit block was
    persisted by an earlier replayed turn or by the seeding.
    """
    _check_plan_arguments(
        block_tokens, start_turn_fraction, max_turns, gen_token_scale, max_gen_tokens
    )
    fraction = Fraction(repr(float(start_turn_fraction)))
    seen: set[int] = set()
    plans = []
    for traj in trajs:
        if traj.traj_id in seen:
            raise ValueError(f"duplicate traj_id {traj.traj_id}")
        seen.add(traj.traj_id)
        num_turns = len(traj.turns)
        start = math.floor(num_turns * fraction)
        end = num_turns if max_turns is None else min(num_turns, start + max_turns)
        plans.append(
            _plan_agent(
                traj,
                range(start, end),
                block_tokens=block_tokens,
                gen_token_scale=gen_token_scale,
                max_gen_tokens=max_gen_tokens,
            )
        )
    return plans


def _check_plan_arguments(
    block_tokens: int,
    start_turn_fraction: float,
    max_turns: int | None,
    gen_token_scale: float,
    max_gen_tokens: int | None,
) -> None:
    _check_block_tokens(block_tokens)
    if not 0.0 <= start_turn_fraction < 1.0:
        raise ValueError(f"start_turn_fraction must be in [0, 1), got {start_turn_fraction}")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1 or None, got {max_turns}")
    if not (gen_token_scale > 0.0 and math.isfinite(gen_token_scale)):
        raise ValueError(f"gen_token_scale must be a finite number > 0, got {gen_token_scale}")
    if max_gen_tokens is not None and max_gen_tokens < 1:
        raise ValueError(f"max_gen_tokens must be >= 1 or None, got {max_gen_tokens}")


def _plan_agent(
    traj: Trajectory,
    replayed: range,
    *,
    block_tokens: int,
    gen_token_scale: float,
    max_gen_tokens: int | None,
) -> AgentPlan:
    """One agent replaying turns `replayed` of `traj`, seeded with the history before them."""
    context = traj.context_before(replayed.start)
    seed_blocks = context // block_tokens
    turns = []
    for i in replayed:
        turn = traj.turns[i]
        gen = max(1, round(turn.gen_tokens * gen_token_scale))
        if max_gen_tokens is not None:
            gen = min(gen, max_gen_tokens)
        plan = TurnPlan(traj.traj_id, i, context, turn.append_tokens, gen)
        turns.append(plan)
        context = plan.prompt_tokens + gen
    return AgentPlan(traj.traj_id, seed_blocks, tuple(turns))


def poisson_arrivals(num_agents: int, *, agents_per_s: float, seed: int) -> list[float]:
    """Arrival offsets (real seconds, ascending) of a Poisson process at `agents_per_s`.

    Gaps are exponential with mean 1/agents_per_s; the clock starts at the first arrival (its
    offset is 0) so a run never opens with idle time that no agent caused. The generator is
    seeded apart from the trajectories', so the same seed gives the same agents either way.
    """
    if num_agents < 0:
        raise ValueError(f"num_agents must be >= 0, got {num_agents}")
    if not (agents_per_s > 0 and math.isfinite(agents_per_s)):
        raise ValueError(f"agents_per_s must be a finite number > 0, got {agents_per_s}")
    rng = random.Random(f"arrivals-{seed}")
    out: list[float] = []
    at = 0.0
    for i in range(num_agents):
        if i:
            at += rng.expovariate(agents_per_s)
        out.append(at)
    return out


# -- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    """Table 2's columns for a set of trajectories (per-turn columns are means over
    trajectories of each one's mean per turn; avg_context is pooled over all turns)."""

    num: int
    avg_turns: float
    avg_append: float
    avg_gen: float
    avg_total_tokens: float
    avg_context: float
    """Mean prompt length (context before the turn + its append) over all turns of all
    trajectories."""
    max_total: int


def workload_stats(trajs: Sequence[Trajectory]) -> WorkloadStats:
    if not trajs:
        raise ValueError("workload_stats needs at least one trajectory")
    num = len(trajs)
    prompt_sum = 0
    num_turns = 0
    for t in trajs:
        context = 0
        for turn in t.turns:
            prompt_sum += context + turn.append_tokens
            context += turn.append_tokens + turn.gen_tokens
        num_turns += len(t.turns)
    return WorkloadStats(
        num=num,
        avg_turns=num_turns / num,
        avg_append=sum(sum(u.append_tokens for u in t.turns) / len(t.turns) for t in trajs) / num,
        avg_gen=sum(sum(u.gen_tokens for u in t.turns) / len(t.turns) for t in trajs) / num,
        avg_total_tokens=sum(t.total_tokens for t in trajs) / num,
        avg_context=prompt_sum / num_turns,
        max_total=max(t.total_tokens for t in trajs),
    )

"""An engine node's data plane as a sans-I/O state machine: which KV each turn needs, what came.

It decides, per turn, what to read, relay, send and persist and when a layer group is ready
or a context complete; it binds every inbound KV frame to its turn (trajectory, blocks and
layer group must be ones the turn expects) and parks frames that overtake the turn's own
assignment instead of blocking their connection. Bytes, sockets and checksums stay in the
shell (services/dataplane.py): frames reach this core already verified, as slice sets.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from dualpath.errors import DualPathError
from services.assignment import TurnAssignment
from services.blocks import describe
from services.kvblocks import SliceSet
from services.spec import Role
from services.wire.frames import FrameKind

RECENT_TURNS = 4096
"""Finished or dropped turn ids remembered, so their late frames are dropped, not parked."""


@dataclass(frozen=True)
class DataPlaneConfig:
    node_id: str
    role: Role
    layer_groups: int
    oracle: bool
    """Oracle (zero-I/O bound): no storage reads, no KV sent; kv_done still travels."""
    park_timeout_s: float = 30.0
    """Frames for a turn this node has not been assigned yet wait this long for it."""
    max_parked: int = 10_000


# -- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartRead:
    """Queue a storage read of `blocks` through this node's snic (FIFO; the shell reserves
    DRAM for it first)."""

    turn_id: str
    traj: int
    blocks: range


@dataclass(frozen=True, slots=True)
class Relay:
    """Decode: the own read is in; send it to the prefill node one layer group at a time, each
    followed by `relay_group_done`; then call on_relayed."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class SendKv:
    """Prefill: send layer group `group` of the turn's KV (own read + new tokens) to its
    decode node; then call on_group_sent."""

    turn_id: str
    group: int


@dataclass(frozen=True, slots=True)
class SendKvDone:
    """Prefill: every group was sent; send `kv_done`, then call on_kv_done_sent."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class Write:
    """Decode: persist the turn's new full blocks; then call on_written."""

    turn_id: str
    traj: int
    blocks: range


@dataclass(frozen=True, slots=True)
class FreeBuffers:
    """The turn's KV bytes and DRAM reservation are no longer needed."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class TellPeer:
    """Best effort: `turn_failed` to the turn's other node so it stops waiting."""

    node_id: str
    turn_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class GroupReady:
    """Timeline (prefill): layer group `group`'s hit KV is in this node's DRAM."""

    turn_id: str
    group: int


@dataclass(frozen=True, slots=True)
class KvComplete:
    """Timeline (decode): the full context is here and verified."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class Released:
    """Timeline (prefill): the turn's KV was sent and `kv_done` too."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class Persisted:
    """Timeline (decode): the new blocks are in storage."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class Failed:
    """Timeline: the turn failed here; `report`: this node reports it (False when the peer
    told us: it reports)."""

    turn_id: str
    reason: str
    retryable: bool
    report: bool


@dataclass(frozen=True, slots=True)
class Discarded:
    """A frame was dropped: its turn finished, failed or never came (counted, logged)."""

    turn_id: str
    kind: str
    why: str


Action = (
    StartRead
    | Relay
    | SendKv
    | SendKvDone
    | Write
    | FreeBuffers
    | TellPeer
    | GroupReady
    | KvComplete
    | Released
    | Persisted
    | Failed
    | Discarded
)


class FrameMismatch(DualPathError):
    """An inbound frame does not belong to its turn (wrong trajectory, block or group)."""


# -- state ---------------------------------------------------------------------------------------


@dataclass
class _KvTurn:
    a: TurnAssignment
    own: range
    read_done: bool = False
    reads_left: int = 0
    """Storage reads of the own range still out: one per trajectory its blocks live in."""
    # prefill side
    relay_got: list[set[int]] = field(default_factory=list)
    relayed: list[bool] = field(default_factory=list)
    announced: list[bool] = field(default_factory=list)
    sending: set[int] = field(default_factory=set)
    prefill_done: bool = False
    done_sent: bool = False
    # decode side
    present: list[set[int]] = field(default_factory=list)
    kv_done: bool = False
    writing: bool = False


@dataclass(frozen=True, slots=True)
class _Parked:
    turn_id: str
    at: float
    kind: FrameKind
    slices: SliceSet | None = None
    group: int = 0
    reason: str = ""


class DataPlaneCore:
    def __init__(self, cfg: DataPlaneConfig) -> None:
        self.cfg = cfg
        self.role = cfg.role
        self.turns: dict[str, _KvTurn] = {}
        self._actions: list[Action] = []
        self._parked: dict[str, list[_Parked]] = {}
        self._num_parked = 0
        self._recent: OrderedDict[str, None] = OrderedDict()

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    @property
    def num_parked(self) -> int:
        return self._num_parked

    # -- from the timeline ----------------------------------------------------------------------
    def assign(self, a: TurnAssignment, now: float) -> None:
        if a.turn_id in self.turns or a.turn_id in self._recent:
            return
        g = self.cfg.layer_groups
        t = _KvTurn(a, a.read_blocks(self.role))
        if self.role is Role.PREFILL:
            t.relay_got = [set() for _ in range(g)]
            t.relayed = [False] * g
            t.announced = [False] * g
        else:
            t.present = [set() for _ in range(g)]
        self.turns[a.turn_id] = t
        if t.own and not self.cfg.oracle:
            pieces = a.pieces(t.own)
            t.reads_left = len(pieces)
            self._actions.extend(StartRead(a.turn_id, traj, blocks) for traj, blocks in pieces)
        else:
            t.read_done = True
        if self.role is Role.PREFILL:
            self._announce(t)
        for p in self._parked.pop(a.turn_id, []):
            self._num_parked -= 1
            self._replay(p, now)

    def send_group(self, turn_id: str, group: int) -> None:
        """Prefill: the timeline computed layer group `group`."""
        t = self.turns.get(turn_id)
        if t is None or self.role is not Role.PREFILL or t.prefill_done:
            return
        if self.cfg.oracle:
            return
        t.sending.add(group)
        self._actions.append(SendKv(turn_id, group))

    def prefill_done(self, turn_id: str) -> None:
        """Prefill: every group was handed over; kv_done follows the last send."""
        t = self.turns.get(turn_id)
        if t is None or self.role is not Role.PREFILL:
            return
        t.prefill_done = True
        self._maybe_done_sent(t)

    def persist(self, turn_id: str) -> None:
        """Decode: decoding ended; persist [hit, persist_end) (only full blocks exist)."""
        t = self.turns.get(turn_id)
        if t is None or self.role is not Role.DECODE or t.writing:
            return
        blocks = range(t.a.hit_blocks, t.a.persist_end_block)
        if self.cfg.oracle or not blocks:
            self._finish(t, Persisted(turn_id))
            return
        t.writing = True
        self._actions.append(Write(turn_id, t.a.traj_id, blocks))

    def drop(self, turn_id: str, reason: str, *, tell_peer: bool) -> None:
        """The timeline (or the scheduler through it) gave up on the turn."""
        t = self.turns.pop(turn_id, None)
        self._remember(turn_id)
        if t is None:
            return
        self._actions.append(FreeBuffers(turn_id))
        if tell_peer:
            self._actions.append(TellPeer(t.a.peer(self.role), turn_id, reason))

    # -- from the shell's I/O ------------------------------------------------------------------
    def on_read_done(self, turn_id: str) -> None:
        """One of the turn's storage reads is in; the own read is done with the last one."""
        t = self.turns.get(turn_id)
        if t is None or t.read_done:
            return
        t.reads_left -= 1
        if t.reads_left > 0:
            return
        t.read_done = True
        if self.role is Role.PREFILL:
            self._announce(t)
            return
        for present in t.present:
            present.update(t.own)
        self._actions.append(Relay(turn_id))

    def on_relayed(self, turn_id: str) -> None:
        """Decode: the own read went to the prefill node; it stays 'present' here (decode
        needs it), but the bytes are not kept: decoding is emulated."""
        if turn_id in self.turns:
            self._actions.append(FreeBuffers(turn_id))

    def on_group_sent(self, turn_id: str, group: int) -> None:
        t = self.turns.get(turn_id)
        if t is None:
            return
        t.sending.discard(group)
        self._maybe_done_sent(t)

    def on_kv_done_sent(self, turn_id: str) -> None:
        t = self.turns.get(turn_id)
        if t is not None:
            self._finish(t, Released(turn_id))

    def on_written(self, turn_id: str) -> None:
        t = self.turns.get(turn_id)
        if t is not None and t.writing:
            self._finish(t, Persisted(turn_id))

    def fail(self, turn_id: str, reason: str, *, retryable: bool) -> None:
        """Something this node did for the turn failed (read, send, relay, write, corrupt KV)."""
        t = self.turns.pop(turn_id, None)
        self._remember(turn_id)
        if t is None:
            return
        self._actions.append(FreeBuffers(turn_id))
        self._actions.append(TellPeer(t.a.peer(self.role), turn_id, reason))
        self._actions.append(Failed(turn_id, reason, retryable, report=True))

    # -- inbound frames from the peer's data plane (already verified) ------------------------
    def on_kv(self, turn_id: str, slices: SliceSet, now: float) -> None:
        """Decode: KV of the prompt from the prefill node (hit KV it read + new tokens)."""
        self._inbound(turn_id, _Parked(turn_id, now, FrameKind.KV, slices), now)

    def on_relay(self, turn_id: str, slices: SliceSet, now: float) -> None:
        """Prefill: hit KV the decode node read, relayed for computing."""
        self._inbound(turn_id, _Parked(turn_id, now, FrameKind.RELAY, slices), now)

    def on_relay_group_done(self, turn_id: str, group: int, now: float) -> None:
        self._inbound(turn_id, _Parked(turn_id, now, FrameKind.RELAY_GROUP_DONE, group=group), now)

    def on_kv_done(self, turn_id: str, now: float) -> None:
        self._inbound(turn_id, _Parked(turn_id, now, FrameKind.KV_DONE), now)

    def on_peer_failed(self, turn_id: str, reason: str, now: float) -> None:
        self._inbound(turn_id, _Parked(turn_id, now, FrameKind.TURN_FAILED, reason=reason), now)

    def tick(self, now: float) -> None:
        """Frames parked longer than park_timeout_s are dropped: their turn never came."""
        for turn_id in list(self._parked):
            frames = self._parked[turn_id]
            if now - frames[0].at < self.cfg.park_timeout_s:
                continue
            del self._parked[turn_id]
            self._num_parked -= len(frames)
            why = f"never assigned within {self.cfg.park_timeout_s:g} s"
            self._actions.append(Discarded(turn_id, frames[0].kind, why))

    # -- internals ------------------------------------------------------------------------------
    def _inbound(self, turn_id: str, p: _Parked, now: float) -> None:
        if turn_id in self.turns:
            self._replay(p, now)
        elif turn_id in self._recent:
            self._actions.append(Discarded(turn_id, p.kind, "the turn is over here"))
        elif self._num_parked >= self.cfg.max_parked:
            self._actions.append(Discarded(turn_id, p.kind, "too many frames for unknown turns"))
        else:
            self._parked.setdefault(turn_id, []).append(p)
            self._num_parked += 1

    def _replay(self, p: _Parked, now: float) -> None:
        t = self.turns.get(p.turn_id)
        if t is None:
            return
        try:
            if p.kind is FrameKind.TURN_FAILED:
                self._peer_failed(t, p.reason)
            elif p.kind is FrameKind.KV:
                self._got_kv(t, p)
            elif p.kind is FrameKind.RELAY:
                self._got_relay(t, p)
            elif p.kind is FrameKind.RELAY_GROUP_DONE:
                self._got_relay_group_done(t, p.group)
            elif p.kind is FrameKind.KV_DONE:
                self._got_kv_done(t)
        except FrameMismatch as exc:
            self.fail(
                t.a.turn_id, f"{p.kind} frame from {t.a.peer(self.role)}: {exc}", retryable=False
            )

    def _check(self, t: _KvTurn, p: _Parked, role: Role, allowed: list[range]) -> SliceSet:
        s = p.slices
        assert s is not None
        if self.role is not role:
            raise FrameMismatch(f"a {p.kind} frame on a {self.role.value} node")
        if not t.a.owns(s.traj, s.blocks):
            raise FrameMismatch(
                f"trajectory {s.traj} does not hold blocks {describe(s.blocks)} of the turn "
                f"(the turn's is {t.a.traj_id})"
            )
        if s.g1 != s.g0 + 1:
            raise FrameMismatch(f"layer groups [{s.g0}, {s.g1}): one group per frame")
        if not _blocks_within(s.blocks, allowed):
            want = ", ".join(f"[{r.start}, {r.stop})" for r in allowed if r)
            raise FrameMismatch(f"blocks {describe(s.blocks)} outside the turn's {want or 'none'}")
        return s

    def _got_kv(self, t: _KvTurn, p: _Parked) -> None:
        a = t.a
        allowed = [range(*a.prefill_read), range(a.hit_blocks, a.prompt_blocks)]
        s = self._check(t, p, Role.DECODE, allowed)
        if t.kv_done:
            raise FrameMismatch("KV after kv_done")
        present = t.present[s.g0]
        before = len(present)
        present.update(s.blocks)
        if len(present) - before != len(s.blocks):
            raise FrameMismatch(f"layer group {s.g0}: blocks {describe(s.blocks)} sent twice")

    def _got_relay(self, t: _KvTurn, p: _Parked) -> None:
        s = self._check(t, p, Role.PREFILL, [range(*t.a.decode_read)])
        if t.relayed[s.g0]:
            raise FrameMismatch(f"relay of layer group {s.g0} after its relay_group_done")
        got = t.relay_got[s.g0]
        before = len(got)
        got.update(s.blocks)
        if len(got) - before != len(s.blocks):
            raise FrameMismatch(f"layer group {s.g0}: blocks {describe(s.blocks)} relayed twice")

    def _got_relay_group_done(self, t: _KvTurn, group: int) -> None:
        if self.role is not Role.PREFILL or not 0 <= group < self.cfg.layer_groups:
            raise FrameMismatch(f"relay_group_done for layer group {group}")
        want = len(range(*t.a.decode_read))
        got = len(t.relay_got[group])
        if got != want and not self.cfg.oracle:
            raise FrameMismatch(f"layer group {group} done after {got} of {want} blocks")
        t.relayed[group] = True
        self._announce(t)

    def _got_kv_done(self, t: _KvTurn) -> None:
        if self.role is not Role.DECODE:
            raise FrameMismatch("kv_done on a prefill node")
        t.kv_done = True
        if not self.cfg.oracle:
            # The decode side checks the full context is present before decoding.
            need = t.a.prompt_blocks
            missing = sum(need - len(p) for p in t.present)
            if missing:
                raise FrameMismatch(
                    f"context incomplete: {missing} of {need * self.cfg.layer_groups} "
                    "slices missing"
                )
        self._actions.append(KvComplete(t.a.turn_id))

    def _peer_failed(self, t: _KvTurn, reason: str) -> None:
        self.turns.pop(t.a.turn_id, None)
        self._remember(t.a.turn_id)
        self._actions.append(FreeBuffers(t.a.turn_id))
        why = f"{t.a.peer(self.role)} failed the turn: {reason}"
        self._actions.append(Failed(t.a.turn_id, why, retryable=True, report=False))

    def _announce(self, t: _KvTurn) -> None:
        """Prefill: group g is ready once the own read (if any) is done and the decode node's
        relay of group g (if it reads any blocks) has all arrived."""
        if not t.read_done:
            return
        relays = bool(t.a.decode_read[1] > t.a.decode_read[0]) and not self.cfg.oracle
        for g in range(self.cfg.layer_groups):
            if not t.announced[g] and (not relays or t.relayed[g]):
                t.announced[g] = True
                self._actions.append(GroupReady(t.a.turn_id, g))

    def _maybe_done_sent(self, t: _KvTurn) -> None:
        if t.prefill_done and not t.sending and not t.done_sent:
            t.done_sent = True
            self._actions.append(SendKvDone(t.a.turn_id))

    def _finish(self, t: _KvTurn, outcome: Released | Persisted) -> None:
        self.turns.pop(t.a.turn_id, None)
        self._remember(t.a.turn_id)
        self._actions.append(FreeBuffers(t.a.turn_id))
        self._actions.append(outcome)

    def _remember(self, turn_id: str) -> None:
        self._recent[turn_id] = None
        self._recent.move_to_end(turn_id)
        while len(self._recent) > RECENT_TURNS:
            self._recent.popitem(last=False)


def _blocks_within(blocks: tuple[int, ...], allowed: Iterable[range]) -> bool:
    """Every block lies in one of the `allowed` ranges (C-speed: frames carry ~100 blocks)."""
    ranges = [r for r in allowed if r]
    if not blocks:
        return True
    lo, hi = min(blocks), max(blocks)
    if any(r.start <= lo and hi < r.stop for r in ranges):
        return True
    ok: set[int] = set()
    for r in ranges:
        ok.update(r)
    return ok.issuperset(blocks)

"""Content-addressed KV blocks: which persisted request holds each block, by its key.

A request's prompt comes as one key per full block, each naming the block and everything
before it (a chained hash, as prefix caches do: Mooncake, LMCache, vLLM). A block whose key is
known was persisted by some earlier request at the same position, so a new request reads the
longest prefix of its keys that is known, from where each block lives, and computes the rest.
Pure: no I/O; the scheduler keeps one catalogue and fills it as requests finish persisting.
"""

from __future__ import annotations

from collections.abc import Sequence

Source = tuple[int, int, int]
"""(trajectory, first, end): blocks [first, end) of a prompt live in that trajectory's file."""


class PrefixCatalogue:
    """key -> (trajectory, position) of every persisted content-addressed block, unbounded
    (the storage tier keeps every block it was given, as the offline hit rate assumes)."""

    def __init__(self) -> None:
        self._where: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def lookup(self, keys: Sequence[int]) -> tuple[int, tuple[Source, ...]]:
        """The longest persisted prefix of `keys`: its length in blocks and where it lives, as
        runs of consecutive blocks of one trajectory. A key known at another position is a
        miss (a key names its prefix, so that only happens with a broken trace)."""
        runs: list[list[int]] = []
        hit = 0
        for i, key in enumerate(keys):
            where = self._where.get(key)
            if where is None or where[1] != i:
                break
            traj = where[0]
            if runs and runs[-1][0] == traj:
                runs[-1][2] = i + 1
            else:
                runs.append([traj, i, i + 1])
            hit = i + 1
        return hit, tuple((t, first, end) for t, first, end in runs)

    def persisted(self, traj: int, keys: Sequence[int], blocks: range) -> int:
        """Trajectory `traj` persisted `blocks` of a prompt with `keys`: known keys keep their
        first home. Returns how many keys were new."""
        new = 0
        for i in blocks:
            if keys[i] not in self._where:
                self._where[keys[i]] = (traj, i)
                new += 1
        return new

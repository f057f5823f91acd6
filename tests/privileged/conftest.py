"""Fixtures of the privileged netem tests: a unique lab id per test and a lab factory that
always takes its labs down (and clears whatever their records still list)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netem.lifecycle import down_from_state
from netem.netns import NetnsLab
from netem.spec import TopologySpec


@pytest.fixture
def lab_id() -> str:
    """Unique per test, so concurrent runs and leftovers never collide."""
    return "t" + secrets.token_hex(3)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A private state directory: the tests never read or write /run/dualpath."""
    return tmp_path / "state"


@pytest.fixture
def make_lab(lab_id: str, state_dir: Path) -> Iterator[Callable[[TopologySpec], NetnsLab]]:
    labs: list[NetnsLab] = []

    def make(spec: TopologySpec) -> NetnsLab:
        lab = NetnsLab(spec, state_dir=state_dir)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.down()
    down_from_state(lab_id, state_dir=state_dir)

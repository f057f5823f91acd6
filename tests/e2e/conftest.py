"""Fixtures of the end-to-end tests: a Docker engine with the project image (built or reused),
the compose CLI, a unique lab name per test, and helpers that list and remove exactly what
carries that lab's label.

Without a Docker engine the tests skip, saying so; with DUALPATH_E2E_REQUIRED=1 (`make e2e`,
so CI) they fail instead: CI must never pass by skipping them.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack_helpers import need

from compose.backend import ComposeError, compose_cli, ensure_image, remove_leftovers


@pytest.fixture(scope="session")
def image() -> str:
    """The image of these sources (built or reused), once the engine answers."""
    try:
        return ensure_image(say=lambda m: print(m, file=sys.stderr))
    except ComposeError as exc:
        need(f"no usable Docker engine: {exc}")
        raise AssertionError("unreachable") from exc


@pytest.fixture(scope="session")
def compose(image: str) -> tuple[str, ...]:
    """The compose CLI: `docker compose` (v2) or `docker-compose` (v1)."""
    try:
        return compose_cli()
    except ComposeError as exc:
        need(str(exc))
        raise AssertionError("unreachable") from exc


@pytest.fixture
def lab_name(compose: tuple[str, ...]) -> Iterator[str]:
    """A config name of its own (the com.dualpath.lab label of a rendered stack); whatever
    still carries it after the test is removed, by id."""
    name = "e2e-" + secrets.token_hex(3)
    yield name
    remove_leftovers(name)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALPATH_STATE_DIR", str(tmp_path / "state"))

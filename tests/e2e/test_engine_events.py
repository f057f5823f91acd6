"""compose.engine.wait_for_exit on a real engine: the compose backend waits for a stack's
driver (or a node that dies first) on the engine's event stream instead of polling. A
container that exits while others run is named with its exit status; one that had exited
before the wait began is found too. Containers are removed by the ids recorded here."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from compose import engine
from compose.engine import ContainerSpec, EngineError


@pytest.fixture
def started(image: str) -> Iterator[dict[str, str]]:
    """name -> id of the containers a test starts from the project image (removed after)."""
    made: dict[str, str] = {}
    try:
        yield made
    finally:
        for cid in made.values():
            with contextlib.suppress(EngineError):
                engine.remove("container", cid)


def _start(image: str, made: dict[str, str], name: str, script: str) -> None:
    spec = ContainerSpec(
        image=image,
        command=("-c", script),
        entrypoint=("sh",),
        network_mode="none",
        labels={"com.dualpath.e2e": "engine-events"},
    )
    made[name] = engine.run_detached(spec, name=name)


def test_the_first_container_to_exit_is_named_with_its_status(
    image: str, started: dict[str, str]
) -> None:
    _start(image, started, "node", "sleep 3; exit 7")
    _start(image, started, "driver", "sleep 120")
    assert engine.wait_for_exit(started) == ("node", 7)
    assert engine.states({"driver": started["driver"]})["driver"]["Running"]


def test_a_container_that_exited_before_the_wait_is_found(
    image: str, started: dict[str, str]
) -> None:
    _start(image, started, "driver", "exit 3")
    _start(image, started, "node", "sleep 120")
    deadline = time.monotonic() + 60
    while engine.states({"driver": started["driver"]})["driver"]["Running"]:
        assert time.monotonic() < deadline, "the container never exited"
        time.sleep(0.2)
    assert engine.wait_for_exit(started) == ("driver", 3)


def test_an_unknown_container_is_named(image: str) -> None:
    with pytest.raises(EngineError, match="ghost"):
        engine.wait_for_exit({"ghost": "0" * 64})

"""The pytest plugin of DualPath Mesh: fixtures that bring labs up in a user's test suite.

Installing dualpath-mesh registers it (`[project.entry-points.pytest11]`, as `dualpath`), so a
test only names the fixtures (docs/testing.md; examples/pytest/test_example_lab.py):

    dualpath_backend   the backend the session's labs use: netns where this process may create
                       namespaces (root, CAP_NET_ADMIN), local otherwise; `--dualpath-backend`
                       forces one
    dualpath_config    config(source, *, policy=, agents=, turns=, overrides=) -> LabConfig
    dualpath_lab       lab(source, **same) -> Lab, up until the test ends (always taken down):
                       .set_link(node, nic, rate=, loss=, delay=, jitter=, up=), .node(node,
                       action), .run() -> RunResult (.summary: summary.json, .out_dir)
    dualpath_run       run(source, *, scenario=None, **same) -> RunResult, like `dualpath run`
    dualpath_results   the directory this test's labs and runs write to (`--dualpath-results
                       DIR` keeps them under DIR, e.g. for a CI artifact; pytest's tmp_path
                       otherwise)

A source is a YAML config file, a mapping or a LabConfig. The marker `dualpath_netns` skips a
test unless the labs are netns ones (shaped links).

This module is imported by every pytest session of an environment that has dualpath-mesh
installed, so it costs nothing until a fixture is used: it imports pytest and the standard
library only, and each fixture imports the lab (lab.testing.harness, 0.6 s of imports) when
it runs. That is why it is the second module allowed to import inside functions
(tests/unit/test_architecture.py). Nothing here starts a lab unless a fixture asks for one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lab.config.models import LabConfig
    from lab.run.runner import RunResult
    from lab.testing.harness import Lab

BACKEND_OPTION = "--dualpath-backend"
RESULTS_OPTION = "--dualpath-results"
NETNS_MARKER = "dualpath_netns"
_BACKEND = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dualpath", "DualPath Mesh labs (lab.pytest_plugin)")
    group.addoption(
        BACKEND_OPTION,
        default=os.environ.get("DUALPATH_TEST_BACKEND", "auto"),
        help="backend of the labs the dualpath fixtures bring up: netns, local or auto (netns "
        "when this process may create network namespaces, local otherwise; default auto, or "
        "$DUALPATH_TEST_BACKEND)",
    )
    group.addoption(
        RESULTS_OPTION,
        default=None,
        metavar="DIR",
        help="keep every lab's and run's directory (summary.json, logs) under DIR/<test> "
        "instead of pytest's tmp_path",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{NETNS_MARKER}: needs shaped links (the netns backend); skipped otherwise"
    )


def _backend(config: pytest.Config) -> str:
    """The session's backend, chosen once (lab.testing.harness.choose_backend)."""
    if _BACKEND not in config.stash:
        from lab.testing.harness import choose_backend

        config.stash[_BACKEND] = choose_backend(str(config.getoption(BACKEND_OPTION)))
    return config.stash[_BACKEND]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker(NETNS_MARKER) is not None:
        backend = _backend(item.config)
        if backend != "netns":
            pytest.skip(f"{NETNS_MARKER}: needs shaped links, the labs here are {backend}")


@pytest.fixture(scope="session")
def dualpath_backend(pytestconfig: pytest.Config) -> str:
    """netns or local: the backend of the labs the dualpath fixtures bring up."""
    return _backend(pytestconfig)


@pytest.fixture
def dualpath_results(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where this test's labs and runs write (one subdirectory each)."""
    root = request.config.getoption(RESULTS_OPTION)
    if root is None:
        return tmp_path / "dualpath"
    test = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid).strip("_")
    return Path(str(root)) / test


@pytest.fixture
def _dualpath_dirs() -> set[str]:
    """The run directories this test's labs and runs took under dualpath_results."""
    return set()


@pytest.fixture
def dualpath_config() -> Callable[..., LabConfig]:
    """config(source, *, policy=None, agents=None, turns=None, overrides=None) -> LabConfig:
    a YAML file, mapping or LabConfig with overrides (dotted keys or nested mappings, e.g.
    {"workload.seed": 3}); ConfigError names a bad field."""
    from lab.testing.harness import load

    return load


@pytest.fixture
def dualpath_lab(
    dualpath_backend: str, dualpath_results: Path, _dualpath_dirs: set[str]
) -> Iterator[Callable[..., Lab]]:
    """lab(source, **overrides) -> Lab: a lab up on the session's backend until the test
    ends, then taken down whatever happened (lab.testing.harness.Lab)."""
    from lab.testing.harness import lab_factory

    with lab_factory(dualpath_results, dualpath_backend, taken=_dualpath_dirs) as make:
        yield make


@pytest.fixture
def dualpath_run(
    dualpath_backend: str, dualpath_results: Path, _dualpath_dirs: set[str]
) -> Callable[..., RunResult]:
    """run(source, *, scenario=None, progress=False, **overrides) -> RunResult: one run end
    to end like `dualpath run` (`dualpath chaos` with a scenario file); .summary is
    summary.json."""
    from lab.testing.harness import load, run, run_dir_name

    def run_config(
        source: Any, *, scenario: Any = None, progress: bool = False, **overrides: Any
    ) -> RunResult:
        cfg = load(source, **overrides)
        out = dualpath_results / run_dir_name(cfg, _dualpath_dirs)
        return run(cfg, backend=dualpath_backend, out_dir=out, scenario=scenario, progress=progress)

    return run_config

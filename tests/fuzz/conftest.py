"""The fuzz tier's fixtures and report: the budget is fuzzlib's (profiles `ci` and `long`).

At the end the inputs tried and the failures per target are printed, and written as JSON to
DUALPATH_FUZZ_REPORT when it is set.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fuzzlib
import pytest

from services.spec import ClusterSpec


def _integration_conftest() -> Any:
    """tests/integration/conftest.py: its free-port cluster spec is the one to start servers
    from (the tiers are directories without packages, so it is loaded by path)."""
    path = Path(__file__).parents[1] / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("integration_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_integration = _integration_conftest()
local_spec: Callable[..., ClusterSpec] = _integration.local_spec
running_scheduler: Callable[[ClusterSpec], Any] = _integration.running_scheduler


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., ClusterSpec]:
    def make(config: dict[str, Any] | None = None, **overrides: Any) -> ClusterSpec:
        return local_spec(tmp_path / "data", config, **overrides)

    return make


@pytest.fixture
def run_scheduler() -> Callable[[ClusterSpec], Any]:
    """running_scheduler (tests/integration/conftest.py), as the integration tier has it."""
    return running_scheduler


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fuzz_target(name): the target a fuzz test's inputs count for"
    )


@pytest.fixture(autouse=True)
def _target(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("fuzz_target")
    if marker is None:
        yield
        return
    name = str(marker.args[0])
    fuzzlib.COUNTS.setdefault(name, 0)
    fuzzlib.FAILURES.setdefault(name, 0)
    fuzzlib.CURRENT.append(name)
    try:
        yield
    finally:
        fuzzlib.CURRENT.pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    marker = item.get_closest_marker("fuzz_target")
    if marker is not None and report.failed:
        name = str(marker.args[0])
        fuzzlib.FAILURES[name] = fuzzlib.FAILURES.get(name, 0) + 1
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not fuzzlib.COUNTS:
        return
    lines = [
        f"fuzz: {name} -> {fuzzlib.COUNTS[name]} inputs, {fuzzlib.FAILURES.get(name, 0)} failures"
        for name in sorted(fuzzlib.COUNTS)
    ]
    total = sum(fuzzlib.COUNTS.values())
    failed = sum(fuzzlib.FAILURES.values())
    lines.append(f"fuzz: {len(fuzzlib.COUNTS)} targets, {total} inputs, {failed} failures")
    terminalreporter.section(f"fuzz ({fuzzlib.PROFILE} profile)")
    for line in lines:
        terminalreporter.write_line(line)
    out = os.environ.get("DUALPATH_FUZZ_REPORT")
    if out:
        report = {
            "profile": fuzzlib.PROFILE,
            "max_examples": fuzzlib.BUDGET.max_examples,
            "targets": {
                name: {"inputs": fuzzlib.COUNTS[name], "failures": fuzzlib.FAILURES.get(name, 0)}
                for name in sorted(fuzzlib.COUNTS)
            },
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")

"""The layout's rules that the import contracts (pyproject [tool.importlinter], run by
`make lint`) do not cover: no module imports the lab's own code inside a function (the way to
dodge a cycle), and none imports another module's private names (`_x`)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from compose.backend import SOURCE_PACKAGES
from dualpath.errors import DualPathError

REPO = Path(__file__).resolve().parents[2]
PACKAGES = SOURCE_PACKAGES
ROLE_DISPATCH = {"services/__main__.py"}
"""The one module allowed to import inside functions: a node process imports only its own role
(a storage server without gRPC and the engine: 61 MiB instead of 84 MiB and a third of the
start-up CPU, times every node of a lab on a laptop). Not a cycle: services.__main__ is
imported by nothing."""
PYTEST_PLUGIN = {"lab/pytest_plugin.py"}
"""The other one: pytest imports the plugin in every session of an environment where
dualpath-mesh is installed, so it imports the lab (0.6 s) only in the fixture that uses it.
Not a cycle either: only pytest imports lab.pytest_plugin."""


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _first_party(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in PACKAGES


def _deferred_imports(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and _first_party(inner.module):
                    found.append(f"line {inner.lineno}: from {inner.module} import ...")
                elif isinstance(inner, ast.Import):
                    found += [
                        f"line {inner.lineno}: import {a.name}"
                        for a in inner.names
                        if _first_party(a.name)
                    ]
    return found


def _private_imports(tree: ast.Module) -> list[str]:
    return [
        f"line {node.lineno}: from {node.module} import {a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and _first_party(node.module)
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_deferred_or_private_imports(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    relative = str(path.relative_to(REPO))
    deferred = [] if relative in ROLE_DISPATCH | PYTEST_PLUGIN else _deferred_imports(tree)
    bad = deferred + _private_imports(tree)
    assert not bad, f"{path.relative_to(REPO)}: " + "; ".join(bad)


def test_the_rules_find_what_they_forbid() -> None:
    tree = ast.parse(
        "def f():\n    from lab.run import runner\n    import netem.netns\n"
        "from services.codec import _private\n"
    )
    assert len(_deferred_imports(tree)) == 2
    assert _private_imports(tree) == ["line 4: from services.codec import _private"]


SIGNALS = {"lab.cli.Terminated"}
"""Not errors: SIGTERM raised as KeyboardInterrupt so that every `finally` runs."""


def test_every_error_class_derives_from_the_one_base() -> None:
    strays = []
    for path in _modules():
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if name == "services.__main__":
            continue
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
                and not issubclass(obj, DualPathError)
                and f"{name}.{attr}" not in SIGNALS
            ):
                strays.append(f"{name}.{attr}")
    assert not strays, f"not derived from dualpath.errors.DualPathError: {strays}"

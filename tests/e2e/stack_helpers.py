"""Helpers of the end-to-end tests: the dualpath CLI as a subprocess, rendering the small
config under a lab name of its own, and the check that nothing of a lab is left."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from compose.backend import leftovers

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "examples" / "compose-small.yaml"
REQUIRED = os.environ.get("DUALPATH_E2E_REQUIRED") == "1"
RUN_TIMEOUT_S = 900


def need(reason: str) -> None:
    """Skip, saying why; fail instead when the e2e tests are required (CI)."""
    if REQUIRED:
        pytest.fail(f"{reason} (DUALPATH_E2E_REQUIRED=1: the e2e tests must run)")
    pytest.skip(reason)


def subnets() -> list[str]:
    """`--set` arguments that give a test's lab three /24s of its own in 198.18.16.0-198.18.255.0
    (not the defaults, which a laptop stack on the same engine may hold)."""
    third = 16 + 4 * secrets.randbelow(60)
    names = ("compute", "storage", "mgmt")
    return [
        arg
        for i, net in enumerate(names)
        for arg in ("--set", f"network.{net}_subnet=198.18.{third + i}.0/24")
    ]


def dualpath(
    *args: str, timeout_s: float = 120, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=ROOT,
    )


def render(
    out: Path,
    name: str,
    *,
    image: str,
    policies: str,
    results: str = "./results",
    monitoring: bool = True,
) -> subprocess.CompletedProcess[str]:
    done = dualpath(
        "compose", "render", "-c", str(SMALL), "--set", f"name={name}", *subnets(),
        "--policies", policies, "--results", results, "--image", image, "-o", str(out),
        *([] if monitoring else ["--no-monitoring"]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def nothing_left(name: str) -> None:
    assert leftovers(name) == {"container": [], "network": [], "volume": []}

"""The pure modules stay pure: importing them pulls in no event loop, socket or netlink code.

Each is imported in a fresh interpreter, so what another test imported cannot hide a new
dependency; the check is on the modules they load, not on their source text.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "services.engine_core",
    "services.prefill_core",
    "services.decode_core",
    "services.timeline",
    "services.dataplane_core",
    "services.assignment",
    "services.kvblocks",
    "services.buffers",
    "services.wire.rpc",
    "services.storage_protocol",
    "services.prefixes",
    "services.tokenizer",
    "lab.run.trace_replay",
    "services.scheduler.state",
    "scheduler.dualpath_policy",
    "scheduler.registry",
    "scheduler.plugins",
    "scheduler.batching",
    "netem.plan",
    "netem.linkchange",
    "lab.config.scaling",
    "lab.results.health",
]
FORBIDDEN = ["asyncio", "pyroute2", "grpc", "aiohttp", "uvloop", "services.transport"]
"""(Not `socket`: pydantic, which the spec models use, imports it through the email package.)"""


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_loads_no_io(module: str) -> None:
    code = f"import sys, {module}; print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"{module} imports {out}"

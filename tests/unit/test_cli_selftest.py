"""The selftest options on the command line: units, defaults and refused combinations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dualpath.errors import EXIT_USAGE
from lab.cli import build_parser
from lab.commands import selftest_options

REPO = Path(__file__).resolve().parents[2]


def test_percent_on_the_command_line_is_a_fraction_in_the_options() -> None:
    args = build_parser().parse_args(
        ["run", "-c", "x.yaml", "--selftest", "--selftest-tolerance", "2.5",
         "--selftest-seconds", "1", "--max-concurrent-mbit", "400", "--allow-out-of-tolerance"]
    )  # fmt: skip
    opts = selftest_options(args)
    assert (opts.tolerance, opts.seconds, opts.max_concurrent_mbit) == (0.025, 1.0, 400.0)
    assert opts.allow_out_of_tolerance
    default = selftest_options(build_parser().parse_args(["selftest", "-c", "x.yaml"]))
    assert (default.tolerance, default.seconds, default.allow_out_of_tolerance) == (
        0.05,
        2.0,
        False,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "-c", "examples/laptop.yaml", "--selftest", "--backend", "local"], "--selftest"),
        (["run", "-c", "examples/laptop.yaml", "--allow-out-of-tolerance"], "--allow-out-of"),
        (["selftest", "-c", "examples/laptop.yaml", "--tolerance", "0"], "--tolerance"),
    ],
)
def test_bad_selftest_flags_exit_2_naming_the_flag(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lab.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == EXIT_USAGE, done.stderr
    assert message in done.stderr

"""`dualpath exec NODE -- CMD` on a terminal, against a real container: the CLI runs under a
pseudo-terminal of the test's own, as a person's shell would run it, and the session goes
through the engine's API (compose.engine.exec_tty): raw mode while it lasts and the terminal
restored after, the window size and its change reaching the command's TTY, typed keys echoed
back by the container's TTY, and the command's exit status as the CLI's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack_helpers import ROOT

from compose import engine
from compose.render import LAB_LABEL, NODE_LABEL
from lab.run.backends import RunState

WAIT_S = 60.0
# `read` first: on an engine older than API 1.42 the exec's TTY is sized just after the
# command starts (as with `docker exec -it`), and the keys typed go in only after that.
SCRIPT = (
    'read a; stty size; read b; stty size; printf "got:%s,%s\\n" "$a" "$b"; '
    "trap 'stty size; exit 5' WINCH; echo armed; while :; do sleep 1; done"
)


@pytest.fixture
def node(image: str, lab_name: str) -> Iterator[str]:
    """A container of the image that only waits, labelled with the test's lab (removed by
    its id here, and by the label in lab_name's teardown should this fail half-way)."""
    with engine.engine_errors(f"a container of {image}"):
        container = engine.client().containers.run(
            image,
            entrypoint=["sleep", "infinity"],
            network_mode="none",
            labels={LAB_LABEL: lab_name, NODE_LABEL: "prefill-0"},
            detach=True,
        )
    try:
        yield str(container.id)
    finally:
        with contextlib.suppress(engine.EngineError):  # a test may have removed it
            engine.remove("container", str(container.id))


def _set_size(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


class Screen:
    """What the CLI wrote to its terminal (the master side of the pseudo-terminal)."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.text = b""

    def wait_for(self, wanted: bytes) -> None:
        deadline = time.monotonic() + WAIT_S
        while wanted not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"no {wanted!r} on the terminal; it shows {self.text!r}"
            assert self._read(left), f"the terminal closed before {wanted!r}: {self.text!r}"

    def read_to_end(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while self._read(deadline - time.monotonic()):
            assert time.monotonic() < deadline, f"the session did not end: {self.text!r}"

    def _read(self, timeout_s: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(timeout_s, 0))
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every process on the terminal's side has closed it
            return False
        self.text += data
        return bool(data)


def _lflag(fd: int) -> int:
    # On a pseudo-terminal's master, tcgetattr reads the terminal side's modes.
    return int(termios.tcgetattr(fd)[3])


def _start_cli(*argv: str, size: tuple[int, int] = (24, 80)) -> tuple[int, Screen]:
    """`dualpath ARGV` on the terminal side of a new pseudo-terminal of `size` (rows,
    columns): its pid and what it shows."""
    pid, master = pty.fork()
    if pid == 0:
        try:
            _set_size(0, *size)
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "lab.cli", *argv])
        finally:
            os._exit(127)
    return pid, Screen(master)


def _reap(pid: int, screen: Screen) -> None:
    """Kill the CLI (by its pid) if a failed assertion left it running; close the terminal."""
    if pid:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    os.close(screen.master)


def test_exec_on_a_terminal_is_an_interactive_session(node: str, tmp_path: Path) -> None:
    state = RunState("tty0", "compose", tmp_path / "docker-compose.yml", None)
    state.data["compose"] = {"project": "dualpath-tty0", "containers": {"prefill-0": node}}
    state.save()
    pid, screen = _start_cli("exec", "prefill-0", "--", "sh", "-c", SCRIPT, size=(37, 101))
    master = screen.master
    try:
        deadline = time.monotonic() + WAIT_S
        while _lflag(master) & termios.ECHO:  # until the CLI has the terminal in raw mode
            assert time.monotonic() < deadline, f"never in raw mode: {screen.text!r}"
            time.sleep(0.05)
        assert not _lflag(master) & (termios.ICANON | termios.ISIG)
        os.write(master, b"hello\r")
        # echoed by the container's TTY (ours echoes nothing in raw mode), then the size
        screen.wait_for(b"hello\r\n37 101\r\n")
        _set_size(master, 50, 132)
        os.write(master, b"world\r")  # the new size reaches the command before the keys
        screen.wait_for(b"world\r\n50 132\r\ngot:hello,world\r\narmed\r\n")
        # a change with no key typed: the kernel sends the CLI SIGWINCH, which passes it on
        _set_size(master, 40, 90)
        screen.wait_for(b"armed\r\n40 90\r\n")
        screen.read_to_end()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 5, screen.text
        # the terminal is back in the mode it had
        assert _lflag(master) & termios.ECHO and _lflag(master) & termios.ICANON
    finally:
        _reap(pid, screen)


def test_a_container_killed_during_the_session_ends_it_and_restores_the_terminal(
    node: str, tmp_path: Path
) -> None:
    """The container is killed while the command waits for a key: the session ends with the
    command's status (killed: 128 + 9) and the terminal is back in its mode."""
    state = RunState("tty1", "compose", tmp_path / "docker-compose.yml", None)
    state.data["compose"] = {"project": "dualpath-tty1", "containers": {"decode-0": node}}
    state.save()
    pid, screen = _start_cli("exec", "decode-0", "--", "sh", "-c", "echo waiting; read a")
    try:
        screen.wait_for(b"waiting\r\n")
        assert not _lflag(screen.master) & termios.ECHO  # raw mode
        with engine.engine_errors(f"container {node[:12]}"):
            engine.client().api.kill(node)
        screen.read_to_end()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 137, screen.text
        assert _lflag(screen.master) & termios.ECHO and _lflag(screen.master) & termios.ICANON
    finally:
        _reap(pid, screen)


def test_exec_on_a_terminal_names_a_container_the_engine_lacks(image: str, tmp_path: Path) -> None:
    """An exec into a container the engine does not have: the CLI's error names the node,
    the container and the engine's words."""
    missing = "dualpath-e2e-no-such-" + os.urandom(4).hex()
    state = RunState("tty2", "compose", tmp_path / "docker-compose.yml", None)
    state.data["compose"] = {"project": "dualpath-tty2", "containers": {"decode-0": missing}}
    state.save()
    pid, screen = _start_cli("exec", "decode-0", "--", "true")
    try:
        screen.read_to_end()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 1, screen.text
        text = screen.text.decode(errors="replace")
        assert f"container decode-0 ({missing[:12]})" in text, text
        assert f"No such container: {missing}" in text, text
    finally:
        _reap(pid, screen)

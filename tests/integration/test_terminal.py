"""compose.terminal, the local side of `dualpath exec` on a terminal, on real kernel objects and
no engine: a pseudo-terminal for raw mode and the window size, a socketpair standing for the
exec's attached connection. (The whole session against a container: tests/e2e/test_exec_tty.py.)
"""

from __future__ import annotations

import fcntl
import os
import pty
import socket
import struct
import termios
import threading
from collections.abc import Iterator

import pytest

from compose import terminal


@pytest.fixture
def tty_pair() -> Iterator[tuple[int, int]]:
    """(master, slave) of a new pseudo-terminal, closed afterwards."""
    master, slave = pty.openpty()
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def test_raw_mode_is_left_as_it_was_found_also_on_an_error(tty_pair: tuple[int, int]) -> None:
    _, slave = tty_pair
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ECHO
    with pytest.raises(RuntimeError, match="broke"), terminal.raw_mode(slave):
        assert not termios.tcgetattr(slave)[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
        raise RuntimeError("broke")
    assert termios.tcgetattr(slave) == before


def test_raw_mode_leaves_what_is_not_a_terminal_alone() -> None:
    read_fd, write_fd = os.pipe()
    try:
        with terminal.raw_mode(read_fd):
            pass
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert terminal.window_size(read_fd) is None


def test_the_window_size_is_the_terminals(tty_pair: tuple[int, int]) -> None:
    master, slave = tty_pair
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 77, 0, 0))
    assert terminal.window_size(slave) == (33, 77)


def test_relay_copies_both_ways_and_ends_with_the_remote_side() -> None:
    """Keys in go to the connection, after the size was synced; what the connection sends
    comes out; end-of-file on the keys half-closes it; its close ends the relay."""
    local, remote = socket.socketpair()
    keys_r, keys_w = os.pipe()
    out_r, out_w = os.pipe()
    wake_r, wake_w = os.pipe()
    events: list[str] = []

    def sync_size() -> None:
        events.append("size")

    relay = threading.Thread(
        target=terminal.relay,
        args=(keys_r, out_w, local),
        kwargs={"resized": wake_r, "sync_size": sync_size},
    )
    relay.start()
    try:
        os.write(keys_w, b"ls\r")
        assert remote.recv(100) == b"ls\r"
        assert events == ["size"]  # synced before the keys went out
        os.write(wake_w, b"w")  # a window change with no key
        remote.sendall(b"total 0\r\n")
        assert os.read(out_r, 100) == b"total 0\r\n"
        os.close(keys_w)
        keys_w = -1
        assert remote.recv(100) == b""  # end-of-file reached the command
        remote.sendall(b"bye\r\n")
        assert os.read(out_r, 100) == b"bye\r\n"
        remote.close()
        relay.join(timeout=30)
        assert not relay.is_alive()
        assert events == ["size", "size"]
    finally:
        remote.close()
        relay.join(timeout=30)
        local.close()
        for fd in (keys_r, keys_w, out_r, out_w, wake_r, wake_w):
            if fd >= 0:
                os.close(fd)

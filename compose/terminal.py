"""The local side of an interactive session in a container (`dualpath exec` on a terminal):
the terminal in raw mode and restored whatever happens, its window size and its changes
(SIGWINCH), and the bytes copied both ways between it and the exec's attached socket.

It never talks to the Docker engine: compose.engine.exec_tty opens the exec and hands the
socket and a resize callback in, so this module runs as well on a socketpair as on an engine.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import termios
import tty
from collections.abc import Callable, Iterator
from types import FrameType

CHUNK = 65536


def window_size(fd: int) -> tuple[int, int] | None:
    """(rows, columns) of the terminal on `fd`; None when it is not a terminal."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on `fd` in raw mode (keys go out as typed, Ctrl-C included, and the
    remote side echoes), its previous mode restored on leaving, also on an error. Nothing
    happens when `fd` is not a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def resize_signals() -> Iterator[int]:
    """A descriptor that becomes readable when the window changes (SIGWINCH), for a select
    loop. The signal module's wake-up descriptor, which the interpreter writes as the signal
    arrives, whichever thread the kernel gives it to (a Python handler runs only in the main
    thread, and only once that thread runs again). Off the main thread, where no handler can
    be set, the descriptor never becomes readable."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous_fd = -1
    try:
        previous = signal.signal(signal.SIGWINCH, _ignore)
    except ValueError:  # not the main thread
        previous = None
    else:
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield read_fd
    finally:
        if previous is not None:
            signal.set_wakeup_fd(previous_fd)
            signal.signal(signal.SIGWINCH, previous)
        os.close(read_fd)
        os.close(write_fd)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """SIGWINCH's handler: the wake-up descriptor does the work (a signal without a Python
    handler writes nothing to it)."""


def relay(
    fd_in: int, fd_out: int, sock: socket.socket, *, resized: int, sync_size: Callable[[], None]
) -> None:
    """Copy `fd_in` to `sock` and `sock` to `fd_out` until the remote side closes `sock` (its
    command has ended). End-of-file on `fd_in` half-closes `sock` (end-of-file for the
    command) and the output is still copied. `sync_size` runs when `resized` (from
    resize_signals) becomes readable and before each input is passed on, so that keys typed
    after a window change reach a command that already has the new size."""
    sock.setblocking(True)
    readers: list[int | socket.socket] = [resized, sock, fd_in]
    while True:
        ready, _, _ = select.select(readers, [], [])
        if resized in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(resized, 512)
            sync_size()
        if sock in ready:
            data = sock.recv(CHUNK)
            if not data:
                return
            _write_all(fd_out, data)
        if fd_in in ready:
            try:
                data = os.read(fd_in, CHUNK)
            except OSError:  # EIO: the terminal hung up, which ends the input like EOF
                data = b""
            if data:
                sync_size()
                sock.sendall(data)
            else:
                readers.remove(fd_in)
                with contextlib.suppress(OSError):  # the command may be gone already
                    sock.shutdown(socket.SHUT_WR)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


__all__ = ["raw_mode", "relay", "resize_signals", "window_size"]
